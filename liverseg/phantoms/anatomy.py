"""The random draw of one phantom anatomy (mm, patient frame; +x patient's right, +y anterior, +z
superior)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Anatomy:
    """The random numbers of one case's anatomy; derived sizes are properties."""

    body: tuple  # half width, anterior and posterior half depth, superellipse power, taper
    fat_mm: float
    muscle_mm: float
    domes: tuple  # right dome z, left dome z, drop at 0.6 cavity half-width, posterior recess
    liver: tuple  # height below the right dome, left lobe reach, medial bottom fraction, gap
    spine: tuple  # vertebral body centre y, radius, disc pitch, disc phase
    aorta: tuple  # x, y, radius
    ivc: tuple  # x, y, half width, half depth
    kidneys: tuple  # two (centre, semi-axes) pairs: right, left
    spleen: tuple  # centre, semi-axes, angle
    stomach: tuple  # centre, semi-axes, gas level (fraction of semi-axis), food?
    gallbladder: tuple | None  # x, y, height above the liver bottom, semi-axes
    pancreas: tuple  # three points, radius
    heart: tuple  # centre, semi-axes
    bowel_mm: float
    hu: dict
    scanner: dict

    @property
    def cavity(self) -> tuple[float, float, float]:
        """Half width, anterior and posterior half depth of the abdominal cavity (mm)."""
        a, b_ant, b_post = self.body[:3]
        inset = self.fat_mm + self.muscle_mm
        return a - inset, b_ant - inset, b_post - 0.6 * self.fat_mm - self.muscle_mm

    def outline_power(self, X, Y, Z, inset_mm=0.0, inset_post_mm=0.0) -> np.ndarray:
        """Superellipse value of the body outline moved in by an inset (<= 1 inside)."""
        a, b_ant, b_post, power, taper = self.body
        scale = (1 + taper * (self.domes[0] - Z) / 200.0) ** -power
        xp = np.abs(X / (a - inset_mm)) ** power
        yp = np.abs(Y / np.where(Y >= 0, b_ant - inset_mm, b_post - inset_post_mm)) ** power
        return (xp + yp) * scale

    def diaphragm_z(self, X, Y) -> np.ndarray:
        """Height (mm) of the diaphragm: two flat-topped domes (the right one higher), which stay
        high anteriorly and fall into deep recesses posteriorly."""
        ca, cb_ant, cb_post = self.cavity
        dome_r, dome_l, drop, recess = self.domes
        yc = 0.1 * cb_ant
        v = (Y - yc) / np.where(Y >= yc, 1.6 * cb_ant, 0.7 * cb_post)
        rr = (((X - 0.45 * ca) / (0.6 * ca)) ** 2 + v**2) ** 1.5
        rl = (((X + 0.5 * ca) / (0.6 * ca)) ** 2 + v**2) ** 1.5
        back = np.clip(-Y / cb_post, 0, 1) ** 4  # the recess is a thin wedge along the back
        return np.maximum(dome_r - drop * rr, dome_l - drop * rl) - recess * back


def draw_anatomy(rng: np.random.Generator, top_mm: float) -> Anatomy:
    """Draw every size, position and HU of one case (the number of draws is fixed).

    Args:
        rng: The anatomy stream.
        top_mm: Height of the field of view's top in the patient frame; the domes hang below it.
    """
    U = rng.uniform
    # The cavity (which bounds the liver) is drawn in mm, the fat around it separately, so a
    # thick fat layer makes a bigger body, not a smaller liver.
    ca = U(120, 150)
    cb_ant, cb_post = ca * U(0.68, 0.8), ca * U(0.6, 0.72)
    fat, muscle = U(8, 30), U(5, 10)
    inset = fat + muscle
    body = (ca + inset, cb_ant + inset, cb_post + 0.6 * fat + muscle, U(2.1, 2.6), U(-0.03, 0.08))
    dome_r = top_mm - U(12, 45)
    domes = (dome_r, dome_r - U(8, 20), U(25, 45), U(30, 60))
    height = U(135, 175)
    spine_r = U(15, 20)
    spine_y = -cb_post + U(48, 60)
    front = spine_y + spine_r
    liver_hu = U(90, 130)
    sizes = U(0.85, 1.2)

    def jitter(point, mm=8.0):
        return tuple(np.asarray(point, float) + U(-mm, mm, 3))

    kidney_r = (jitter((spine_r + 45, spine_y + 5, dome_r - U(0.8, 0.95) * height)),
                (U(24, 30), U(22, 27), U(45, 58)))  # fmt: skip
    kidney_l = (jitter((-spine_r - 45, spine_y + 5, domes[1] - U(0.6, 0.75) * height)),
                (U(24, 30), U(22, 27), U(45, 58)))  # fmt: skip
    spleen = (jitter((-0.68 * ca, -0.4 * cb_post, domes[1] - 45)),
              tuple(sizes * np.array([U(20, 28), U(40, 55), U(35, 50)])), U(25, 50))  # fmt: skip
    stomach = (jitter((-0.35 * ca, 0.25 * cb_ant, domes[1] - 55), 12),
               (U(35, 55), U(30, 45), U(40, 60)), U(0.1, 0.6), bool(U() < 0.3))  # fmt: skip
    gall = (U(0.1, 0.3) * ca, U(0.35, 0.7) * cb_ant, U(5, 25), (U(11, 17), U(11, 17), U(22, 38)))
    pancreas = (jitter((-0.55 * ca, -0.2 * cb_post, domes[1] - 65)),
                jitter((-0.05 * ca, front + 30, dome_r - 0.6 * height)),
                jitter((0.2 * ca, front + 22, dome_r - 0.72 * height)), U(8, 12))  # fmt: skip
    vessel = max(U(150, 200), liver_hu + 25)
    hu = {
        "fat": U(-115, -85), "muscle": U(40, 60), "lung": U(-880, -820), "liver": liver_hu,
        "liver_shade": U(2, 6), "liver_grain": U(3, 8), "vessel": vessel,
        "ivc": U(max(120, liver_hu + 10), 175), "aorta": U(140, 200), "kidney": U(150, 200),
        "medulla": U(90, 140), "cortical_bone": U(600, 1100), "marrow": U(250, 350),
        "fluid": U(0, 30), "bowel_wall": U(60, 110), "pancreas": U(80, 120),
        "gallbladder": U(0, 25), "heart": U(90, 150), "table": U(0, 200),
    }  # fmt: skip
    return Anatomy(
        body=body, fat_mm=fat, muscle_mm=muscle, domes=domes,
        liver=(height, U(0.4, 0.8), U(0.2, 0.35), U(0.5, 2)),
        spine=(spine_y, spine_r, U(28, 36), U(0, 1)),
        aorta=(-U(8, 18), front + U(8, 14), U(9, 13)),
        ivc=(U(18, 30), front + U(15, 26), U(11, 16), U(8, 12)),
        kidneys=(kidney_r, kidney_l), spleen=spleen, stomach=stomach,
        gallbladder=gall if U() < 0.6 else None, pancreas=pancreas,
        heart=(jitter((-0.15 * ca, 0.35 * cb_ant, dome_r + 35), 10),
               (U(50, 65), U(45, 55), U(40, 55))),
        bowel_mm=U(10, 16), hu=hu, scanner={"psf_mm": U(0.6, 1.2), "noise_hu": U(10, 25)},
    )  # fmt: skip
