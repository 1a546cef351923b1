"""The comparison as an animation: baseline beside the aligned follow-up, lesions by status.

Axial slices of the baseline (canonical RAS, inferior to superior, radiological view: the
patient's right on the left) beside the follow-up CT resampled onto the baseline grid by the
liver alignment, so a lesion sits at the same place in both panels. Each lesion is coloured by
its status (legend below): on the baseline panel the baseline lesions, on the follow-up panel
the follow-up lesions; a new lesion shows on the right only, a disappeared one on the left only.
Written as ``.html`` or ``.gif`` by :func:`liverseg.visualize.save_animation`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from liverseg.constants import BACKGROUND
from liverseg.preprocessing import to_canonical
from liverseg.visualize import overlay_rgb, save_animation

# Status -> RGB, in STATUSES order (liverseg.followup.compare).
STATUS_COLORS = {
    "new": (1.0, 0.1, 0.1),
    "disappeared": (0.3, 0.6, 1.0),
    "growing": (1.0, 0.55, 0.0),
    "shrinking": (0.2, 0.85, 0.3),
    "stable": (1.0, 0.95, 0.2),
}
_ALPHA = 0.55
_MAX_FRAMES = 80


def animate_comparison(baseline, followup, comparison, out: str | Path) -> Path:
    """Write the side-by-side animation of a :class:`~liverseg.followup.compare.Comparison`."""
    from celluloid import Camera

    from liverseg.followup.compare import STATUSES

    warped_ct = comparison.alignment.warp(
        followup.ct, followup.affine, baseline.labels.shape, baseline.affine, labels=False,
        fill=-1024.0,
    )  # fmt: skip
    volumes = [
        to_canonical(np.asarray(v), baseline.affine)[0]
        for v in (baseline.ct, warped_ct, baseline.labels, comparison.baseline_status_map,
                  comparison.followup_status_map)
    ]  # fmt: skip
    ct_before, ct_after, liver, status_before, status_after = volumes
    slices = _liver_slices(liver)
    fig, axes = _figure()
    camera = Camera(fig)
    for k in slices:
        for ax, ct, status in (
            (axes[0], ct_before, status_before),
            (axes[1], ct_after, status_after),
        ):
            ax.imshow(_colored(ct[:, :, k], status[:, :, k], STATUSES), interpolation="nearest")
        axes[0].text(0.02, 0.02, f"slice {k}", color="white", transform=axes[0].transAxes)
        camera.snap()
    return save_animation(camera.animate(interval=150, blit=False), out)


def _colored(ct_slice: np.ndarray, status_slice: np.ndarray, statuses) -> np.ndarray:
    rgb = overlay_rgb(ct_slice[::-1, ::-1].T, None)
    status_slice = status_slice[::-1, ::-1].T
    for index, name in enumerate(statuses, start=1):
        mask = status_slice == index
        rgb[mask] = (1 - _ALPHA) * rgb[mask] + _ALPHA * np.asarray(STATUS_COLORS[name])
    return rgb


def _liver_slices(liver: np.ndarray) -> np.ndarray:
    present = np.flatnonzero((liver != BACKGROUND).any(axis=(0, 1)))
    if present.size == 0:
        present = np.arange(liver.shape[2])
    if len(present) > _MAX_FRAMES:
        present = present[np.linspace(0, len(present) - 1, _MAX_FRAMES).round().astype(int)]
    return present


def _figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    fig = Figure(figsize=(8, 4.8), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    for ax, title in zip(axes, ("baseline", "follow-up, aligned to baseline")):
        ax.set_title(title)
        ax.set_axis_off()
    handles = [Patch(color=color, label=name) for name, color in STATUS_COLORS.items()]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False)
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.12, top=0.9, wspace=0.05)
    return fig, axes
