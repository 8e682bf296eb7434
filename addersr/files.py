"""Output files: folders checked before any work, every file written atomically.

:func:`atomic_write` writes to a hidden temporary file beside the target and renames it
over the target only once it is complete, so a full disk, an error or an interrupted run
never leaves a half-written file (an existing file stays as it was).
:func:`prepare_output_dir` creates an output folder and proves it writable, so that tools
fail before computing anything rather than at the first write.
"""

import os
import secrets
from pathlib import Path

__all__ = ["OutputError", "atomic_write", "prepare_output_dir", "reason"]


class OutputError(Exception):
    """An output folder that cannot be created or written (a one-line message)."""


def reason(err):
    """A one-line description of ``err``: an OSError's strerror (no paths), else its text."""
    return err.strerror if isinstance(err, OSError) and err.strerror else str(err)


def _temporary(path):
    """``(fd, temp_path)``: a new hidden file beside ``path``, mode 0o666 less the umask."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(temp, flags, 0o666), temp
        except FileExistsError:
            continue


def atomic_write(path, write, mode="wb", **open_args):
    """Create or replace ``path`` with what ``write(file)`` writes, all or nothing.

    ``mode`` and ``open_args`` are those of :func:`open` (``"w"``, ``newline=""`` for
    text). On any error, including KeyboardInterrupt, the temporary file is removed and
    the exception re-raised. Returns ``path``.
    """
    path = Path(path)
    fd, temp = _temporary(path)
    try:
        with os.fdopen(fd, mode, **open_args) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return path


def prepare_output_dir(folder):
    """Create ``folder`` (and its parents) and check that files can be written in it.

    Raises :class:`OutputError` with a one-line message otherwise. Returns the folder.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder} exists and is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"cannot create the folder {folder}: {reason(err)}") from None
    try:
        fd, temp = _temporary(folder / "write-test")
    except OSError as err:
        raise OutputError(f"cannot write in {folder}: {reason(err)}") from None
    os.close(fd)
    temp.unlink()
    return folder
