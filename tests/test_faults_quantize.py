"""Fault and bad-input suite, ``quantkit quantize`` (issue 20): data loss, races, stale results, unresumable
state, kills at every step, and bad sources, recipes and calibration files. Each case checks the exit status, the
one-line message, what is left on disk, and that the source model and any earlier good output are unchanged."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from faultkit import Guard, expect_clean, leftovers, run_cli, snapshot
from safetensors.torch import load_file, save_file

from quantkit import resume

CAL = ["--nsamples", "4", "--seqlen", "32"]


@pytest.fixture
def model(tiny_llama_copy) -> Path:
    return tiny_llama_copy


def quantize(model: Path, out: Path, calib: Path, *extra: str, recipe: str = "gptq-w4g128"):
    return run_cli("quantize", "--model", model, "--recipe", recipe, "--out", out, "--calib", calib, *CAL, *extra)


def files(out: Path) -> dict[str, bytes]:
    """Every file of an output except the report, whose timings differ from run to run."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name != "quantkit_report.json"}


@pytest.fixture(scope="module")
def reference(tiny_llama, calib_file, tmp_path_factory) -> dict[str, bytes]:
    """The uninterrupted output of ``quantize(model copy)`` (same path name ``model``, so the same fingerprint)."""
    root = tmp_path_factory.mktemp("reference")
    model = Path(shutil.copytree(tiny_llama, root / "model"))
    o = quantize(model, root / "out", calib_file)
    assert o.code == 0, str(o)
    return files(root / "out")


# -- data loss ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["source", "inside", "inside-deep", "parent", "symlink"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_out_never_touches_the_source(where, overwrite, model, tmp_path, calib_file):
    out = {"source": model, "inside": model / "q", "inside-deep": model / "a" / "b", "parent": tmp_path,
           "symlink": tmp_path / "link"}[where]
    if where == "symlink":
        out.symlink_to(model, target_is_directory=True)
    guard = Guard([model], tmp_path)
    o = quantize(model, out, calib_file, *(["--overwrite"] if overwrite else []))
    expect_clean(o, "--out", "source model", guard=guard)


def test_overwrite_never_deletes_a_folder_quantkit_did_not_write(model, tmp_path, calib_file):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    guard = Guard([out, model], tmp_path)
    expect_clean(quantize(model, out, calib_file, "--overwrite"), str(out), "quantkit did not write", guard=guard)


def test_overwrite_keeps_an_output_the_user_added_files_to(model, tmp_path, calib_file):
    out = tmp_path / "q"
    assert quantize(model, out, calib_file, recipe="rtn-w4g128").code == 0
    (out / "notes.md").write_text("my notes")
    guard = Guard([out, model], tmp_path)
    expect_clean(quantize(model, out, calib_file, "--overwrite"), "notes.md", "quantkit did not write", guard=guard)


def test_overwrite_replaces_an_output_quantkit_wrote(model, tmp_path, calib_file, reference):
    out = tmp_path / "q"
    assert quantize(model, out, calib_file, recipe="rtn-w3g128").code == 0
    guard = Guard([out], tmp_path)
    expect_clean(quantize(model, out, calib_file), "already holds a different result", "--overwrite", guard=guard)
    assert quantize(model, out, calib_file, "--overwrite").code == 0
    assert files(out) == reference and not leftovers(tmp_path)


def test_out_that_is_a_file(model, tmp_path, calib_file):
    out = tmp_path / "weights.bin"
    out.write_bytes(b"precious")
    guard = Guard([out, model], tmp_path)
    expect_clean(quantize(model, out, calib_file, "--overwrite"), "is not a folder", guard=guard)


def test_out_under_a_file(model, tmp_path, calib_file):
    parent = tmp_path / "file"
    parent.write_text("x")
    guard = Guard([parent, model], tmp_path)
    expect_clean(quantize(model, parent / "q", calib_file), str(parent), guard=guard)


# -- races -------------------------------------------------------------------------------------------------------

HOLD_LOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, str(os.getpid()).encode())
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
"""


def _hold_lock(out: Path, seconds: float) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out) + ".quantkit-lock", str(seconds)],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    return p


def test_a_second_run_on_a_locked_out_fails_at_once(model, tmp_path, calib_file):
    out = tmp_path / "q"
    holder = _hold_lock(out, 60)
    try:
        guard = Guard([model], tmp_path / "nothing")
        t = time.time()
        line = expect_clean(quantize(model, out, calib_file), "another quantkit run", str(holder.pid))
        assert time.time() - t < 30, line
        guard.check()
        assert not out.exists() and not (tmp_path / "q.quantkit-partial").exists()
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_left_by_a_killed_run_is_not_stale(model, tmp_path, calib_file, reference):
    out = tmp_path / "q"
    holder = _hold_lock(out, 60)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (tmp_path / "q.quantkit-lock").exists()
    assert quantize(model, out, calib_file).code == 0
    assert files(out) == reference and not leftovers(tmp_path)


SLOW_RUN = """
import sys, time
from quantkit import resume
from quantkit.cli import main
real = resume.Progress.save_layer
def slow(self, *a, **k):
    print("layer", flush=True)
    time.sleep(1.0)
    return real(self, *a, **k)
resume.Progress.save_layer = slow
sys.exit(main(sys.argv[1:]))
"""


def test_two_concurrent_runs_never_mix(model, tmp_path, calib_file, reference):
    """Run A (gptq) holds the lock while B (rtn, same --out) starts: B fails at once, A's output is A's alone."""
    out = tmp_path / "q"
    a = subprocess.Popen([sys.executable, "-c", SLOW_RUN, "quantize", "--model", str(model), "--recipe",
                          "gptq-w4g128", "--out", str(out), "--calib", str(calib_file), *CAL],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert a.stdout.readline().strip() == "layer"
        expect_clean(quantize(model, out, calib_file, "--overwrite", recipe="rtn-w4g128"), "another quantkit run")
    finally:
        a.stdout.read()
        assert a.wait(timeout=300) == 0
    assert files(out) == reference and not leftovers(tmp_path)
    assert json.loads((out / "quantkit_report.json").read_text())["recipe"]["name"] == "gptq-w4g128"


def test_an_output_that_appears_during_the_run_is_not_replaced(model, tmp_path, calib_file, monkeypatch):
    out = tmp_path / "q"
    real = resume.Progress.save_layer

    def someone_writes_out(self, i, *a, **k):
        real(self, i, *a, **k)
        if i == 0:
            out.mkdir()
            (out / "theirs.txt").write_text("theirs")

    monkeypatch.setattr(resume.Progress, "save_layer", someone_writes_out)
    expect_clean(quantize(model, out, calib_file, "--overwrite"), str(out), "quantkit did not write")
    assert sorted(p.name for p in out.iterdir()) == ["theirs.txt"]
    assert not (tmp_path / "q.quantkit-tmp").exists() and not (tmp_path / "q.quantkit-lock").exists()


# -- stale results -----------------------------------------------------------------------------------------------

def _perturb_weights(model: Path) -> None:
    w = load_file(model / "model.safetensors")
    w["model.layers.1.mlp.up_proj.weight"][0, 0] += 0.25  # same size, same names, other content
    save_file(w, model / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("change", ["weights", "calibration", "tokenizer"])
def test_changed_inputs_are_never_called_unchanged(change, model, tmp_path, calib_file):
    calib = Path(shutil.copy(calib_file, tmp_path / "calib.jsonl"))
    out = tmp_path / "q"
    assert quantize(model, out, calib).code == 0
    before = snapshot(out / "model.safetensors")
    if change == "weights":
        _perturb_weights(model)
    elif change == "calibration":
        lines = calib.read_text().splitlines(keepends=True)
        calib.write_text("".join(lines[1:] + lines[:1]))
    else:
        tok = json.loads((model / "tokenizer_config.json").read_text())
        tok["model_max_length"] = 12345
        (model / "tokenizer_config.json").write_text(json.dumps(tok))
    o = quantize(model, out, calib)
    expect_clean(o, "already holds a different result", "--overwrite")
    assert "unchanged" not in o.out and snapshot(out / "model.safetensors") == before
    assert quantize(model, out, calib, "--overwrite").code == 0
    if change != "tokenizer":  # the tokenizer change does not change these ids
        assert snapshot(out / "model.safetensors") != before


def test_a_resume_after_the_weights_changed_starts_over(model, tmp_path, calib_file, monkeypatch):
    out, fresh = tmp_path / "q", tmp_path / "fresh"
    real = resume.Progress.save_layer

    def die_after_layer_1(self, i, *a, **k):
        real(self, i, *a, **k)
        if i == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(resume.Progress, "save_layer", die_after_layer_1)
    assert quantize(model, out, calib_file).code == 130
    monkeypatch.setattr(resume.Progress, "save_layer", real)
    _perturb_weights(model)
    assert quantize(model, out, calib_file).code == 0
    assert json.loads((out / "quantkit_report.json").read_text())["resumed_at_layer"] == 0
    assert quantize(model, fresh, calib_file).code == 0
    assert files(out)["model.safetensors"] == files(fresh)["model.safetensors"]


def test_a_finished_output_is_unchanged_only_when_everything_matches(model, tmp_path, calib_file):
    out = tmp_path / "q"
    assert quantize(model, out, calib_file).code == 0
    guard = Guard([out], tmp_path)
    o = quantize(model, out, calib_file)
    guard.check()
    assert o.code == 0 and o.out.startswith("unchanged")


# -- resumable from every point ----------------------------------------------------------------------------------

KILL = """
import os, pathlib, signal, sys
import quantkit

point, n = sys.argv[1], int(sys.argv[2])
if point in ("marker", "rename") and not (pathlib.Path(quantkit.__file__).parent / "outdir.py").exists():
    sys.exit("ModuleNotFoundError: this quantkit has no quantkit.outdir (no publish steps to kill)")  # the census
from quantkit import assemble, outdir, resume
from quantkit.cli import main

calls = [0]

def kill_after(fn):
    def wrapped(*a, **k):
        r = fn(*a, **k)
        calls[0] += 1
        if calls[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return r
    return wrapped

if point == "layer":
    resume.Progress.save_layer = kill_after(resume.Progress.save_layer)
elif point == "shards":
    assemble.write_shards = kill_after(assemble.write_shards)
elif point == "marker":
    outdir.OutputFolder.write_marker = kill_after(outdir.OutputFolder.write_marker)
elif point == "rename":
    real_publish = outdir.OutputFolder.publish
    def publish(self, overwrite):
        outdir.os.replace = kill_after(outdir.os.replace)
        return real_publish(self, overwrite)
    outdir.OutputFolder.publish = publish
elif point == "cleanup":
    resume.Progress.remove = kill_after(lambda self: None)
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.parametrize("point,n,existing", [
    ("layer", 1, False), ("layer", 2, False), ("layer", 3, False), ("shards", 1, False), ("marker", 1, False),
    ("rename", 1, False), ("rename", 1, True), ("rename", 2, True), ("cleanup", 1, True),
])
def test_killed_anywhere_the_rerun_gives_the_same_bytes(point, n, existing, model, tmp_path, calib_file, reference):
    """SIGKILL (nothing runs on the way out) after the n-th call at each point; the rerun completes, with the same
    files as an uninterrupted run and nothing left beside them. ``existing``: an older output is being replaced."""
    out = tmp_path / "q"
    extra = []
    if existing:
        assert quantize(model, out, calib_file, recipe="rtn-w3g128").code == 0
        extra = ["--overwrite"]
    argv = ["quantize", "--model", str(model), "--recipe", "gptq-w4g128", "--out", str(out), "--calib",
            str(calib_file), *CAL, *extra]
    r = subprocess.run([sys.executable, "-c", KILL, point, str(n), *argv], capture_output=True, text=True)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    o = run_cli(*argv)
    assert o.code == 0, str(o)
    assert files(out) == reference
    assert not leftovers(tmp_path), f"left behind: {leftovers(tmp_path)}"


def test_a_full_disk_during_assembly_is_one_line_and_resumable(model, tmp_path, calib_file, reference, monkeypatch):
    from quantkit import assemble

    real = assemble.write_shards

    def full(tensors, folder, **k):
        (folder / "model.safetensors").write_bytes(b"torn")
        raise OSError(28, "No space left on device", str(folder / "model.safetensors"))

    out = tmp_path / "q"
    monkeypatch.setattr(assemble, "write_shards", full)
    expect_clean(quantize(model, out, calib_file), "No space left on device", "model.safetensors")
    assert not out.exists() and (tmp_path / "q.quantkit-partial").is_dir()  # kept: the rerun resumes from it
    monkeypatch.setattr(assemble, "write_shards", real)
    o = quantize(model, out, calib_file)
    assert o.code == 0 and files(out) == reference and not leftovers(tmp_path)


def test_progress_of_every_layer_without_next_inputs_resumes(model, tmp_path, calib_file, reference, monkeypatch):
    """The old failure: every layer done, the run died in assembly, each rerun asked for inputs_NNNN."""
    out = tmp_path / "q"
    from quantkit import assemble

    def die(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(assemble, "write_shards", die)
    assert quantize(model, out, calib_file).code == 130
    monkeypatch.undo()
    assert not list((tmp_path / "q.quantkit-partial").glob("inputs_*"))
    assert quantize(model, out, calib_file).code == 0 and files(out) == reference


# -- disk full and read-only, on a real small file system --------------------------------------------------------

@pytest.fixture
def small_fs(tmp_path):
    """A 1 MiB tmpfs (the tiny model's W4 output is ~20 MB): needs root and mount."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {r.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_is_one_line_naming_the_file(model, small_fs, calib_file):
    """The progress may stay, for a resume once there is space; nothing else does, and the source is unchanged."""
    before = snapshot(model)
    expect_clean(quantize(model, small_fs / "q", calib_file), "No space left on device", str(small_fs))
    assert snapshot(model) == before
    assert sorted(p.name for p in small_fs.iterdir()) in ([], ["q.quantkit-partial"])


def test_read_only_file_system_is_one_line(model, small_fs, calib_file):
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    guard = Guard([model], small_fs)
    expect_clean(quantize(model, small_fs / "q", calib_file), "Read-only file system", str(small_fs), guard=guard)


# -- bad sources, recipes, calibration ---------------------------------------------------------------------------

def _corrupt(model: Path, how: str) -> None:
    st = model / "model.safetensors"
    if how == "config-garbage":
        (model / "config.json").write_bytes(os.urandom(256))
    elif how == "config-not-json":
        (model / "config.json").write_text("{model_type: llama")
    elif how == "config-no-model-type":
        cfg = json.loads((model / "config.json").read_text())
        del cfg["model_type"]
        (model / "config.json").write_text(json.dumps(cfg))
    elif how == "config-list":
        (model / "config.json").write_text("[1, 2]")
    elif how == "no-tokenizer":
        for p in model.glob("tokenizer*"):
            p.unlink()
    elif how == "tokenizer-garbage":
        (model / "tokenizer.json").write_bytes(os.urandom(512))
    elif how == "weights-truncated":
        data = st.read_bytes()
        st.write_bytes(data[: len(data) // 2])
    elif how == "weights-empty":
        st.write_bytes(b"")
    elif how == "weights-garbage-header":
        data = st.read_bytes()
        st.write_bytes(b"\xff" * 16 + data[16:])
    elif how == "weights-missing":
        st.unlink()
    elif how in ("missing-layer-tensor", "missing-norm", "missing-embedding"):
        w = load_file(st)
        del w[{"missing-layer-tensor": "model.layers.2.self_attn.k_proj.weight", "missing-norm": "model.norm.weight",
               "missing-embedding": "model.embed_tokens.weight"}[how]]
        save_file(w, st, metadata={"format": "pt"})
    elif how == "wrong-shape":
        w = load_file(st)
        w["model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 3)
        save_file(w, st, metadata={"format": "pt"})
    elif how == "index-garbage":
        (model / "model.safetensors.index.json").write_text("not json")
    elif how == "index-missing-shard":
        keys = list(load_file(st))
        (model / "model.safetensors.index.json").write_text(json.dumps(
            {"weight_map": {k: "model-00002-of-00002.safetensors" for k in keys}}))
    else:
        raise AssertionError(how)


SOURCE_FAULTS = {
    "config-garbage": "config.json", "config-not-json": "config.json", "config-no-model-type": "config.json",
    "config-list": "config.json", "no-tokenizer": "tokenizer", "tokenizer-garbage": "tokenizer",
    "weights-truncated": "model.safetensors", "weights-empty": "model.safetensors",
    "weights-garbage-header": "model.safetensors", "weights-missing": "no safetensors weights",
    "missing-layer-tensor": "k_proj", "missing-norm": "model.norm.weight", "missing-embedding": "embed_tokens",
    "wrong-shape": "up_proj", "index-garbage": "model.safetensors.index.json",
    "index-missing-shard": "model-00002-of-00002.safetensors",
}


@pytest.mark.parametrize("how", sorted(SOURCE_FAULTS))
def test_a_broken_source_is_one_line_and_leaves_nothing(how, model, tmp_path, calib_file):
    _corrupt(model, how)
    guard = Guard([model], tmp_path)
    expect_clean(quantize(model, tmp_path / "q", calib_file), SOURCE_FAULTS[how], guard=guard)
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("how", ["binary", "list", "scalar", "directory", "empty", "latin1"])
def test_a_broken_recipe_file_is_one_line(how, model, tmp_path, calib_file):
    recipe = tmp_path / "recipe.yaml"
    if how == "binary":
        recipe.write_bytes(os.urandom(300) + b"\x00")
    elif how == "list":
        recipe.write_text("- method: rtn\n- bits: 4\n")
    elif how == "scalar":
        recipe.write_text("42\n")
    elif how == "directory":
        recipe.mkdir()
    elif how == "empty":
        recipe.write_text("")
    else:
        recipe.write_bytes("name: caf\xe9\nschemes: []\n".encode("latin-1"))
    guard = Guard([model], tmp_path)
    o = run_cli("quantize", "--model", model, "--recipe", recipe, "--out", tmp_path / "q", "--calib", calib_file, *CAL)
    expect_clean(o, "recipe", guard=guard)


@pytest.mark.parametrize("how", ["binary", "latin1-txt", "directory", "nul-jsonl", "jsonl-list", "wrong-suffix"])
def test_a_broken_calibration_file_is_one_line(how, model, tmp_path):
    calib = tmp_path / ("calib.txt" if how in ("latin1-txt",) else "calib.jsonl")
    if how == "binary":
        calib.write_bytes(os.urandom(4096))
    elif how == "latin1-txt":
        calib.write_bytes("caf\xe9 ".encode("latin-1") * 1000)
    elif how == "directory":
        calib.mkdir()
    elif how == "nul-jsonl":
        calib.write_text('{"text": "a"}\n\x00\x00\x00\n')
    elif how == "jsonl-list":
        calib.write_text('["text"]\n')
    else:
        calib = tmp_path / "calib.parquet"
        calib.write_bytes(b"PAR1")
    guard = Guard([model], tmp_path)
    expect_clean(quantize(model, tmp_path / "q", calib), str(calib), guard=guard)


@pytest.mark.parametrize("args,phrase", [
    (["--seqlen", "4096"], "position limit"), (["--nsamples", "0"], "--nsamples"), (["--seqlen", "1"], "--seqlen"),
])
def test_bad_settings_are_one_line_before_any_work(args, phrase, model, tmp_path, calib_file):
    guard = Guard([model], tmp_path)
    o = run_cli("quantize", "--model", model, "--recipe", "gptq-w4g128", "--out", tmp_path / "q", "--calib",
                calib_file, *CAL, *args)
    expect_clean(o, phrase, guard=guard)


def test_a_truncated_gguf_is_one_line(tmp_path, monkeypatch):
    from quantkit.loading import bundled_gguf

    try:
        gguf = bundled_gguf()
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"no bundled GGUF here: {e}")
    bad = tmp_path / "cut.gguf"
    with open(gguf, "rb") as f:
        bad.write_bytes(f.read(200_000))
    monkeypatch.setenv("QUANTKIT_CACHE", str(tmp_path / "cache"))
    guard = Guard([bad], tmp_path / "cache")
    expect_clean(run_cli("quantize", "--model", bad, "--recipe", "rtn-w4g128", "--out", tmp_path / "q"),
                 str(bad), guard=guard)
    assert not (tmp_path / "q").exists()


def test_a_layer_whose_outputs_are_not_finite_stops_the_walk(model, tmp_path, calib_file, monkeypatch):
    """The next layer would calibrate on NaN: the walk names the layer that produced them, and leaves nothing."""
    from quantkit.calibration import walk

    real = walk.run_layer

    def nan_after_layer_1(layer, calib, *, keep_outputs, **kw):
        real(layer, calib, keep_outputs=keep_outputs, **kw)
        if keep_outputs and layer is walk_layers[1]:
            calib.hidden[0][0, 0, 0] = float("nan")

    walk_layers = []
    real_process = walk.LayerWalk._process

    def remember(self, ctx):
        walk_layers[:] = list(self.layers)
        return real_process(self, ctx)

    monkeypatch.setattr(walk, "run_layer", nan_after_layer_1)
    monkeypatch.setattr(walk.LayerWalk, "_process", remember)
    guard = Guard([model], tmp_path)
    expect_clean(quantize(model, tmp_path / "q", calib_file), "model.layers.1", "NaN or inf", guard=guard)


@pytest.mark.parametrize("args", [["--device", "tpu"], ["--nsamples", "many"], ["--frobnicate"]])
def test_argparse_errors_are_one_line(args, model, tmp_path, calib_file):
    expect_clean(quantize(model, tmp_path / "q", calib_file, *args), "--help)")
