"""Two scans of one patient compared: liver alignment, lesion matching, change statuses.

:func:`liverseg.followup.compare.compare_files` is ``liverseg compare``;
:mod:`~liverseg.followup.registration` aligns the livers (SimpleITK),
:mod:`~liverseg.followup.matching` pairs the lesions and states what happened to each,
:mod:`~liverseg.followup.animation` draws the two side by side.
"""
