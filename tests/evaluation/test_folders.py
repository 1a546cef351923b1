"""`liverseg evaluate` on tiny hand-made folders."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from liverseg.cli import main
from liverseg.constants import BACKGROUND, LIVER, TUMOR
from liverseg.data.splits import validation_cases
from liverseg.errors import DataError
from liverseg.evaluation.folders import evaluate_folders, pair_cases
from liverseg.io import read_labels, save_nifti

AFFINE = np.diag([1.5, 0.8, 2.0, 1.0])
SHAPE = (12, 12, 8)


def _labels(liver_z_stop: int, tumor_x: int | None) -> np.ndarray:
    labels = np.full(SHAPE, BACKGROUND, dtype=np.uint8)
    labels[2:10, 2:10, 2:liver_z_stop] = LIVER
    if tumor_x is not None:
        labels[tumor_x : tumor_x + 2, 4:6, 3:5] = TUMOR
    return labels


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    """A Task03 root with two truths and a folder with their predictions.

    liver_0: liver 256 voxels (8 tumor inside); the predicted tumor is shifted one voxel in x,
    overlap 4 of 8. liver_1: liver only; the prediction has 192 of its 256 liver voxels.
    """
    root, preds = tmp_path / "Task03_Liver", tmp_path / "preds"
    save_nifti(_labels(6, 4), AFFINE, root / "labelsTr" / "liver_0.nii.gz")
    save_nifti(_labels(6, None), AFFINE, root / "labelsTr" / "liver_1.nii.gz")
    (root / "labelsTr" / "._liver_0.nii.gz").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    save_nifti(_labels(6, 5), AFFINE, preds / "liver_0_seg.nii.gz")
    save_nifti(_labels(5, None), AFFINE, preds / "liver_1_seg.nii.gz")
    (preds / "._liver_1_seg.nii.gz").write_bytes(b"not nifti")
    return preds, root


def _read_csv(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as handle:
        return {row["case_id"]: row for row in csv.DictReader(handle)}


def test_evaluate_folders_by_hand(folders, tmp_path):
    preds, root = folders
    out = tmp_path / "metrics" / "metrics.csv"
    table = evaluate_folders(preds, root, out_csv=out)
    rows = _read_csv(out)
    assert list(rows) == ["liver_0", "liver_1", "mean"]
    case0, case1, mean = rows["liver_0"], rows["liver_1"], rows["mean"]
    assert float(case0["dice_tumor"]) == pytest.approx(0.5)
    assert float(case0["dice_liver_incl_tumor"]) == pytest.approx(1.0)
    # liver excl. tumor: 248 voxels each, sharing 256 - 12 (union of the two tumors)
    assert float(case0["dice_liver_excl_tumor"]) == pytest.approx(2 * 244 / 496)
    assert float(case1["dice_liver_incl_tumor"]) == pytest.approx(2 * 192 / 448)
    assert float(case1["rvd_liver"]) == pytest.approx((192 - 256) / 256)
    assert float(case1["voe_liver"]) == pytest.approx(1 - 192 / 256)
    assert float(case0["voe_tumor"]) == pytest.approx(1 - 4 / 12)
    # The predicted tumor is shifted one 1.5 mm voxel: farthest surface voxels are 1.5 mm off.
    assert float(case0["hd95_tumor"]) == pytest.approx(1.5)
    assert float(case0["assd_tumor"]) == pytest.approx(0.75)  # half the voxels 0, half 1.5 mm
    assert float(case1["hd95_liver"]) == pytest.approx(2.0)  # the top face lies one 2 mm slice low
    assert math.isnan(float(case1["dice_tumor"]))
    assert math.isnan(float(case1["assd_tumor"]))
    # Means skip the NaN of liver_1's absent tumor.
    assert float(mean["dice_tumor"]) == pytest.approx(0.5)
    expected_liver = (1.0 + 2 * 192 / 448) / 2
    assert float(mean["dice_liver_incl_tumor"]) == pytest.approx(expected_liver)
    assert (case0["true_lesions"], case0["found"], case0["pred_lesions"]) == ("1", "1", "1")
    assert "dice_tumor: 1 NaN, 0 inf of 2 cases" in table
    assert "global Dice" in table
    # pooled: liver incl. tumor 2 (256 + 192) / (512 + 448); tumor 2 * 4 / 16
    assert f"liver_incl_tumor {896 / 960:.4f}" in table
    assert "tumor 0.5000" in table
    assert "overlaps it by >= 1 voxel" in table
    assert "recall 1.0000 (1/1 true lesions found)" in table


def test_a_hallucinated_tumor_is_inf_and_makes_the_mean_inf(folders, tmp_path):
    preds, root = folders
    save_nifti(_labels(5, 6), AFFINE, preds / "liver_1_seg.nii.gz")
    out = tmp_path / "m.csv"
    table = evaluate_folders(preds, root, out_csv=out)
    assert "assd_tumor: 0 NaN, 1 inf of 2 cases" in table
    assert "dice_tumor: 0 NaN, 0 inf" not in table  # Dice 0 is a number, not listed
    mean_line = next(line for line in table.splitlines() if line.lstrip().startswith("mean"))
    assert mean_line.split()[-2:] == ["inf", "inf"]  # ASSD, HD95 of the tumor
    assert math.isinf(float(_read_csv(out)["mean"]["hd95_tumor"]))
    assert "one inf case makes the mean inf" in table
    assert "precision 0.5000 (1/2 predicted lesions hit)" in table


def test_a_missed_tumor_is_not_hidden_by_the_mean(folders, tmp_path):
    preds, root = folders
    # liver_2: a tumor the prediction misses entirely; liver_0's tumor is found (ASSD 0.75 mm).
    save_nifti(_labels(6, 4), AFFINE, root / "labelsTr" / "liver_2.nii.gz")
    save_nifti(_labels(6, None), AFFINE, preds / "liver_2_seg.nii.gz")
    out = tmp_path / "m.csv"
    table = evaluate_folders(preds, root, out_csv=out)
    rows = _read_csv(out)
    assert math.isinf(float(rows["liver_2"]["assd_tumor"]))
    assert math.isinf(float(rows["mean"]["assd_tumor"]))
    assert math.isinf(float(rows["mean"]["hd95_tumor"]))
    # NaN (liver_1: no tumor anywhere) is still left out: Dice (0.5 + 0) / 2.
    assert float(rows["mean"]["dice_tumor"]) == pytest.approx(0.25)
    assert "assd_tumor: 1 NaN, 1 inf of 3 cases" in table


def test_cases_are_paired_in_natural_order(tmp_path):
    truths, preds = tmp_path / "gt", tmp_path / "pred"
    for case in ("p10_ct", "p2_ct", "p1_ct"):
        save_nifti(_labels(6, None), AFFINE, truths / f"{case}.nii.gz")
        save_nifti(_labels(6, None), AFFINE, preds / f"{case}_seg.nii.gz")
    assert list(pair_cases(preds, truths)) == ["p1_ct", "p2_ct", "p10_ct"]


def test_flat_truth_folder_and_labels_keep_their_dtype(folders, tmp_path):
    preds, root = folders
    pairs = pair_cases(preds, root / "labelsTr")
    assert list(pairs) == ["liver_0", "liver_1"]
    assert read_labels(pairs["liver_0"][1])[0].dtype == np.uint8


def test_missing_and_extra_cases_are_all_listed(folders):
    preds, root = folders
    (preds / "liver_1_seg.nii.gz").unlink()
    save_nifti(_labels(6, None), AFFINE, preds / "liver_7_seg.nii.gz")
    save_nifti(_labels(6, None), AFFINE, root / "labelsTr" / "liver_2.nii.gz")
    with pytest.raises(DataError) as error:
        evaluate_folders(preds, root)
    message = str(error.value)
    assert "['liver_1', 'liver_2']" in message
    assert "['liver_7']" in message


def test_shape_mismatch_names_both_files(folders):
    preds, root = folders
    save_nifti(np.zeros((12, 12, 7), np.uint8), AFFINE, preds / "liver_1_seg.nii.gz")
    with pytest.raises(DataError) as error:
        evaluate_folders(preds, root)
    assert "liver_1_seg.nii.gz" in str(error.value) and "liver_1.nii.gz" in str(error.value)


def test_non_label_values_are_refused(folders):
    preds, root = folders
    fractional = _labels(6, None).astype(np.float32) * 0.5
    nib.save(nib.Nifti1Image(fractional, AFFINE), str(preds / "liver_1_seg.nii.gz"))
    with pytest.raises(DataError, match="liver_1_seg"):
        evaluate_folders(preds, root)


def test_cli_evaluate(folders, tmp_path, capsys):
    preds, root = folders
    out = tmp_path / "m.csv"
    assert main(["evaluate", str(preds), str(root), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "liver_0" in printed and "mean" in printed and "dice_tumor" in printed
    assert out.is_file()
    assert main(["evaluate", str(preds), str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_subset_of_cases_ignores_the_other_files(folders, tmp_path):
    preds, root = folders
    save_nifti(_labels(6, None), AFFINE, root / "labelsTr" / "liver_9.nii.gz")  # no prediction
    with pytest.raises(DataError):
        evaluate_folders(preds, root)
    assert list(pair_cases(preds, root, cases=["liver_1", "liver_0"])) == ["liver_0", "liver_1"]
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ["liver_9"], "val": ["liver_1"]}))
    assert validation_cases(split) == ["liver_1"]
    table = evaluate_folders(preds, root, cases=validation_cases(split))
    assert "liver_1" in table and "liver_0" not in table and "liver_9" not in table
    assert main(["evaluate", str(preds), str(root), "--split", str(split)]) == 0
    assert main(["evaluate", str(preds), str(root), "--cases", "liver_0", "liver_1"]) == 0


def test_a_subset_lists_cases_without_prediction_or_truth(folders, tmp_path):
    preds, root = folders
    save_nifti(_labels(6, None), AFFINE, root / "labelsTr" / "liver_9.nii.gz")
    with pytest.raises(DataError, match=r"no prediction .* \['liver_9'\]"):
        pair_cases(preds, root, cases=["liver_0", "liver_9"])
    with pytest.raises(DataError, match=r"neither a prediction .* \['liver_42'\]"):
        pair_cases(preds, root, cases=["liver_0", "liver_42"])
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="bad.json is not readable JSON"):
        validation_cases(tmp_path / "bad.json")
    (tmp_path / "noval.json").write_text('{"train": []}')
    with pytest.raises(DataError, match='no list of case ids under "val"'):
        validation_cases(tmp_path / "noval.json")
