"""Evaluation: perplexity (and, later, zero-shot through lm-eval). Importable as ``quantkit.eval``."""

from __future__ import annotations

from quantkit.eval.perplexity import PerplexityResult, perplexity, wikitext2_perplexity, wikitext2_text

__all__ = ["PerplexityResult", "perplexity", "wikitext2_perplexity", "wikitext2_text"]
