"""The training data pipeline: tio.Subject over the cache, patch sets, tio.Queue, DataLoader.

Each case is preprocessed once into a cache of memory-mapped arrays
(:mod:`liverseg.training.cache`); the DataLoader workers cut each volume's patches
(:mod:`liverseg.training.patches`), and a ``tio.Queue`` mixes them across volumes into batches.
Under torchrun each rank's Queue reads only its share of the volumes, through a
``DistributedSampler`` (:class:`RankShareSampler`), torchio's documented way.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torchio as tio
from torch.utils.data.distributed import DistributedSampler

from liverseg.constants import CASE_ID, IMAGE, LABEL
from liverseg.training.cache import CachedCase, load_class_locations
from liverseg.training.patches import (
    extract_patch,
    mirror_patch,
    random_affine_matrix,
    sample_centres,
)

log = logging.getLogger(__name__)


def build_subject(cached: CachedCase) -> tio.Subject:
    """A tio.Subject over the memory-mapped cached arrays: nothing is read until a patch is cut.

    Returns:
        Subject with ``image`` (1, W, H, D) float16 in (-1, 1), ``label`` (1, W, H, D) uint8 and
        ``case_id``; the affine holds the spacing only (the arrays are canonical).
    """
    affine = np.diag([*cached.spacing_mm, 1.0])
    with warnings.catch_warnings():
        # The read-only memory map is never written: patches are copied out of it.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        image = torch.from_numpy(np.load(cached.image, mmap_mode="r")[None])
        label = torch.from_numpy(np.load(cached.label, mmap_mode="r")[None])
    return tio.Subject(
        {
            IMAGE: tio.ScalarImage(tensor=image, affine=affine),
            LABEL: tio.LabelMap(tensor=label, affine=affine),
            CASE_ID: cached.case_id,
        }
    )


@dataclass(frozen=True)
class PatchSettings:
    """How patches are drawn: the LabelSampler and RandomAffine settings of the config."""

    patch_size: int
    probabilities: dict[int, float]
    samples_per_volume: int
    augment: bool = True
    scales: tuple[float, float] = (0.9, 1.1)
    degrees: tuple[float, float] = (-10.0, 10.0)
    mirror_axes: tuple[int, ...] = ()


class PatchSetDataset(tio.SubjectsDataset):
    """A SubjectsDataset whose item is one volume's patches, cut in the DataLoader worker.

    The item is a Subject whose ``image``/``label`` hold the patches as channels, shape
    (samples_per_volume, P, P, P); :class:`PackedPatchSampler` hands them to the Queue one by one.
    Cutting in the DataLoader workers keeps the main process free for the model. Centres are
    drawn from the cached class locations, memory-mapped like the arrays.
    """

    def __init__(self, cached: Sequence[CachedCase], settings: PatchSettings, seed: int = 0):
        super().__init__([build_subject(c) for c in cached])
        self.locations = [load_class_locations(c) for c in cached]
        self.settings = settings
        self.seed = seed

    def __getitem__(self, index: int) -> tio.Subject:
        subject = self._subjects[index]
        s = self.settings
        # Fresh randomness per draw and per worker, drawn from torch's RNG: reproducible from the
        # seed, and restored with it on resume, so a resumed run does not replay its patches.
        info = torch.utils.data.get_worker_info()
        rng = np.random.default_rng(
            [self.seed, index, int(torch.randint(2**31, ())), info.id if info else 0]
        )
        image = subject[IMAGE].data[0].numpy()
        label = subject[LABEL].data[0].numpy()
        spacing = subject[IMAGE].spacing
        centres = sample_centres(
            label, s.patch_size, s.probabilities, s.samples_per_volume, rng, self.locations[index]
        )
        shape = (s.samples_per_volume, *(s.patch_size,) * 3)
        images, labels = torch.empty(shape), torch.empty(shape, dtype=torch.uint8)
        for i, centre in enumerate(centres):
            matrix = random_affine_matrix(s.scales, s.degrees, spacing, rng) if s.augment else None
            extract_patch(image, label, centre, s.patch_size, matrix, out=(images[i], labels[i]))
        if s.mirror_axes:  # drawn only when asked: runs without mirroring keep their patches
            for i in range(s.samples_per_volume):
                images[i], labels[i] = mirror_patch(images[i], labels[i], s.mirror_axes, rng)
        affine = subject[IMAGE].affine
        return tio.Subject(
            {
                IMAGE: tio.ScalarImage(tensor=images, affine=affine),
                LABEL: tio.LabelMap(tensor=labels, affine=affine),
                CASE_ID: subject[CASE_ID],
            }
        )


class PackedPatchSampler(tio.data.PatchSampler):
    """Yields the patches packed as channels by :class:`PatchSetDataset`, one Subject each."""

    def _generate_patches(
        self, subject: tio.Subject, num_patches: int | None = None
    ) -> Iterator[tio.Subject]:
        count = subject[IMAGE].data.shape[0]
        for i in range(count if num_patches is None else min(num_patches, count)):
            yield tio.Subject(
                {
                    IMAGE: tio.ScalarImage(
                        tensor=subject[IMAGE].data[i : i + 1], affine=subject[IMAGE].affine
                    ),
                    LABEL: tio.LabelMap(
                        tensor=subject[LABEL].data[i : i + 1], affine=subject[LABEL].affine
                    ),
                    CASE_ID: subject[CASE_ID],
                }
            )


class PatchQueue(tio.Queue):
    """A ``tio.Queue`` whose DataLoader workers live from one pass over the subjects to the next.

    ``tio.Queue`` builds a new DataLoader for every pass, so every pass forks its workers anew;
    each new worker then pays again to map the cached arrays and its buffers into its memory
    (tens of thousands of page faults), which over a few volumes per pass costs as much as a
    third of the workers' time. Here one DataLoader with persistent workers serves every pass.
    The passes draw from the main process's RNG as before (the order of the subjects); each
    worker's RNG is seeded once, when the workers start, from the main process's RNG, and a
    resumed run starts new workers from the restored one.
    """

    # The DataLoader every pass shares, built at the first pass (None without workers).
    subjects_loader: torch.utils.data.DataLoader | None = None

    def _get_subjects_iterable(self) -> Iterator:
        if self.num_workers == 0:
            return super()._get_subjects_iterable()
        if self.subjects_loader is None:
            self.subjects_loader = torch.utils.data.DataLoader(
                self.subjects_dataset,
                num_workers=self.num_workers,
                batch_size=1,
                collate_fn=self._get_first_item,
                sampler=self.subject_sampler,
                shuffle=self.shuffle_subjects,
                persistent_workers=True,
            )
        self._num_sampled_subjects = 0
        return iter(self.subjects_loader)


class RankShareSampler(DistributedSampler):
    """This rank's share of the subjects, in a new order on every pass over them.

    A ``DistributedSampler`` orders the subjects once per epoch (``set_epoch``); but with
    ``train.iterations_per_epoch`` an epoch may hold several passes, and each pass would repeat
    the order and give each rank the same subjects again. Here pass ``k`` of epoch ``e`` is the
    permutation of ``(seed, e, k)``: the same on every rank, because every rank runs the same
    iterations and so starts (and counts) its passes in step; the passes torchio makes to count
    the Queue's length count too, in step as well. Like ``DistributedSampler`` with
    ``drop_last=False``, the first subjects of the order fill up the last ranks' shares.
    """

    def __init__(self, dataset, num_replicas: int, rank: int, seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.passes = 0

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.passes = 0

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng([self.seed, self.epoch, self.passes])
        self.passes += 1
        order = rng.permutation(len(self.dataset)).tolist()
        order += order[: self.total_size - len(order)]
        return iter(order[self.rank : self.total_size : self.num_replicas])


def set_loader_epoch(loader: torch.utils.data.DataLoader, epoch: int) -> None:
    """Tell the rank's subject sampler which epoch begins (nothing for a one-process loader)."""
    sampler = getattr(loader.dataset, "subject_sampler", None)
    if sampler is not None:
        sampler.set_epoch(epoch)


def queue_ram_bytes(settings: PatchSettings, queue_length: int, num_workers: int) -> int:
    """Estimated RAM of the queue: its patches plus the patch sets in flight (float32 + uint8)."""
    per_patch = settings.patch_size**3 * (4 + 1)
    in_flight = max(num_workers, 1) * 2 * settings.samples_per_volume
    return per_patch * (queue_length + in_flight)


def build_loader(
    cached: Sequence[CachedCase],
    settings: PatchSettings,
    *,
    queue_length: int,
    batch_size: int,
    num_workers: int,
    seed: int = 0,
    pin_memory: bool = False,
    rank: int = 0,
    world_size: int = 1,
) -> torch.utils.data.DataLoader:
    """tio.SubjectsDataset -> LabelSampler-style patches -> tio.Queue -> DataLoader.

    The Queue is a :class:`PatchQueue`: its workers persist from one pass to the next.

    With ``world_size`` > 1 the Queue reads rank ``rank``'s share of the volumes
    (:class:`RankShareSampler`; call :func:`set_loader_epoch` each epoch); ``queue_length`` and
    ``batch_size`` are this rank's.

    Returns:
        A DataLoader yielding dicts with ``image`` (B, 1, P, P, P) float32 in (-1, 1),
        ``label`` (B, 1, P, P, P) uint8 and ``case_id``.
    """
    dataset = PatchSetDataset(cached, settings, seed=seed)
    sampler = RankShareSampler(dataset, world_size, rank, seed) if world_size > 1 else None
    queue = PatchQueue(
        dataset,
        max_length=max(queue_length, settings.samples_per_volume),
        samples_per_volume=settings.samples_per_volume,
        sampler=PackedPatchSampler(settings.patch_size),
        subject_sampler=sampler,
        num_workers=num_workers,
        shuffle_subjects=sampler is None,
        shuffle_patches=True,
        # The rank's first pass starts after set_loader_epoch, in that epoch's order.
        start_background=sampler is None,
    )
    log.info(
        "patch queue: %d patches of %d^3 from %d volumes%s, about %.0f MB of RAM",
        queue_length,
        settings.patch_size,
        len(cached) if sampler is None else len(sampler),
        "" if sampler is None else f" (this rank's share of {len(cached)})",
        queue_ram_bytes(settings, queue_length, num_workers) / 1e6,
    )
    return torch.utils.data.DataLoader(
        queue, batch_size=batch_size, num_workers=0, pin_memory=pin_memory
    )
