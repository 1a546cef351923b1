"""The inputs of ``liverseg predict``: which NIfTI files and DICOM folders, and their output names.

An argument is a NIfTI file, a folder of them, a Task03 root (its ``imagesTs``, else its
``imagesTr``) or a folder of DICOM files (one case, named after the folder). Each case's outputs
are named by :func:`safe_name` of its case id, so they stay inside the output folder.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from liverseg.io import list_dicom, list_nifti

# Folders of a Task03 root searched for inputs, in order.
TASK03_IMAGE_FOLDERS = ("imagesTs", "imagesTr")

# ``(input path, message)``: an input that could not be listed or predicted.
Failure = tuple[Path, str]


def safe_name(case_id: str) -> str:
    """A file-name stem from a case id: only ``[A-Za-z0-9._-]``, no leading dot, never empty.

    Path separators and other characters become ``_``, so outputs stay inside the output folder.
    """
    name = re.sub(r"[^A-Za-z0-9._-]", "_", case_id)
    if name.startswith("."):
        name = "_" + name[1:]
    return name or "case"


def collect_inputs(inputs: Iterable[str | Path]) -> tuple[list[Path], list[Failure]]:
    """The NIfTI files and DICOM series folders named by ``inputs``.

    A file is taken as is. A folder gives its ``.nii``/``.nii.gz`` files (names starting with
    ``"."`` ignored); a Task03 root gives those of its ``imagesTs``, else its ``imagesTr``. A
    folder without NIfTI files that holds DICOM files (``DICM`` at byte 128, any file name) is
    one input: its CT series (:func:`liverseg.io.dicom.read_dicom_series`), named by the folder.

    Returns:
        ``(inputs, failures)``: failures name inputs that do not exist or hold no NIfTI or
        DICOM file.
    """
    files: list[Path] = []
    failures: list[Failure] = []
    for item in inputs:
        path = Path(item)
        if path.is_file():
            files.append(path)
            continue
        if not path.is_dir():
            failures.append((path, "not found; expected a .nii/.nii.gz file or a folder"))
            continue
        folder = next(
            (
                path / sub
                for sub in TASK03_IMAGE_FOLDERS
                if (path / sub).is_dir() and list_nifti(path / sub)
            ),
            path,
        )
        found = list_nifti(folder)
        if not found and list_dicom(path, first_only=True):
            found = [path]
        if not found:
            failures.append(
                (path, "folder holds no .nii/.nii.gz or DICOM file (nor imagesTs/, imagesTr/)")
            )
        files.extend(found)
    return files, failures


def input_bytes(path: Path) -> int:
    """The bytes of an input on disk: a file's size, or the sum over a DICOM folder's files.

    What :func:`liverseg.inference.workers.split_shares` balances: a stand-in for the work of
    predicting it, known without reading it. 0 when it cannot be read (it will fail anyway).
    """
    try:
        if path.is_dir():
            return sum(p.stat().st_size for p in path.iterdir() if p.is_file())
        return path.stat().st_size
    except OSError:
        return 0
