"""Animated axial slices of a CT with its segmentation: liver purple, tumor yellow.

The animation is made with celluloid's ``Camera`` on a pyplot-free matplotlib ``Figure`` drawn by
the Agg canvas, so it needs no display and leaves nothing in pyplot's figure registry. In a
notebook, show it as HTML (no ffmpeg needed)::

    from IPython.display import HTML
    from liverseg.visualize import animate

    anim = animate("liver_3.nii.gz", truth="labels/liver_3.nii.gz")
    HTML(anim.to_jshtml())

Orientation: NIfTI inputs are reoriented to canonical RAS+ (what nibabel's
``as_closest_canonical`` does) using the CT's affine, so every frame is an axial slice, numbered
from inferior to superior. Slices are shown in the radiological convention: the patient's right
on the image's left, anterior up. Arrays are taken as given (axis 2 axial) and assumed to be in
RAS+ voxel order unless ``affine`` is passed.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

import nibabel as nib
import numpy as np

from liverseg.constants import LABEL_NAMES, LABEL_VALUES, LIVER, TUMOR
from liverseg.errors import DataError, LiversegError
from liverseg.io import atomic_path, read_volume
from liverseg.labels import invalid_label_values
from liverseg.writable import check_writable_file

if TYPE_CHECKING:
    from matplotlib.animation import Animation
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

# Fixed colors (RGB in [0, 1]): a label keeps its color whatever else the slice holds.
LABEL_COLORS = {LIVER: (0.5, 0.0, 0.8), TUMOR: (1.0, 0.9, 0.0)}
OUTPUT_SUFFIXES = (".gif", ".html")
# to_jshtml drops the frames beyond this size (matplotlib's default is 20 MB): whole-liver
# animations of 512 x 512 CTs need more.
HTML_EMBED_LIMIT_MB = 200.0
_PANEL_INCHES = 4.0

Source: TypeAlias = np.ndarray | str | os.PathLike


def overlay_rgb(
    ct_slice: np.ndarray,
    label_slice: np.ndarray | None,
    window: tuple[float, float] = (40, 400),
    alpha: float = 0.45,
) -> np.ndarray:
    """Blend a windowed CT slice with fixed label colors.

    Args:
        ct_slice: CT intensities in HU, shape ``(H, W)``.
        label_slice: Labels (``BACKGROUND``, ``LIVER``, ``TUMOR``), shape ``(H, W)``, or None
            for the grayscale CT alone.
        window: ``(level, width)`` in HU; the default is a soft-tissue window.
        alpha: Opacity of the label colors, in ``[0, 1]``.

    Returns:
        RGB image, shape ``(H, W, 3)``, float64 in ``[0, 1]``: liver purple, tumor yellow.
    """
    level, width = window
    if width <= 0:
        raise ValueError(f"window width must be > 0 HU, got {width}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    gray = np.clip((np.asarray(ct_slice, dtype=np.float64) - (level - width / 2)) / width, 0, 1)
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    if label_slice is None:
        return rgb
    label_slice = np.asarray(label_slice)
    if label_slice.shape != gray.shape:
        raise ValueError(f"label slice shape {label_slice.shape} != CT slice shape {gray.shape}")
    for label, color in LABEL_COLORS.items():
        mask = label_slice == label
        rgb[mask] = (1 - alpha) * rgb[mask] + alpha * np.asarray(color)
    return rgb


def animate(
    ct: Source,
    seg: Source | None = None,
    truth: Source | None = None,
    *,
    affine: np.ndarray | None = None,
    window: tuple[float, float] = (40, 400),
    alpha: float = 0.45,
    liver_only: bool = True,
    interval_ms: int = 100,
    max_frames: int | None = None,
    title: str | None = None,
) -> Animation:
    """Animate the axial slices of a CT with a predicted and/or ground-truth segmentation.

    Prediction and ground truth are shown side by side when both are given. The CT's affine
    (``affine``, else the CT file's) orients all inputs; label files' own affines are ignored
    because they share the CT's voxel grid (some Task03 labels carry a wrong one).

    Args:
        ct: CT in HU, shape ``(W, H, D)`` (or ``(1, W, H, D)``), or a NIfTI path.
        seg: Predicted labels, same shape, or a NIfTI path.
        truth: Ground-truth labels, same shape, or a NIfTI path.
        affine: 4 x 4 voxel-to-RAS+ matrix (mm) of array inputs; reorients them to RAS+.
        window: ``(level, width)`` in HU.
        alpha: Opacity of the label colors.
        liver_only: Show only the slices holding liver or tumor (from ``seg``, else ``truth``);
            all slices when neither holds any.
        interval_ms: Delay between frames, in milliseconds.
        max_frames: At most this many frames, evenly spaced over the chosen slices.
        title: Figure title.

    Returns:
        A matplotlib ``ArtistAnimation``; it holds the figure.

    Raises:
        DataError: A file is missing or unreadable, the shapes differ, or labels hold values
            other than ``BACKGROUND``, ``LIVER``, ``TUMOR``.
    """
    from celluloid import Camera

    volumes, affine = _load_volumes(ct, seg, truth, affine)
    ct_ras, seg_ras, truth_ras = (None if v is None else _to_ras(v, affine) for v in volumes)
    slices = _choose_slices(seg_ras, truth_ras, ct_ras.shape[2], liver_only, max_frames)
    panels = [
        (n, v) for n, v in (("prediction", seg_ras), ("ground truth", truth_ras)) if v is not None
    ]
    panels = panels or [("CT", None)]
    aspect = _pixel_aspect(affine)

    fig, axes = _build_figure(
        [name for name, _ in panels],
        ct_ras.shape,
        aspect,
        title,
        legend=seg_ras is not None or truth_ras is not None,
    )
    camera = Camera(fig)
    for k in slices:
        ct_slice = _radiological(ct_ras[:, :, k])
        for ax, (_, labels) in zip(axes, panels, strict=True):
            label_slice = None if labels is None else _radiological(labels[:, :, k])
            rgb = overlay_rgb(ct_slice, label_slice, window, alpha)
            # uint8 frames: a float64 copy of every slice would cost 8x the memory.
            image = np.round(rgb * 255).astype(np.uint8)
            ax.imshow(image, interpolation="nearest", aspect=aspect)
            # A text artist, not a title: celluloid only animates artists added per frame.
            ax.text(0.02, 0.98, f"slice {k}", transform=ax.transAxes, color="white", va="top")
        camera.snap()
    log.info("animated %d of %d slices", len(slices), ct_ras.shape[2])
    return camera.animate(interval=interval_ms, blit=False)


def save_animation(anim: Animation, out: str | os.PathLike[str]) -> Path:
    """Write an animation as ``.gif`` (Pillow writer) or ``.html`` (``to_jshtml``), atomically.

    Args:
        anim: The animation, e.g. from :func:`animate`.
        out: Destination ``.gif`` or ``.html``.

    Returns:
        The destination path.

    Raises:
        LiversegError: The suffix is neither ``.gif`` nor ``.html``.
    """
    import matplotlib

    out = Path(out)
    _check_suffix(out)
    with atomic_path(out) as tmp:
        if out.suffix.lower() == ".gif":
            anim.save(str(tmp), writer="pillow")
        else:
            with matplotlib.rc_context({"animation.embed_limit": HTML_EMBED_LIMIT_MB}):
                player = anim.to_jshtml()
            page = '<!DOCTYPE html>\n<html>\n<head><meta charset="utf-8"></head>\n<body>\n'
            tmp.write_text(f"{page}{player}\n</body>\n</html>\n", encoding="utf-8")
    log.info("wrote %s", out)
    return out


def animate_files(
    ct: str | os.PathLike[str],
    seg: str | os.PathLike[str] | None = None,
    truth: str | os.PathLike[str] | None = None,
    *,
    out: str | os.PathLike[str],
) -> Path:
    """Animate NIfTI files (see :func:`animate`) and write the result to ``out``.

    Args:
        ct: CT NIfTI path.
        seg: Predicted labels NIfTI path.
        truth: Ground-truth labels NIfTI path.
        out: Destination ``.gif`` or ``.html``.

    Returns:
        The destination path.

    Raises:
        LiversegError: Unsupported output suffix, an output that cannot be written (checked
            before the animation is rendered), or (as ``DataError``) a missing or unreadable
            file or mismatched shapes.
    """
    _check_suffix(Path(out))
    check_writable_file(out, "animation output", example_name="case.gif")
    return save_animation(animate(ct, seg=seg, truth=truth), out)


def _build_figure(
    names: list[str],
    shape: tuple[int, ...],
    aspect: float,
    title: str | None,
    legend: bool,
) -> tuple[Figure, list[Axes]]:
    """A pyplot-free Agg figure with one titled, axis-less panel per name and the color legend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    height_in = _PANEL_INCHES * float(np.clip(aspect * shape[1] / shape[0], 0.4, 2.5))
    fig_height_in = height_in + 0.8
    fig = Figure(figsize=(_PANEL_INCHES * len(names), fig_height_in), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.5 / fig_height_in, top=0.9, wspace=0.05)
    for ax, name in zip(axes, names, strict=True):
        ax.set_title(name)
        ax.set_axis_off()
    if title:
        fig.suptitle(title)
    if legend:
        handles = [
            Patch(color=LABEL_COLORS[label], label=LABEL_NAMES[label]) for label in LABEL_COLORS
        ]
        fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False)
    return fig, list(axes)


def _check_suffix(out: Path) -> None:
    if out.suffix.lower() not in OUTPUT_SUFFIXES:
        raise LiversegError(
            f"animation output {out}: unsupported suffix {out.suffix!r}; "
            f"use one of {', '.join(OUTPUT_SUFFIXES)}"
        )


def _load_volumes(
    ct: Source, seg: Source | None, truth: Source | None, affine: np.ndarray | None
) -> tuple[list[np.ndarray | None], np.ndarray | None]:
    """Read the inputs as 3D arrays in their stored voxel order; check shapes and labels."""
    sources = {"ct": ct, "seg": seg, "truth": truth}
    volumes, names = {}, {}
    for role, source in sources.items():
        if source is None:
            volumes[role] = None
            continue
        if isinstance(source, (str, os.PathLike)):
            volumes[role], file_affine = read_volume(
                Path(source), role="CT volume" if role == "ct" else "label map"
            )
            names[role] = f"{role} file {source}"
            if role == "ct" and affine is None:
                affine = file_affine
        else:
            volumes[role] = _as_volume(np.asarray(source), role)
            names[role] = f"{role} array"
    for role in ("seg", "truth"):
        if volumes[role] is None:
            continue
        if volumes[role].shape != volumes["ct"].shape:
            raise DataError(
                f"{names[role]} has shape {volumes[role].shape} but {names['ct']} has shape "
                f"{volumes['ct'].shape}; the labels must be on the CT's voxel grid "
                "(pass the segmentation made from this CT)"
            )
        volumes[role] = _check_labels(volumes[role], names[role])
    return [volumes[role] for role in sources], affine


def _as_volume(data: np.ndarray, name: str) -> np.ndarray:
    """Accept ``(W, H, D)``, ``(1, W, H, D)`` (torchio) or ``(W, H, D, 1)``."""
    if data.ndim == 4 and data.shape[0] == 1:
        data = data[0]
    elif data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(f"{name}: expected a 3D volume (W, H, D), found shape {data.shape}")
    return data


def _check_labels(labels: np.ndarray, name: str) -> np.ndarray:
    found = invalid_label_values(labels, limit=5)
    if found:
        raise DataError(
            f"{name} holds label values {found}; expected only {list(LABEL_VALUES)} "
            "(background, liver, tumor) -- pass a label map, not probabilities or another task's"
        )
    return labels.astype(np.uint8, copy=False)


def _to_ras(volume: np.ndarray, affine: np.ndarray | None) -> np.ndarray:
    """Reorder the voxel axes to RAS+ as nibabel's ``as_closest_canonical`` does (a view)."""
    if affine is None:
        return volume
    return nib.orientations.apply_orientation(volume, nib.orientations.io_orientation(affine))


def _pixel_aspect(affine: np.ndarray | None) -> float:
    """Height / width of a displayed pixel: A-P spacing over R-L spacing."""
    if affine is None:
        return 1.0
    ornt = nib.orientations.io_orientation(affine)
    zooms = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    # After reorientation, RAS axis ornt[i, 0] holds the stored axis i.
    spacing = dict(zip(ornt[:, 0].astype(int), zooms, strict=True))
    return float(spacing[1] / spacing[0])


def _radiological(slice_xy: np.ndarray) -> np.ndarray:
    """RAS+ slice ``(W, H)`` -> display ``(H, W)``: patient's right on the left, anterior up."""
    return slice_xy[::-1, ::-1].T


def _choose_slices(
    seg: np.ndarray | None,
    truth: np.ndarray | None,
    depth: int,
    liver_only: bool,
    max_frames: int | None,
) -> np.ndarray:
    """Indices of the axial slices to show, ascending (inferior to superior)."""
    slices = np.arange(depth)
    if liver_only:
        for labels in (seg, truth):
            if labels is None:
                continue
            holds_liver = np.isin(labels, (LIVER, TUMOR)).any(axis=(0, 1))
            if holds_liver.any():
                slices = np.flatnonzero(holds_liver)
                break
        else:
            log.info("no liver in the labels: showing all %d slices", depth)
    if max_frames is not None:
        if max_frames < 1:
            raise ValueError(f"max_frames must be >= 1, got {max_frames}")
        if len(slices) > max_frames:
            picks = np.unique(np.round(np.linspace(0, len(slices) - 1, max_frames)).astype(int))
            slices = slices[picks]
    return slices
