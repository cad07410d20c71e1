"""fedlodrop's flat messages in Flower records, and the bytes that travel.

A `DeviceTask` or `DeviceReply` is flat already (`to_flat()`: named tensors in the communication
dtype plus scalars); here the tensors become one `ArrayRecord` and the scalars a `ConfigRecord`.
numpy, which Flower's `Array` is built on, has no bfloat16, so every tensor travels as its raw
bytes: one uint8 buffer for the whole message (`pack=True`), or one Array per tensor in a numpy
dtype of the same width (bfloat16 as int16). A `layout` ConfigRecord names each tensor's dtype and
shape, so the receiver rebuilds the exact tensors. Either way the payload is the tensors' bytes,
which is what the in-process engine counts; `payload_bytes` measures it from the record itself.
"""

from __future__ import annotations

import json
import math

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedlodrop.lora.messages import DeviceReply, DeviceTask

ARRAYS, LAYOUT, TASK, REPLY = "arrays", "layout", "task", "reply"
PACKED = "packed"  # the one array of a packed message

DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
}
_NAMES = {v: k for k, v in DTYPES.items()}
_CARRIERS = {torch.bfloat16: torch.int16}  # dtypes numpy lacks travel as an integer of their width


def _dtype_name(t: torch.Tensor) -> str:
    if t.dtype not in _NAMES:
        raise TypeError(f"cannot send a tensor of dtype {t.dtype}")
    return _NAMES[t.dtype]


def to_records(tensors: dict[str, torch.Tensor], pack: bool) -> tuple[ArrayRecord, ConfigRecord]:
    """The tensors as an ArrayRecord plus the layout that rebuilds them."""
    entries, arrays = [], {}
    flat = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    for key, t in flat.items():
        entries.append([key, _dtype_name(t), list(t.shape)])
    if pack and flat:
        raw = [t.reshape(-1).view(torch.uint8).numpy() for t in flat.values()]
        arrays[PACKED] = Array(np.concatenate(raw))
    elif not pack:
        for key, t in flat.items():
            carrier = _CARRIERS.get(t.dtype)
            arrays[key] = Array((t.view(carrier) if carrier else t).numpy())
    layout = ConfigRecord({"tensors": json.dumps(entries), "packed": bool(pack and flat)})
    return ArrayRecord(arrays), layout


def from_records(arrays: ArrayRecord, layout: ConfigRecord) -> dict[str, torch.Tensor]:
    """The tensors `to_records` was given, bit for bit (raises ValueError on a malformed record)."""
    try:
        entries = json.loads(str(layout["tensors"]))
        packed = bool(layout["packed"])
    except (KeyError, ValueError) as err:
        raise ValueError(f"message without a readable tensor layout: {err}") from None
    out: dict[str, torch.Tensor] = {}
    if packed:
        if list(arrays.keys()) != [PACKED]:
            raise ValueError(f"packed message holds arrays {list(arrays.keys())}, expected [{PACKED!r}]")
        buf = arrays[PACKED].numpy()
        offset = 0
        for key, name, shape in entries:
            dtype = _lookup(name)
            n = math.prod(shape) * dtype.itemsize
            if offset + n > buf.size:
                raise ValueError(f"packed message too short for {key}")
            chunk = buf[offset : offset + n]
            offset += n
            out[key] = torch.from_numpy(chunk.copy()).view(dtype).reshape(shape) if n else torch.empty(shape, dtype=dtype)
        if offset != buf.size:
            raise ValueError(f"packed message holds {buf.size - offset} bytes more than its layout")
        return out
    if sorted(arrays.keys()) != sorted(e[0] for e in entries):
        raise ValueError("message arrays do not match its layout")
    for key, name, shape in entries:
        dtype = _lookup(name)
        t = torch.from_numpy(np.array(arrays[key].numpy(), copy=True))
        carrier = _CARRIERS.get(dtype)
        t = t.view(dtype) if carrier else t
        if t.dtype != dtype or list(t.shape) != list(shape):
            raise ValueError(f"{key}: got {t.dtype} {list(t.shape)}, layout says {name} {shape}")
        out[key] = t
    return out


def _lookup(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unknown tensor dtype {name!r} in message")
    return DTYPES[name]


def payload_bytes(arrays: ArrayRecord) -> int:
    """Bytes of the values an ArrayRecord carries: numel x itemsize of every array in it, as sent
    (not Flower's `count_bytes()`, which adds each array's .npy header and its key)."""
    return sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for a in arrays.values())


def content_bytes(content: RecordDict) -> tuple[int, int]:
    """(payload bytes, Flower's count_bytes()) of every ArrayRecord in a message's content."""
    records = list(content.array_records.values())
    return sum(payload_bytes(r) for r in records), sum(r.count_bytes() for r in records)


# ---------------------------------------------------------------------------- the two messages


def _content(message: DeviceTask | DeviceReply, kind: str, pack: bool) -> RecordDict:
    tensors, scalars = message.to_flat()
    arrays, layout = to_records(tensors, pack)
    return RecordDict({ARRAYS: arrays, LAYOUT: layout, kind: ConfigRecord(scalars)})


def _parts(content: RecordDict, kind: str) -> tuple[dict, dict]:
    tensors = from_records(content.array_records[ARRAYS], content.config_records[LAYOUT])
    return tensors, dict(content.config_records[kind])


def task_content(task: DeviceTask, pack: bool) -> RecordDict:
    """A DeviceTask as a Flower message's content (its tensors packed or one Array each)."""
    return _content(task, TASK, pack)


def content_task(content: RecordDict) -> DeviceTask:
    """The DeviceTask a TRAIN message carries, bit for bit."""
    return DeviceTask.from_flat(*_parts(content, TASK))


def reply_content(reply: DeviceReply, pack: bool) -> RecordDict:
    """A DeviceReply as a Flower message's content."""
    return _content(reply, REPLY, pack)


def content_reply(content: RecordDict) -> DeviceReply:
    """The DeviceReply a device's reply carries, bit for bit."""
    return DeviceReply.from_flat(*_parts(content, REPLY))
