"""Our GPT as an lm-evaluation-harness model: ``PipelineLM`` answers the harness's three request kinds
(``loglikelihood``, ``loglikelihood_rolling``, ``generate_until``) from a model directory, in process.

It subclasses the harness's ``TemplateLM``, so a (context, continuation) pair is split into tokens exactly as the
harness's API models (``local-completions`` against ``python -m pipeline serve``) split it: the two score the same.
Scoring is ``pipeline.model.scoring``. ``run_tasks`` runs local harness tasks (by name, found under a task
directory) on model directories and keeps each task's headline numbers; it knows no report or stage.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

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
) -> dict[str, dict[str, dict]]:
    """Each task of ``tasks`` (YAML under ``task_dir`` only: the harness's thousands of built-in task files are
    not indexed, which alone takes half a minute) on each model directory, by model name."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local JSONL: the Hub is never asked
    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    scores = {}
    for name, directory in model_dirs.items():
        results = lm_eval.simple_evaluate(
            model=PipelineLM(directory, device=device),
            tasks=list(tasks),
            limit=limit,
            task_manager=manager,
            bootstrap_iters=100,
            log_samples=False,
        )
        scores[name] = {task: headline(results, task, baselines.get(task)) for task in tasks}
    return scores
