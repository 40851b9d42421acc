"""`compare --rank-by`: experiments ordered by one metric, best first, in the direction the metric reads."""

from __future__ import annotations

import pandas as pd
import pytest

from pipeline.common.errors import PipelineError
from pipeline.orchestration import compare


def _table() -> pd.DataFrame:
    experiments = [
        compare.Experiment(
            name,
            name,
            "experiment",
            {"dpo.lr": lr},
            {
                "benchmark: models.dpo.pipeline_preference.acc": acc,
                "benchmark: models.sft.pipeline_preference.acc": 0.5,
                "evaluate: bits_per_byte": bpb,
            },
        )
        for name, lr, acc, bpb in (("a", 1e-4, 0.55, 1.9), ("b", 1e-5, 0.7, 1.8), ("c", 5e-5, 0.6, 2.0))
    ]
    return compare.comparison_table(experiments)


def test_an_accuracy_ranks_highest_first_and_a_tie_shares_the_rank():
    ranked = compare.rank(_table(), "dpo.pipeline_preference.acc")
    assert list(ranked.index) == ["b", "c", "a"]
    column = "rank by benchmark: models.dpo.pipeline_preference.acc"
    assert ranked.columns[0] == column and list(ranked[column]) == [1, 2, 3]
    tied = compare.rank(_table(), "benchmark: models.sft.pipeline_preference.acc")
    assert list(tied.index) == ["a", "b", "c"] and list(tied.iloc[:, 0]) == [1, 1, 1]


def test_bits_per_byte_ranks_lowest_first():
    ranked = compare.rank(_table(), "bits_per_byte")
    assert list(ranked.index) == ["b", "a", "c"]
    assert "| rank by evaluate: bits_per_byte | 1 | 2 | 3 |" in compare.markdown_table(ranked)


def test_an_experiment_without_the_metric_comes_last_unranked():
    table = _table()
    table.loc["c", "benchmark: models.dpo.pipeline_preference.acc"] = None
    ranked = compare.rank(table, "dpo.pipeline_preference.acc")
    assert list(ranked.index) == ["b", "a", "c"] and pd.isna(ranked.iloc[2, 0])


@pytest.mark.parametrize(
    ("metric", "message"),
    [
        ("pipeline_cloze.acc", r"name one metric column \(known: .*evaluate: bits_per_byte"),
        ("pipeline_preference.acc", r"it matches 2: benchmark: models.dpo.*, benchmark: models.sft"),
        ("dpo.lr", r"dpo.lr is not a number"),
    ],
)
def test_a_metric_that_names_no_single_column_is_one_error(metric, message):
    table = _table()
    if metric == "dpo.lr":
        table["dpo.lr"] = table["dpo.lr"].map(str)
    with pytest.raises(PipelineError, match=message):
        compare.rank(table, metric)
