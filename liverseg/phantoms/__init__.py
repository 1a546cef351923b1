"""Synthetic contrast-enhanced abdominal CT in the Task03_Liver layout.

Each case is drawn in physical millimetres in a patient frame (RAS+: +x is the patient's right,
+y anterior, +z superior) and only then sampled on the voxel grid, so a seed gives the same
anatomy at any ``shape``; the spacing is the field of view divided by the shape. What makes the
task hard on purpose: the spleen has the liver's HU and texture, tumors range from 2 to 30 mm with
contrasts down to 10 HU under 10-25 HU noise, a fluid-filled gallbladder sits in the liver's
fossa, bowel walls, pancreas, heart and IVC are liver-bright neighbours, and ~30% of cases are
stored LPS instead of RAS.

With ``followup``, each labeled case also gets a second scan of the same patient (moved a
little, breathing, its lesions stable, grown, shrunk, gone or new) and the truth of what
changed, for ``liverseg compare``.

Layout of this package: here the public API and the Task03 writer; ``case`` (one case: scene,
scanner model, stored orientation), ``grid`` (sampling grid, tissue ids, smooth random fields),
``anatomy`` (the random draw of one anatomy), ``painters`` (each organ paints HU and a tissue id
into the case's arrays, later painters win), ``tumors`` (drawing lesions, then painting them),
``followup`` (a baseline and follow-up pair and its truth), ``changes`` (the pair's lesions and
what becomes of each), ``motion`` (the patient's motion between the scans) and ``statistics``
(each lesion's HU against its liver, as measured on the image).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from liverseg.errors import LiversegError
from liverseg.io import atomic_path, save_nifti
from liverseg.phantoms.case import (
    LPS_FRACTION,
    MIN_SIZE,
    TUMOR_FREE_FRACTION,
    Phantom,
    checked_shape,
    render_case,
)
from liverseg.phantoms.followup import (
    FOLLOWUP_MAX_SPACING_MM,
    check_followup_shape,
    render_followup,
)
from liverseg.phantoms.grid import TISSUES

__all__ = [
    "APPLEDOUBLE_MAGIC", "FOLLOWUP_MAX_SPACING_MM", "LPS_FRACTION", "MIN_SIZE", "TISSUES",
    "TUMOR_FREE_FRACTION", "Phantom", "case_seed", "generate_case", "render_case",
    "render_followup", "write_dataset",
]  # fmt: skip

log = logging.getLogger(__name__)

# First bytes of a macOS AppleDouble file (the `._liver_N.nii.gz` litter of the real archive).
APPLEDOUBLE_MAGIC = b"\x00\x05\x16\x07"


def case_seed(seed: int, index: int) -> int:
    """The seed of case ``index`` of a dataset written with ``seed``.

    ``generate_case(shape, case_seed(seed, i))`` rebuilds that one case alone.
    """
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


def generate_case(
    shape: tuple[int, int, int] = (128, 128, 96),
    seed: int = 0,
    *,
    tumor_free: bool | None = None,
    lps: bool | None = None,
    fov_mm: tuple[float, float, float] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw one synthetic portal-venous abdominal CT with its liver/tumor label.

    Args:
        shape: Voxels ``(W, H, D)``. The spacing is the field of view over the shape.
        seed: Every random choice derives from it; the same seed gives identical arrays.
        tumor_free: ``None``: ~10% of seeds have no tumor (as in Task03); ``True``/``False``
            force it. The anatomy and noise do not depend on it.
        lps: ``None``: ~30% of seeds are stored LPS; ``True``/``False`` force it. The physical
            anatomy is the same either way (``nib.as_closest_canonical`` undoes the flip).
        fov_mm: Field of view ``(x, y, z)`` in mm; ``None`` draws it (in-plane 330-420,
            cranio-caudal 180-300, from the top of the lung bases down).

    Returns:
        ``(image, label, affine)``: image int16 HU ``(W, H, D)``; label uint8 with
        ``BACKGROUND``/``LIVER``/``TUMOR`` ``(W, H, D)``; affine 4 x 4 float64 in mm.

    Raises:
        LiversegError: ``shape`` is not three whole sizes >= ``MIN_SIZE``.
    """
    case = render_case(shape, seed, tumor_free=tumor_free, lps=lps, fov_mm=fov_mm)
    return case.image, case.label, case.affine


def write_dataset(
    out_dir: str | Path,
    cases: int = 8,
    shape: tuple[int, int, int] = (128, 128, 96),
    seed: int = 0,
    test_cases: int = 2,
    junk: bool = False,
    followup: bool = False,
) -> Path:
    """Write phantoms in the exact Task03_Liver layout.

    ``imagesTr/liver_N.nii.gz`` (int16 HU) and ``labelsTr/liver_N.nii.gz`` (uint8) for
    ``N < cases``, unlabeled ``imagesTs/liver_M.nii.gz`` for the next ``test_cases`` ids, and
    ``dataset.json``. Case ``N`` is ``generate_case(shape, case_seed(seed, N))``.

    Args:
        out_dir: Destination folder (created).
        cases: Labeled training cases.
        shape: Voxels ``(W, H, D)`` of every case.
        seed: Dataset seed.
        test_cases: Unlabeled cases.
        junk: Also write macOS AppleDouble ``._liver_N.nii.gz`` files (not NIfTI) beside the
            real ones in imagesTr, labelsTr and imagesTs, as in the real archive.
        followup: Also a follow-up scan of every labeled case: ``followup/imagesTr``,
            ``followup/labelsTr`` and ``followup/truth/liver_N.json``; case ``N`` (baseline)
            is then ``render_followup(shape, case_seed(seed, N))``'s, whose lesions differ
            from ``generate_case``'s.

    Returns:
        ``out_dir``.

    Raises:
        LiversegError: A negative count, a shape that is not three sizes >= ``MIN_SIZE``, or
            with ``followup``: no labeled case, or voxels coarser than
            ``FOLLOWUP_MAX_SPACING_MM``.
    """
    for name, count in (("--cases", cases), ("--test-cases", test_cases)):
        if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0:
            raise LiversegError(f"{name}: expected a whole number >= 0, found {count!r}")
    shape = _checked_followup(cases, shape) if followup else checked_shape(shape)
    out_dir = Path(out_dir)
    training = []
    for index in range(cases):
        if followup:
            image, label, affine = _write_pair(out_dir, shape, case_seed(seed, index), index)
        else:
            image, label, affine = generate_case(shape, case_seed(seed, index))
        name = f"liver_{index}.nii.gz"
        save_nifti(image, affine, out_dir / "imagesTr" / name)
        save_nifti(label, affine, out_dir / "labelsTr" / name)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
        if junk:
            for folder in ("imagesTr", "labelsTr"):
                _write_appledouble(out_dir / folder / f"._{name}", index)
        log.info("phantom %d/%d written", index + 1, cases + test_cases)
    test = []
    for index in range(cases, cases + test_cases):
        image, _, affine = generate_case(shape, case_seed(seed, index))
        name = f"liver_{index}.nii.gz"
        save_nifti(image, affine, out_dir / "imagesTs" / name)
        test.append(f"./imagesTs/{name}")
        if junk:
            _write_appledouble(out_dir / "imagesTs" / f"._{name}", index)
        log.info("phantom %d/%d written", index + 1, cases + test_cases)
    (out_dir / "imagesTs").mkdir(parents=True, exist_ok=True)
    manifest = {
        "name": "Liver",
        "description": "Synthetic abdominal CT phantoms (liverseg.phantoms)",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "liver", "2": "cancer"},
        "numTraining": cases,
        "numTest": test_cases,
        "training": training,
        "test": test,
    }
    with atomic_path(out_dir / "dataset.json") as tmp:
        tmp.write_text(json.dumps(manifest, indent=4) + "\n")
    return out_dir


def _checked_followup(cases: int, shape) -> tuple[int, int, int]:
    """The shape, where a dataset with follow-ups can be written; else a LiversegError."""
    if cases == 0:
        raise LiversegError(
            "--followup: expected --cases >= 1 (each labeled case gets a follow-up scan), found 0"
        )
    return check_followup_shape(shape)


def _write_pair(out_dir: Path, shape, seed: int, index: int):
    """Write case ``index``'s follow-up and truth; return the baseline's image, label, affine."""
    name = f"liver_{index}"
    baseline, followup, truth = render_followup(shape, seed, case_id=name)
    folder = out_dir / "followup"
    save_nifti(followup.image, followup.affine, folder / "imagesTr" / f"{name}.nii.gz")
    save_nifti(followup.label, followup.affine, folder / "labelsTr" / f"{name}.nii.gz")
    with atomic_path(folder / "truth" / f"{name}.json") as tmp:
        tmp.write_text(json.dumps(truth, indent=2) + "\n")
    return baseline.image, baseline.label, baseline.affine


def _write_appledouble(path: Path, index: int) -> None:
    """A few hundred bytes of AppleDouble resource-fork header, like macOS leaves in archives."""
    body = APPLEDOUBLE_MAGIC + b"\x00\x02\x00\x00" + b"Mac OS X        " + b"\x00\x02"
    body += bytes((index * 7 + k) % 256 for k in range(4096 // 16))
    with atomic_path(path) as tmp:
        tmp.write_bytes(body)
