"""A follow-up pair: two scans of one phantom patient, with the truth of what changed.

The baseline is case ``seed``'s scene (anatomy, field of view, noise as in ``render_case``) with
the lesions of :mod:`liverseg.phantoms.changes`. The follow-up has the same anatomy, resampled
from the baseline's grid at its own voxels through the patient's motion
(:mod:`liverseg.phantoms.motion`), and each lesion stable, grown, shrunk, gone or new, painted
where its voxels lie in the patient (not resampled, so a stable lesion keeps its volume to
within voxelisation); then its own scanner noise. Each scan keeps a lesion-id map; the truth is
measured on those maps, in each scan's own scanner coordinates.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from liverseg.errors import LiversegError
from liverseg.phantoms.case import (
    FOV_XY_MM,
    FOV_Z_MM,
    STREAMS,
    Phantom,
    Scene,
    checked_shape,
    draw_scene,
    scan,
    store_case,
)
from liverseg.phantoms.changes import LesionChange, plan_changes
from liverseg.phantoms.motion import Motion, baseline_points, draw_motion, resample_followup
from liverseg.phantoms.tumors import lesion_extent_mm, paint_lesion_at, paint_lesions

# Coarser voxels would need lesions so large that few fit in a liver.
FOLLOWUP_MAX_SPACING_MM = 8.0
MIN_LESION_VOXELS = 8
MAX_ATTEMPTS = 25


def check_followup_shape(shape, fov_mm=None) -> tuple[int, int, int]:
    """``shape`` as three ints, fine enough for a follow-up pair, or a LiversegError.

    Args:
        shape: Voxels ``(W, H, D)``.
        fov_mm: The field of view, mm; ``None``: the largest a case may draw.
    """
    shape = checked_shape(shape)
    largest = (FOV_XY_MM[1], FOV_XY_MM[1], FOV_Z_MM[1])
    fov = np.asarray(largest if fov_mm is None else fov_mm, dtype=float)
    spacing = fov / np.asarray(shape)
    if spacing.max() > FOLLOWUP_MAX_SPACING_MM:
        needed = " ".join(str(int(np.ceil(f / FOLLOWUP_MAX_SPACING_MM))) for f in fov)
        raise LiversegError(
            f"follow-up phantoms need voxels of at most {FOLLOWUP_MAX_SPACING_MM:g} mm, so every "
            f"lesion spans >= {MIN_LESION_VOXELS} voxels; shape {shape} gives up to "
            f"{spacing.max():.1f} mm: expected --shape of at least {needed}"
        )
    return shape


def render_followup(
    shape: tuple[int, int, int] = (96, 96, 64),
    seed: int = 0,
    *,
    tumor_free: bool | None = None,
    lps: bool | None = None,
    fov_mm: tuple[float, float, float] | None = None,
    case_id: str | None = None,
) -> tuple[Phantom, Phantom, dict]:
    """Draw a baseline and its follow-up, with the truth of their lesions.

    Args:
        shape: Voxels ``(W, H, D)`` of both scans; at most ``FOLLOWUP_MAX_SPACING_MM`` a voxel.
        seed: As in ``render_case``: the same anatomy, field of view, orientation and baseline
            noise; the lesions differ (every one spans many voxels).
        tumor_free: ``None``: drawn as in ``render_case``; ``True``: no baseline lesion (the
            follow-up may still have new ones).
        lps: As in ``render_case``; both scans are stored the same way.
        fov_mm: As in ``render_case``.
        case_id: The truth's ``"case"`` (``write_dataset`` gives ``"liver_N"``).

    Returns:
        ``(baseline, followup, truth)``: both :class:`Phantom` s carry ``lesion_ids``; the
        truth is a JSON-ready dict (see ``docs/cli.md``, ``liverseg phantoms --followup``).

    Raises:
        LiversegError: The shape is not allowed (too small or too coarse), or no lesions
            meeting the rules could be drawn.
    """
    check_followup_shape(shape, fov_mm)
    scene = draw_scene(shape, seed, tumor_free=tumor_free, lps=lps, fov_mm=fov_mm)
    # Two more streams after the case's own: the motion, and the follow-up's scanner noise.
    motion_rng, noise_rng = (
        np.random.default_rng(s)
        for s in np.random.SeedSequence(int(seed)).spawn(len(STREAMS) + 2)[len(STREAMS) :]
    )
    base_affine = scene.affine()
    motion = draw_motion(
        motion_rng, base_affine, scene.grid.shape,
        scene.anatomy.domes[0] + scene.world_offset_mm[2], scene.world_offset_mm[:2],
    )  # fmt: skip
    follow_affine = scene.affine(motion.fov_shift_mm)
    changes, arrays = _draw_lesions(scene, motion, follow_affine, seed)
    pair = []
    for (hu, tissue, id_map), rng, affine in zip(
        arrays, (scene.streams["scanner"], noise_rng), (base_affine, follow_affine)
    ):
        image = scan(rng, scene.grid, hu, scene.anatomy.scanner)
        pair.append(store_case(scene, image, tissue, affine, not id_map.any(), id_map))
    return pair[0], pair[1], followup_truth(changes, motion, *pair, case_id=case_id)


def _draw_lesions(scene: Scene, motion: Motion, follow_affine, seed):
    """The pair's lesions, drawn again until they meet the rules, and both scans' ideal arrays.

    Returns:
        ``(changes, ((hu, tissue, lesion_ids), (hu, tissue, lesion_ids)))``, baseline first,
        RAS arrays before the scan.
    """
    moved_hu, moved_tissue = resample_followup(
        motion, scene.affine(), follow_affine, [scene.hu], [scene.tissue]
    )
    for _ in range(MAX_ATTEMPTS):
        changes = plan_changes(scene.streams["tumors"], scene.grid, scene.tissue, scene.tumor_free)
        ids = [c.id for c in changes]
        base = _paint(scene, [c.baseline for c in changes], ids)
        follow = _paint_moved(
            scene, motion, follow_affine, (moved_hu[0], moved_tissue[0]),
            [c.followup for c in changes], ids,
        )  # fmt: skip
        if _meets_rules(changes, base[2], follow[2], scene.tumor_free):
            return changes, (base, follow)
    raise LiversegError(
        f"follow-up phantom {seed} at shape {scene.grid.shape}: no lesions meeting the rules "
        f"in {MAX_ATTEMPTS} draws; try another --seed or a finer --shape"
    )


def _paint(scene: Scene, lesions, ids) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(hu, tissue, lesion_ids)`` of the scene with ``lesions`` (``None``: absent)."""
    hu, tissue = scene.hu.copy(), scene.tissue.copy()
    id_map = np.zeros(tissue.shape, np.uint8)
    present = [(lesion, k) for lesion, k in zip(lesions, ids) if lesion is not None]
    painted = paint_lesions(None, scene.grid, scene.anatomy, hu, tissue, [p for p, _ in present])
    for where, (_, k) in zip(painted, present):
        if where is not None:
            id_map[where[0]][where[1]] = k
    return hu, tissue, id_map


def _paint_moved(scene: Scene, motion: Motion, affine, anatomy, lesions, ids):
    """``(hu, tissue, lesion_ids)`` of the follow-up: ``lesions`` sampled where its voxels lie.

    Args:
        anatomy: The follow-up's tumor-free ``(hu, tissue)``, resampled from the scene.
        affine: The follow-up's voxel-to-scanner matrix (RAS arrays), mm.
    """
    hu, tissue = (a.copy() for a in anatomy)
    id_map = np.zeros(tissue.shape, np.uint8)
    spacing = scene.grid.spacing
    for lesion, k in zip(lesions, ids):
        if lesion is None:
            continue
        centre = motion.to_followup((lesion.centre_mm + scene.world_offset_mm)[None])[0]
        centre = np.linalg.solve(affine[:3, :3], centre - affine[:3, 3])
        # The lesion's box, widened for the rotation, in follow-up voxels.
        half = 1.15 * lesion_extent_mm(lesion, spacing) / spacing + 1
        lo = np.clip(np.floor(centre - half), 0, tissue.shape).astype(int)
        hi = np.clip(np.ceil(centre + half) + 1, 0, tissue.shape).astype(int)
        if np.any(hi <= lo):
            continue
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        points = baseline_points(motion, affine, box) - scene.world_offset_mm[:, None, None, None]
        painted = paint_lesion_at(spacing, scene.anatomy, hu[box], tissue[box], lesion, points)
        id_map[box][painted] = k
    return hu, tissue, id_map


def _meets_rules(changes: list[LesionChange], base_ids, follow_ids, tumor_free: bool) -> bool:
    """Every lesion where it should be with >= MIN_LESION_VOXELS voxels, one component each."""
    if not tumor_free and not any(c.baseline is not None for c in changes):
        return False
    for ids, side in ((base_ids, "baseline"), (follow_ids, "followup")):
        counts = np.bincount(ids.ravel(), minlength=len(changes) + 1)
        for change in changes:
            wanted = getattr(change, side) is not None
            if counts[change.id] < MIN_LESION_VOXELS if wanted else counts[change.id] > 0:
                return False
        components, count = ndimage.label(ids > 0, structure=np.ones((3, 3, 3)))
        pairs = np.unique(np.stack([components[ids > 0], ids[ids > 0]]), axis=1)
        if pairs.shape[1] != count or count != np.count_nonzero(counts[1:]):
            return False
    return True


def followup_truth(
    changes: list[LesionChange],
    motion: Motion,
    baseline: Phantom,
    followup: Phantom,
    case_id: str | None = None,
) -> dict:
    """The truth of a pair, measured on each scan's lesion-id map and affine.

    Returns:
        ``{"case", "motion": {"rotation_deg", "translation_mm", "breathing_mm"}, "lesions":
        [{"id", "status", "baseline", "followup"}], "tumor_burden_ml": {"baseline",
        "followup"}}``; a scan's lesion entry is ``{"centroid_mm", "volume_ml", "voxels"}`` or
        ``None`` where the lesion is absent from it.
    """
    lesions = [
        {
            "id": change.id,
            "status": change.status,
            "baseline": _measure(baseline, change.id),
            "followup": _measure(followup, change.id),
        }
        for change in changes
    ]
    burden = {
        side: round(_voxel_ml(scan_) * sum(e[side]["voxels"] for e in lesions if e[side]), 4)
        for side, scan_ in (("baseline", baseline), ("followup", followup))
    }
    return {
        "case": case_id,
        "motion": {
            "rotation_deg": [float(v) for v in motion.rotation_deg],
            "translation_mm": [float(v) for v in motion.translation_mm],
            "breathing_mm": float(motion.breathing_mm),
        },
        "lesions": lesions,
        "tumor_burden_ml": burden,
    }


def _measure(scan_: Phantom, lesion_id: int) -> dict | None:
    """Centroid (scanner mm), volume (mL) and voxel count of one lesion in one scan."""
    voxels = np.argwhere(scan_.lesion_ids == lesion_id)
    if not len(voxels):
        return None
    affine = scan_.affine
    centroid = affine[:3, :3] @ voxels.mean(0) + affine[:3, 3]
    return {
        "centroid_mm": [round(float(v), 3) for v in centroid],
        "volume_ml": round(len(voxels) * _voxel_ml(scan_), 4),
        "voxels": int(len(voxels)),
    }


def _voxel_ml(scan_: Phantom) -> float:
    return abs(float(np.linalg.det(scan_.affine[:3, :3]))) / 1000.0
