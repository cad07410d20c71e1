"""Split the training set across devices with flwr-datasets partitioners.

* `iid`: a seeded shuffle, then `IidPartitioner` (equal contiguous shards of the shuffled set;
  flwr's IID partitioner does not shuffle by itself, and GLUE files are not in random order), or
  `SizePartitioner` when the devices' sizes are given (a system file's sample counts).
* `dirichlet`: `DirichletPartitioner` label skew with concentration `alpha` (small = skewed).
* `continuous`: `ContinuousPartitioner` on a real-valued label (STS-B), with strictness
  `1 / (1 + alpha)`, so the one knob `federation.dirichlet_alpha` sets the heterogeneity of both
  non-IID schemes: alpha -> 0 sorts devices by label, alpha -> inf is IID; 0.5 gives 2/3.

Every device gets at least one example; deterministic given the seed.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

from fedlodrop.data.loaders import quiet_datasets
from fedlodrop.errors import UserError

if TYPE_CHECKING:
    from datasets import Dataset

SCHEMES = ("iid", "dirichlet", "continuous")
DIRICHLET_MIN_SIZE = 10  # flwr's default smallest partition, lowered for tiny sets


def partition(
    train: Dataset, devices: int, scheme: str, alpha: float, seed: int, label_is_real: bool,
    sizes: list[int] | None = None,
) -> list[Dataset]:
    """`devices` disjoint subsets of `train` that together hold every example once; `sizes`: the
    size of each (iid only, summing to len(train))."""
    _check(len(train), devices, scheme, alpha, label_is_real)
    if sizes is not None:
        if scheme != "iid":
            raise UserError(f"device sizes from a system file need federation.partition iid, not {scheme!r}")
        if len(sizes) != devices or sum(sizes) != len(train) or min(sizes) < 1:
            raise ValueError(f"partition sizes {sizes} do not split {len(train)} examples over {devices} devices")
    if devices == 1:
        return [train]
    if scheme == "iid" and sizes is not None:
        from flwr_datasets.partitioner import SizePartitioner

        return _load_all(SizePartitioner(sizes), train.shuffle(seed=seed), devices)
    if scheme == "iid":
        return _iid(train, devices, seed)
    if scheme == "dirichlet":
        return _dirichlet(train, devices, alpha, seed)
    return _continuous(train, devices, alpha, seed)


def _check(n: int, devices: int, scheme: str, alpha: float, label_is_real: bool) -> None:
    if scheme not in SCHEMES:
        raise UserError(f"unknown federation.partition {scheme!r}; known: {', '.join(SCHEMES)}")
    if devices < 1:
        raise UserError(f"federation.devices must be at least 1, got {devices}")
    if n < devices:
        raise UserError(
            f"{n} training examples cannot give each of {devices} devices at least one; "
            f"lower federation.devices or raise data.max_train_samples"
        )
    if alpha <= 0:
        raise UserError(f"federation.dirichlet_alpha must be positive, got {alpha}")
    if scheme == "dirichlet" and label_is_real:
        raise UserError("federation.partition dirichlet needs class labels; a real-valued label: continuous")
    if scheme == "continuous" and not label_is_real:
        raise UserError("federation.partition continuous is for a real-valued label; classes: dirichlet")


def _load_all(partitioner, ds: Dataset, devices: int) -> list[Dataset]:
    partitioner.dataset = ds
    with quiet_datasets():
        return [partitioner.load_partition(i) for i in range(devices)]


def _iid(train: Dataset, devices: int, seed: int) -> list[Dataset]:
    from flwr_datasets.partitioner import IidPartitioner

    return _load_all(IidPartitioner(num_partitions=devices), train.shuffle(seed=seed), devices)


def _dirichlet(train: Dataset, devices: int, alpha: float, seed: int) -> list[Dataset]:
    from flwr_datasets.partitioner import DirichletPartitioner

    min_size = max(1, min(DIRICHLET_MIN_SIZE, len(train) // (2 * devices)))
    partitioner = DirichletPartitioner(
        num_partitions=devices, partition_by="label", alpha=alpha, min_partition_size=min_size, seed=seed
    )
    try:
        with warnings.catch_warnings():  # flwr warns on every resampling try
            warnings.filterwarnings("ignore", message="The specified min_partition_size")
            return _load_all(partitioner, train, devices)
    except ValueError:
        raise UserError(
            f"Dirichlet split with alpha={alpha} could not give each of {devices} devices "
            f"{min_size} of the {len(train)} training examples in 10 tries; raise "
            f"federation.dirichlet_alpha, lower federation.devices or use more data"
        ) from None


def _continuous(train: Dataset, devices: int, alpha: float, seed: int) -> list[Dataset]:
    from flwr_datasets.partitioner import ContinuousPartitioner

    partitioner = ContinuousPartitioner(
        num_partitions=devices, partition_by="label", strictness=1.0 / (1.0 + alpha), seed=seed
    )
    try:
        return _load_all(partitioner, train, devices)
    except ValueError as err:  # e.g. a constant label
        raise UserError(f"continuous split of the label failed: {err}") from None
