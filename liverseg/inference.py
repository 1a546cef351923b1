"""Predict a whole volume: GridSampler -> model -> GridAggregator, in the input's own geometry.

The steps of :func:`predict_volume`:

1. Read the CT in HU at its stored dtype (int16 stays int16; no float64 copy).
2. With ``zoom > 1`` (an original-resolution scan and a model trained on reduced data), reduce it
   exactly as ``liverseg prepare`` reduced the training data (:func:`liverseg.downsampling.
   downsample_image`: antialiased, block-centre grid).
3. Reorient to canonical RAS, apply the training HU window (:func:`liverseg.transforms.
   intensity_transform`) and pad to at least one patch.
4. Patches of a ``tio.GridSampler`` go through the model in batches (mixed precision where the
   hardware supports it); their PROBABILITIES (not logits) are blended by a ``tio.GridAggregator``
   (Hann window by default).
5. The probabilities go back to the stored orientation and, with ``zoom > 1``, are interpolated
   linearly onto the input grid, slab by slab, and decoded by :func:`liverseg.losses.to_labels`.
6. Optional post-processing (:func:`liverseg.postprocess.postprocess_labels`): the largest
   liver component only, tumor outside the liver to BACKGROUND, tumor components below
   ``min_tumor_mm3`` relabelled LIVER.

The label map has exactly the input's shape and affine.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
import torchio as tio
from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation, ornt_transform
from tqdm import tqdm

from liverseg.checkpoints import load_checkpoint
from liverseg.config import from_dict
from liverseg.downsampling import downsample_image, downsampled_affine
from liverseg.errors import CheckpointError, ConfigError, DataError, LiversegError
from liverseg.files import stored_voxels
from liverseg.losses import out_channels, to_labels, to_probabilities
from liverseg.model import UNet3D
from liverseg.postprocess import Postprocess, postprocess_labels
from liverseg.transforms import intensity_transform

log = logging.getLogger(__name__)

BLENDINGS = ("hann", "average")
AMP_MODES = ("auto", "bf16", "fp16", "off")
PREPROCESSING_KEYS = ("hu_min", "hu_max", "factor", "head")
# Output slices interpolated and decoded at a time when zoom > 1: bounds the float32 memory of
# the full-resolution probabilities to a few slices.
_SLAB = 16
_RAS = np.array([[0, 1], [1, 1], [2, 1]], dtype=float)


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """The torch device for a name; ``"auto"``: CUDA if present, else MPS, else CPU.

    Raises:
        LiversegError: Unknown device name, or CUDA/MPS requested where it is absent.
    """
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise LiversegError(
            f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LiversegError(f"device {name!r} requested but CUDA is not available; use cpu or auto")
    if device.type == "mps" and not (
        getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
    ):
        raise LiversegError(f"device {name!r} requested but MPS is not available; use cpu or auto")
    return device


@dataclass
class Prediction:
    """A predicted volume in the input's geometry.

    Attributes:
        labels: uint8 ``(W, H, D)`` in {BACKGROUND, LIVER, TUMOR}, the input's shape.
        affine: 4 x 4 voxel-to-world matrix (mm), the input's.
        probabilities: float32 ``(C, W, H, D)`` (see :mod:`liverseg.losses` for the channels),
            before post-processing; only when asked for (``keep_probabilities=True``).
    """

    labels: np.ndarray
    affine: np.ndarray
    probabilities: np.ndarray | None = field(default=None, repr=False)


def load_model(checkpoint: str | Path, device: str | torch.device = "auto") -> tuple[UNet3D, dict]:
    """Rebuild the model and its settings from a checkpoint alone.

    Args:
        checkpoint: A ``.pt`` file written by ``liverseg train``.
        device: Where to put the model (see :func:`resolve_device`).

    Returns:
        The model in eval mode, and the settings: ``hu_min``, ``hu_max``, ``factor``, ``head``
        (the checkpoint's preprocessing), ``patch_size``, and the inference section
        (``overlap``, ``batch_size``, ``blending``, ``amp``, ``keep_largest_liver``,
        ``tumor_inside_liver``, ``min_tumor_mm3``). :func:`predict_kwargs` turns them into
        :func:`predict_volume` arguments.

    Raises:
        CheckpointError: Missing, corrupted or non-liverseg file, or weights that do not fit the
            model its config describes; the message names the file and the problem.
    """
    path = Path(checkpoint)
    state = load_checkpoint(path, map_location="cpu")
    try:
        config = from_dict(state["config"], source=f"checkpoint {path}")
    except (ConfigError, TypeError, AttributeError) as exc:
        raise CheckpointError(
            f"checkpoint {path} holds a config this version of liverseg cannot read ({exc}); "
            "predict with the liverseg version that trained it"
        ) from None
    preprocessing = state["preprocessing"]
    missing = [
        k
        for k in PREPROCESSING_KEYS
        if not isinstance(preprocessing, dict) or k not in preprocessing
    ]
    if missing:
        raise CheckpointError(
            f"checkpoint {path} is not a liverseg checkpoint: preprocessing lacks "
            f"{', '.join(missing)}"
        )
    try:
        model = UNet3D(
            in_channels=1,
            out_channels=out_channels(preprocessing["head"]),
            features=config.model.features,
            norm=config.model.norm,
            dropout=config.model.dropout,
            deep_supervision=config.model.deep_supervision,
        )
        model.load_state_dict(state["model"])
    except (ValueError, RuntimeError, TypeError, AttributeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(
            f"checkpoint {path}: the weights do not fit the model its config describes ({reason})"
        ) from None
    device = resolve_device(device)
    model.eval().to(device)
    inference = config.inference
    settings = {
        "hu_min": float(preprocessing["hu_min"]),
        "hu_max": float(preprocessing["hu_max"]),
        "factor": int(preprocessing["factor"]),
        "head": str(preprocessing["head"]),
        "patch_size": int(config.data.patch_size),
        "overlap": inference.overlap,
        "batch_size": inference.batch_size,
        "blending": inference.blending,
        "amp": inference.amp,
        "keep_largest_liver": inference.keep_largest_liver,
        "tumor_inside_liver": inference.tumor_inside_liver,
        "min_tumor_mm3": inference.min_tumor_mm3,
    }
    log.info("loaded %s (epoch %s) on %s", path, state.get("epoch"), device)
    return model, settings


def predict_kwargs(settings: dict, prepared: bool = False) -> dict:
    """Keyword arguments of :func:`predict_volume` from :func:`load_model`'s settings.

    Args:
        settings: As returned by :func:`load_model`.
        prepared: The inputs were already reduced by ``liverseg prepare`` (zoom 1); otherwise
            they are original scans and are reduced by the checkpoint's ``factor``.
    """
    return {
        "hu_min": settings["hu_min"],
        "hu_max": settings["hu_max"],
        "head": settings["head"],
        "patch_size": settings["patch_size"],
        "overlap": settings["overlap"],
        "batch_size": settings["batch_size"],
        "blending": settings["blending"],
        "amp": settings["amp"],
        "zoom": 1 if prepared else settings["factor"],
        "postprocess": Postprocess(
            keep_largest_liver=settings["keep_largest_liver"],
            tumor_inside_liver=settings["tumor_inside_liver"],
            min_tumor_mm3=settings["min_tumor_mm3"],
        ),
    }


def read_volume(
    image: str | Path | tio.ScalarImage | nib.Nifti1Image,
) -> tuple[np.ndarray, np.ndarray]:
    """The HU voxels and affine of a CT, at its stored dtype and orientation.

    Args:
        image: A NIfTI path, a ``tio.ScalarImage`` or a nibabel image.

    Returns:
        ``(hu, affine)``: ``hu`` of shape ``(W, H, D)`` (int16 stays int16; scaled or float data
        become float32), ``affine`` 4 x 4 float64.

    Raises:
        DataError: Missing or unreadable file, not 3D, or a singular affine.
    """
    if isinstance(image, tio.ScalarImage):
        name = str(image.path) if image.path else "the tio.ScalarImage"
    elif isinstance(image, nib.spatialimages.SpatialImage):
        name = image.get_filename() or "the nibabel image"
    else:
        name = str(image)
    try:
        if isinstance(image, tio.ScalarImage):
            data = image.data.numpy()
            affine = np.asarray(image.affine, dtype=np.float64)
        else:
            if not isinstance(image, nib.spatialimages.SpatialImage):
                path = Path(image)
                if not path.is_file():
                    raise DataError(f"{path}: file not found; expected a .nii or .nii.gz CT")
                image = nib.load(str(path))
            affine = np.asarray(image.affine, dtype=np.float64)
            data = stored_voxels(image)
    except (nib.filebasedimages.ImageFileError, OSError, EOFError, zlib.error, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{name}: cannot read it as a NIfTI CT volume ({reason})") from None
    data = np.asarray(data)
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim == 4 and data.shape[0] == 1:
        data = data[0]
    if data.ndim != 3:
        raise DataError(f"{name}: expected a 3D CT volume, found shape {data.shape}")
    if not np.issubdtype(data.dtype, np.integer) and data.dtype != np.float32:
        data = data.astype(np.float32)
    if data.dtype.kind not in "iuf":
        raise DataError(f"{name}: expected numeric voxels, found dtype {data.dtype}")
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise DataError(f"{name}: the affine is singular or not finite:\n{affine}")
    return data, affine


def predict_volume(
    model: torch.nn.Module,
    image: str | Path | tio.ScalarImage | nib.Nifti1Image,
    *,
    hu_min: float,
    hu_max: float,
    head: str = "regions",
    patch_size: int = 96,
    overlap: float = 0.5,
    batch_size: int = 2,
    blending: str = "hann",
    zoom: int = 1,
    device: str | torch.device | None = None,
    amp: str = "auto",
    postprocess: Postprocess | None = Postprocess(),
    progress: bool = False,
    keep_probabilities: bool = False,
) -> Prediction:
    """Segment a whole CT volume in its own geometry.

    Args:
        model: Maps ``(B, 1, p, p, p)`` to logits ``(B, C, p, p, p)``; needs ``size_multiple``
            (1 assumed when absent). Its train/eval mode and device are restored afterwards.
        image: HU volume: a NIfTI path, a ``tio.ScalarImage`` or a nibabel image; any shape,
            orientation and spacing.
        hu_min: HU window of training (mapped to -1).
        hu_max: HU window of training (mapped to +1).
        head: ``"regions"`` or ``"softmax"`` (see :mod:`liverseg.losses`).
        patch_size: Cubic patch side in voxels; a multiple of ``model.size_multiple``.
        overlap: Fraction of a patch shared with its neighbour along each axis, in [0, 1).
        batch_size: Patches per forward pass.
        blending: ``"hann"`` or ``"average"`` weighting of overlapping patch probabilities.
        zoom: Integer reduction of the input before predicting: the checkpoint's ``factor`` for an
            original-resolution scan, 1 for one already reduced by ``liverseg prepare``.
        device: Where to run; None: the model's device.
        amp: ``"auto"`` (bf16 autocast on CUDA where supported, else fp16; bf16 on CPUs with
            bf16 support; else fp32), ``"bf16"``, ``"fp16"`` or ``"off"`` (fp32).
        postprocess: Post-processing steps, or None for none.
        progress: Show a tqdm bar over patches.
        keep_probabilities: Also return the probabilities on the input grid (float32, C times
            the volume's voxels: large).

    Returns:
        The prediction; ``labels`` has the input's shape and ``affine`` is the input's.

    Raises:
        DataError: Unreadable image.
        LiversegError: Invalid settings (patch size not a multiple of the model's, overlap out of
            range, unknown blending/amp/head).
    """
    _check_settings(model, patch_size, overlap, batch_size, blending, zoom, amp, head)
    hu, affine = read_volume(image)
    param = next(model.parameters(), None)
    if device is None:
        device = param.device if param is not None else torch.device("cpu")
    device = resolve_device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = autocast_dtype(amp, device)
    channels_last = uses_channels_last(device, dtype)
    with _inference_state(model, device, channels_last=channels_last):
        if zoom > 1:
            reduced = downsample_image(hu, zoom)
            reduced_affine = downsampled_affine(affine, zoom)
        else:
            reduced, reduced_affine = hu, affine
        probabilities = _sliding_window(
            model, reduced, reduced_affine, hu_min, hu_max, head, patch_size, overlap,
            batch_size, blending, device, dtype, channels_last, progress,
        )  # fmt: skip
    labels, full_probabilities = _decode(probabilities, hu.shape, zoom, head, keep_probabilities)
    if postprocess is not None:
        labels = postprocess_labels(labels, _spacing_mm(affine), postprocess)
    return Prediction(labels=labels, affine=affine.copy(), probabilities=full_probabilities)


@contextlib.contextmanager
def _inference_state(model: torch.nn.Module, device: torch.device, channels_last: bool):
    """Eval mode on ``device`` (channels-last 3D weights if asked); restore all on exit.

    See :func:`uses_channels_last` for when channels-last is used. Every 5D weight not yet
    channels-last is converted; the first conv's (in_channels=1) counts as channels-last
    already, so it says nothing about the others. The converted parameters get
    their original tensors (same storage and strides) back on exit.
    """
    param = next(model.parameters(), None)
    was_training = model.training
    old_device = param.device if param is not None else device
    converted: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
    model.eval()
    try:
        if old_device != device:
            model.to(device)
        if channels_last:
            for weight in model.parameters():
                if weight.ndim == 5 and not weight.is_contiguous(
                    memory_format=torch.channels_last_3d
                ):
                    converted.append((weight, weight.data))
                    weight.data = weight.data.contiguous(memory_format=torch.channels_last_3d)
        yield
    finally:
        for weight, original in converted:
            weight.data = original
        if old_device != device:
            model.to(old_device)
        model.train(was_training)


def _check_settings(model, patch_size, overlap, batch_size, blending, zoom, amp, head) -> None:
    multiple = int(getattr(model, "size_multiple", 1))
    if int(patch_size) != patch_size or patch_size < 1 or patch_size % multiple:
        lower = max(multiple, patch_size // multiple * multiple)
        raise LiversegError(
            f"patch_size {patch_size} must be a positive multiple of the model's size multiple "
            f"{multiple}; use {lower} or {lower + multiple}"
        )
    if not 0 <= overlap < 1:
        raise LiversegError(f"overlap must be a fraction in [0, 1), got {overlap}")
    if int(batch_size) != batch_size or batch_size < 1:
        raise LiversegError(f"batch_size must be a positive integer, got {batch_size}")
    if blending not in BLENDINGS:
        raise LiversegError(f"unknown blending {blending!r}; choose one of {', '.join(BLENDINGS)}")
    if int(zoom) != zoom or zoom < 1:
        raise LiversegError(f"zoom must be a positive integer, got {zoom}")
    if amp not in AMP_MODES:
        raise LiversegError(f"unknown amp {amp!r}; choose one of {', '.join(AMP_MODES)}")
    try:
        out_channels(head)
    except ValueError as exc:
        raise LiversegError(str(exc)) from None


def patch_overlap_voxels(patch_size: int, overlap: float) -> int:
    """The overlap fraction as an even voxel count below ``patch_size`` (GridSampler needs even)."""
    voxels = 2 * int(round(overlap * patch_size / 2))
    return min(voxels, (patch_size - 1) // 2 * 2)


def uses_channels_last(device: torch.device, dtype: torch.dtype | None) -> bool:
    """Whether inference runs channels-last 3D: always on CPU, under autocast on CUDA.

    On our 2-core CPU (torch 2.13, oneDNN) the default UNet's ``2 x 96^3`` forward took 2.83 s
    channels-last vs 4.58 s contiguous in fp32, and 1.32 s vs 1.96 s under bf16 autocast (with
    :class:`liverseg.model.InstanceNorm3d`; ``benchmarks/layouts.py``). On CUDA, channels-last is
    what lets cuDNN use tensor cores under autocast.
    """
    return device.type == "cpu" or dtype is not None


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for an ``amp`` setting on ``device`` (None: fp32)."""
    if amp == "off":
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and _cpu_supports_bf16():
        return torch.bfloat16
    return None


@functools.lru_cache(maxsize=1)
def _cpu_supports_bf16() -> bool:
    """oneDNN reports bf16 support and a tiny bf16 autocast forward runs."""
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return False
        conv = torch.nn.Conv3d(1, 2, 3, padding=1)
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = conv(torch.zeros(1, 1, 4, 4, 4))
        return out.dtype == torch.bfloat16 and bool(torch.isfinite(out.float()).all())
    except (RuntimeError, AttributeError):
        return False


def _orientations(affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(stored -> RAS, RAS -> stored) axis orientations of an affine."""
    ornt = io_orientation(affine)
    return ornt, ornt_transform(_RAS, ornt)


def _sliding_window(
    model,
    hu,
    affine,
    hu_min,
    hu_max,
    head,
    patch_size,
    overlap,
    batch_size,
    blending,
    device,
    dtype,
    channels_last,
    progress,
) -> torch.Tensor:
    """Blended probabilities ``(C, W, H, D)`` float32 on the grid and orientation of ``hu``."""
    to_ras, from_ras = _orientations(affine)
    canonical = np.ascontiguousarray(apply_orientation(hu, to_ras), dtype=np.float32)
    ras_affine = affine @ inv_ornt_aff(to_ras, hu.shape)
    window = intensity_transform(hu_min, hu_max)
    scaled = window(tio.ScalarImage(tensor=torch.from_numpy(canonical)[None], affine=ras_affine))
    del canonical
    tensor = scaled.data
    shape = tensor.shape[1:]
    # Pad to at least one patch with the window's lowest value (air), centred.
    pads = []
    for n in reversed(shape):
        extra = max(patch_size - n, 0)
        pads += [extra // 2, extra - extra // 2]
    if any(pads):
        tensor = F.pad(tensor, pads, value=-1.0)
    subject = tio.Subject(image=tio.ScalarImage(tensor=tensor, affine=ras_affine))
    sampler = tio.GridSampler(subject, patch_size, patch_overlap_voxels(patch_size, overlap))
    aggregator = tio.GridAggregator(sampler, overlap_mode=blending)
    locations = torch.as_tensor(np.asarray(sampler.locations), dtype=torch.int64)
    memory_format = torch.channels_last_3d if channels_last else torch.contiguous_format
    autocast = (
        torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    )
    bar = tqdm(
        total=len(locations), desc="patches", unit="patch", leave=False, disable=not progress
    )
    with torch.inference_mode(), bar:
        for start in range(0, len(locations), batch_size):
            batch_locations = locations[start : start + batch_size]
            patches = torch.stack(
                [
                    tensor[:, i0:i1, j0:j1, k0:k1]
                    for i0, j0, k0, i1, j1, k1 in batch_locations.tolist()
                ]
            )
            patches = patches.to(device, non_blocking=True).contiguous(memory_format=memory_format)
            with autocast:
                logits = model(patches)
            probabilities = to_probabilities(logits.float(), head)
            aggregator.add_batch(probabilities, batch_locations)
            bar.update(len(batch_locations))
    output = aggregator.get_output_tensor()
    w0, h0, d0 = pads[4], pads[2], pads[0]
    output = output[:, w0 : w0 + shape[0], h0 : h0 + shape[1], d0 : d0 + shape[2]]
    # Back to the stored orientation; channels last for nibabel, then first again.
    stored = apply_orientation(output.permute(1, 2, 3, 0).numpy(), from_ras)
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(stored, -1, 0)))


def _linear_weights(n: int, zoom: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per input voxel along one axis: reduced neighbours (i0, i1) and weight of i1.

    Reduced voxel ``i`` has its centre at input coordinate ``min(i*zoom + (zoom-1)/2, n-1)``
    (liverseg.downsampling's block-centre grid); outside the first/last centre the value is held.
    """
    centres = np.minimum(np.arange(-(-n // zoom)) * zoom + (zoom - 1) / 2, n - 1)
    x = np.arange(n, dtype=np.float64)
    i0 = np.clip(np.searchsorted(centres, x, side="right") - 1, 0, len(centres) - 1)
    i1 = np.minimum(i0 + 1, len(centres) - 1)
    gap = centres[i1] - centres[i0]
    weight = np.where(gap > 0, (x - centres[i0]) / np.where(gap > 0, gap, 1), 0.0)
    weight = np.clip(weight, 0.0, 1.0)
    return torch.from_numpy(i0), torch.from_numpy(i1), torch.from_numpy(weight.astype(np.float32))


def _interpolate_axis(values: torch.Tensor, axis: int, weights: tuple) -> torch.Tensor:
    i0, i1, w = weights
    shape = [1] * values.ndim
    shape[axis] = -1
    w = w.view(shape)
    return values.index_select(axis, i0) * (1 - w) + values.index_select(axis, i1) * w


def _decode(
    probabilities: torch.Tensor, shape: tuple, zoom: int, head: str, keep: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    """Labels (and optionally probabilities) on the input grid from reduced probabilities."""
    if zoom == 1:
        labels = to_labels(probabilities, head).numpy()
        return labels, probabilities.numpy() if keep else None
    labels = np.empty(shape, dtype=np.uint8)
    full = np.empty((probabilities.shape[0], *shape), dtype=np.float32) if keep else None
    along = [_linear_weights(n, zoom) for n in shape]
    for z0 in range(0, shape[2], _SLAB):
        z1 = min(z0 + _SLAB, shape[2])
        slab_weights = tuple(t[z0:z1] for t in along[2])
        slab = _interpolate_axis(probabilities, 3, slab_weights)
        slab = _interpolate_axis(_interpolate_axis(slab, 2, along[1]), 1, along[0])
        labels[:, :, z0:z1] = to_labels(slab, head).numpy()
        if full is not None:
            full[..., z0:z1] = slab.numpy()
    return labels, full


def _spacing_mm(affine: np.ndarray) -> tuple[float, float, float]:
    return tuple(float(s) for s in np.linalg.norm(np.asarray(affine)[:3, :3], axis=0))
