"""The tasks a run can train on: where their data lives, what the label is, how they are scored.

Kept free of heavy imports (no torch, no datasets) because `fedlodrop.config` imports `TASKS`
to validate a task name.

Every loader returns the same canonical columns, whatever the source: `text_a`, `label`, and
`text_b` for sentence-pair tasks only (single-sentence tasks have no `text_b` column at all).
`Task.text_a` / `Task.text_b` name the source columns on the Hugging Face Hub that map to them.
"""

from __future__ import annotations

from dataclasses import dataclass

# every score a task may ask for, and which labels it needs: classes, exactly two classes (F1 of
# the class with id 1), or a real number
METRICS = {"accuracy": "classes", "f1": "two classes", "macro_f1": "classes", "mcc": "classes",
           "pearson": "regression", "spearman": "regression"}


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
        """The task reads two texts (sentence pairs: MRPC, RTE, ...)."""
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


# ---------------------------------------------------------------------------- your own data


def default_metrics(num_labels: int, regression: bool) -> tuple[str, ...]:
    """The scores a task of your own gets unless data.metrics names them: Pearson and Spearman for regression;
    accuracy, F1 (two classes) or macro F1, and MCC for classes."""
    if regression:
        return ("pearson", "spearman")
    return ("accuracy", "f1", "mcc") if num_labels == 2 else ("accuracy", "macro_f1", "mcc")


def custom_task(name: str, data, label_names: tuple[str, ...] | None, regression: bool) -> Task:
    """The task of the user's own data (`data`: the run's DataConfig): its columns, classes (None
    for regression) and metrics. Raises ValueError naming a metric the labels cannot have."""
    label_names = () if regression else tuple(label_names or ())
    metrics = tuple(data.metrics) if data.metrics else default_metrics(len(label_names), regression)
    for metric in metrics:
        kind = METRICS[metric]
        fits = regression if kind == "regression" else (not regression and (kind == "classes" or len(label_names) == 2))
        if not fits:
            what = "a regression label" if regression else f"{len(label_names)} classes"
            raise ValueError(f"data.metrics: {metric} needs {kind}, and the task has {what}")
    texts = list(data.text_columns)
    return Task(
        name=name,
        text_a=texts[0],
        text_b=texts[1] if len(texts) > 1 else None,
        num_labels=1 if regression else len(label_names),
        is_regression=regression,
        metrics=metrics,
        main_metric=metrics[0],
        hub_path=data.hub_path or "",
        hub_name=data.hub_name,
        eval_split=data.eval_split or "",
        glue_folder=None,
        label_names=label_names,
    )


def task_from_config(cfg) -> Task | None:
    """The task `cfg` trains when its config alone says it all: a built-in task, or own data whose
    classes (`data.label_names`) or regression are given; None when they are read from the data."""
    if not cfg.data.own:
        return TASKS[cfg.task]
    if cfg.data.regression:
        return custom_task(cfg.task, cfg.data, None, True)
    if cfg.data.label_names:
        return custom_task(cfg.task, cfg.data, tuple(cfg.data.label_names), False)
    return None


def task_to_json(task: Task) -> dict:
    """A task as task.json keeps it (tuples as lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in task.__dict__.items()}


def task_from_json(d: dict) -> Task:
    """The task task.json holds (unknown keys ignored)."""
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in Task.__dataclass_fields__}
    return Task(**fields)

