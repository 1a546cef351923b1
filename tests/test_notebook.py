"""notebooks/inference_demo.ipynb runs top to bottom on a fresh kernel, as a user would run it.

With its default parameters the notebook writes phantoms, trains a tiny model, segments the held-out
phantom, shows the report tables and the animation. The kernel runs in a temporary folder, with the
repository on its PYTHONPATH so it imports this checkout of liverseg even when it is not installed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import nbformat
import nibabel as nib
import numpy as np
from nbclient import NotebookClient

from liverseg.constants import BACKGROUND
from liverseg.evaluation.report import case_report

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "inference_demo.ipynb"
CELL_TIMEOUT_S = 180
MAX_FRAMES = 60  # the notebook's animate(..., max_frames=60)
MAX_LESION_ROWS = 10  # the notebook's MAX_LESION_ROWS


def _html_outputs(notebook) -> list[str]:
    return [
        output["data"]["text/html"]
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.output_type in ("display_data", "execute_result")
        and "text/html" in output.get("data", {})
    ]


def _axial_slices_with_foreground(path: Path) -> int:
    """Axial slices (canonical RAS+ z) holding liver or tumor; what the animation shows."""
    labels = np.asanyarray(nib.as_closest_canonical(nib.load(str(path))).dataobj)
    return int((labels != BACKGROUND).any(axis=(0, 1)).sum())


def test_notebook_is_committed_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code
    assert [cell.outputs for cell in code] == [[] for _ in code]
    assert [cell.execution_count for cell in code] == [None for _ in code]
    parameters = [cell for cell in code if "parameters" in cell.metadata.get("tags", [])]
    assert len(parameters) == 1 and "CHECKPOINT = None" in parameters[0].source


def test_notebook_runs_on_phantoms(tmp_path, monkeypatch):
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    monkeypatch.setenv("PYTHONPATH", path)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        notebook,
        kernel_name="python3",
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()  # raises CellExecutionError, with the traceback, if a cell fails

    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    assert [o for o in outputs if o.output_type == "error"] == []

    work = tmp_path / "runs" / "notebook"
    held_out = json.loads((work / "tiny_run" / "split.json").read_text())["val"][0]
    ct_path = work / "phantoms" / "imagesTr" / f"{held_out}.nii.gz"
    truth_path = work / "phantoms" / "labelsTr" / f"{held_out}.nii.gz"
    seg_path = work / "predictions" / f"{held_out}_seg.nii.gz"
    assert sorted((work / "predictions").iterdir()) == [seg_path]
    ct, seg = nib.load(str(ct_path)), nib.load(str(seg_path))
    assert seg.shape == ct.shape
    np.testing.assert_allclose(seg.affine, ct.affine, atol=1e-5)

    # The summary table shows the volumes of the saved prediction and of the reference labels.
    ct_hu = np.asanyarray(ct.dataobj)
    predicted = case_report(np.asanyarray(seg.dataobj), ct.affine, image_hu=ct_hu)
    reference = case_report(np.asanyarray(nib.load(str(truth_path)).dataobj), ct.affine)
    htmls = _html_outputs(notebook)
    summaries = [h for h in htmls if "liver incl. tumor (mL)" in h]
    assert len(summaries) == 1 and "<table" in summaries[0]
    for report in (predicted, reference):
        assert f"<td>{report['liver_volume_ml']:.1f}</td>" in summaries[0]
        assert f"<td>{report['tumor_burden_ml']:.2f}</td>" in summaries[0]

    # One lesion table per report with lesions: its largest lesions, largest first.
    lesion_tables = [h for h in htmls if "long axis (mm)" in h]
    with_lesions = [r for r in (predicted, reference) if r["lesions"]]
    assert reference["lesions"], f"phantom {held_out} has no lesion: the table goes untested"
    assert len(lesion_tables) == len(with_lesions)
    for table, report in zip(lesion_tables, with_lesions, strict=True):
        shown = report["lesions"][:MAX_LESION_ROWS]
        assert table.count("<tr") == 1 + len(shown)  # header + rows
        positions = [table.index(f"<td>{row['volume_ml']:.2f}</td>") for row in shown]
        assert positions == sorted(positions)

    # The animation: one embedded PNG per axial slice holding liver (prediction, else reference).
    animations = [h for h in htmls if 'class="animation"' in h]
    assert len(animations) == 1
    slices = _axial_slices_with_foreground(seg_path) or _axial_slices_with_foreground(truth_path)
    assert animations[0].count("data:image/png;base64,") == min(slices, MAX_FRAMES)
