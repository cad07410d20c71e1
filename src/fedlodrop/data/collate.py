"""Tokenisation and batching: truncate once, pad per batch.

Examples are tokenised without padding; `DataCollatorWithPadding` pads each batch to its own
longest sequence, which on GLUE (median ~25 tokens) is several times cheaper than padding every
example to `max_length`. Labels travel inside each batch, so metrics are right whatever the order.
"""

from __future__ import annotations

import hashlib
import weakref
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

from fedlodrop.data.canonical import quiet_datasets
from fedlodrop.data.tasks import Task
from fedlodrop.errors import UserError
from fedlodrop.rng import numpy_rng

if TYPE_CHECKING:
    from datasets import Dataset
    from torch.utils.data import DataLoader

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def tokenize(ds: Dataset, tokenizer: Any, task: Task, max_length: int) -> Dataset:
    """Model inputs and `labels` (float32 for regression), truncated to `max_length`, unpadded."""
    max_length = min(max_length, tokenizer.model_max_length)
    pair = "text_b" in ds.column_names

    def encode(batch: dict[str, list]) -> dict[str, list]:
        second = batch["text_b"] if pair else None
        enc = tokenizer(batch["text_a"], second, truncation=True, max_length=max_length)
        out = {k: enc[k] for k in MODEL_INPUTS if k in enc}
        out["labels"] = [float(x) for x in batch["label"]] if task.is_regression else batch["label"]
        return out

    with quiet_datasets():
        out = ds.map(encode, batched=True, remove_columns=ds.column_names,
                     new_fingerprint=_fingerprint(ds, tokenizer, task, max_length))
    if task.is_regression:
        from datasets import Value

        out = out.cast_column("labels", Value("float32"))
    return out


def _fingerprint(ds: Dataset, tokenizer: Any, task: Task, max_length: int) -> str:
    """What the tokenised set depends on, hashed. Without it `datasets` fingerprints the mapped
    function by pickling the tokenizer, which took 1.5 s a call (half of a small run's time)."""
    parts = [ds._fingerprint, type(tokenizer).__name__, str(tokenizer.name_or_path), task.name, str(max_length),
             _vocab_digest(tokenizer), str(tokenizer.model_max_length)]
    return hashlib.sha1("\x00".join(parts).encode()).hexdigest()


_VOCAB_DIGESTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _vocab_digest(tokenizer: Any) -> str:
    """The vocabulary hashed once per tokenizer (and size): sorting a 30 k-token vocabulary takes
    about 70 ms, and a run tokenises every device's shard with the same tokenizer."""
    size = len(tokenizer)  # added tokens change it, and with it the digest
    cached = _VOCAB_DIGESTS.get(tokenizer)
    if cached is None or cached[0] != size:
        digest = hashlib.sha1(str(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()
        _VOCAB_DIGESTS[tokenizer] = cached = (size, digest)
    return cached[1]


def length_order(ds: Dataset) -> np.ndarray:
    """Row indices from longest to shortest input (stable), for fast evaluation batches."""
    lengths = np.fromiter((len(x) for x in ds["input_ids"]), dtype=np.int64, count=len(ds))
    return np.argsort(-lengths, kind="stable")


def restore_order(values: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Undo `length_order`: `values[i]` belongs to row `order[i]`; returns them in row order."""
    out = np.empty_like(values)
    out[order] = values
    return out


def make_loader(
    ds: Dataset,
    tokenizer: Any,
    batch_size: int,
    shuffle: bool,
    seed: int,
    sort_by_length: bool = False,
    group_by_length: bool = False,
) -> DataLoader:
    """Batches of a tokenised set, padded per batch; a shuffled order is fixed by `seed`.

    `sort_by_length` (evaluation only) visits rows in `length_order(ds)` so batches hold similar
    lengths; use `restore_order` if per-example predictions must line up with the rows.
    """
    import torch
    from torch.utils.data import DataLoader
    from transformers import DataCollatorWithPadding

    if shuffle and sort_by_length:
        raise ValueError("sort_by_length is for evaluation; it cannot be combined with shuffle")
    _silence_fast_pad_warning(tokenizer)
    collator = DataCollatorWithPadding(tokenizer, return_tensors="pt")
    if shuffle and group_by_length:
        batches = grouped_batches(ds, batch_size, seed)
        return DataLoader(ds, batch_sampler=batches, collate_fn=collator, num_workers=0)
    sampler = length_order(ds).tolist() if sort_by_length else None
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        generator=generator,
        collate_fn=collator,
        num_workers=0,
    )


class GroupedBatchSampler(Sampler[list[int]]):
    """Shuffled batches of similar lengths, a new order on every pass over the data.

    Each pass (one `iter()`, i.e. one local epoch) draws its order from the stream
    ("group-batches", pass) of `seed`: shuffle, sort within windows of `window` batches, cut,
    shuffle the batches. Dynamic padding then pads little, which is most of a CPU's time.
    The same seed gives the same sequence of epochs; `len()` is the batches of one epoch.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, window: int = 32):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1 (got {batch_size})")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.batch_size = batch_size
        self.seed = seed
        self.window = window
        self.passes = 0  # iterations started so far; the next one is pass `passes`

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size)

    def batches(self, pass_index: int) -> list[list[int]]:
        """The batches of pass `pass_index` (what the `pass_index`-th `iter()` yields)."""
        rng = numpy_rng(self.seed, "group-batches", pass_index)
        order = rng.permutation(len(self.lengths))
        span = self.batch_size * self.window
        out: list[list[int]] = []
        for start in range(0, len(order), span):
            chunk = order[start : start + span]
            chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
            out.extend(chunk[i : i + self.batch_size].tolist() for i in range(0, len(chunk), self.batch_size))
        return [out[i] for i in rng.permutation(len(out))]

    def __iter__(self) -> Iterator[list[int]]:
        pass_index = self.passes
        self.passes += 1
        return iter(self.batches(pass_index))


def grouped_batches(ds: Dataset, batch_size: int, seed: int, window: int = 32) -> GroupedBatchSampler:
    """A `GroupedBatchSampler` over the input lengths of a tokenised set."""
    lengths = [len(ids) for ids in ds["input_ids"]]
    return GroupedBatchSampler(lengths, batch_size, seed, window)


def _silence_fast_pad_warning(tokenizer: Any) -> None:
    """Padding pre-tokenised examples is exactly what dynamic padding means; skip the advice."""
    flags = getattr(tokenizer, "deprecation_warnings", None)
    if isinstance(flags, dict):
        flags["Asking-to-pad-a-fast-tokenizer"] = True


def pad_token_fix(tokenizer: Any, model: Any) -> None:
    """Decoder-only models (GPT-2, Llama) ship no pad token: pad with EOS so batches can be padded.

    The model's `config.pad_token_id` must match, since sequence classification heads on
    decoders read the last non-pad token.
    """
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            name = getattr(model.config, "name_or_path", None) or "the model"
            raise UserError(f"tokenizer of {name} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
