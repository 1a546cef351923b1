"""The sampling grid of a phantom, its tissue ids and smooth random fields (all in mm)."""

from __future__ import annotations

import functools

import numpy as np
from scipy import ndimage

TISSUES = (
    "air", "table", "fat", "muscle", "lung", "heart", "bowel", "stomach", "pancreas", "spleen",
    "liver", "kidney", "gallbladder", "vessel", "bone", "tumor", "other",
)  # fmt: skip
TISSUE_CODE = {name: np.uint8(i) for i, name in enumerate(TISSUES)}


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


def smooth_field_at(rng, points, lo, hi, scale_mm) -> np.ndarray:
    """:func:`smooth_field`'s field at scattered points (the same draws give the same field).

    Args:
        rng: Source of the lattice weights.
        points: Three float arrays of one shape: the points' coordinates (mm).
        lo: Lower corner (mm) of the lattice's support.
        hi: Upper corner (mm).
        scale_mm: Lattice step and bump sigma: the correlation length.

    Returns:
        float32, the shape of ``points[0]``, unit variance at every point.
    """
    mats = []
    for c, a, b in zip(points, lo, hi):
        nodes = np.arange(a - 2 * scale_mm, b + 2 * scale_mm + 1e-3, scale_mm)
        w = np.exp(-0.5 * ((np.ravel(c)[:, None] - nodes[None, :]) / scale_mm) ** 2)
        mats.append((w / np.sqrt((w**2).sum(1, keepdims=True))).astype(np.float32))
    coef = rng.standard_normal([m.shape[1] for m in mats], dtype=np.float32)
    f = np.einsum("ni,ijk->njk", mats[0], coef)
    f = np.einsum("njk,nj->nk", f, mats[1])
    return np.einsum("nk,nk->n", f, mats[2]).reshape(np.shape(points[0]))


def texture(rng, shape, sigma_vox) -> np.ndarray:
    """Fine correlated noise of unit std (parenchyma grain), float32 ``shape``."""
    noise = rng.standard_normal(shape, dtype=np.float32)
    noise = ndimage.gaussian_filter(noise, np.maximum(sigma_vox, 0.5), mode="nearest")
    return noise / max(float(noise.std()), 1e-6)


def segment_distance(X, Y, Z, p0, p1) -> np.ndarray:
    """Distance (mm) from each point to the segment ``p0``-``p1``."""
    d = np.asarray(p1, np.float32) - np.asarray(p0, np.float32)
    t = ((X - p0[0]) * d[0] + (Y - p0[1]) * d[1] + (Z - p0[2]) * d[2]) / max(float(d @ d), 1e-6)
    t = np.clip(t, 0, 1)
    return np.sqrt(
        (X - p0[0] - t * d[0]) ** 2 + (Y - p0[1] - t * d[1]) ** 2 + (Z - p0[2] - t * d[2]) ** 2
    )


def ellipsoid(X, Y, Z, centre, semi, angle_deg=0.0) -> np.ndarray:
    """Normalised radius (1 on the surface) of an ellipsoid turned by ``angle`` about z."""
    c, s = np.cos(np.radians(angle_deg)), np.sin(np.radians(angle_deg))
    dx, dy = X - centre[0], Y - centre[1]
    u, v = c * dx + s * dy, -s * dx + c * dy
    return np.sqrt((u / semi[0]) ** 2 + (v / semi[1]) ** 2 + ((Z - centre[2]) / semi[2]) ** 2)


def smooth_max(parts, k) -> np.ndarray:
    """Smooth maximum (soft intersection of ``c < 0`` regions), rounding corners over ~k mm."""
    top = functools.reduce(np.maximum, parts)
    return top + k * np.log(sum(np.exp((p - top) / k) for p in parts))


def put_tissue(canvas, sl, mask, value, tissue) -> None:
    """Paint ``value`` (scalar or array broadcastable to the box) where ``mask``; set tissue."""
    region = canvas.hu[sl]
    mask = np.broadcast_to(mask, region.shape)
    region[mask] = value if np.ndim(value) == 0 else np.broadcast_to(value, mask.shape)[mask]
    canvas.tissue[sl][mask] = TISSUE_CODE[tissue]
