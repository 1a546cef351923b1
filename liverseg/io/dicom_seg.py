"""DICOM-SEG out: a label volume predicted from a DICOM CT series, as a DICOM Segmentation.

The Segmentation (highdicom, the ``dicom`` extra) references the source series' instances, frame
by frame, so 3D Slicer, OHIF and PACS viewers show it over the scan it came from. It holds two
binary segments, coded in SNOMED CT as the LiTS labels are defined:

1. ``Liver``: label LIVER (parenchyma; category Anatomical Structure, type Liver),
2. ``Liver tumor``: label TUMOR (category Morphologically Abnormal Structure, type Neoplasm,
   anatomic region Liver),

so the segments do not overlap and the label map is rebuilt exactly as LIVER x liver + TUMOR x
tumor (:func:`read_dicom_seg`). Each segment names the algorithm (liverseg, its version, the
checkpoint or checkpoints). The SEG gets its own Series and SOP Instance UIDs; frames are stored
only where a segment is present (an empty label map has none to keep:
highdicom then stores every frame, empty). Written to a temporary name, then renamed.

Voxel ``[i, j, k]`` of a liverseg volume read from a series is column ``i``, row ``j`` of the
``k``-th slice in the order :func:`liverseg.io.dicom.ordered_series` gives.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pydicom

from liverseg.constants import LIVER, TUMOR
from liverseg.errors import DataError
from liverseg.io.dicom import ordered_series
from liverseg.io.files import atomic_path
from liverseg.version import __version__

log = logging.getLogger(__name__)

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
# Patient and study attributes the SEG copies from its source: DICOM Type 2 (present, may be
# empty). An anonymised or hand-made series may lack them; the SEG then gets them empty.
TYPE2_ATTRIBUTES = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)
# Segment number -> (label value, segment label): the order of the SEG's segments.
SEGMENTS = {1: (LIVER, "Liver"), 2: (TUMOR, "Liver tumor")}


def write_dicom_seg(
    labels: np.ndarray,
    series_folder: str | Path,
    out_path: str | Path,
    *,
    series_uid: str | None = None,
    provenance: Mapping | None = None,
    series_number: int = 9901,
) -> Path:
    """Write ``labels`` as a DICOM Segmentation of the series it was predicted from.

    Args:
        labels: uint8 ``(W, H, D)`` in {BACKGROUND, LIVER, TUMOR}, on the series' own grid
            (as :func:`liverseg.io.read_volume` read it).
        series_folder: The DICOM folder the CT was read from.
        out_path: The ``.dcm`` file to write.
        series_uid: The series read (None: the one :func:`liverseg.io.dicom.ordered_series`
            chooses, as for reading).
        provenance: The settings' provenance (checkpoint or ensemble), recorded as the
            algorithm's parameters.
        series_number: ``SeriesNumber`` of the SEG.

    Raises:
        DataError: The labels do not have the series' shape.
    """
    import highdicom as hd  # the `dicom` extra; imported only where a SEG is written

    files, _, _, name = ordered_series(series_folder, series_uid)
    sources = [_with_type2_attributes(pydicom.dcmread(path)) for path in files]
    if not all(getattr(ds, "FrameOfReferenceUID", None) for ds in sources):
        raise DataError(
            f"{name}: slices without FrameOfReferenceUID (required in a CT image): a DICOM-SEG "
            "cannot be placed on this series; write NIfTI instead (--format nifti)"
        )
    rows, columns = int(sources[0].Rows), int(sources[0].Columns)
    labels = np.asarray(labels)
    if labels.shape != (columns, rows, len(sources)):
        raise DataError(
            f"{name}: labels of shape {labels.shape} do not match the series "
            f"({columns} columns x {rows} rows x {len(sources)} slices)"
        )
    frames = np.moveaxis(labels, 2, 0).transpose(0, 2, 1)  # (slices, rows, columns)
    masks = np.stack([frames == value for value, _ in SEGMENTS.values()], axis=-1)
    algorithm = hd.AlgorithmIdentificationSequence(
        name="liverseg",
        family=_codes().cid7162.ArtificialIntelligence,
        version=__version__,
        parameters=_parameters(provenance),
    )
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=masks,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=_segment_descriptions(hd, algorithm),
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="liverseg",
        manufacturer_model_name="liverseg 3D UNet",
        software_versions=__version__,
        device_serial_number="none",
        series_description="liverseg liver and tumor",
        omit_empty_frames=True,
    )
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        seg.save_as(tmp)
    log.info("%s: DICOM-SEG written to %s (%d frames)", name, out_path, int(seg.NumberOfFrames))
    return out_path


def read_dicom_seg(seg_path: str | Path, series_folder: str | Path, series_uid: str | None = None):
    """The label map of a liverseg DICOM-SEG on the grid of its source series.

    Each frame is mapped to its source slice through its ``ReferencedSOPInstanceUID`` and to its
    label through its segment number (:data:`SEGMENTS`); the DICOM-SEG round trip of
    ``liverseg predict --format dicom-seg``.

    Returns:
        uint8 ``(W, H, D)`` labels, the series' volume's shape and slice order.

    Raises:
        DataError: The file is not a Segmentation, or a frame references an instance that is
            not a slice of the series.
    """
    seg = pydicom.dcmread(seg_path)
    if seg.SOPClassUID != SEG_STORAGE:
        raise DataError(f"{seg_path}: not a DICOM Segmentation (SOP class {seg.SOPClassUID})")
    files, headers, _, name = ordered_series(series_folder, series_uid)
    slice_of = {str(h.SOPInstanceUID): k for k, h in enumerate(headers)}
    labels = np.zeros((int(seg.Columns), int(seg.Rows), len(files)), dtype=np.uint8)
    pixels = seg.pixel_array.reshape(int(seg.NumberOfFrames), int(seg.Rows), int(seg.Columns))
    for frame, group in zip(pixels, seg.PerFrameFunctionalGroupsSequence):
        segment = int(group.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        source = group.DerivationImageSequence[0].SourceImageSequence[0]
        uid = str(source.ReferencedSOPInstanceUID)
        if uid not in slice_of:
            raise DataError(f"{seg_path}: a frame references {uid}, not a slice of {name}")
        labels[:, :, slice_of[uid]][frame.T > 0] = SEGMENTS[segment][0]
    return labels


def _segment_descriptions(hd, algorithm) -> list:
    codes = _codes()
    automatic = hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
    return [
        hd.seg.SegmentDescription(
            segment_number=1,
            segment_label=SEGMENTS[1][1],
            segmented_property_category=codes.SCT.AnatomicalStructure,
            segmented_property_type=codes.SCT.Liver,
            algorithm_type=automatic,
            algorithm_identification=algorithm,
        ),
        hd.seg.SegmentDescription(
            segment_number=2,
            segment_label=SEGMENTS[2][1],
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=codes.SCT.Neoplasm,
            algorithm_type=automatic,
            algorithm_identification=algorithm,
            anatomic_regions=[codes.SCT.Liver],
        ),
    ]


def _with_type2_attributes(source):
    """``source`` (read in memory, the file is untouched) with every Type 2 attribute present."""
    for keyword in TYPE2_ATTRIBUTES:
        if keyword not in source:
            setattr(source, keyword, "")
    return source


def _parameters(provenance: Mapping | None) -> dict[str, str] | None:
    """The checkpoint(s) and epoch(s) as the algorithm's parameters (strings, as DICOM wants)."""
    if not provenance:
        return None
    members = provenance.get("ensemble", [provenance])
    return {
        "checkpoints": " | ".join(str(m.get("checkpoint", "")) for m in members),
        "epochs": " | ".join(str(m.get("epoch", "")) for m in members),
    }


def _codes():
    from pydicom.sr.codedict import codes

    return codes
