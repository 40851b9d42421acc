"""Our GPT as an lm-evaluation-harness model: ``PipelineLM`` answers the harness's three request kinds
(``loglikelihood``, ``loglikelihood_rolling``, ``generate_until``) from a model directory, in process.

It subclasses the harness's ``TemplateLM``, so a (context, continuation) pair is split into tokens exactly as the
harness's API models (``local-completions`` against ``python -m pipeline serve``) split it: the two score the same.
Scoring is ``pipeline.model.scoring``. ``run_tasks`` runs local harness tasks (by name, found under a task
directory) on model directories and keeps each task's headline numbers; it knows no report or stage.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from pipeline.common.errors import PipelineError, one_line
from pipeline.model.checkpoint import load_with_tokenizer
from pipeline.model.generate import stream_tokens
from pipeline.model.sampling import SamplingOptions
from pipeline.model.scoring import score_batch, score_ids


class PipelineLM(TemplateLM):
    """A model directory (models/base, models/sft, models/dpo) scored by the harness; a (context, continuation)
    longer than the model's context keeps its last context_length + 1 tokens (the last is only predicted), as the
    harness's Hugging Face model does."""

    def __init__(
        self,
        model_dir: str | Path,
        max_gen_toks: int = 32,
        batch_size: int = 16,
        device: str | torch.device = "cpu",
    ):
        super().__init__()
        self.batch_size = batch_size  # sequences per forward pass of loglikelihood requests
        loaded = load_with_tokenizer(model_dir, device=device)
        self.model, self.enc = loaded.model.eval(), loaded.enc
        self.max_length = self.model.cfg.context_length
        self.max_gen_toks = max_gen_toks

    @property
    def eot_token_id(self) -> int:
        return self.enc.eot_token

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.enc.encode_ordinary(string)

    def tok_decode(self, ids: list[int]) -> str:
        return self.enc.decode(ids)

    def _continuation_logprob(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        """log p(continuation | context) and whether greedy decoding would produce it."""
        ids = (context + continuation)[-(self.max_length + 1) :]
        scored = score_ids(self.model, ids)
        n = len(continuation)
        return sum(scored.logprobs[-n:]), all(scored.greedy[-n:])

    def _loglikelihood_tokens(
        self, requests, disable_tqdm: bool = False, **kwargs
    ) -> list[tuple[float, bool]]:
        """Scored in batches of similar length (one forward pass each), answered in the requests' order."""
        rows = [
            ((context + continuation)[-(self.max_length + 1) :], len(continuation))
            for _, context, continuation in requests
        ]
        order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            for i, (logprobs, greedy) in zip(
                chunk, score_batch(self.model, [rows[i][0] for i in chunk]), strict=True
            ):
                n = rows[i][1]
                results[i] = (sum(logprobs[-n:]), all(greedy[-n:]))
                self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The whole text's log-likelihood, in disjoint windows of the model's context (the harness's recipe)."""
        results = []
        for request in requests:
            (text,) = request.args
            windows = get_rolling_token_windows(
                self.tok_encode(text), self.prefix_token_id, self.max_length, 1
            )
            total = sum(self._continuation_logprob(*make_disjoint_window(w))[0] for w in windows)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            results.append(total)
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations, cut at the first of the request's ``until`` strings."""
        results = []
        for request in requests:
            context, kwargs = request.args
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = min(int(kwargs.get("max_gen_toks", self.max_gen_toks)), self.max_length - 1)
            prompt = self.tok_encode(context)[-(self.max_length - max_new) :] or [self.eot_token_id]
            opts = SamplingOptions(max_new_tokens=max_new, temperature=0.0, eos_id=self.eot_token_id)
            start = torch.tensor([prompt], device=next(self.model.parameters()).device)
            ids = [int(t[0, 0]) for t in stream_tokens(self.model, start, opts)]
            text = self.enc.decode([t for t in ids if t != self.eot_token_id])
            for stop in until:
                text = text.split(stop)[0] if stop else text
            self.cache_hook.add_partial("generate_until", (context, kwargs), text)
            results.append(text)
        return results


def headline(results: dict, task: str, baseline: float | None) -> dict:
    """A task's metrics as the benchmark reports them: each metric, its stderr, the items, the random baseline."""
    row = {"n": int(results["n-samples"][task]["effective"]), "random_baseline": baseline}
    for key, value in results["results"][task].items():
        metric, _, kind = key.partition(",")
        if kind == "none" and isinstance(value, int | float):
            row[metric] = (
                None if value != value else float(value)
            )  # NaN (a stderr of one item) is null in JSON
    return row


def run_tasks(
    model_dirs: dict[str, Path],
    task_dir: str | Path,
    tasks: list[str],
    baselines: dict[str, float],
    limit: int | None = None,
    device: str | torch.device = "cpu",
    hub_copies: dict[str, str] | None = None,
) -> dict[str, dict[str, dict]]:
    """Each task of ``tasks`` on each model directory, by model name. Tasks whose YAML is under ``task_dir`` are
    found there alone; any other name is one of the harness's own tasks (its task index is built only then: that
    alone takes seconds). ``hub_copies`` maps a Hub dataset repo to a local copy that replaces it. A task without
    a baseline in ``baselines`` gets the one its items give (``random_baseline``)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    hub_copies = hub_copies or {}
    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    hub = [t for t in tasks if t not in manager.all_tasks]
    if hub:
        manager = TaskManager(include_path=str(task_dir))
    if unknown := [t for t in hub if t not in manager.all_subtasks]:
        raise PipelineError(
            f"benchmark.tasks: {unknown[0]!r} is no single lm-evaluation-harness task (`lm_eval --tasks list` "
            "lists them; name a group's tasks one by one)"
        )
    copies = Path(task_dir) / "hub-copies"  # written after the index was built: found by path, not by name
    specs = [hub_task_spec(manager, t, hub_copies, copies) if t in hub else t for t in tasks]
    if all(t not in hub or manager.task_index[t].cfg.get("dataset_path") in hub_copies for t in tasks):
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local data only: the Hub is never asked
    try:  # the first load of each task's data: where a missing copy or the offline Hub shows
        loaded = manager.load(specs)["tasks"]
    except (OSError, ValueError) as exc:  # datasets' and the Hub client's offline and missing-data errors
        if not hub:
            raise
        raise PipelineError(
            f"benchmark.tasks: could not load the data of {', '.join(hub)} ({one_line(str(exc))[:300]}); it "
            "comes from the Hugging Face Hub: run online, or name a local copy of its dataset repo in "
            "benchmark.hub_copies (docs/evaluation.md)"
        ) from None
    guesses = {t: baselines[t] if t in baselines else random_baseline(loaded[t], limit) for t in tasks}
    scores = {}
    for name, directory in model_dirs.items():
        results = lm_eval.simple_evaluate(
            model=PipelineLM(directory, device=device),
            tasks=specs,
            limit=limit,
            task_manager=manager,
            bootstrap_iters=100,
            log_samples=False,
        )
        scores[name] = {task: headline(results, task, guesses[task]) for task in tasks}
    return scores


def hub_task_spec(manager, task: str, hub_copies: dict[str, str], directory: Path) -> str:
    """A harness task by name, or, when its dataset repo has a local copy, a task file of the same name that
    includes the harness's own and reads the copy instead (the harness's YAML ``include``)."""
    entry = manager.task_index[task]
    copy = hub_copies.get((entry.cfg or {}).get("dataset_path"))
    if not copy:
        return task
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{task}.yaml"
    spec = {"include": str(entry.yaml_path), "task": task, "dataset_path": str(Path(copy).resolve())}
    path.write_text(json.dumps(spec, indent=2), encoding="utf-8")  # JSON is YAML
    return str(path)


def random_baseline(task, limit: int | None) -> float | None:
    """What guessing scores on the items a run scores: the mean of 1/choices for a multiple-choice task, 0 for
    a cloze or a generated answer; None for a perplexity-only task."""
    kind = task.OUTPUT_TYPE if hasattr(task, "OUTPUT_TYPE") else task.config.output_type
    if kind == "multiple_choice":
        docs = list(task.eval_docs)[:limit]
        return sum(1 / len(task.doc_to_choice(doc)) for doc in docs) / len(docs) if docs else None
    return 0.0 if kind in ("loglikelihood", "generate_until") else None
