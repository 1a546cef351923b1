"""Writing files safely: atomic writes, the temporary names they use, file fingerprints.

Every write goes to a temporary name in the same folder, then is renamed onto its destination, so a
crash never leaves a half-written file under a final name; :func:`stale_temp_files` finds what a
killed write left behind.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds.

    A crash or exception inside the block leaves ``path`` as it was (absent or the old file)
    and removes the temporary file. The temporary name keeps the final suffixes, so writers
    that infer the format from the extension (``.nii.gz``) still work.

    Args:
        path: Final destination.

    Yields:
        The temporary path to write to.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes)
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent
    )
    os.close(fd)
    tmp = Path(tmp_name)
    # mkstemp creates the file 0600; give the output the permissions a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


# atomic_path's temporary names: ".{name}.{mkstemp's random letters}.tmp{name's suffixes}".
_TEMP_NAME = re.compile(r"\.(?P<name>.+)\.[a-z0-9_]+\.tmp(?P<suffixes>(?:\.[^.]+)*)")


# A folder other processes may write to at the same time (a shared cache, a --out folder): a temp
# file younger than this may be one being written, so it is left in place.
SHARED_TEMP_MIN_AGE_S = 3600.0


def temp_destination(path: str | Path) -> Path | None:
    """The file a temporary file of :func:`atomic_path` was to become, or None if it is not one.

    ``.last.pt.k3x9q0ab.tmp.pt`` -> ``last.pt``: a leading dot, the destination's name, random
    letters, ``.tmp`` and the destination's suffixes, exactly as :func:`atomic_path` names them.
    """
    path = Path(path)
    match = _TEMP_NAME.fullmatch(path.name)
    if match is None or match["suffixes"] != "".join(Path(match["name"]).suffixes):
        return None
    return path.with_name(match["name"])


def stale_temp_files(folder: str | Path) -> list[Path]:
    """The temporary files of :func:`atomic_path` in ``folder`` (not its sub-folders), sorted.

    A process killed while writing leaves them behind (a checkpoint's can be tens of MB); only
    names that :func:`temp_destination` recognises are listed, never another hidden file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if temp_destination(p) is not None and p.is_file())


def remove_stale_temp_files(folders: list[Path], min_age_s: float = 0.0) -> int:
    """Delete the :func:`stale_temp_files` of ``folders`` older than ``min_age_s``; log the count.

    Args:
        folders: Folders written only through :func:`atomic_path` (missing ones are skipped).
        min_age_s: Keep temp files modified less than this many seconds ago: in a folder that
            another process may be writing to, they may still be in use.

    Returns:
        How many files were removed.
    """
    removed, size, kept = 0, 0, 0
    now = time.time()
    for path in (p for folder in folders for p in stale_temp_files(folder)):
        try:
            stat = path.stat()
            if now - stat.st_mtime < min_age_s:
                kept += 1
                continue
            path.unlink()
        except OSError as exc:  # gone already, or a read-only folder: leave it
            log.debug("could not remove %s (%s)", path, exc)
            continue
        removed, size = removed + 1, size + stat.st_size
    if removed:
        where = ", ".join(str(f) for f in folders)
        log.info("removed %d temp files (%d bytes) of killed writes in %s", removed, size, where)
    if kept:
        log.info(
            "kept %d temp files younger than %.0f s: another process may still be writing them",
            kept,
            min_age_s,
        )
    return removed


def fingerprint(path: str | Path) -> dict:
    """Identity of a file's contents for resumable work: resolved path, size, mtime (ns)."""
    path = Path(path)
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
