"""One run per ``--out`` folder: ``OUT/run.lock`` holds the PID and host of the run using it.

A second run on the same folder is refused with a one-line message (it would overwrite the
first one's ``last.pt``). A lock left by a process that no longer runs (killed, machine
restarted) is stale: it is replaced, with a note. A lock written on another host cannot be
checked and is respected; the message says how to remove it.
"""

import contextlib
import os
import socket
import sys
from pathlib import Path

from .config import ConfigError

LOCK_NAME = "run.lock"


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


def _holder(path):
    """``(pid, host)`` written in the lock file, ``(None, None)`` when unreadable."""
    try:
        pid, host = path.read_text().split()[:2]
        return int(pid), host
    except (OSError, ValueError):
        return None, None


def _create(path):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(f"{os.getpid()} {socket.gethostname()}\n")


def acquire(out):
    """Take ``OUT/run.lock`` for this process; raise ConfigError when a live run holds it."""
    path = Path(out) / LOCK_NAME
    for _ in range(2):  # a second try after removing a stale lock
        try:
            _create(path)
            return path
        except FileExistsError:
            pid, host = _holder(path)
            if host == socket.gethostname() and pid is not None and not _alive(pid):
                print(f"note: removing the stale lock {path} of process {pid}, which no longer runs",
                      file=sys.stderr)
                path.unlink(missing_ok=True)
                continue
            who = f"process {pid} on {host}" if pid is not None else "another run"
            raise ConfigError(f"{out} is in use by {who} ({path}): wait for it to end or choose "
                              f"another --out (remove {path} if that run is gone)") from None
        except OSError as err:
            raise ConfigError(f"cannot create {path}: {err.strerror or err}") from None
    raise ConfigError(f"{out} is in use by another run starting at the same time ({path})")


def release(path):
    """Remove the lock ``path`` if this process still holds it."""
    if path is not None and _holder(path) == (os.getpid(), socket.gethostname()):
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def run_lock(out, main=True):
    """Hold ``OUT/run.lock`` in the block (rank 0 alone: ``main``)."""
    path = acquire(out) if main else None
    try:
        yield path
    finally:
        release(path)
