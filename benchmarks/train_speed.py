"""Training throughput: iterations per second, peak GPU memory, and the share of each iteration
spent waiting on the data loader, for a config (default: configs/default.yaml) on phantoms.

The loop is train.fit()'s (same model, loss, autocast, channels-last and loader); it runs a fixed
number of iterations after a warm-up and times the wait for the next batch separately from the
step (CUDA is synchronised before each clock read).

Usage: python benchmarks/train_speed.py [--config configs/default.yaml] [--iterations 50]
       [--cases 6] [--shape 256 256 200] [key=value ...]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torchio as tio

from liverseg.checkpoints import build_model
from liverseg.config import load_config
from liverseg.constants import IMAGE, LABEL
from liverseg.data.cases import find_cases
from liverseg.devices import autocast_dtype, resolve_device
from liverseg.phantoms import write_dataset
from liverseg.training.fit import build_training_loader
from liverseg.training.losses import compute_loss


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--cases", type=int, default=6)
    parser.add_argument("--shape", type=int, nargs=3, default=(256, 256, 200))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    config = load_config(args.config, tuple(args.overrides))
    device = resolve_device(config.train.device)
    dtype = autocast_dtype(config.train.amp, device)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "phantoms"
        write_dataset(root, cases=args.cases, shape=tuple(args.shape), seed=0, test_cases=0)
        loader = build_training_loader(
            config, find_cases(root), Path(tmp) / "cache", device.type == "cuda"
        )
        model = build_model(config).to(device)
        layout = torch.channels_last_3d if dtype else torch.contiguous_format
        model = model.to(memory_format=layout)
        optimizer = torch.optim.Adam(model.parameters(), lr=config.train.lr)
        scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        batches = iter(_forever(loader))
        waited = stepped = 0.0
        for i in range(args.warmup + args.iterations):
            sync(device)
            t0 = time.perf_counter()
            batch = next(batches)
            image = batch[IMAGE][tio.DATA].to(device, non_blocking=True, memory_format=layout)
            label = batch[LABEL][tio.DATA].to(device, non_blocking=True)
            sync(device)
            t1 = time.perf_counter()
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                logits = model(image)
            loss = compute_loss(logits, label, config.train.loss)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            sync(device)
            t2 = time.perf_counter()
            if i >= args.warmup:
                waited, stepped = waited + t1 - t0, stepped + t2 - t1
    total = waited + stepped
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    data = config.data
    print(
        f"{args.config} on {name}, patch {data.patch_size}^3, batch {data.batch_size}, "
        f"features {config.model.features}, amp {dtype}, {data.num_workers} workers"
    )
    print(f"iterations per second: {args.iterations / total:.2f}")
    print(f"share of each iteration waiting on the data loader: {100 * waited / total:.1f}%")
    if device.type == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")


def _forever(loader):
    while True:
        yield from loader


if __name__ == "__main__":
    main()
