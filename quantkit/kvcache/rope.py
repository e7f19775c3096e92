"""Rotary position embedding as a KV cache needs it: to take it off keys before they are coded and put it back
after they are read (KVQuant's pre-RoPE keys).

A cache receives keys after RoPE, ``k' = s · R(θ·p) k`` with transformers' ``rotate_half`` convention (channel
``i`` paired with ``i + r/2`` over the first ``r`` rotary channels; ``s`` the rope type's attention scaling).
Post-RoPE, a key channel's values turn with the position, so a table or grid fitted on calibration windows of
one length meets phases it never saw at longer contexts. Pre-RoPE channels keep steadier statistics, and coding
them removes that shift. :class:`Rope` holds the model's inverse frequencies and scaling and applies or removes
the rotation at given positions. Rope types whose frequencies change with the sequence length (``dynamic``,
``longrope``) are refused: the rotation of a stored key would depend on when it is read. So is a model whose own
``apply_rotary_pos_emb`` turns keys another way (GPT-J's interleaved pairs, say): given a model, its rotation of
a probe key is checked against this one; given only a config, the model type must be one known to use
``rotate_half``.
"""

from __future__ import annotations

import torch

from quantkit.errors import QuantkitError

__all__ = ["Rope", "forward_positions"]

_UNSUPPORTED = ("dynamic", "longrope")
# Model types whose attention applies RoPE with transformers' rotate_half pairing (checked when only a config is
# given; a model is checked by probing its own apply_rotary_pos_emb).
_ROTATE_HALF = frozenset({"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi3",
                          "gemma", "gemma2", "gpt_neox", "olmo", "olmo2", "starcoder2", "granite", "smollm3"})


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def forward_positions(kwargs: dict, batch: int, n: int) -> torch.Tensor | None:
    """The ``position_ids`` [batch, n] a transformers attention passed on to ``Cache.update`` (as ``kwargs`` or
    inside ``kwargs["kwargs"]``), or None when it passed none of that shape."""
    inner = kwargs.get("kwargs")
    p = (inner if isinstance(inner, dict) else kwargs).get("position_ids")
    if isinstance(p, torch.Tensor) and p.dim() == 2 and p.shape[-1] == n and p.shape[0] in (1, batch):
        return p.to(torch.int64).expand(batch, n)
    return None


class Rope:
    """``inv_freq`` [r/2] (float32) and the attention ``scaling`` of one model's rotary embedding."""

    def __init__(self, inv_freq: torch.Tensor, scaling: float = 1.0):
        self.inv_freq = inv_freq.detach().float().cpu()
        self.scaling = float(scaling)
        self.rotary_dim = 2 * self.inv_freq.numel()
        self._copies: dict[torch.device, torch.Tensor] = {}

    def inv_freq_on(self, device: torch.device | str) -> torch.Tensor:
        """``inv_freq`` on ``device``, copied there once: a decode step then makes no host-to-device copy (which
        would also keep the step out of a CUDA graph)."""
        device = torch.device(device)
        if device not in self._copies:
            self._copies[device] = self.inv_freq.to(device)
        return self._copies[device]

    @classmethod
    def of(cls, model) -> Rope:
        """The rotary embedding of ``model`` (its ``inv_freq`` buffer) or, given a config, the one its
        ``rope_parameters`` define."""
        config = getattr(model, "config", model)
        text = config.get_text_config(decoder=True)
        params = getattr(text, "rope_parameters", None) or {}
        rope_type = params.get("rope_type", "default") if isinstance(params, dict) else "default"
        if any(u in str(rope_type) for u in _UNSUPPORTED):
            raise QuantkitError(f"kv_cache field 'keys': 'pre-rope' needs a fixed rotary embedding; the model's "
                                f"rope type is {rope_type!r}")
        if hasattr(model, "modules"):
            for m in model.modules():
                inv = getattr(m, "inv_freq", None)
                if isinstance(inv, torch.Tensor) and inv.dim() == 1 and inv.device.type != "meta":
                    rope = cls(inv, getattr(m, "attention_scaling", 1.0))
                    rope._check_against(model, m)
                    return rope
        elif getattr(text, "model_type", None) not in _ROTATE_HALF:
            raise QuantkitError(f"kv_cache field 'keys': 'pre-rope' is not known to fit model type "
                                f"{getattr(text, 'model_type', None)!r} from its config alone; build the cache "
                                "from the loaded model, whose rotation is checked")
        if not isinstance(params, dict) or "rope_theta" not in params:
            raise QuantkitError("kv_cache field 'keys': 'pre-rope' needs rotary position embeddings; the config "
                                "defines none (no rope_parameters.rope_theta)")
        if rope_type != "default":
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            inv, scaling = ROPE_INIT_FUNCTIONS[rope_type](text)
            return cls(inv, scaling)
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
        return cls(1.0 / params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))

    def _check_against(self, model, rotary) -> None:
        """Refuse a model whose own RoPE turns a probe key differently (another pairing or convention)."""
        import sys

        apply = getattr(sys.modules.get(type(model).__module__), "apply_rotary_pos_emb", None)
        text = model.config.get_text_config(decoder=True)
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        pos = torch.tensor([[0, 5, 77]])
        error = None
        # Some models apply RoPE to the whole head (the rotary part inside), others to the rotary part alone.
        for D in dict.fromkeys((head_dim, self.rotary_dim)):
            x = torch.randn(1, 1, 3, D, generator=torch.Generator().manual_seed(0))
            try:
                with torch.no_grad():
                    cos, sin = rotary(x.to(self.inv_freq.device), pos.to(self.inv_freq.device))
                    ref = apply(x, x, cos.float().cpu(), sin.float().cpu())[1]
            except Exception as e:  # no such function, another signature or shape: try the next, else refuse
                error = e
                continue
            if not torch.allclose(ref, self.apply(x, pos), atol=1e-4):
                raise QuantkitError(f"kv_cache field 'keys': 'pre-rope' does not fit {type(model).__name__}: its "
                                    "rotary embedding pairs channels another way; use keys: post-rope")
            return
        raise QuantkitError(f"kv_cache field 'keys': 'pre-rope' cannot check {type(model).__name__}'s rotary "
                            f"embedding ({type(error).__name__}); use keys: post-rope")

    def _cos_sin(self, positions: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [B, 1, n, r] (float32) at ``positions`` [B, n]."""
        freqs = positions.to(device=device, dtype=torch.float32).unsqueeze(-1) * self.inv_freq_on(device)
        emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(1)
        return emb.cos(), emb.sin()

    def _turn(self, x: torch.Tensor, positions: torch.Tensor, sign: float, scale: float) -> torch.Tensor:
        r = self.rotary_dim
        if x.shape[-1] < r:
            raise QuantkitError(f"the rotary embedding spans {r} channels; the keys have {x.shape[-1]}")
        cos, sin = self._cos_sin(positions, x.device)
        rot = x[..., :r].float()
        out = (rot * cos + sign * _rotate_half(rot) * sin) * scale
        if r < x.shape[-1]:
            out = torch.cat([out, x[..., r:].float()], dim=-1)
        return out.to(x.dtype)

    def apply(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Keys [B, H, n, D] before RoPE -> after, at ``positions`` [B, n]."""
        return self._turn(x, positions, 1.0, self.scaling)

    def remove(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Keys [B, H, n, D] after RoPE -> before (the inverse of :meth:`apply`)."""
        return self._turn(x, positions, -1.0, 1.0 / self.scaling)
