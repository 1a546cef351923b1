"""Can liverseg write there? Output folders and files probed before the expensive work.

:func:`check_writable_dir` and :func:`check_writable_file` create the missing folders, write and
remove a small probe file, and remove again the folders they created, so a command refuses a
read-only, full or mistyped ``--out`` in its first second, not after an hour of work.
:func:`describe_os_error` turns a filesystem ``OSError`` raised later (a disk that fills up
mid-run) into the one line the CLI prints, with the fix.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path

from liverseg.errors import LiversegError
from liverseg.io import temp_destination

# The filesystem errors the CLI reports as one line with a fix; any other OSError is a bug.
FILESYSTEM_FIXES = {
    errno.ENOSPC: "free space on that disk or write to another one",
    errno.EDQUOT: "free space within your disk quota or write to another disk",
    errno.EROFS: "write to a folder on a writable disk (or remount that one read-write)",
    errno.EACCES: "check its permissions (chmod/chown) or use another folder",
    errno.EPERM: "check its permissions (chmod/chown) or use another folder",
    errno.ENOTDIR: "a part of the path is a file, not a folder: choose another path",
    errno.EISDIR: "it is a folder: give a file name",
    errno.EEXIST: "a file is in the way where a folder is needed: move it or choose another path",
}

PROBE_PREFIX = ".liverseg-probe-"


class UnwritableError(LiversegError):
    """An output folder or file cannot be written: read-only, full, no permission, in the way.

    Attributes:
        path: The output the user asked for.
        result: What was computed before the write failed (``liverseg evaluate``'s table), for
            the caller to show; None when nothing was.
    """

    def __init__(self, message: str, path: str | Path, result: str | None = None):
        super().__init__(message)
        self.path = Path(path)
        self.result = result


def final_path(filename: str | os.PathLike[str]) -> Path:
    """The file being written when ``filename`` is a temporary name of ``io.atomic_path``."""
    path = Path(filename)
    return temp_destination(path) or path


def describe_os_error(exc: OSError) -> str | None:
    """``"<path>: <strerror>; <fix>"`` for a filesystem error of :data:`FILESYSTEM_FIXES`.

    Args:
        exc: Any ``OSError``; its ``filename`` (when set) names the path.

    Returns:
        The line, or None when ``exc`` is not one of those errors.
    """
    fix = FILESYSTEM_FIXES.get(exc.errno)
    if fix is None:
        return None
    reason = f"{exc.strerror or os.strerror(exc.errno)}; {fix}"
    return f"{final_path(exc.filename)}: {reason}" if exc.filename else reason


def unwritable(
    path: str | Path, exc: OSError, what: str, result: str | None = None
) -> UnwritableError:
    """The error to raise when writing ``what`` to ``path`` failed with ``exc``.

    Args:
        path: The output being written.
        exc: The ``OSError`` of the write (its ``filename`` may be a temporary name).
        what: What the output is, for the message (``"checkpoint"``, ``"--out"``).
        result: What was computed and would otherwise be lost (see :class:`UnwritableError`).
    """
    path = Path(path)
    reason = exc.strerror or (os.strerror(exc.errno) if exc.errno else str(exc))
    fix = FILESYSTEM_FIXES.get(exc.errno, "check the free space and permissions there")
    where = final_path(exc.filename) if exc.filename else path
    # Name the failing folder when it is not the output itself (an ancestor that cannot be made).
    if where != path and where.parent != path and where.parent != path.parent:
        reason = f"{reason} at {where}"
    return UnwritableError(f"cannot write {what} {path}: {reason}; {fix}", path, result)


def check_writable_dir(path: str | Path, what: str) -> Path:
    """Refuse a folder that cannot be created or written; leave the filesystem as it was.

    Creates the missing folders, writes, syncs and removes a probe file in ``path``, then removes
    the folders it created (the command creates them again when it writes its outputs).

    Args:
        path: The output folder.
        what: How the user named it, for the message (``"--out"``, ``"run.dir"``).

    Returns:
        ``path`` as a ``Path``.

    Raises:
        UnwritableError: A file is in the way, or the folder cannot be created or written
            (read-only filesystem, no permission, disk full); the message names the path and
            the fix.
    """
    path = Path(path)
    _check_folder(path, what, path)
    return path


def check_writable_file(path: str | Path, what: str, example_name: str | None = None) -> Path:
    """Refuse an output file that is a folder, or whose folder cannot be created or written.

    The file itself is never opened: outputs are written to a temporary file beside it and
    renamed onto it (``io.atomic_path``), which needs only its folder to be writable.

    Args:
        path: The output file.
        what: How the user named it (``"--out"``).
        example_name: A file name to suggest when ``path`` is a folder (``"metrics.csv"``).

    Returns:
        ``path`` as a ``Path``.

    Raises:
        UnwritableError: ``path`` is a folder, or its folder cannot be written (see
            :func:`check_writable_dir`).
    """
    path = Path(path)
    if path.is_dir():
        suggestion = f", e.g. {path / example_name}" if example_name else ""
        raise UnwritableError(f"{what} {path} is a folder; give a file name{suggestion}", path)
    _check_folder(path.parent, what, path)
    return path


def _check_folder(folder: Path, what: str, target: Path) -> None:
    """Probe ``folder`` (created, then removed again if missing); errors name ``target``."""
    try:
        blocker = _file_in_the_way(folder)
    except OSError as exc:
        raise unwritable(target, exc, what) from None
    if blocker == target:
        raise UnwritableError(
            f"{what} {target} is a file; give a folder (missing folders are created)", target
        )
    if blocker is not None:
        raise UnwritableError(
            f"cannot write {what} {target}: {blocker} is a file, not a folder; "
            "give a path inside a folder (missing folders are created)",
            target,
        )
    created = _missing_folders(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _write_probe(folder)
    except OSError as exc:
        raise unwritable(target, exc, what) from None
    finally:
        for made in reversed(created):
            with contextlib.suppress(OSError):
                made.rmdir()


def _file_in_the_way(path: Path) -> Path | None:
    """The nearest existing ancestor of ``path`` (or itself) when it is not a folder."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return None if candidate.is_dir() else candidate
    return None


def _missing_folders(path: Path) -> list[Path]:
    """``path`` and its ancestors that do not exist, outermost first."""
    missing = []
    for candidate in (path, *path.parents):
        if candidate.exists():
            break
        missing.append(candidate)
    return missing[::-1]


def _write_probe(folder: Path) -> None:
    """Write, sync and remove a small file in ``folder``; raises the ``OSError`` of the write."""
    fd, name = tempfile.mkstemp(prefix=PROBE_PREFIX, dir=folder)
    try:
        try:
            os.write(fd, b"liverseg write probe\n")
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(name)
