"""Liver lesions of a phantom: drawn (sizes, places, contrast kinds), then painted (lobulated, soft
margins), as two steps so a follow-up can paint lesions it chose itself."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.special import expit

from liverseg.phantoms.anatomy import Anatomy
from liverseg.phantoms.grid import TISSUE_CODE, Grid, smooth_field, smooth_field_at, texture

MAX_TUMORS = 12
TUMOR_RADIUS_MM = (2.0, 30.0)
# The first lesion of a tumor case is at least this big, so every tumor case shows one (Task03's
# tumor cases all have labeled tumor); the others follow the full log-uniform range.
FIRST_TUMOR_MIN_MM = 8.0
# Kind -> (share of lesions, core contrast to the liver in HU, drawn uniformly). Calibrated on
# portal-venous CT, where most tumors are 20-60 HU darker than the liver (one LiTS case: liver
# 118 +- 22 HU, tumor 70 +- 23 HU) and hyperdense ones are few; measured by
# ``liverseg.phantoms.statistics`` (``python benchmarks/phantoms.py --lesions``).
KINDS = {
    "hypodense": (0.75, (-70.0, -25.0)),
    "subtle": (0.14, (-24.0, -10.0)),
    "hyperdense": (0.03, (15.0, 40.0)),
    "rim": (0.08, (-55.0, -25.0)),
}
# An enhancing rim is a few mm thick whatever the lesion's size, from iso- to mildly hyperdense.
RIM_MM = (1.5, 3.5)
RIM_HU = (-5.0, 25.0)
# Below this radius a rim would be the whole lesion: a drawn "rim" lesion is painted hypodense.
RIM_MIN_RADIUS_MM = 8.0
# Lesions over this radius have a darker (necrotic) centre.
NECROSIS_MIN_RADIUS_MM = 12.0
_KIND_NAMES = tuple(KINDS)
_KIND_P = tuple(share for share, _ in KINDS.values())
# Half width, in radii, of the lattice of a seeded lesion's lobulation (its box: ~2.3 radii).
_UNIT_BOX = 3.0


@dataclass(frozen=True)
class Lesion:
    """One lesion to paint, in the case's patient frame.

    Attributes:
        centre_mm: Centre ``(x, y, z)``, mm.
        radius_mm: Radius, mm (the margin's ``d = 1``).
        kind: A key of :data:`KINDS`.
        looks: Five uniform draws in [0, 1) (see :func:`lesion_profile`).
        seed: ``None``: its lobulation and grain come from the stream given to
            :func:`paint_lesions`, in turn. Else from its own stream with this seed, lobulation
            fixed in units of the radius: the same seed at another radius gives the same shape,
            scaled (a lesion that grew or shrank between two scans).
    """

    centre_mm: np.ndarray
    radius_mm: float
    kind: str
    looks: np.ndarray
    seed: int | None = None


def paint_tumors(rng: np.random.Generator, grid: Grid, an: Anatomy, hu, tissue) -> None:
    """Paint 1-12 lesions into the liver; their voxels become ``tumor`` (never outside the liver).

    Radii are log-uniform in 2-30 mm (shrunk to what fits); ~30% straddle the liver surface and
    are cut by it. Contrasts (:data:`KINDS`): mostly 25-70 HU darker than the liver (larger ones
    with a darker centre), some 10-24 darker, a few brighter, some with a rim of a few mm
    (:data:`RIM_MM`) around a dark core; margins are soft, so blur and partial volume leave
    about 35 HU on the scanned image (:mod:`liverseg.phantoms.statistics`).

    Args:
        rng: The tumor stream (independent of the anatomy's).
        grid: The case's grid.
        an: The case's anatomy (liver HU).
        hu: Ideal HU, float32 ``(W, H, D)``, changed in place.
        tissue: Tissue ids, uint8 ``(W, H, D)``, changed in place.
    """
    paint_lesions(rng, grid, an, hu, tissue, draw_lesions(rng, grid, tissue))


def draw_lesions(rng: np.random.Generator, grid: Grid, tissue: np.ndarray) -> list[Lesion]:
    """The lesions :func:`paint_tumors` paints: count, radii, kinds, looks and places.

    Args:
        rng: The tumor stream; :func:`paint_lesions` then continues it.
        grid: The case's grid.
        tissue: Tissue ids of the tumor-free case, uint8 ``(W, H, D)``.

    Returns:
        1-12 lesions, or none where the grid holds no liver.
    """
    count = min(MAX_TUMORS, int(rng.geometric(0.3)))
    lo, hi = np.log(TUMOR_RADIUS_MM)
    radii = np.exp(rng.uniform(lo, hi, MAX_TUMORS))
    radii[0] = np.exp(rng.uniform(np.log(FIRST_TUMOR_MIN_MM), hi))
    kinds = rng.choice(len(KINDS), MAX_TUMORS, p=_KIND_P)
    at_edge = rng.random(MAX_TUMORS) < 0.3
    where = rng.random(MAX_TUMORS)
    looks = rng.random((MAX_TUMORS, 5))
    bbox, distance = liver_depth(grid, tissue)
    if bbox is None:
        return []
    lesions = []
    for k in range(count):
        centre, radius = _place_tumor(grid, bbox, distance, radii[k], at_edge[k], where[k])
        lesions.append(Lesion(centre, radius, _KIND_NAMES[kinds[k]], looks[k]))
    return lesions


def liver_depth(grid: Grid, tissue: np.ndarray):
    """The liver's bounding box and each of its voxels' distance (mm) to the nearest non-liver.

    Returns:
        ``(bbox, distance)``: a tuple of three slices and float64 distances over that box (0
        outside the liver); ``(None, None)`` where there is no liver voxel.
    """
    found = ndimage.find_objects((tissue == TISSUE_CODE["liver"]).astype(np.uint8))
    if not found or found[0] is None:
        return None, None
    bbox = found[0]
    distance = ndimage.distance_transform_edt(
        tissue[bbox] == TISSUE_CODE["liver"], sampling=grid.spacing
    )
    return bbox, distance


def paint_lesions(rng, grid: Grid, an: Anatomy, hu, tissue, lesions) -> list:
    """Paint lesions in turn (a later one wins where two overlap); only liver voxels change.

    Args:
        rng: Stream of the lobulation and grain of lesions without a ``seed`` (``None`` where
            every lesion has one).
        grid: The case's grid.
        an: The case's anatomy (liver HU).
        hu: Ideal HU, float32 ``(W, H, D)``, changed in place.
        tissue: Tissue ids, uint8 ``(W, H, D)``, changed in place.
        lesions: The :class:`Lesion` s, in painting order.

    Returns:
        Per lesion, ``(slices, mask)``: the voxels it made ``tumor`` (``mask`` bool over the
        box ``slices``), or ``None`` where it lies outside the grid.
    """
    return [_paint_tumor(rng, grid, an, hu, tissue, lesion) for lesion in lesions]


def _place_tumor(grid, bbox, distance, radius, at_edge, where):
    """Centre (mm) and radius: inside with room for the radius, or near the surface."""
    if at_edge:
        candidates = np.flatnonzero(
            (distance > 0) & (distance <= max(0.5 * radius, grid.spacing.min()))
        )
    else:
        radius = min(radius, 0.9 * float(distance.max()))
        candidates = np.flatnonzero(distance >= radius)
    if candidates.size == 0:
        candidates = np.flatnonzero(distance >= 0.9 * distance.max())
    index = np.unravel_index(candidates[int(where * candidates.size)], distance.shape)
    centre = [float(ax[s.start + i]) for ax, s, i in zip(grid.axes, bbox, index)]
    return np.array(centre), float(radius)


def _paint_tumor(rng, grid, an, hu, tissue, lesion: Lesion):
    """One lobulated lesion with a soft margin; only liver voxels change."""
    centre, radius = lesion.centre_mm, lesion.radius_mm
    ext = lesion_extent_mm(lesion, grid.spacing)
    sl, points = grid.box(centre - ext, centre + ext)
    if sl is None:
        return None
    if lesion.seed is None:
        coords = [ax[s] for ax, s in zip(grid.axes, sl)]
        lobes = smooth_field(rng, coords, centre - ext, centre + ext, max(0.6 * radius, 2.0))
    else:
        rng, lobes = np.random.default_rng(lesion.seed), None
    return sl, _paint_box(rng, grid.spacing, an, hu[sl], tissue[sl], lesion, points, lobes)


def lesion_extent_mm(lesion: Lesion, spacing_mm) -> np.ndarray:
    """Half size ``(x, y, z)`` of the box a lesion is painted in, mm (its margin and more)."""
    return 1.3 * lesion.radius_mm + 2 + np.asarray(spacing_mm)


def paint_lesion_at(spacing_mm, an: Anatomy, hu, tissue, lesion: Lesion, points) -> np.ndarray:
    """Paint a seeded lesion into voxels whose patient-frame positions are given, one by one.

    For a scan whose voxels are not the case's grid (a follow-up, moved and breathing): the
    lesion is sampled where each voxel lies in the patient, not resampled from another grid.

    Args:
        spacing_mm: The voxels' spacing ``(x, y, z)``, mm (the scale of the lesion's grain).
        an: The case's anatomy (liver HU).
        hu: Ideal HU of a box of voxels, float32 ``(w, h, d)``, changed in place.
        tissue: Their tissue ids, uint8 ``(w, h, d)``, changed in place.
        lesion: A :class:`Lesion` with a ``seed``.
        points: The voxels' patient-frame ``(X, Y, Z)``, mm, three float arrays ``(w, h, d)``.

    Returns:
        bool ``(w, h, d)``: the voxels it made ``tumor``.
    """
    rng = np.random.default_rng(lesion.seed)
    return _paint_box(rng, np.asarray(spacing_mm), an, hu, tissue, lesion, points, None)


def _paint_box(rng, spacing, an, region, region_t, lesion: Lesion, points, lobes) -> np.ndarray:
    """Paint ``lesion`` into a box's HU and tissue views; ``lobes`` ``None``: its own (seeded)."""
    centre, radius, looks = lesion.centre_mm, lesion.radius_mm, lesion.looks
    X, Y, Z = points
    if lobes is None:
        units = [(c - c0) / radius for c, c0 in zip(np.broadcast_arrays(X, Y, Z), centre)]
        lobes = smooth_field_at(rng, units, (-_UNIT_BOX,) * 3, (_UNIT_BOX,) * 3, 0.6)
    d = np.sqrt((X - centre[0]) ** 2 + (Y - centre[1]) ** 2 + (Z - centre[2]) ** 2) / radius
    d = d + 0.12 * looks[0] * lobes
    profile = lesion_profile(lesion.kind, radius, d, looks)
    grain = texture(rng, d.shape, 1.5 / spacing)
    softness = 0.04 + 0.11 * looks[3]
    weight = expit((1 - d) / softness)
    liver = (region_t == TISSUE_CODE["liver"]) | (region_t == TISSUE_CODE["tumor"])
    lesion_hu = an.hu["liver"] + profile + (4 + 6 * looks[4]) * grain
    region[liver] = ((1 - weight) * region + weight * lesion_hu)[liver]
    painted = liver & (d <= 1)
    region_t[painted] = TISSUE_CODE["tumor"]
    return painted


def lesion_profile(kind: str, radius_mm: float, d: np.ndarray, looks: np.ndarray) -> np.ndarray:
    """A lesion's HU against its liver, by normalised distance from its centre.

    Args:
        kind: A key of :data:`KINDS`. A ``"rim"`` lesion under :data:`RIM_MIN_RADIUS_MM` is
            painted ``"hypodense"``.
        radius_mm: The lesion's radius, mm.
        d: Distance from the centre over the radius (1 on the margin), float32, any shape.
        looks: The lesion's five uniform draws in [0, 1): lobulation, core contrast, rim HU (or
            necrosis depth), margin softness (and rim width), grain.

    Returns:
        float32 HU to add to the liver's, shape of ``d``; the margin's softness is not in it.
    """
    if kind == "rim" and radius_mm < RIM_MIN_RADIUS_MM:
        kind = "hypodense"
    lo, hi = KINDS[kind][1]
    core = hi + (lo - hi) * looks[1]
    profile = np.full(d.shape, core, np.float32)
    if kind == "rim":
        rim_hu = RIM_HU[0] + (RIM_HU[1] - RIM_HU[0]) * looks[2]
        rim_mm = RIM_MM[0] + (RIM_MM[1] - RIM_MM[0]) * looks[3]
        depth_mm = (1 - d) * radius_mm
        profile += (rim_hu - core) * expit((rim_mm - depth_mm) / 0.5)
    if kind == "hypodense" and radius_mm > NECROSIS_MIN_RADIUS_MM:
        profile -= (10 + 20 * looks[2]) * expit((0.45 - d) / 0.08)
    return profile
