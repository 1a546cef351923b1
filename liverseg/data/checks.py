"""The data doctor: every problem of a dataset, gathered before anything is reported.

:func:`check_case` checks one case, header first, then voxels in the file's own dtype;
:func:`check_dataset` checks a whole Task03 folder (discovery problems, duplicate ids, every case).
Checks return :class:`liverseg.data.problems.Problem` records instead of raising.
"""

from __future__ import annotations

import logging
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.openers import ImageOpener

from liverseg.constants import LABEL_VALUES, LIVER, TUMOR
from liverseg.data.cases import Case, discover_cases
from liverseg.data.problems import ERROR, WARNING, Problem, Problems
from liverseg.geometry import label_affine_matches, spacing_is_trustworthy, spacing_mm

log = logging.getLogger(__name__)

# 4x the largest Task03 volume (~260 M voxels): beyond it the header is corrupt, not the scan.
MAX_VOXELS = 1_000_000_000
_READ_ERRORS = (OSError, EOFError, ValueError, zlib.error, MemoryError, ImageFileError)


def _open_volume(path: Path, role: str) -> tuple[object | None, list[Problem]]:
    """Load the header of ``path``; return the image if its voxels may be read."""

    def err(message: str) -> tuple[None, list[Problem]]:
        return None, [Problem(ERROR, path, message)]

    if not path.is_file():
        return err(f"{role} is missing: expected a NIfTI file here; add it or remove the case")
    if path.stat().st_size == 0:
        return err(
            f"{role} is an empty file (0 bytes): expected a NIfTI volume; copy or download it again"
        )
    try:
        img = nib.load(str(path))
        # nibabel silently turns 0 or negative pixdim into 1 or abs(); read them as stored.
        with ImageOpener(path) as fileobj:
            stored = type(img.header).from_fileobj(fileobj, check=False)
        shape, zooms = img.shape, np.asarray(stored["pixdim"][1:4], float)
    except _READ_ERRORS as exc:
        return err(
            f"{role} is not a readable NIfTI file ({type(exc).__name__}: {exc}); expected a "
            ".nii/.nii.gz volume, replace it with a good copy"
        )
    problems = []
    if len(shape) == 4 and shape[3] == 1:
        problems.append(
            Problem(
                WARNING,
                path,
                f"{role} shape {shape} has a trailing 4th dim of 1: accepted and read as 3D "
                f"{shape[:3]}; save it as 3D to silence this",
            )
        )
    elif len(shape) != 3:
        return err(f"{role} has shape {shape}: expected a 3D volume (W, H, D); save it as 3D")
    if int(np.prod(shape, dtype=np.int64)) == 0 or np.prod(shape, dtype=float) > MAX_VOXELS:
        return err(
            f"{role} header claims shape {shape}: expected 1 to {MAX_VOXELS:,} voxels; the header "
            "is corrupt, replace the file"
        )
    spacing = np.asarray(spacing_mm(img.affine))
    finite = np.all(np.isfinite(zooms)) and np.all(np.isfinite(img.affine))
    if not (finite and np.all(zooms > 0) and np.all(spacing > 0)):
        return err(
            f"{role} spacing is {zooms.tolist()} mm (affine: {spacing.round(4).tolist()} mm): "
            "expected positive finite voxel sizes; fix pixdim and the affine in the header"
        )
    return img, problems


def _read_voxels(path: Path, img, role: str) -> tuple[np.ndarray | None, list[Problem]]:
    """Voxels in the file's own dtype (no float64 copy), shape (W, H, D), or the read error."""
    try:
        proxy = img.dataobj
        data = np.asarray(proxy.get_unscaled() if hasattr(proxy, "get_unscaled") else proxy)
    except _READ_ERRORS as exc:
        kind = "truncated" if isinstance(exc, EOFError) else "unreadable"
        return None, [
            Problem(
                ERROR,
                path,
                f"{role} voxel data is {kind} ({type(exc).__name__}: {exc}); expected "
                f"{np.prod(img.shape):,} voxels, copy or download the file again",
            )
        ]
    return data.reshape(data.shape[:3]), []


def _scaled_range(img, values: np.ndarray) -> tuple[float, float]:
    """(min, max) of ``values`` (stored, finite) after the header's scl_slope/scl_inter (HU)."""
    if values.size == 0:
        return float("nan"), float("nan")
    slope, inter = getattr(img.dataobj, "slope", 1.0), getattr(img.dataobj, "inter", 0.0)
    ends = np.array([values.min(), values.max()], float) * slope + inter
    return float(ends.min()), float(ends.max())


def _image_value_problems(path: Path, img, data: np.ndarray) -> list[Problem]:
    problems = []
    finite = data
    if data.dtype.kind == "f":
        mask = np.isfinite(data)
        count = int(mask.size - np.count_nonzero(mask))
        if count:
            finite = data[mask]
            problems.append(
                Problem(
                    ERROR,
                    path,
                    f"image has {count:,} NaN/Inf voxels: expected finite HU everywhere; replace "
                    "them (e.g. with -1024, air) or re-export the scan",
                )
            )
    low, high = _scaled_range(img, finite)
    if high <= 10 or low >= 0:
        problems.append(
            Problem(
                WARNING,
                path,
                f"intensities span [{low:g}, {high:g}]: expected CT in HU (air near -1000, "
                "liver ~100); this looks normalised or offset. Convert to HU (scl_slope/"
                "scl_inter), or the HU window clips it",
            )
        )
    return problems


def _label_value_problems(path: Path, data: np.ndarray) -> list[Problem]:
    expected = ", ".join(map(str, LABEL_VALUES))
    fix = f"expected integers {{{expected}}} (background, liver, tumor); fix the label map"
    if data.dtype.kind == "f":
        bad = ~np.isfinite(data) | (data != np.round(data))
        if bad.any():
            found = np.unique(data[bad])[:5].tolist()
            return [Problem(ERROR, path, f"label holds non-integral values {found}: {fix}")]
    # One boolean array per value: np.isin's table method allocates an intp index per voxel.
    outside = data != LABEL_VALUES[0]
    for value in LABEL_VALUES[1:]:
        outside &= data != value
    if outside.any():
        found = np.unique(data[outside])[:10].tolist()
        return [Problem(ERROR, path, f"label values {found} outside the label set: {fix}")]
    if not np.any(data == TUMOR):
        liver = "liver only" if np.any(data == LIVER) else "no liver either"
        return [
            Problem(
                WARNING,
                path,
                f"no tumor voxel (value {TUMOR}), {liver}: fine for training (Task03 has 13 "
                "such cases), but tumor Dice is undefined (NaN) for this case",
            )
        ]
    return []


def _geometry_problems(case: Case, image, label, tolerance_mm: float, copy: bool) -> list[Problem]:
    """Label shape and affine against the image's."""
    if label.shape[:3] != image.shape[:3]:
        return [
            Problem(
                ERROR,
                case.label,
                f"label shape {label.shape[:3]} differs from its image's {image.shape[:3]} "
                f"({case.image}): expected one label voxel per image voxel; re-export the label",
            )
        ]
    if label_affine_matches(image.affine, label.affine, tolerance_mm):
        return []
    diff = float(np.abs(np.asarray(image.affine) - np.asarray(label.affine)).max())
    label_spacing, image_spacing = (
        np.asarray(spacing_mm(label.affine)),
        np.asarray(spacing_mm(image.affine)),
    )
    what = "affine"
    if not np.allclose(label_spacing, image_spacing, atol=tolerance_mm):
        what = (
            f"spacing {label_spacing.round(4).tolist()} mm (image: "
            f"{image_spacing.round(4).tolist()} mm) and affine"
        )
    message = f"label {what} differs from its image's by up to {diff:.4g} mm"
    if copy:
        return [Problem(WARNING, case.label, f"{message}; the image's geometry will be used")]
    return [
        Problem(
            ERROR,
            case.label,
            f"{message} (tolerance {tolerance_mm} mm): expected the image's geometry; if the "
            "voxels correspond, pass --copy-label-geometry (data.copy_label_geometry=true) to "
            "use the image's, or raise --affine-tolerance-mm",
        )
    ]


def check_case(
    case: Case, *, affine_tolerance_mm: float = 0.01, copy_label_geometry: bool = False
) -> list[Problem]:
    """Every problem of one case's image and label; never raises for a bad file.

    Headers are checked before any voxel is read; voxels are read in the file's own dtype.

    Args:
        case: The case; ``label`` None checks the image only.
        affine_tolerance_mm: Largest label/image affine entry difference taken as float noise.
        copy_label_geometry: Turn a label affine mismatch into a warning (image's one is used).

    Returns:
        The problems found, errors and warnings, in file order.
    """
    image, problems = _open_volume(case.image, "image")
    if image is not None:
        if not spacing_is_trustworthy(image.affine):
            problems.append(
                Problem(
                    WARNING,
                    case.image,
                    "identity-like affine (axis-aligned, "
                    f"{spacing_mm(image.affine)[0]:g} mm spacing on every axis): often a "
                    "converter's default or its halving by `liverseg prepare`, not the true "
                    "voxel size (Task03 cases 28-47); volumes in mL and sizes in mm from this "
                    "header are unreliable. Set the true spacing in the header if known",
                )
            )
        data, read_problems = _read_voxels(case.image, image, "image")
        problems += read_problems
        if data is not None:
            problems += _image_value_problems(case.image, image, data)
        del data
    if case.label is None:
        return problems
    label, label_problems = _open_volume(case.label, "label")
    problems += label_problems
    if label is None:
        return problems
    if image is not None:
        problems += _geometry_problems(case, image, label, affine_tolerance_mm, copy_label_geometry)
    data, read_problems = _read_voxels(case.label, label, "label")
    problems += read_problems
    if data is not None:
        problems += _label_value_problems(case.label, data)
    return problems


def _duplicate_problems(cases: list[Case]) -> list[Problem]:
    by_id: dict[str, list[Case]] = {}
    for case in cases:
        by_id.setdefault(case.case_id, []).append(case)
    return [
        Problem(
            ERROR,
            same[1].image,
            f"case id {case_id!r} appears {len(same)} times ("
            f"{', '.join(str(c.image) for c in same)}): expected unique ids; remove or rename "
            "the extra files or dataset.json entries",
        )
        for case_id, same in by_id.items()
        if len(same) > 1
    ]


def check_dataset(
    root: str | Path,
    *,
    affine_tolerance_mm: float = 0.01,
    copy_label_geometry: bool = False,
    cases: list[Case] | None = None,
) -> Problems:
    """Every problem of a Task03-layout dataset, gathered before returning.

    Args:
        root: Dataset folder.
        affine_tolerance_mm: Largest label/image affine entry difference taken as float noise.
        copy_label_geometry: Report label affine mismatches as warnings (image's one is used).
        cases: Check only these (e.g. from :func:`find_cases`); default: discover the training
            and test cases of ``root`` and report discovery problems too (bad ``dataset.json``,
            files it does not list).

    Returns:
        The problems (a list with ``n_cases``, the number of cases checked).

    Raises:
        DataError: ``root`` or its ``imagesTr``/``labelsTr`` do not exist (nothing to check).
            A missing ``imagesTs/`` whose cases ``dataset.json`` lists is an error problem of
            that folder instead (its cases are not checked).
    """
    root = Path(root)
    problems: list[Problem] = []
    if cases is None:
        cases, problems = discover_cases(root)
    problems += _duplicate_problems(cases)
    for case in cases:
        log.info("checking %s", case.case_id)
        problems += check_case(
            case, affine_tolerance_mm=affine_tolerance_mm, copy_label_geometry=copy_label_geometry
        )
    return Problems(problems, n_cases=len(cases))
