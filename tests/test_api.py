"""The public API: lazy imports, every name resolves, the README's snippet on an original scan."""

from __future__ import annotations

import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

import liverseg


def test_import_is_lazy_and_config_needs_no_torch():
    code = (
        "import sys, liverseg\n"
        "assert 'torch' not in sys.modules, 'import liverseg imported torch'\n"
        "liverseg.load_config, liverseg.case_report, liverseg.evaluate_folders\n"
        "assert 'torch' not in sys.modules, 'config/report/evaluate imported torch'\n"
        "liverseg.predict_volume\n"
        "assert 'torch' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("name", liverseg.__all__)
def test_every_public_name_resolves(name):
    assert getattr(liverseg, name) is not None
    assert name in dir(liverseg)


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'predict'"):
        liverseg.predict  # noqa: B018


def test_readme_snippet_on_an_original_resolution_scan(tmp_path, tiny_checkpoint):
    checkpoint_factor_2 = tiny_checkpoint  # trained on data halved by `liverseg prepare`
    rng = np.random.default_rng(0)
    affine = np.array([[-0.8, 0, 0, 40.0], [0, -0.8, 0, 30.0], [0, 0, 2.0, -60.0], [0, 0, 0, 1]])
    ct = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(rng.normal(40, 90, (37, 33, 21)).astype(np.int16), affine), ct)

    # As the README writes it:
    model, settings = liverseg.load_model(checkpoint_factor_2)
    prediction = liverseg.predict_volume(model, ct, settings)
    report = liverseg.case_report(prediction.labels, prediction.affine)

    assert settings.factor == 2 and settings.provenance["epoch"] == 1
    assert prediction.labels.shape == (37, 33, 21) and prediction.labels.dtype == np.uint8
    np.testing.assert_array_equal(prediction.affine, nib.load(ct).affine)  # float32 in the header
    assert report["spacing_mm"] == pytest.approx([0.8, 0.8, 2.0])
    # `liverseg predict` (its CLI path) builds the same settings from the same checkpoint.
    failures = liverseg.predict_paths(checkpoint_factor_2, [ct], tmp_path / "out", device="cpu")
    assert failures == []
    written = np.asarray(nib.load(tmp_path / "out" / "ct_seg.nii.gz").dataobj)
    np.testing.assert_array_equal(written, prediction.labels)
