from __future__ import annotations

import os

# Before anything imports Triton (transformers does): Triton fixes interpreter vs compiler per @triton.jit at
# decoration time, its standard library included. Without a GPU the kernel tests need the interpreter.
os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("QUANTKIT_DATA_DIR", REPO.parent / "shared" / "data"))


def _import_tools() -> None:
    """Make the repository's tools (benchmarks/, not in the wheel) importable as ``benchmarks.*`` without putting
    the repository root on ``sys.path``, where ``quantkit/`` would shadow an installed quantkit."""
    import importlib.util
    import sys

    init = REPO / "benchmarks" / "__init__.py"
    spec = importlib.util.spec_from_file_location("benchmarks", init, submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["benchmarks"] = module
    spec.loader.exec_module(module)


def _drop_the_repository_root() -> None:
    """``python -m pytest`` puts the working directory first on ``sys.path``. From the repository root its
    ``kernels/`` (``quantkit.kernels`` once installed) then passes for the Hub's ``kernels`` package, which
    transformers imports (a dependency since transformers 5.25), and ``quantkit/`` for the installed quantkit. The
    tests import quantkit as installed and the tools through ``_import_tools``: nothing from the root."""
    import sys

    sys.path[:] = [p for p in sys.path if Path(p or os.getcwd()).resolve() != REPO]
    # The same for the Python processes tests start (`python -c`, `python -m lm_eval`) from this working directory.
    os.environ["PYTHONSAFEPATH"] = "1"
    shadow = sys.modules.get("kernels")
    if shadow is not None and REPO in Path(getattr(shadow, "__file__", None) or "/").resolve().parents:
        raise RuntimeError(f"the repository's kernels/ was imported as the top-level 'kernels' ({shadow.__file__})")


_drop_the_repository_root()
_import_tools()


@pytest.fixture(autouse=True, scope="session")
def _env():
    torch.manual_seed(0)
    # Tests that read the data fail, naming the folder, where it is missing (the data_dir fixture, or quantkit's
    # own error); the rest (the kernel tests on a GPU machine, which gets the repository alone) still run.
    if DATA.is_dir():
        os.environ["QUANTKIT_DATA_DIR"] = str(DATA)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA.is_dir():
        pytest.fail(f"test data folder not found: {DATA} (set QUANTKIT_DATA_DIR)", pytrace=False)
    return DATA


@pytest.fixture(scope="session")
def smollm2_folder() -> Path:
    """The bundled SmolLM2 as a safetensors folder (converted from GGUF once, cached)."""
    from quantkit.loading import resolve_model

    return resolve_model("smollm2-135m").folder


def _tiny_config(arch: str):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        vocab_size=49152, hidden_size=96, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
    )
    return {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[arch](**common)


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory, smollm2_folder):
    """``make(arch) -> folder`` with a tiny random model of that architecture and SmolLM2's tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    made: dict[str, Path] = {}

    def make(arch: str = "llama") -> Path:
        if arch not in made:
            folder = tmp_path_factory.mktemp(f"tiny-{arch}")
            torch.manual_seed(1)
            model = AutoModelForCausalLM.from_config(_tiny_config(arch), dtype=torch.float32)
            model.save_pretrained(folder)
            AutoTokenizer.from_pretrained(smollm2_folder).save_pretrained(folder)
            made[arch] = folder
        return made[arch]

    return make


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory, data_dir) -> Path:
    """A small calibration text: the first 40 C4 documents, as JSONL."""
    src = data_dir / "c4" / "c4-train.00000-of-01024.first1000.jsonl"
    path = tmp_path_factory.mktemp("calib") / "calib.jsonl"
    path.write_text("".join(src.read_text().splitlines(keepends=True)[:40]))
    return path


@pytest.fixture
def assert_round_trip(tmp_path):
    """``check(model, folder) -> loaded``: the folder reloads to the in-memory model's logits (≤ 1e-5), and
    ``save_pretrained`` of the loaded model reloads to the same logits again."""
    from transformers import AutoModelForCausalLM

    def check(model, folder: Path):
        loaded = AutoModelForCausalLM.from_pretrained(folder)
        x = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            got = loaded(x).logits
            assert (model(x).logits - got).abs().max().item() <= 1e-5
            loaded.save_pretrained(tmp_path / "resaved")
            again = AutoModelForCausalLM.from_pretrained(tmp_path / "resaved")
            assert (again(x).logits - got).abs().max().item() <= 1e-5
        return loaded

    return check


@pytest.fixture(scope="session")
def tiny_llama(tiny_model_factory) -> Path:
    """The tiny Llama's folder (shared: never modify it)."""
    return tiny_model_factory("llama")


@pytest.fixture
def tiny_llama_copy(tiny_model_factory, tmp_path) -> Path:
    """A private copy of the tiny Llama (``tmp_path/model``), free to corrupt."""
    import shutil

    return Path(shutil.copytree(tiny_model_factory("llama"), tmp_path / "model"))
