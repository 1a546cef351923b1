"""The animation: fixed colors, radiological orientation, slice choice, outputs and errors."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from matplotlib.image import AxesImage
from PIL import Image

from liverseg.constants import BACKGROUND, LIVER, TUMOR
from liverseg.errors import DataError, LiversegError
from liverseg.visualize import animate, animate_files, overlay_rgb, save_animation

SHAPE = (24, 24, 24)
LIVER_SLICES = range(6, 18)
TUMOR_SLICES = range(10, 14)
CT_HU = 40.0  # the window's level: gray 0.5
ALPHA = 0.45
# The fixed colors users read the animation by (not imported, so a swap in the module fails here).
PURPLE, YELLOW = (0.5, 0.0, 0.8), (1.0, 0.9, 0.0)


def _blend(color: tuple[float, float, float], gray: float = 0.5) -> np.ndarray:
    return (1 - ALPHA) * gray + ALPHA * np.asarray(color)


def _phantom() -> tuple[np.ndarray, np.ndarray]:
    """Uniform 40 HU CT; liver box x 4-15, y 6-17, z 6-17; tumor box x 8-11, y 10-13, z 10-13."""
    ct = np.full(SHAPE, CT_HU, dtype=np.int16)
    labels = np.full(SHAPE, BACKGROUND, dtype=np.uint8)
    labels[4:16, 6:18, LIVER_SLICES.start : LIVER_SLICES.stop] = LIVER
    labels[8:12, 10:14, TUMOR_SLICES.start : TUMOR_SLICES.stop] = TUMOR
    return ct, labels


def _frames(anim) -> list[list]:
    """The artists of each frame. Draws once: an animation never drawn warns when collected."""
    frames = list(anim.new_frame_seq())
    frames[0][0].figure.canvas.draw()
    return frames


def _image(frame: list) -> np.ndarray:
    """The RGB uint8 array of a single-panel frame, shape (H, W, 3)."""
    (image,) = [artist for artist in frame if isinstance(artist, AxesImage)]
    return image.get_array()


def _render(anim, index: int):
    """Draw frame ``index`` on the Agg canvas; return (RGB float pixels, figure)."""
    frames = _frames(anim)
    fig = frames[0][0].figure
    for frame in frames:
        for artist in frame:
            artist.set_visible(False)
    for artist in frames[index]:
        artist.set_visible(True)
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3] / 255.0, fig


def _pixel(pixels: np.ndarray, ax, x: int, y: int) -> np.ndarray:
    """Canvas color of RAS voxel (x, y), displayed radiologically at column W-1-x, row H-1-y."""
    col, row = SHAPE[0] - 1 - x, SHAPE[1] - 1 - y
    px, py = ax.transData.transform((col, row))
    return pixels[int(round(pixels.shape[0] - py)), int(round(px))]


def test_overlay_rgb_blends_fixed_colors():
    ct, labels = _phantom()
    rgb = overlay_rgb(ct[:, :, 11], labels[:, :, 11], alpha=ALPHA)
    assert rgb.shape == (24, 24, 3)
    np.testing.assert_allclose(rgb[9, 11], _blend(YELLOW))  # yellow
    np.testing.assert_allclose(rgb[5, 7], _blend(PURPLE))  # purple
    np.testing.assert_allclose(rgb[0, 0], [0.5, 0.5, 0.5])
    tumor, liver = rgb[9, 11], rgb[5, 7]
    assert tumor[0] > 0.7 and tumor[1] > 0.65 and tumor[2] < 0.3
    assert liver[2] > liver[0] > liver[1]

    only_liver = overlay_rgb(ct[:, :, 7], labels[:, :, 7], alpha=ALPHA)
    assert not (labels[:, :, 7] == TUMOR).any()
    np.testing.assert_allclose(only_liver[5, 7], _blend(PURPLE))


def test_overlay_rgb_soft_tissue_window():
    ct = np.array([[-1000.0, -160.0, 40.0, 240.0, 3000.0]])
    rgb = overlay_rgb(ct, None)
    np.testing.assert_allclose(rgb[0, :, 0], [0.0, 0.0, 0.5, 1.0, 1.0])
    np.testing.assert_allclose(rgb[..., 0], rgb[..., 2])


def test_animation_frame_pixels_are_yellow_tumor_and_purple_liver():
    ct, labels = _phantom()
    anim = animate(ct, seg=labels, alpha=ALPHA)
    slices = list(LIVER_SLICES)

    pixels, fig = _render(anim, slices.index(11))
    (ax,) = fig.axes
    np.testing.assert_allclose(_pixel(pixels, ax, 9, 11), _blend(YELLOW), atol=0.02)
    np.testing.assert_allclose(_pixel(pixels, ax, 5, 7), _blend(PURPLE), atol=0.02)
    np.testing.assert_allclose(_pixel(pixels, ax, 20, 2), [0.5, 0.5, 0.5], atol=0.02)

    pixels, _ = _render(anim, slices.index(7))  # liver only: still the same purple
    np.testing.assert_allclose(_pixel(pixels, ax, 9, 11), _blend(PURPLE), atol=0.02)


def test_slice_number_is_a_per_frame_text_artist():
    ct, labels = _phantom()
    frames = _frames(animate(ct, truth=labels))
    texts = [[a.get_text() for a in frame if hasattr(a, "get_text")] for frame in frames]
    assert texts == [[f"slice {k}"] for k in LIVER_SLICES]


def test_liver_only_picks_the_liver_slices():
    ct, labels = _phantom()
    assert len(_frames(animate(ct, seg=labels))) == len(LIVER_SLICES)
    assert len(_frames(animate(ct, seg=labels, liver_only=False))) == SHAPE[2]
    assert len(_frames(animate(ct, seg=labels, max_frames=5))) == 5
    assert len(_frames(animate(ct))) == SHAPE[2]
    empty = np.zeros_like(labels)
    assert len(_frames(animate(ct, seg=empty))) == SHAPE[2]
    # An empty prediction falls back to the ground truth's liver slices.
    assert len(_frames(animate(ct, seg=empty, truth=labels))) == len(LIVER_SLICES)


def test_prediction_and_truth_side_by_side():
    ct, labels = _phantom()
    frames = _frames(animate(ct, seg=labels, truth=labels, title="case 0"))
    fig = frames[0][0].figure
    assert [ax.get_title() for ax in fig.axes] == ["prediction", "ground truth"]
    assert fig.get_suptitle() == "case 0"
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["liver", "tumor"]
    # Each frame shows one image and one slice number per panel.
    assert all(len(frame) == 4 for frame in frames)


def test_radiological_orientation_and_reorientation(tmp_path):
    ct, labels = _phantom()
    marker = np.zeros_like(labels)
    marker[20:, 20:, 3] = LIVER  # patient's right (high x in RAS+), anterior (high y)
    (frame,) = _frames(animate(ct, seg=marker))
    image = _image(frame)
    liver_rows, liver_cols = np.nonzero(image[..., 2] > image[..., 1] + 50)
    assert liver_rows.max() < 4 and liver_cols.max() < 4  # top-left of the image

    ras, lps = tmp_path / "ras.nii.gz", tmp_path / "lps.nii.gz"
    lps_affine = np.diag([-2.0, -2.0, 3.0, 1.0])
    for path, affine, flip in (
        (ras, np.diag([2.0, 2.0, 3.0, 1.0]), False),
        (lps, lps_affine, True),
    ):
        label_data = marker[::-1, ::-1] if flip else marker
        nib.save(nib.Nifti1Image(label_data, affine), path)
        nib.save(nib.Nifti1Image(ct, affine), path.with_name(f"ct_{path.name}"))
    images = []
    for path in (ras, lps):
        (frame,) = _frames(animate(path.with_name(f"ct_{path.name}"), seg=path))
        images.append(_image(frame))
    np.testing.assert_array_equal(images[0], images[1])
    np.testing.assert_array_equal(images[0], image)

    # The same reorientation from an array and its affine.
    (frame,) = _frames(animate(ct, seg=marker[::-1, ::-1].copy(), affine=lps_affine))
    np.testing.assert_array_equal(_image(frame), image)


def test_gif_and_html_outputs(tmp_path):
    ct, labels = _phantom()
    anim = animate(ct, seg=labels, truth=labels, max_frames=4)
    gif = save_animation(anim, tmp_path / "a.gif")
    with Image.open(gif) as image:
        assert image.n_frames == 4
    html = save_animation(anim, tmp_path / "a.html").read_text()
    assert html.count("data:image/png;base64") == 4
    assert 'class="animation"' in html and "anim_step_forward" in html  # jshtml player
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gif", "a.html"]  # no temp files


def test_animate_files_leaves_no_pyplot_figures(tmp_path):
    import matplotlib.pyplot as plt

    ct, labels = _phantom()
    affine = np.eye(4)
    nib.save(nib.Nifti1Image(ct, affine), tmp_path / "ct.nii.gz")
    nib.save(nib.Nifti1Image(labels, affine), tmp_path / "seg.nii.gz")
    before = plt.get_fignums()
    out = animate_files(tmp_path / "ct.nii.gz", seg=tmp_path / "seg.nii.gz", out=tmp_path / "o.gif")
    assert out.stat().st_size > 0
    assert plt.get_fignums() == before


def test_bad_inputs(tmp_path):
    ct, labels = _phantom()
    affine = np.eye(4)
    ct_path, seg_path = tmp_path / "ct.nii.gz", tmp_path / "seg.nii.gz"
    nib.save(nib.Nifti1Image(ct, affine), ct_path)
    nib.save(nib.Nifti1Image(labels[:, :, :20], affine), seg_path)

    with pytest.raises(DataError, match="missing.nii.gz"):
        animate_files(tmp_path / "missing.nii.gz", out=tmp_path / "o.gif")
    with pytest.raises(DataError, match="nope.nii.gz"):
        animate_files(ct_path, truth=tmp_path / "nope.nii.gz", out=tmp_path / "o.gif")
    with pytest.raises(LiversegError, match=r"\.gif, \.html"):
        animate_files(ct_path, out=tmp_path / "o.mp4")
    with pytest.raises(DataError, match="seg.nii.gz.*ct.nii.gz"):
        animate_files(ct_path, seg=seg_path, out=tmp_path / "o.gif")
    junk = tmp_path / "._liver_0.nii.gz"
    junk.write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    with pytest.raises(DataError, match="._liver_0.nii.gz"):
        animate_files(ct_path, seg=junk, out=tmp_path / "o.gif")
    with pytest.raises(DataError, match=r"label values \[3\]"):
        animate(ct, seg=np.full(SHAPE, 3, dtype=np.uint8))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "._liver_0.nii.gz",
        "ct.nii.gz",
        "seg.nii.gz",
    ]


def test_real_ct_animates(real_ct, tmp_path):
    image, mask = real_ct
    out = animate_files(image, truth=mask, out=tmp_path / "real.gif")
    liver_slices = int(np.asanyarray(nib.load(mask).dataobj).any(axis=(0, 1)).sum())
    with Image.open(out) as gif:
        assert gif.n_frames == liver_slices


def test_scaled_ct_file_is_not_read_as_float64(tmp_path, monkeypatch):
    import liverseg.visualize

    ct, labels = _phantom()
    stored = np.full(SHAPE, 540, dtype=np.int16)  # 540 * 0.5 - 230 = 40 HU
    image = nib.Nifti1Image(stored, np.eye(4))
    image.header.set_slope_inter(0.5, -230.0)
    scaled, plain = tmp_path / "scaled.nii.gz", tmp_path / "plain.nii.gz"
    nib.save(image, scaled)
    nib.save(nib.Nifti1Image(ct, np.eye(4)), plain)
    assert nib.load(scaled).get_fdata().dtype == np.float64  # what a careless read would give
    fed = []
    overlay = liverseg.visualize.overlay_rgb

    def spy(ct_slice, *args, **kwargs):
        fed.append((ct_slice.dtype, float(ct_slice[0, 0])))
        return overlay(ct_slice, *args, **kwargs)

    monkeypatch.setattr(liverseg.visualize, "overlay_rgb", spy)
    _frames(animate(scaled, seg=labels, max_frames=2))
    assert fed == [(np.dtype(np.float32), CT_HU)] * 2
    fed.clear()
    _frames(animate(plain, seg=labels, max_frames=2))
    assert fed == [(np.dtype(np.int16), CT_HU)] * 2
