"""The one rule that holds out validation videos from a training split (train-head and finetune)."""

from __future__ import annotations

import numpy as np


def split_validation(labels, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """`carve_validation`, also saying whether the split could be stratified.

    Returns:
        (train_idx, val_idx, stratified).
    """
    from sklearn.model_selection import train_test_split

    labels = np.asarray(labels)
    positions = np.arange(len(labels), dtype=np.int64)
    if fraction <= 0:
        return positions, np.zeros(0, np.int64), False
    try:
        train, val = train_test_split(positions, test_size=fraction, random_state=seed,
                                      stratify=labels)
        stratified = True
    except ValueError:  # a class with < 2 videos, or fewer validation videos than classes
        train, val = train_test_split(positions, test_size=fraction, random_state=seed)
        stratified = False
    return np.sort(train), np.sort(val), stratified


def carve_validation(labels, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Hold out a seeded share `fraction` of the videos with these `labels` for validation.

    The rule (scikit-learn's, as train-head has always used it): `train_test_split(positions,
    test_size=fraction, random_state=seed, stratify=labels)`, so the validation part has
    `ceil(fraction * n)` videos with each class in proportion; when stratification is impossible
    (a class with a single video, or fewer validation videos than classes) the same call without
    `stratify` (a plain seeded shuffle split). Both parts are returned sorted, i.e. in input
    order. `fraction` 0 (or less) holds out nothing.

    Args:
        labels: (n,) class labels, one per video.
        fraction: share held out, in [0, 1).
        seed: the split's seed.

    Returns:
        (train_idx, val_idx): int64 positions into `labels`, a partition of range(n).

    Raises:
        ValueError: scikit-learn's, when `fraction` of n leaves no training video.
    """
    train, val, _ = split_validation(labels, fraction, seed)
    return train, val


def better_epoch(accuracy: float | None, loss: float | None, best: tuple[float, float] | None) -> bool:
    """The one rule that picks the epoch on validation (train-head and finetune): a higher validation
    accuracy wins, an equal one goes to the lower validation loss; without validation (`accuracy`
    None) or without a best yet, the newer epoch wins.

    Args:
        accuracy, loss: this epoch's validation top-1 and loss (None without validation).
        best: (accuracy, loss) of the best epoch so far, or None.
    """
    if best is None or accuracy is None:
        return True
    return (accuracy, -loss) > (best[0], -best[1])
