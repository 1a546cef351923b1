"""The record of a training run: ``metrics.csv`` (one row per epoch) and ``curves.png``.

``metrics.csv`` is rewritten whole and atomically every epoch; a resumed run reads back the rows up
to its checkpoint's epoch, so a row written after the last checkpoint is dropped and redone.
"""

from __future__ import annotations

import csv
import math
import time
from pathlib import Path

from liverseg.constants import DICE_CLASSES
from liverseg.io import atomic_path

METRIC_COLUMNS = ["epoch", "train_loss", "lr", *(f"dice_{c}" for c in DICE_CLASSES), "seconds"]


def metrics_row(epoch: int, loss: float, lr: float, scores: dict, started: float) -> dict:
    """One ``metrics.csv`` row: epoch, train loss, lr, validation Dice (if any), seconds."""
    row = {
        "epoch": epoch,
        "train_loss": f"{loss:.6f}",
        "lr": lr,
        "seconds": f"{time.perf_counter() - started:.1f}",
    }
    row.update({f"dice_{k}": f"{v:.4f}" for k, v in scores.items()})
    return row


def write_metrics(path: Path, rows: list[dict]) -> None:
    """Rewrite metrics.csv atomically with ``rows``."""
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=METRIC_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def read_metrics(path: Path, up_to_epoch: int) -> list[dict]:
    """Rows of metrics.csv up to ``up_to_epoch``, so a resumed run adds no duplicate."""
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return [row for row in csv.DictReader(f) if int(row["epoch"]) <= up_to_epoch]


def plot_curves(rows: list[dict], path: Path) -> None:
    """Loss and validation Dice per epoch, to ``curves.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def column(name):
        return [float(r[name]) if r.get(name) not in ("", None) else math.nan for r in rows]

    epochs = [int(r["epoch"]) for r in rows]
    fig, (ax_loss, ax_dice) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, column("train_loss"), marker=".")
    ax_loss.set(xlabel="epoch", ylabel="train loss", title="loss")
    for name in DICE_CLASSES:
        values = column(f"dice_{name}")
        points = [(e, v) for e, v in zip(epochs, values) if not math.isnan(v)]
        if points:
            ax_dice.plot(*zip(*points), marker="o", label=name)
    ax_dice.set(xlabel="epoch", ylabel="Dice", ylim=(0, 1), title="validation Dice")
    if ax_dice.lines:
        ax_dice.legend(loc="lower right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)
