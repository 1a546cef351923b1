"""Synthetic contrast-enhanced abdominal CT in the Task03_Liver layout.

Each case is drawn in physical millimetres in a patient frame (RAS+: +x is the patient's right,
+y anterior, +z superior) and only then sampled on the voxel grid, so a seed gives the same
anatomy at any ``shape``; the spacing is the field of view divided by the shape. What makes the
task hard on purpose: the spleen has the liver's HU and texture, tumors range from 2 to 30 mm with
contrasts down to 10 HU under 10-25 HU noise, a fluid-filled gallbladder sits in the liver's
fossa, bowel walls, pancreas, heart and IVC are liver-bright neighbours, and ~30% of cases are
stored LPS instead of RAS.

Layout of this module: public API and Task03 writer, then the random draw of one anatomy, the
organ painters (each paints HU and a tissue id into the case's arrays, later painters win), the
tumors, and the scanner model.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.special import expit

from liverseg.constants import BACKGROUND, LIVER, TUMOR
from liverseg.errors import LiversegError
from liverseg.files import atomic_path, save_nifti

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


# ---------------------------------------------------------------------------------------------
# Sampling grid and smooth random fields

TISSUES = (
    "air", "table", "fat", "muscle", "lung", "heart", "bowel", "stomach", "pancreas", "spleen",
    "liver", "kidney", "gallbladder", "vessel", "bone", "tumor", "other",
)  # fmt: skip
_T = {name: np.uint8(i) for i, name in enumerate(TISSUES)}


class Grid:
    """Voxel centres in the patient frame (mm): body centre at x = y = 0, FOV top at fov_z / 2.

    Args:
        shape: Voxels ``(W, H, D)``.
        fov_mm: Field of view ``(x, y, z)`` in mm.
        body_offset_mm: Where the FOV centre lies relative to the body centre, ``(x, y)``.
    """

    def __init__(self, shape, fov_mm, body_offset_mm):
        self.shape = tuple(shape)
        self.spacing = np.asarray(fov_mm, dtype=float) / np.asarray(shape)
        centre = np.array([body_offset_mm[0], body_offset_mm[1], 0.0])
        self.lo = centre - np.asarray(fov_mm) / 2
        self.hi = centre + np.asarray(fov_mm) / 2
        self.axes = [
            (lo + (np.arange(n) + 0.5) * s).astype(np.float32)
            for lo, n, s in zip(self.lo, shape, self.spacing)
        ]

    def box(self, lo, hi):
        """Slices and broadcast coordinates ``(X, Y, Z)`` of the voxels inside ``[lo, hi]`` mm.

        Where no voxel centre lies inside, the slices are ``None`` (and so are the coordinates).
        """
        sl = []
        for ax, a, b in zip(self.axes, lo, hi):
            idx = np.flatnonzero((ax >= a) & (ax <= b))
            if idx.size == 0:
                return None, (None, None, None)
            sl.append(slice(idx[0], idx[-1] + 1))
        sl = tuple(sl)
        coords = [ax[s] for ax, s in zip(self.axes, sl)]
        return sl, _mesh(coords)

    def full(self):
        return tuple(slice(None) for _ in range(3)), _mesh(self.axes)

    def field(self, rng, scale_mm, sl):
        """A smooth unit-variance random field fixed in physical space, sampled at box ``sl``.

        Its random draws depend only on the FOV and ``scale_mm``, never on the voxel grid, so
        the same seed gives the same shapes at any resolution.
        """
        return smooth_field(
            rng, [ax[s] for ax, s in zip(self.axes, sl)], self.lo, self.hi, scale_mm
        )


def _mesh(coords):
    x, y, z = coords
    return x[:, None, None], y[None, :, None], z[None, None, :]


def smooth_field(rng, axes, lo, hi, scale_mm) -> np.ndarray:
    """Gaussian random field: random weights on a lattice of Gaussian bumps, separable sampling.

    Args:
        rng: Source of the lattice weights.
        axes: Three 1D coordinate arrays (mm) to sample at.
        lo: Lower corner (mm) of the lattice's support.
        hi: Upper corner (mm).
        scale_mm: Lattice step and bump sigma: the correlation length.

    Returns:
        float32 ``(len(axes[0]), len(axes[1]), len(axes[2]))``, exactly unit variance per voxel.
    """
    mats = []
    for c, a, b in zip(axes, lo, hi):
        nodes = np.arange(a - 2 * scale_mm, b + 2 * scale_mm + 1e-3, scale_mm)
        w = np.exp(-0.5 * ((c[:, None] - nodes[None, :]) / scale_mm) ** 2)
        mats.append((w / np.sqrt((w**2).sum(1, keepdims=True))).astype(np.float32))
    coef = rng.standard_normal([m.shape[1] for m in mats], dtype=np.float32)
    f = np.tensordot(mats[0], coef, axes=(1, 0))
    f = np.tensordot(f, mats[1], axes=(1, 1))
    return np.ascontiguousarray(np.tensordot(f, mats[2], axes=(1, 1)))


def _texture(rng, shape, sigma_vox) -> np.ndarray:
    """Fine correlated noise of unit std (parenchyma grain), float32 ``shape``."""
    noise = rng.standard_normal(shape, dtype=np.float32)
    noise = ndimage.gaussian_filter(noise, np.maximum(sigma_vox, 0.5), mode="nearest")
    return noise / max(float(noise.std()), 1e-6)


def _segment_distance(X, Y, Z, p0, p1) -> np.ndarray:
    """Distance (mm) from each point to the segment ``p0``-``p1``."""
    d = np.asarray(p1, np.float32) - np.asarray(p0, np.float32)
    t = ((X - p0[0]) * d[0] + (Y - p0[1]) * d[1] + (Z - p0[2]) * d[2]) / max(float(d @ d), 1e-6)
    t = np.clip(t, 0, 1)
    return np.sqrt(
        (X - p0[0] - t * d[0]) ** 2 + (Y - p0[1] - t * d[1]) ** 2 + (Z - p0[2] - t * d[2]) ** 2
    )


def _ellipsoid(X, Y, Z, centre, semi, angle_deg=0.0) -> np.ndarray:
    """Normalised radius (1 on the surface) of an ellipsoid turned by ``angle`` about z."""
    c, s = np.cos(np.radians(angle_deg)), np.sin(np.radians(angle_deg))
    dx, dy = X - centre[0], Y - centre[1]
    u, v = c * dx + s * dy, -s * dx + c * dy
    return np.sqrt((u / semi[0]) ** 2 + (v / semi[1]) ** 2 + ((Z - centre[2]) / semi[2]) ** 2)


def _smax(parts, k) -> np.ndarray:
    """Smooth maximum (soft intersection of ``c < 0`` regions), rounding corners over ~k mm."""
    top = functools.reduce(np.maximum, parts)
    return top + k * np.log(sum(np.exp((p - top) / k) for p in parts))


def _put(canvas, sl, mask, value, tissue) -> None:
    """Paint ``value`` (scalar or array broadcastable to the box) where ``mask``; set tissue."""
    region = canvas.hu[sl]
    mask = np.broadcast_to(mask, region.shape)
    region[mask] = value if np.ndim(value) == 0 else np.broadcast_to(value, mask.shape)[mask]
    canvas.tissue[sl][mask] = _T[tissue]


# ---------------------------------------------------------------------------------------------
# One random anatomy (mm, patient frame; +x patient's right, +y anterior, +z superior)


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


# ---------------------------------------------------------------------------------------------
# Organ painters: each paints HU and tissue into the canvas; later painters win.


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
    _put(c, sl, (np.abs(Y - table_y) < 1.5) & (np.abs(X) < 0.45 * (c.grid.hi[0] - c.grid.lo[0])),
         hu["table"], "table")  # fmt: skip
    _put(c, sl, an.outline_power(X, Y, Z) * shape_field <= 1, hu["fat"], "fat")
    wall = an.outline_power(X, Y, Z, an.fat_mm, 0.6 * an.fat_mm) * shape_field <= 1
    _put(c, sl, wall, hu["muscle"], "muscle")
    strands = expit(3 * (c.grid.field(rng, 12.0, sl) - 1.2))
    _put(c, sl, c.cavity <= 1, hu["fat"] + (hu["muscle"] - hu["fat"]) * strands, "fat")


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
    _put(c, sl, lung, hu["lung"] + 750 * vessels, "lung")
    _put(c, sl, cav & (Z > zd - 4) & (Z <= zd), hu["muscle"], "muscle")
    centre, semi = an.heart
    _put(c, sl, lung & (_ellipsoid(X, Y, Z, centre, semi) <= 1), hu["heart"], "heart")


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
    mottle = _texture(rng, loops.shape, 2.0 / c.grid.spacing)
    bowel = belly & (loops > 0.0) & (crowd > -0.5)
    lumen = bowel & (loops > 0.3)
    _put(c, sl, bowel, hu["bowel_wall"], "bowel")
    content = np.where(gas > 1.2, AIR_HU, hu["fluid"] + 20 * np.maximum(mottle, 0))
    _put(c, sl, lumen, content, "bowel")


def _paint_stomach(c: _Canvas, rng) -> None:
    """Stomach under the left dome: enhancing wall, fluid or food, gas floating anteriorly."""
    an, hu = c.an, c.an.hu
    centre, semi, level, food = an.stomach
    ext = 1.3 * np.asarray(semi)
    sl, (X, Y, Z) = c.grid.box(np.subtract(centre, ext), np.add(centre, ext))
    if sl is None:
        return
    r = _ellipsoid(X, Y, Z, centre, semi) + 0.12 * c.grid.field(rng, 20.0, sl)
    inside = (r <= 1) & (c.cavity[sl] <= 1) & (Z < c.diaphragm[sl[0], sl[1]] - 4)
    lumen = inside & (r <= 1 - 4.0 / float(np.mean(semi)))
    _put(c, sl, inside, hu["bowel_wall"], "stomach")
    mottle = _texture(rng, r.shape, 2.0 / c.grid.spacing)
    content = hu["fluid"] + (40 + 30 * mottle if food else 0 * mottle)
    content = np.where(Y > centre[1] + level * semi[1], AIR_HU, content)
    if food:
        content = np.where(mottle > 1.6, AIR_HU, content)
    _put(c, sl, lumen, content, "stomach")


def _paint_muscles_and_pancreas(c: _Canvas, rng) -> None:
    """Paraspinal muscles, psoas (growing below the kidneys), and the pancreas."""
    an, hu = c.an, c.an.hu
    sl, (X, Y, Z) = c.grid.full()
    spine_y, spine_r = an.spine[:2]
    body = c.tissue != _T["air"]
    for side in (1, -1):
        para = ((X - side * (spine_r + 14)) / 26) ** 2 + ((Y - spine_y + spine_r + 24) / 24) ** 2
        _put(c, sl, body & (para <= 1 + 0 * Z), hu["muscle"], "muscle")
        top = an.kidneys[0][0][2]
        radius = 22 * np.clip((top - Z) / 60 + 0.2, 0, 1)
        psoas = np.hypot(X - side * (spine_r + 16), Y - spine_y - 2) <= radius
        _put(c, sl, psoas & (c.cavity <= 1), hu["muscle"], "muscle")
    p0, p1, p2, radius = an.pancreas
    lo = np.minimum(np.minimum(p0, p1), p2) - 20
    hi = np.maximum(np.maximum(p0, p1), p2) + 20
    sl, (X, Y, Z) = c.grid.box(lo, hi)
    if sl is None:
        return
    dist = np.minimum(_segment_distance(X, Y, Z, p0, p1), _segment_distance(X, Y, Z, p1, p2))
    gland = (dist + 3 * c.grid.field(rng, 8.0, sl) <= radius) & (c.cavity[sl] <= 1)
    _put(
        c,
        sl,
        gland,
        hu["pancreas"] + 8 * _texture(rng, dist.shape, 1.5 / c.grid.spacing),
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
    return sl, _smax(parts, 5.0) + bend


def _spleen_distance(c: _Canvas, rng):
    """Spleen: a turned ellipsoid against the left posterior wall (mm, < 0 inside)."""
    centre, semi, angle = c.an.spleen
    ext = 1.4 * max(semi)
    sl, (X, Y, Z) = c.grid.box(np.subtract(centre, ext), np.add(centre, ext))
    if sl is None:
        return None, None
    core = (_ellipsoid(X, Y, Z, centre, semi, angle) - 1) * 0.5 * float(np.mean(semi))
    core = core + 4 * c.grid.field(rng, 20.0, sl)
    parts = [core, _cavity_depth(c, sl) + 2, Z - (c.diaphragm[sl[0], sl[1]] - 4)]
    return sl, _smax(parts, 3.0)


def _paint_parenchyma(c: _Canvas, rng, tissue: str, region) -> None:
    """Liver or spleen: the same mean HU, shading and grain, so only shape and place differ."""
    sl, distance = region
    if sl is None:
        return
    hu = c.an.hu
    grain = _texture(rng, distance.shape, 1.5 / c.grid.spacing)
    value = (
        hu["liver"] + hu["liver_shade"] * c.grid.field(rng, 40.0, sl) + hu["liver_grain"] * grain
    )
    _put(c, sl, distance < 0, value, tissue)


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
        tube = _segment_distance(X, Y, Z, p0, p1) <= radius
        liver = c.tissue[sl] == _T["liver"]
        _put(c, sl, tube & liver, an.hu["vessel"], "liver")
        if leaves:
            _put(c, sl, tube & ~liver & (c.cavity[sl] <= 1), an.hu["vessel"], "vessel")
    sl, _ = c.grid.box((-ca, -cb_post, dome - height - 40), (ca, cb_ant, dome + 5))
    if sl is None:
        return
    f1, f2 = c.grid.field(rng, 10.0, sl), c.grid.field(rng, 10.0, sl)
    fine = (np.abs(f1) < 0.1) & (np.abs(f2) < 0.1) & (c.tissue[sl] == _T["liver"])
    _put(c, sl, fine, an.hu["vessel"] - 20, "liver")


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
        r = _ellipsoid(X + side * 0.25 * (Z - centre[2]), Y, Z, centre, semi)
        r = r + 0.04 * c.grid.field(rng, 15.0, sl)
        _put(c, sl, r <= 1, hu["kidney"], "kidney")
        _put(c, sl, r <= 0.72, hu["medulla"], "kidney")
        sinus = (r <= 0.6) & (side * (X - centre[0]) < -0.2 * semi[0])
        _put(c, sl, sinus, hu["fat"] + 40, "fat")
    if an.gallbladder is not None:
        x, y, lift, semi = an.gallbladder
        centre = (x, y, float(_liver_bottom(an, np.float32(x), np.float32(y))) + lift)
        sl, (X, Y, Z) = c.grid.box(np.subtract(centre, semi), np.add(centre, semi))
        if sl is not None:
            bag = (_ellipsoid(X, Y, Z, centre, semi) <= 1) & (c.cavity[sl] <= 1)
            _put(c, sl, bag, hu["gallbladder"], "gallbladder")
    sl, (X, Y, Z) = c.grid.full()
    x, y, rx, ry = an.ivc
    ivc = (((X - x) / rx) ** 2 + ((Y - y) / ry) ** 2 <= 1) & (Z < c.diaphragm + 10)
    _put(c, sl, ivc, hu["ivc"], "vessel")
    x, y, radius = an.aorta
    _put(c, sl, np.hypot(X - x, Y - y) + 0 * Z <= radius, hu["aorta"], "vessel")


def _paint_bones(c: _Canvas, rng) -> None:
    """Vertebrae (cortex, marrow, discs, canal, arch) and the ribs around the upper abdomen."""
    an, hu = c.an, c.an.hu
    sl, (X, Y, Z) = c.grid.full()
    spine_y, radius, pitch, phase = an.spine
    cortex = hu["cortical_bone"]
    body = np.hypot(X / 1.15, Y - spine_y) / radius
    disc = ((Z / pitch - phase) % 1.0) < 8.0 / pitch
    _put(c, sl, body <= 1, np.where(body > 1 - 2.5 / radius, cortex, hu["marrow"]), "bone")
    _put(c, sl, (body <= 0.9) & disc, 90.0, "other")
    canal_y = spine_y - radius - 9
    canal = np.hypot(X, Y - canal_y)
    arch = (canal > 8) & (canal <= 14) & (Y < canal_y + 3)
    spinous = (np.abs(X) < 4) & (Y < canal_y) & (Y > canal_y - 32)
    mid_body = np.abs((Z / pitch - phase) % 1.0 - 0.6) < 0.15
    transverse = (np.abs(Y - canal_y - 3) < 3) & (np.abs(X) < radius + 10) & (canal > 8) & mid_body
    _put(c, sl, (arch | spinous | transverse) & ~disc, hu["marrow"] + 100, "bone")
    _put(c, sl, (canal <= 8) + 0 * Z > 0, 15.0, "other")
    ring = np.nonzero((c.cavity > 0.93) & (c.cavity < 1.06))
    x, y, z = (ax[i] for ax, i in zip(c.grid.axes, ring))
    around = np.abs(np.arctan2(x, -y)) / np.pi  # 0 at the spine, 1 at the sternum
    slope, rib_pitch = rng.uniform(150, 250), rng.uniform(30, 40)
    rib = ((z + slope * around) / rib_pitch + rng.uniform()) % 1.0 < 10.0 / rib_pitch
    rib &= (around > 0.08) & (around < 0.8) & (z > an.domes[0] - 150 + 90 * around)
    keep = tuple(i[rib] for i in ring)
    c.hu[keep] = hu["marrow"] + 0.4 * (cortex - hu["marrow"])
    c.tissue[keep] = _T["bone"]


# ---------------------------------------------------------------------------------------------
# Tumors

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
    found = ndimage.find_objects((tissue == _T["liver"]).astype(np.uint8))
    if not found or found[0] is None:
        return
    bbox = found[0]
    distance = ndimage.distance_transform_edt(tissue[bbox] == _T["liver"], sampling=grid.spacing)
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
    grain = _texture(rng, d.shape, 1.5 / grid.spacing)
    softness = 0.04 + 0.11 * looks[3]
    weight = expit((1 - d) / softness)
    region_t = tissue[sl]
    liver = (region_t == _T["liver"]) | (region_t == _T["tumor"])
    lesion = an.hu["liver"] + profile + (4 + 6 * looks[4]) * grain
    region = hu[sl]
    region[liver] = ((1 - weight) * region + weight * lesion)[liver]
    region_t[liver & (d <= 1)] = _T["tumor"]
