"""liverseg: liver and liver-tumor segmentation in 3D abdominal CT.

The public API, imported lazily (``import liverseg`` costs nothing; torch is imported on first use
of a name that needs it, so ``liverseg check --help`` never imports it)::

    import liverseg

    model, settings = liverseg.load_model("runs/demo/checkpoints/last.pt")
    prediction = liverseg.predict_volume(model, "ct.nii.gz", settings)
    report = liverseg.case_report(prediction.labels, prediction.affine)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from liverseg.version import __version__  # noqa: F401 - liverseg.__version__

# Public name -> the module that defines it.
_PUBLIC = {
    "load_model": "liverseg.checkpoints",
    "load_models": "liverseg.checkpoints",
    "predict_volume": "liverseg.inference.volume",
    "Prediction": "liverseg.inference.volume",
    "InferenceSettings": "liverseg.inference.settings",
    "Postprocess": "liverseg.inference.postprocess",
    "predict_paths": "liverseg.inference.batch",
    "fit": "liverseg.training.fit",
    "cross_validate": "liverseg.training.cv",
    "load_config": "liverseg.config",
    "case_report": "liverseg.evaluation.report",
    "case_qc": "liverseg.evaluation.qc",
    "QcThresholds": "liverseg.evaluation.qc",
    "evaluate_folders": "liverseg.evaluation.folders",
    "compare_files": "liverseg.followup.compare",
    "compare_scans": "liverseg.followup.compare",
    "check_dataset": "liverseg.data.checks",
    "animate": "liverseg.visualize",
}

__all__ = sorted(_PUBLIC)

if TYPE_CHECKING:  # the names above, for type checkers and IDEs
    from liverseg.checkpoints import load_model, load_models  # noqa: F401
    from liverseg.config import load_config  # noqa: F401
    from liverseg.data.checks import check_dataset  # noqa: F401
    from liverseg.evaluation.folders import evaluate_folders  # noqa: F401
    from liverseg.evaluation.qc import QcThresholds, case_qc  # noqa: F401
    from liverseg.evaluation.report import case_report  # noqa: F401
    from liverseg.followup.compare import compare_files, compare_scans  # noqa: F401
    from liverseg.inference.batch import predict_paths  # noqa: F401
    from liverseg.inference.postprocess import Postprocess  # noqa: F401
    from liverseg.inference.settings import InferenceSettings  # noqa: F401
    from liverseg.inference.volume import Prediction, predict_volume  # noqa: F401
    from liverseg.training.cv import cross_validate  # noqa: F401
    from liverseg.training.fit import fit  # noqa: F401
    from liverseg.visualize import animate  # noqa: F401


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'liverseg' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
