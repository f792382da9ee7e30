"""Real Ray processes on loopback: a `ray start` head + `ray job submit`, a multi-node cluster, and
fault tolerance (an EnvRunner killed mid-training; the driver killed, then `--resume`)."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest
import ray
import torch
import yaml

from alignsam_ray.config import load_config
from alignsam_ray.env import iter_prompt_episodes
from alignsam_ray.train import Trainer, checkpoints

TINY = {"env": {"horizon": 3, "obs_res": 8}, "model": {"width": 16},
        "ppo": {"train_batch_size": 48, "minibatch_size": 24, "num_epochs": 2},
        "train": {"iterations": 1, "checkpoint_every": 1}}
BIN = os.path.dirname(sys.executable)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_yaml(tmp_path, store, **train) -> str:
    cfg = {"task": "synthetic_blur", "store": store, "run_dir": str(tmp_path / "run"), **TINY}
    cfg["train"] = {**cfg["train"], **train}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.fixture
def no_local_ray():
    ray.shutdown()
    yield
    ray.shutdown()


def test_job_submit_to_a_started_head_reaches_a_checkpoint(blur_store, tmp_path, no_local_ray):
    """`ray start --head` (its own token, temp dir and ports) + `ray job submit -- alignsam train`."""
    token = tmp_path / "token"
    token.write_text(secrets.token_hex(32))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
           "PATH": BIN + os.pathsep + os.environ["PATH"]}
    env.pop("RAY_ADDRESS", None)
    gcs, dash = _free_port(), _free_port()
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    log = open(tmp_path / "head.log", "w")
    head = subprocess.Popen([os.path.join(BIN, "ray"), "start", "--head", "--block", f"--port={gcs}",
                             f"--dashboard-port={dash}", "--num-cpus=2", "--include-dashboard=true",
                             f"--temp-dir={temp_dir}", "--disable-usage-stats"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        cmd = [os.path.join(BIN, "ray"), "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--",
               os.path.join(BIN, "alignsam"), "train", "--config", _run_yaml(tmp_path, blur_store), "--quiet"]
        deadline = time.time() + 600  # the dashboard's job agent takes seconds to come up (minutes on a loaded machine)
        while True:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
            if proc.returncode == 0 or "succeeded" in proc.stdout or "failed" in proc.stdout or time.time() > deadline:
                break
            time.sleep(3)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-2000:] + (tmp_path / "head.log").read_text()[-2000:]
        assert [os.path.basename(c) for c in checkpoints(str(tmp_path / "run"))] == ["iter_000001"]
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=120)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_killed_env_runner_is_replaced_and_training_finishes(blur_store, tmp_path, no_local_ray):
    cfg = load_config(_run_yaml(tmp_path, blur_store, iterations=3), ["resources.num_env_runners=2"])
    trainer = Trainer(cfg, progress=False)
    trainer.train_iteration()
    pids = trainer.algo.env_runner_group.foreach_env_runner(lambda r: os.getpid(), local_env_runner=False)
    os.kill(pids[0], signal.SIGKILL)  # an EnvRunner process dies mid-training
    result = trainer.run()  # iterations 2 and 3 go on with the healthy runner
    assert result["iteration"] == 3 and trainer.env_steps >= 3 * 48 - 48  # at most the in-flight samples lost
    # Ray restarts the actor (max_restarts, restart_failed_env_runners); RLlib probes it back into
    # service at the start of a training step and syncs the learner's weights to it
    group, deadline = trainer.algo.env_runner_group, time.time() + 180
    while group.num_healthy_remote_env_runners() < 2 and time.time() < deadline:
        trainer.algo.restore_env_runners(group)
        time.sleep(1)
    after = group.foreach_env_runner(lambda r: os.getpid(), local_env_runner=False)
    assert len(after) == 2 and pids[0] not in after  # a new process took the dead one's place
    trainer.train_iteration()  # and samples again
    weights = group.foreach_env_runner(lambda r: sum(float(p.sum()) for p in r.module.parameters()),
                                       local_env_runner=False)
    healthy = group.num_healthy_remote_env_runners()
    assert healthy == 2 and weights[0] == pytest.approx(weights[1])  # both carry the learner's weights
    # killed between iterations, a runner comes back with a random SRM: the algorithm's restore_env_runners
    # (no training step in between) gives it the run's SRM
    os.kill(group.foreach_env_runner(lambda r: os.getpid(), local_env_runner=False)[1], signal.SIGKILL)
    restored, deadline = [], time.time() + 180
    while len(restored) == 0 and time.time() < deadline:
        group.foreach_env_runner(lambda r: None, local_env_runner=False)  # a call finds the dead one: out of service
        time.sleep(1)
        restored = trainer.algo.restore_env_runners(group)  # back once Ray has restarted it
    srm = trainer.algo.srm.srm.state_dict()
    runner_srm = group.foreach_env_runner(
        lambda r: {k: v.clone() for k, v in iter_prompt_episodes(r.env)[0].srm.state_dict().items()},
        local_env_runner=False)
    trainer.stop()
    assert restored and len(runner_srm) == 2
    for state in runner_srm:
        assert all(torch.equal(state[k], srm[k]) for k in srm)  # the restarted runner labels with the run's SRM


def test_killed_driver_resumes_from_last_checkpoint(blur_store, tmp_path, no_local_ray):
    """`alignsam train` killed with SIGKILL after its first checkpoint; `--resume` finishes the run."""
    config = _run_yaml(tmp_path, blur_store, iterations=30)
    run = tmp_path / "run"
    proc = subprocess.Popen([os.path.join(BIN, "alignsam"), "train", "--config", config, "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not checkpoints(str(run)) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
    proc.wait()
    done = checkpoints(str(run))
    assert done, "no checkpoint before the kill"
    last = json.load(open(os.path.join(done[-1], "state.json")))["iteration"]
    assert last < 30
    time.sleep(2)
    out = subprocess.run([os.path.join(BIN, "alignsam"), "train", "--config", config, "--resume", "--quiet",
                          f"train.iterations={last + 2}"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    state = json.load(open(os.path.join(checkpoints(str(run))[-1], "state.json")))
    assert state["iteration"] == last + 2


def test_unreachable_cluster_address_fails_fast_with_a_clear_error(monkeypatch, tmp_path, no_local_ray):
    """A dead address (RAY_ADDRESS, or one left by a crashed `ray start`) fails in seconds, not the
    many minutes Ray itself retries, and the message names the address and the way out."""
    from alignsam_ray.ray_session import init_ray

    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{_free_port()}")
    t0 = time.time()
    with pytest.raises(ConnectionError, match=r"no Ray cluster answers at RAY_ADDRESS=127.0.0.1:\d+.*ray stop.*RAY_ADDRESS=local"):
        init_ray()
    assert time.time() - t0 < 60 and not ray.is_initialized()

    (tmp_path / "ray").mkdir()  # a stale address file, as a killed `ray start --head` leaves it
    (tmp_path / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{_free_port()}")
    monkeypatch.delenv("RAY_ADDRESS")
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    with pytest.raises(ConnectionError, match=r"recorded by `ray start`"):
        init_ray()


@pytest.fixture(scope="module")
def three_nodes():
    """A three-node cluster on loopback (ray.cluster_utils.Cluster), one CPU per node, shared by the two tests
    at the end of this file (one start instead of two) -> its address."""
    from ray.cluster_utils import Cluster

    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)
        cluster.add_node(num_cpus=1)
        yield cluster.address
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_env_runners_spread_over_nodes(three_nodes, blur_store, tmp_path, no_local_ray):
    """One CPU per node: the two EnvRunners (1 CPU each) land on different nodes and training still works."""
    ray.init(address=three_nodes)
    try:
        cfg = load_config(_run_yaml(tmp_path, blur_store), ["resources.num_env_runners=2",
                                                            "resources.num_cpus_per_env_runner=1"])
        trainer = Trainer(cfg, progress=False)
        nodes = trainer.algo.env_runner_group.foreach_env_runner(
            lambda r: __import__("ray").get_runtime_context().get_node_id(), local_env_runner=False)
        assert len(nodes) == 2 and len(set(nodes)) == 2
        result = trainer.run()
        trainer.stop()
        assert result["iteration"] == 1 and result["checkpoint"]
    finally:
        ray.shutdown()


def test_segment_collection_on_a_multi_node_cluster(bundle, three_nodes, blur_store, tmp_path, no_local_ray):
    """`alignsam segment --ray` on the three-node cluster: the encoder actor and
    two prompting actors (1 CPU each) cannot all fit on one node; the masks equal the Ray-free ones."""
    import glob

    import numpy as np
    from PIL import Image

    from alignsam_ray.batch_segment import segment_collection
    from alignsam_ray.predictor import AlignSAMPredictor

    src = tmp_path / "in"
    src.mkdir()
    images = sorted(glob.glob(os.path.join(os.path.dirname(blur_store), "data", "test", "images", "*")))
    for path in images:
        shutil.copy(path, src)
    ray.init(address=three_nodes)
    try:
        stats = segment_collection(str(src), bundle, str(tmp_path / "out"), encoders=1, prompters=2, batch=2,
                                   progress=False)
    finally:
        ray.shutdown()
    assert stats["done"] == len(images) and stats["errors"] == 0
    predictor = AlignSAMPredictor(bundle)
    for path in images:
        stem = os.path.splitext(os.path.basename(path))[0]
        expected = predictor.predict(np.asarray(Image.open(path).convert("RGB"))).mask
        assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "masks" / f"{stem}_mask.png")) > 0, expected)
