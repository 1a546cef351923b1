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
   - ``liverseg fp32, every window``: ``predict_volume(amp="off", skip_air_windows=False,
     crop_to_body=False)`` from the HU image (windowing, reorientation, blending, decoding and
     post-processing all included): every window of the whole volume;
   - ``liverseg fp32, body windows``: fp32 with the default windows: laid over the body's box,
     windows of nothing but air skipped;
   - ``liverseg bf16, every window``: bf16 autocast (channels-last 3D on CPU), every window.
     Only on a CPU with native bf16 (elsewhere oneDNN emulates it, tens of times slower) or with
     ``--bf16``;
   - ``liverseg default``: ``predict_volume`` with the default settings: ``amp="auto"`` (bf16
     autocast on CUDA and on a CPU with native bf16, else fp32) and the body windows.
   The share of windows the default path did not run, and Dice agreement of each path's labels
   with the fp32 every-window path's (liver incl. tumor, tumor).
3. With ``--images IMAGE [IMAGE ...]`` (e.g. ``liverseg phantoms OUT --cases 1 --shape 256 256
   200`` and a real CT): per image, predicted at its own resolution with the same model, the
   share of windows skipped as air and the seconds with and without skipping, and the Dice of
   the two label maps (liver incl. tumor); ``--images-only``: the brief fit and just this table.
4. With ``--checkpoint CKPT IMAGE [IMAGE ...]`` (e.g. the demo's ``last.pt`` and phantoms it
   never saw, a model that really finds tumors): Dice agreement of the default path's labels
   (and the bf16 every-window path's) with the fp32 every-window path's for liver and tumor on
   each image, with that checkpoint's other settings (``--agreement-only``: just this table).
5. Peak resident memory (``VmHWM`` of a fresh subprocess) for a ``512 x 512 x 500`` int16
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

try:
    from monai.inferers import sliding_window_inference
except ImportError:  # the comparison is left out; liverseg's own figures still print
    sliding_window_inference = None

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from liverseg.checkpoints import load_model
from liverseg.constants import LIVER, TUMOR
from liverseg.devices import autocast_dtype, cpu_supports_bf16
from liverseg.inference.postprocess import Postprocess, postprocess_labels
from liverseg.inference.settings import InferenceSettings
from liverseg.inference.volume import predict_volume
from liverseg.io import read_volume
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
    native_bf16 = cpu_supports_bf16()  # emulated bf16 makes a step take minutes
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
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=native_bf16):
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


def checkpoint_agreement(checkpoint: str, images: list[str]) -> list[tuple]:
    """Per image: Dice of the default and bf16 paths' labels against fp32 every window's.

    Rows: ``(name, default liver, default tumor, bf16 liver, bf16 tumor)``, liver meaning the
    liver region incl. tumor; NaN where neither labels any tumor.
    """
    model, settings = load_model(checkpoint, device="cpu")
    every = settings.replace(skip_air_windows=False, crop_to_body=False)
    rows = []
    for path in images:
        default = predict_volume(model, path, settings).labels
        bf16 = predict_volume(model, path, every.replace(amp="bf16")).labels
        fp32 = predict_volume(model, path, every.replace(amp="off")).labels
        row = [Path(path).name]
        for fast in (default, bf16):
            row += [dice(fast > 0, fp32 > 0), dice(fast == TUMOR, fp32 == TUMOR)]
        rows.append(tuple(row))
    return rows


def print_air_skipping(model: UNet3D, settings: InferenceSettings, images: list[str]) -> None:
    """Per image: windows skipped as air, seconds with and without skipping, label agreement.

    Dice of the liver region (liver incl. tumor) with and without skipping over all voxels and
    over the voxels above ``hu_min`` (tissue: there skipping changes no probability), and the
    share of the every-window liver region that lies in air (what skipping makes background).
    """
    print("air windows not run (default settings) against every window run, same model:")
    print(
        f"{'image':<20}{'shape':>13}{'skipped':>9}{'s, skip':>9}{'s, all':>9}{'Dice':>8}"
        f"{'Dice tissue':>13}{'liver in air':>14}"
    )
    for path in images:
        every = settings.replace(skip_air_windows=False, crop_to_body=False)
        skip, skip_s = timed(lambda p=path: predict_volume(model, p, settings, prepared=True))
        full, full_s = timed(lambda p=path, s=every: predict_volume(model, p, s, prepared=True))
        tissue = read_volume(path)[0] > settings.hu_min
        liver, liver_all = skip.labels > 0, full.labels > 0
        in_air = (liver_all & ~tissue).sum() / max(liver_all.sum(), 1)
        shape = "x".join(map(str, skip.labels.shape))
        print(
            f"{Path(path).name:<20}{shape:>13}{skip.skipped_share:>9.1%}{skip_s:>9.1f}"
            f"{full_s:>9.1f}{dice(liver, liver_all):>8.4f}"
            f"{dice(liver & tissue, liver_all & tissue):>13.4f}{in_air:>14.1%}"
        )


def print_agreement(checkpoint_and_images: list[str]) -> None:
    checkpoint, images = checkpoint_and_images[0], checkpoint_and_images[1:]
    print(f"Dice against the fp32 every-window labels of {checkpoint} (liver incl. tumor, tumor):")
    print(f"{'image':<28}{'default liver':>14}{'tumor':>8}{'bf16 liver':>12}{'tumor':>8}")
    rows = checkpoint_agreement(checkpoint, images)
    for name, *values in rows:
        print(f"{name:<28}{values[0]:>14.4f}{values[1]:>8.4f}{values[2]:>12.4f}{values[3]:>8.4f}")
    if rows:
        least = np.nanmin(np.array([r[1:] for r in rows], dtype=float), axis=0)
        print(f"{'lowest':<28}{least[0]:>14.4f}{least[1]:>8.4f}{least[2]:>12.4f}{least[3]:>8.4f}")


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
    parser.add_argument(
        "--images", nargs="+", default=None, metavar="IMAGE",
        help="also measure air-window skipping on these CTs (predicted at their own resolution)",
    )  # fmt: skip
    parser.add_argument(
        "--images-only", action="store_true", help="fit the model, then only the --images table"
    )
    parser.add_argument(
        "--bf16", action="store_true", help="run the bf16 path even on a CPU without native bf16"
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
    if args.images_only:
        if not args.images:
            parser.error("--images-only needs --images IMAGE [IMAGE ...]")
        print(f"brief fit: {steps} steps of {FIT_PATCH}^3 patches, last loss {loss:.3f}")
        print_air_skipping(model, settings, args.images)
        return
    bf16 = args.bf16 or cpu_supports_bf16() or torch.cuda.is_available()
    every = settings.replace(skip_air_windows=False, crop_to_body=False)
    paths = {
        "liverseg fp32, every window": every.replace(amp="off"),
        "liverseg fp32, body windows": settings.replace(amp="off"),
    }
    if bf16:
        paths["liverseg bf16, every window"] = every.replace(amp="bf16")
    paths["liverseg default"] = settings
    # Warm-up (oneDNN kernel selection) on one patch for each precision.
    warm = tio.ScalarImage(tensor=torch.from_numpy(hu[:patch, :patch, :patch].copy())[None])
    for amp in ("off", "bf16") if bf16 else ("off",):
        predict_volume(model, warm, every.replace(amp=amp))

    if sliding_window_inference is not None:
        reference, monai_seconds = timed(lambda: monai_labels(model, image, patch, overlap, batch))
        reference = postprocess_labels(reference, voxel_sizes(affine), Postprocess())
    results = {
        name: timed(lambda s=s: predict_volume(model, image, s)) for name, s in paths.items()
    }
    fp32 = results["liverseg fp32, every window"][0]
    default, default_seconds = results["liverseg default"]

    print(
        f"volume {shape}, patch {patch}, overlap {overlap}, batch {batch}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"native bf16 on this CPU: {cpu_supports_bf16()}"
    )
    print(
        f"brief fit: {steps} steps of {FIT_PATCH}^3 patches in {fit_seconds:.0f} s, "
        f"last loss {loss:.3f}; fp32 labels: liver region "
        f"{(fp32.labels > 0).mean():.2%} of voxels (truth {(label > 0).mean():.2%}), "
        f"tumor {(fp32.labels == TUMOR).mean():.3%}"
    )
    dtype = autocast_dtype(settings.amp, torch.device("cpu"), inference=True)
    print(
        f"liverseg default: amp={settings.amp!r} ({dtype or 'fp32'} on this CPU), windows not "
        f"run (outside the body's box, or air): {default.skipped_share:.1%} of the whole grid's"
    )
    print()
    print(f"{'path':<40}{'seconds':>10}")
    if sliding_window_inference is not None:
        print(f"{'monai sliding_window fp32 (gaussian)':<40}{monai_seconds:>10.1f}")
    else:
        print("monai sliding_window: not run, MONAI is not installed (pip install monai)")
    for name, (_, seconds) in results.items():
        print(f"{name:<40}{seconds:>10.1f}")
    if not bf16:
        print("(liverseg bf16 not run: no native bf16 on this CPU; --bf16 runs it emulated)")
    if not args.skip_ram:
        ram = measure_ram(ram_shape, patch, args.threads)
        print()
        print(
            f"peak RSS, {ram_shape} int16 NIfTI, zoom 2, bf16 path: {ram['peak_mib']:.0f} MiB "
            f"(after imports + model: {ram['baseline_mib']:.0f} MiB; "
            f"input file {np.prod(ram_shape) * 2 / 2**20:.0f} MiB; {ram['seconds']:.0f} s)"
        )
    print()
    for name, (prediction, _) in results.items():
        if prediction is not fp32:
            liver = dice(prediction.labels > 0, fp32.labels > 0)
            tumor = dice(prediction.labels == TUMOR, fp32.labels == TUMOR)
            print(f"Dice {name} vs fp32 labels: liver incl. tumor {liver:.4f}, tumor {tumor:.4f}")
    if sliding_window_inference is not None:
        monai_agree = dice(reference > 0, default.labels > 0)
        print(
            "Dice liverseg default vs monai (both post-processed), liver incl. tumor: "
            f"{monai_agree:.4f}"
        )
    if args.images:
        print()
        print_air_skipping(model, settings, args.images)
    if args.checkpoint:
        print()
        print_agreement(args.checkpoint)
    every_seconds = results["liverseg fp32, every window"][1]
    print()
    if sliding_window_inference is not None:
        print(f"speed-up liverseg default vs monai fp32: {monai_seconds / default_seconds:.2f}x")
    print(
        f"speed-up liverseg default vs fp32, every window: {every_seconds / default_seconds:.2f}x"
    )
    if sliding_window_inference is not None:
        for name, (_, seconds) in results.items():
            if name != "liverseg default":
                print(f"speed-up {name} vs monai fp32: {monai_seconds / seconds:.2f}x")
    assert set(np.unique(default.labels)) <= {0, LIVER, TUMOR}


if __name__ == "__main__":
    main()
