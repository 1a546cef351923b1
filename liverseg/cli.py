"""The ``liverseg`` command: subcommands only, each a few lines of wiring.

Errors of the user's input (:class:`liverseg.errors.LiversegError`) and filesystem errors (a full
disk, a read-only folder: :data:`liverseg.writable.FILESYSTEM_FIXES`) become one line on stderr and
exit code 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from liverseg.constants import TTA_FLIPS
from liverseg.errors import LiversegError, WorkerError
from liverseg.writable import (
    UnwritableError,
    check_writable_dir,
    check_writable_file,
    describe_os_error,
)


def _phantoms(args: argparse.Namespace) -> int:
    from liverseg.phantoms import write_dataset

    write_dataset(
        args.out_dir,
        cases=args.cases,
        shape=tuple(args.shape),
        seed=args.seed,
        test_cases=args.test_cases,
        junk=args.junk,
        followup=args.followup,
    )
    pairs = ", each with a follow-up in followup/" if args.followup else ""
    print(f"wrote {args.cases} phantom cases to {args.out_dir}{pairs}")
    return 0


def _add_phantoms_parser(sub) -> None:
    p = sub.add_parser("phantoms", help="write synthetic abdominal CTs in Task03 layout")
    p.add_argument("out_dir", type=Path)
    p.add_argument("--cases", type=int, default=8)
    p.add_argument("--shape", type=int, nargs=3, default=(128, 128, 96), metavar=("X", "Y", "Z"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test-cases", type=int, default=2, help="unlabeled cases in imagesTs/")
    p.add_argument("--junk", action="store_true", help="also write macOS ._ files")
    p.add_argument(
        "--followup",
        action="store_true",
        help="also a follow-up scan of each labeled case, with the truth of its lesions' changes "
        "(followup/imagesTr, followup/labelsTr, followup/truth)",
    )
    p.set_defaults(func=_phantoms)


def _check(args: argparse.Namespace) -> int:
    from liverseg.data.cases import discover_cases
    from liverseg.data.checks import check_dataset
    from liverseg.data.fingerprint import format_fingerprint, spacing_fingerprint
    from liverseg.data.problems import format_problems, has_errors

    problems = check_dataset(
        args.data_dir,
        affine_tolerance_mm=args.affine_tolerance_mm,
        copy_label_geometry=args.copy_label_geometry,
    )
    cases, _ = discover_cases(args.data_dir)
    print(format_fingerprint(spacing_fingerprint([case.image for case in cases])))
    print(format_problems(problems))  # last: it ends with the count of errors and warnings
    return 1 if has_errors(problems) else 0


def _add_check_parser(sub) -> None:
    p = sub.add_parser("check", help="the data doctor: find every problem of a Task03 folder")
    p.add_argument("data_dir", type=Path)
    p.add_argument("--affine-tolerance-mm", type=float, default=0.01)
    p.add_argument(
        "--copy-label-geometry",
        action="store_true",
        help="accept label affines that differ from the image's (the image's is used)",
    )
    p.set_defaults(func=_check)


def _prepare(args: argparse.Namespace) -> int:
    from liverseg.data.prepare import prepare_dataset

    summary = prepare_dataset(
        args.src_dir,
        args.out_dir,
        factor=args.factor,
        workers=args.workers,
        spacing_mm=args.spacing,
    )
    print(summary)
    return 0


def _add_prepare_parser(sub) -> None:
    p = sub.add_parser(
        "prepare",
        help="halve every axis of a Task03 folder, or resample it to a target spacing (resumable)",
    )
    p.add_argument("src_dir", type=Path)
    p.add_argument("out_dir", type=Path)
    how = p.add_mutually_exclusive_group()
    how.add_argument(
        "--factor", type=int, default=None, help="integer reduction of every axis (default: 2)"
    )
    how.add_argument(
        "--spacing", type=float, nargs=3, default=None, metavar=("X", "Y", "Z"),
        help="resample every case to this spacing instead, mm per RAS axis (as data.spacing_mm)",
    )  # fmt: skip
    p.add_argument("--workers", type=int, default=None, help="processes (default: CPU count)")
    p.set_defaults(func=_prepare)


def _train(args: argparse.Namespace) -> int:
    from liverseg.config import load_config
    from liverseg.training.fit import fit

    fit(load_config(args.config, tuple(args.overrides)))
    return 0


def _add_train_parser(sub) -> None:
    p = sub.add_parser("train", help="train a model (same as python main.py)")
    p.add_argument("--config", type=Path, default=None)
    p.add_argument("overrides", nargs="*", help="key.sub=value")
    p.set_defaults(func=_train)


def _cv(args: argparse.Namespace) -> int:
    from liverseg.config import load_config
    from liverseg.training.cv import cross_validate

    result = cross_validate(load_config(args.config, tuple(args.overrides)))
    print(result["table"])
    print(f"wrote {result['summary']}")
    return 0


def _add_cv_parser(sub) -> None:
    p = sub.add_parser(
        "cv", help="k-fold cross-validation: train each fold in run.dir/fold_K, score every case"
    )
    p.add_argument("--config", type=Path, default=None)
    p.add_argument("overrides", nargs="*", help="key.sub=value, e.g. data.folds=5")
    p.set_defaults(func=_cv)


def _predict(args: argparse.Namespace) -> int:
    from liverseg.inference.batch import predict_paths

    checkpoints, inputs = _split_checkpoints(args.checkpoint)
    inputs += args.inputs
    if not inputs:
        raise LiversegError(
            "predict needs at least one input: a NIfTI file, a folder of them or a DICOM folder"
        )
    if os.environ.get("RANK", "0") == "0":  # under torchrun, ranks probing at once could collide
        check_writable_dir(args.out, "--out")
    try:
        failures = predict_paths(
            checkpoints,
            inputs,
            args.out,
            overwrite=args.overwrite,
            prepared=args.prepared,
            device=args.device,
            tta_flips=args.tta,
            skip_air_windows=args.skip_air,
            series_uid=args.series,
            workers=args.workers,
            output_format=args.format,
        )
    except WorkerError as error:  # the inputs that failed in the other workers, then the error
        _print_failures(error.failures)
        raise
    _print_failures(failures)
    return 1 if failures else 0


def _print_failures(failures: list[tuple[Path, str]]) -> None:
    for path, message in failures:
        print(f"error: {path}: {message}", file=sys.stderr)


def _split_checkpoints(values: list[Path]) -> tuple[list[Path], list[Path]]:
    """``--checkpoint``'s values as ``(checkpoints, inputs)``.

    argparse gives ``--checkpoint`` every value up to the next option, inputs included
    (``--checkpoint best.pt ct.nii.gz``): the first value is a checkpoint, and so is each next
    one while it ends in ``.pt``; the values from the first other one on are inputs.
    """
    count = 1
    while count < len(values) and values[count].suffix == ".pt":
        count += 1
    return values[:count], values[count:]


def _add_predict_parser(sub) -> None:
    p = sub.add_parser("predict", help="segment CT volumes with a checkpoint or an ensemble")
    p.add_argument(
        "--checkpoint", type=Path, nargs="+", action="extend", required=True, metavar="CKPT",
        help="a checkpoint, or several .pt files whose probabilities are averaged (an ensemble)",
    )  # fmt: skip
    p.add_argument(
        "inputs", type=Path, nargs="*",
        help="NIfTI files, folders of them, or DICOM folders (one series each: the CT series)",
    )  # fmt: skip
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument(
        "--prepared", action="store_true", help="inputs were already reduced by `liverseg prepare`"
    )
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--tta", type=int, choices=TTA_FLIPS, default=None, metavar="FLIPS",
        help="mirrored passes averaged per window: 1, 2, 4 or 8 (default: the checkpoint's)",
    )  # fmt: skip
    p.add_argument(
        "--skip-air", action=argparse.BooleanOptionalAction, default=None,
        help="skip the air around the body: windows over the body's box, windows of nothing "
        "but air not run (default: the checkpoint's, on); --no-skip-air runs every window",
    )  # fmt: skip
    p.add_argument(
        "--series", default=None, metavar="UID",
        help="the SeriesInstanceUID to read from DICOM folders (default: the CT series with the "
        "most slices)",
    )  # fmt: skip
    p.add_argument(
        "--workers", type=int, default=1, metavar="N",
        help="processes that share the inputs, each loading the checkpoints once (default: 1; "
        "under torchrun each rank takes a share instead)",
    )  # fmt: skip
    p.add_argument(
        "--format", choices=("nifti", "dicom-seg", "both"), default="nifti",
        help="segmentation files: <id>_seg.nii.gz (default), <id>_seg.dcm (a DICOM-SEG over the "
        "input series; DICOM inputs, `pip install 'liverseg[dicom]'`) or both",
    )  # fmt: skip
    p.set_defaults(func=_predict)


def _evaluate(args: argparse.Namespace) -> int:
    from liverseg.data.splits import validation_cases
    from liverseg.evaluation.folders import evaluate_folders

    cases = list(args.cases) if args.cases else None
    if args.split is not None:
        cases = (cases or []) + validation_cases(args.split)
    if args.out is not None:
        check_writable_file(args.out, "--out", example_name="metrics.csv")
    try:
        table = evaluate_folders(args.pred_dir, args.gt_dir, out_csv=args.out, cases=cases)
    except UnwritableError as exc:
        if exc.result is not None:  # the metrics were computed: show them before the error
            print(exc.result)
        raise
    print(table)
    return 0


def _add_evaluate_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="Dice, VOE, RVD, ASSD, HD95 and lesion detection")
    p.add_argument("pred_dir", type=Path)
    p.add_argument("gt_dir", type=Path)
    p.add_argument("--out", type=Path, default=None, help="metrics CSV")
    p.add_argument("--cases", nargs="+", default=None, metavar="ID", help="only these case ids")
    p.add_argument(
        "--split", type=Path, default=None, metavar="SPLIT_JSON",
        help="only the validation cases of a run's split.json",
    )  # fmt: skip
    p.set_defaults(func=_evaluate)


def _animate(args: argparse.Namespace) -> int:
    from liverseg.visualize import animate_files

    animate_files(args.ct, seg=args.seg, truth=args.truth, out=args.out)
    print(f"wrote {args.out}")
    return 0


def _add_animate_parser(sub) -> None:
    p = sub.add_parser("animate", help="animate axial slices: liver purple, tumor yellow")
    p.add_argument("ct", type=Path)
    p.add_argument("--seg", type=Path, default=None)
    p.add_argument("--truth", type=Path, default=None)
    p.add_argument("--out", type=Path, required=True, help="FILE.gif or FILE.html")
    p.set_defaults(func=_animate)


def _compare(args: argparse.Namespace) -> int:
    from liverseg.followup.compare import compare_files
    from liverseg.followup.matching import ChangeRules

    scans = _compare_inputs(args)
    rules = ChangeRules(rule=args.rule, max_distance_mm=args.max_distance_mm)
    result = compare_files(*scans, args.out, rules, animation=not args.no_animation)
    patient = result["patient"]
    counts = {}
    for row in result["lesions"]:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    burden = patient["tumor_burden_ml"]
    print(
        f"{patient['response']}: tumor burden {burden['baseline']:.1f} -> "
        f"{burden['followup']:.1f} mL; lesions: "
        + (", ".join(f"{n} {status}" for status, n in sorted(counts.items())) or "none")
    )
    for warning in result["warnings"]:
        print(f"WARNING: {warning}")
    print(f"wrote {args.out / 'comparison.json'}, comparison.csv"
          + ("" if args.no_animation else ", comparison.html"))  # fmt: skip
    return 0


def _compare_inputs(args: argparse.Namespace) -> list[tuple]:
    """``(CT, segmentation)`` of each scan; segmentations predicted when --checkpoint is given."""
    expected = 1 if args.checkpoint else 2
    for name in ("baseline", "followup"):
        if len(getattr(args, name)) != expected:
            what = "CT only (the checkpoint segments it)" if args.checkpoint else "CT and SEG"
            raise LiversegError(f"--{name}: give the {what}, got {getattr(args, name)}")
    if not args.checkpoint:
        return [tuple(args.baseline), tuple(args.followup)]
    import nibabel as nib

    from liverseg.checkpoints import load_models
    from liverseg.inference.volume import predict_volume
    from liverseg.io import read_volume

    models, settings = load_models(args.checkpoint, args.device)
    scans = []
    for (ct,) in (args.baseline, args.followup):
        hu, affine = read_volume(ct)
        labels = predict_volume(models, nib.Nifti1Image(hu, affine), settings).labels
        scans.append((ct, labels))
    return scans


def _add_compare_parser(sub) -> None:
    p = sub.add_parser(
        "compare", help="two scans of one patient: lesions new, growing, shrinking, gone"
    )
    p.add_argument("--baseline", type=Path, nargs="+", required=True, metavar="PATH",
                   help="CT (NIfTI or DICOM folder) and its label map; the CT alone with "
                   "--checkpoint")  # fmt: skip
    p.add_argument("--followup", type=Path, nargs="+", required=True, metavar="PATH",
                   help="the later scan, the same way")  # fmt: skip
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--checkpoint", type=Path, nargs="+", default=None,
                   help="segment both CTs with this model (or ensemble) first")  # fmt: skip
    p.add_argument("--device", default="auto")
    p.add_argument("--rule", choices=("volume", "diameter"), default="volume",
                   help="which rule sets each lesion's status (both are reported)")  # fmt: skip
    p.add_argument("--max-distance-mm", type=float, default=10.0,
                   help="pair unoverlapping lesions whose centroids lie this close after "
                   "alignment")  # fmt: skip
    p.add_argument("--no-animation", action="store_true", help="skip comparison.html")
    p.set_defaults(func=_compare)


_SUBCOMMAND_PARSERS = (
    _add_phantoms_parser,
    _add_check_parser,
    _add_prepare_parser,
    _add_train_parser,
    _add_cv_parser,
    _add_predict_parser,
    _add_evaluate_parser,
    _add_animate_parser,
    _add_compare_parser,
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``liverseg`` command."""
    parser = argparse.ArgumentParser(prog="liverseg", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    for add_parser in _SUBCOMMAND_PARSERS:
        add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose or args.command in ("train", "cv") else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except LiversegError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        message = describe_os_error(exc)
        if args.debug or message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
