"""cluster.yaml validates against the schema shipped in the Ray wheel, and is safe to share; what
`ray job submit --working-dir .` uploads is the source alone."""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray._private.runtime_env.packaging import create_package

ROOT = Path(__file__).resolve().parent.parent


def load() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_validates_against_rays_schema():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(load(), schema)


def test_cluster_yaml_has_gpu_workers_spot_and_no_open_ports():
    config = load()
    nodes = config["available_node_types"]
    assert "GPU" not in nodes[config["head_node_type"]]["resources"]
    gpu = [n for n in nodes.values() if n["resources"].get("GPU")]
    assert gpu and all(n["max_workers"] >= 1 and n["min_workers"] == 0 for n in gpu)
    assert any(n["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot" for n in gpu)
    for rule in config["provider"]["security_group"]["IpPermissions"]:
        assert all(r["CidrIp"] != "0.0.0.0/0" for r in rule["IpRanges"])
    assert all("IamInstanceProfile" in n["node_config"] for n in nodes.values())


def test_cluster_yaml_has_a_cpu_worker_type_for_preparation():
    """A worker type with CPUs and no GPU, scaling from 0, for jobs.prepare's CPU stages; room for
    it beside every GPU worker under the cluster-wide max_workers."""
    config = load()
    nodes = config["available_node_types"]
    workers = {name: n for name, n in nodes.items() if name != config["head_node_type"]}
    cpu = [n for n in workers.values() if not n["resources"].get("GPU")]
    assert cpu and all(n["resources"].get("CPU", 0) >= 1 and n["min_workers"] == 0 and n["max_workers"] >= 1
                       for n in cpu)
    assert not [n for n in cpu if n["node_config"]["InstanceType"].startswith(("g", "p"))]  # AWS GPU families
    assert config["max_workers"] >= sum(n["max_workers"] for n in workers.values())


def test_cluster_yaml_holds_no_credentials_and_uses_token_auth():
    text = (ROOT / "cluster.yaml").read_text()
    assert "aws_access_key_id" not in text.lower() and "AKIA" not in text and "aws_secret" not in text.lower()
    config = load()
    for command in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        if "ray start" in command:
            assert "RAY_AUTH_MODE=token" in command
    assert "scripts/setup.sh" in " ".join(config["setup_commands"])  # installed exactly as the README does


@pytest.mark.parametrize("include_gitignore", [True, False], ids=["gitignore", "RAY_RUNTIME_ENV_IGNORE_GITIGNORE"])
def test_working_dir_package_holds_only_the_source(tmp_path, include_gitignore):
    """The package `ray job submit --working-dir .` builds from a checkout with a virtualenv, demo
    outputs and git history stays small (Ray refuses one above about 100 MB)."""
    checkout = tmp_path / "checkout"
    shutil.copytree(ROOT, checkout, ignore=shutil.ignore_patterns(".venv", "outputs", "__pycache__"))
    for heavy in (".venv/lib/python3.11/site-packages/torch/lib/libtorch.so", "outputs/demo/base/checkpoint.pt",
                  ".git/objects/pack/pack-history.pack", "mlflow.db"):
        (checkout / heavy).parent.mkdir(parents=True, exist_ok=True)
        (checkout / heavy).write_bytes(os.urandom(20 * 2**20))  # incompressible, as weights are
    package = tmp_path / "package.zip"
    create_package(str(checkout), package, include_gitignore=include_gitignore)

    names = zipfile.ZipFile(package).namelist()
    assert package.stat().st_size < 5 * 2**20, sorted(names)[:50]
    assert {"jobs/train.py", "harmoclip/model.py", "pipeline/prepare.py", "pyproject.toml"} <= set(names)
    assert not [n for n in names if n.split("/")[0] in (".git", ".venv", "outputs", "mlflow.db")]
