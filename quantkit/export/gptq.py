"""``--to gptq``: the GPTQ v1 layout of AutoGPTQ / GPTQModel (``qweight`` int32 [in/8, out], ``qzeros`` stored
minus one, ``scales``, ``g_idx`` with ``desc_act``; ``quant_method: "gptq"``). It would carry act-order with groups
in processing order exactly, through ``g_idx``, which compressed-tensors no longer can.

Not implemented: an export is only written where the target's own loader checks it, and transformers' GPTQ path
(``GptqHfQuantizer``) cannot run here. It needs ``optimum`` and ``gptqmodel``; gptqmodel (7.7.0) ships only as a
source distribution that requires torch >= 2.14.1 and builds its extensions, while quantkit is pinned to and tested
with torch 2.13.0 and installs nothing that compiles. Packing the layout without a loader to check it against would
be an unchecked format.
"""

from __future__ import annotations

from quantkit.export import ExportTarget, Source, register_target

__all__ = ["GPTQTarget"]


@register_target
class GPTQTarget(ExportTarget):
    name = "gptq"
    version = 1
    description = "GPTQ v1 (AutoGPTQ/GPTQModel): not implemented, no loader to check it against here"

    def plan(self, source: Source):
        raise NotImplementedError(
            "--to gptq is not implemented: transformers loads GPTQ checkpoints only through gptqmodel, which needs "
            "torch >= 2.14.1 and a compiled build (quantkit is tested on torch 2.13.0), so an export could not be "
            "checked by its loader; use --to compressed-tensors")
