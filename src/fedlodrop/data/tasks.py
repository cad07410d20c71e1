"""The tasks a run can train on: where their data lives, what the label is, how they are scored.

Kept free of heavy imports (no torch, no datasets) because `fedlodrop.config` imports `TASKS`
to validate a task name.

Every loader returns the same canonical columns, whatever the source: `text_a`, `label`, and
`text_b` for sentence-pair tasks only (single-sentence tasks have no `text_b` column at all).
`Task.text_a` / `Task.text_b` name the source columns on the Hugging Face Hub that map to them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Task:
    """One classification or regression task and everything needed to load and score it."""

    name: str
    text_a: str  # hub column of the first text (canonical column: "text_a")
    text_b: str | None  # hub column of the second text, None for single-sentence tasks
    num_labels: int  # 1 for regression
    is_regression: bool
    metrics: tuple[str, ...]
    main_metric: str
    hub_path: str
    hub_name: str | None
    eval_split: str  # split on the hub that the run evaluates on
    glue_folder: str | None  # folder in the classic GLUE TSV layout; None: not a GLUE task
    label_names: tuple[str, ...]  # index = label id; empty for regression

    @property
    def is_pair(self) -> bool:
        return self.text_b is not None


def _glue(
    name: str,
    folder: str,
    text_a: str,
    text_b: str | None,
    label_names: tuple[str, ...],
    metrics: tuple[str, ...] = ("accuracy",),
    eval_split: str = "validation",
) -> Task:
    regression = not label_names
    return Task(
        name=name,
        text_a=text_a,
        text_b=text_b,
        num_labels=1 if regression else len(label_names),
        is_regression=regression,
        metrics=metrics,
        main_metric=metrics[0],
        hub_path="nyu-mll/glue",
        hub_name=name,
        eval_split=eval_split,
        glue_folder=folder,
        label_names=label_names,
    )


_NLI = ("entailment", "not_entailment")

TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        _glue("cola", "CoLA", "sentence", None, ("unacceptable", "acceptable"), ("mcc", "accuracy")),
        _glue("sst2", "SST-2", "sentence", None, ("negative", "positive")),
        _glue("mrpc", "MRPC", "sentence1", "sentence2", ("not_equivalent", "equivalent"), ("f1", "accuracy")),
        _glue("qqp", "QQP", "question1", "question2", ("not_duplicate", "duplicate"), ("f1", "accuracy")),
        _glue("stsb", "STS-B", "sentence1", "sentence2", (), ("pearson", "spearman")),
        _glue(
            "mnli",
            "MNLI",
            "premise",
            "hypothesis",
            ("entailment", "neutral", "contradiction"),
            eval_split="validation_matched",
        ),
        _glue("qnli", "QNLI", "question", "sentence", _NLI),
        _glue("rte", "RTE", "sentence1", "sentence2", _NLI),
        _glue("wnli", "WNLI", "sentence1", "sentence2", ("not_entailment", "entailment")),
        Task(
            name="rotten_tomatoes",
            text_a="text",
            text_b=None,
            num_labels=2,
            is_regression=False,
            metrics=("accuracy",),
            main_metric="accuracy",
            hub_path="cornell-movie-review-data/rotten_tomatoes",
            hub_name=None,
            eval_split="validation",
            glue_folder=None,
            label_names=("neg", "pos"),
        ),
    )
}
