"""Whether held-out answers read as answers: four figures over a responses file, the same for every stage.

- distinct: different answers per item (a collapsed model gives one answer to every instruction);
- loops: the share of answers with a repetition loop (one word 3-gram three or more times);
- ROUGE-L: mean ROUGE-L F1 × 100 against the references (the judge's fallback scorer);
- words: the mean answer length in words, beside the references' mean.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from pipeline.evaluation.rouge import rouge_l_f1, words

LOOP_NGRAM = 3  # a loop: one word 3-gram ...
LOOP_REPEATS = 3  # ... three or more times in the same answer


def has_loop(text: str, n: int = LOOP_NGRAM, repeats: int = LOOP_REPEATS) -> bool:
    """Whether some word n-gram of ``text`` occurs ``repeats`` or more times."""
    tokens = words(text)
    grams = Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
    return any(count >= repeats for count in grams.values())


def answer_figures(records: Sequence[dict]) -> dict[str, float]:
    """The four figures (percentages rounded to 0.1) of ``records`` (the responses JSONL: output, response)."""
    if not records:
        return {}
    answers = [" ".join(str(r.get("response", "")).split()) for r in records]
    references = [str(r.get("output", "")) for r in records]
    n = len(records)
    rouge = sum(rouge_l_f1(ref, ans) for ref, ans in zip(references, answers, strict=True))
    return {
        "items": n,
        "distinct_pct": round(100 * len(Counter(answers)) / n, 1),
        "loops_pct": round(100 * sum(has_loop(a) for a in answers) / n, 1),
        "rouge_l": round(100 * rouge / n, 2),
        "words": round(sum(len(words(a)) for a in answers) / n, 1),
        "reference_words": round(sum(len(words(r)) for r in references) / n, 1),
    }
