"""The server's half of a round: `configure` what each device gets, `finish` from the replies.

`ServerState` is everything the server knows between rounds (global adapter and head, the FedEx
fold F, the recent per-round folds, which fold each device's base holds, how often each device
took part); with the run's seed it determines every later mask and seeded participant, so saving
it saves the RNG state too. `Server` owns no model: the engine or the Flower strategy carries its
tasks to devices and its replies back, and applies each round's fold to whatever backbone
evaluates the global model. Features (differential privacy, the simulated clock and meter) plug
in at the named points of `round.plugin.RoundPlugin`; the server itself never asks which are on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fedlodrop.config import RunConfig
from fedlodrop.errors import RoundFailed
from fedlodrop.lora.adapter import AdapterLayout, State, clone_state
from fedlodrop.lora.aggregation import DenseResidual, DeviceUpdate, Residual, device_weights, make_rule
from fedlodrop.lora.masks import Masks, device_masks, full_masks, kept_values, rank_of
from fedlodrop.lora.messages import (
    COMM_DTYPES,
    DeviceReply,
    DeviceTask,
    FoldCatchUp,
    FoldUpdate,
    apply_fold,
    decode_adapter,
    decode_upload,
    encode_adapter,
    make_uplink,
    merge_trained,
)
from fedlodrop.lora.variants import make_variant
from fedlodrop.round import secagg
from fedlodrop.round.optimizers import make_server_optimizer
from fedlodrop.round.plugin import RoundPlugin
from fedlodrop.round.privacy import sent_masks
from fedlodrop.round.records import LEFT_OUT, DeviceRecord, RoundRecord
from fedlodrop.round.sampling import seeded_participants


@dataclass
class ServerState:
    """Everything the server knows between rounds: the global adapter and head, the fold F, the latest folds
    (for catch-ups), which fold each device holds, and how often each took part."""
    rounds_done: int
    global_state: State
    fold: dict[str, torch.Tensor] = field(default_factory=dict)  # F per module, (out x in), float32
    fold_log: list[FoldUpdate] = field(default_factory=list)  # the latest rounds' folds, for catch-ups
    synced: list[int] = field(default_factory=list)  # per device: rounds of folds its base holds
    participations: list[int] = field(default_factory=list)  # per device: rounds it was drawn for (DP's accountant)
    optimizer: dict[str, torch.Tensor] = field(default_factory=dict)  # the server optimiser's moments and step count
    ranks: list[int | None] = field(default_factory=list)  # per device: its rank after self-pruning (None: as configured)


@dataclass
class RoundResult:
    """What `finish` made of a round: the fold to apply and the round's record (the engine's loop
    adds the evaluation)."""

    fold_update: FoldUpdate | None
    record: RoundRecord


class Server:
    """The server's half of every round, for any engine: what each device gets, and what the
    replies make of the global model; the round's features plug in (`plugins`)."""

    def __init__(self, cfg: RunConfig, layout: AdapterLayout, state: ServerState, rates: list[float], known: State,
                 plugins: list[RoundPlugin] | None = None):
        """`known`: the initial adapter every device builds from the seed (FFA's A never travels);
        `plugins`: the round's features (`round.features.features(cfg)`, and the run's meter)."""
        self.cfg = cfg
        self.plugins = list(plugins or [])
        self.layout = layout
        self.state = state
        self.rates = rates
        self.known = known
        self.rule = make_rule(cfg.federation.aggregation, cfg.federation.factor_rule, known)
        self.variant = make_variant(cfg.dropout.variant)
        self.optimizer = make_server_optimizer(cfg.server)
        self.dtype = COMM_DTYPES[cfg.federation.comm_dtype]
        self.uplink = make_uplink(cfg.federation.uplink)
        if not state.synced:
            state.synced = [0] * cfg.federation.devices
        if not state.participations:
            state.participations = [0] * cfg.federation.devices
        if not state.ranks:
            state.ranks = [None] * cfg.federation.devices
        self._drawn: dict[int, list[int]] = {}  # round -> its participants, drawn once

    def participants(self, round_: int) -> list[int]:
        """Who trains in `round_` (drawn once per round): the first plug-in that decides (central
        DP's Poisson draw), else `seeded_participants`."""
        if round_ not in self._drawn:
            drawn = next((d for d in (p.participants(round_) for p in self.plugins) if d is not None), None)
            self._drawn = {round_: seeded_participants(self.cfg, round_) if drawn is None else drawn}
        return self._drawn[round_]

    # ------------------------------------------------------------------ configure
    def configure(self, round_: int) -> list[DeviceTask]:
        """Round `round_`'s tasks: who takes part, and for each the adapter slices of its view (packed once
        when every device sees the whole model) and the folds it lacks."""
        if round_ != self.state.rounds_done:
            raise RuntimeError(f"server has done {self.state.rounds_done} rounds, asked to configure round {round_ + 1}")
        tasks, whole = [], None
        for k in self.participants(round_):
            masks = device_masks(self.cfg, self.layout, self.rates[k], round_, k, self.state.ranks[k])
            view = self.variant.view(masks, self.layout)
            if view is not None:
                adapter = encode_adapter(self.state.global_state, self.layout, view, self.rule, self.dtype, down=True)
            else:  # every device gets the whole adapter: pack it once; each task its own dict, tensors shared
                whole = whole or encode_adapter(
                    self.state.global_state, self.layout, full_masks(self.layout), self.rule, self.dtype, down=True
                )
                adapter = dict(whole)
            tasks.append(DeviceTask(k, round_, self.rates[k], adapter, self._catch_up(k), self.state.ranks[k]))
        return tasks

    def upload_bytes(self, task: DeviceTask) -> int:
        """What the device will send back for `task`: its trained slices and the head, as the rule
        sends them, on the uplink (known before it trains)."""
        masks = device_masks(self.cfg, self.layout, task.rate, task.round, task.device, task.rank)
        trained = self.variant.trained(masks, self.layout)
        return self.uplink.nbytes(encode_adapter(self.state.global_state, self.layout, trained, self.rule, self.dtype))

    def _catch_up(self, device: int) -> FoldCatchUp | None:
        """The folds device `device` has not seen: per-round updates, or F whole if that is smaller."""
        held, now = self.state.synced[device], self.state.rounds_done
        if not self.rule.folds or held == now:
            return None
        missing = [u for u in self.state.fold_log if u.round > held]
        if len(missing) == now - held:
            catch_up = FoldCatchUp(held, now, missing)
            if catch_up.nbytes <= _dense_bytes(self.state.fold):
                return catch_up
        return FoldCatchUp(held, now, replace=self.state.fold)  # shared, read-only: never copied per device

    # ------------------------------------------------------------------ finish
    def finish(self, tasks: list[DeviceTask], replies: list[DeviceReply], summed: State | None = None) -> RoundResult:
        """Leave out failed or non-finite replies, aggregate the rest, fold, and record the round.

        `summed`: secure aggregation's sum of the updates of the devices whose replies carry no
        error (their replies carry only what they reported); a `from_sums` rule aggregates it."""
        round_ = self.state.rounds_done
        by_device = {r.device: r for r in replies if r.round == round_}
        tasks = sorted(tasks, key=lambda t: t.device)
        updates, devices, decoded, in_sum = [], [], {}, []
        for task in tasks:
            reply = by_device.get(task.device)
            masks = device_masks(self.cfg, self.layout, task.rate, round_, task.device, task.rank)
            problem = "no reply" if reply is None else reply.problem()
            entry = DeviceRecord(task.device, task.rate, task.nbytes)
            if self.cfg.lora.ranks is not None or self.cfg.lora.self_prune is not None:
                entry.rank = rank_of(masks)
            if reply is not None and not reply.error:  # what the device reported (under DP: only its update)
                entry.kept_values, entry.uplink_bytes = kept_values(self.layout, masks), reply.nbytes
                if reply.num_samples is not None:
                    entry.samples, entry.steps, entry.train_loss = reply.num_samples, reply.steps, reply.train_loss
                    entry.train_s, entry.lr = round(reply.train_s, 3), [reply.lr_first, reply.lr_last]
                    entry.precision = reply.precision.dtype if reply.precision is not None else None
            devices.append(entry)
            for plugin in self.plugins:  # the meter prices every device that replied (and may leave it out)
                why = plugin.admit(entry)
                problem = problem or why
            if problem is not None:
                if summed is not None and reply is not None and not reply.error:
                    raise RuntimeError(f"device {task.device}'s update is in the secure sum but unusable: {problem}")
                entry.status, entry.reason = LEFT_OUT, problem
                continue
            if summed is None:
                updates.append(self._update(task, masks, reply, decoded))
            else:
                in_sum.append((task, masks))
        if summed is not None and in_sum:
            updates = self._from_sum(in_sum, summed, decoded)
        record = RoundRecord(round_ + 1, [t.device for t in tasks], devices)
        for task in tasks:
            self.state.participations[task.device] += 1
        needed = self.cfg.federation.min_devices
        for plugin in self.plugins:
            needed = plugin.required_updates(needed)
        if len(updates) < needed:
            reasons = "; ".join(f"device {f['device']}: {f['reason']}" for f in record.failures)
            raise RoundFailed(
                f"round {round_ + 1}: {len(updates)} of {len(tasks)} devices returned a usable update, "
                f"federation.min_devices is {self.cfg.federation.min_devices} ({reasons})"
            )
        fold_update, (record.fold_error, record.fold_error_rel) = self._aggregate(updates)
        record.truncation = self.rule.stats.get("truncation") if updates else None
        for plugin in self.plugins:  # DP's epsilon, the meter's round
            plugin.on_record(record, self)
        record.fold_bytes = fold_update.nbytes if fold_update else 0
        for entry in devices:
            if entry.ok:  # the others may or may not hold the catch-up: resend it
                self.state.synced[entry.device] = round_
                pruned = by_device[entry.device].next_rank if summed is None else None
                if pruned is not None:  # HetLoRA's self-pruning: the device holds fewer components from now on
                    self.state.ranks[entry.device] = pruned
        return RoundResult(fold_update, record)

    def _start(self, task: DeviceTask, masks: Masks, decoded: dict) -> State:
        """What the device started from, decoded from what it was sent; devices that hold the whole
        global model (no view) were sent the same tensors and share one decoded start."""
        view = self.variant.view(masks, self.layout)
        key = ("whole", *map(id, task.adapter.values())) if view is None else ("device", task.device)
        if key not in decoded:
            decoded[key] = decode_adapter(task.adapter, self.layout, view, self.known)
        return decoded[key]

    def _update(self, task: DeviceTask, masks: Masks, reply: DeviceReply, decoded: dict) -> DeviceUpdate:
        """The device's start and end, rebuilt from what was sent down and what came up."""
        start = self._start(task, masks, decoded)
        trained = self.variant.trained(masks, self.layout)
        upload = decode_upload(reply.upload, start, self.layout, trained, self.rule, self.uplink)
        end = merge_trained(start, upload, self.layout, trained)
        sent = sent_masks(self.layout, trained, self.rule.trains_a)
        for plugin in self.plugins:  # central DP clips again: its bound holds whatever was sent
            end = plugin.device_update(start, end, sent)
        return DeviceUpdate(start, end, trained, reply.num_samples)

    def _from_sum(self, in_sum: list[tuple[DeviceTask, Masks]], summed: State, decoded: dict) -> list[DeviceUpdate]:
        """Stand-in updates with the secure sum's sum, from what each device was sent (secagg.py)."""
        starts, trained = [], []
        for task, masks in in_sum:
            starts.append(self._start(task, masks, decoded))
            trained.append(self.variant.trained(masks, self.layout))
        return secagg.updates_from_sum(summed, starts, trained, self.layout, self.rule.trains_a)

    def _aggregate(self, updates: list[DeviceUpdate]) -> tuple[FoldUpdate | None, tuple[float | None, float | None]]:
        """Aggregate; for a folding rule also the fold that travels, and what truncating it cost
        (|R - R_k|_F and its ratio to |R|_F; None when the fold is sent exactly)."""
        fed = self.cfg.federation
        replaced = next((r for r in (p.aggregate(self, updates) for p in self.plugins) if r is not None), None)
        if replaced is None and not updates:  # federation.min_devices 0: a round nobody completed leaves the model
            self.state.rounds_done += 1
            return None, (None, None)
        if replaced is not None:  # central DP's noised sum over fixed totals
            new_state, residuals = replaced
        else:
            weights = device_weights(updates, fed.weighting)
            new_state, residuals = self.rule.aggregate(self.layout, self.state.global_state, updates, weights)
        if self.cfg.server.optimizer != "none":
            new_state, residuals = self._optimise(new_state, residuals)
        self.state.global_state = clone_state(new_state)
        self.state.rounds_done += 1
        if not self.rule.folds:
            return None, (None, None)
        stats = (None, None)
        if fed.residual_rank is not None:  # send the best rank-k fold: smaller, no longer exact
            lost = total = 0.0
            for name, res in residuals.items():
                residuals[name], err, norm = res.truncated(fed.residual_rank)
                lost, total = lost + err**2, total + norm**2
            stats = (lost**0.5, (lost / total) ** 0.5 if total else 0.0)
        update = FoldUpdate.encode(self.state.rounds_done, residuals, self.dtype)
        done = self.state.rounds_done
        self.state.fold, _ = apply_fold(self.state.fold, done - 1, FoldCatchUp(done - 1, done, [update]))
        self.state.fold_log.append(update)
        self._prune_log()
        return update, stats

    def _optimise(self, new_state: State, residuals: dict[str, Residual]) -> tuple[State, dict[str, Residual]]:
        """The server optimiser's step on the aggregate's pseudo-gradient (round/optimizers.py).

        Factor-averaging rules: x is every A, B and head tensor. A folding rule: x is each module's
        effective weight, whose aggregate change is s (B'A' - BA) + R; the factors keep the rule's
        B', A' (devices start from them) and the fold carries the rest of the optimiser's step."""
        prev = self.state.global_state
        if not self.rule.folds:
            delta = {k: new_state[k] - prev[k] for k in new_state}
            step = self.optimizer.step(delta, self.state.optimizer)
            return {k: prev[k] + step[k] for k in new_state}, residuals
        factors = {}
        delta = {k: new_state[k] - prev[k] for k in self.layout.head_keys}
        for m in self.layout.modules:
            factors[m.name] = m.scaling * (new_state[m.key_b] @ new_state[m.key_a] - prev[m.key_b] @ prev[m.key_a])
            delta[m.name] = factors[m.name] + residuals[m.name].dense()
        step = self.optimizer.step(delta, self.state.optimizer)
        out = dict(new_state)
        for key in self.layout.head_keys:
            out[key] = prev[key] + step[key]
        folds = {m.name: DenseResidual(step[m.name] - factors[m.name]) for m in self.layout.modules}
        return out, folds

    def _prune_log(self) -> None:
        """Keep the newest folds whose sum is at most F's dense size: a device further behind gets F."""
        budget, kept = _dense_bytes(self.state.fold), []
        for update in reversed(self.state.fold_log):
            budget -= update.nbytes
            if budget < 0:
                break
            kept.append(update)
        self.state.fold_log = kept[::-1]


def _dense_bytes(fold: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * 4 for t in fold.values())

