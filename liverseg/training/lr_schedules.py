"""Learning-rate schedules, a function of the epoch alone (``train.lr_schedule``)."""

from __future__ import annotations

from liverseg.constants import LR_SCHEDULES


def learning_rate(lr: float, schedule: str, epoch: int, epochs: int) -> float:
    """The learning rate of ``epoch`` (1-based): constant, or nnU-Net's polynomial decay.

    A function of the epoch alone, so a resumed run continues on the same curve.

    Raises:
        ValueError: ``schedule`` is not one of :data:`liverseg.constants.LR_SCHEDULES`.
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(
            f"unknown lr schedule {schedule!r}; choose one of {', '.join(LR_SCHEDULES)}"
        )
    if schedule == "poly":
        return lr * (1 - (epoch - 1) / epochs) ** 0.9
    return lr
