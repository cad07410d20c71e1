"""What travels between the server and a device, in every engine.

A `DeviceTask` goes down (the adapter slices of the device's view, the head, and the FedEx folds
its base weights are missing), a `DeviceReply` comes up (the trained slices, the head, metrics).
Both are flat: named tensors in the communication dtype plus a few scalars, so the in-process
engine passes them as they are and the Flower app puts them in an ArrayRecord and a ConfigRecord.
Bytes are the tensors' sizes as they travel; no index travels, as both sides draw the masks from
(seed, round, device).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from fedlodrop.lora.adapter import AdapterLayout, State
from fedlodrop.lora.aggregation import AggregationRule, Residual
from fedlodrop.lora.masks import Masks, full_masks, pack, payload_bytes, place, unpack


@dataclass(frozen=True)
class Precision:
    """The numbers a pass ran in, and why: `dtype` fp32, or bf16 (autocast; the weights stay
    fp32). Training takes it from `train.precision` and the device's hardware, evaluation from
    `train.eval_precision` (fp32 by default, so scores match the exported model on any machine)."""

    dtype: str  # "fp32" | "bf16"
    why: str

    def __str__(self) -> str:
        return f"{self.dtype} ({self.why})"

    def to_json(self) -> dict:
        return {"dtype": self.dtype, "why": self.why}

    @classmethod
    def from_json(cls, d: dict) -> Precision:
        return cls(d["dtype"], d["why"])


COMM_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ---------------------------------------------------------------------------- the adapter


def encode_adapter(state: State, layout: AdapterLayout, masks: Masks, rule: AggregationRule, dtype,
                   down: bool = False) -> State:
    """The kept slices of `masks` and the head, in the communication dtype, as the rule sends them
    (`down`: to a device, else from one)."""
    sends = rule.sends_down if down else rule.sends
    return {k: v for k, v in pack(state, layout, masks, dtype).items() if sends(k)}


def decode_adapter(packed: State, layout: AdapterLayout, masks: Masks | None, known: State) -> State:
    """Full-size float32 state, zeros outside `masks` (None: the whole adapter, a variant's view of
    the whole global model); keys that never travel come from `known` (an A) or are zeros (a B)."""
    masks = full_masks(layout) if masks is None else masks
    full = dict(packed)
    for m in layout.modules:
        mask = masks[m.name]
        if m.key_a not in full:
            full[m.key_a] = known[m.key_a][mask.ranks][:, mask.a_cols]
        if m.key_b not in full:
            full[m.key_b] = torch.zeros(int(mask.b_rows.sum()), int(mask.ranks.sum()))
    return unpack(full, layout, masks)


def merge_trained(start: State, uploaded: State, layout: AdapterLayout, trained: Masks) -> State:
    """What a device ended with: `start`, its trained slices replaced by what it uploaded."""
    end = {k: v.clone() for k, v in start.items()}
    for m in layout.modules:
        mask = trained[m.name]
        if m.key_a in uploaded:
            place(uploaded[m.key_a].float(), mask.ranks, mask.a_cols, end[m.key_a])
        place(uploaded[m.key_b].float(), mask.b_rows, mask.ranks, end[m.key_b])
    for key in layout.head_keys:
        end[key] = uploaded[key].float()
    return end


# ---------------------------------------------------------------------------- the uplink


SCALE = "#scale"  # suffix of a quantised tensor's scale on the wire


Pick = Callable[[State, torch.dtype], State]  # a state's trained slices and head, in a dtype


class Uplink:
    """How a device's trained slices and head travel up (`federation.uplink`): as they are, in the
    communication dtype. Both sides know what the device started from (the server sent it), so a
    variant may send the update instead and the server adds it back."""

    name = "same"
    scale_bits = 0  # bits a tensor sends besides its values

    def value_bits(self, comm_bits: int) -> int:
        """Bits a value on the wire, where the communication dtype has `comm_bits`."""
        return comm_bits

    def send(self, end: State, start: State, pick: Pick, dtype: torch.dtype, seed: int) -> State:
        """What travels for a device that trained `start` into `end` (`pick` picks what it sends;
        `dtype`: the communication dtype; `seed`: this device and round's stream)."""
        return pick(end, dtype)

    def receive(self, upload: State, start: State, pick: Pick) -> State:
        """The upload as the server uses it (`start`: what it sent the device, decoded)."""
        return upload

    def nbytes(self, sent: State) -> int:
        """Bytes `send` puts on the wire for the packed tensors `sent`."""
        return payload_bytes(sent)


class Int8Update(Uplink):
    """The update (trained minus start) as int8 with one float32 scale per tensor (max |x| / 127),
    rounded stochastically so the server's estimate is unbiased: FedPAQ's quantised update
    (Reisizadeh et al., AISTATS 2020) with an 8-bit QSGD-style quantiser (Alistarh et al., 2017)."""

    name, scale_bits = "int8", 32

    def value_bits(self, comm_bits: int) -> int:
        """One byte a value, whatever the communication dtype."""
        return 8

    def send(self, end: State, start: State, pick: Pick, dtype: torch.dtype, seed: int) -> State:
        """The update of what it trains, quantised (`dtype` does not apply: both ends are float32)."""
        return self.encode(pick(end, torch.float32), pick(start, torch.float32), seed)

    def receive(self, upload: State, start: State, pick: Pick) -> State:
        """What the device sent, added back to what it started from."""
        return self.decode(upload, pick(start, torch.float32))

    def encode(self, sent: State, start: State, seed: int) -> State:
        """Each tensor's update (`sent` minus `start`, float32) as int8 and its scale; the rounding's
        draws come from `seed`."""
        gen = torch.Generator().manual_seed(seed)
        out: State = {}
        for key in sorted(sent):
            delta = sent[key].float() - start[key]
            top = float(delta.abs().max()) if delta.numel() else 0.0
            scale = top / 127.0 if top > 0 else 1.0
            x = delta / scale
            q = torch.floor(x + torch.rand(x.shape, generator=gen)).clamp_(-127, 127)  # E[q] = x
            out[key], out[key + SCALE] = q.to(torch.int8), torch.tensor([scale], dtype=torch.float32)
        return out

    def decode(self, upload: State, start: State) -> State:
        """start + q scale for every tensor that came up."""
        return {k: start[k] + v.float() * upload[k + SCALE] for k, v in upload.items() if not k.endswith(SCALE)}

    def nbytes(self, sent: State) -> int:
        """One byte a value and four a tensor."""
        return sum(t.numel() for t in sent.values()) + len(sent) * self.scale_bits // 8


UPLINKS = {u.name: u for u in (Uplink(), Int8Update())}


def make_uplink(name: str) -> Uplink:
    """The uplink `federation.uplink` names."""
    return UPLINKS[name]


def upload_keys(layout: AdapterLayout, rule: AggregationRule) -> list[str]:
    """The tensors a device sends up under `rule` (at any rate: dropout shrinks them, never drops one)."""
    keys = [k for m in layout.modules for k in (m.key_a, m.key_b)] + list(layout.head_keys)
    return [k for k in keys if rule.sends(k)]


def encode_upload(end: State, start: State, layout: AdapterLayout, trained: Masks, rule: AggregationRule, dtype,
                  uplink: Uplink, seed: int) -> State:
    """What a device sends up: its trained slices and head, as `uplink` sends them."""
    return uplink.send(end, start, lambda s, dt: encode_adapter(s, layout, trained, rule, dt), dtype, seed)


def decode_upload(upload: State, start: State, layout: AdapterLayout, trained: Masks, rule: AggregationRule,
                  uplink: Uplink) -> State:
    """The trained slices and head a device sent, as `merge_trained` takes them (`start`: what the
    server sent it, decoded)."""
    return uplink.receive(upload, start, lambda s, dt: encode_adapter(s, layout, trained, rule, dt))


# ---------------------------------------------------------------------------- FedEx folds


@dataclass
class FoldUpdate:
    """One round's fold, as it travels: per module the factors U, V or the dense matrix."""

    round: int  # 1-based: the fold made by aggregating round `round`
    tensors: State  # "<module>.u" / "<module>.v", or "<module>.dense"

    @classmethod
    def encode(cls, round_: int, residuals: dict[str, Residual], dtype) -> FoldUpdate:
        """One round's residuals as they travel: factors where they are fewer values than the dense matrix, in
        the communication dtype."""
        tensors: State = {}
        for name, res in residuals.items():
            if res.factored:
                tensors[f"{name}.u"] = res.u.to(dtype).contiguous()
                tensors[f"{name}.v"] = res.v.to(dtype).contiguous()
            else:
                tensors[f"{name}.dense"] = res.dense().to(dtype).contiguous()
        return cls(round_, tensors)

    def decode(self) -> dict[str, torch.Tensor]:
        """Dense float32 per module, computed the same way on every side (on the CPU)."""
        out: dict[str, torch.Tensor] = {}
        for key, t in self.tensors.items():
            name, part = key.rsplit(".", 1)
            if part == "dense":
                out[name] = t.float().cpu().clone()
            elif part == "u":
                out[name] = t.float().cpu() @ self.tensors[f"{name}.v"].float().cpu()
        return out

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors that travel."""
        return payload_bytes(self.tensors)


@dataclass
class FoldCatchUp:
    """The folds a device's base is missing: rounds `after`+1 .. `upto` one by one, or (when that is
    larger) the whole accumulated fold F in float32, which replaces the device's copy exactly."""

    after: int
    upto: int
    updates: list[FoldUpdate] = field(default_factory=list)
    replace: State | None = None

    @property
    def nbytes(self) -> int:
        """Bytes of what this catch-up sends (the per-round folds, or F whole)."""
        if self.replace is not None:
            return payload_bytes(self.replace)
        return sum(u.nbytes for u in self.updates)


def apply_fold(fold: dict[str, torch.Tensor], held: int, catch_up: FoldCatchUp) -> tuple[dict[str, torch.Tensor], int]:
    """A base's fold F (holding `held` rounds) brought to `catch_up.upto`; F is the float32 sum of the
    decoded per-round folds in round order, so every side that applies them holds the same bits."""
    if held == catch_up.upto:
        return fold, held
    if catch_up.replace is not None:
        return {k: v.float().clone() for k, v in catch_up.replace.items()}, catch_up.upto
    if not catch_up.after <= held <= catch_up.upto:
        raise RuntimeError(
            f"device base holds folds up to round {held}, the message brings rounds "
            f"{catch_up.after + 1}..{catch_up.upto}"
        )
    fold = dict(fold)
    for update in catch_up.updates:
        if update.round <= held:
            continue
        for name, delta in update.decode().items():
            fold[name] = fold[name] + delta if name in fold else delta
    return fold, catch_up.upto


# ---------------------------------------------------------------------------- the two messages


@dataclass
class DeviceTask:
    """What the server sends one device for one round."""

    device: int
    round: int  # 0-based
    rate: float
    adapter: State  # the view's slices and the head, in the communication dtype
    fold: FoldCatchUp | None = None
    rank: int | None = None  # the rank it holds after self-pruning (lora.self_prune); None: its configured one

    @property
    def nbytes(self) -> int:
        """Bytes that go down to the device: its adapter slices and any folds."""
        return payload_bytes(self.adapter) + (self.fold.nbytes if self.fold else 0)

    # flat form for a transport (Flower's ArrayRecord + ConfigRecord)
    def to_flat(self) -> tuple[State, dict]:
        """Named tensors and scalars, for a transport (Flower's records)."""
        arrays = {f"adapter/{k}": v for k, v in self.adapter.items()}
        config = {"device": self.device, "round": self.round, "rate": float(self.rate), "fold": 0}
        if self.rank is not None:
            config["rank"] = self.rank
        if self.fold is not None:
            config |= {"fold": 1, "fold_after": self.fold.after, "fold_upto": self.fold.upto}
            if self.fold.replace is not None:
                arrays |= {f"fold-replace/{k}": v for k, v in self.fold.replace.items()}
            for u in self.fold.updates:
                arrays |= {f"fold/{u.round}/{k}": v for k, v in u.tensors.items()}
        return arrays, config

    @classmethod
    def from_flat(cls, arrays: State, config: dict) -> DeviceTask:
        """The task `to_flat` gave, rebuilt."""
        fold = None
        if config.get("fold"):
            replace = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("fold-replace/")}
            rounds: dict[int, State] = {}
            for k, v in arrays.items():
                if k.startswith("fold/"):
                    _, r, name = k.split("/", 2)
                    rounds.setdefault(int(r), {})[name] = v
            updates = [FoldUpdate(r, rounds[r]) for r in sorted(rounds)]
            fold = FoldCatchUp(int(config["fold_after"]), int(config["fold_upto"]), updates, replace or None)
        adapter = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("adapter/")}
        rank = int(config["rank"]) if "rank" in config else None
        return cls(int(config["device"]), int(config["round"]), float(config["rate"]), adapter, fold, rank)


@dataclass
class DeviceReply:
    """What a device sends back: its trained slices and head, and how the local phase went. Under
    DP a device sends its update alone (`private()`): the scalars are None and do not travel."""

    device: int
    round: int
    upload: State
    num_samples: int | None
    train_loss: float | None
    steps: int | None
    train_s: float | None
    lr_first: float = math.nan
    lr_last: float = math.nan
    error: str | None = None
    precision: Precision | None = None  # what the device trained in, and why (its hardware decides auto)
    next_rank: int | None = None  # lora.self_prune: the rank it holds from its next round on

    @property
    def nbytes(self) -> int:
        """Bytes that come up: the uploaded slices and head."""
        return payload_bytes(self.upload)

    def private(self) -> DeviceReply:
        """The reply with nothing but the update: what a device sends under DP."""
        return DeviceReply(self.device, self.round, self.upload, None, None, None, None, error=self.error)

    def problem(self) -> str | None:
        """Why the server must leave this reply out, or None if it is usable."""
        if self.error:
            return self.error
        if self.train_loss is not None and not math.isfinite(self.train_loss):
            return f"non-finite training loss ({self.train_loss})"
        for key, t in self.upload.items():
            if not torch.isfinite(t).all():
                return f"non-finite values in {key}"
        return None

    _SCALARS = ("num_samples", "train_loss", "steps", "train_s", "lr_first", "lr_last")

    def to_flat(self) -> tuple[State, dict]:
        """Named tensors and scalars, for a transport (scalars only those reported)."""
        config = {"device": self.device, "round": self.round}
        if self.num_samples is not None:
            config |= {k: getattr(self, k) for k in self._SCALARS}
        if self.error:
            config["error"] = self.error
        if self.precision is not None:
            config |= {"precision": self.precision.dtype, "precision_why": self.precision.why}
        if self.next_rank is not None:
            config["next_rank"] = self.next_rank
        return dict(self.upload), config

    @classmethod
    def from_flat(cls, arrays: State, config: dict) -> DeviceReply:
        """The reply `to_flat` gave, rebuilt (a private reply's scalars stay None)."""
        kwargs = {k: config.get(k) for k in cls._SCALARS}
        for k in ("num_samples", "steps"):
            kwargs[k] = None if kwargs[k] is None else int(kwargs[k])
        kwargs["lr_first"] = math.nan if kwargs["lr_first"] is None else kwargs["lr_first"]
        kwargs["lr_last"] = math.nan if kwargs["lr_last"] is None else kwargs["lr_last"]
        precision = Precision(config["precision"], config["precision_why"]) if "precision" in config else None
        next_rank = int(config["next_rank"]) if "next_rank" in config else None
        return cls(int(config["device"]), int(config["round"]), dict(arrays), error=config.get("error"),
                   precision=precision, next_rank=next_rank, **kwargs)
