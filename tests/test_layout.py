"""The installed package holds what users import and nothing else: the tools under benchmarks/ are not in the wheel,
and no library module imports them."""

from __future__ import annotations

import ast
import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOOLS = ("kernel_bench", "kernel_aot", "decode_bench", "lloyd_max")


@pytest.mark.skipif(importlib.util.find_spec("setuptools") is None, reason="building a wheel needs setuptools")
def test_wheel_holds_the_library_not_the_tools(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__",
                                                              "results", "fixtures", ".pytest_cache", ".ruff_cache"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                           str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("quantkit-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"quantkit/kernels/dispatch.py", "quantkit/formats/uniform.py", "quantkit/calibration/walk.py",
            "quantkit/grids/gaussian_levels.json", "quantkit/recipes/gptq-w4g128.yaml"} <= names
    assert not [n for n in names if n.startswith("benchmarks/") or Path(n).stem in (*TOOLS, "bench", "aot")]


def test_no_library_module_imports_the_tools():
    for folder in ("quantkit", "kernels", "eval"):
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module]
                elif isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                else:
                    continue
                bad = [n for n in names if n.split(".")[0] == "benchmarks" or n.rsplit(".", 1)[-1] in TOOLS]
                assert not bad, f"{path.relative_to(REPO)} imports {bad}"


# Layers from the bottom up: a module imports only from its own package or from a lower layer (README,
# "Architecture"). Utilities that every layer may use sit at 0.
LAYERS = {
    "errors": -1, "registry": 0, "checkpoint": 0, "loading": 0, "data": 0, "outdir": 0,
    "config": 1, "grids": 2, "quantizers": 3, "codebooks": 3.5, "algos": 4, "formats": 5, "kernels": 6,
    "rotations": 7, "nn": 8, "kvcache": 8.5,
    "hf": 9, "model": 9, "resume": 9, "fingerprint": 9, "calibration": 10, "assemble": 10, "verify": 10,
    "pipeline": 11, "export": 11, "allocate": 11, "finetune": 11, "eval": 12, "cli": 13,
}


def _package(path: Path) -> str:
    rel = path.relative_to(REPO)
    if rel.parts[0] in ("kernels", "eval"):
        return rel.parts[0]
    return rel.parts[1].removesuffix(".py")  # quantkit/<package or module>


def test_imports_point_one_way():
    bad = []
    for folder in ("quantkit", "kernels", "eval"):
        for path in (REPO / folder).rglob("*.py"):
            if path.name == "__init__.py" and path.parent == REPO / "quantkit":
                continue  # the top-level package imports everything to register the built-ins
            own = _package(path)
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("quantkit."):
                    target = node.module.split(".")[1]
                elif isinstance(node, ast.ImportFrom) and node.module == "quantkit":
                    target = node.names[0].name
                else:
                    continue
                if target != own and LAYERS[target] >= LAYERS[own]:
                    bad.append(f"{path.relative_to(REPO)} ({own}) imports quantkit.{target}")
    assert not bad, "\n".join(bad)
