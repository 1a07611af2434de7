#!/usr/bin/env bash
# Submit an rlds training run to a running Ray cluster as a Ray job.
# This script only talks to the cluster's job server: it never starts or stops Ray.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: cluster/submit.sh [options] [--] CONFIG [key=value ...]

Runs `python -m rlds.cli train CONFIG [key=value ...]` (the same as `rlds train`) on a Ray
cluster as a Ray job. This checkout (less what .gitignore excludes) is the job's working_dir,
so the code and configs you have here are what runs, wherever the cluster is.

  CONFIG       a YAML file inside this repository, or the name of a shipped config (tiny)
  key=value    config overrides, e.g. iterations=200 sampler.num_gpus=1 learner.num_gpus=1
               run_dir=/home/ray/runs/my-run (an absolute run_dir keeps the run folder out
               of the job's temporary working_dir copy on the head node)

Options:
  --address URL        the cluster's dashboard / job server. Default: $RAY_API_SERVER_ADDRESS,
                       else $RAY_ADDRESS if it is an http(s) URL, else http://127.0.0.1:8265
  --pip                also install requirements.txt's exact pins (less ray) through the job's
                       runtime_env, for clusters whose image lacks them (stock KubeRay image)
  --submission-id ID   the job's id (default: rlds-<config>-<date>-<time>)
  --follow             stream the job's logs after submitting (Ctrl-C stops following only)
  --dry-run            print the ray command instead of running it
  -h, --help           show this text

Token authentication (Ray 2.60): this script exports RAY_AUTH_MODE=token for the ray CLI
(unless RAY_AUTH_MODE is already set). The token comes from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH
or ~/.ray/auth_token; on the head node `ray get-auth-token` prints the cluster's token.

Examples:
  cluster/submit.sh tiny iterations=5
  cluster/submit.sh --address http://127.0.0.1:8265 configs/tiny.yaml run_dir=$HOME/runs/tiny
  cluster/submit.sh --pip --follow configs/tiny.yaml sampler.num_gpus=1 learner.num_gpus=1
EOF
}

die() { echo "submit.sh: $*" >&2; exit 2; }

address="${RAY_API_SERVER_ADDRESS:-}"
if [[ -z $address && ${RAY_ADDRESS:-} == http* ]]; then address=$RAY_ADDRESS; fi
address=${address:-http://127.0.0.1:8265}
use_pip=0 follow=0 dry_run=0 submission_id=""

while (($#)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --address) (($# >= 2)) || die "--address needs a URL"; address=$2; shift 2 ;;
    --address=*) address=${1#*=}; shift ;;
    --pip) use_pip=1; shift ;;
    --submission-id) (($# >= 2)) || die "--submission-id needs a value"; submission_id=$2; shift 2 ;;
    --submission-id=*) submission_id=${1#*=}; shift ;;
    --follow) follow=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; break ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) break ;;
  esac
done
(($#)) || { usage >&2; exit 2; }
config=$1
shift
for override in "$@"; do
  [[ $override == *=* ]] || die "after CONFIG only key=value overrides may follow, got '$override'"
done

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# The job runs in its copy of the repository root, so a config file is named relative to it.
if [[ -f $config ]]; then
  abs="$(cd "$(dirname "$config")" && pwd)/$(basename "$config")"
  [[ $abs == "$root"/* ]] || die "$config is outside $root: only files in the repository travel with the job"
  config_arg=${abs#"$root"/}
  config_file=$abs
elif [[ -f $root/configs/$config.yaml || -f $root/configs/$config ]]; then
  config_arg=$config  # a shipped config name; rlds resolves it in configs/
  config_file=$root/configs/$config
  [[ -f $config_file ]] || config_file=$config_file.yaml
else
  die "config not found: $config"
fi

[[ $address == *://* ]] || address="http://$address"
address=${address%/}
case $address in
  *:6379 | *:10001) echo "submit.sh: warning: $address looks like a GCS/client port; the job server is the dashboard (default port 8265)" >&2 ;;
esac

# Ray 2.60: the job server, the dashboard and the GCS all require the cluster's token.
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
if [[ $RAY_AUTH_MODE == token ]]; then
  if [[ -z ${RAY_AUTH_TOKEN:-} && -z ${RAY_AUTH_TOKEN_PATH:-} && ! -s $HOME/.ray/auth_token ]]; then
    die "no Ray auth token: set RAY_AUTH_TOKEN (the head's \`ray get-auth-token\`) or copy the head's ~/.ray/auth_token here"
  fi
else
  echo "submit.sh: warning: RAY_AUTH_MODE=$RAY_AUTH_MODE; clusters started with token auth will refuse this client" >&2
fi

ray_bin=${RAY:-ray}
python_bin=${PYTHON:-python3}
if ((dry_run == 0)); then
  command -v "$ray_bin" >/dev/null || die "'$ray_bin' not found: pip install -r requirements.txt (ray[default]==2.60.0)"
fi
command -v "$python_bin" >/dev/null || python_bin=python

# .gitignore is honoured by Ray too; the excludes repeat the big ones in case it is missing.
runtime_env=$("$python_bin" - "$root" "$use_pip" <<'PY'
import json, re, sys

root, use_pip = sys.argv[1], sys.argv[2] == "1"
env = {
    "excludes": [".git", ".venv", "runs", "**/__pycache__", "*.egg-info", ".pytest_cache"],
    "env_vars": {"PYTHONUNBUFFERED": "1"},  # driver prints reach `ray job logs` as they happen
}
if use_pip:
    pins = []
    with open(f"{root}/requirements.txt") as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if not line or line.startswith("-"):
                continue
            name = re.split(r"[\s\[=<>!~;@]", line, maxsplit=1)[0].lower()
            # The cluster's own Ray must stay; tests do not run on the cluster.
            if name == "ray" or name.startswith("pytest"):
                continue
            pins.append(line)
    env["pip"] = {"packages": pins, "pip_check": False}
print(json.dumps(env))
PY
)

if [[ -z $submission_id ]]; then
  stem=$(basename "$config_arg" .yaml)
  submission_id="rlds-${stem//[^A-Za-z0-9_-]/-}-$(date +%Y%m%d-%H%M%S)"
fi

run_dir_given=0
for override in "$@"; do [[ $override == run_dir=* ]] && run_dir_given=1; done
if ((run_dir_given == 0)) && ! grep -qs '^run_dir: *[^ #]' "$config_file"; then
  echo "submit.sh: note: no run_dir; the run folder goes to runs/ inside the job's temporary working_dir" \
    "copy on the head node. Pass run_dir=/absolute/path to keep it." >&2
fi

cmd=("$ray_bin" job submit --address "$address" --submission-id "$submission_id" --no-wait
  --working-dir "$root" --runtime-env-json "$runtime_env"
  -- python -m rlds.cli train --no-progress "$config_arg" "$@")

if ((dry_run)); then
  printf 'RAY_AUTH_MODE=%q' "$RAY_AUTH_MODE"
  printf ' %q' "${cmd[@]}"
  printf '\n'
else
  "${cmd[@]}"
fi

cat <<EOF

Job $submission_id -> $address
  follow its log:  RAY_AUTH_MODE=token ray job logs --address $address --follow $submission_id
  status / stop:   ray job status --address $address $submission_id   |   ray job stop ...
  dashboard:       $address  (Jobs, Actors, Cluster; the browser asks for the token: \`ray get-auth-token\` on the head)
                   Metrics tab and rlds_* metrics need Prometheus + Grafana: see cluster/README.md
EOF

if ((follow && !dry_run)); then
  exec "$ray_bin" job logs --address "$address" --follow "$submission_id"
fi
