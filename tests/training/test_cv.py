"""``liverseg cv``: folds trained in their folders, finished ones skipped, each case scored once."""

from __future__ import annotations

import contextlib
import csv
import json
import math
import shutil

import numpy as np
import pytest

import liverseg.training.cv as cv
from liverseg.cli import main as cli_main
from liverseg.config import load_config
from liverseg.errors import ConfigError, DataError
from liverseg.evaluation.folders import evaluate_folders
from liverseg.phantoms import write_dataset

DICE = ("dice_liver_excl_tumor", "dice_liver_incl_tumor", "dice_tumor")


def tiny_cv_overrides(root, run_dir, *extra):
    """Two folds of four 40x40x32 phantoms, one epoch of two iterations each.

    One 32^3 window per side and a large ``min_tumor_mm3`` keep the untrained model's
    predictions, reports and evaluation quick.
    """
    return (
        f"data.root={root}",
        f"run.dir={run_dir}",
        "data.folds=2",
        "data.factor=1",
        "data.shape=[40, 40, 32]",
        "data.patch_size=32",
        "data.num_workers=0",
        "data.queue_length=4",
        "data.samples_per_volume=2",
        "data.augment=false",
        "model.features=[4, 8]",
        "train.epochs=1",
        "train.iterations_per_epoch=2",
        "inference.batch_size=8",
        "inference.overlap=0",
        "inference.min_tumor_mm3=500",
        *extra,
    )


def read_csv(path):
    with path.open() as f:
        return list(csv.DictReader(f))


def cell(value):
    """A Dice or recall as `liverseg evaluate` prints it."""
    return f"{value:.4f}" if math.isfinite(value) else str(value)


@pytest.fixture(scope="module")
def cv_run(tmp_path_factory):
    """One finished 2-fold cross-validation through the CLI: (data root, run dir, stdout)."""
    base = tmp_path_factory.mktemp("cv")
    root, run_dir = base / "data", base / "cv"
    write_dataset(root, cases=4, shape=(40, 40, 32), seed=0, test_cases=0)
    capture = base / "stdout.txt"
    with pytest.MonkeyPatch.context() as patch, capture.open("w") as out:
        # Each fold's final predictions end with an animation (tested in test_visualize): here
        # it would be half of the run's time.
        patch.setattr("liverseg.visualize.animate_files", lambda *args, **kwargs: None)
        with contextlib.redirect_stdout(out):
            code = cli_main(["cv", *tiny_cv_overrides(root, run_dir)])
    assert code == 0
    return root, run_dir, capture.read_text()


def test_each_fold_trains_in_its_folder_on_the_shared_splits(cv_run):
    root, run_dir, _ = cv_run
    splits = json.loads((root / "splits_2fold_seed0.json").read_text())
    assert sorted(c for split in splits for c in split["val"]) == [f"liver_{i}" for i in range(4)]
    for fold, split in enumerate(splits):
        folder = run_dir / f"fold_{fold}"
        assert json.loads((folder / "split.json").read_text()) == split
        assert (folder / "checkpoints" / "last.pt").is_file()
        saved = load_config(folder / "config.yaml")
        assert saved.data.fold == fold and saved.data.cache_dir == str(run_dir / "cache")
        predicted = sorted(p.name for p in (folder / "predictions").glob("*_seg.nii.gz"))
        assert predicted == [f"{case}_seg.nii.gz" for case in split["val"]]


def test_the_summary_scores_each_case_once_as_evaluate_does(cv_run, tmp_path):
    root, run_dir, stdout = cv_run
    rows = read_csv(run_dir / "cv_summary.csv")
    cases, mean, pooled = rows[:-2], rows[-2], rows[-1]
    assert (mean["case_id"], pooled["case_id"]) == ("mean", "global")
    splits = json.loads((root / "splits_2fold_seed0.json").read_text())
    fold_of = {case: str(fold) for fold, split in enumerate(splits) for case in split["val"]}
    assert {row["case_id"]: row["fold"] for row in cases} == fold_of  # each case once
    # the mean row is the mean of the rows (NaN: class absent from both, left out)
    for column in DICE:
        values = [float(row[column]) for row in cases]
        defined = [v for v in values if not math.isnan(v)]
        expected = float(np.mean(defined)) if defined else math.nan
        assert float(mean[column]) == pytest.approx(expected, nan_ok=True), column
    # the same numbers as `liverseg evaluate` on each fold's predictions ...
    for fold, split in enumerate(splits):
        out = tmp_path / f"fold_{fold}.csv"
        predictions = run_dir / f"fold_{fold}" / "predictions"
        evaluate_folders(predictions, root, out_csv=out, cases=split["val"])
        evaluated = {row["case_id"]: row for row in read_csv(out)}
        for row in (r for r in cases if r["fold"] == str(fold)):
            for column in DICE:
                assert float(row[column]) == pytest.approx(
                    float(evaluated[row["case_id"]][column]), nan_ok=True
                )
    # ... and, pooled, as `liverseg evaluate` on all predictions in one folder
    together = tmp_path / "together"
    together.mkdir()
    for fold in range(2):
        for path in (run_dir / f"fold_{fold}" / "predictions").glob("*_seg.nii.gz"):
            shutil.copy(path, together)
    table = evaluate_folders(together, root)
    global_dice = ", ".join(f"{c[5:]} {cell(float(pooled[c]))}" for c in DICE)
    assert f"global Dice (pooled over all voxels of all cases): {global_dice}\n" in table
    recall = cell(float(pooled["lesion_recall"]))
    assert f"recall {recall} ({pooled['found']}/{pooled['true_lesions']} true lesions" in table
    # the printed table shows the same rows, then where the CSV is
    lines = stdout.splitlines()
    assert lines[0].split() == list(cv.SUMMARY_COLUMNS)
    printed = [line.split()[:2] for line in lines if line.split()[:1] in (["0"], ["1"], ["all"])]
    assert printed == [[row["fold"], row["case_id"]] for row in rows]
    assert lines[-1] == f"wrote {run_dir / 'cv_summary.csv'}"


def test_a_finished_fold_is_skipped_and_an_interrupted_one_resumes(cv_run, tmp_path, monkeypatch):
    root, run_dir, _ = cv_run
    copy = tmp_path / "cv"
    shutil.copytree(run_dir, copy)
    # fold 1 stopped after its last epoch, while predicting its validation cases
    missing = sorted((copy / "fold_1" / "predictions").glob("*_seg.nii.gz"))[0]
    missing.unlink()
    last_0 = (copy / "fold_0" / "checkpoints" / "last.pt").stat().st_mtime_ns
    trained, real_fit = [], cv.fit
    monkeypatch.setattr(
        cv, "fit", lambda config: trained.append(config.run.dir) or real_fit(config)
    )
    monkeypatch.setattr("liverseg.visualize.animate_files", lambda *args, **kwargs: None)
    config = load_config(None, tiny_cv_overrides(root, copy))
    result = cv.cross_validate(config)
    assert (result["trained"], result["skipped"]) == ([1], [0])
    assert trained == [str(copy / "fold_1")]
    assert missing.is_file()
    assert (copy / "fold_0" / "checkpoints" / "last.pt").stat().st_mtime_ns == last_0
    assert len(read_csv(copy / "fold_1" / "metrics.csv")) == 1  # resumed, not trained again
    assert len(read_csv(copy / "cv_summary.csv")) == 4 + 2
    # a third call finds both folds finished
    assert cv.cross_validate(config)["skipped"] == [0, 1]


def test_cv_without_folds_is_refused(tmp_path, capsys):
    code = cli_main(["cv", f"run.dir={tmp_path / 'cv'}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "error: liverseg cv needs data.folds" in err and "Traceback" not in err
    assert not (tmp_path / "cv").exists()


def test_more_folds_than_cases_is_refused_before_training(cv_run, tmp_path):
    root, _, _ = cv_run
    config = load_config(None, tiny_cv_overrides(root, tmp_path / "cv", "data.folds=5"))
    with pytest.raises(DataError, match=r"data.folds=5 but the dataset holds 4 cases"):
        cv.cross_validate(config)
    assert not (tmp_path / "cv" / "fold_0").exists()


def test_a_fold_out_of_range_is_refused_at_load(cv_run, tmp_path):
    root, _, _ = cv_run
    with pytest.raises(ConfigError, match=r"data.fold=2 must be < data.folds=2"):
        load_config(None, tiny_cv_overrides(root, tmp_path / "cv", "data.fold=2"))
