"""Whole-volume inference speed and memory: liverseg's predict_volume against MONAI.

Run: ``python benchmarks/inference.py`` (minutes on 2 CPU cores; ``--quick`` for a smaller case).

1. A synthetic CT (liverseg.phantoms, ``256 x 256 x 200``; ``--quick``: ``96 x 96 x 64``) and the
   default UNet3D (features (32, 64, 128, 256), 2 output channels, regions head). So that the
   labels mean something, the model is first fitted briefly to that phantom (a few dozen Adam
   steps on patches half centred on the liver); the table gives the fraction of voxels it then
   labels liver/tumor.
2. Seconds for the whole volume (patch 96, overlap 0.5, batch 2), each in the same process:
   - ``monai fp32``: ``monai.inferers.sliding_window_inference(mode="gaussian")`` on the already
     windowed tensor, then the same decoding (``losses.to_probabilities``/``to_labels``);
   - ``liverseg fp32``: ``predict_volume(amp="off")`` from the HU image (windowing, reorientation,
     blending, decoding and post-processing all included);
   - ``liverseg bf16``: ``predict_volume(amp="bf16")``: bf16 autocast, channels-last 3D on CPU;
     what ``inference.amp: bf16`` in ``configs/demo.yaml`` selects. (The default ``amp="auto"``
     is fp32 on CPU: the ``liverseg fp32`` path.)
   Dice agreement of the bf16 path's labels with the fp32 path's (liver incl. tumor, tumor).
3. With ``--checkpoint CKPT IMAGE [IMAGE ...]`` (e.g. the demo's ``best.pt`` and its validation
   phantoms, a model that really finds tumors): Dice agreement of the bf16 path's labels with
   the fp32 path's for liver and tumor on each image, with that checkpoint's other settings
   (``--agreement-only``: just this table).
4. Peak resident memory (``VmHWM`` of a fresh subprocess) for a ``512 x 512 x 500`` int16
   NIfTI (``--quick``: ``256 x 256 x 128``) predicted on the bf16 path as ``liverseg predict``
   would with the demo's checkpoint: from the file, zoom 2.

Ratios are printed last.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torchio as tio
from monai.inferers import sliding_window_inference

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from liverseg.checkpoints import load_model
from liverseg.constants import LIVER, TUMOR
from liverseg.inference.postprocess import Postprocess, postprocess_labels
from liverseg.inference.settings import InferenceSettings
from liverseg.inference.volume import predict_volume
from liverseg.labels import to_labels, to_probabilities
from liverseg.model import UNet3D
from liverseg.phantoms import generate_case
from liverseg.preprocessing import scale_hu
from liverseg.training.losses import compute_loss

HU_MIN, HU_MAX = -150.0, 250.0
FIT_PATCH = 48


def fit_briefly(model: UNet3D, image: np.ndarray, label: np.ndarray, steps: int, seed: int = 0):
    """A few Adam steps on random patches, half of them centred on a liver voxel."""
    rng = np.random.default_rng(seed)
    scaled = (np.clip(image.astype(np.float32), HU_MIN, HU_MAX) - HU_MIN) / (HU_MAX - HU_MIN)
    scaled = scaled * 2 - 1
    liver = np.argwhere(label > 0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    half = FIT_PATCH // 2
    for step in range(steps):
        xs, ys = [], []
        for _ in range(2):
            if step % 2 == 0 and len(liver):
                centre = liver[rng.integers(len(liver))]
            else:
                centre = [rng.integers(half, n - half + 1) for n in image.shape]
            start = [int(np.clip(c - half, 0, n - FIT_PATCH)) for c, n in zip(centre, image.shape)]
            box = tuple(slice(s, s + FIT_PATCH) for s in start)
            xs.append(torch.from_numpy(scaled[box].copy())[None])
            ys.append(torch.from_numpy(label[box].astype(np.int64))[None])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(torch.stack(xs))
        loss = compute_loss(logits, torch.stack(ys), "bce_dice")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return loss.item()


def monai_labels(model, image: tio.ScalarImage, patch: int, overlap: float, batch: int):
    """MONAI's sliding window in fp32 on the windowed tensor, decoded like liverseg's."""
    windowed = torch.from_numpy(scale_hu(image.data[0].numpy(), HU_MIN, HU_MAX))[None, None]
    with torch.inference_mode():
        logits = sliding_window_inference(
            windowed, (patch,) * 3, batch, model, overlap=overlap, mode="gaussian"
        )
        return to_labels(to_probabilities(logits[0], "regions"), "regions").numpy()


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return float(2 * np.logical_and(a, b).sum() / total) if total else float("nan")


def voxel_sizes(affine: np.ndarray) -> tuple[float, ...]:
    return tuple(np.linalg.norm(affine[:3, :3], axis=0))


def timed(function):
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start


def peak_rss_mib() -> float:
    """Peak resident memory of this process in MiB.

    ``VmHWM`` of /proc/self/status where present: unlike ``ru_maxrss``, which Linux carries over
    from the parent at fork, it starts afresh at exec.
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def ram_child(path: str, patch: int, threads: int) -> None:
    """Subprocess: predict a NIfTI file as ``liverseg predict`` would, in bf16; print peak RSS."""
    torch.set_num_threads(threads)
    model = UNet3D(1, 2)
    baseline = peak_rss_mib()
    start = time.perf_counter()
    settings = InferenceSettings(
        hu_min=HU_MIN, hu_max=HU_MAX, patch_size=patch, factor=2, batch_size=2, amp="bf16"
    )
    prediction = predict_volume(model, path, settings)
    seconds = time.perf_counter() - start
    peak = peak_rss_mib()
    print(
        json.dumps(
            {
                "baseline_mib": baseline,
                "peak_mib": peak,
                "seconds": seconds,
                "shape": list(prediction.labels.shape),
            }
        )
    )


def measure_ram(shape: tuple[int, int, int], patch: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.nii"
        rng = np.random.default_rng(0)
        hu = rng.integers(-1000, 400, size=shape, dtype=np.int16)
        nib.save(nib.Nifti1Image(hu, np.diag([0.7, 0.7, 0.8, 1.0])), str(path))
        del hu
        command = [sys.executable, __file__, "--ram-child", str(path), "--patch", str(patch)]
        command += ["--threads", str(threads)]
        out = subprocess.run(command, check=True, capture_output=True, text=True)
        return json.loads(out.stdout.strip().splitlines()[-1])


def checkpoint_agreement(checkpoint: str, images: list[str]) -> list[tuple[str, float, float]]:
    """Per image: Dice of the bf16 path's labels against fp32's (liver incl. tumor, tumor)."""
    model, settings = load_model(checkpoint, device="cpu")
    rows = []
    for path in images:
        fast = predict_volume(model, path, settings.replace(amp="bf16"), prepared=True).labels
        fp32 = predict_volume(model, path, settings.replace(amp="off"), prepared=True).labels
        rows.append((Path(path).name, dice(fast > 0, fp32 > 0), dice(fast == TUMOR, fp32 == TUMOR)))
    return rows


def print_agreement(checkpoint_and_images: list[str]) -> None:
    checkpoint, images = checkpoint_and_images[0], checkpoint_and_images[1:]
    print(f"bf16 vs fp32 labels of {checkpoint}:")
    print(f"{'image':<28}{'liver incl. tumor':>18}{'tumor':>8}")
    for name, liver, tumor in checkpoint_agreement(checkpoint, images):
        print(f"{name:<28}{liver:>18.4f}{tumor:>8.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small volume, for development")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fit-steps", type=int, default=None)
    parser.add_argument("--patch", type=int, default=None)
    parser.add_argument("--skip-ram", action="store_true")
    parser.add_argument(
        "--checkpoint", nargs="+", default=None, metavar=("CKPT", "IMAGE"),
        help="also compare bf16 vs fp32 labels of this checkpoint on these (prepared) images",
    )  # fmt: skip
    parser.add_argument(
        "--agreement-only", action="store_true", help="only the --checkpoint agreement table"
    )
    parser.add_argument("--ram-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ram_child:
        ram_child(args.ram_child, args.patch, args.threads)
        return
    torch.set_num_threads(args.threads)
    if args.agreement_only:
        if not args.checkpoint:
            parser.error("--agreement-only needs --checkpoint CKPT IMAGE [IMAGE ...]")
        print_agreement(args.checkpoint)
        return
    torch.manual_seed(0)
    shape = (96, 96, 64) if args.quick else (256, 256, 200)
    patch = args.patch or (64 if args.quick else 96)
    ram_shape = (256, 256, 128) if args.quick else (512, 512, 500)
    steps = args.fit_steps if args.fit_steps is not None else (10 if args.quick else 40)
    overlap, batch = 0.5, 2

    hu, label, affine = generate_case(shape, seed=1, tumor_free=False, lps=False)
    model = UNet3D(1, 2, features=(32, 64, 128, 256))
    loss, fit_seconds = timed(lambda: fit_briefly(model, hu, label, steps))
    image = tio.ScalarImage(tensor=torch.from_numpy(hu)[None], affine=affine)
    settings = InferenceSettings(
        hu_min=HU_MIN, hu_max=HU_MAX, patch_size=patch, overlap=overlap, batch_size=batch
    )
    # Warm-up (oneDNN kernel selection) on one patch for each path.
    warm = tio.ScalarImage(tensor=torch.from_numpy(hu[:patch, :patch, :patch].copy())[None])
    for amp in ("off", "bf16"):
        predict_volume(model, warm, settings.replace(amp=amp))

    reference, monai_seconds = timed(lambda: monai_labels(model, image, patch, overlap, batch))
    fp32, fp32_seconds = timed(lambda: predict_volume(model, image, settings.replace(amp="off")))
    fast, fast_seconds = timed(lambda: predict_volume(model, image, settings.replace(amp="bf16")))
    reference = postprocess_labels(reference, voxel_sizes(affine), Postprocess())

    print(
        f"volume {shape}, patch {patch}, overlap {overlap}, batch {batch}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print(
        f"brief fit: {steps} steps of {FIT_PATCH}^3 patches in {fit_seconds:.0f} s, "
        f"last loss {loss:.3f}; fp32 labels: liver region "
        f"{(fp32.labels > 0).mean():.2%} of voxels (truth {(label > 0).mean():.2%}), "
        f"tumor {(fp32.labels == TUMOR).mean():.3%}"
    )
    print("liverseg bf16 path: amp='bf16' -> torch.bfloat16 autocast; channels-last 3D on CPU")
    print()
    print(f"{'path':<40}{'seconds':>10}")
    print(f"{'monai sliding_window fp32 (gaussian)':<40}{monai_seconds:>10.1f}")
    print(f"{'liverseg predict_volume fp32':<40}{fp32_seconds:>10.1f}")
    print(f"{'liverseg predict_volume bf16':<40}{fast_seconds:>10.1f}")
    if not args.skip_ram:
        ram = measure_ram(ram_shape, patch, args.threads)
        print()
        print(
            f"peak RSS, {ram_shape} int16 NIfTI, zoom 2, bf16 path: {ram['peak_mib']:.0f} MiB "
            f"(after imports + model: {ram['baseline_mib']:.0f} MiB; "
            f"input file {np.prod(ram_shape) * 2 / 2**20:.0f} MiB; {ram['seconds']:.0f} s)"
        )
    liver_agree = dice(fast.labels > 0, fp32.labels > 0)
    tumor_agree = dice(fast.labels == TUMOR, fp32.labels == TUMOR)
    monai_agree = dice(reference > 0, fp32.labels > 0)
    print()
    print(f"Dice bf16 vs fp32 labels: liver incl. tumor {liver_agree:.4f}, tumor {tumor_agree:.4f}")
    print(
        f"Dice liverseg fp32 vs monai (both post-processed), liver incl. tumor: {monai_agree:.4f}"
    )
    if args.checkpoint:
        print()
        print_agreement(args.checkpoint)
    print()
    print(f"speed-up bf16 vs monai fp32: {monai_seconds / fast_seconds:.2f}x")
    print(f"speed-up bf16 vs liverseg fp32: {fp32_seconds / fast_seconds:.2f}x")
    assert set(np.unique(fast.labels)) <= {0, LIVER, TUMOR}


if __name__ == "__main__":
    main()
