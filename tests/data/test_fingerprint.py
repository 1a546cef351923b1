"""The spacing fingerprint `liverseg check` prints, and the target spacing it suggests."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from liverseg.cli import main
from liverseg.data.fingerprint import (
    format_fingerprint,
    ras_spacing,
    spacing_fingerprint,
    suggest_spacing,
)


def _write(path, spacing, order=(0, 1, 2)):
    affine = np.zeros((4, 4))
    for stored_axis, ras_axis in enumerate(order):
        affine[ras_axis, stored_axis] = spacing[ras_axis]
    affine[3, 3] = 1.0
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), affine), str(path))
    return path


def test_spacing_is_given_in_ras_order_whatever_the_stored_order():
    affine = np.zeros((4, 4))
    affine[2, 0], affine[0, 1], affine[1, 2], affine[3, 3] = 5.0, -0.7, 0.8, 1.0
    assert ras_spacing(affine) == pytest.approx((0.7, 0.8, 5.0))


def test_median_per_axis_and_the_tenth_percentile_on_a_thick_slice_axis():
    isotropic = np.array([[1.0, 1.0, 1.2], [0.8, 0.8, 1.0], [0.9, 0.9, 1.5]])
    assert suggest_spacing(isotropic) == pytest.approx((0.9, 0.9, 1.2))
    thick = np.array([[0.7, 0.7, z] for z in (0.8, 1.0, 2.5, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0)])
    target = suggest_spacing(thick)
    assert target[2] == pytest.approx(np.percentile(thick[:, 2], 10))
    assert target[:2] == pytest.approx((0.7, 0.7))


def test_fingerprint_of_headers_leaves_out_placeholder_spacings(tmp_path):
    images = [
        _write(tmp_path / "a.nii.gz", (0.7, 0.7, 5.0)),
        _write(tmp_path / "b.nii.gz", (0.8, 0.8, 1.0), order=(2, 0, 1)),
        _write(tmp_path / "c.nii.gz", (0.6, 0.6, 2.0)),
        _write(tmp_path / "placeholder.nii.gz", (1.0, 1.0, 1.0)),
    ]
    (tmp_path / "garbage.nii.gz").write_bytes(b"not a nifti")
    found = spacing_fingerprint([*images, tmp_path / "garbage.nii.gz"])
    assert (found.n_cases, found.n_untrusted) == (3, 2)
    assert found.median == pytest.approx((0.7, 0.7, 2.0))
    assert found.minimum == pytest.approx((0.6, 0.6, 1.0))
    assert found.maximum == pytest.approx((0.8, 0.8, 5.0))
    assert "data.spacing_mm=[0.7, 0.7, 2]" in format_fingerprint(found)
    assert spacing_fingerprint([images[-1]]) is None
    assert "no target spacing" in format_fingerprint(None)


def test_check_prints_the_fingerprint(tmp_path, capsys):
    from liverseg.phantoms import write_dataset

    write_dataset(tmp_path / "ph", cases=3, shape=(32, 32, 24), seed=0, test_cases=0)
    main(["check", str(tmp_path / "ph")])
    out = capsys.readouterr().out
    assert "suggested target: data.spacing_mm=[" in out
    assert "median" in out
