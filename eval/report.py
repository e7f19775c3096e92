"""``quantkit report``: runs of ``quantkit eval`` side by side, as a Markdown table and a Pareto plot.

The table has one row per model (the results files of one model folder, from separate runs, are merged): method,
bits per weight, size on disk, perplexity per dataset, each zero-shot task (acc, and acc_norm where lm-eval
defines it, in percent) and the average acc over the run's tasks.
The plot puts perplexity (log scale) and, when there are zero-shot results, the average accuracy against bits
per weight (log2 scale, so 2-4 bits and 16-32 bits both stay readable), one labelled point per run, with the
Pareto front (no other run is both smaller and better) drawn as a line.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from quantkit.checkpoint import atomic_path
from quantkit.errors import QuantkitError

__all__ = ["load_results", "run_label", "results_name", "average_acc", "markdown_table", "pareto_plot"]

logger = logging.getLogger(__name__)

_DTYPE_NAMES = {"F32": "fp32", "BF16": "bf16", "F16": "fp16", "F64": "fp64"}
_PPL_TITLES = {"wikitext2": "WikiText-2", "c4": "C4"}


def load_results(paths: list[str | os.PathLike]) -> list[dict[str, Any]]:
    if not paths:
        raise QuantkitError("give at least one results file (written by `quantkit eval --out`)")
    runs = []
    for p in paths:
        path = Path(p)
        r = _read(path)
        r["_path"] = str(path)
        runs.append(r)
    runs = _merge_same_model(runs)
    labels = [run_label(r) for r in runs]
    for r, label in zip(runs, labels, strict=True):
        # Two runs of one method (e.g. two models): tell them apart by their model's name, or where those agree
        # too (two queues' alloc-3.0 folders) by their first results file's name.
        folders = [Path(o["model"]).name for o, other in zip(runs, labels, strict=True) if other == label]
        tag = Path(r["model"]).name if folders.count(Path(r["model"]).name) == 1 else results_name(r["_paths"][0])
        r["_label"] = label if len(folders) == 1 else f"{label} [{tag}]"
    return runs


def _reject_constant(name: str) -> None:
    raise ValueError(name)


def _read(path: Path) -> dict[str, Any]:
    """One results file, checked: strict JSON (no bare ``NaN``/``Infinity``), an object written by ``quantkit
    eval``, with every field the report reads present and of its type. Anything else is one QuantkitError naming
    the file and what is wrong with it."""
    if path.is_dir():
        raise QuantkitError(f"{path} is a folder, not a results file of `quantkit eval`")
    if not path.is_file():
        raise QuantkitError(f"results file not found: {path}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise QuantkitError(f"{path}: not a results file of `quantkit eval` (binary, not UTF-8 text)") from None
    if not text.strip():
        raise QuantkitError(f"{path}: empty file, not a results file of `quantkit eval`")
    try:
        r = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise QuantkitError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    except ValueError as e:  # parse_constant: NaN, Infinity, -Infinity
        raise QuantkitError(f"{path}: holds {e}, which is not valid JSON (a non-finite figure); rerun "
                            "`quantkit eval`, which writes null and an error field instead") from None
    except RecursionError:
        raise QuantkitError(f"{path}: nested too deeply to be a results file of `quantkit eval`") from None
    if not isinstance(r, dict) or "quantkit_eval" not in r:
        raise QuantkitError(f"{path}: not a results file of `quantkit eval` (a JSON object with a "
                            "'quantkit_eval' field)")
    problem = _problem(r)
    if problem:
        raise QuantkitError(f"{path}: not a complete results file of `quantkit eval`: {problem}")
    return r


_NUMBER = (int, float)


def _problem(r: dict[str, Any]) -> str | None:
    """What makes ``r`` unusable for the report (a missing or mistyped field), or None."""
    def bad(where: str, value: Any, want: str) -> str:
        return f"{where} is missing" if value is _MISSING else f"{where} is {json.dumps(value)[:40]}, not {want}"

    checks: list[tuple[str, Any, tuple[type, ...], bool, str]] = [  # (where, value, types, nullable, wanted)
        ("quantkit_eval", r.get("quantkit_eval", _MISSING), (int,), False, "a version number"),
        ("model", r.get("model", _MISSING), (str,), False, "a string"),
        ("method", r.get("method", _MISSING), (str,), False, "a string"),
        ("size_on_disk_bytes", r.get("size_on_disk_bytes", _MISSING), _NUMBER, False, "a number"),
        ("bits_per_weight", r.get("bits_per_weight"), _NUMBER, True, "a number or null"),
        ("perplexity", r.get("perplexity", {}), (dict,), False, "an object"),
        ("tasks", r.get("tasks", {}), (dict,), False, "an object"),
        ("zeroshot_settings", r.get("zeroshot_settings", {}), (dict,), False, "an object"),
        ("stored_dtype", r.get("stored_dtype"), (str,), True, "a string or null"),
    ]
    for where, value, types, nullable, want in checks:
        if not (isinstance(value, types) and not isinstance(value, bool) or nullable and value is None):
            return bad(where, value, want)
    for name, p in r.get("perplexity", {}).items():
        if not isinstance(p, dict):
            return bad(f"perplexity.{name}", p, "an object")
        for field, nullable in (("ppl", True), ("windows", False), ("seqlen", False)):
            v = p.get(field, _MISSING)
            if not (isinstance(v, _NUMBER) and not isinstance(v, bool) or nullable and v is None):
                return bad(f"perplexity.{name}.{field}", v, "a number" + (" or null" if nullable else ""))
    for name, t in r.get("tasks", {}).items():
        if not isinstance(t, dict):
            return bad(f"tasks.{name}", t, "an object")
        for field in ("acc", "acc_norm", "perplexity"):
            v = t.get(field)
            if not (v is None or isinstance(v, _NUMBER) and not isinstance(v, bool)):
                return bad(f"tasks.{name}.{field}", v, "a number or null")
    limit = r.get("zeroshot_settings", {}).get("limit")
    if not (limit is None or isinstance(limit, int) and not isinstance(limit, bool)):
        return bad("zeroshot_settings.limit", limit, "an integer or null")
    return None


_MISSING = object()


def _merge_same_model(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One run per model folder: results of the same model from separate ``quantkit eval`` calls (perplexity in one,
    zero-shot in another, say) become one row. A dataset or task measured in two of them is an error (which
    figure would the table show?), and so are files that disagree on what the model is."""
    merged: dict[str, dict[str, Any]] = {}
    for r in runs:
        key = str(r.get("model_folder", r["_path"]))
        if key not in merged:
            merged[key] = {**r, "perplexity": dict(r.get("perplexity", {})), "tasks": dict(r.get("tasks", {})),
                           "_paths": [r["_path"]]}
            continue
        m = merged[key]
        for field in ("method", "bits_per_weight", "size_on_disk_bytes"):
            if m.get(field) != r.get(field):
                raise QuantkitError(f"{r['_path']} and {m['_path']} are results of the same model folder but "
                                    f"disagree on {field} ({r.get(field)!r} vs {m.get(field)!r})")
        for section in ("perplexity", "tasks"):
            both = sorted(set(m[section]) & set(r.get(section, {})))
            if both:
                raise QuantkitError(f"{r['_path']} and {', '.join(m['_paths'])} both have {section} results for "
                                    f"{', '.join(both)} of {key}; give one of them")
            m[section].update(r.get(section, {}))
        if r.get("tasks"):
            m["zeroshot_settings"] = r.get("zeroshot_settings")
        m["_paths"].append(r["_path"])
        m["_path"] = " + ".join(m["_paths"])
    return list(merged.values())


def results_name(path: str | os.PathLike) -> str:
    """A results file's name for telling two runs of one method apart: its stem, less the eval_ppl_ /
    eval_zeroshot_ prefix results files share by convention (the report and benchmarks/allocation_check.py)."""
    stem = Path(path).stem
    for prefix in ("eval_ppl_", "eval_zeroshot_"):
        if stem.startswith(prefix) and len(stem) > len(prefix):
            return stem[len(prefix):]
    return stem


def run_label(r: dict[str, Any]) -> str:
    if r.get("quantized"):
        return str(r["method"])
    dtype = _DTYPE_NAMES.get(r.get("stored_dtype") or "", r.get("stored_dtype"))
    return f"unquantized ({dtype})" if dtype else "unquantized"


def average_acc(r: dict[str, Any]) -> float | None:
    accs = [t["acc"] for t in r.get("tasks", {}).values() if t.get("acc") is not None]
    return sum(accs) / len(accs) if accs else None


def _union(runs: list[dict[str, Any]], key: str) -> list[str]:
    names: list[str] = []
    for r in runs:
        names += [n for n in r.get(key, {}) if n not in names]
    return names


def _window_tag(p: dict[str, Any]) -> str:
    return f"{p['windows']}×{p['seqlen']}"


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f}"


def markdown_table(runs: list[dict[str, Any]]) -> str:
    ppl_names, task_names = _union(runs, "perplexity"), _union(runs, "tasks")
    header = ["method", "bits/weight", "size (MiB)"]
    ppl_common: dict[str, str | None] = {}
    for name in ppl_names:
        tags = {_window_tag(r["perplexity"][name]) for r in runs if name in r.get("perplexity", {})}
        ppl_common[name] = tags.pop() if len(tags) == 1 else None
        header.append(f"{_PPL_TITLES.get(name, name)} ppl" + (f" ({ppl_common[name]})" if ppl_common[name] else ""))
    has_norm = {n: any(r.get("tasks", {}).get(n, {}).get("acc_norm") is not None for r in runs) for n in task_names}
    header += [f"{n} acc / acc_norm" if has_norm[n] else f"{n} acc" for n in task_names]
    if task_names:
        header.append("average acc")
    rows = [header, ["---"] + ["---:"] * (len(header) - 1)]
    for r in runs:
        bpw = r.get("bits_per_weight")
        row = [r["_label"], "–" if bpw is None else f"{bpw:.3f}", f"{r['size_on_disk_bytes'] / 2**20:.1f}"]
        for name in ppl_names:
            p = r.get("perplexity", {}).get(name)
            cell = "–" if p is None else "not finite" if p["ppl"] is None else f"{p['ppl']:.3f}"
            if p is not None and ppl_common[name] is None:
                cell += f" ({_window_tag(p)})"
            row.append(cell)
        for name in task_names:
            t = r.get("tasks", {}).get(name)
            if t is None:
                row.append("–")
            elif has_norm[name]:
                row.append(f"{_pct(t.get('acc'))} / {_pct(t.get('acc_norm'))}")
            else:
                row.append(_pct(t.get("acc")))
        if task_names:
            row.append(_pct(average_acc(r)))
        rows.append(row)
    lines = ["| " + " | ".join(row) + " |" for row in rows]
    notes = []
    if task_names:
        notes.append("Zero-shot accuracies in percent (lm-eval, 0-shot); average = mean acc over the run's tasks.")
        limited = sorted({r.get("zeroshot_settings", {}).get("limit") for r in runs} - {None})
        if limited:
            notes.append(f"Some runs scored only the first {', '.join(map(str, limited))} documents per task.")
    failed = [r for r in runs if r.get("error")]
    if failed:
        notes.append("Failed: " + "; ".join(f"{r['_label']}: {r['error']}" for r in failed) + ".")
    notes.append("Runs: " + "; ".join(f"{r['_label']} = `{r['_path']}`" for r in runs) + ".")
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def _pareto_front(points: list[tuple[float, float]], higher_is_better: bool) -> list[tuple[float, float]]:
    """Points that no other point beats on both axes (fewer bits and a better score), in order of bits."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1] if higher_is_better else p[1])):
        if not front or (y > front[-1][1] if higher_is_better else y < front[-1][1]):
            front.append((x, y))
    return front


def _place_labels(ax, pts: list[tuple[float, float, str]], renderer) -> None:
    """Label each point beside it: the first nearby spot inside the axes that overlaps no other label or point and
    sits closer to its own point than to any other (so no label reads as another point's), else the least bad spot
    inside the axes (a crowded plot never pushes a label off the axes). A label away from its point gets a thin
    leader line."""
    offsets = [(7, 5), (7, -13), (-7, 5), (-7, -13), (9, -4), (-9, -4), (7, 16), (7, -24), (-7, 16), (-7, -24),
               (7, 27), (7, -35), (-7, 27), (-7, -35), (7, 40), (7, -48), (-7, 40), (-7, -48)]
    centres = [tuple(ax.transData.transform((x, y))) for x, y, _ in pts]
    marker_boxes = [(px - 5, py - 5, px + 5, py + 5) for px, py in centres]
    placed: list[tuple[float, float, float, float]] = []
    axes_box = ax.get_window_extent(renderer)

    def overlap(box) -> float:
        return sum(max(0.0, min(box[2], o[2]) - max(box[0], o[0])) * max(0.0, min(box[3], o[3]) - max(box[1], o[1]))
                   for o in placed + marker_boxes)

    def gap(box, c) -> float:  # distance from a point to a box
        return math.hypot(max(box[0] - c[0], 0.0, c[0] - box[2]), max(box[1] - c[1], 0.0, c[1] - box[3]))

    for i in sorted(range(len(pts)), key=lambda i: (pts[i][0], pts[i][1])):
        x, y, label = pts[i]
        best = None  # (outside, overlapping, ambiguous, overlap, offset, box)
        for dx, dy in offsets:
            ann = ax.annotate(label, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=9,
                              ha="left" if dx > 0 else "right")
            b = ann.get_window_extent(renderer)
            ann.remove()
            box = (b.x0, b.y0, b.x1, b.y1)
            inside = axes_box.x0 <= b.x0 and b.x1 <= axes_box.x1 and axes_box.y0 <= b.y0 and b.y1 <= axes_box.y1
            own = gap(box, centres[i])
            ambiguous = any(gap(box, c) < own for j, c in enumerate(centres) if j != i and c != centres[i])
            o = overlap(box)
            score = (not inside, o > 0, ambiguous, o, (dx, dy), box)
            if best is None or score[:4] < best[:4]:
                best = score
            if score[:3] == (False, False, False):
                break
        (dx, dy), box = best[4], best[5]
        far = abs(dy) > 13 or best[2]  # away from its point, or nearer another: a leader line says whose it is
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=9,
                    ha="left" if dx > 0 else "right",
                    arrowprops=dict(arrowstyle="-", lw=0.6, color="0.5", shrinkA=0, shrinkB=4) if far else None)
        placed.append(box)


def _off_scale_cap(values: list[float]) -> float | None:
    """The top of a log perplexity axis that keeps the useful range readable: 50x the best value when some run is
    beyond it (a collapsed 2-bit grid reaches 1e6 where the rest sit within 20-200), else None (no cap)."""
    cap = 50 * min(values) if values else None
    return cap if cap is not None and max(values) > cap else None


def _panel(ax, runs, values: list[float | None], ylabel: str, *, higher_is_better: bool,
           log_y: bool) -> list[tuple[float, float, str]]:
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter, NullLocator

    pts = [(r["bits_per_weight"], v, r["_label"]) for r, v in zip(runs, values, strict=True)
           if v is not None and r.get("bits_per_weight") is not None]
    xs = sorted({p[0] for p in pts})
    front = _pareto_front([(x, y) for x, y, _ in pts], higher_is_better)
    top = _off_scale_cap([y for _, y, _ in pts]) if log_y and not higher_is_better else None
    off = [top is not None and y > top for _, y, _ in pts]
    if top is not None:  # a collapsed run would squash the useful decades: it sits on the top edge, its value named
        pts = [(x, top / 1.12, f"{label} ({y:.3g}, off scale)") if o else (x, y, label)
               for (x, y, label), o in zip(pts, off, strict=True)]
    for marker, size, color, pick in (("o", 45, "tab:blue", False), ("^", 55, "tab:red", True)):
        chosen = [(x, y) for (x, y, _), o in zip(pts, off, strict=True) if o == pick]
        if chosen:
            ax.scatter(*zip(*chosen, strict=True), s=size, marker=marker, color=color, zorder=3)
    if len(front) > 1:
        ax.plot(*zip(*front, strict=True), color="tab:orange", lw=1.5, zorder=2, label="Pareto front")
        ax.legend(loc="best", fontsize=9)
    ax.set_xscale("log", base=2)
    lo, hi = (min(xs), max(xs)) if xs else (2, 32)
    ax.xaxis.set_major_locator(FixedLocator([t for t in (2, 3, 4, 6, 8, 16, 32) if lo / 1.3 <= t <= hi * 1.6]))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlim(lo / 1.3, hi * 1.6)
    if log_y:
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        if top is not None:
            ax.set_ylim(min(y for _, y, _ in pts) / 1.25, top)
    ax.set_xlabel("bits per weight (log scale)")
    ax.set_ylabel(ylabel)
    ax.grid(True, which="major", alpha=0.3)
    return pts


def pareto_plot(runs: list[dict[str, Any]], out: str | os.PathLike) -> Path:
    """Perplexity (and the zero-shot average, if any run has one) against bits per weight, saved as PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise QuantkitError("the plot needs matplotlib: pip install matplotlib") from e
    if not any(r.get("bits_per_weight") is not None for r in runs):
        raise QuantkitError("no run has a bits-per-weight figure to plot against")
    ppl_names = _union(runs, "perplexity")
    ppl_name = "wikitext2" if "wikitext2" in ppl_names else (ppl_names[0] if ppl_names else None)
    accs = [average_acc(r) for r in runs]
    panels = (1 if ppl_name else 0) + (1 if any(a is not None for a in accs) else 0)
    if panels == 0:
        raise QuantkitError("the results have neither perplexity nor zero-shot figures to plot")
    fig, axes = plt.subplots(1, panels, figsize=(7 * panels, 6), squeeze=False)
    i = 0
    labelled = []
    if ppl_name:
        vals = [r.get("perplexity", {}).get(ppl_name, {}).get("ppl") for r in runs]
        tags = {_window_tag(r["perplexity"][ppl_name]) for r in runs if ppl_name in r.get("perplexity", {})}
        title = f"{_PPL_TITLES.get(ppl_name, ppl_name)} perplexity" + (f" ({tags.pop()})" if len(tags) == 1 else "")
        labelled.append((axes[0][i], _panel(axes[0][i], runs, vals, "perplexity (log scale, lower is better)",
                                            higher_is_better=False, log_y=True)))
        axes[0][i].set_title(title)
        i += 1
    if i < panels:
        labelled.append((axes[0][i], _panel(axes[0][i], runs, [None if a is None else 100 * a for a in accs],
                                            "average zero-shot acc, % (higher is better)", higher_is_better=True,
                                            log_y=False)))
        axes[0][i].set_title("zero-shot average accuracy")
    fig.tight_layout()
    renderer = fig.canvas.get_renderer()
    for ax, pts in labelled:
        _place_labels(ax, pts, renderer)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(path) as tmp:  # a reader never sees a half-written plot
            fig.savefig(tmp, dpi=120)
    finally:
        plt.close(fig)
    return path
