"""The harness's own Hub tasks on the benchmark's code path, offline: `lambada_openai`, `lambada_openai_mt_es` and
`arc_easy` read local copies of their dataset repos (laid out as on the Hub) through the harness's own task YAML
and metrics; their scores are the model's own log-likelihoods on those passages. A Hub task without a copy, or a
name the harness does not know, is one error."""

from __future__ import annotations

import math

import pytest
from lm_eval.api.instance import Instance

from pipeline.common.errors import PipelineError
from pipeline.evaluation.harness import PipelineLM, run_tasks
from tests.helpers.hub_copies import arc_copy, lambada_copy
from tests.helpers.serving import save_tiny_model

pytestmark = pytest.mark.timeout(600)
LIMIT = 6


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    model = save_tiny_model(root / "base", template=None, context_length=128, seed=5)
    copies = {
        "EleutherAI/lambada_openai": str(lambada_copy(root / "lambada_openai")),
        "allenai/ai2_arc": str(arc_copy(root / "ai2_arc")),
    }
    return root, model, copies


def test_hub_tasks_read_their_local_copies_and_score_the_models_own_likelihoods(setup):
    root, model, copies = setup
    tasks = ["lambada_openai", "lambada_openai_mt_es", "arc_easy"]
    scores = run_tasks({"base": model}, root / "tasks", tasks, {}, limit=LIMIT, hub_copies=copies)["base"]

    lambada, spanish, arc = (scores[t] for t in tasks)
    assert lambada["n"] == spanish["n"] == LIMIT and arc["n"] == 3
    assert lambada["random_baseline"] == 0.0
    assert arc["random_baseline"] == pytest.approx((1 / 4 + 1 / 4 + 1 / 3) / 3)  # one over the choices
    # the task YAML's own split of each copied passage: the words but the last, then " " + the last
    lm = PipelineLM(model)
    texts = [row["text"] for row in _rows(copies["EleutherAI/lambada_openai"], "default")[:LIMIT]]
    requests = [
        Instance("loglikelihood", {}, (" ".join(t.split(" ")[:-1]), " " + t.split(" ")[-1]), 0) for t in texts
    ]
    own = lm.loglikelihood(requests)
    assert lambada["acc"] == pytest.approx(sum(greedy for _, greedy in own) / LIMIT)
    assert lambada["perplexity"] == pytest.approx(math.exp(-sum(ll for ll, _ in own) / LIMIT), rel=1e-4)
    assert spanish["perplexity"] == pytest.approx(lambada["perplexity"], rel=1e-6)  # the same rows under "es"
    assert 0 <= arc["acc"] <= 1 and 0 <= arc["acc_norm"] <= 1


def test_a_hub_task_without_a_copy_is_one_error_offline(setup, monkeypatch):
    root, model, _ = setup
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PipelineError, match=r"data of lambada_openai .*benchmark\.hub_copies") as caught:
        run_tasks({"base": model}, root / "no-copy", ["lambada_openai"], {}, limit=2)
    assert "\n" not in str(caught.value)


def test_an_unknown_task_name_is_one_error(setup):
    root, model, _ = setup
    with pytest.raises(PipelineError, match=r"'hellaswagg' is no single lm-evaluation-harness task"):
        run_tasks({"base": model}, root / "unknown", ["hellaswagg"], {}, limit=2)


def _rows(repo: str, config: str) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(f"{repo}/{config}/test-00000-of-00001.parquet").to_pylist()
