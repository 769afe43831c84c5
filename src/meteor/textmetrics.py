"""Reference-overlap metrics shared by every stage that reports them: one ROUGE-L for all.

:func:`rouge_l` is Google's ``rouge-score`` package (the reimplementation of Lin's ROUGE used by
most papers), not code of our own, so the offline teacher's verdicts and scores and the evaluate
stage's reference overlap are the same number for the same texts.

Tokenisation is ``rouge-score``'s: lower-cased, every run of characters other than ``a-z0-9`` is a
separator (so ``max_depth`` is two tokens and non-ASCII letters are dropped), and the Porter stemmer
on (:data:`USE_STEMMER`): an answer that says "overfits" where the reference says "overfitting"
shares the word, which is what a content-overlap measure of free-form answers should count (and
what summarisation papers usually report); identifiers are stemmed the same way on both sides.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

USE_STEMMER = True


@dataclass(frozen=True)
class Rouge:
    precision: float  # LCS / answer tokens
    recall: float  # LCS / reference tokens
    f1: float


@lru_cache(maxsize=1)
def _scorer():
    # Imported on first use: rouge-score imports nltk, which is slow to import.
    from nltk.stem import porter
    from rouge_score import rouge_scorer, tokenize, tokenizers

    class MemoTokenizer(tokenizers.Tokenizer):
        """rouge-score's default tokenizer (its ``tokenize`` function, the Porter stemmer) that
        remembers stems per word and tokens per text: stemming is half the cost of a score, and
        the same references and words come back again and again. Same tokens, less time."""

        def __init__(self) -> None:
            self.stem = lru_cache(maxsize=1 << 16)(porter.PorterStemmer().stem)
            stemmer = self if USE_STEMMER else None
            self._tokens = lru_cache(maxsize=1024)(
                lambda text: tuple(tokenize.tokenize(text, stemmer)))

        def tokenize(self, text: str) -> tuple[str, ...]:
            return self._tokens(text)

    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=MemoTokenizer())


def rouge_l(answer: str, reference: str) -> Rouge:
    """ROUGE-L (longest common subsequence of tokens) of ``answer`` against ``reference``."""
    score = _scorer().score(target=reference, prediction=answer)["rougeL"]
    return Rouge(score.precision, score.recall, score.fmeasure)
