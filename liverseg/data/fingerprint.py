"""A dataset's spacing fingerprint, and the target spacing it suggests (nnU-Net's rule).

``liverseg check`` prints it, so a user choosing ``data.spacing_mm`` sees the spread of physical
scales in their data: Task03's slices are 0.7 to 5 mm apart, in-plane 0.56 to 1.0 mm. Spacings
are read from the image headers only (no voxels), in canonical RAS axis order (x: left-right,
y: anterior-posterior, z: slices), the order of ``data.spacing_mm``; headers whose spacing
cannot be trusted (identity-like placeholders, :func:`liverseg.geometry.spacing_is_trustworthy`)
are left out and counted.

The suggestion follows nnU-Net's experiment planner: the median spacing per axis; where the
median's largest spacing is more than 3 times its smallest (thick slices), that axis takes the
10th percentile instead, so thin-slice cases are not thrown away.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import io_orientation

from liverseg.geometry import spacing_is_trustworthy, spacing_mm

# nnU-Net's anisotropy threshold: above it the coarse axis's target is its 10th percentile.
ANISOTROPY = 3.0


@dataclass(frozen=True)
class SpacingFingerprint:
    """Spacing statistics of a dataset, mm per RAS axis (x, y, z).

    Attributes:
        n_cases: Images whose spacing went into the statistics.
        n_untrusted: Images left out (placeholder spacing or unreadable header).
        median, p10, p90, minimum, maximum: Per axis.
        suggested: The target spacing :func:`suggest_spacing` gives.
    """

    n_cases: int
    n_untrusted: int
    median: tuple[float, float, float]
    p10: tuple[float, float, float]
    p90: tuple[float, float, float]
    minimum: tuple[float, float, float]
    maximum: tuple[float, float, float]
    suggested: tuple[float, float, float]


def ras_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel spacing (mm) per canonical RAS axis, whatever the stored axis order."""
    stored = spacing_mm(affine)
    ras = [0.0, 0.0, 0.0]
    for axis, (target_axis, _) in enumerate(io_orientation(affine)):
        ras[int(target_axis)] = stored[axis]
    return tuple(ras)


def suggest_spacing(spacings: np.ndarray) -> tuple[float, float, float]:
    """nnU-Net's target: the median per axis, the 10th percentile on a > 3x anisotropic axis."""
    median = np.median(spacings, axis=0)
    target = median.copy()
    coarse = int(np.argmax(median))
    if median[coarse] > ANISOTROPY * median.min():
        target[coarse] = np.percentile(spacings[:, coarse], 10)
    return tuple(round(float(v), 3) for v in target)


def spacing_fingerprint(images: Sequence[str | Path]) -> SpacingFingerprint | None:
    """The fingerprint of these NIfTI images' headers; None when none has a trustworthy spacing."""
    spacings, untrusted = [], 0
    for path in images:
        try:
            affine = nib.load(str(path)).affine
        except Exception:  # the data doctor reports unreadable files; here they only don't count
            untrusted += 1
            continue
        if affine is None or not spacing_is_trustworthy(affine):
            untrusted += 1
            continue
        spacings.append(ras_spacing(affine))
    if not spacings:
        return None
    values = np.asarray(spacings, dtype=np.float64)

    def per_axis(stat) -> tuple[float, float, float]:
        return tuple(round(float(v), 3) for v in stat(values))

    return SpacingFingerprint(
        n_cases=len(spacings),
        n_untrusted=untrusted,
        median=per_axis(lambda v: np.median(v, axis=0)),
        p10=per_axis(lambda v: np.percentile(v, 10, axis=0)),
        p90=per_axis(lambda v: np.percentile(v, 90, axis=0)),
        minimum=per_axis(lambda v: v.min(axis=0)),
        maximum=per_axis(lambda v: v.max(axis=0)),
        suggested=suggest_spacing(values),
    )


def format_fingerprint(fingerprint: SpacingFingerprint | None) -> str:
    """The fingerprint as the lines ``liverseg check`` prints."""
    if fingerprint is None:
        return "spacing: no image with a trustworthy spacing; no target spacing to suggest"

    def show(values) -> str:
        return " x ".join(f"{v:g}" for v in values)

    lines = [
        f"spacing (mm, x y z in RAS order) over {fingerprint.n_cases} images"
        + (
            f" ({fingerprint.n_untrusted} left out: untrusted spacing)"
            if fingerprint.n_untrusted
            else ""
        )
        + ":",
        f"  median {show(fingerprint.median)}   10th-90th percentile "
        f"{show(fingerprint.p10)} .. {show(fingerprint.p90)}   range "
        f"{show(fingerprint.minimum)} .. {show(fingerprint.maximum)}",
        f"  suggested target: data.spacing_mm=[{', '.join(map(_g, fingerprint.suggested))}]"
        " data.factor=1 (nnU-Net's rule: median; 10th percentile on an axis > 3x coarser)",
    ]
    return "\n".join(lines)


def _g(value: float) -> str:
    return f"{value:g}"
