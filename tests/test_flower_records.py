"""Flower records without Flower's processes: tensors in every communication dtype travel bit for
bit, both layouts carry the same payload bytes, and error replies read as one line."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ConfigRecord, Error, RecordDict

from fedlodrop.flower.app import load_fold, save_fold
from fedlodrop.flower.wire import (
    content_bytes,
    content_reply,
    content_task,
    from_records,
    payload_bytes,
    reply_content,
    task_content,
    to_records,
)
from fedlodrop.flower.transport import error_reason
from fedlodrop.lora.masks import payload_bytes as tensor_bytes
from fedlodrop.lora.messages import Precision
from fedlodrop.lora.messages import DeviceReply, DeviceTask, FoldCatchUp, FoldUpdate


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor (NaN-safe, dtype-exact comparison)."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, generator=g)
    x[0, 0], x[0, 1] = math.nan, -math.inf
    return {
        "a.lora_A": x,
        "a.lora_B": torch.randn(6, 3, generator=g).to(torch.bfloat16),
        "head.w": torch.randn(4, generator=g).to(torch.float16),
        "empty": torch.zeros(3, 0),
        "scalar": torch.tensor(2.5, dtype=torch.bfloat16),
    }


@pytest.mark.parametrize("pack", [True, False])
def test_tensors_travel_bit_for_bit(pack):
    tensors = _tensors()
    arrays, layout = to_records(tensors, pack)
    back = from_records(arrays, layout)
    assert list(back) == list(tensors)
    for key, t in tensors.items():
        assert back[key].dtype == t.dtype and back[key].shape == t.shape, key
        assert torch.equal(_bits(back[key]), _bits(t)), key
    assert len(arrays) == (1 if pack else len(tensors))
    # the payload is the tensors' bytes in their own dtype, whichever layout
    assert payload_bytes(arrays) == tensor_bytes(tensors) == 35 * 4 + 18 * 2 + 4 * 2 + 0 + 2


def test_bfloat16_travels_as_int16_in_a_plain_record():
    arrays, layout = to_records({"b": torch.ones(2, 2, dtype=torch.bfloat16)}, pack=False)
    assert arrays["b"].dtype == "int16"  # numpy has no bfloat16
    assert '"bfloat16"' in layout["tensors"]
    assert arrays["b"].numpy().view(np.uint16).tolist() == [[0x3F80, 0x3F80]] * 2


def test_count_bytes_adds_a_header_and_the_key_per_array():
    tensors = _tensors()
    for pack in (True, False):
        arrays, _ = to_records(tensors, pack)
        assert arrays.count_bytes() == sum(len(a.data) + len(k) for k, a in arrays.items())
        assert arrays.count_bytes() - payload_bytes(arrays) >= 128 * len(arrays)


def test_an_empty_message_carries_no_array():
    arrays, layout = to_records({}, pack=True)
    assert len(arrays) == 0 and payload_bytes(arrays) == 0 and from_records(arrays, layout) == {}


@pytest.mark.parametrize("pack", [True, False])
def test_a_record_that_does_not_match_its_layout_is_refused(pack):
    arrays, layout = to_records(_tensors(), pack)
    key = next(iter(arrays.keys()))
    arrays[key] = Array(np.zeros(3, np.uint8))
    with pytest.raises(ValueError):
        from_records(arrays, layout)
    with pytest.raises(ValueError, match="layout"):
        from_records(arrays, ConfigRecord({"oops": 1}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("pack", [True, False])
def test_tasks_and_replies_round_trip(dtype, pack):
    g = torch.Generator().manual_seed(1)
    adapter = {"m.lora_A": torch.randn(4, 5, generator=g).to(dtype), "head.bias": torch.randn(2, generator=g).to(dtype)}
    updates = [FoldUpdate(r, {"m.u": torch.randn(6, 2, generator=g).to(dtype), "m.v": torch.randn(2, 5, generator=g).to(dtype)})
               for r in (2, 3)]
    for fold in (None, FoldCatchUp(1, 3, updates), FoldCatchUp(0, 3, replace={"m": torch.randn(6, 5, generator=g)})):
        task = DeviceTask(2, 3, 0.3, adapter, fold)
        content = task_content(task, pack)
        back = content_task(content)
        assert (back.device, back.round, back.rate) == (2, 3, 0.3)
        assert all(torch.equal(_bits(back.adapter[k]), _bits(adapter[k])) for k in adapter)
        payload, counted = content_bytes(content)
        assert payload == task.nbytes and counted > payload
        if fold is None:
            assert back.fold is None
        elif fold.replace is not None:
            assert back.fold.replace.keys() == fold.replace.keys() and back.fold.updates == []
            assert torch.equal(back.fold.replace["m"], fold.replace["m"])
        else:
            assert (back.fold.after, back.fold.upto, [u.round for u in back.fold.updates]) == (1, 3, [2, 3])
            assert all(torch.equal(_bits(b.tensors[k]), _bits(u.tensors[k]))
                       for b, u in zip(back.fold.updates, updates) for k in u.tensors)
    reply = DeviceReply(2, 3, adapter, 96, 0.69, 6, 1.5, 0.02, 0.01,
                        precision=Precision("bf16", "train.precision auto: the CPU has AMX-BF16"))
    content = reply_content(reply, pack)
    back = content_reply(content)
    assert (back.device, back.round, back.num_samples, back.train_loss, back.steps, back.lr_last) == (2, 3, 96, 0.69, 6, 0.01)
    assert back.error is None and content_bytes(content)[0] == reply.nbytes
    assert back.precision == reply.precision  # the device's hardware decides: the server is told


def test_the_fold_kept_in_context_state_is_exact():
    state = RecordDict()
    assert load_fold(state) == ({}, 0)
    fold = {"m1": torch.randn(8, 8), "m2": torch.randn(3, 4)}
    save_fold(state, fold, 5)
    back, rounds = load_fold(state)
    assert rounds == 5 and back.keys() == fold.keys()
    assert all(torch.equal(back[k], fold[k]) for k in fold)


class _Reply:
    def __init__(self, code, reason):
        self.error = Error(code, reason)


# A ClientApp that raised, as Flower's simulation engine reports it: a Ray traceback (abridged).
RAY_REASON = """<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'\x1b[36mray::ClientAppActor.run()\x1b[39m (pid=26400, ip=192.0.2.2)
  File "/x/fedlodrop/flower/app.py", line 244, in _test_fault
    raise RuntimeError(f"test fault: device {device} raises in round {round_ + 1}")
RuntimeError: test fault: device 1 raises in round 2

The above exception was the direct cause of the following exception:

\x1b[36mray::ClientAppActor.run()\x1b[39m (pid=26400, ip=192.0.2.2)
  File "/x/flwr/simulation/ray_transport/ray_actor.py", line 65, in run
    raise ClientAppException(str(ex)) from ex
flwr.clientapp.client_app.ClientAppException: 
Exception ClientAppException occurred. Message: test fault: device 1 raises in round 2'>"""


def test_error_replies_read_as_one_line():
    assert error_reason(_Reply(2, RAY_REASON)) == (
        "ClientApp raised an exception: RuntimeError: test fault: device 1 raises in round 2"
    )
    assert error_reason(_Reply(2, "<class 'ValueError'>:<'bad shard'>")) == (
        "ClientApp raised an exception: ValueError: bad shard"
    )
    assert error_reason(_Reply(5, "Node is unavailable.")) == "SuperNode unavailable: Node is unavailable."
    assert error_reason(_Reply(8, "")) == "ClientApp crashed"
    assert len(error_reason(_Reply(0, "x" * 1000))) < 330
