"""Evaluation, importable as ``quantkit.eval``: perplexity (``perplexity``), C4 validation windows (``c4``),
zero-shot accuracy through lm-eval with offline task configs (``zeroshot``, ``tasks/``), the ``quantkit eval``
runner (``runner``) and ``quantkit report`` (``report``). lm-eval and matplotlib are imported only when used."""

from __future__ import annotations

from quantkit.eval.perplexity import PerplexityResult, perplexity, wikitext2_perplexity, wikitext2_text

__all__ = ["PerplexityResult", "perplexity", "wikitext2_perplexity", "wikitext2_text"]
