"""Follow-up phantom pairs: the truth agrees with both scans' label maps, the follow-up moved as
stated, the written layout, the refused combinations, and ordinary phantoms left unchanged."""

from __future__ import annotations

import hashlib
import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from liverseg.cli import main
from liverseg.constants import LIVER, TUMOR
from liverseg.errors import LiversegError
from liverseg.phantoms import case_seed, render_case, render_followup, write_dataset
from liverseg.phantoms.grid import TISSUE_CODE

SHAPE = (64, 64, 48)
# Between them these seeds' pairs hold every status; 2, 6 and 7 are stored LPS, 9 RAS.
SEEDS = (2, 6, 7, 9)
# sha256 of image, label, affine and tissue bytes, computed before tumors.py was split into
# drawing and painting (and case.py was split off): ordinary phantoms must stay bit-for-bit.
ORDINARY = {
    ((32, 32, 24), 3): "fd99455a7dd599c2c408296b7b1b273b67e3035e431d503055b7b37d403c16f7",
    ((48, 48, 32), 7): "7c18f52d93617cd98b4fe93cf464de95b808a135cbadb005c6ec19e630cfe76f",
    ((64, 64, 48), case_seed(21, 0)): (
        "b9576beb9870fa3261c119547689f2a4ad9f08079cb55bfc03fd7956dfeffad8"
    ),
    ((40, 40, 28), 123): "3ad196fc0b48a9fc01c6d7176df20a2a5ccbae245d683f3030031a311fec5af3",
}
# Radius factors 1.35 and 0.55 (volume x2.46 and x0.17), stable 1 +- 3%; voxelisation of
# lesions of a few dozen 6 mm voxels moves a volume by up to ~15% more.
VOLUME_RATIOS = {"growing": (1.7, 3.5), "shrinking": (0.08, 0.3), "stable": (0.75, 1.33)}


@pytest.fixture(scope="module")
def pairs():
    return {seed: render_followup(SHAPE, seed) for seed in SEEDS}


def _sha256(case) -> str:
    digest = hashlib.sha256()
    for array in (case.image, case.label, case.affine, case.tissue):
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def _centroid_mm(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return affine[:3, :3] @ np.argwhere(mask).mean(0) + affine[:3, 3]


def _rotation(degrees) -> np.ndarray:
    """``Rz Ry Rx`` of the truth's ``rotation_deg``."""
    x, y, z = np.radians(degrees)
    rx = np.array([[1, 0, 0], [0, np.cos(x), -np.sin(x)], [0, np.sin(x), np.cos(x)]])
    ry = np.array([[np.cos(y), 0, np.sin(y)], [0, 1, 0], [-np.sin(y), 0, np.cos(y)]])
    rz = np.array([[np.cos(z), -np.sin(z), 0], [np.sin(z), np.cos(z), 0], [0, 0, 1]])
    return rz @ ry @ rx


@pytest.mark.parametrize(("shape", "seed"), list(ORDINARY))
def test_ordinary_phantoms_are_bit_for_bit_unchanged(shape, seed):
    assert _sha256(render_case(shape, seed)) == ORDINARY[(shape, seed)]


def test_the_truth_has_exactly_its_keys_and_survives_json(pairs):
    _, _, truth = pairs[SEEDS[0]]
    assert json.loads(json.dumps(truth)) == truth
    assert set(truth) == {"case", "motion", "lesions", "tumor_burden_ml"}
    assert set(truth["motion"]) == {"rotation_deg", "translation_mm", "breathing_mm"}
    assert set(truth["tumor_burden_ml"]) == {"baseline", "followup"}
    measured = {"centroid_mm", "volume_ml", "voxels"}
    for lesion in truth["lesions"]:
        assert set(lesion) == {"id", "status", "baseline", "followup"}
        for side in ("baseline", "followup"):
            assert lesion[side] is None or set(lesion[side]) == measured


def test_every_status_occurs_and_matches_what_is_in_each_scan(pairs):
    statuses = {lesion["status"] for _, _, truth in pairs.values() for lesion in truth["lesions"]}
    assert statuses == {"stable", "growing", "shrinking", "disappeared", "new"}
    for _, _, truth in pairs.values():
        for lesion in truth["lesions"]:
            assert (lesion["baseline"] is None) == (lesion["status"] == "new")
            assert (lesion["followup"] is None) == (lesion["status"] == "disappeared")
            low, high = VOLUME_RATIOS.get(lesion["status"], (0, np.inf))
            if lesion["baseline"] and lesion["followup"]:
                ratio = lesion["followup"]["volume_ml"] / lesion["baseline"]["volume_ml"]
                assert low <= ratio <= high, (lesion, ratio)


def test_the_truth_is_measured_on_the_label_maps(pairs):
    for baseline, followup, truth in pairs.values():
        for side, scan in (("baseline", baseline), ("followup", followup)):
            np.testing.assert_array_equal(scan.lesion_ids > 0, scan.label == TUMOR)
            voxel_ml = abs(np.linalg.det(scan.affine[:3, :3])) / 1000
            present = [lesion for lesion in truth["lesions"] if lesion[side]]
            for lesion in present:
                mask = scan.lesion_ids == lesion["id"]
                entry = lesion[side]
                assert entry["voxels"] == mask.sum() >= 8
                assert entry["volume_ml"] == pytest.approx(mask.sum() * voxel_ml, abs=1e-3)
                centroid = _centroid_mm(mask, scan.affine)
                np.testing.assert_allclose(entry["centroid_mm"], centroid, atol=0.01)
            absent = [lesion["id"] for lesion in truth["lesions"] if not lesion[side]]
            assert not np.isin(scan.lesion_ids, absent).any()
            # Lesions never touch: one 26-connected component of the tumor label per lesion.
            _, components = ndimage.label(scan.label == TUMOR, structure=np.ones((3, 3, 3)))
            assert components == len(present)
            burden = (scan.label == TUMOR).sum() * voxel_ml
            assert truth["tumor_burden_ml"][side] == pytest.approx(burden, abs=1e-3)


def test_both_scans_show_the_same_patient_with_their_own_noise(pairs):
    baseline, followup, _ = pairs[SEEDS[-1]]
    healthy = render_case(SHAPE, SEEDS[-1], tumor_free=True)
    tissue = baseline.tissue.copy()
    tissue[tissue == TISSUE_CODE["tumor"]] = TISSUE_CODE["liver"]
    np.testing.assert_array_equal(tissue, healthy.tissue)
    np.testing.assert_array_equal(baseline.affine, healthy.affine)
    assert followup.image.shape == baseline.image.shape
    assert not np.allclose(followup.affine, baseline.affine)
    assert (followup.image != baseline.image).mean() > 0.5


@pytest.mark.parametrize("seed", [4, 7])
def test_the_liver_moves_by_the_stated_motion(seed):
    # A field of view with room around the liver, so neither scan cuts it.
    baseline, followup, truth = render_followup(SHAPE, seed, fov_mm=(400, 400, 300))
    motion = truth["motion"]
    centre = baseline.affine[:3, :3] @ ((np.array(SHAPE) - 1) / 2) + baseline.affine[:3, 3]
    before, after = (
        _centroid_mm(np.isin(scan.label, (LIVER, TUMOR)), scan.affine)
        for scan in (baseline, followup)
    )
    rigid = _rotation(motion["rotation_deg"]) @ (before - centre) + centre
    rigid += motion["translation_mm"]
    assert np.linalg.norm(rigid - before) > 8  # the test can tell a moved liver from a still one
    # Breathing moves the liver superior-inferior only, by up to breathing_mm.
    residual = after - rigid
    assert np.abs(residual[:2]).max() < 2.0
    low, high = sorted((0.0, motion["breathing_mm"]))
    assert low - 1.5 < residual[2] < high + 1.5
    assert abs(residual[2]) > 0.4 * abs(motion["breathing_mm"])


def test_a_tumor_free_baseline_may_get_only_new_lesions():
    baseline, followup, truth = render_followup(SHAPE, 6, tumor_free=True)
    assert baseline.tumor_free and not (baseline.label == TUMOR).any()
    assert all(lesion["status"] == "new" for lesion in truth["lesions"])
    assert followup.tumor_free == (not truth["lesions"])
    assert truth["tumor_burden_ml"]["baseline"] == 0


def test_cli_writes_the_followup_layout(tmp_path, capsys):
    out = tmp_path / "ph"
    argv = ["phantoms", str(out), "--cases", "2", "--shape", "64", "64", "48", "--followup"]
    assert main([*argv, "--test-cases", "1"]) == 0
    assert "each with a follow-up in followup/" in capsys.readouterr().out
    for index in range(2):
        name = f"liver_{index}"
        truth = json.loads((out / "followup" / "truth" / f"{name}.json").read_text())
        assert truth["case"] == name
        baseline, followup, expected = render_followup(SHAPE, case_seed(0, index), case_id=name)
        assert truth == expected
        for folder, scan in ((out, baseline), (out / "followup", followup)):
            image = nib.load(folder / "imagesTr" / f"{name}.nii.gz")
            label = nib.load(folder / "labelsTr" / f"{name}.nii.gz")
            np.testing.assert_array_equal(np.asanyarray(label.dataobj), scan.label)
            np.testing.assert_allclose(image.affine, scan.affine)
            np.testing.assert_allclose(label.affine, scan.affine)
    assert sorted(p.name for p in (out / "imagesTs").iterdir()) == ["liver_2.nii.gz"]
    leftovers = [p for p in out.rglob("*") if ".tmp" in p.name]
    assert not leftovers


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--cases", "0", "--followup"], "--followup: expected --cases >= 1"),
        (
            ["--cases", "1", "--shape", "32", "32", "24", "--followup"],
            "expected --shape of at least 53 53 38",
        ),
    ],
)
def test_cli_refuses_a_followup_it_cannot_make(tmp_path, capsys, args, words):
    out = tmp_path / "ph"
    assert main(["phantoms", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_python_refuses_a_followup_it_cannot_make(tmp_path):
    with pytest.raises(LiversegError, match="expected --cases >= 1"):
        write_dataset(tmp_path / "ph", cases=0, shape=SHAPE, followup=True)
    with pytest.raises(LiversegError, match="voxels of at most 8 mm"):
        render_followup((48, 48, 32), 0)
    with pytest.raises(LiversegError, match="three whole sizes"):
        render_followup((64, 64), 0)
