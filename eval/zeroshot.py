"""Zero-shot accuracy through lm-eval (EleutherAI's lm-evaluation-harness), not a re-implementation.

The already-loaded model is wrapped in lm-eval's ``HFLM`` and handed to ``lm_eval.simple_evaluate`` with the
settings its ``lm_eval --model hf`` command line uses (zero-shot, batch size 1 unless asked, its seeds, its
bootstrap count), so the figures equal those of ``lm_eval`` run on its own on the same model folder.

Tasks: ``arc_easy``, ``arc_challenge``, ``piqa``, ``winogrande``, ``lambada_openai``. Online, these are lm-eval's
own tasks (data from the Hugging Face Hub). Offline (a data folder is given), they resolve to the configs in
``tasks/`` next to this file (``arc_easy_local``, ...), which read the public release files under
``zeroshot/`` of the data folder and keep lm-eval's prompts, answer choices and metrics.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantkit.errors import QuantkitError

__all__ = [
    "TASKS",
    "LOCAL_TASKS_DIR",
    "NonFiniteScores",
    "ResolvedTask",
    "TaskResult",
    "resolve_tasks",
    "task_manager",
    "zeroshot",
]

logger = logging.getLogger(__name__)

LOCAL_TASKS_DIR = Path(__file__).resolve().parent / "tasks"

# Standard task name -> files its local config reads, relative to the data folder.
TASKS: dict[str, tuple[str, ...]] = {
    "arc_easy": ("zeroshot/arc_easy/ARC-Easy-Test.jsonl",),
    "arc_challenge": ("zeroshot/arc_challenge/ARC-Challenge-Test.jsonl",),
    "piqa": ("zeroshot/piqa/valid.jsonl", "zeroshot/piqa/valid-labels.lst"),
    "winogrande": ("zeroshot/winogrande/dev.jsonl",),
    "lambada_openai": ("zeroshot/lambada/lambada_test.jsonl",),
}
LOCAL_SUFFIX = "_local"


@dataclass(frozen=True)
class ResolvedTask:
    name: str  # the standard name the user asked for (and results are keyed by)
    lm_eval_name: str  # the task lm-eval runs: the same name online, NAME_local offline
    source: str  # "local" or "lm-eval"
    files: tuple[str, ...] = ()  # local data files read (absolute paths)


@dataclass
class TaskResult:
    metrics: dict[str, float | None]  # acc, acc_stderr, acc_norm, acc_norm_stderr, perplexity, ...
    samples: int  # documents scored
    total: int  # documents in the task
    lm_eval_name: str
    source: str
    extra: dict[str, Any] = field(default_factory=dict)


class NonFiniteScores(QuantkitError):
    """lm-eval got a log-likelihood that is NaN or inf from the model: its accuracies would mean nothing."""


def _finite_lm(HFLM: type) -> type:
    """``HFLM`` refusing non-finite log-likelihoods: with NaN logits lm-eval would still pick an answer (the first
    choice) and report an accuracy, exit 0."""

    def check(requests, lls: list[float]) -> None:
        bad = [i for i, ll in enumerate(lls) if not math.isfinite(ll)]
        if bad:
            task = getattr(requests[bad[0]], "task_name", None) or "a task"
            raise NonFiniteScores(f"{len(bad)} of {len(lls)} log-likelihoods in {task} are not finite "
                                  f"({lls[bad[0]]}: the model's logits hold NaN or inf)")

    class FiniteHFLM(HFLM):
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            out = super().loglikelihood(requests, disable_tqdm=disable_tqdm)
            check(requests, [ll for ll, _ in out])
            return out

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            out = super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)
            check(requests, list(out))
            return out

    return FiniteHFLM


def _quiet_custom_dataset_hint(record: logging.LogRecord) -> bool:
    """Drop lm-eval's two-line hint that every task with a custom dataset loader (all local ones) logs: it speaks of
    lm_eval's own ``--metadata`` option, which ``quantkit eval`` does not have."""
    return "Custom kwargs can be passed to `--metadata`" not in record.getMessage()


def _parse_names(tasks: str | list[str]) -> list[str]:
    names = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    names = [n.strip() for n in names if n.strip()]
    if names == ["all"]:
        return list(TASKS)
    if len(set(names)) != len(names):
        raise QuantkitError(f"a task is named twice: {','.join(names)}")
    return names


def resolve_tasks(tasks: str | list[str], data_dir: str | os.PathLike | None) -> list[ResolvedTask]:
    """Offline (``data_dir`` set): the local configs, after checking their files; online: lm-eval's names."""
    names = _parse_names(tasks)
    if data_dir is None:
        known = set(task_manager(None).all_subtasks)
        unknown = [n for n in names if n not in known]
        if unknown:
            raise QuantkitError(f"unknown lm-eval task(s): {', '.join(unknown)} (name single tasks, not groups; "
                                "see `lm_eval ls tasks`)")
        return [ResolvedTask(n, n, "lm-eval") for n in names]
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise QuantkitError(
            f"unknown task(s): {', '.join(unknown)}; offline tasks are {', '.join(TASKS)} (or 'all')"
        )
    root = Path(data_dir).expanduser()
    resolved = []
    for n in names:
        files = tuple(root / rel for rel in TASKS[n])
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise QuantkitError(f"{n}: data file not found: {', '.join(missing)} (data folder {root})")
        resolved.append(ResolvedTask(n, n + LOCAL_SUFFIX, "local", tuple(str(f) for f in files)))
    return resolved


def task_manager(data_dir: str | os.PathLike | None):
    """lm-eval's TaskManager: built-in tasks online; only quantkit's local configs offline."""
    return _task_manager(None if data_dir is None else str(Path(data_dir).expanduser()))


@functools.lru_cache(maxsize=4)
def _task_manager(data_dir: str | None):
    from lm_eval.tasks import TaskManager

    if data_dir is None:
        return TaskManager()  # indexing every built-in task takes a while: done once per process
    return TaskManager(include_path=str(LOCAL_TASKS_DIR), include_defaults=False, metadata={"data_dir": data_dir})


def _metrics(task_results: dict[str, Any]) -> dict[str, float | None]:
    """``{"acc,none": x, "acc_stderr,none": s, ...}`` -> ``{"acc": x, "acc_stderr": s, ...}`` (filter "none")."""
    out: dict[str, float | None] = {}
    for key, value in task_results.items():
        metric, _, filt = key.partition(",")
        if filt != "none":
            continue
        if isinstance(value, (int, float)) and math.isfinite(value):
            out[metric] = float(value)
        else:  # lm-eval writes "N/A" for a standard error it cannot compute (e.g. one document)
            out[metric] = None
    return out


def zeroshot(
    model,
    tokenizer,
    tasks: list[ResolvedTask],
    *,
    data_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    batch_size: int | str = 1,
) -> dict[str, TaskResult]:
    """Run lm-eval's evaluator on an already-loaded model (quantized or not), zero-shot. Raises
    :class:`NonFiniteScores` when the model gives a NaN or inf log-likelihood."""
    if not tasks:
        return {}
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as e:
        raise QuantkitError("zero-shot evaluation needs lm-eval: pip install lm-eval") from e

    lm = _finite_lm(HFLM)(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    by_lm_name = {t.lm_eval_name: t for t in tasks}
    logger.info("zero-shot (lm-eval %s): %s%s", lm_eval.__version__, ", ".join(by_lm_name),
                f", first {limit} documents each" if limit else "")
    task_logger = logging.getLogger("lm_eval.api.task")
    task_logger.addFilter(_quiet_custom_dataset_hint)
    try:
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(by_lm_name),
            num_fewshot=None,  # the CLI default: each task's own (0 for these tasks)
            batch_size=batch_size,
            limit=limit,
            log_samples=False,
            task_manager=task_manager(data_dir),
        )
    except FileNotFoundError as e:
        raise QuantkitError(str(e)) from e
    finally:
        task_logger.removeFilter(_quiet_custom_dataset_hint)
    results = {}
    for lm_name, t in by_lm_name.items():
        n = out["n-samples"][lm_name]
        results[t.name] = TaskResult(
            metrics=_metrics(out["results"][lm_name]),
            samples=int(n["effective"]),
            total=int(n["original"]),
            lm_eval_name=lm_name,
            source=t.source,
            extra={"version": out.get("versions", {}).get(lm_name), "num_fewshot": out["n-shot"].get(lm_name)},
        )
    return results
