"""cluster/kuberay/: every document of raycluster.yaml and rayjob.yaml validates against KubeRay's
own schemas (tests/fixtures/kuberay/, copied from the CRDs) as kubectl's strict field validation
applies them, passes the checks KubeRay's controller adds, and says what matters: S3 credentials
from a Secret, a GPU and a CPU worker group that autoscale from zero, and entrypoints that name a
real job with flags its parser accepts."""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import re
import shlex
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "cluster" / "kuberay"
SCHEMAS = Path(__file__).resolve().parent / "fixtures" / "kuberay"
SECRET = "harmoclip-s3"
REQUIRED_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
OPTIONAL_KEYS = ("AWS_ENDPOINT_URL",)
# KubeRay's name limits (ray-operator utils: MaxRayClusterNameLength, MaxRayJobNameLength).
MAX_NAME = {"RayCluster": 53, "RayJob": 47}
DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def strict(schema: Any) -> Any:
    """KubeRay's schema as the API server applies it under kubectl's default `--validate=strict`: a
    field the schema does not name is an error (the API server would otherwise drop it silently,
    so a typo like `minReplica` would pass unnoticed). Every object schema that lists its
    properties and neither sets additionalProperties nor x-kubernetes-preserve-unknown-fields gets
    additionalProperties: false. `x-kubernetes-int-or-string` fields are already spelled out as
    anyOf integer / string, and the other x-kubernetes-* keys are extensions jsonschema ignores."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: (value if key == "enum" else strict(value)) for key, value in schema.items()}
    if ("properties" in schema and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


# OpenAPI v3.0 schema objects follow JSON Schema draft Wright-00: Draft 4 is the closest validator.
VALIDATORS = {kind: jsonschema.Draft4Validator(strict(json.loads((SCHEMAS / f"{kind.lower()}.v1.schema.json").read_text())))
              for kind in ("RayCluster", "RayJob")}


def documents(name: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((MANIFESTS / name).read_text()) if doc is not None]


def all_documents() -> list[dict]:
    return documents("raycluster.yaml") + documents("rayjob.yaml")


def schema_errors(doc: dict) -> list[str]:
    validator = VALIDATORS[doc["kind"]]
    return [f"{'.'.join(map(str, error.absolute_path))}: {error.message}" for error in validator.iter_errors(doc)]


def cluster_specs(doc: dict) -> Iterator[dict]:
    if doc["kind"] == "RayCluster":
        yield doc["spec"]
    elif "rayClusterSpec" in doc["spec"]:
        yield doc["spec"]["rayClusterSpec"]


def groups(spec: dict) -> list[dict]:
    return [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]


def ray_container(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]  # KubeRay's RayContainerIndex


def kuberay_errors(doc: dict) -> list[str]:
    """The checks KubeRay's controller makes beyond the schema (ray-operator utils/validation.go),
    for the fields these manifests use."""
    errors = []
    name, spec = doc["metadata"]["name"], doc["spec"]
    if len(name) > MAX_NAME[doc["kind"]] or not DNS1035_LABEL.match(name):
        errors.append(f"{name}: not a DNS-1035 label of at most {MAX_NAME[doc['kind']]} characters")
    for cluster in cluster_specs(doc):
        if not all(group["template"]["spec"].get("containers") for group in groups(cluster)):
            errors.append(f"{name}: a group without a container")
        if cluster.get("enableInTreeAutoscaling") and cluster.get("autoscalerOptions", {}).get("version") == "v2":
            if any(group["template"]["spec"].get("restartPolicy", "Never") != "Never" for group in groups(cluster)):
                errors.append(f"{name}: autoscaler v2 needs restartPolicy Never or unset")
    if doc["kind"] == "RayJob":
        if not spec.get("rayClusterSpec") and not spec.get("clusterSelector", {}).get("ray.io/cluster"):
            errors.append(f"{name}: neither rayClusterSpec nor clusterSelector ray.io/cluster")
        if spec.get("ttlSecondsAfterFinished", 0) > 0 and not spec.get("shutdownAfterJobFinishes"):
            errors.append(f"{name}: ttlSecondsAfterFinished without shutdownAfterJobFinishes")
        if spec.get("activeDeadlineSeconds", 1) <= 0:
            errors.append(f"{name}: activeDeadlineSeconds must be positive")
    return errors


@pytest.mark.parametrize("doc", all_documents(), ids=lambda doc: f"{doc['kind']}/{doc['metadata']['name']}")
def test_manifest_validates_against_kuberay_schema(doc):
    assert doc["apiVersion"] == "ray.io/v1"
    assert schema_errors(doc) == []
    assert kuberay_errors(doc) == []


def test_a_wrong_field_type_or_an_unknown_field_fails_validation():
    cluster = documents("raycluster.yaml")[0]
    wrong_type = copy.deepcopy(cluster)
    wrong_type["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "four"
    assert any("workerGroupSpecs.0.maxReplicas" in error and "'four' is not of type 'integer'" in error
               for error in schema_errors(wrong_type))
    typo = copy.deepcopy(cluster)
    typo["spec"]["workerGroupSpecs"][0]["minReplica"] = typo["spec"]["workerGroupSpecs"][0].pop("minReplicas")
    errors = schema_errors(typo)
    assert any("'minReplicas' is a required property" in error for error in errors)
    assert any("'minReplica' was unexpected" in error for error in errors)
    job = documents("rayjob.yaml")[0]
    bad_job = copy.deepcopy(job)
    bad_job["spec"]["shutdownAfterJobFinishes"] = "yes"
    assert any("shutdownAfterJobFinishes" in error for error in schema_errors(bad_job))
    bad_job = copy.deepcopy(job)
    bad_job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"][
        "cpu"] = "six cores"
    assert any("limits.cpu" in error for error in schema_errors(bad_job))


def test_s3_credentials_come_from_the_secret():
    for text in ((MANIFESTS / name).read_text() for name in ("raycluster.yaml", "rayjob.yaml")):
        assert "AKIA" not in text and "aws_secret_access_key" not in text
    (cluster,) = documents("raycluster.yaml")
    for group in groups(cluster["spec"]):
        env = {var["name"]: var for var in ray_container(group).get("env", [])}
        for key in REQUIRED_KEYS + OPTIONAL_KEYS:
            assert "value" not in env[key], key
            ref = env[key]["valueFrom"]["secretKeyRef"]
            assert (ref["name"], ref["key"]) == (SECRET, key)
            assert ref.get("optional", False) == (key in OPTIONAL_KEYS), key
    for doc in all_documents():  # no document spells a credential out, wherever it puts env
        for spec in cluster_specs(doc):
            for group in groups(spec):
                for var in ray_container(group).get("env", []):
                    assert not (var["name"].startswith("AWS_") and "value" in var), var


def test_cluster_has_a_gpu_and_a_cpu_group_autoscaling_from_zero():
    (cluster,) = documents("raycluster.yaml")
    spec = cluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["authOptions"]["mode"] == "token"  # as cluster.yaml's RAY_AUTH_MODE=token
    head = ray_container(spec["headGroupSpec"])
    assert "nvidia.com/gpu" not in head["resources"].get("limits", {})
    gpu = [g for g in spec["workerGroupSpecs"] if "nvidia.com/gpu" in ray_container(g)["resources"].get("limits", {})]
    cpu = [g for g in spec["workerGroupSpecs"] if g not in gpu]
    assert gpu and cpu
    for group in gpu:
        resources = ray_container(group)["resources"]
        assert resources["limits"]["nvidia.com/gpu"] == 1 and resources["requests"]["nvidia.com/gpu"] == 1
    for group in cpu:
        assert "nvidia.com/gpu" not in ray_container(group)["resources"].get("requests", {})
        assert ray_container(group)["resources"]["limits"]["cpu"]
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] == 0 and group["maxReplicas"] >= 1
        assert group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]


def test_every_pod_runs_the_project_image_at_the_installed_ray_version():
    images = set()
    for doc in all_documents():
        for spec in cluster_specs(doc):
            assert spec["rayVersion"] == ray.__version__
            images |= {container["image"] for group in groups(spec) for container in group["template"]["spec"]["containers"]}
    assert len(images) == 1
    dockerfile = (MANIFESTS / "Dockerfile").read_text()
    assert "bash scripts/setup.sh" in dockerfile  # installed exactly as the README does
    ignored = (MANIFESTS / "Dockerfile.dockerignore").read_text().split()
    assert {".venv", ".git", "outputs", "data"} <= set(ignored)


def commands(entrypoint: str) -> list[tuple[str, list[str]]]:
    """`(module, argv)` of each `python -m jobs.X ...` in an entrypoint (commands joined by &&)."""
    tokens, found = shlex.split(entrypoint), []
    while tokens:
        command = tokens[:tokens.index("&&")] if "&&" in tokens else tokens
        tokens = tokens[len(command) + 1:]
        assert command[:2] == ["python", "-m"] and command[2].startswith("jobs."), command
        found.append((command[2], command[3:]))
    return found


def check_arguments(module_name: str, argv: list[str]) -> argparse.Namespace:
    assert (ROOT / "jobs" / f"{module_name.split('.', 1)[1]}.py").is_file(), module_name
    parser = importlib.import_module(module_name).build_parser()
    try:
        return parser.parse_args(argv)
    except SystemExit as exit_:  # argparse's "unrecognized arguments" / "invalid choice" exit
        raise AssertionError(f"{module_name} refuses {argv}") from exit_


@pytest.mark.parametrize("job", documents("rayjob.yaml"), ids=lambda doc: doc["metadata"]["name"])
def test_rayjob_entrypoints_name_real_jobs_with_flags_they_accept(job):
    for module_name, argv in commands(job["spec"]["entrypoint"]):
        args = check_arguments(module_name, argv)
        if "clusterSelector" in job["spec"]:  # the standing cluster: several nodes, so S3
            assert args.out.startswith("s3://"), args.out


def test_demo_gets_a_cluster_of_its_own_and_jobs_reach_the_standing_cluster():
    (cluster,) = documents("raycluster.yaml")
    jobs = {doc["metadata"]["name"]: doc["spec"] for doc in documents("rayjob.yaml")}
    demo = jobs.pop("harmoclip-demo")
    assert [module for module, _ in commands(demo["entrypoint"])] == ["jobs.demo"]
    assert demo["shutdownAfterJobFinishes"] is True
    assert not demo["rayClusterSpec"].get("workerGroupSpecs")  # the demo's files live on one node
    assert any(module == "jobs.tune" for spec in jobs.values() for module, _ in commands(spec["entrypoint"]))
    for spec in jobs.values():
        assert spec["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    # docs/kubernetes.md applies one job of the file at a time: -l app.kubernetes.io/component=NAME
    components = [doc["metadata"]["labels"]["app.kubernetes.io/component"] for doc in documents("rayjob.yaml")]
    assert len(set(components)) == len(components)


def test_the_entrypoint_check_refuses_an_unknown_flag():
    with pytest.raises(AssertionError, match="refuses"):
        check_arguments("jobs.demo", ["--out", "/tmp/demo", "--no-such-flag"])
    with pytest.raises(AssertionError):
        commands("python -m harmoclip.model --out x")
