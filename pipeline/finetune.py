"""SFT and DPO as objectives of the one training loop, the cached DPO reference, and held-out answers.

The loop (``pipeline.train``) owns optimisation, checkpoints and logging; an objective only says which batch
comes at a given step and what its loss is, so a resumed or DDP run sees exactly the same batches.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import random
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import tiktoken
import torch
from tqdm.auto import tqdm

from pipeline.checkpoint import CONFIG, atomic_path, load_model, write_json
from pipeline.errors import PipelineError
from pipeline.generate import generate
from pipeline.instructions import (
    Example,
    Tokenized,
    collate,
    collate_pairs,
    decode_response,
    encode_prompt,
    load_examples,
    split_dataset,
)
from pipeline.losses import dpo_loss, lm_loss, sequence_logprobs
from pipeline.model import GPT
from pipeline.sampling import SamplingOptions
from pipeline.tokenizer import load_tokenizer, tokenizer_fingerprint

Batch = dict[str, torch.Tensor]


class EpochSampler:
    """Which items make up each micro-batch: reshuffled every epoch, a pure function of its arguments.

    Items of similar length share a batch (sorted by length within windows of ``window`` batches, whose batches are
    then shuffled, as Hugging Face's ``group_by_length`` does), so little compute goes to padding.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, grad_accum: int, seed: int, window: int = 32):
        self.lengths, self.batch_size, self.grad_accum, self.seed, self.window = (
            list(lengths), batch_size, grad_accum, seed, window)
        self.batches_per_epoch = -(-len(self.lengths) // batch_size)
        self._epoch, self._batches = -1, []

    def indices(self, step: int, micro_step: int, rank: int, world_size: int) -> list[int]:
        number = (step * self.grad_accum + micro_step) * world_size + rank
        epoch, k = divmod(number, self.batches_per_epoch)
        if epoch != self._epoch:
            self._batches, self._epoch = self._epoch_batches(epoch), epoch
        return self._batches[k]

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + epoch)
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        size = self.batch_size * self.window
        batches = []
        for start in range(0, len(order), size):
            window = sorted(order[start : start + size], key=lambda i: self.lengths[i])
            batches += [window[i : i + self.batch_size] for i in range(0, len(window), self.batch_size)]
        rng.shuffle(batches)
        return batches


def _require(data: Tokenized, what: str) -> None:
    if not len(data):
        raise PipelineError(
            f"{what}: no examples left ({data.dropped} dropped: their prompt fills the model's context)"
        )


def _eval_chunks(n: int, batch_size: int, max_batches: int) -> Iterator[list[int]]:
    """The first ``max_batches`` batches of a split, in order (eval is deterministic and cheap)."""
    for start in range(0, min(n, batch_size * max_batches), batch_size):
        yield list(range(start, min(start + batch_size, n)))


class SFTObjective:
    """Next-token loss on the answers (and on the prompts too when ``mask_prompt`` is off)."""

    def __init__(
        self,
        train: Tokenized,
        val: Tokenized,
        *,
        batch_size: int,
        grad_accum: int,
        eval_batches: int,
        context_length: int,
        pad_id: int,
        mask_prompt: bool,
        seed: int,
    ):
        _require(train, "sft training split")
        _require(val, "sft validation split")
        self.train, self.val = train, val
        lengths = [len(p) + len(r[0]) for p, r in zip(train.prompts, train.responses, strict=False)]
        self.sampler = EpochSampler(lengths, batch_size, grad_accum, seed)
        self.batch_size, self.max_eval_batches = batch_size, eval_batches
        self.context_length, self.pad_id, self.mask_prompt = context_length, pad_id, mask_prompt

    def _batch(self, data: Tokenized, indices: Sequence[int]) -> Batch:
        pairs = [(data.prompts[i], data.responses[i][0]) for i in indices]
        return collate(pairs, self.context_length, self.pad_id, self.mask_prompt)

    def train_batch(self, step: int, micro_step: int, rank: int, world_size: int) -> Batch:
        return self._batch(self.train, self.sampler.indices(step, micro_step, rank, world_size))

    def eval_batches(self) -> Iterator[Batch]:
        for indices in _eval_chunks(len(self.val), self.batch_size, self.max_eval_batches):
            yield self._batch(self.val, indices)

    def loss(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits, _ = model(batch["input_ids"])
        return lm_loss(logits, batch["targets"]), {}

    def count_tokens(self, batch: Batch) -> int:
        """Positions the model computed (padding included: it costs the same FLOPs)."""
        return batch["input_ids"].numel()


@torch.inference_mode()
def reference_logprobs(
    reference: GPT,
    data: Tokenized,
    *,
    context_length: int,
    pad_id: int,
    reduction: str,
    batch_size: int,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    desc: str = "reference log-probs",
) -> torch.Tensor:
    """log πref(chosen), log πref(rejected) of every pair, (N, 2): one forward per pair, done once before training.

    The reference is frozen, so recomputing these every step (as a naive DPO does) only repeats this work.
    Pairs go through in order of length, so the batches carry almost no padding.
    """
    reference.eval()
    device = next(reference.parameters()).device
    out = torch.empty(len(data), 2)
    by_length = sorted(range(len(data)), key=lambda i: len(data.prompts[i]) + max(map(len, data.responses[i])))
    chunks = [by_length[start : start + batch_size] for start in range(0, len(data), batch_size)]
    for indices in tqdm(chunks, desc=desc, leave=False):
        batch = collate_pairs(data, indices, context_length, pad_id)
        with autocast():
            logits, _ = reference(batch["input_ids"].to(device))
        logps = sequence_logprobs(logits, batch["targets"].to(device), reduction).float().cpu()
        out[indices] = torch.stack(logps.chunk(2), dim=1)
    return out


class DPOObjective:
    """Direct preference optimisation against the cached log-probs of a frozen reference (the SFT model)."""

    def __init__(
        self,
        train: Tokenized,
        val: Tokenized,
        ref_train: torch.Tensor,
        ref_val: torch.Tensor,
        *,
        beta: float,
        reduction: str,
        batch_size: int,
        grad_accum: int,
        eval_batches: int,
        context_length: int,
        pad_id: int,
        seed: int,
    ):
        _require(train, "dpo training split")
        _require(val, "dpo validation split")
        self.train, self.val, self.ref_train, self.ref_val = train, val, ref_train, ref_val
        lengths = [len(p) + max(map(len, r)) for p, r in zip(train.prompts, train.responses, strict=False)]
        self.sampler = EpochSampler(lengths, batch_size, grad_accum, seed)
        self.beta, self.reduction = beta, reduction
        self.batch_size, self.max_eval_batches = batch_size, eval_batches
        self.context_length, self.pad_id = context_length, pad_id

    def _batch(self, data: Tokenized, ref: torch.Tensor, indices: Sequence[int]) -> Batch:
        batch = collate_pairs(data, indices, self.context_length, self.pad_id)
        batch["ref_logps"] = torch.cat([ref[indices, 0], ref[indices, 1]])
        return batch

    def train_batch(self, step: int, micro_step: int, rank: int, world_size: int) -> Batch:
        return self._batch(self.train, self.ref_train, self.sampler.indices(step, micro_step, rank, world_size))

    def eval_batches(self) -> Iterator[Batch]:
        for indices in _eval_chunks(len(self.val), self.batch_size, self.max_eval_batches):
            yield self._batch(self.val, self.ref_val, indices)

    def policy_logprobs(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """Response-only log-probs of the batch's 2B rows (chosen first), in one forward pass."""
        logits, _ = model(batch["input_ids"])
        return sequence_logprobs(logits, batch["targets"], self.reduction)

    def loss(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        chosen, rejected = self.policy_logprobs(model, batch).chunk(2)
        ref_chosen, ref_rejected = batch["ref_logps"].chunk(2)
        return dpo_loss(chosen, rejected, ref_chosen, ref_rejected, self.beta)

    def count_tokens(self, batch: Batch) -> int:
        return batch["input_ids"].numel()


# ---------------------------------------------------------------------------------------------- held-out answers


@dataclass(frozen=True)
class Responses:
    records: list[dict]  # the responses JSONL contract: id, instruction, input, output, response
    prompts_cut: int  # prompts shortened from the left to leave room for an answer


@torch.inference_mode()
def generate_responses(
    model: GPT,
    enc: tiktoken.Encoding,
    examples: Sequence[Example],
    template: str,
    opts: SamplingOptions,
    batch_size: int,
    desc: str = "responses",
) -> Responses:
    """Answer every held-out instruction with the KV-cache generator, stopping at EOT.

    Prompts of equal token length are generated together (the model has no padding mask, so a batch must be
    rectangular); answers come back in the examples' order. A prompt that leaves fewer than
    min(max_new_tokens, context/4) free positions is cut from the left, keeping the '### Response:' end.
    """
    device = next(model.parameters()).device
    context = model.cfg.context_length
    room = min(opts.max_new_tokens, context // 4)
    prompts, cut = [], 0
    for example in examples:
        ids = encode_prompt(enc, example.instruction, example.input, template, example.context)
        if len(ids) > context - room:
            ids, cut = ids[len(ids) - (context - room) :], cut + 1
        prompts.append(ids)
    by_length: dict[int, list[int]] = defaultdict(list)
    for i, ids in enumerate(prompts):
        by_length[len(ids)].append(i)
    groups = [group[s : s + batch_size] for group in by_length.values() for s in range(0, len(group), batch_size)]
    answers: list[str] = [""] * len(examples)
    for group in tqdm(groups, desc=desc, leave=False):
        batch = torch.tensor([prompts[i] for i in group], dtype=torch.long, device=device)
        out = generate(model, batch, opts)[:, batch.shape[1] :].tolist()
        for i, new_ids in zip(group, out, strict=False):
            answers[i] = decode_response(enc, new_ids)
    records = [
        {"id": e.id, "instruction": e.instruction, "input": e.input, "output": e.output, "response": answer}
        for e, answer in zip(examples, answers, strict=False)
    ]
    return Responses(records, cut)


# ---------------------------------------------------------------------------------------------- stage plumbing


@dataclass
class ModelAndTokenizer:
    model: GPT
    meta: dict  # the model directory's config.json
    enc: tiktoken.Encoding
    tokenizer_fingerprint: str


def load_with_tokenizer(model_dir: Path, tokenizer_dir: Path) -> ModelAndTokenizer:
    """A model and the data's tokenizer, refusing a model that was trained with another tokenizer."""
    model, meta = load_model(model_dir)
    fingerprint = tokenizer_fingerprint(tokenizer_dir)
    recorded = (meta.get("tokenizer") or {}).get("fingerprint")
    if recorded != fingerprint:
        raise PipelineError(
            f"{model_dir / CONFIG}: model was trained with tokenizer {str(recorded)[:12]}, but {tokenizer_dir} is "
            f"{fingerprint[:12]} (rerun the stages from tokenize: dvc repro)"
        )
    enc = load_tokenizer(tokenizer_dir)
    if enc.n_vocab > model.cfg.vocab_size:
        raise PipelineError(
            f"{model_dir / CONFIG}: vocab_size {model.cfg.vocab_size} < the tokenizer's {enc.n_vocab} tokens"
        )
    return ModelAndTokenizer(model, meta, enc, fingerprint)


def data_fingerprint(*datasets: Tokenized) -> str:
    """Identity of the token data a run trains on (joins the loop's run key: no resuming onto other data)."""
    digest = hashlib.sha256()
    for data in datasets:
        digest.update(json.dumps([data.ids, data.prompts, data.responses]).encode())
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def sampling_options(enc: tiktoken.Encoding, max_new_tokens: int, temperature: float, top_k: int | None,
                     seed: int) -> SamplingOptions:
    return SamplingOptions(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                           eos_id=enc.eot_token, seed=seed)


def write_responses(path: Path, records: Sequence[dict]) -> None:
    """The responses JSONL contract, one object per line, written atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def add_data_metrics(report_dir: Path, data: dict[str, float]) -> None:
    """Add what happened to the records (skipped, truncated, split sizes) to the loop's metrics.json."""
    path = Path(report_dir) / "metrics.json"
    metrics = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    write_json(path, {**metrics, "data": data})


def sft_recipe(model_dir: Path, meta: dict) -> dict:
    """How the SFT model was trained (data file, template, split), as the sft stage recorded it."""
    recipe = meta.get("instructions")
    if not isinstance(recipe, dict):
        raise PipelineError(
            f"{model_dir / CONFIG}: no 'instructions' record (was {model_dir} written by the sft stage?)"
        )
    data = Path(recipe["data"])
    if not data.is_file() or file_sha256(data) != recipe["data_sha256"]:
        raise PipelineError(f"{data}: missing or changed since {model_dir} was trained (rerun it: dvc repro sft)")
    return recipe


def held_out_examples(recipe: dict) -> list[Example]:
    """The SFT test split, rebuilt exactly (same ids, same order) from the recipe the sft stage recorded."""
    examples = load_examples(recipe["data"], recipe["strict"]).records
    return split_dataset(examples, recipe["split_train"], recipe["split_val"], recipe["split_seed"], recipe["data"])[2]


def without_dropout(model: GPT) -> GPT:
    """The same weights with dropout off: DPO compares policy and reference log-probs, which noise would blur
    (TRL disables dropout for DPO too)."""
    if model.cfg.dropout == 0:
        return model
    plain = GPT(replace(model.cfg, dropout=0.0))
    plain.load_state_dict(model.state_dict())
    return plain
