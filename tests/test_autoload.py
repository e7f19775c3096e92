"""A process that never imports quantkit (plain transformers, lm-eval's command line) loads a quantkit folder as
quantkit does: the installed ``quantkit-autoload.pth`` (_quantkit_autoload.py) registers the method on first use."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import quantkit  # noqa: F401
from quantkit import pipeline

# Run in a child process: loads DIR with plain transformers and saves the last logits of a fixed batch.
CHILD = """
import sys, torch
from transformers import AutoModelForCausalLM
before = "quantkit" in sys.modules
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
ids = torch.arange(48).view(2, 24) * 7 + 11
with torch.no_grad():
    logits = model(ids).logits
torch.save({"logits": logits, "before": before, "after": "quantkit" in sys.modules,
            "q_proj": type(model.model.layers[0].self_attn.q_proj).__name__}, sys.argv[2])
"""


@pytest.fixture(scope="module")
def quantized(tiny_model_factory, calib_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("autoload") / "q"
    pipeline.quantize(str(tiny_model_factory("llama")), "gptq-w4g128", out, calib=str(calib_file), nsamples=4,
                      seqlen=64, progress=False)
    return out


def _child(folder: Path, tmp_path: Path, **env) -> dict:
    result = tmp_path / "child.pt"
    # cwd: not the repository, whose top-level kernels/ would shadow the Hub's `kernels` package for transformers
    proc = subprocess.run([sys.executable, "-c", CHILD, str(folder), str(result)], capture_output=True, text=True,
                          env={**os.environ, **env}, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return torch.load(result)


def _own_logits(folder: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(torch.arange(48).view(2, 24) * 7 + 11).logits


def test_the_pth_is_installed_beside_quantkit():
    import site

    dirs = [*site.getsitepackages(), site.getusersitepackages()]
    found = [Path(d, "quantkit-autoload.pth") for d in dirs if Path(d, "quantkit-autoload.pth").is_file()]
    assert found, f"quantkit-autoload.pth is in none of {dirs}: reinstall quantkit (pip install -e .)"
    assert found[0].read_text().strip() == "import _quantkit_autoload"


def test_a_process_that_never_imports_quantkit_gets_quantkits_logits(quantized, tmp_path):
    got = _child(quantized, tmp_path)
    assert got["before"] is False, "start-up imported quantkit: the .pth must stay cheap"
    assert got["after"] is True and got["q_proj"] == "QuantizedLinear"
    assert torch.equal(got["logits"], _own_logits(quantized))


def test_a_process_that_loads_another_model_never_imports_quantkit(tiny_model_factory, tmp_path):
    got = _child(tiny_model_factory("llama"), tmp_path)
    assert got["before"] is False and got["after"] is False and got["q_proj"] == "Linear"


def test_without_quantkit_transformers_refuses_the_folder(quantized, tmp_path):
    """QUANTKIT_AUTOLOAD=0 stands for a machine without quantkit: transformers does not know the method, skips it and
    builds plain linears, then meets the guard (a [1] tensor where a linear's weight would be) and raises instead of
    running on linears initialized at random."""
    proc = subprocess.run([sys.executable, "-c", CHILD, str(quantized), str(tmp_path / "child.pt")],
                          capture_output=True, text=True, env={**os.environ, "QUANTKIT_AUTOLOAD": "0"}, cwd=tmp_path,
                          timeout=300)
    assert proc.returncode != 0 and not (tmp_path / "child.pt").exists()
    assert "Unknown quantization type, got quantkit" in proc.stderr
    assert "ignore_mismatched_sizes" in proc.stderr.strip().splitlines()[-1]


def test_without_the_guard_transformers_would_run_on_random_linears(quantized, tmp_path):
    """The reason for the guard: the same folder with the guard removed loads without quantkit, silently wrong."""
    from safetensors.torch import load_file, save_file

    from quantkit.checkpoint import guard_key

    bare = tmp_path / "bare"
    shutil.copytree(quantized, bare)
    tensors = load_file(bare / "model.safetensors")
    config = json.loads((bare / "config.json").read_text())
    del tensors[guard_key(config["quantization_config"]["modules"])]
    save_file(tensors, bare / "model.safetensors", metadata={"format": "pt"})
    got = _child(bare, tmp_path, QUANTKIT_AUTOLOAD="0")
    assert got["after"] is False and got["q_proj"] == "Linear"
    assert not torch.allclose(got["logits"], _own_logits(quantized), atol=1e-2)
    assert torch.equal(_own_logits(bare), _own_logits(quantized))  # quantkit itself loads it (written before the guard)


def _continuation_logprob(model, tok, context: str, continuation: str) -> float:
    """log P(continuation | context), tokenized as lm-eval's HF model does (whole string, then split)."""
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    n_ctx = len(tok(context, add_special_tokens=False)["input_ids"])
    ids = torch.tensor([whole])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
    targets = ids[0, n_ctx:]
    return logp[n_ctx - 1:].gather(-1, targets[:, None]).sum().item()


@pytest.mark.skipif(shutil.which("lm_eval") is None, reason="lm-eval's command line (lm_eval) is not on PATH")
def test_lm_eval_command_line_evaluates_a_quantkit_folder(quantized, tmp_path, data_dir):
    """``lm_eval --model hf --model_args pretrained=DIR`` scores each choice with quantkit's model: its
    log-likelihoods equal a direct computation with the folder loaded by quantkit."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantkit.eval.zeroshot import LOCAL_TASKS_DIR

    out = tmp_path / "lm_eval"
    cmd = ["lm_eval", "--model", "hf", "--model_args", f"pretrained={quantized},dtype=float32",
           "--tasks", "arc_easy_local", "--include_path", str(LOCAL_TASKS_DIR), "--limit", "20", "--device", "cpu",
           "--batch_size", "4", "--output_path", str(out), "--log_samples",
           "--metadata", json.dumps({"data_dir": str(data_dir)})]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    samples = [json.loads(line) for f in out.rglob("samples_arc_easy_local_*.jsonl") for line in f.open()]
    assert len(samples) == 20
    model = AutoModelForCausalLM.from_pretrained(quantized).eval()
    tok = AutoTokenizer.from_pretrained(quantized)
    for s in samples:
        for args, resp in zip(s["arguments"].values(), s["resps"], strict=True):
            want = _continuation_logprob(model, tok, args["arg_0"], args["arg_1"])
            assert float(resp[0][0]) == pytest.approx(want, abs=2e-3)


def test_a_built_wheel_installs_the_pth_at_its_root(tmp_path):
    """A regular (non-editable) install gets the .pth too: it sits at the wheel's root, which is site-packages."""
    import zipfile

    setuptools = pytest.importorskip("setuptools", reason="building the wheel without isolation needs setuptools")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip(f"setuptools {setuptools.__version__} is older than pyproject.toml's build requirement (77)")
    repo = Path(__file__).resolve().parents[1]
    src = shutil.copytree(repo, tmp_path / "src", ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("quantkit-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "quantkit-autoload.pth" in names and "_quantkit_autoload.py" in names
    assert zipfile.ZipFile(wheel).read("quantkit-autoload.pth").decode().strip() == "import _quantkit_autoload"
    # every source package and every data file is in the wheel, under its installed name
    installed = {"kernels": "quantkit/kernels", "eval": "quantkit/eval", "recipes": "quantkit/recipes"}
    for top in ("quantkit", *installed):
        for f in (repo / top).rglob("*"):
            if f.is_file() and f.suffix in {".py", ".yaml", ".json"} and "__pycache__" not in f.parts:
                rel = f.relative_to(repo).as_posix()
                name = installed.get(top, top) + rel[len(top):]
                assert name in names, f"{rel} is not in the wheel (pyproject.toml's packages or package-data)"
