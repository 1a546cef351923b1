"""One phantom case: its scene (grid, anatomy, tissues), the scanner, and how it is stored.

A case is drawn in four independent random streams of its seed (geometry, anatomy, tumors,
scanner noise), so the tumors never move the anatomy and the noise never moves the tumors; a
follow-up scan (:mod:`liverseg.phantoms.followup`) adds streams after these four.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from liverseg.constants import BACKGROUND, LIVER, TUMOR
from liverseg.errors import LiversegError
from liverseg.phantoms.anatomy import Anatomy, draw_anatomy
from liverseg.phantoms.grid import TISSUES, Grid
from liverseg.phantoms.painters import paint_anatomy
from liverseg.phantoms.tumors import paint_tumors

LPS_FRACTION = 0.3
# Smallest phantom size per axis, voxels (the organs need a few voxels to be drawn at all).
MIN_SIZE = 4
TUMOR_FREE_FRACTION = 0.1
# Ranges of the drawn field of view, mm: in-plane (widened to fit the body) and cranio-caudal.
FOV_XY_MM = (330, 420)
FOV_Z_MM = (180, 300)
# The streams of a case's seed, in spawn order; a follow-up spawns more after these.
STREAMS = ("geometry", "anatomy", "tumors", "scanner")
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
        lesion_ids: Scans of a follow-up pair only: uint8 ``(W, H, D)``, the id of the
            lesion each tumor voxel belongs to (the ``id`` of the pair's truth), 0 elsewhere;
            ``None`` for an ordinary case.
    """

    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray
    tissue: np.ndarray
    lps: bool
    tumor_free: bool
    lesion_ids: np.ndarray | None = None


@dataclass
class Scene:
    """A case before its tumors and its scan: the patient, where the scanner sees it, its streams.

    Attributes:
        grid: Voxel centres in the patient frame (mm).
        anatomy: The drawn anatomy.
        hu: Ideal tumor-free HU, float32 ``(W, H, D)``, RAS.
        tissue: Tumor-free tissue ids, uint8 ``(W, H, D)``, RAS.
        streams: The generators named in :data:`STREAMS`.
        lps: Whether the case is stored LPS.
        tumor_free: Whether the case gets no tumor.
        world_offset_mm: Scanner coordinates minus patient coordinates, ``(x, y, z)``.
    """

    grid: Grid
    anatomy: Anatomy
    hu: np.ndarray
    tissue: np.ndarray
    streams: dict
    lps: bool
    tumor_free: bool
    world_offset_mm: np.ndarray

    def affine(self, shift_mm=(0.0, 0.0, 0.0)) -> np.ndarray:
        """Voxel-to-scanner matrix of the RAS arrays, the field of view moved by ``shift_mm``."""
        affine = np.diag([*self.grid.spacing, 1.0])
        affine[:3, 3] = [ax[0] for ax in self.grid.axes] + self.world_offset_mm
        affine[:3, 3] += shift_mm
        return affine


def draw_scene(
    shape: tuple[int, int, int],
    seed: int,
    *,
    tumor_free: bool | None = None,
    lps: bool | None = None,
    fov_mm: tuple[float, float, float] | None = None,
) -> Scene:
    """The geometry, anatomy and tumor-free tissues of case ``seed`` (see ``generate_case``)."""
    shape = checked_shape(shape)
    children = np.random.SeedSequence(int(seed)).spawn(len(STREAMS))
    streams = {name: np.random.default_rng(child) for name, child in zip(STREAMS, children)}
    geometry, anatomy = streams["geometry"], streams["anatomy"]
    coin_free, coin_lps = geometry.random(2)
    tumor_free = bool(coin_free < TUMOR_FREE_FRACTION) if tumor_free is None else bool(tumor_free)
    lps = bool(coin_lps < LPS_FRACTION) if lps is None else bool(lps)
    fov_xy, fov_z = geometry.uniform([FOV_XY_MM[0], FOV_Z_MM[0]], [FOV_XY_MM[1], FOV_Z_MM[1]])
    world_offset = geometry.uniform([-20, -40, -400], [20, 40, -100])
    body_offset = geometry.uniform([-10, -25], [10, -5])
    if fov_mm is None:
        an = draw_anatomy(anatomy, top_mm=fov_z / 2)
        # Like a radiographer, widen the field of view to fit the body where the scanner allows.
        fov_xy = float(np.clip(max(fov_xy, 2 * an.body[0] + 20), *FOV_XY_MM))
        fov = np.array([fov_xy, fov_xy, fov_z])
    else:
        fov = np.asarray(fov_mm, dtype=float)
        an = draw_anatomy(anatomy, top_mm=fov[2] / 2)
    grid = Grid(shape, fov, body_offset_mm=body_offset)
    hu, tissue = paint_anatomy(anatomy, grid, an)
    return Scene(grid, an, hu, tissue, streams, lps, tumor_free, world_offset)


def render_case(
    shape: tuple[int, int, int] = (128, 128, 96),
    seed: int = 0,
    *,
    tumor_free: bool | None = None,
    lps: bool | None = None,
    fov_mm: tuple[float, float, float] | None = None,
) -> Phantom:
    """Draw one case with its tissue map (see ``generate_case``)."""
    scene = draw_scene(shape, seed, tumor_free=tumor_free, lps=lps, fov_mm=fov_mm)
    hu, tissue = scene.hu, scene.tissue
    if not scene.tumor_free:
        paint_tumors(scene.streams["tumors"], scene.grid, scene.anatomy, hu, tissue)
    image = scan(scene.streams["scanner"], scene.grid, hu, scene.anatomy.scanner)
    return store_case(scene, image, tissue, scene.affine(), scene.tumor_free)


def checked_shape(shape) -> tuple[int, int, int]:
    """``shape`` as three ints, or a LiversegError saying what is allowed."""
    sizes = tuple(shape)
    allowed = f"three whole sizes >= {MIN_SIZE} voxels, e.g. --shape 64 64 48"
    if len(sizes) != 3 or not all(float(n).is_integer() for n in sizes):
        raise LiversegError(f"phantom shape: expected {allowed}; found {sizes}")
    if min(sizes) < MIN_SIZE:
        raise LiversegError(f"phantom shape {sizes} is too small: expected {allowed}")
    return tuple(int(n) for n in sizes)


def scan(rng: np.random.Generator, grid: Grid, hu: np.ndarray, scanner: dict) -> np.ndarray:
    """Point spread and partial volume (a Gaussian), then quantum noise, then int16.

    Args:
        rng: The scanner-noise stream.
        grid: The grid ``hu`` is sampled on (its spacing sets the blur in voxels).
        hu: Ideal tissue HU, float32 ``(W, H, D)``.
        scanner: ``psf_mm`` (Gaussian sigma) and ``noise_hu`` (noise sigma).

    Returns:
        int16 HU ``(W, H, D)``, clipped to the NIfTI CT range.
    """
    # A voxel averages its extent (box of width `spacing`, sigma ~0.3 voxel) on top of the PSF.
    sigma = np.sqrt((scanner["psf_mm"] / grid.spacing) ** 2 + 0.3**2)
    image = ndimage.gaussian_filter(hu, sigma, mode="nearest")
    image += rng.standard_normal(hu.shape, dtype=np.float32) * np.float32(scanner["noise_hu"])
    return np.clip(np.rint(image), *_HU_RANGE).astype(np.int16)


def store_case(
    scene: Scene,
    image: np.ndarray,
    tissue: np.ndarray,
    affine: np.ndarray,
    tumor_free: bool,
    lesion_ids: np.ndarray | None = None,
) -> Phantom:
    """The stored case: labels from the tissues, and LPS storage where the scene says so.

    Args:
        scene: The case's scene (its ``lps``).
        image: Scanned HU, int16 ``(W, H, D)``, RAS.
        tissue: Tissue ids, uint8 ``(W, H, D)``, RAS.
        affine: Voxel-to-scanner matrix of the RAS arrays, mm.
        tumor_free: Whether no tumor is in this scan.
        lesion_ids: Lesion id per voxel, uint8 ``(W, H, D)``, RAS, or ``None``.
    """
    shape = image.shape
    label = np.full(shape, BACKGROUND, dtype=np.uint8)
    label[tissue == TISSUES.index("liver")] = LIVER
    label[tissue == TISSUES.index("tumor")] = TUMOR
    arrays = [image, label, tissue] + ([] if lesion_ids is None else [lesion_ids])
    if scene.lps:
        arrays = [a[::-1, ::-1, :].copy() for a in arrays]
        flip = _LPS_FLIP.copy()
        flip[:2, 3] = [shape[0] - 1, shape[1] - 1]
        affine = affine @ flip
    image, label, tissue = arrays[:3]
    ids = arrays[3] if lesion_ids is not None else None
    return Phantom(image, label, affine, tissue, scene.lps, tumor_free, ids)
