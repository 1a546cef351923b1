"""The one lister and case ids: which files of a folder are volumes (NIfTI, DICOM), in order."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from liverseg.constants import HIDDEN_PREFIX

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii")
# A DICOM file (PS3.10) has a 128-byte preamble, then these 4 bytes; extensions mean nothing.
DICOM_MAGIC_OFFSET = 128
DICOM_MAGIC = b"DICM"


def case_id_of(path: str | Path) -> str:
    """The case id of a NIfTI path (its name without ``.nii.gz`` / ``.nii``) or of a DICOM folder
    (its name; ``.`` is named after the folder it stands for)."""
    name = Path(os.path.abspath(path)).name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def natural_key(text: str) -> tuple:
    """Sort key that orders digit runs by value: ``liver_2`` before ``liver_10``."""
    return tuple(
        (0, int(part), "") if part.isdigit() else (1, 0, part)
        for part in re.split(r"(\d+)", text)
        if part
    )


def list_nifti(folder: str | Path, suffixes: tuple[str, ...] = NIFTI_SUFFIXES) -> list[Path]:
    """The NIfTI files of a folder, sorted by name with digit runs by value.

    Names starting with ``"."`` (macOS ``._liver_N.nii.gz`` AppleDouble files, dot files) are
    never opened; sub-folders are not searched. A symlink whose target is missing or loops is
    listed too, so that reading it fails with its name (:func:`missing_file_reason`) instead of
    the file vanishing without a word.

    Args:
        folder: The folder; a missing one has no files.
        suffixes: Accepted name endings (``("_seg.nii.gz", "_seg.nii")`` for predictions).

    Returns:
        The files, ``liver_2`` before ``liver_10``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    files, hidden = [], 0
    for path in folder.iterdir():
        if path.name.startswith(HIDDEN_PREFIX):
            hidden += 1
        elif path.name.endswith(suffixes) and (path.is_file() or path.is_symlink()):
            files.append(path)
    if hidden:
        log.info("%s: ignored %d hidden files (macOS ._ AppleDouble or dot files)", folder, hidden)
    return sorted(files, key=lambda p: natural_key(p.name))


def is_dicom_file(path: str | Path) -> bool:
    """Whether ``path`` is a DICOM file: ``DICM`` at byte 128, whatever its name."""
    try:
        with open(path, "rb") as f:
            f.seek(DICOM_MAGIC_OFFSET)
            return f.read(len(DICOM_MAGIC)) == DICOM_MAGIC
    except OSError:
        return False


def list_dicom(folder: str | Path, first_only: bool = False) -> list[Path]:
    """The DICOM files of a folder (any name; hidden names and sub-folders are not looked at).

    Args:
        folder: The folder; a missing one has no files.
        first_only: Stop at the first DICOM file found (enough to tell a DICOM folder).

    Returns:
        The files, sorted by name with digit runs by value (slice order comes from their headers).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    files = []
    for path in sorted(folder.iterdir(), key=lambda p: natural_key(p.name)):
        if not path.name.startswith(HIDDEN_PREFIX) and path.is_file() and is_dicom_file(path):
            files.append(path)
            if first_only:
                break
    return files
