"""UNet memory layout and precision on this CPU: why inference is channels-last, training not.

Run: ``python benchmarks/layouts.py`` (about 2 minutes on 2 cores).

1. Inference: the default UNet3D (32, 64, 128, 256) forward on a 2 x 1 x 96^3 batch in eval mode,
   fp32 and bf16 autocast, contiguous and channels-last 3D; best of 3 after a warm-up. In eval mode
   on channels-last CPU input, liverseg's InstanceNorm3d runs ``group_norm``; the last row forces
   torch's own ``nn.InstanceNorm3d`` path to show what that avoids.
2. Training: one step (forward, backward, Adam) of the demo's UNet (16, 32, 64, 128) on 2 x 48^3,
   fp32 and bf16 autocast, contiguous and channels-last; median of 10 after 2 warm-ups
   (``--training-only``: this part alone, e.g. on a CPU that only emulates bf16).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from liverseg.devices import cpu_supports_bf16
from liverseg.model import UNet3D

LAYOUTS = {"contiguous": torch.contiguous_format, "channels-last": torch.channels_last_3d}


def autocast(bf16: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()


def forward_seconds(model: nn.Module, layout, bf16: bool, repeats: int = 3) -> float:
    model = model.to(memory_format=layout)
    x = torch.randn(2, 1, 96, 96, 96).contiguous(memory_format=layout)
    times = []
    with torch.inference_mode(), autocast(bf16):
        model(x)
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    return min(times)


def train_step_seconds(layout, bf16: bool = True, steps: int = 10) -> float:
    torch.manual_seed(0)
    model = UNet3D(1, 2, features=(16, 32, 64, 128)).to(memory_format=layout)
    optimizer = torch.optim.Adam(model.parameters())
    x = torch.randn(2, 1, 48, 48, 48).contiguous(memory_format=layout)
    times = []
    for _ in range(steps + 2):
        start = time.perf_counter()
        with autocast(bf16):
            loss = model(x).float().pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:])


def print_training(steps: int = 10) -> None:
    """The demo model's training step, fp32 and bf16 autocast, in both layouts (median)."""
    print("\ntraining: demo UNet3D step (forward, backward, Adam), 2 x 1 x 48^3")
    print(f"{'precision':<12}{'layout':<16}{'seconds':>9}")
    for bf16 in (False, True):
        for name, layout in LAYOUTS.items():
            seconds = train_step_seconds(layout, bf16, steps)
            print(f"{'bf16' if bf16 else 'fp32':<12}{name:<16}{seconds:>9.3f}", flush=True)


def cpu_name() -> str:
    """The CPU's model name (Linux), for the record of where a figure was measured."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def torch_instance_norm(model: UNet3D) -> UNet3D:
    """The same model with torch's nn.InstanceNorm3d modules (same weights)."""
    for module in model.modules():
        for name, child in list(module.named_children()):
            if isinstance(child, nn.InstanceNorm3d):
                plain = nn.InstanceNorm3d(child.num_features, affine=True)
                plain.load_state_dict(child.state_dict())
                setattr(module, name, plain)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--training-only", action="store_true", help="only the training step, fp32 and bf16"
    )
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per row")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu_name()}", flush=True)
    print(f"native bf16 on this CPU (oneDNN): {cpu_supports_bf16()}")
    if args.training_only:
        print_training(args.steps)
        return
    model = UNet3D(1, 2).eval()
    print("\ninference: default UNet3D forward, 2 x 1 x 96^3, eval mode (best of 3)")
    print(f"{'precision':<12}{'layout':<16}{'seconds':>9}")
    results = {}
    for bf16 in (False, True):
        for name, layout in LAYOUTS.items():
            results[bf16, name] = forward_seconds(model, layout, bf16)
            precision = "bf16" if bf16 else "fp32"
            print(f"{precision:<12}{name:<16}{results[bf16, name]:>9.2f}", flush=True)
    plain = forward_seconds(torch_instance_norm(UNet3D(1, 2).eval()), torch.channels_last_3d, True)
    print(f"{'bf16':<12}{'channels-last':<16}{plain:>9.2f}  (torch's nn.InstanceNorm3d)")
    print_training(args.steps)
    fp32 = results[False, "contiguous"]
    print(
        f"\nforward speed-up over fp32 contiguous: fp32 channels-last "
        f"{fp32 / results[False, 'channels-last']:.2f}x, bf16 channels-last "
        f"{fp32 / results[True, 'channels-last']:.2f}x"
    )


if __name__ == "__main__":
    main()
