"""The four figures of held-out answers: distinct answers, repetition loops, ROUGE-L, length."""

from __future__ import annotations

import pytest

from pipeline.evaluation.answer_figures import answer_figures, has_loop


def test_a_loop_is_one_word_trigram_three_times():
    assert has_loop("to the be to the be to the be")
    assert has_loop("The cat sat. The cat sat, the CAT sat!")  # case and punctuation do not hide it
    assert not has_loop("to the be to the be")  # twice is no loop
    assert not has_loop("the the")  # shorter than one trigram
    assert not has_loop("")


def test_figures_of_a_collapsed_and_a_good_set_of_answers():
    references = ["The platypus lays eggs.", "Gold is Au.", "It is blue.", "Paris."]
    collapsed = [{"output": r, "response": "The opposite of  's."} for r in references]
    figures = answer_figures(collapsed)
    assert figures["items"] == 4 and figures["distinct_pct"] == 25.0 and figures["loops_pct"] == 0.0
    good = [{"output": r, "response": r} for r in references[:3]] + [
        {"output": "Paris.", "response": "x y z " * 3}
    ]
    figures = answer_figures(good)
    assert figures["distinct_pct"] == 100.0 and figures["loops_pct"] == 25.0
    assert figures["rouge_l"] == pytest.approx(75.0)  # three exact answers, one with no word in common
    assert figures["words"] == pytest.approx((4 + 3 + 3 + 9) / 4, abs=0.05)
    assert figures["reference_words"] == pytest.approx((4 + 3 + 3 + 1) / 4, abs=0.05)
    assert answer_figures([]) == {}
