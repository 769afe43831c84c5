"""Text-overlap metrics from well-kept packages, shared by the stages that compare a text with a
reference answer (evaluate; the offline teacher may use it too).

ROUGE-L is Google's ``rouge-score`` implementation (the one papers report), with its default
tokenizer (lower-cased alphanumeric words) and the Porter stemmer, so "models" matches "model".
"""

from __future__ import annotations

from functools import lru_cache

from rouge_score import rouge_scorer


@lru_cache(maxsize=1)
def _rouge_l_scorer() -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l_f(answer: str, reference: str) -> float:
    """ROUGE-L F-measure of ``answer`` against ``reference`` (0.0 when either has no words)."""
    return float(_rouge_l_scorer().score(reference, answer)["rougeL"].fmeasure)
