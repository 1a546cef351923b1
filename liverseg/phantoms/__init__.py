"""Synthetic contrast-enhanced abdominal CT in the Task03_Liver layout.

Each case is drawn in physical millimetres in a patient frame (RAS+: +x is the patient's right,
+y anterior, +z superior) and only then sampled on the voxel grid, so a seed gives the same
anatomy at any ``shape``; the spacing is the field of view divided by the shape. What makes the
task hard on purpose: the spleen has the liver's HU and texture, tumors range from 2 to 30 mm with
contrasts down to 10 HU under 10-25 HU noise, a fluid-filled gallbladder sits in the liver's
fossa, bowel walls, pancreas, heart and IVC are liver-bright neighbours, and ~30% of cases are
stored LPS instead of RAS.

Layout of this package: here the public API, the scanner model and the Task03 writer; ``grid``
(sampling grid, tissue ids, smooth random fields), ``anatomy`` (the random draw of one anatomy),
``painters`` (each organ paints HU and a tissue id into the case's arrays, later painters win),
``tumors`` and ``statistics`` (each lesion's HU against its liver, as measured on the image).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from liverseg.constants import BACKGROUND, LIVER, TUMOR
from liverseg.errors import LiversegError
from liverseg.io import atomic_path, save_nifti
from liverseg.phantoms.anatomy import draw_anatomy
from liverseg.phantoms.grid import TISSUES, Grid
from liverseg.phantoms.painters import paint_anatomy
from liverseg.phantoms.tumors import paint_tumors

log = logging.getLogger(__name__)

LPS_FRACTION = 0.3
# Smallest phantom size per axis, voxels (the organs need a few voxels to be drawn at all).
MIN_SIZE = 4
TUMOR_FREE_FRACTION = 0.1
# First bytes of a macOS AppleDouble file (the `._liver_N.nii.gz` litter of the real archive).
APPLEDOUBLE_MAGIC = b"\x00\x05\x16\x07"
_HU_RANGE = (-1024, 3071)
_LPS_FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class Phantom:
    """One synthetic case with its ground truth.

    Attributes:
        image: CT in HU, int16, shape ``(W, H, D)``.
        label: uint8 ``BACKGROUND``/``LIVER``/``TUMOR``, shape ``(W, H, D)``.
        affine: 4 x 4 voxel-to-scanner (RAS+) matrix in mm.
        tissue: uint8 index into ``TISSUES`` for every voxel (which organ it was drawn as),
            shape ``(W, H, D)``; e.g. to measure false positives on the spleen.
        lps: Whether the arrays are stored LPS (first two axes flipped) rather than RAS.
        tumor_free: Whether no tumor was drawn.
    """

    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray
    tissue: np.ndarray
    lps: bool
    tumor_free: bool


def case_seed(seed: int, index: int) -> int:
    """The seed of case ``index`` of a dataset written with ``seed``.

    ``generate_case(shape, case_seed(seed, i))`` rebuilds that one case alone.
    """
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


def render_case(
    shape: tuple[int, int, int] = (128, 128, 96),
    seed: int = 0,
    *,
    tumor_free: bool | None = None,
    lps: bool | None = None,
    fov_mm: tuple[float, float, float] | None = None,
) -> Phantom:
    """Draw one case with its tissue map (see :func:`generate_case`)."""
    shape = _checked_shape(shape)
    # Independent streams: the tumors never move the anatomy, the noise never moves the tumors.
    geometry, anatomy, tumors, scanner = (
        np.random.default_rng(s) for s in np.random.SeedSequence(int(seed)).spawn(4)
    )
    coin_free, coin_lps = geometry.random(2)
    tumor_free = bool(coin_free < TUMOR_FREE_FRACTION) if tumor_free is None else bool(tumor_free)
    lps = bool(coin_lps < LPS_FRACTION) if lps is None else bool(lps)
    fov_xy, fov_z = geometry.uniform([330, 180], [420, 300])
    world_offset = geometry.uniform([-20, -40, -400], [20, 40, -100])
    body_offset = geometry.uniform([-10, -25], [10, -5])
    if fov_mm is None:
        an = draw_anatomy(anatomy, top_mm=fov_z / 2)
        # Like a radiographer, widen the field of view to fit the body where the scanner allows.
        fov_xy = float(np.clip(max(fov_xy, 2 * an.body[0] + 20), 330, 420))
        fov = np.array([fov_xy, fov_xy, fov_z])
    else:
        fov = np.asarray(fov_mm, dtype=float)
        an = draw_anatomy(anatomy, top_mm=fov[2] / 2)
    grid = Grid(shape, fov, body_offset_mm=body_offset)
    hu, tissue = paint_anatomy(anatomy, grid, an)
    if not tumor_free:
        paint_tumors(tumors, grid, an, hu, tissue)
    image = _scan(scanner, grid, hu, an.scanner)

    label = np.full(shape, BACKGROUND, dtype=np.uint8)
    label[tissue == TISSUES.index("liver")] = LIVER
    label[tissue == TISSUES.index("tumor")] = TUMOR
    affine = np.diag([*grid.spacing, 1.0])
    affine[:3, 3] = [ax[0] for ax in grid.axes] + world_offset
    if lps:
        image, label, tissue = (a[::-1, ::-1, :].copy() for a in (image, label, tissue))
        flip = _LPS_FLIP.copy()
        flip[:2, 3] = [shape[0] - 1, shape[1] - 1]
        affine = affine @ flip
    return Phantom(image, label, affine, tissue, lps, tumor_free)


def _checked_shape(shape) -> tuple[int, int, int]:
    """``shape`` as three ints, or a LiversegError saying what is allowed."""
    sizes = tuple(shape)
    allowed = f"three whole sizes >= {MIN_SIZE} voxels, e.g. --shape 64 64 48"
    if len(sizes) != 3 or not all(float(n).is_integer() for n in sizes):
        raise LiversegError(f"phantom shape: expected {allowed}; found {sizes}")
    if min(sizes) < MIN_SIZE:
        raise LiversegError(f"phantom shape {sizes} is too small: expected {allowed}")
    return tuple(int(n) for n in sizes)


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


def _scan(rng: np.random.Generator, grid: Grid, hu: np.ndarray, scanner: dict) -> np.ndarray:
    """Point spread and partial volume (a Gaussian), then quantum noise, then int16.

    Args:
        hu: Ideal tissue HU, float32 ``(W, H, D)``.
        scanner: ``psf_mm`` (Gaussian sigma) and ``noise_hu`` (noise sigma).
    """
    # A voxel averages its extent (box of width `spacing`, sigma ~0.3 voxel) on top of the PSF.
    sigma = np.sqrt((scanner["psf_mm"] / grid.spacing) ** 2 + 0.3**2)
    image = ndimage.gaussian_filter(hu, sigma, mode="nearest")
    image += rng.standard_normal(hu.shape, dtype=np.float32) * np.float32(scanner["noise_hu"])
    return np.clip(np.rint(image), *_HU_RANGE).astype(np.int16)


def write_dataset(
    out_dir: str | Path,
    cases: int = 8,
    shape: tuple[int, int, int] = (128, 128, 96),
    seed: int = 0,
    test_cases: int = 2,
    junk: bool = False,
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

    Returns:
        ``out_dir``.

    Raises:
        LiversegError: A negative count, or a shape that is not three sizes >= ``MIN_SIZE``.
    """
    for name, count in (("--cases", cases), ("--test-cases", test_cases)):
        if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0:
            raise LiversegError(f"{name}: expected a whole number >= 0, found {count!r}")
    shape = _checked_shape(shape)
    out_dir = Path(out_dir)
    training = []
    for index in range(cases):
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


def _write_appledouble(path: Path, index: int) -> None:
    """A few hundred bytes of AppleDouble resource-fork header, like macOS leaves in archives."""
    body = APPLEDOUBLE_MAGIC + b"\x00\x02\x00\x00" + b"Mac OS X        " + b"\x00\x02"
    body += bytes((index * 7 + k) % 256 for k in range(4096 // 16))
    with atomic_path(path) as tmp:
        tmp.write_bytes(body)
