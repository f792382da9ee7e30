"""Issue 36: one writer per output folder. A second `train` / `embed` / `evaluate` / `reproduce` /
`segment --ray` / `tune` into a folder another process writes stops at once, names the holder and
touches nothing; a lock left by a killed process is taken over; one left by another host is refused
with how to clear it.

The first writer is always another process, started before the second and polled until its holder
record exists, so the second meets a held lock every time (no race, no timing)."""
from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import yaml
from conftest import folder_dataset

from alignsam_ray.cli import main
from alignsam_ray.folder_lock import HOLDER_NAME, LOCK_NAME, FolderInUseError, folder_lock, read_holder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
HOLD = ("import sys, time\nfrom alignsam_ray.folder_lock import folder_lock\n"
        "with folder_lock(sys.argv[1], 'train'):\n    time.sleep(600)\n")


def _wait_for_holder(folder, proc, seconds=300.0) -> dict:
    """Poll until ``proc`` has recorded itself as FOLDER's holder."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        holder = read_holder(str(folder))
        if holder and holder["pid"] == proc.pid:
            return holder
        if proc.poll() is not None:
            pytest.fail(f"the first writer exited ({proc.returncode}) before taking the lock: {proc.stderr.read()}")
        time.sleep(0.05)
    pytest.fail(f"no holder record in {folder} after {seconds:.0f}s")


@pytest.fixture
def holder(tmp_path):
    """Another process holding tmp_path/held (killed at teardown)."""
    folder = tmp_path / "held"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], env=ENV, stderr=subprocess.PIPE, text=True)
    _wait_for_holder(folder, proc, seconds=60)
    yield folder, proc
    proc.kill()
    proc.wait()


def _refused(capsys, folder, pid) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    for needle in (str(folder), f"pid {pid} on {socket.gethostname()}", "wait", "another folder"):
        assert needle in err, err
    return err


# ------------------------------------------------------------------------------------------ the lock
def test_the_holder_is_recorded_and_the_folder_cleaned(tmp_path):
    folder = tmp_path / "out"
    with folder_lock(str(folder), "evaluate"):
        h = read_holder(str(folder))
        assert h["pid"] == os.getpid() and h["host"] == socket.gethostname() and h["writer"] == "evaluate"
        assert h["command"] and h["started"].endswith("Z")
        with folder_lock(str(folder), "evaluate"):  # the same process again: entered, not blocked
            pass
        assert read_holder(str(folder))  # still held by the outer block
    assert not folder.exists()  # created here and nothing written: no trace
    folder.mkdir()
    (folder / "metrics.json").write_text("{}")
    with folder_lock(str(folder), "evaluate"):
        pass
    assert sorted(os.listdir(folder)) == [LOCK_NAME, "metrics.json"]  # the record goes, the work stays


def test_a_second_process_is_refused_and_nothing_is_touched(holder, tmp_path):
    folder, proc = holder
    before = {n: (folder / n).read_bytes() for n in os.listdir(folder)}
    with pytest.raises(FolderInUseError) as exc:
        with folder_lock(str(folder), "evaluate"):
            pytest.fail("entered a folder another process holds")
    msg = str(exc.value)
    assert str(folder) in msg and f"pid {proc.pid}" in msg and "another folder" in msg
    assert {n: (folder / n).read_bytes() for n in os.listdir(folder)} == before
    with folder_lock(str(folder / "runs" / "x"), "train"):  # only the exact folder is locked, not what is under it
        pass


@pytest.mark.parametrize("command", [
    ["train", "--config", "{tmp}/run.yaml"],
    ["embed", "--data", "{tmp}/ds", "--out", "{held}", "--n-train", "-1"],
    ["tune", "--config", "{tmp}/sweep.yaml", "storage={tmp}", "name=held"],
    ["reproduce", "--data", "{tmp}", "--out", "{held}", "--sam", "micro"],
    ["segment", "--ray", "{tmp}/ds/images", "--bundle", "{tmp}/no_bundle", "--out", "{held}"],
])
def test_cli_commands_are_refused_before_any_work(holder, tmp_path, capsys, command):
    """Each writing command meets the held folder first: exit 1, the holder named, no traceback, and
    nothing started (the store, sweep and bundle named here need not even exist)."""
    folder, proc = holder
    folder_dataset(tmp_path / "ds", n=3)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({"task": "synthetic_blur", "store": str(tmp_path / "none"),
                                                        "run_dir": str(folder)}))
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({"tasks": [str(tmp_path / "run.yaml")]}))
    before = sorted(os.listdir(folder))
    assert main([a.format(tmp=tmp_path, held=folder) for a in command]) == 1
    _refused(capsys, folder, proc.pid)
    assert sorted(os.listdir(folder)) == before


def test_a_lock_of_a_killed_process_is_taken_over(tmp_path, capsys):
    folder = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], env=ENV, stderr=subprocess.PIPE, text=True)
    _wait_for_holder(folder, proc, seconds=60)
    os.kill(proc.pid, signal.SIGKILL)  # no cleanup runs: its holder record stays
    proc.wait()
    assert read_holder(str(folder))["pid"] == proc.pid
    with folder_lock(str(folder), "train"):
        assert read_holder(str(folder))["pid"] == os.getpid()
    err = capsys.readouterr().err
    assert f"taking over the lock of pid {proc.pid}" in err and "no longer running" in err
    assert len(err.strip().splitlines()) == 1


def test_a_lock_left_by_another_host_is_refused_with_how_to_clear_it(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    record = {"host": "lost-node-7", "pid": 4242, "command": "alignsam train --config run.yaml",
              "writer": "train", "started": "2026-01-01T00:00:00Z"}
    (folder / HOLDER_NAME).write_text(json.dumps(record))
    with pytest.raises(FolderInUseError) as exc:
        with folder_lock(str(folder), "train"):
            pytest.fail("took over a lock this host cannot prove stale")
    msg = str(exc.value)
    assert "lost-node-7" in msg and "pid 4242" in msg and f"remove {folder / HOLDER_NAME}" in msg
    assert json.loads((folder / HOLDER_NAME).read_text()) == record  # left for the user to judge
    (folder / HOLDER_NAME).unlink()  # what the message says to do
    with folder_lock(str(folder), "train"):
        pass


# -------------------------------------------------------------------------- two real writers at once
@pytest.mark.slow  # a real training in a second process: over a minute on 2 busy cores
def test_two_trainings_into_one_run_folder(blur_store, tmp_path, capsys):
    """`alignsam train` twice on one run_dir: the first trains, the second stops at once with the
    message and exit 1; the first's checkpoint and progress.csv are whole and its own."""
    run = tmp_path / "run"
    cfg = tmp_path / "run.yaml"
    tiny = {"env": {"grid": [4, 4], "horizon": 3, "obs_res": 8}, "model": {"width": 16},
            "ppo": {"train_batch_size": 48, "minibatch_size": 24, "num_epochs": 2},
            "train": {"iterations": 1, "checkpoint_every": 1}, "resources": {"sample_timeout_s": 300}}
    cfg.write_text(yaml.safe_dump({"task": "synthetic_blur", "store": blur_store, "run_dir": str(run), **tiny}))
    first = subprocess.Popen([sys.executable, "-m", "alignsam_ray.cli", "train", "--config", str(cfg), "--quiet"],
                             env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_holder(run, first)
        assert main(["train", "--config", str(cfg), "--quiet"]) == 1
        _refused(capsys, run, first.pid)
        out, err = first.communicate(timeout=600)
    finally:
        first.kill()
    assert first.returncode == 0, err
    rows = list(csv.DictReader(open(run / "progress.csv")))
    assert [r["iteration"] for r in rows] == ["1"]  # one header, one row: nobody else's
    ckpt = run / "checkpoints" / "iter_000001"
    assert json.loads((ckpt / "state.json").read_text())["iteration"] == 1
    assert all((ckpt / p).exists() for p in ("algo", "srm.pt", "config.yaml"))
    assert sorted(os.listdir(run / "checkpoints")) == ["iter_000001"] and not (run / HOLDER_NAME).exists()


@pytest.mark.slow  # a real embed (Ray Data) in a second process
@pytest.mark.integration
def test_two_embeds_into_one_store(tmp_path, capsys):
    """`alignsam embed` twice into one store: one embeds, the other stops at once; the store is whole."""
    from alignsam_ray.store import EmbeddingStore

    ds, store = folder_dataset(tmp_path / "ds", n=3), tmp_path / "store"
    args = ["embed", "--data", str(ds), "--out", str(store), "--n-train", "-1", "--shard-size", "2"]
    first = subprocess.Popen([sys.executable, "-m", "alignsam_ray.cli", *args], env=ENV, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_holder(store, first)
        assert main(args) == 1
        _refused(capsys, store, first.pid)
        out, err = first.communicate(timeout=600)
    finally:
        first.kill()
    assert first.returncode == 0, err
    st = EmbeddingStore(str(store))  # verifies every shard's sha256
    assert st.manifest["complete"] and st.manifest["n_images"] == 3
    assert len(st.arrays("train")["ids"]) == 3 and not (store / HOLDER_NAME).exists()
