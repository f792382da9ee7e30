"""One writer per output folder: the exclusive lock every writing command holds on its folder.

    with folder_lock(run_dir, "train"):
        ...  # the only process writing run_dir

FOLDER/.alignsam.lock is the lock itself (``filelock.FileLock``: ``flock`` on Unix, released by the OS
when its holder dies, however it dies; where the filesystem has no ``flock``, filelock's own
SoftFileLock marker). FOLDER/.alignsam.lock.json names the holder (host, pid, command line, start time)
while it writes, and is removed when it stops. A second writer stops at once with FolderInUseError
naming the folder and the holder. A holder file left behind by a process that died (kill -9) is taken
over with a one-line notice when that process ran on this host; one left by another host is refused
with how to clear it (this host cannot tell whether that process still runs). See docs/reliability.md.

Readers (evaluate reading a run, segment reading a bundle) take no lock. The lock is on the exact
folder, never its parents: reproduce holds DIR while embed holds DIR/stores/x, and Ray workers
writing DIR/runs/x take nothing. Within one process a folder already held is entered again freely.
URIs (s3://, gs://) are not locked: object stores have no locks.
"""
from __future__ import annotations

import contextlib
import json
import os
import shlex
import socket
import sys
import threading
import time

from filelock import FileLock, Timeout

LOCK_NAME = ".alignsam.lock"
HOLDER_NAME = ".alignsam.lock.json"

_held: dict[str, int] = {}  # realpath -> depth, the folders this process holds
_held_guard = threading.Lock()


class FolderInUseError(Exception):
    """Another writer holds the folder (or left a lock this host cannot prove stale)."""


def read_holder(folder: str) -> dict | None:
    """The holder record of FOLDER (None if there is none or it is unreadable)."""
    try:
        with open(os.path.join(folder, HOLDER_NAME)) as f:
            holder = json.load(f)
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this host."""
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except (OSError, ValueError, OverflowError):
        return False
    return True


def describe(holder: dict | None) -> str:
    if not holder:
        return "a process that has not recorded itself"
    return (f"pid {holder.get('pid')} on {holder.get('host')} (`{holder.get('command')}`, since "
            f"{holder.get('started')})")


def _clear_hint(folder: str, holder: dict) -> str:
    return (f"If that process is gone (its node lost), check on {holder.get('host')} that pid {holder.get('pid')} no "
            f"longer runs, then remove {os.path.join(folder, HOLDER_NAME)} and {os.path.join(folder, LOCK_NAME)} "
            "and rerun.")


def _wait_for_holder(folder: str, seconds: float = 2.0) -> dict | None:
    """The holder's record; a holder that has just taken the lock writes it a moment later."""
    deadline = time.monotonic() + seconds
    while (holder := read_holder(folder)) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    return holder


def _write_holder(folder: str, what: str) -> None:
    record = {"host": socket.gethostname(), "pid": os.getpid(), "command": shlex.join(sys.argv) or what,
              "writer": what, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    tmp = os.path.join(folder, f"{HOLDER_NAME}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1)
    os.replace(tmp, os.path.join(folder, HOLDER_NAME))  # readers never see half a record


def _take_over_stale(folder: str) -> None:
    """We hold the lock; a holder record still there was left by a process that died holding it."""
    old = read_holder(folder)
    if old is None:
        return
    if old.get("host") != socket.gethostname():
        raise FolderInUseError(
            f"{folder} is locked by {describe(old)}, and that lock was never released; from "
            f"{socket.gethostname()} it cannot be told whether that process still runs (a shared filesystem). If it "
            f"does, wait for it to finish or pass another folder. " + _clear_hint(folder, old))
    state = "is no longer running" if not pid_alive(old.get("pid", 0)) else "no longer holds it"
    print(f"[alignsam] {folder}: taking over the lock of pid {old.get('pid')} (`{old.get('command')}`, since "
          f"{old.get('started')}), which {state}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def folder_lock(folder: str, what: str):
    """Hold FOLDER's writer lock for the block (FOLDER is created if missing, and removed again on exit
    if this call created it and nothing but the lock was written). ``what``: the command, e.g. "train".
    Raises FolderInUseError at once if another process holds it."""
    if "://" in str(folder):
        yield
        return
    folder = os.path.abspath(folder)
    key = os.path.realpath(folder)
    with _held_guard:
        nested = key in _held
        if nested:
            _held[key] += 1
    if nested:
        try:
            yield
        finally:
            with _held_guard:
                _held[key] -= 1
        return
    created = not os.path.exists(folder)
    os.makedirs(folder, exist_ok=True)
    lock = FileLock(os.path.join(folder, LOCK_NAME), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        holder = _wait_for_holder(folder)
        hint = (" " + _clear_hint(folder, holder)) if holder and holder.get("host") != socket.gethostname() else ""
        raise FolderInUseError(
            f"{folder} is being written by another alignsam {holder.get('writer', 'run') if holder else 'run'}: "
            f"{describe(holder)}. Two writers would mix their files, so this one stops and touches nothing; wait "
            f"for that one to finish, or pass another folder.{hint}") from None
    try:
        _take_over_stale(folder)
        _write_holder(folder, what)
        with _held_guard:
            _held[key] = 0
        try:
            yield
        finally:
            with _held_guard:
                _held.pop(key, None)
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(folder, HOLDER_NAME))  # before the lock goes: a record means it is held
    finally:
        lock.release()
        if created:  # a run that wrote nothing leaves no folder behind
            with contextlib.suppress(OSError):
                if set(os.listdir(folder)) <= {LOCK_NAME}:
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(os.path.join(folder, LOCK_NAME))
                    os.rmdir(folder)
