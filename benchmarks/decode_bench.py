"""Benchmark: end-to-end greedy decode tokens/s of a Llama model, fp16 weights against quantkit's packed formats.

    python -m benchmarks.decode_bench                              # Llama-2-7B shapes, batch 1 and 16
    python -m benchmarks.decode_bench --formats fp16,w4g128 --batches 1 --new-tokens 256
    python -m benchmarks.decode_bench --config tiny --device cpu   # a smoke run of the same code on CPU

The model is a ``LlamaForCausalLM`` built from a config (Llama-2-7B's shapes by default: 32 layers, hidden 4096,
MLP 11008, 32 heads, vocabulary 32000), randomly initialized on the device, so nothing is downloaded. It is timed
as it comes (fp16), then every linear of its decoder layers is replaced by a ``QuantizedLinear`` holding random
packed codes, scales and zeros of each format in turn (the embeddings, norms and ``lm_head`` stay fp16, as in a
quantized checkpoint), and timed again. Random codes cost the kernels exactly what real ones do.

What is timed: greedy decoding of ``--new-tokens`` tokens after a ``--prompt-len`` prompt, with a static KV cache.
Each decode step is the model's forward on the last token ``[batch, 1]``, the argmax of its logits, and the cache
update. In ``graph`` mode (CUDA) one step is captured in a CUDA graph after a few eager warm-up steps (which also
autotune the kernels), and the graph is replayed once per token: this removes Python and launch overhead, as
serving engines do, so the time is the GPU's. ``eager`` mode runs the same steps from Python. The prompt's
forward (prefill) is not in the decode time; its own column times a second prefill of the same prompt (the
first autotunes the kernels for that row count). Tokens/s = batch × new tokens / decode time (CUDA events, or the
host clock on CPU after the last step).
"""

from __future__ import annotations

import argparse
import inspect
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from benchmarks.kernel_bench import BenchScheme, packed_layer
from quantkit.nn import kernel_for

__all__ = ["CONFIGS", "DecodeResult", "build_model", "greedy_tokens", "pack_decoder_linears", "time_decode", "main"]

CONFIGS = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0),
    # A few-MB model with the same structure, for running this script's code on a CPU.
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=512),
}
DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class DecodeResult:
    fmt: str
    batch: int
    mode: str
    new_tokens: int
    seconds: float  # decode time of all new tokens
    prefill_ms: float

    @property
    def ms_per_step(self) -> float:
        return 1e3 * self.seconds / self.new_tokens

    @property
    def tokens_per_s(self) -> float:
        return self.batch * self.new_tokens / self.seconds


def build_model(name: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """A randomly initialized ``LlamaForCausalLM`` with the named config's shapes, on ``device`` in ``dtype``."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(**CONFIGS[name])
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def pack_decoder_linears(model: nn.Module, fmt: BenchScheme) -> int:
    """Replace every linear of the decoder layers (dense, or packed in another format) by a ``QuantizedLinear``
    with random packed tensors of ``fmt``; returns how many were replaced."""
    from quantkit.config import LayerScheme
    from quantkit.nn import QuantizedLinear

    scheme = LayerScheme.from_dict(dict(method="gptq" if fmt.act_order else "rtn", bits=fmt.bits,
                                        group_size=fmt.group_size, symmetric=fmt.symmetric, act_order=fmt.act_order))
    targets = [(name, m) for name, m in model.named_modules()
               if name.rsplit(".", 1)[-1] in DECODER_LINEARS and ".layers." in f".{name}"]
    for name, old in targets:
        parent_name, _, child = name.rpartition(".")
        dense = isinstance(old, nn.Linear)
        device = (old.weight if dense else old.tensors["qweight"]).device
        N, K = old.out_features, old.in_features
        q = QuantizedLinear(K, N, scheme, bias=old.bias is not None, device=device,
                            dtype=old.bias.dtype if old.bias is not None else None)
        for key, t in packed_layer(N, K, fmt, device).items():
            if t is not None:
                setattr(q, key, t)
        if old.bias is not None:
            q.bias = nn.Parameter(old.bias.detach().clone(), requires_grad=False)
        setattr(model.get_submodule(parent_name), child, q)
        del old
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return len(targets)


def _cache_kwarg(model: nn.Module) -> str:
    """transformers renamed the forward's ``past_key_values`` to ``cache`` in later 5.x releases."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _step_fn(model: nn.Module, tok: torch.Tensor, cache, pos: torch.Tensor | None) -> Callable[[], None]:
    """One greedy decode step on the static token buffer ``tok`` [batch, 1]: forward, argmax, written back into
    ``tok``. Positions come from the cache itself, or from the device tensor ``pos`` (advanced in place) on
    releases whose forward takes ``cache_position``; either way no host sync, so the step can be graph-captured."""
    key = _cache_kwarg(model)

    def step() -> None:
        kwargs = {key: cache, "use_cache": True}
        if pos is not None:
            kwargs |= {"cache_position": pos, "position_ids": pos.unsqueeze(0).expand(tok.shape[0], 1)}
        logits = model(input_ids=tok, **kwargs).logits
        tok.copy_(logits[:, -1].argmax(dim=-1, keepdim=True))
        if pos is not None:
            pos.add_(1)

    return step


def _start(model: nn.Module, prompt: torch.Tensor, max_len: int) -> tuple[Callable[[], None], torch.Tensor]:
    """Prefill ``prompt`` [batch, len] into a new static cache of ``max_len`` tokens; returns the decode step and
    the token buffer it reads and writes (holding the prompt's greedy next token)."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=max_len)
    takes_position = "cache_position" in inspect.signature(model.forward).parameters
    kwargs = {_cache_kwarg(model): cache, "use_cache": True}
    if takes_position:
        kwargs["cache_position"] = torch.arange(prompt.shape[1], device=prompt.device)
    logits = model(input_ids=prompt, **kwargs).logits
    tok = logits[:, -1].argmax(dim=-1, keepdim=True).contiguous()
    pos = torch.tensor([prompt.shape[1]], device=prompt.device) if takes_position else None
    return _step_fn(model, tok, cache, pos), tok


@torch.inference_mode()
def greedy_tokens(model: nn.Module, prompt: torch.Tensor, new_tokens: int, *, graph: bool = False) -> torch.Tensor:
    """The loop ``time_decode`` times: the ``new_tokens`` greedy tokens after ``prompt`` [batch, len]. With
    ``graph`` (CUDA), the first step runs eagerly and the rest are replays of a CUDA graph of it."""
    step, tok = _start(model, prompt, prompt.shape[1] + new_tokens)
    out = [tok.clone()]
    run = step
    for i in range(new_tokens - 1):
        if graph and i == 0:
            _warm_up(step, 1)
        else:
            if graph and i == 1:
                run = _capture(step)  # capturing records the step; it does not run it
            run()
        out.append(tok.clone())
    return torch.cat(out, dim=1)


def _warm_up(step: Callable[[], None], n: int) -> None:
    """Run ``step`` ``n`` times on a side stream, as torch asks before a capture (this also autotunes kernels)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(n):
            step()
    torch.cuda.current_stream().wait_stream(side)


def _capture(step: Callable[[], None]) -> Callable[[], None]:
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


@torch.inference_mode()
def time_decode(model: nn.Module, fmt: str, batch: int, prompt_len: int, new_tokens: int, mode: str,
                warmup: int = 3) -> DecodeResult:
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    prompt = torch.randint(0, model.config.vocab_size, (batch, prompt_len), device=device)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    # The first prefill autotunes the kernels for its row count (an H200 took 3.6 s at 16 x 128 rows): untimed.
    _start(model, prompt, prompt_len + warmup + 1 + new_tokens)
    sync()
    t0 = time.perf_counter()
    step, tok = _start(model, prompt, prompt_len + warmup + 1 + new_tokens)
    sync()
    prefill_ms = 1e3 * (time.perf_counter() - t0)

    if mode == "graph":
        if not cuda:
            raise ValueError("graph mode needs CUDA; use --mode eager on CPU")
        _warm_up(step, warmup)
        run = _capture(step)
    else:
        for _ in range(warmup + 1):
            step()
        run = step
    sync()
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(new_tokens):
            run()
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1e3
    else:
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            run()
        seconds = time.perf_counter() - t0
    if not torch.isfinite(tok.float()).all() or not (0 <= tok.min() and tok.max() < model.config.vocab_size):
        raise RuntimeError(f"{fmt} batch {batch}: the decode produced invalid token ids")
    return DecodeResult(fmt, batch, mode, new_tokens, seconds, prefill_ms)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.decode_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=sorted(CONFIGS), default="llama2-7b")
    p.add_argument("--formats", default="fp16,w4g128,w3g128,w2g64",
                   help="comma-separated: fp16 (the dense model, in --dtype) and packed formats such as w4g128")
    p.add_argument("--batches", default="1,16", help="comma-separated batch sizes (sequences decoded at once)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--mode", choices=["graph", "eager", "both"], default=None,
                   help="graph: replay a CUDA graph per token (default on CUDA); eager: Python per step (CPU)")
    p.add_argument("--device", default=None, help="default cuda when available, else cpu")
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None,
                   help="activations and dense weights; default float16 on CUDA, float32 on CPU")
    args = p.parse_args(argv)
    try:
        args.batches = [int(b) for b in args.batches.split(",")]
        args.formats = [None if f == "fp16" else BenchScheme.parse(f) for f in args.formats.split(",")]
    except (ValueError, argparse.ArgumentTypeError) as e:
        p.error(str(e))
    if args.formats and args.formats[0] is not None and None in args.formats:
        p.error("put fp16 first: the dense model is timed before its linears are replaced")
    if min(args.batches) < 1 or args.prompt_len < 1 or args.new_tokens < 1:
        p.error("batches, --prompt-len and --new-tokens must be at least 1")
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.dtype = getattr(torch, args.dtype or ("float16" if args.device.type == "cuda" else "float32"))
    if args.mode is None:
        args.mode = "graph" if args.device.type == "cuda" else "eager"
    if args.mode != "eager" and args.device.type != "cuda":
        p.error("graph mode needs CUDA")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import transformers

    versions = f"torch {torch.__version__}, transformers {transformers.__version__}"
    try:
        import triton

        versions += f", triton {triton.__version__}"
    except ImportError:
        pass
    device_name = torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else "cpu"
    modes = ["graph", "eager"] if args.mode == "both" else [args.mode]
    print(f"# {args.config}, {device_name}; {versions}; {str(args.dtype).removeprefix('torch.')} activations; "
          f"prompt {args.prompt_len}, {args.new_tokens} new tokens, greedy, static KV cache", flush=True)
    print("| weights | batch | mode | decode ms / step | tokens/s | speedup over dense | prefill ms | kernel | "
          "graph = eager tokens |")
    print("|---|---|---|---|---|---|---|---|---|", flush=True)
    model = build_model(args.config, args.device, args.dtype)
    dense: dict[tuple[int, str], float] = {}
    for fmt in args.formats:
        label = "dense " + str(args.dtype).removeprefix("torch.") if fmt is None else str(fmt)
        kernel = "torch.matmul"
        if fmt is not None:
            pack_decoder_linears(model, fmt)
            kernel = kernel_for(model)
        agree = ""
        if "graph" in modes:  # the graph replays compute what the eager steps compute
            prompt = torch.randint(0, model.config.vocab_size, (1, args.prompt_len), device=args.device)
            try:
                same = greedy_tokens(model, prompt, 16) == greedy_tokens(model, prompt, 16, graph=True)
                agree = f"{int(same.sum())}/{same.numel()}"
            except RuntimeError as e:
                agree = f"capture failed: {str(e).splitlines()[0][:120]}"
        for batch in args.batches:
            for mode in modes:
                try:
                    r = time_decode(model, label, batch, args.prompt_len, args.new_tokens, mode)
                except RuntimeError as e:  # e.g. a transformers release whose forward syncs during capture
                    if mode != "graph":
                        raise
                    print(f"| {label} | {batch} | graph | failed: {str(e).splitlines()[0][:160]} | | | | {kernel} | "
                          f"{agree} |", flush=True)
                    continue
                if fmt is None:
                    dense[(batch, mode)] = r.tokens_per_s
                speedup = r.tokens_per_s / dense[(batch, mode)] if (batch, mode) in dense else float("nan")
                print(f"| {label} | {batch} | {mode} | {r.ms_per_step:.3f} | {r.tokens_per_s:.1f} | {speedup:.2f} | "
                      f"{r.prefill_ms:.1f} | {kernel} | {agree if mode == 'graph' else ''} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
