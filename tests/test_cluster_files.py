"""cluster/: the launcher YAML passes Ray's own schema; the RayJob's command is one our CLI accepts."""
from __future__ import annotations

import os
import re
import shlex

import ray
import yaml

from alignsam_ray.tune import load_sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _yaml(name: str) -> dict:
    with open(os.path.join(ROOT, "cluster", name)) as f:
        return yaml.safe_load(f)


def test_launcher_config_passes_rays_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = _yaml("aws.yaml")
    config = prepare_config(raw)  # what `ray up` does before it validates
    validate_config(config)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]["node_config"]["InstanceType"]
    assert head.startswith(("g", "p"))  # the learner's GPU
    cpu = types["cpu_worker"]
    assert cpu["min_workers"] == 0 < cpu["max_workers"]  # autoscaling EnvRunner nodes
    assert any("pip install -e /home/ubuntu/alignsam_ray" in c for c in config["setup_commands"])


def test_rayjob_runs_a_command_our_cli_accepts():
    job = _yaml("rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["rayClusterSpec"]["rayVersion"].rsplit(".", 1)[0] == ray.__version__.rsplit(".", 1)[0]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["alignsam", "tune", "--config"]
    sweep = load_sweep(os.path.join(ROOT, argv[3]), argv[4:])
    assert sweep["storage"].startswith("/mnt/shared/")
    assert all(c.store.startswith("/mnt/shared/stores/") for c in sweep["task_configs"].values())
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["resources"]["limits"]["nvidia.com/gpu"] == "1"
    for group in spec["rayClusterSpec"]["workerGroupSpecs"]:
        assert group["minReplicas"] == 0 < group["maxReplicas"]
        mounts = {m["mountPath"] for m in group["template"]["spec"]["containers"][0]["volumeMounts"]}
        assert "/mnt/shared" in mounts


def test_docker_image_pins_the_installed_ray():
    with open(os.path.join(ROOT, "cluster", "Dockerfile")) as f:
        version = re.search(r"ARG RAY_VERSION=(\S+)", f.read()).group(1)
    assert version.rsplit(".", 1)[0] == ray.__version__.rsplit(".", 1)[0]


def test_docker_image_installs_the_package_not_a_link_and_ignores_local_state():
    with open(os.path.join(ROOT, "cluster", "Dockerfile")) as f:
        docker = f.read()
    assert "pip install --no-cache-dir /tmp/alignsam_ray_src" in docker and " -e " not in docker
    with open(os.path.join(ROOT, ".dockerignore")) as f:
        ignored = f.read().split()
    assert {".venv/", "demo_out/", "runs/"} <= set(ignored)
