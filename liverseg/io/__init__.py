"""Files: the one volume reader and writer, the one lister (NIfTI, DICOM folders), safe writes.

- :mod:`~liverseg.io.volumes`: ``read_volume`` / ``read_labels`` / ``read_stored`` / ``save_nifti``
- :mod:`~liverseg.io.integrity`: the header's data size against the file, missing files explained
- :mod:`~liverseg.io.listing`: ``list_nifti``, ``list_dicom``, case ids, natural sort
- :mod:`~liverseg.io.dicom`: ``read_dicom_series`` (needs pydicom: imported only when used),
  :mod:`~liverseg.io.dicom_geometry`: a series' slice order and affine
- :mod:`~liverseg.io.files`: ``atomic_path``, the temporary names it uses, stale temp files
"""

from liverseg.io.files import (
    SHARED_TEMP_MIN_AGE_S,
    atomic_path,
    fingerprint,
    remove_stale_temp_files,
    stale_temp_files,
    temp_destination,
)
from liverseg.io.integrity import (
    GZIP_CHUNK_BYTES,
    check_data_size,
    data_size_problem,
    missing_file_reason,
)
from liverseg.io.listing import (
    NIFTI_SUFFIXES,
    case_id_of,
    is_dicom_file,
    list_dicom,
    list_nifti,
    natural_key,
)
from liverseg.io.volumes import (
    Source,
    read_labels,
    read_stored,
    read_volume,
    save_nifti,
    source_name,
    stored_voxels,
)

__all__ = [
    "GZIP_CHUNK_BYTES",
    "NIFTI_SUFFIXES",
    "SHARED_TEMP_MIN_AGE_S",
    "Source",
    "atomic_path",
    "case_id_of",
    "check_data_size",
    "data_size_problem",
    "fingerprint",
    "is_dicom_file",
    "list_dicom",
    "list_nifti",
    "missing_file_reason",
    "natural_key",
    "read_labels",
    "read_stored",
    "read_volume",
    "remove_stale_temp_files",
    "save_nifti",
    "source_name",
    "stale_temp_files",
    "stored_voxels",
    "temp_destination",
]
