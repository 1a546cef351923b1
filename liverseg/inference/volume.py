"""Predict a whole volume: GridSampler -> model -> GridAggregator, in the input's own geometry.

The steps of :func:`predict_volume`:

1. Read the CT in HU at its stored dtype (int16 stays int16; no float64 copy;
   :func:`liverseg.io.read_volume`).
2. With ``zoom > 1`` (an original-resolution scan and a model trained on reduced data), reduce it
   exactly as ``liverseg prepare`` reduced the training data (:func:`liverseg.data.downsampling.
   downsample_image`: antialiased, block-centre grid).
3. Reorient to canonical RAS, apply the training HU window (:func:`liverseg.preprocessing.
   intensity_transform`) and pad to at least one patch.
4. Patches of a ``tio.GridSampler`` go through the model in batches (mixed precision where the
   hardware supports it, :mod:`liverseg.devices`); their PROBABILITIES (not logits) are blended by
   a ``tio.GridAggregator`` (Hann window by default).
5. The probabilities go back to the stored orientation and, with ``zoom > 1``, are interpolated
   linearly onto the input grid, slab by slab, and decoded by :func:`liverseg.training.losses.to_labels`
   (:func:`liverseg.inference.upsampling.upsample_and_decode`).
6. Optional post-processing (:func:`liverseg.inference.postprocess.postprocess_labels`): the largest
   liver component only, tumor outside the liver to BACKGROUND, tumor components below
   ``min_tumor_mm3`` relabelled LIVER.

The label map has exactly the input's shape and affine. The model and these settings come from a
checkpoint with :func:`liverseg.checkpoints.load_model` and :func:`liverseg.checkpoints.
predict_kwargs`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
import torchio as tio
from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation, ornt_transform
from tqdm import tqdm

from liverseg.data.downsampling import downsample_image, downsampled_affine
from liverseg.devices import AMP_MODES, autocast_dtype, resolve_device, uses_channels_last
from liverseg.errors import LiversegError
from liverseg.inference.postprocess import Postprocess, postprocess_labels
from liverseg.inference.upsampling import upsample_and_decode
from liverseg.io import read_volume
from liverseg.preprocessing import intensity_transform
from liverseg.training.losses import out_channels, to_probabilities

BLENDINGS = ("hann", "average")
_RAS = np.array([[0, 1], [1, 1], [2, 1]], dtype=float)


@dataclass
class Prediction:
    """A predicted volume in the input's geometry.

    Attributes:
        labels: uint8 ``(W, H, D)`` in {BACKGROUND, LIVER, TUMOR}, the input's shape.
        affine: 4 x 4 voxel-to-world matrix (mm), the input's.
        probabilities: float32 ``(C, W, H, D)`` (see :mod:`liverseg.training.losses` for the channels),
            before post-processing; only when asked for (``keep_probabilities=True``).
    """

    labels: np.ndarray
    affine: np.ndarray
    probabilities: np.ndarray | None = field(default=None, repr=False)


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
        head: ``"regions"`` or ``"softmax"`` (see :mod:`liverseg.training.losses`).
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
    labels, full_probabilities = upsample_and_decode(
        probabilities, hu.shape, zoom, head, keep_probabilities
    )
    if postprocess is not None:
        labels = postprocess_labels(labels, _spacing_mm(affine), postprocess)
    return Prediction(labels=labels, affine=affine.copy(), probabilities=full_probabilities)


@contextlib.contextmanager
def _inference_state(model: torch.nn.Module, device: torch.device, channels_last: bool):
    """Eval mode on ``device`` (channels-last 3D weights if asked); restore all on exit.

    See :func:`liverseg.devices.uses_channels_last` for when channels-last is used. Every 5D
    weight not yet channels-last is converted; the first conv's (in_channels=1) counts as
    channels-last already, so it says nothing about the others. The converted parameters get
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


def _spacing_mm(affine: np.ndarray) -> tuple[float, float, float]:
    return tuple(float(s) for s in np.linalg.norm(np.asarray(affine)[:3, :3], axis=0))
