"""Split the training set across devices with flwr-datasets partitioners.

* `iid`: a seeded shuffle, then `IidPartitioner` (equal contiguous shards of the shuffled set;
  flwr's IID partitioner does not shuffle by itself, and GLUE files are not in random order), or
  `SizePartitioner` when the devices' sizes are given (a system file's sample counts).
* `dirichlet`: `DirichletPartitioner` label skew with concentration `alpha` (small = skewed).
* `continuous`: `ContinuousPartitioner` on a real-valued label (STS-B), with strictness
  `1 / (1 + alpha)`, so the one knob `federation.dirichlet_alpha` sets the heterogeneity of both
  non-IID schemes: alpha -> 0 sorts devices by label, alpha -> inf is IID; 0.5 gives 2/3.
* `by_column`: the natural split of the user's own data (`data.device_column`: user, site,
  hospital): `NaturalIdPartitioner`, each distinct value one device; with fewer devices than
  values, the values are grouped (largest first, each to the device holding the fewest examples,
  so devices stay about equal), and a device is a group of users as a site is.

Every device gets at least one example; deterministic given the seed.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from typing import TYPE_CHECKING

from fedlodrop.data.canonical import quiet_datasets
from fedlodrop.errors import UserError

if TYPE_CHECKING:
    from datasets import Dataset

SCHEMES = ("iid", "dirichlet", "continuous", "by_column")
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
    if scheme == "by_column" and "device" not in train.column_names:
        raise UserError("federation.partition by_column needs your own data with data.device_column")
    if devices == 1:
        return [train.remove_columns(["device"]) if "device" in train.column_names else train]
    if scheme == "iid" and sizes is not None:
        from flwr_datasets.partitioner import SizePartitioner

        return _load_all(SizePartitioner(sizes), train.shuffle(seed=seed), devices)
    if scheme == "iid":
        return _iid(train, devices, seed)
    if scheme == "dirichlet":
        return _dirichlet(train, devices, alpha, seed)
    if scheme == "by_column":
        return _by_column(train, devices)
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


def device_groups(values: list[str], devices: int) -> dict[str, int]:
    """Which device each distinct value of the device column goes to: one value each when there
    are as many devices as values; else largest first, each to the device with the fewest examples
    so far (ties: the lower device). Values are ordered as numbers when they all are numbers."""
    from collections import Counter

    counts = Counter(values)
    if len(counts) < devices:
        raise UserError(f"data.device_column has {len(counts)} distinct values in the training data but "
                        f"federation.devices is {devices}: set federation.devices to at most {len(counts)} (each "
                        f"value a device at {len(counts)})")

    def key(v: str):
        try:
            return (0, float(v), v)
        except ValueError:
            return (1, 0.0, v)

    distinct = sorted(counts, key=key)
    if len(distinct) == devices:
        return {v: k for k, v in enumerate(distinct)}
    load, out = [0] * devices, {}
    for v in sorted(distinct, key=lambda v: (-counts[v], key(v))):
        k = min(range(devices), key=lambda d: (load[d], d))
        out[v], load[k] = k, load[k] + counts[v]
    return out


def _by_column(train: Dataset, devices: int) -> list[Dataset]:
    from flwr_datasets.partitioner import NaturalIdPartitioner

    groups = device_groups(train["device"], devices)
    with quiet_datasets():
        ds = train.map(lambda row: {"device": groups[row["device"]]}, remove_columns=["device"])
    partitioner = NaturalIdPartitioner(partition_by="device")
    partitioner.dataset = ds
    # its tqdm bar ("Generating partition_id_to_indices") would land in the run's output
    with quiet_datasets(), contextlib.redirect_stderr(io.StringIO()):
        # flwr numbers the partitions in the order it meets the ids: find each device's own
        by_id = {int(p["device"][0]): p for p in (partitioner.load_partition(i) for i in range(devices))}
        return [by_id[k].remove_columns(["device"]) for k in range(devices)]
