"""What a user does: start a head of their own (private ports, token auth on), submit rlds with the
README's `ray job submit` command, stop it as a preemption would and submit it again with
resume=auto, follow the job to SUCCEEDED, read rlds' series from the node's metrics endpoint, and
stop the head by its pid (never with Ray's stop command, which stops every cluster on the machine)."""
import json
import os
import re
import secrets
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import free_ports, processes_of

pytestmark = pytest.mark.timeout(420)
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def readme_job_command() -> list[str]:
    """The `ray job submit` command of the README's "On a cluster" section, as words."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## On a cluster"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    command = re.search(r"^ray job submit .*?(?<!\\)$", block.replace("\\\n", " "), re.M).group(0)
    return shlex.split(command)


def scrape(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.read().decode()
    except OSError:
        return ""


def test_the_readmes_job_submit_command_runs_on_a_head_of_our_own(tmp_path):
    command = readme_job_command()
    assert command[:3] == ["ray", "job", "submit"] and "--address" in command and "--no-progress" in command
    gcs, dash, agent, metrics_port, client = free_ports(5)
    temp_dir = tempfile.mkdtemp(prefix="rj-", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}  # the job's `python` is the head's (README)
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--temp-dir={temp_dir}", f"--port={gcs}",
         f"--dashboard-port={dash}", f"--dashboard-agent-listen-port={agent}",
         f"--metrics-export-port={metrics_port}", f"--ray-client-server-port={client}", "--num-cpus=4",
         "--include-dashboard=true"],
        env=env, stdout=open(tmp_path / "head.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 120
        while True:  # the job server is up, and refuses a client without the token
            try:
                urllib.request.urlopen(f"{address}/api/jobs/", timeout=5)
                pytest.fail("the job API answered without a token: token auth is off")
            except urllib.error.HTTPError as e:
                assert e.code == 401, e
                break
            except OSError:
                assert head.poll() is None, (tmp_path / "head.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "the head's job server did not come up in 120 s"
                time.sleep(1)

        run_dir = tmp_path / "runs" / "tiny-job"
        words = [str(BIN / "ray") if w == "ray" else w for w in command]
        words[words.index("--address") + 1] = address
        words = [f"run_dir={run_dir}" if w.startswith("run_dir=") else w for w in words]
        # the README's run, shorter, and resubmittable: a preempted job continues (resume=auto)
        words += ["iterations=8", "checkpoint_every=2", "sample_grid_every=0", "resume=auto"]
        ray_cli = [str(BIN / "ray"), "job"]

        # 1. submitted, then stopped after its first checkpoint, as a preemption would
        first = subprocess.run(words[:3] + ["--no-wait"] + words[3:], cwd=ROOT, env=env, capture_output=True,
                               text=True, timeout=120)
        assert first.returncode == 0, first.stdout + first.stderr
        first_id = re.search(r"Job '(\S+)' submitted successfully", first.stdout + first.stderr).group(1)
        deadline = time.monotonic() + 240
        while not list((run_dir / "checkpoints").glob("iter_*/state.json")):
            assert time.monotonic() < deadline, "the first submission wrote no checkpoint in 240 s"
            time.sleep(1)
        subprocess.run(ray_cli + ["stop", "--address", address, first_id], env=env, capture_output=True,
                       timeout=120, check=True)

        # 2. the same command again, followed to the end, while its metrics are scraped
        seen: set[str] = set()
        stop = threading.Event()

        def watch_metrics():  # rlds' series, while the job runs (actors' series go with them)
            while not stop.wait(2):
                seen.update(re.findall(r"^(ray_rlds_\w+?)(?:_bucket|_count|_sum|_total)?[{ ]",
                                       scrape(f"http://127.0.0.1:{metrics_port}/metrics"), re.M))

        watcher = threading.Thread(target=watch_metrics, daemon=True)
        watcher.start()
        job = subprocess.run(words, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        stop.set()
        watcher.join(timeout=10)
        log = job.stdout + job.stderr
        assert job.returncode == 0, log[-4000:]
        assert re.search(r"resume=auto: continuing from \S+iter_0000\d\d", log), log[-4000:]
        submission = re.search(r"Job '(\S+)' succeeded", log)
        assert submission, log[-4000:]
        status = subprocess.run(ray_cli + ["status", "--address", address, submission.group(1)],
                                env=env, capture_output=True, text=True, timeout=60)
        assert f"Job '{submission.group(1)}' succeeded" in status.stdout, status.stdout + status.stderr
        iterations = [json.loads(row)["iteration"] for row in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert iterations == list(range(1, 9))  # each once: the stopped job's rows after its checkpoint redone
        assert json.loads((run_dir / "accounting.json").read_text())["balanced"]
        assert {"ray_rlds_samples", "ray_rlds_drops", "ray_rlds_learner_update_s"} <= seen, sorted(seen)
    finally:
        head.send_signal(signal.SIGTERM)  # a --block head stops all of its processes, and only those
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=30)
    deadline = time.monotonic() + 60
    while left := processes_of(temp_dir):
        assert time.monotonic() < deadline, f"{len(left)} of the head's processes outlived it"
        time.sleep(1)

