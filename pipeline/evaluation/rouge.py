"""ROUGE-L F1: the deterministic, reference-based score the judge falls back to when no LLM judge answers.

It measures word overlap in order (the longest common subsequence), so it rewards answers that say what the
reference says, in its words; it cannot tell a correct paraphrase from a wrong answer. That is why the judge
labels it loudly wherever it is used.
"""

from __future__ import annotations

import re

_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    """Lower-cased word tokens (Unicode letters and digits), punctuation dropped."""
    return _WORD.findall(text.lower())


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence, in O(len(a) * len(b)) time and O(len(b)) memory."""
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l_f1(reference: str, candidate: str) -> float:
    """ROUGE-L F1 (β = 1) of ``candidate`` against ``reference``, in [0, 1]; 0 when either has no words."""
    ref, cand = words(reference), words(candidate)
    lcs = lcs_length(ref, cand)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(cand), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)
