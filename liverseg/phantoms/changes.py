"""The lesions of a follow-up pair: each baseline lesion's fate, new lesions, and their places.

Every lesion of a pair is big enough to span many voxels (:func:`min_radius_mm`), lies inside
the liver with room for its larger radius, away from the field of view's faces, and at least
:data:`GAP_MM` from every other lesion of either scan, so lesions never merge or split.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from liverseg.phantoms.grid import Grid
from liverseg.phantoms.tumors import KINDS, Lesion, liver_depth

# Status -> (share of baseline lesions, radius factor at follow-up).
STATUSES = {
    "stable": (0.35, 1.0),
    "growing": (0.3, 1.35),
    "shrinking": (0.2, 0.55),
    "disappeared": (0.15, 0.0),
}
# Each lesion's radius factor is its status's times a uniform draw in 1 +- this.
FACTOR_SPREAD = 0.03
MAX_BASELINE_LESIONS = 4
# Shares of follow-ups with 0, 1 and 2 new lesions.
NEW_LESION_SHARES = (0.5, 0.3, 0.2)
NEW_RADIUS_MM = (6.0, 15.0)
BASELINE_RADIUS_MM = (6.0, 18.0)
# Radii are at least this, and at least MIN_RADIUS_VOXELS voxels (geometric mean spacing).
MIN_RADIUS_MM = 6.0
MIN_RADIUS_VOXELS = 1.5
GAP_MM = 10.0
# Lobulation moves a margin out by up to about this factor of the radius.
EXTENT = 1.2
# Distance (mm) from the field of view's faces, so the follow-up's motion keeps every lesion.
EDGE_MM = 20.0
_KIND_NAMES = tuple(KINDS)
_KIND_P = tuple(share for share, _ in KINDS.values())
_STATUS_NAMES = tuple(STATUSES)
_STATUS_P = tuple(share for share, _ in STATUSES.values())


@dataclass(frozen=True)
class LesionChange:
    """One lesion of a pair: its id, status, and how it is painted in each scan (or absent)."""

    id: int
    status: str
    baseline: Lesion | None
    followup: Lesion | None


@dataclass(frozen=True)
class _Draft:
    status: str
    radii_mm: tuple[float, float]  # baseline, follow-up; 0 where absent
    kind: str
    looks: np.ndarray
    seed: int
    where: float

    @property
    def room_mm(self) -> float:
        return EXTENT * max(self.radii_mm)


def min_radius_mm(grid: Grid) -> float:
    """Smallest lesion radius of a pair on ``grid``: 6 mm, or 1.5 voxels where they are larger."""
    return max(MIN_RADIUS_MM, MIN_RADIUS_VOXELS * float(np.prod(grid.spacing)) ** (1 / 3))


def plan_changes(
    rng: np.random.Generator, grid: Grid, tissue: np.ndarray, tumor_free: bool
) -> list[LesionChange]:
    """Draw and place the lesions of a pair; ids count from 1, baseline lesions first.

    Args:
        rng: The tumor stream.
        grid: The baseline's grid.
        tissue: Tumor-free tissue ids, uint8 ``(W, H, D)``.
        tumor_free: Whether the baseline has no lesion (the follow-up may have new ones).

    Returns:
        The changes; a lesion that found no place is left out (a tumor case may so end up
        without a baseline lesion: the caller draws again).
    """
    r_min = min_radius_mm(grid)
    count = 0 if tumor_free else min(MAX_BASELINE_LESIONS, int(rng.geometric(0.45)))
    drafts = [_draw_baseline_lesion(rng, r_min) for _ in range(count)]
    new = int(rng.choice(len(NEW_LESION_SHARES), p=NEW_LESION_SHARES))
    drafts += [_draw_new_lesion(rng, r_min) for _ in range(new)]
    bbox, depth = liver_depth(grid, tissue)
    if bbox is None:
        return []
    centres = _place(grid, bbox, depth, drafts)
    changes = []
    for draft, centre in zip(drafts, centres):
        if centre is None:
            continue
        base, follow = (
            Lesion(centre, r, draft.kind, draft.looks, draft.seed) if r > 0 else None
            for r in draft.radii_mm
        )
        changes.append(LesionChange(len(changes) + 1, draft.status, base, follow))
    return changes


def _draw_baseline_lesion(rng, r_min: float) -> _Draft:
    """A baseline lesion's status and radii: both radii >= ``r_min`` where present."""
    status = _STATUS_NAMES[rng.choice(len(STATUSES), p=_STATUS_P)]
    factor = STATUSES[status][1] * rng.uniform(1 - FACTOR_SPREAD, 1 + FACTOR_SPREAD)
    lo = r_min / factor if 0 < factor < 1 else r_min
    hi = max(BASELINE_RADIUS_MM[1], 2 * r_min)
    radius = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
    return _draft(rng, status, (radius, factor * radius))


def _draw_new_lesion(rng, r_min: float) -> _Draft:
    lo = max(NEW_RADIUS_MM[0], r_min)
    return _draft(rng, "new", (0.0, float(rng.uniform(lo, max(NEW_RADIUS_MM[1], lo)))))


def _draft(rng, status: str, radii_mm) -> _Draft:
    kind = _KIND_NAMES[rng.choice(len(KINDS), p=_KIND_P)]
    seed = int(rng.integers(2**63))
    radii = tuple(float(r) for r in radii_mm)
    return _Draft(status, radii, kind, rng.random(5), seed, rng.random())


def _place(grid: Grid, bbox, depth: np.ndarray, drafts: list[_Draft]) -> list:
    """Each draft's centre (mm), the roomiest first, or ``None`` where none fits.

    A centre lies ``room`` deep in the liver (else at least its larger radius), ``room`` plus
    :data:`EDGE_MM` from the field of view's faces, and ``room + room' + GAP_MM`` from every
    centre placed before.
    """
    inside = np.flatnonzero(depth > 0)
    index = np.unravel_index(inside, depth.shape)
    points = np.stack([ax[s.start + i] for ax, s, i in zip(grid.axes, bbox, index)], axis=1)
    points = points.astype(float)
    depths = depth.ravel()[inside]
    centres: list = [None] * len(drafts)
    placed: list[tuple[np.ndarray, float]] = []
    for k in sorted(range(len(drafts)), key=lambda k: -drafts[k].room_mm):
        room = drafts[k].room_mm
        margin = room + EDGE_MM
        free = np.all((points >= grid.lo + margin) & (points <= grid.hi - margin), axis=1)
        for centre, other in placed:
            free &= np.linalg.norm(points - centre, axis=1) >= room + other + GAP_MM
        for needed in (room, max(drafts[k].radii_mm)):
            candidates = np.flatnonzero(free & (depths >= needed))
            if candidates.size:
                centres[k] = points[candidates[int(drafts[k].where * candidates.size)]]
                placed.append((centres[k], room))
                break
    return centres
