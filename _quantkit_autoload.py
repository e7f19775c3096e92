"""Lets a Python process that never imports quantkit load a quantkit checkpoint through plain transformers.

Without it, ``AutoModelForCausalLM.from_pretrained(DIR)`` in a process that has not run ``import quantkit`` (lm-eval's
command line, a serving script, a notebook) meets ``quant_method: "quantkit"``, warns that the method is unknown,
skips quantization and runs on randomly initialized linears. Installing quantkit installs ``quantkit-autoload.pth``
beside it (setup.py), which Python's ``site`` runs at start-up and which imports this module, and nothing else: no
torch, no transformers, no quantkit. It adds a finder to ``sys.meta_path`` that waits for
``transformers.quantizers.auto``; once that module has run, its two registries (configs and quantizers by
``quant_method``) are replaced by dicts that import quantkit on the first lookup of ``"quantkit"``, which registers
quantkit's config and quantizer into them (quantkit.hf.register). A process that never loads a quantkit checkpoint
never imports quantkit.

``QUANTKIT_AUTOLOAD=0`` in the environment turns it off (then only ``import quantkit`` registers the method).
"""

from __future__ import annotations

import importlib
import os
import sys

__all__ = ["install"]

TARGET = "transformers.quantizers.auto"
REGISTRIES = ("AUTO_QUANTIZATION_CONFIG_MAPPING", "AUTO_QUANTIZER_MAPPING")
METHOD = "quantkit"

_importing = False


def _import_quantkit() -> None:
    global _importing
    if _importing:  # quantkit's own registration looks the method up while it imports
        return
    _importing = True
    try:
        importlib.import_module("quantkit")
    finally:
        _importing = False


class _Registry(dict):
    """A transformers registry that imports quantkit on the first lookup of its method."""

    def _ensure(self, key) -> None:
        if key == METHOD and not dict.__contains__(self, key):
            _import_quantkit()

    def __contains__(self, key) -> bool:
        self._ensure(key)
        return dict.__contains__(self, key)

    def __getitem__(self, key):
        self._ensure(key)
        return dict.__getitem__(self, key)

    def get(self, key, default=None):
        self._ensure(key)
        return dict.get(self, key, default)


def _wrap(module) -> None:
    for name in REGISTRIES:
        registry = getattr(module, name, None)
        if type(registry) is dict:
            setattr(module, name, _Registry(registry))


class _WrappingLoader:  # an importlib Loader (importlib.abc is not imported: this runs at every start-up)
    """Runs the real loader, then wraps the registries; everything else is the real loader's."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        _wrap(module)

    def __getattr__(self, name):  # get_source, get_filename, ... (inspect and linecache ask for them)
        return getattr(self._loader, name)


class _Finder:  # an importlib MetaPathFinder
    def find_spec(self, fullname, path, target=None):
        if fullname != TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        sys.meta_path.remove(self)
        if spec.loader is not None:
            spec.loader = _WrappingLoader(spec.loader)
        return spec


def install() -> None:
    """Install the hook (idempotent); wraps the registries at once if transformers' module is already loaded."""
    if os.environ.get("QUANTKIT_AUTOLOAD", "1").strip().lower() in ("0", "false", "no", "off"):
        return
    if TARGET in sys.modules:
        _wrap(sys.modules[TARGET])
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


install()
