"""Organ painters: each paints HU and a tissue id into the case arrays; later painters win."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import expit

from liverseg.phantoms.anatomy import Anatomy
from liverseg.phantoms.grid import (
    TISSUE_CODE,
    Grid,
    ellipsoid,
    put_tissue,
    segment_distance,
    smooth_max,
    texture,
)


@dataclass
class _Canvas:
    grid: Grid
    an: Anatomy
    hu: np.ndarray  # float32 (W, H, D) ideal HU
    tissue: np.ndarray  # uint8 (W, H, D) index into TISSUES
    cavity: np.ndarray  # float32 (W, H, D) superellipse value of the cavity outline (<= 1 inside)
    diaphragm: np.ndarray  # float32 (W, H, 1) diaphragm height in mm


def paint_anatomy(rng: np.random.Generator, grid: Grid, an: Anatomy):
    """Paint the whole tumor-free abdomen. Returns ``(hu float32, tissue uint8)``, ``(W, H, D)``."""
    streams = rng.spawn(9)
    sl, (X, Y, Z) = grid.full()
    shape_field = 1 + 0.04 * grid.field(streams[0], 60.0, sl)
    canvas = _Canvas(
        grid, an, np.full(grid.shape, AIR_HU, np.float32), np.zeros(grid.shape, np.uint8),
        an.outline_power(X, Y, Z, an.fat_mm + an.muscle_mm, 0.6 * an.fat_mm + an.muscle_mm)
        * shape_field, an.diaphragm_z(X, Y).astype(np.float32),
    )  # fmt: skip
    _paint_wall(canvas, streams[0], shape_field)
    _paint_thorax(canvas, streams[1])
    _paint_bowel(canvas, streams[2])
    _paint_stomach(canvas, streams[3])
    _paint_muscles_and_pancreas(canvas, streams[4])
    _paint_parenchyma(canvas, streams[5], "spleen", _spleen_distance(canvas, streams[5]))
    _paint_parenchyma(canvas, streams[6], "liver", _liver_distance(canvas, streams[6]))
    _paint_liver_vessels(canvas, streams[6])
    _paint_retroperitoneum(canvas, streams[7])
    _paint_bones(canvas, streams[8])
    return canvas.hu, canvas.tissue


AIR_HU = -1000.0


def _paint_wall(c: _Canvas, rng, shape_field) -> None:
    """Table, subcutaneous fat, muscle wall, and the cavity's fat with mesenteric strands."""
    an, hu = c.an, c.an.hu
    sl, (X, Y, Z) = c.grid.full()
    b_post = an.body[2]
    table_y = -b_post - 12 - 6e-4 * X**2 + 0 * Z
    table = (np.abs(Y - table_y) < 1.5) & (np.abs(X) < 0.45 * (c.grid.hi[0] - c.grid.lo[0]))
    put_tissue(c, sl, table, hu["table"], "table")
    put_tissue(c, sl, an.outline_power(X, Y, Z) * shape_field <= 1, hu["fat"], "fat")
    wall = an.outline_power(X, Y, Z, an.fat_mm, 0.6 * an.fat_mm) * shape_field <= 1
    put_tissue(c, sl, wall, hu["muscle"], "muscle")
    strands = expit(3 * (c.grid.field(rng, 12.0, sl) - 1.2))
    put_tissue(c, sl, c.cavity <= 1, hu["fat"] + (hu["muscle"] - hu["fat"]) * strands, "fat")


def _paint_thorax(c: _Canvas, rng) -> None:
    """Lung bases with their vessels above the diaphragm, the diaphragm muscle, the heart."""
    an, hu = c.an, c.an.hu
    lo = float(c.diaphragm.min()) - 5
    sl, (X, Y, Z) = c.grid.box(c.grid.lo[:2].tolist() + [lo], c.grid.hi)
    if sl is None:
        return
    cav, zd = c.cavity[sl] <= 1, c.diaphragm[sl[0], sl[1]]
    lung = cav & (Z > zd)
    f1, f2 = c.grid.field(rng, 14.0, sl), c.grid.field(rng, 14.0, sl)
    vessels = (np.abs(f1) < 0.1) & (np.abs(f2) < 0.1)
    put_tissue(c, sl, lung, hu["lung"] + 750 * vessels, "lung")
    put_tissue(c, sl, cav & (Z > zd - 4) & (Z <= zd), hu["muscle"], "muscle")
    centre, semi = an.heart
    put_tissue(c, sl, lung & (ellipsoid(X, Y, Z, centre, semi) <= 1), hu["heart"], "heart")


def _paint_bowel(c: _Canvas, rng) -> None:
    """Bowel loops (enhancing wall, fluid or mottled content, gas pockets) in mesenteric fat."""
    an, hu = c.an, c.an.hu
    sl, (X, Y, Z) = c.grid.box(c.grid.lo, c.grid.hi[:2].tolist() + [an.domes[0]])
    if sl is None:
        return
    belly = (c.cavity[sl] <= 1) & (Z < c.diaphragm[sl[0], sl[1]] - 4)
    loops = c.grid.field(rng, an.bowel_mm, sl)
    crowd = c.grid.field(rng, 50.0, sl)
    gas = c.grid.field(rng, 18.0, sl) + 0.6 * Y / an.cavity[1]
    mottle = texture(rng, loops.shape, 2.0 / c.grid.spacing)
    bowel = belly & (loops > 0.0) & (crowd > -0.5)
    lumen = bowel & (loops > 0.3)
    put_tissue(c, sl, bowel, hu["bowel_wall"], "bowel")
    content = np.where(gas > 1.2, AIR_HU, hu["fluid"] + 20 * np.maximum(mottle, 0))
    put_tissue(c, sl, lumen, content, "bowel")


def _paint_stomach(c: _Canvas, rng) -> None:
    """Stomach under the left dome: enhancing wall, fluid or food, gas floating anteriorly."""
    an, hu = c.an, c.an.hu
    centre, semi, level, food = an.stomach
    ext = 1.3 * np.asarray(semi)
    sl, (X, Y, Z) = c.grid.box(np.subtract(centre, ext), np.add(centre, ext))
    if sl is None:
        return
    r = ellipsoid(X, Y, Z, centre, semi) + 0.12 * c.grid.field(rng, 20.0, sl)
    inside = (r <= 1) & (c.cavity[sl] <= 1) & (Z < c.diaphragm[sl[0], sl[1]] - 4)
    lumen = inside & (r <= 1 - 4.0 / float(np.mean(semi)))
    put_tissue(c, sl, inside, hu["bowel_wall"], "stomach")
    mottle = texture(rng, r.shape, 2.0 / c.grid.spacing)
    content = hu["fluid"] + (40 + 30 * mottle if food else 0 * mottle)
    content = np.where(Y > centre[1] + level * semi[1], AIR_HU, content)
    if food:
        content = np.where(mottle > 1.6, AIR_HU, content)
    put_tissue(c, sl, lumen, content, "stomach")


def _paint_muscles_and_pancreas(c: _Canvas, rng) -> None:
    """Paraspinal muscles, psoas (growing below the kidneys), and the pancreas."""
    an, hu = c.an, c.an.hu
    sl, (X, Y, Z) = c.grid.full()
    spine_y, spine_r = an.spine[:2]
    body = c.tissue != TISSUE_CODE["air"]
    for side in (1, -1):
        para = ((X - side * (spine_r + 14)) / 26) ** 2 + ((Y - spine_y + spine_r + 24) / 24) ** 2
        put_tissue(c, sl, body & (para <= 1 + 0 * Z), hu["muscle"], "muscle")
        top = an.kidneys[0][0][2]
        radius = 22 * np.clip((top - Z) / 60 + 0.2, 0, 1)
        psoas = np.hypot(X - side * (spine_r + 16), Y - spine_y - 2) <= radius
        put_tissue(c, sl, psoas & (c.cavity <= 1), hu["muscle"], "muscle")
    p0, p1, p2, radius = an.pancreas
    lo = np.minimum(np.minimum(p0, p1), p2) - 20
    hi = np.maximum(np.maximum(p0, p1), p2) + 20
    sl, (X, Y, Z) = c.grid.box(lo, hi)
    if sl is None:
        return
    dist = np.minimum(segment_distance(X, Y, Z, p0, p1), segment_distance(X, Y, Z, p1, p2))
    gland = (dist + 3 * c.grid.field(rng, 8.0, sl) <= radius) & (c.cavity[sl] <= 1)
    put_tissue(
        c,
        sl,
        gland,
        hu["pancreas"] + 8 * texture(rng, dist.shape, 1.5 / c.grid.spacing),
        "pancreas",
    )


def _cavity_depth(c: _Canvas, sl) -> np.ndarray:
    """Approximate signed distance (mm) to the cavity wall, negative inside."""
    ca, cb_ant, _ = c.an.cavity
    return (c.cavity[sl] ** (1 / c.an.body[3]) - 1) * 0.5 * (ca + cb_ant)


def _liver_bottom(an: Anatomy, X, Y) -> np.ndarray:
    """Height (mm) of the liver's inferior surface: deepest at the right lobe's tip."""
    ca, cb_ant, cb_post = an.cavity
    height, _, medial, _ = an.liver
    # Linear in x: the liver's cross-section shrinks steadily from below the dome to the tip.
    u = np.clip((X / ca + 0.3) / 1.2, 0, 1)
    v = Y / np.where(Y >= 0, cb_ant, cb_post)
    depth = medial + (1 - medial) * u + 0.15 * np.clip(-v, 0, 1) - 0.15 * np.clip(v, 0, 1)
    return an.domes[0] - height * depth


def _liver_distance(c: _Canvas, rng):
    """Liver as a soft intersection of half-spaces, bent by smooth fields (mm, < 0 inside).

    It fills the right dome, hugs the body wall, reaches across the midline anteriorly
    (left lobe), stops in front of the spine medially, and tapers to the right lobe's tip.
    """
    an = c.an
    ca, cb_ant, cb_post = an.cavity
    height, reach, _, gap = an.liver
    dome = an.domes[0]
    sl, (X, Y, Z) = c.grid.box((-ca, -cb_post, dome - height - 40), (ca, cb_ant, dome + 5))
    if sl is None:
        return None, None
    u, v = X / ca, Y / np.where(Y >= 0, cb_ant, cb_post)
    left = -0.05 - reach * np.clip((v + 0.3) / 1.1, 0, 1) * np.clip(
        1 - (dome - Z) / (0.7 * height), 0, 1
    )
    front = (an.spine[0] + an.spine[1] + 30) / cb_post  # in front of the aorta
    # The bare area reaches the posterior wall under the dome; lower down the right kidney
    # sits behind the liver.
    t = np.clip((u - 0.1) / 0.4, 0, 1) * np.clip(1.6 - 2 * (dome - Z) / height, 0, 1)
    back = front + (-1.1 - front) * t * t * (3 - 2 * t)
    parts = [
        _cavity_depth(c, sl) + gap,
        Z - (c.diaphragm[sl[0], sl[1]] - 4),
        _liver_bottom(an, X, Y) - Z,
        (left - u) * ca,
        (back - v) * cb_post,
    ]
    bend = 7 * c.grid.field(rng, 35.0, sl) + 2.5 * c.grid.field(rng, 14.0, sl)
    return sl, smooth_max(parts, 5.0) + bend


def _spleen_distance(c: _Canvas, rng):
    """Spleen: a turned ellipsoid against the left posterior wall (mm, < 0 inside)."""
    centre, semi, angle = c.an.spleen
    ext = 1.4 * max(semi)
    sl, (X, Y, Z) = c.grid.box(np.subtract(centre, ext), np.add(centre, ext))
    if sl is None:
        return None, None
    core = (ellipsoid(X, Y, Z, centre, semi, angle) - 1) * 0.5 * float(np.mean(semi))
    core = core + 4 * c.grid.field(rng, 20.0, sl)
    parts = [core, _cavity_depth(c, sl) + 2, Z - (c.diaphragm[sl[0], sl[1]] - 4)]
    return sl, smooth_max(parts, 3.0)


def _paint_parenchyma(c: _Canvas, rng, tissue: str, region) -> None:
    """Liver or spleen: the same mean HU, shading and grain, so only shape and place differ."""
    sl, distance = region
    if sl is None:
        return
    hu = c.an.hu
    grain = texture(rng, distance.shape, 1.5 / c.grid.spacing)
    value = (
        hu["liver"] + hu["liver_shade"] * c.grid.field(rng, 40.0, sl) + hu["liver_grain"] * grain
    )
    put_tissue(c, sl, distance < 0, value, tissue)


def _paint_liver_vessels(c: _Canvas, rng) -> None:
    """Portal and hepatic veins (bright, labeled liver inside it) and a fine vessel network."""
    an = c.an
    ca, cb_ant, cb_post = an.cavity
    height, dome = an.liver[0], an.domes[0]
    front = an.spine[0] + an.spine[1]
    hilum = np.array([0.12 * ca, front + 35, dome - 0.55 * height])
    top = np.array([an.ivc[0], an.ivc[1], dome - 15])
    fork = (0.45 * ca, 0.0, dome - 0.45 * height)
    ends = [  # (start, end, radius mm, may leave the liver)
        (np.array(an.pancreas[1]) - [0, 12, 0], hilum, 7, True),
        (hilum, fork, 6, False),
        (fork, (0.75 * ca, 0.35 * cb_ant, dome - 0.45 * height), 4, False),
        (fork, (0.7 * ca, -0.55 * cb_post, dome - 0.6 * height), 4, False),
        (hilum, (-0.15 * ca, 0.45 * cb_ant, dome - 0.25 * height), 4.5, False),
        (top, (0.8 * ca, -0.15 * cb_post, dome - 0.3 * height), 5, False),
        (top, (0.3 * ca, 0.6 * cb_ant, dome - 0.35 * height), 4.5, False),
        (top, (-0.3 * ca, 0.5 * cb_ant, dome - 0.15 * height), 4, False),
    ]  # fmt: skip
    shifts = rng.uniform(-8, 8, (len(ends), 3))
    for (p0, p1, radius, leaves), shift in zip(ends, shifts):
        p1 = np.asarray(p1, float) + shift
        lo, hi = np.minimum(p0, p1) - radius - 1, np.maximum(p0, p1) + radius + 1
        sl, (X, Y, Z) = c.grid.box(lo, hi)
        if sl is None:
            continue
        tube = segment_distance(X, Y, Z, p0, p1) <= radius
        liver = c.tissue[sl] == TISSUE_CODE["liver"]
        put_tissue(c, sl, tube & liver, an.hu["vessel"], "liver")
        if leaves:
            put_tissue(c, sl, tube & ~liver & (c.cavity[sl] <= 1), an.hu["vessel"], "vessel")
    sl, _ = c.grid.box((-ca, -cb_post, dome - height - 40), (ca, cb_ant, dome + 5))
    if sl is None:
        return
    f1, f2 = c.grid.field(rng, 10.0, sl), c.grid.field(rng, 10.0, sl)
    fine = (np.abs(f1) < 0.1) & (np.abs(f2) < 0.1) & (c.tissue[sl] == TISSUE_CODE["liver"])
    put_tissue(c, sl, fine, an.hu["vessel"] - 20, "liver")


def _paint_retroperitoneum(c: _Canvas, rng) -> None:
    """Kidneys (cortex, medulla, sinus fat), gallbladder, IVC and aorta; they carve the liver."""
    an, hu = c.an, c.an.hu
    for centre, semi in an.kidneys:
        side = np.sign(centre[0])
        sl, (X, Y, Z) = c.grid.box(
            np.subtract(centre, 1.5 * max(semi)), np.add(centre, 1.5 * max(semi))
        )
        if sl is None:
            continue
        r = ellipsoid(X + side * 0.25 * (Z - centre[2]), Y, Z, centre, semi)
        r = r + 0.04 * c.grid.field(rng, 15.0, sl)
        put_tissue(c, sl, r <= 1, hu["kidney"], "kidney")
        put_tissue(c, sl, r <= 0.72, hu["medulla"], "kidney")
        sinus = (r <= 0.6) & (side * (X - centre[0]) < -0.2 * semi[0])
        put_tissue(c, sl, sinus, hu["fat"] + 40, "fat")
    if an.gallbladder is not None:
        x, y, lift, semi = an.gallbladder
        centre = (x, y, float(_liver_bottom(an, np.float32(x), np.float32(y))) + lift)
        sl, (X, Y, Z) = c.grid.box(np.subtract(centre, semi), np.add(centre, semi))
        if sl is not None:
            bag = (ellipsoid(X, Y, Z, centre, semi) <= 1) & (c.cavity[sl] <= 1)
            put_tissue(c, sl, bag, hu["gallbladder"], "gallbladder")
    sl, (X, Y, Z) = c.grid.full()
    x, y, rx, ry = an.ivc
    ivc = (((X - x) / rx) ** 2 + ((Y - y) / ry) ** 2 <= 1) & (Z < c.diaphragm + 10)
    put_tissue(c, sl, ivc, hu["ivc"], "vessel")
    x, y, radius = an.aorta
    put_tissue(c, sl, np.hypot(X - x, Y - y) + 0 * Z <= radius, hu["aorta"], "vessel")


def _paint_bones(c: _Canvas, rng) -> None:
    """Vertebrae (cortex, marrow, discs, canal, arch) and the ribs around the upper abdomen."""
    an, hu = c.an, c.an.hu
    sl, (X, Y, Z) = c.grid.full()
    spine_y, radius, pitch, phase = an.spine
    cortex = hu["cortical_bone"]
    body = np.hypot(X / 1.15, Y - spine_y) / radius
    disc = ((Z / pitch - phase) % 1.0) < 8.0 / pitch
    put_tissue(c, sl, body <= 1, np.where(body > 1 - 2.5 / radius, cortex, hu["marrow"]), "bone")
    put_tissue(c, sl, (body <= 0.9) & disc, 90.0, "other")
    canal_y = spine_y - radius - 9
    canal = np.hypot(X, Y - canal_y)
    arch = (canal > 8) & (canal <= 14) & (Y < canal_y + 3)
    spinous = (np.abs(X) < 4) & (Y < canal_y) & (Y > canal_y - 32)
    mid_body = np.abs((Z / pitch - phase) % 1.0 - 0.6) < 0.15
    transverse = (np.abs(Y - canal_y - 3) < 3) & (np.abs(X) < radius + 10) & (canal > 8) & mid_body
    put_tissue(c, sl, (arch | spinous | transverse) & ~disc, hu["marrow"] + 100, "bone")
    put_tissue(c, sl, (canal <= 8) + 0 * Z > 0, 15.0, "other")
    ring = np.nonzero((c.cavity > 0.93) & (c.cavity < 1.06))
    x, y, z = (ax[i] for ax, i in zip(c.grid.axes, ring))
    around = np.abs(np.arctan2(x, -y)) / np.pi  # 0 at the spine, 1 at the sternum
    slope, rib_pitch = rng.uniform(150, 250), rng.uniform(30, 40)
    rib = ((z + slope * around) / rib_pitch + rng.uniform()) % 1.0 < 10.0 / rib_pitch
    rib &= (around > 0.08) & (around < 0.8) & (z > an.domes[0] - 150 + 90 * around)
    keep = tuple(i[rib] for i in ring)
    c.hu[keep] = hu["marrow"] + 0.4 * (cortex - hu["marrow"])
    c.tissue[keep] = TISSUE_CODE["bone"]
