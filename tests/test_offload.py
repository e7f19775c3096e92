"""accelerate's big-model machinery with quantkit: a ``device_map`` that offloads layers takes the packed tensors
with them, and quantizing a model larger than the process's memory limit works layer by layer."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import quantkit  # noqa: F401
from quantkit import pipeline
from quantkit.nn import QuantizedLinear


def _random_llama(folder: Path, tokenizer_from: Path, **shape) -> Path:
    config = LlamaConfig(vocab_size=1024, max_position_embeddings=512, tie_word_embeddings=True, **shape)
    with torch.device("meta"):  # transformers' own initialization of 300M parameters takes a minute here
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model = model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0) if p.ndim == 1 else p.normal_(0.0, 0.02, generator=g)
    model.save_pretrained(folder)
    for f in tokenizer_from.glob("tokenizer*"):
        (folder / f.name).write_bytes(f.read_bytes())
    return folder


def test_offloaded_load_equals_plain_load_and_leaves_the_packed_tensors_on_disk(tiny_llama, tmp_path):
    """Layers that do not fit ``max_memory`` go to disk with their packed tensors (frozen parameters, which
    accelerate offloads; buffers it would keep in memory). transformers offloads safetensors weights by reference:
    its index points into the checkpoint's own file, and ``offload_folder`` receives only tensors it had to convert,
    which quantkit's never are."""
    src = _random_llama(tmp_path / "src", tiny_llama, hidden_size=256, intermediate_size=640, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2)
    folder = tmp_path / "q"
    pipeline.quantize(str(src), "rtn-w4g128", folder, progress=False)
    ids = torch.arange(40).view(2, 20) * 13 % 1024
    plain = AutoModelForCausalLM.from_pretrained(folder).eval()
    size = sum(t.numel() * t.element_size() for t in plain.state_dict().values())
    offloaded = AutoModelForCausalLM.from_pretrained(folder, device_map="auto", max_memory={"cpu": size // 2},
                                                     offload_folder=tmp_path / "offload").eval()
    on_disk = [name for name, device in offloaded.hf_device_map.items() if device == "disk"]
    assert any(name.startswith("model.layers") for name in on_disk), offloaded.hf_device_map
    layers = {n: m for n, m in offloaded.named_modules() if isinstance(m, QuantizedLinear)
              and any(n == d or n.startswith(d + ".") for d in on_disk)}
    assert layers
    for n, m in layers.items():  # not in memory: each forward reads them through accelerate's hook
        assert all(t.device.type == "meta" for t in m.tensors.values())
        assert {f"{n}.{k}" for k in m.tensors} <= set(m._hf_hook.weights_map.keys())
    with torch.no_grad():
        assert torch.equal(offloaded(ids).logits, plain(ids).logits)


def _memory_cgroup(tag: str, limit: int) -> Path | None:
    """A new memory cgroup (v1 or v2) capped at ``limit`` bytes with no swap, or None where we may not make one."""
    v1, v2 = Path("/sys/fs/cgroup/memory"), Path("/sys/fs/cgroup")
    try:
        if (v1 / "memory.limit_in_bytes").exists():
            group = v1 / tag
            group.mkdir()
            (group / "memory.limit_in_bytes").write_text(str(limit))
            if (group / "memory.memsw.limit_in_bytes").exists():
                (group / "memory.memsw.limit_in_bytes").write_text(str(limit))
            return group
        if "memory" in (v2 / "cgroup.subtree_control").read_text().split():
            group = v2 / tag
            group.mkdir()
            (group / "memory.max").write_text(str(limit))
            (group / "memory.swap.max").write_text("0")
            return group
    except OSError:
        return None
    return None


def _run_in(group: Path, *args: str) -> subprocess.CompletedProcess:
    enter = f'echo $$ > "{group}/cgroup.procs" && exec "$@"'
    return subprocess.run(["sh", "-c", enter, "sh", *args], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "QUANTKIT_AUTOLOAD": "0"})


@pytest.mark.slow
def test_quantize_under_a_memory_limit_below_the_models_size(tiny_llama, tmp_path):
    """A 1.2 GB fp32 model quantizes in a memory cgroup capped at 800 MiB (the limit of a container, counting every
    page of the process), where holding its weights in memory is killed. Measured on the 2-core machine (a 24-layer
    Llama of 50 MB layers): between layers the run's anonymous memory returns to about 300 MB (Python, torch,
    transformers) and peaks near 550 MB inside a layer."""
    limit = 800 << 20
    group = _memory_cgroup(f"quantkit-test-{os.getpid()}", limit)
    if group is None:
        pytest.skip("no memory cgroup can be created here (needs root and a writable cgroup file system)")
    try:
        src = _random_llama(tmp_path / "src", tiny_llama, hidden_size=1024, intermediate_size=2816,
                            num_hidden_layers=24, num_attention_heads=8, num_key_value_heads=8)
        size = (src / "model.safetensors").stat().st_size
        assert size > limit * 1.4
        hold = ("import sys, safetensors.torch as st; w = [t.clone() for t in st.load_file(sys.argv[1]).values()]; "
                "print(sum(t.numel() for t in w))")
        control = _run_in(group, sys.executable, "-c", hold, str(src / "model.safetensors"))
        assert control.returncode in (-9, 137), f"the limit does not bind: {control.returncode} {control.stderr}"
        out = tmp_path / "q"
        run = _run_in(group, sys.executable, "-m", "quantkit.cli", "quantize", "--model", str(src), "--recipe",
                      "rtn-w4g128", "--out", str(out), "--device", "cpu")
        assert run.returncode == 0, f"exit {run.returncode}: {run.stderr[-2000:]}"
        assert (out / ".quantkit-output.json").is_file()
    finally:
        group.rmdir()
