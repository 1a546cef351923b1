"""Liver lesions of a phantom: sizes, placement, contrast kinds and soft margins."""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.special import expit

from liverseg.phantoms.anatomy import Anatomy
from liverseg.phantoms.grid import TISSUE_CODE, Grid, smooth_field, texture

MAX_TUMORS = 12
TUMOR_RADIUS_MM = (2.0, 30.0)
# The first lesion of a tumor case is at least this big, so every tumor case shows one (Task03's
# tumor cases all have labeled tumor); the others follow the full log-uniform range.
FIRST_TUMOR_MIN_MM = 8.0
_KINDS = ("hypodense", "subtle", "hyperdense", "rim")
_KIND_P = (0.6, 0.15, 0.1, 0.15)


def paint_tumors(rng: np.random.Generator, grid: Grid, an: Anatomy, hu, tissue) -> None:
    """Paint 1-12 lesions into the liver; their voxels become ``tumor`` (never outside the liver).

    Radii are log-uniform in 2-30 mm (shrunk to what fits); ~30% straddle the liver surface and
    are cut by it. Contrasts: mostly 20-60 HU darker, some 10-20 darker, some brighter, some with
    a bright rim around a dark core; margins are soft.

    Args:
        rng: The tumor stream (independent of the anatomy's).
        grid: The case's grid.
        an: The case's anatomy (liver HU).
        hu: Ideal HU, float32 ``(W, H, D)``, changed in place.
        tissue: Tissue ids, uint8 ``(W, H, D)``, changed in place.
    """
    count = min(MAX_TUMORS, int(rng.geometric(0.3)))
    lo, hi = np.log(TUMOR_RADIUS_MM)
    radii = np.exp(rng.uniform(lo, hi, MAX_TUMORS))
    radii[0] = np.exp(rng.uniform(np.log(FIRST_TUMOR_MIN_MM), hi))
    kinds = rng.choice(len(_KINDS), MAX_TUMORS, p=_KIND_P)
    at_edge = rng.random(MAX_TUMORS) < 0.3
    where = rng.random(MAX_TUMORS)
    looks = rng.random((MAX_TUMORS, 5))
    found = ndimage.find_objects((tissue == TISSUE_CODE["liver"]).astype(np.uint8))
    if not found or found[0] is None:
        return
    bbox = found[0]
    distance = ndimage.distance_transform_edt(
        tissue[bbox] == TISSUE_CODE["liver"], sampling=grid.spacing
    )
    for k in range(count):
        centre, radius = _place_tumor(grid, bbox, distance, radii[k], at_edge[k], where[k])
        _paint_tumor(rng, grid, an, hu, tissue, centre, radius, _KINDS[kinds[k]], looks[k])


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


def _paint_tumor(rng, grid, an, hu, tissue, centre, radius, kind, looks) -> None:
    """One lobulated lesion with a soft margin; only liver voxels change."""
    ext = 1.3 * radius + 2 + grid.spacing
    sl, (X, Y, Z) = grid.box(centre - ext, centre + ext)
    if sl is None:
        return
    coords = [ax[s] for ax, s in zip(grid.axes, sl)]
    lobes = smooth_field(rng, coords, centre - ext, centre + ext, max(0.6 * radius, 2.0))
    d = np.sqrt((X - centre[0]) ** 2 + (Y - centre[1]) ** 2 + (Z - centre[2]) ** 2) / radius
    d = d + 0.12 * looks[0] * lobes
    core = {
        "hypodense": -20 - 40 * looks[1],
        "subtle": -10 - 10 * looks[1],
        "hyperdense": 15 + 25 * looks[1],
        "rim": -20 - 30 * looks[1],
    }[kind]
    profile = np.full(d.shape, core, np.float32)
    if kind == "rim":
        profile += (20 + 30 * looks[2] - core) * expit((d - 0.75) / 0.06)
    if kind == "hypodense" and radius > 12:
        profile -= (10 + 20 * looks[2]) * expit((0.45 - d) / 0.08)
    grain = texture(rng, d.shape, 1.5 / grid.spacing)
    softness = 0.04 + 0.11 * looks[3]
    weight = expit((1 - d) / softness)
    region_t = tissue[sl]
    liver = (region_t == TISSUE_CODE["liver"]) | (region_t == TISSUE_CODE["tumor"])
    lesion = an.hu["liver"] + profile + (4 + 6 * looks[4]) * grain
    region = hu[sl]
    region[liver] = ((1 - weight) * region + weight * lesion)[liver]
    region_t[liver & (d <= 1)] = TISSUE_CODE["tumor"]
