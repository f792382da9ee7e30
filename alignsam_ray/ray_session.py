"""Starting or joining Ray: one place, a fast, clear error for a cluster address nobody answers, and
Ray's own messages kept off the terminal (``route_ray_logs``)."""
from __future__ import annotations

import logging
import os
import socket
import sys

import ray

CONNECT_TIMEOUT_S = 5.0
_QUIET = {"on": False}  # set by route_ray_logs: workers' output is not forwarded to the terminal either


def default_log_path(command: str) -> str:
    """Where `alignsam COMMAND` writes Ray's messages: $ALIGNSAM_LOG_DIR or ~/.cache/alignsam/logs."""
    root = os.environ.get("ALIGNSAM_LOG_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "alignsam", "logs")
    return os.path.join(root, f"{command}.log")


def route_ray_logs(path: str) -> str:
    """Send Ray's, RLlib's and Tune's log records and Python warnings (the new-API-stack notice,
    deprecation warnings, token-authentication and gputil notices) to ``path`` (appended) instead of the
    terminal; records of level ERROR and above still reach stderr. Workers' output (actor restarts and
    the like) stays in Ray's session logs. Returns ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    to_file = logging.FileHandler(path)
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    errors = logging.StreamHandler(sys.stderr)
    errors.setLevel(logging.ERROR)
    logging.captureWarnings(True)
    for name in ("ray", "py.warnings"):
        logger = logging.getLogger(name)
        for h in list(logger.handlers):
            logger.removeHandler(h)
        logger.addHandler(to_file)
        logger.addHandler(errors)
        logger.propagate = False
    _QUIET["on"] = True
    return path


def recorded_address() -> str | None:
    """The address a `ray start --head` on this machine left for ray.init() to join, if any."""
    system_tmp = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"  # as Ray resolves it on Linux
    path = os.path.join(system_tmp, "ray", "ray_current_cluster")
    try:
        with open(path) as f:
            return f.read().strip() or None
    except OSError:
        return None


def _unreachable(address: str) -> bool:
    """True if nothing accepts a TCP connection at host:port (ray:// and named modes are not checked)."""
    if address in ("local", "auto") or "://" in address or ":" not in address:
        return False
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S):
            return False
    except (OSError, ValueError):
        return True


def init_ray(**kwargs) -> None:
    """Join the cluster in RAY_ADDRESS (set by `ray job submit`, or by you), else the cluster a
    `ray start` on this machine recorded, else start a local Ray. Does nothing if Ray is up.

    Ray itself retries a dead address for many minutes before its bare ConnectionError (13.7 min
    measured for RAY_ADDRESS=127.0.0.1:1); this checks the port first and says how to go on."""
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or None
    target = address or recorded_address()
    where = f"RAY_ADDRESS={address}" if address else f"{target} (recorded by `ray start` in /tmp/ray/ray_current_cluster)"
    advice = ("If that cluster is gone, run `ray stop` (clears the recorded address) or set RAY_ADDRESS=local "
              "to start a fresh local Ray; otherwise check the head node is up and its GCS port reachable.")
    if target and _unreachable(target):
        raise ConnectionError(f"no Ray cluster answers at {where}. {advice}")
    kwargs.setdefault("include_dashboard", False)
    if _QUIET["on"]:  # keep the handlers route_ray_logs set; workers' lines stay in Ray's session logs
        kwargs.setdefault("configure_logging", False)
        kwargs.setdefault("log_to_driver", False)
    try:
        ray.init(address=address, **kwargs)
    except ConnectionError as e:
        raise ConnectionError(f"could not join the Ray cluster at {where} ({e}). {advice}") from e
