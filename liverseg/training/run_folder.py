"""What a training run leaves on disk besides its checkpoints' contents.

Each epoch's record (``metrics.csv``, then the checkpoints, then ``curves.png``, in that order so a
kill never leaves a checkpointed epoch without its row), the clean-up of temp files that killed
writes left behind, and the final predictions of the validation cases with an animation.
"""

from __future__ import annotations

import logging
from pathlib import Path

from liverseg.checkpoints import save_checkpoint
from liverseg.config import Config
from liverseg.data.cases import Case
from liverseg.errors import CheckpointError
from liverseg.io import SHARED_TEMP_MIN_AGE_S, remove_stale_temp_files
from liverseg.training.history import plot_curves, write_metrics

log = logging.getLogger(__name__)


def record_epoch(
    run_dir: Path, rows: list[dict], state: dict | None, checkpoints: list[Path]
) -> None:
    """Leave an epoch on disk: ``metrics.csv``, then its checkpoints, then ``curves.png``.

    ``metrics.csv`` comes before the checkpoints: a kill between the two leaves a row the resumed
    run drops and redoes (:func:`liverseg.training.history.read_metrics`), never a checkpointed
    epoch without its row.

    Args:
        run_dir: The run folder.
        rows: Every ``metrics.csv`` row so far, this epoch's last.
        state: The checkpoint's contents (:func:`liverseg.checkpoints.training_state`), or None
            when the epoch's loss is not finite and nothing is saved.
        checkpoints: Where ``state`` goes: ``last.pt``, and ``best.pt`` on a new best.
    """
    write_metrics(run_dir / "metrics.csv", rows)
    if state is not None:
        for path in checkpoints:
            save_checkpoint(path, **state)
    plot_curves(rows, run_dir / "curves.png")


def remove_stale_temps(config: Config) -> None:
    """Delete the temp files killed writes left in the run folder and the cache.

    A kill mid-write leaves ``.NAME.XXXX.tmp.SUFFIX`` beside ``NAME``
    (:func:`liverseg.io.atomic_path`). In ``run.dir`` and its ``checkpoints/``, ``predictions/``
    and ``cache/`` they are this run's and go. A ``data.cache_dir`` may be shared by runs training
    at the same time: there only those untouched for an hour go.
    """
    run_dir = Path(config.run.dir)
    own = [run_dir, run_dir / "checkpoints", run_dir / "predictions", run_dir / "cache"]
    remove_stale_temp_files(own)
    if config.data.cache_dir:
        remove_stale_temp_files([Path(config.data.cache_dir)], min_age_s=SHARED_TEMP_MIN_AGE_S)


def write_final_predictions(run_dir: Path, checkpoint: Path, cases: list[Case], config) -> None:
    """Predict the validation cases into ``predictions/`` and animate the first one."""
    from liverseg.inference.batch import predict_paths
    from liverseg.visualize import animate_files

    out = run_dir / "predictions"
    failures = predict_paths(
        checkpoint,
        [c.image for c in cases],
        out,
        overwrite=True,
        prepared=config.data.spacing_mm is None,  # else resampled to it, as in training
        device=config.train.device,
    )
    if failures:
        raise CheckpointError(f"final predictions failed: {failures}")
    first = cases[0]
    animate_files(
        first.image,
        seg=out / f"{first.case_id}_seg.nii.gz",
        truth=first.label,
        out=run_dir / "animation.html",
    )
    log.info("validation predictions in %s, animation in %s", out, run_dir / "animation.html")
