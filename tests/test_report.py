"""``quantkit report``: the Markdown table's values and a valid PNG plot, from two real `quantkit eval` runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from quantkit.cli import main
from quantkit.eval.report import _panel, _pareto_front, _place_labels, average_acc

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(tmp: Path, name: str, data_dir: Path, model: Path) -> Path:
    out = tmp / f"{name}.json"
    args = ["eval", str(model), "--ppl", "wikitext2", "--ppl-windows", "1", "--seqlen", "64",
            "--tasks", "arc_easy,winogrande", "--limit", "2", "--device", "cpu", "--data-dir", str(data_dir),
            "--out", str(out)]
    assert main(args) == 0
    return out


@pytest.fixture(scope="module")
def two_runs(tiny_model_factory, tmp_path_factory, data_dir):
    from quantkit.pipeline import quantize

    tmp = tmp_path_factory.mktemp("report")
    folder = tiny_model_factory("llama")
    quantize(str(folder), "rtn-w4g128", tmp / "q", progress=False)
    return [_run(tmp, "fp32", data_dir, folder), _run(tmp, "rtn", data_dir, tmp / "q")]


def _table(md: str) -> list[dict[str, str]]:
    lines = [line for line in md.splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return [dict(zip(cells[0], row, strict=True)) for row in cells[2:]]


def test_report_table_and_plot(two_runs, tmp_path):
    md, png = tmp_path / "report.md", tmp_path / "plots" / "pareto.png"
    assert main(["report", *map(str, two_runs), "--out", str(md), "--plot", str(png)]) == 0
    text = md.read_text()
    rows = _table(text)
    runs = [json.loads(p.read_text()) for p in two_runs]
    assert [row["method"] for row in rows] == ["unquantized (fp32)", "rtn-w4g128"]
    for row, r in zip(rows, runs, strict=True):
        assert row["bits/weight"] == f"{r['bits_per_weight']:.3f}"
        assert row["size (MiB)"] == f"{r['size_on_disk_bytes'] / 2**20:.1f}"
        assert row["WikiText-2 ppl (1×64)"] == f"{r['perplexity']['wikitext2']['ppl']:.3f}"
        e, w = r["tasks"]["arc_easy"], r["tasks"]["winogrande"]
        assert row["arc_easy acc / acc_norm"] == f"{100 * e['acc']:.2f} / {100 * e['acc_norm']:.2f}"
        assert row["winogrande acc"] == f"{100 * w['acc']:.2f}"
        assert row["average acc"] == f"{100 * (e['acc'] + w['acc']) / 2:.2f}"
    assert rows[0]["bits/weight"] == "32.000" and float(rows[1]["bits/weight"]) < 5
    assert "first 2 documents" in text
    assert "![" in text and "(plots/pareto.png)" in text  # the plot, linked relative to the report
    data = png.read_bytes()
    assert data[:8] == PNG_MAGIC
    import matplotlib.image

    img = matplotlib.image.imread(png)
    assert img.shape[0] >= 400 and img.shape[1] >= 1000  # two panels side by side


def test_report_prints_without_out(two_runs, capsys):
    assert main(["report", *map(str, two_runs)]) == 0
    out = capsys.readouterr().out
    assert out.count("\n| ") >= 3 and "rtn-w4g128" in out


def test_report_rejects_a_file_that_is_not_results(tmp_path, capsys):
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"hello": 1}))
    assert main(["report", str(bad)]) == 2
    assert "not a results file of `quantkit eval`" in capsys.readouterr().err


def test_pareto_front_and_average():
    pts = [(4.2, 20.0), (3.2, 35.0), (4.2, 18.0), (8.1, 17.5), (32.0, 17.0), (2.2, 900.0), (3.5, 40.0)]
    assert _pareto_front(pts, higher_is_better=False) == [(2.2, 900.0), (3.2, 35.0), (4.2, 18.0), (8.1, 17.5),
                                                          (32.0, 17.0)]
    assert _pareto_front([(2, 0.3), (3, 0.5), (4, 0.4)], higher_is_better=True) == [(2, 0.3), (3, 0.5)]
    assert average_acc({"tasks": {"a": {"acc": 0.5}, "b": {"acc": 0.25}, "c": {"perplexity": 3.0}}}) == 0.375
    assert average_acc({"tasks": {}}) is None


def test_a_collapsed_run_sits_on_the_top_edge_and_labels_stay_with_their_points():
    """A 1e6 perplexity would squash 20-100 into a sliver: the axis stops at 50x the best value, the collapsed run
    is drawn on its top edge with its value in its label, and every label ends up nearer its own point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [{"bits_per_weight": b, "_label": name} for b, name in
            ((2.5, "rtn-w2g64"), (4.27, "rtn-w4g128"), (4.29, "gptq-w4g128"), (3.0, "a"), (32.0, "fp32"))]
    fig, ax = plt.subplots()
    try:
        pts = _panel(ax, runs, [9.2e5, 29.9, 25.2, 30.0, 21.6], "ppl", higher_is_better=False, log_y=True)
        assert ax.get_ylim()[1] == pytest.approx(50 * 21.6)
        assert pts[0][1] < 50 * 21.6 and pts[0][2] == "rtn-w2g64 (9.2e+05, off scale)"
        assert [p[2] for p in pts[1:]] == ["rtn-w4g128", "gptq-w4g128", "a", "fp32"]  # the rest as measured
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        _place_labels(ax, pts, renderer)
        centres = {p[2]: ax.transData.transform((p[0], p[1])) for p in pts}
        for t in ax.texts:
            b = t.get_window_extent(renderer)
            dist = {name: max(b.x0 - c[0], 0, c[0] - b.x1) ** 2 + max(b.y0 - c[1], 0, c[1] - b.y1) ** 2
                    for name, c in centres.items()}
            nearest = min(dist, key=dist.get)
            assert nearest == t.get_text() or t.arrow_patch is not None, t.get_text()  # else a leader line
        _, clean = plt.subplots()
        _panel(clean, runs[1:], [29.9, 25.2, 30.0, 21.6], "ppl", higher_is_better=False, log_y=True)
        assert clean.get_ylim()[1] < 40  # nothing collapsed: no cap
    finally:
        plt.close("all")


def _split(run: Path, tmp: Path) -> tuple[Path, Path]:
    """The same run as two results files, perplexity in one and zero-shot in the other."""
    r = json.loads(run.read_text())
    ppl, zs = tmp / f"{run.stem}-ppl.json", tmp / f"{run.stem}-zs.json"
    ppl.write_text(json.dumps({**r, "tasks": {}}))
    zs.write_text(json.dumps({**r, "perplexity": {}}))
    return ppl, zs


def test_report_merges_results_of_one_model(two_runs, tmp_path, capsys):
    """Perplexity and zero-shot of one model from separate `quantkit eval` runs make one row, equal to the row of
    the run that measured both."""
    assert main(["report", *map(str, two_runs)]) == 0
    whole = _table(capsys.readouterr().out)
    parts = [*_split(two_runs[0], tmp_path), *_split(two_runs[1], tmp_path)]
    assert main(["report", *map(str, parts)]) == 0
    assert _table(capsys.readouterr().out) == whole


def test_report_refuses_two_figures_for_one_cell(two_runs, tmp_path, capsys):
    ppl, _ = _split(two_runs[0], tmp_path)
    assert main(["report", str(two_runs[0]), str(ppl)]) == 2
    assert "both have perplexity results for wikitext2" in capsys.readouterr().err
    other = json.loads(ppl.read_text())
    other["perplexity"], other["bits_per_weight"] = {}, 4.0
    (tmp_path / "other.json").write_text(json.dumps(other))
    assert main(["report", str(two_runs[0]), str(tmp_path / "other.json")]) == 2
    assert "disagree on bits_per_weight" in capsys.readouterr().err


def test_a_failed_plot_keeps_the_previous_one(two_runs, tmp_path, monkeypatch, capsys):
    """The plot is written beside its path and renamed into place: a failure mid-write leaves the old file whole
    and no temporary behind."""
    import matplotlib.figure

    png = tmp_path / "pareto.png"
    assert main(["report", *map(str, two_runs), "--plot", str(png)]) == 0
    before = png.read_bytes()

    def broken(self, fname, **kw):
        Path(fname).write_bytes(PNG_MAGIC)  # a partial file, then the failure
        raise OSError("No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", broken)
    assert main(["report", *map(str, two_runs), "--plot", str(png)]) == 2  # one line: "No space left on device"
    assert "No space left" in capsys.readouterr().err
    assert png.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pareto.png"]


def test_two_runs_of_one_method_are_told_apart_by_folder_then_by_results_file(two_runs, tmp_path):
    """Two queues' allocated-3.0 folders are both named alloc-3.0: their rows take the results files' names."""
    from quantkit.eval.report import load_results

    r = json.loads(two_runs[1].read_text())

    def copy(name: str, folder: str) -> Path:
        p = tmp_path / f"{name}.json"
        p.write_text(json.dumps({**r, "model": folder, "model_folder": folder}))
        return p

    labels = [x["_label"] for x in load_results([copy("a", "/x/q1"), copy("b", "/y/q2")])]
    assert labels == ["rtn-w4g128 [q1]", "rtn-w4g128 [q2]"]
    labels = [x["_label"] for x in load_results([copy("eval-v2", "/x/q"), copy("eval-v3", "/y/q"), two_runs[0]])]
    assert labels == ["rtn-w4g128 [eval-v2]", "rtn-w4g128 [eval-v3]", "unquantized (fp32)"]
    labels = [x["_label"] for x in load_results([copy("eval_ppl_smollm2-alloc-3.0", "/x/q"),
                                                 copy("eval_ppl_smollm2-alloc-v2-3.0", "/y/q")])]
    assert labels == ["rtn-w4g128 [smollm2-alloc-3.0]", "rtn-w4g128 [smollm2-alloc-v2-3.0]"]
