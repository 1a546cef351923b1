"""Put a phantom beside the real abdominal CT fixture, to tune the generator by eye.

Writes docs/phantom_vs_real.png: rows real / phantom, columns two axial slices through the liver
and a coronal slice, soft-tissue window W400/L40, liver contour red, tumor yellow. Prints the
measurements behind the picture (body size, liver size and position, median HU per organ).

The fixture is native phase (liver ~55 HU); the phantoms keep Task03's portal-venous HU (liver
90-130), so the phantom's liver is brighter on purpose.

    python tools/compare_phantom.py [--seed 3] [--out docs/phantom_vs_real.png]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from liverseg.constants import LIVER, TUMOR  # noqa: E402
from liverseg.phantoms import TISSUES, render_case  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
WINDOW = (40 - 200, 40 + 200)


def load_real(folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image HU, liver mask, spacing mm) of the fixture, in RAS."""
    image = nib.as_closest_canonical(nib.load(folder / "real_ct_sm.nii.gz"))
    mask = nib.as_closest_canonical(nib.load(folder / "real_ct_sm_liver.nii.gz"))
    return (
        np.asarray(image.dataobj, dtype=np.float32),
        np.asarray(mask.dataobj) > 0,
        np.array(image.header.get_zooms()[:3]),
    )


def matching_phantom(shape, spacing, seed, widest_from_top):
    """A phantom at the fixture's spacing and in-plane size, cut to the fixture's slab.

    The fixture is a 90 mm slab just under the dome. The phantom is drawn 240 mm tall at the
    same spacing and cut so that its widest liver slice lies as far below the slab's top as the
    fixture's does (``widest_from_top`` slices).
    """
    tall = (shape[0], shape[1], int(round(240 / spacing[2])))
    case = render_case(tall, seed, lps=False, fov_mm=tuple(np.multiply(tall, spacing)))
    liver = case.label > 0
    top = int(np.argmax(liver.sum((0, 1)))) + widest_from_top
    top = min(max(top, shape[2] - 1), tall[2] - 1)
    cut = slice(top - shape[2] + 1, top + 1)
    return case.image[:, :, cut].astype(np.float32), case.label[:, :, cut], case.tissue[:, :, cut]


def describe(name, image, liver, spacing) -> dict:
    """Body and liver measurements in mm / mL / HU."""
    body = image > -400
    body_idx = np.argwhere(body[:, :, body.shape[2] // 2])
    liver_idx = np.argwhere(liver)
    centre_body = body_idx.mean(0) * spacing[:2]
    centre_liver = liver_idx.mean(0) * spacing
    row = {
        "case": name,
        "body width mm": float(np.ptp(body_idx[:, 0]) * spacing[0]),
        "body depth mm": float(np.ptp(body_idx[:, 1]) * spacing[1]),
        "liver mL in slab": float(liver.sum() * np.prod(spacing) / 1000),
        "liver x - body x mm": float(centre_liver[0] - centre_body[0]),
        "liver y - body y mm": float(centre_liver[1] - centre_body[1]),
        "liver HU median": float(np.median(image[liver])),
    }
    return row


def draw(real, phantom, out: Path) -> None:
    """Two rows (real, phantom) x three columns (upper axial, lower axial, coronal)."""
    fig, axes = plt.subplots(2, 3, figsize=(15, 9))
    for row, (title, image, label, spacing) in enumerate([real, phantom]):
        liver = label > 0
        rows_z = np.nonzero(liver.any((0, 1)))[0]
        slices = [rows_z.max() - 3, (rows_z.min() + rows_z.max()) // 3]
        y = int(np.round(np.argwhere(liver)[:, 1].mean()))
        views = [
            (image[:, :, z], label[:, :, z], f"axial z={z}", spacing[1] / spacing[0])
            for z in slices
        ]
        views.append((image[:, y, :], label[:, y, :], f"coronal y={y}", spacing[2] / spacing[0]))
        for ax, (pixels, mask, where, aspect) in zip(axes[row], views):
            ax.imshow(
                pixels.T, cmap="gray", vmin=WINDOW[0], vmax=WINDOW[1], origin="lower", aspect=aspect
            )
            ax.contour((mask >= LIVER).T, [0.5], colors="red", linewidths=0.8)
            if (mask == TUMOR).any():
                ax.contour((mask == TUMOR).T, [0.5], colors="yellow", linewidths=0.8)
            ax.set_title(f"{title}: {where}")
            ax.set_xlabel("x (patient's right ->)")
    fig.suptitle("real CT (native phase) vs phantom (portal venous HU), W400/L40")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=70)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--fixtures", type=Path, default=FIXTURES)
    parser.add_argument("--out", type=Path, default=Path("docs/phantom_vs_real.png"))
    args = parser.parse_args()
    image, liver, spacing = load_real(args.fixtures)
    label = liver.astype(np.uint8) * LIVER
    widest_from_top = image.shape[2] - 1 - int(np.argmax(liver.sum((0, 1))))
    p_image, p_label, p_tissue = matching_phantom(image.shape, spacing, args.seed, widest_from_top)
    rows = [
        describe("real", image, liver, spacing),
        describe("phantom", p_image, p_label > 0, spacing),
    ]
    for row in rows:
        print(
            "  ".join(
                f"{k}: {v:.0f}" if isinstance(v, float) else f"{k}: {v}" for k, v in row.items()
            )
        )
    for organ in ("spleen", "kidney", "muscle", "fat", "bone"):
        voxels = p_image[p_tissue == TISSUES.index(organ)]
        if voxels.size:
            print(f"phantom {organ} HU median {np.median(voxels):.0f}")
    draw(("real", image, label, spacing), ("phantom", p_image, p_label, spacing), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
