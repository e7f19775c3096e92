"""``quantkit export``: a quantkit checkpoint rewritten in a format that serving engines read, each target a
registered :class:`ExportTarget`.

An export never approximates. A target first checks every quantized linear of the source (:meth:`ExportTarget.plan`)
and refuses, before anything is written, the first one it cannot express exactly: one ``QuantkitError`` naming the
layer and the reason. The source is checked as ``quantkit verify`` checks it (every tensor's presence, shape, dtype
and stored checksum) and is only read. The export is built in ``OUT.quantkit-tmp/`` beside ``OUT``, marked complete
with ``.quantkit-output.json`` and renamed into place (quantkit.outdir, as ``quantize`` publishes): ``OUT`` is
complete or absent, an existing ``OUT`` is replaced only with ``overwrite`` and only if quantkit wrote it, and an
``OUT`` that already holds this export of these source bytes is left as it is.

Targets: ``compressed-tensors`` (quantkit.export.compressed_tensors); ``gptq`` is registered and refuses with
``NotImplementedError`` (quantkit.export.gptq says why).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantkit.checkpoint import copy_side_files, guard_key, write_shards
from quantkit.config.scheme import LayerScheme
from quantkit.fingerprint import source_digests
from quantkit.hf.config import QuantkitConfig
from quantkit.loading import CheckpointReader
from quantkit.outdir import OutputFolder
from quantkit.registry import Registry
from quantkit.verify import verify

__all__ = ["TARGETS", "ExportResult", "ExportTarget", "Source", "export", "register_target"]

logger = logging.getLogger(__name__)

TARGETS: Registry = Registry("export target")  # name -> ExportTarget instance


@dataclass
class Source:
    """A verified quantkit checkpoint: its folder, ``config.json``, the scheme of every quantized linear, every
    linear's ``(out_features, in_features)`` (quantized or not: a target lists the others as unquantized) and a
    reader of its tensors."""

    folder: Path
    config: dict[str, Any]
    schemes: dict[str, LayerScheme]
    linears: dict[str, tuple[int, int]]
    reader: CheckpointReader

    @classmethod
    def open(cls, folder: str | Path) -> Source:
        folder = Path(folder)
        verify(folder)  # config, structure and checksums: a damaged source is refused here, naming the tensor
        config = json.loads((folder / "config.json").read_text())
        schemes = QuantkitConfig.from_dict(config["quantization_config"]).schemes()
        return cls(folder, config, schemes, _linears(folder), CheckpointReader(folder))

    def module_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """The stored tensors of quantized linear ``name`` by field (``qweight``, ``scales``, ...; not its bias)."""
        keys = [k for k in self.reader.keys()
                if k.rsplit(".", 1)[0] == name and k not in (f"{name}.bias", guard_key(self.schemes))]
        return {k[len(name) + 1:]: v for k, v in self.reader.load(keys).items()}

    def other_keys(self) -> list[str]:
        """Every stored key that is not a quantized linear's format tensor: embeddings, norms, heads, biases."""
        return [k for k in self.reader.keys()
                if not (k.rsplit(".", 1)[0] in self.schemes and not k.endswith(".bias"))]  # nor the guard


def _linears(folder: Path) -> dict[str, tuple[int, int]]:
    """Every ``nn.Linear`` of the model of ``folder/config.json`` (built on the meta device): name -> (out, in)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    return {n: (m.out_features, m.in_features) for n, m in model.named_modules() if isinstance(m, nn.Linear)}


class ExportTarget:
    """A format other programs read. Subclasses set ``name``, ``version`` (of what this code writes; part of the
    export's fingerprint) and ``description``, and implement :meth:`plan` and :meth:`write`."""

    name: str = ""
    version: int = 1
    description: str = ""

    def plan(self, source: Source) -> Any:
        """Check that every quantized linear of ``source`` can be expressed exactly, before anything is written;
        raise ``QuantkitError`` naming the first that cannot, and why. Returns what :meth:`write` needs."""
        raise NotImplementedError

    def write(self, source: Source, plan: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
        """The exported tensors (the quantized linears'; the other tensors are copied by :func:`export`), the
        ``quantization_config`` for ``config.json``, and a summary for the report."""
        raise NotImplementedError


def register_target(cls: type[ExportTarget]) -> type[ExportTarget]:
    """Class decorator: register one instance of an ``ExportTarget`` subclass under its ``name``."""
    TARGETS.add(cls.name, cls())
    return cls


@dataclass
class ExportResult:
    out: Path
    target: str
    report: dict[str, Any]
    skipped: bool = False  # ``out`` already held this export


EXPORT_REPORT = "quantkit_export.json"


def export(source: str | Path, target: str, out: str | Path, *, overwrite: bool = False) -> ExportResult:
    """Export the quantkit checkpoint folder ``source`` to ``target`` in the folder ``out`` (see the module
    docstring)."""
    tgt: ExportTarget = TARGETS.get(target)
    src_folder = Path(source).expanduser().absolute()
    out = Path(out).expanduser().absolute()
    folder = OutputFolder(out)
    folder.check_not_source(src_folder)
    src = Source.open(src_folder)
    plan = tgt.plan(src)  # every refusal happens here, before anything is written
    fp = hashlib.sha256(json.dumps({"target": tgt.name, "target_version": tgt.version,
                                    "source": source_digests(src_folder)}, sort_keys=True).encode()).hexdigest()
    folder.holds(fp, overwrite)  # refuse at once, before the lock (checked again under it)
    with folder:
        folder.recover()
        if folder.holds(fp, overwrite):
            logger.info("%s already holds this export; nothing to do", out)
            return ExportResult(out, tgt.name, json.loads((out / EXPORT_REPORT).read_text()), skipped=True)
        with folder.build(fp, overwrite) as tmp:
            tensors, qconfig, summary = tgt.write(src, plan)
            tensors.update(src.reader.load(src.other_keys()))  # embeddings, norms, head, biases: unchanged
            write_shards(tensors, tmp)
            config = {k: v for k, v in src.config.items() if k != "quantization_config"}
            config["quantization_config"] = qconfig
            (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            copy_side_files(src_folder, tmp)  # tokenizer, generation config, chat template (not quantkit's report)
            report = {"quantkit_export": 1, "target": tgt.name, "target_version": tgt.version,
                      "source": str(src_folder), "fingerprint": fp, **summary}
            (tmp / EXPORT_REPORT).write_text(json.dumps(report, indent=2) + "\n")
    logger.info("exported %s to %s (%s)", src_folder, out, tgt.name)
    return ExportResult(out, tgt.name, report)


from quantkit.export import compressed_tensors as _compressed_tensors  # noqa: E402,F401  (registers the target)
from quantkit.export import gptq as _gptq  # noqa: E402,F401  (registers "gptq", which refuses)
