"""Where a model runs and how: the device, the autocast dtype and the memory layout.

``amp`` is resolved by one function for training and inference (:func:`autocast_dtype`):
``"auto"`` is mixed precision on CUDA, and for inference also on a CPU that runs bf16 natively
(AVX512-BF16 or AMX); training on a CPU stays fp32, so a run's weights do not depend on which CPU
trained it. The memory layouts differ: inference runs channels-last 3D on CPU and under
autocast on CUDA (:func:`uses_channels_last`); training only under autocast on CUDA
(:func:`training_layout`).
"""

from __future__ import annotations

import functools
import logging

import torch

from liverseg.constants import AMP_MODES
from liverseg.errors import LiversegError

log = logging.getLogger(__name__)


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


def uses_channels_last(device: torch.device, dtype: torch.dtype | None) -> bool:
    """Whether inference runs channels-last 3D: always on CPU, under autocast on CUDA.

    On our 2-core CPU (torch 2.13, oneDNN) the default UNet's ``2 x 96^3`` forward took 2.83 s
    channels-last vs 4.58 s contiguous in fp32, and 1.32 s vs 1.96 s under bf16 autocast (with
    :class:`liverseg.model.InstanceNorm3d`; ``benchmarks/layouts.py``). On CUDA, channels-last is
    what lets cuDNN use tensor cores under autocast.
    """
    return device.type == "cpu" or dtype is not None


def autocast_dtype(
    amp: str, device: torch.device, *, inference: bool = False
) -> torch.dtype | None:
    """The autocast dtype of an ``amp`` setting (``train.amp`` or ``inference.amp``) on ``device``.

    Args:
        amp: ``"auto"``: bf16 on CUDA (fp16 where the GPU lacks bf16); on a CPU, bf16 for
            inference where the CPU runs it natively (:func:`cpu_supports_bf16`: the default
            UNet's forward 2.9x faster than fp32, ``benchmarks/layouts.py``; labels as fp32's to
            Dice >= 0.99, ``benchmarks/inference.py``; OpenVINO picks bf16 on such CPUs too) and
            fp32 otherwise, and always for training; fp32 on MPS. ``"bf16"`` or ``"fp16"``:
            that dtype on any device; ``"off"``: fp32.
        device: Where the model runs.
        inference: Resolve for inference (True) or training (False).

    Returns:
        The dtype for ``torch.autocast``, or None for fp32 (no autocast).

    Raises:
        LiversegError: ``amp`` is not one of :data:`liverseg.constants.AMP_MODES`.
    """
    if amp not in AMP_MODES:
        raise LiversegError(f"amp must be one of {', '.join(AMP_MODES)}, got {amp!r}")
    if amp == "off":
        return None
    if amp == "bf16":
        if device.type == "cpu" and not cpu_supports_bf16():
            _warn_emulated_bf16()
        return torch.bfloat16
    if amp == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and inference and cpu_supports_bf16():
        return torch.bfloat16
    return None


@functools.lru_cache(maxsize=1)
def cpu_supports_bf16() -> bool:
    """Whether this CPU runs bf16 natively: oneDNN reports support and a tiny forward runs.

    Without it (no AVX512-BF16 or AMX, e.g. the AMD EPYC this was last tested on) oneDNN
    emulates bf16 and ``amp="bf16"`` is many times slower than fp32.
    """
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


@functools.lru_cache(maxsize=1)
def _warn_emulated_bf16() -> None:
    """Say once per process that bf16 was asked for on a CPU that only emulates it."""
    log.warning(
        "amp=bf16 on a CPU without native bf16 (no AVX512-BF16/AMX): oneDNN emulates it, many "
        "times slower than fp32; set train.amp/inference.amp to auto (fp32 on CPU) or off"
    )


def training_layout(device: torch.device, dtype: torch.dtype | None) -> torch.memory_format:
    """Channels-last 3D under autocast on CUDA (cuDNN's tensor-core kernels), else contiguous.

    On our 2-core CPU a bf16 training step (forward, backward, Adam) of the demo model on
    2 x 48^3 was faster contiguous: 0.177 s vs 0.206 s (``benchmarks/layouts.py``; inference is
    the other way round, see :func:`uses_channels_last`).
    """
    if device.type == "cuda" and dtype is not None:
        return torch.channels_last_3d
    return torch.contiguous_format
