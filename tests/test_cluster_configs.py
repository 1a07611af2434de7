"""The cluster configs as Ray and the README read them: the launcher YAMLs through Ray's own schema
(load, fill defaults, validate, as Ray's tests do), the RayJob's entrypoint and environment against
what the README runs and requirements.txt pins, and the settings that keep a cluster closed."""
import copy
import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
LAUNCHER = ["cluster/aws.yaml", "cluster/gcp.yaml"]


def launcher(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_config_passes_rays_schema(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(launcher(name))  # Ray's defaults filled in, as `ray up` does
    validate_config(config)
    assert config["head_node_type"] in config["available_node_types"]
    broken = copy.deepcopy(config)
    broken["available_node_types"][config["head_node_type"]]["min_workers"] = "one"
    with pytest.raises(Exception, match="min_workers|one"):  # the check can fail
        validate_config(broken)


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_config_keeps_the_cluster_closed(name):
    config = launcher(name)
    head = " ".join(config["head_start_ray_commands"])
    workers = " ".join(config["worker_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head  # dashboard and job API: through the SSH tunnel only
    assert "RAY_AUTH_MODE=token ray start" in head and "RAY_AUTH_MODE=token ray start" in workers


def pins() -> dict[str, str]:
    lines = [ln.split("#")[0].strip() for ln in (ROOT / "requirements.txt").read_text().splitlines()]
    return dict(re.match(r"([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==(\S+)", ln).groups() for ln in lines if ln)


def rayjob() -> dict:
    docs = list(yaml.safe_load_all((ROOT / "cluster/kuberay/rayjob.yaml").read_text()))
    return next(d for d in docs if d and d.get("kind") == "RayJob")


def test_the_rayjob_runs_what_the_readme_runs_with_the_pinned_packages():
    from rlds.cli import resolve_config, split_overrides
    from rlds.configure import load_config

    job = rayjob()["spec"]
    words = shlex.split(job["entrypoint"])
    readme = (ROOT / "README.md").read_text()
    assert words[:4] == ["python", "-m", "rlds.cli", "train"] and "python -m rlds.cli train" in readme
    assert "--no-progress" in words
    name, overrides = split_overrides([w for w in words[4:] if not w.startswith("--")])
    config = load_config(resolve_config(name), tuple(overrides))  # the config and overrides are valid
    assert Path(config.run_dir).is_absolute()  # a job's working directory is a temporary copy
    env = yaml.safe_load(job["runtimeEnvYAML"])
    shipped = {p.split("==")[0]: p.split("==")[1] for p in env["pip"]["packages"]}
    expected = {k: v for k, v in pins().items() if k not in ("ray", "pytest", "pytest-timeout")}
    assert shipped == expected, "keep rayjob.yaml's pip list in step with requirements.txt"
    image = yaml.safe_dump(rayjob())
    assert f"rayproject/ray:{pins()['ray']}-" in image  # the image's Ray is the pinned one


@pytest.mark.parametrize("name", ["cluster/kuberay/raycluster.yaml", "cluster/kuberay/rayjob.yaml"])
def test_kuberay_manifests_keep_token_auth_and_no_open_service(name):
    text = (ROOT / name).read_text()
    docs = [d for d in yaml.safe_load_all(text) if d]
    cluster = next(d for d in docs if d.get("kind") in ("RayCluster", "RayJob"))
    spec = cluster["spec"]["rayClusterSpec"] if cluster["kind"] == "RayJob" else cluster["spec"]
    assert spec["authOptions"]["mode"] == "token"
    assert "LoadBalancer" not in text and "NodePort" not in text  # reached with kubectl port-forward


KUBERAY_CRDS = ROOT / "tests" / "data" / "kuberay-v1.5.1"  # cluster/README.md names KubeRay 1.5.1


def strict(schema):
    """Kubernetes prunes (and `kubectl apply --validate=strict` rejects) fields a structural schema
    does not name: close every object schema that lists its properties, as the API server would."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema \
                and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


@pytest.fixture(scope="module")
def crd_validators():
    import gzip

    import jsonschema

    validators = {}
    for path in KUBERAY_CRDS.glob("*.yaml.gz"):
        crd = yaml.safe_load(gzip.decompress(path.read_bytes()))
        (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        validators[crd["spec"]["names"]["kind"]] = jsonschema.Draft7Validator(strict(v1["schema"]["openAPIV3Schema"]))
    assert set(validators) == {"RayCluster", "RayJob"}
    return validators


@pytest.mark.parametrize("name", ["cluster/kuberay/raycluster.yaml", "cluster/kuberay/rayjob.yaml"])
def test_kuberay_manifests_match_the_pinned_crds(name, crd_validators):
    docs = [d for d in yaml.safe_load_all((ROOT / name).read_text()) if d and d.get("kind") in crd_validators]
    assert docs
    for doc in docs:
        validator = crd_validators[doc["kind"]]
        errors = [f"{'.'.join(map(str, e.path))}: {e.message[:200]}" for e in validator.iter_errors(doc)]
        assert not errors, errors
        typo = copy.deepcopy(doc)
        spec = typo["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else typo["spec"]
        spec["authOption"] = spec.pop("authOptions")
        assert list(validator.iter_errors(typo)), "a misspelt field must fail"
