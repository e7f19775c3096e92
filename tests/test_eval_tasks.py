"""The offline zero-shot task configs render exactly what lm-eval's built-in tasks render for the same documents.

The built-in task (lm-eval's own YAML, unchanged except that its data comes from memory instead of the Hub) is
fed the documents in the schema of the Hugging Face dataset it normally reads, built here from the public
release files; our local task reads the same files through its own loader. Documents, prompts (contexts),
answer choices (continuations) and targets must be identical.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import lm_eval
import pytest

from quantkit.eval.zeroshot import LOCAL_TASKS_DIR, TASKS, task_manager

BUILTIN = Path(lm_eval.__file__).parent / "tasks"
BUILTIN_YAML = {
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "piqa": "piqa/piqa.yaml",
    "winogrande": "winogrande/default.yaml",
    "lambada_openai": "lambada/lambada_openai.yaml",
}


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _hub_schema_docs(name: str, data: Path) -> list[dict]:
    """The rows of the Hub dataset lm-eval's built-in task reads (allenai/ai2_arc, baber/piqa, ...)."""
    files = [data / f for f in TASKS[name]]
    if name.startswith("arc_"):
        return [{"id": r["id"], "question": r["question"]["stem"],
                 "choices": {"text": [c["text"] for c in r["question"]["choices"]],
                             "label": [c["label"] for c in r["question"]["choices"]]},
                 "answerKey": r["answerKey"]} for r in _jsonl(files[0])]
    if name == "piqa":
        labels = files[1].read_text().split()
        return [{"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": int(y)}
                for r, y in zip(_jsonl(files[0]), labels, strict=True)]
    if name == "winogrande":
        return [{k: r[k] for k in ("sentence", "option1", "option2", "answer")} for r in _jsonl(files[0])]
    return [{"text": r["text"]} for r in _jsonl(files[0])]


def _builtin_task(name: str, docs: list[dict]):
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(BUILTIN / BUILTIN_YAML[name], resolve_func=True)
    for key in ("tag", "group", "task_list"):
        cfg.pop(key, None)
    splits = [cfg.get(k) for k in ("training_split", "validation_split", "test_split")]
    ds = datasets.Dataset.from_list(docs)
    cfg["custom_dataset"] = lambda **_: datasets.DatasetDict({s: ds for s in splits if s})
    cfg["dataset_kwargs"] = None
    return ConfigurableTask(config=cfg)


def _sample_ids(name: str, docs: list[dict]) -> list[int]:
    """The first three documents, plus ARC's first with numeric labels and first with other than 4 choices."""
    ids = [0, 1, 2]
    if name.startswith("arc_"):
        ids.append(next(i for i, d in enumerate(docs) if d["answerKey"].isdigit()))
        ids.append(next(i for i, d in enumerate(docs) if len(d["choices"]["text"]) != 4))
    if name == "winogrande":
        ids.append(next(i for i, d in enumerate(docs) if d["answer"] == "2"))
    return sorted(set(ids))


def _requests(task, ids: list[int]) -> list[tuple]:
    task.build_all_requests(samples=ids, rank=0, world_size=1)
    return [(inst.doc_id, inst.idx, inst.request_type, inst.args) for inst in task.instances]


@pytest.fixture(scope="module")
def local_tasks(data_dir):
    return task_manager(data_dir).load([n + "_local" for n in TASKS])["tasks"]


@pytest.mark.parametrize("name", list(TASKS))
def test_local_config_renders_like_builtin(name, local_tasks, data_dir):
    local = local_tasks[name + "_local"]
    hub_docs = _hub_schema_docs(name, data_dir)
    builtin = _builtin_task(name, hub_docs)

    assert len(local.eval_docs) == len(builtin.eval_docs) == len(hub_docs)
    ids = _sample_ids(name, hub_docs)
    for i in ids:
        doc = local.eval_docs[i]
        assert doc == builtin.eval_docs[i] == hub_docs[i]
        assert local.doc_to_text(doc) == builtin.doc_to_text(doc)
        assert local.doc_to_target(doc) == builtin.doc_to_target(doc)
        if builtin.config.doc_to_choice is not None:
            assert local.doc_to_choice(doc) == builtin.doc_to_choice(doc)
    requests = _requests(local, ids)
    assert requests == _requests(builtin, ids)
    assert len(requests) >= len(ids)
    # Same output type, metrics and aggregations: the figures mean the same thing.
    assert local.OUTPUT_TYPE == builtin.OUTPUT_TYPE
    assert local.aggregation() == builtin.aggregation()
    assert local.higher_is_better() == builtin.higher_is_better()
    assert local.config.target_delimiter == builtin.config.target_delimiter
    assert local.config.fewshot_delimiter == builtin.config.fewshot_delimiter


def test_split_sizes_match_the_published_ones(local_tasks):
    sizes = {n: len(t.eval_docs) for n, t in local_tasks.items()}
    assert sizes == {"arc_easy_local": 2376, "arc_challenge_local": 1172, "piqa_local": 1838,
                     "winogrande_local": 1267, "lambada_openai_local": 5153}


def test_local_configs_ship_next_to_the_module():
    assert sorted(p.name for p in LOCAL_TASKS_DIR.glob("*.yaml")) == sorted(f"{n}_local.yaml" for n in TASKS)
