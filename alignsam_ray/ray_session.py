"""Starting or joining Ray: one place, a fast, clear error for a cluster address nobody answers, and
Ray's own messages kept off the terminal (``route_ray_logs``)."""
from __future__ import annotations

import contextlib
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


def route_ray_logs(path: str, modules: tuple[str, ...] = ()) -> str:
    """Send Ray's, RLlib's and Tune's log records and Python warnings (the new-API-stack notice,
    deprecation warnings, gputil notices) to ``path`` (appended) instead of the terminal; records of
    level ERROR and above still reach stderr. ``modules`` (e.g. "ray.rllib") are imported first: they
    install their own terminal handlers on import, which are taken off here (and again after every
    ``native_to_log`` block: Ray Data re-installs its own when a dataset runs). Ray's native lines
    (the token-authentication notice, core-worker notices) go to the file inside ``native_to_log``;
    workers' output (actor restarts and the like) stays in Ray's session logs. Returns ``path``."""
    import importlib

    for module in modules:
        importlib.import_module(module)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    to_file = logging.FileHandler(path)
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    errors = logging.StreamHandler(_Stderr())
    errors.setLevel(logging.ERROR)
    logging.captureWarnings(True)
    for h in _QUIET.get("handlers", ()):  # an earlier call's (tests route more than once per process)
        h.close()
    _QUIET.update(on=True, path=path, handlers=(to_file, errors))
    _apply_routes()
    return path


def _apply_routes() -> None:
    """(Re)attach route_ray_logs' handlers to "ray" and "py.warnings" and take every other terminal
    handler off the ray.* loggers, so their records reach the file through "ray". Idempotent."""
    ours = _QUIET["handlers"]
    for name in ("ray", "py.warnings"):
        logger = logging.getLogger(name)
        for h in list(logger.handlers):
            if h not in ours:
                logger.removeHandler(h)
        for h in ours:
            if h not in logger.handlers:
                logger.addHandler(h)
        logger.propagate = False
    for name, logger in list(logging.root.manager.loggerDict.items()):  # ray.rllib, ray.data, ...: via "ray"
        if name.startswith("ray.") and isinstance(logger, logging.Logger):
            for h in list(logger.handlers):
                if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                    logger.removeHandler(h)
            logger.propagate = True


class _Routed(logging.Handler):
    """Hands a record to route_ray_logs' handlers (the file; stderr for errors). Stands in for
    ``logging.lastResort`` inside ``native_to_log``: ray.init() strips the "ray" logger's handlers
    before it logs its token-authentication notice, which would otherwise reach the terminal."""

    def emit(self, record: logging.LogRecord) -> None:
        for h in _QUIET["handlers"]:
            if record.levelno >= h.level:
                h.handle(record)


class _Stderr:
    """Whatever ``sys.stderr`` is at the time of writing (``native_to_log`` swaps it)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


@contextlib.contextmanager
def native_to_log():
    """Ray's C++ parts print to file descriptor 2 directly (the token-authentication notice, core-worker
    notices as actors start): after ``route_ray_logs``, fd 2 points at the log file for the duration,
    while Python's own writes to ``sys.stderr`` (progress bars, error records, tracebacks) still reach
    the terminal. Does nothing when the routing is off (--verbose)."""
    if not _QUIET.get("on"):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    python_stderr = sys.stderr
    try:
        ours = python_stderr.fileno() == 2  # else a stream of its own (a test's capture): left alone
    except (AttributeError, OSError, ValueError):
        ours = False
    if ours:
        sys.stderr = os.fdopen(os.dup(saved), "w", buffering=1)
    last_resort, logging.lastResort = logging.lastResort, _Routed(logging.WARNING)
    try:
        with open(_QUIET["path"], "a") as log:
            os.dup2(log.fileno(), 2)
        yield
    finally:
        logging.lastResort = last_resort
        _apply_routes()  # handlers installed meanwhile (Ray Data's) would write to the stream closed below
        sys.stderr.flush()
        if ours:
            sys.stderr.close()
        sys.stderr = python_stderr
        os.dup2(saved, 2)
        os.close(saved)


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
        with native_to_log():
            ray.init(address=address, **kwargs)
    except ConnectionError as e:
        raise ConnectionError(f"could not join the Ray cluster at {where} ({e}). {advice}") from e
