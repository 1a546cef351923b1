"""A 3D UNet (Cicek et al. 2016) with configurable depth, width and normalisation.

Each level holds two 3x3x3 convolutions, each followed by a normalisation and a LeakyReLU (or
ReLU). The encoder halves every spatial axis between levels (max-pooling or a strided
convolution); the decoder doubles it back with transposed convolutions and concatenates the
encoder's features of the same level (skip connections). A final 1x1x1 convolution gives one
logit per output channel; which channel means what is decided in :mod:`liverseg.labels`.

Because every downsampling halves the size, each spatial size must be a multiple of
:attr:`UNet3D.size_multiple`; :func:`check_input_size` says which sizes are valid.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from liverseg.constants import ACTIVATIONS, DOWNSAMPLINGS, NORMS

LEAKY_SLOPE = 0.01


def check_input_size(shape: Sequence[int], multiple: int) -> None:
    """Check that every spatial size is a positive multiple of ``multiple``.

    Args:
        shape: Spatial sizes ``(W, H, D)`` in voxels (no batch or channel dims).
        multiple: The required divisor, e.g. :attr:`UNet3D.size_multiple`.

    Raises:
        ValueError: Naming each offending axis and the nearest valid size(s) on it, e.g.
            ``input size (97, 96, 96) is not divisible by 8 on axis 0; nearest valid: 96 or 104``
            (the multiples just below and above; only the one above where none is below).
    """
    problems = []
    for axis, size in enumerate(shape):
        size = int(size)
        if size > 0 and size % multiple == 0:
            continue
        lower = (size // multiple) * multiple
        nearest = f"{lower} or {lower + multiple}" if lower > 0 else f"{multiple}"
        problems.append(f"on axis {axis}; nearest valid: {nearest}")
    if problems:
        sizes = tuple(int(s) for s in shape)
        raise ValueError(
            f"input size {sizes} is not divisible by {multiple} " + "; and ".join(problems)
        )


class InstanceNorm3d(nn.InstanceNorm3d):
    """``nn.InstanceNorm3d(affine=True)`` that keeps channels-last CPU inputs channels-last in eval.

    Instance norm is group norm with one channel per group. On CPU, ATen's ``instance_norm``
    copies a channels-last input to contiguous and back (and, under autocast, to fp32), while
    ``group_norm`` has a channels-last kernel: for the default UNet's ``2 x 96^3`` forward under
    bf16 autocast on our 2-core CPU, 1.32 s instead of 2.33 s (``benchmarks/layouts.py``). In
    training mode the native path is kept: group norm's channels-last backward was slower there.
    Same parameters and state dict as ``nn.InstanceNorm3d``; results equal to float rounding.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            not self.training
            and x.device.type == "cpu"
            and x.ndim == 5
            and x.is_contiguous(memory_format=torch.channels_last_3d)
        ):
            return F.group_norm(x, self.num_features, self.weight, self.bias, self.eps)
        return super().forward(x)


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "instance":
        return InstanceNorm3d(channels, affine=True)
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    return nn.Identity()


def _activation(kind: str) -> nn.Module:
    if kind == "leaky_relu":
        return nn.LeakyReLU(LEAKY_SLOPE, inplace=True)
    return nn.ReLU(inplace=True)


class ConvBlock(nn.Sequential):
    """Two (3x3x3 conv -> norm -> activation) layers, then optional channel dropout.

    Maps ``(B, in_channels, W, H, D)`` to ``(B, out_channels, W, H, D)``.
    """

    def __init__(
        self, in_channels: int, out_channels: int, norm: str, activation: str, dropout: float
    ):
        # A bias right before a normalisation is cancelled by its mean subtraction.
        bias = norm == "none"
        layers: list[nn.Module] = []
        for c_in in (in_channels, out_channels):
            layers += [
                nn.Conv3d(c_in, out_channels, kernel_size=3, padding=1, bias=bias),
                _norm(norm, out_channels),
                _activation(activation),
            ]
        if dropout > 0:
            layers.append(nn.Dropout3d(dropout))
        super().__init__(*layers)


class UNet3D(nn.Module):
    """3D UNet for volumetric segmentation.

    Args:
        in_channels: Image channels (1 for CT).
        out_channels: Logit channels; see :func:`liverseg.labels.out_channels`.
        features: Channels per level, shallowest first; ``len(features)`` levels, so
            ``len(features) - 1`` downsamplings. At least two levels.
        norm: ``"instance"`` (affine), ``"batch"`` or ``"none"``.
        dropout: Channel dropout probability after each level's convolutions (0: none).
        activation: ``"leaky_relu"`` (slope 0.01) or ``"relu"``.
        downsampling: ``"maxpool"`` (2x2x2 max-pooling) or ``"strided_conv"`` (2x2x2 conv,
            stride 2).
        deep_supervision: Extra 1x1x1 logit heads on this many decoder levels below full
            resolution (nnU-Net's deep supervision; 0: none). In training mode ``forward``
            then returns a tuple of logits, full resolution first, each next one half the size
            (see :func:`liverseg.training.losses.compute_loss`); in eval mode only the
            full-resolution logits. At most ``len(features) - 2``.

    Raises:
        ValueError: On an unknown option, fewer than two levels, a non-positive width or a
            dropout outside [0, 1).
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 2,
        features: Sequence[int] = (32, 64, 128, 256),
        norm: str = "instance",
        dropout: float = 0.0,
        activation: str = "leaky_relu",
        downsampling: str = "maxpool",
        deep_supervision: int = 0,
    ):
        super().__init__()
        features = tuple(int(f) for f in features)
        _check_choice("norm", norm, NORMS)
        _check_choice("activation", activation, ACTIVATIONS)
        _check_choice("downsampling", downsampling, DOWNSAMPLINGS)
        if len(features) < 2:
            raise ValueError(f"UNet3D needs at least 2 levels in features, got {features}")
        if min(features) < 1 or in_channels < 1 or out_channels < 1:
            raise ValueError(
                f"channel counts must be positive, got in_channels={in_channels}, "
                f"out_channels={out_channels}, features={features}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if not 0 <= deep_supervision <= len(features) - 2:
            raise ValueError(
                f"deep_supervision must be in [0, {len(features) - 2}] for {len(features)} "
                f"levels, got {deep_supervision}"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.features = features

        def block(c_in: int, c_out: int) -> ConvBlock:
            return ConvBlock(c_in, c_out, norm, activation, dropout)

        self.encoders = nn.ModuleList()
        self.downs = nn.ModuleList()
        c_in = in_channels
        for level, width in enumerate(features):
            self.encoders.append(block(c_in, width))
            if level < len(features) - 1:
                if downsampling == "maxpool":
                    self.downs.append(nn.MaxPool3d(kernel_size=2))
                else:
                    self.downs.append(nn.Conv3d(width, width, kernel_size=2, stride=2))
            c_in = width

        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for deep, shallow in zip(features[:0:-1], features[-2::-1]):
            self.ups.append(nn.ConvTranspose3d(deep, shallow, kernel_size=2, stride=2))
            self.decoders.append(block(2 * shallow, shallow))
        self.head = nn.Conv3d(features[0], out_channels, kernel_size=1)
        # Heads of the decoder levels coarser than full resolution, finest first.
        self.deep_heads = nn.ModuleList(
            nn.Conv3d(width, out_channels, kernel_size=1)
            for width in features[1 : 1 + deep_supervision]
        )
        self._init_weights(activation)

    @property
    def size_multiple(self) -> int:
        """Every spatial input size must be a multiple of this (``2 ** downsamplings``)."""
        return 2 ** (len(self.features) - 1)

    def _init_weights(self, activation: str) -> None:
        slope = LEAKY_SLOPE if activation == "leaky_relu" else 0.0
        for module in self.modules():
            if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)):
                nn.init.kaiming_normal_(module.weight, a=slope, nonlinearity="leaky_relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.InstanceNorm3d, nn.BatchNorm3d)) and module.affine:
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Compute logits.

        Args:
            x: Image batch ``(B, in_channels, W, H, D)``, any float dtype and memory format
                (``torch.channels_last_3d`` included); W, H, D multiples of :attr:`size_multiple`.

        Returns:
            Logits ``(B, out_channels, W, H, D)``; in training mode with deep supervision, a
            tuple of them at full, half, quarter ... resolution.

        Raises:
            ValueError: If ``x`` is not 5-D, has the wrong channel count, or a spatial size that is
                not a multiple of :attr:`size_multiple` (the message names the nearest valid ones).
        """
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"UNet3D expects input (B, {self.in_channels}, W, H, D), got {tuple(x.shape)}"
            )
        check_input_size(x.shape[2:], self.size_multiple)
        skips = []
        for level, encoder in enumerate(self.encoders):
            x = encoder(x)
            if level < len(self.downs):
                skips.append(x)
                x = self.downs[level](x)
        supervise = self.training and len(self.deep_heads) > 0
        coarse = []
        for level, (up, decoder, skip) in enumerate(zip(self.ups, self.decoders, reversed(skips))):
            x = up(x)
            # Under autocast the transposed conv may return a lower precision than the skip.
            x = decoder(torch.cat([x, skip.to(x.dtype)], dim=1))
            head = len(self.decoders) - 2 - level  # decoder output at 2 ** (head + 1) reduction
            if supervise and 0 <= head < len(self.deep_heads):
                coarse.append(self.deep_heads[head](x))
        logits = self.head(x)
        if supervise:
            return (logits, *reversed(coarse))
        return logits


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        nearest = difflib.get_close_matches(str(value), choices, n=1)
        hint = f"; did you mean {nearest[0]!r}?" if nearest else ""
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}{hint}")
