"""The objectives of the one training loop: pretraining, SFT and DPO, their samplers and their collation.

The loop (``pipeline.train.loop``) owns optimisation, checkpoints and logging; an objective only says which batch comes
at a given step and what its loss is, so a resumed or DDP run sees exactly the same batches. Every batch speaks one
vocabulary: ``input_ids`` (B, T) and next-token ``targets`` (B, T), IGNORE_INDEX where nothing is learnt.
Pretraining batches are random windows of the train split drawn with a generator seeded from (seed, step,
micro_step, rank); SFT/DPO batches come from an epoch sampler that is a pure function of its arguments.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from pipeline.common.errors import PipelineError
from pipeline.data.instructions import Tokenized
from pipeline.data.shards import ShardDataset, read_manifest
from pipeline.model.gpt import GPT
from pipeline.train.loop import Batch
from pipeline.train.losses import IGNORE_INDEX, dpo_loss, lm_loss, sequence_logprobs


def _batch_seed(seed: int, step: int, micro_step: int, rank: int) -> int:
    # A hash, not seed + step: neighbouring (step, micro_step, rank) get unrelated streams.
    digest = hashlib.sha256(f"pretrain:{seed}:{step}:{micro_step}:{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)  # manual_seed takes a non-negative int64


@dataclass
class PretrainObjective:
    """Next-token cross-entropy on train windows; eval on the first val windows, in order.

    ``sampling`` ``random``: each batch is windows at random offsets. ``epochs`` (the book's DataLoader over
    GPTDatasetV1): windows every ``stride`` tokens, reshuffled each epoch with a generator seeded from (seed, epoch).
    """

    train: ShardDataset
    val: ShardDataset
    batch_size: int
    context_length: int
    seed: int
    eval_batch_count: int
    sampling: str = "random"
    stride: int | None = None
    grad_accum: int = 1
    mid: torch.Tensor | None = None  # mid-training tokens (instruction examples end to end), 1-D
    mid_from: int = 0  # the first step that draws its windows from ``mid``

    def __post_init__(self) -> None:
        if self.mid is not None and self.mid.numel() < self.context_length + 1:
            raise PipelineError(
                f"mid-training: {self.mid.numel()} instruction tokens, fewer than one window of "
                f"{self.context_length + 1} (lower pretrain.mid_steps to 0, or add instruction data)"
            )
        needed = (
            self.batch_size * self.context_length + 1
        )  # + 1: the targets are the inputs shifted by one token
        if self.train.num_tokens < needed:
            raise PipelineError(
                f"{self.train.directory}: the train split has {self.train.num_tokens} tokens, fewer than one batch "
                f"(pretrain.batch_size={self.batch_size} × context {self.context_length} + 1 = {needed})"
            )
        self._eval = [
            {"input_ids": x, "targets": y}
            for x, y in self.val.sequential(self.batch_size, self.context_length, self.eval_batch_count)
        ]
        epochs = self.sampling == "epochs"
        self._positions = (
            self.train.strided(self.context_length, self.stride or self.context_length) if epochs else []
        )
        self._epoch, self._order = (
            -1,
            torch.empty(0, dtype=torch.long),
        )  # the current epoch's shuffle, built on first use
        if epochs and self.batches_per_epoch == 0:
            raise PipelineError(
                f"{self.train.directory}: {len(self._positions)} train windows (stride {self.stride or self.context_length}) "
                f"make no full batch of pretrain.batch_size={self.batch_size}"
            )

    @property
    def batches_per_epoch(self) -> int:
        return (
            len(self._positions) // self.batch_size
        )  # the last partial batch is dropped, as the book's drop_last=True

    def _epoch_batch(self, number: int) -> list[tuple[int, int]]:
        epoch, k = divmod(number, self.batches_per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(
                self.seed * 1_000_003 + epoch
            )  # one order per (seed, epoch)
            self._epoch, self._order = epoch, torch.randperm(len(self._positions), generator=generator)
        return [
            self._positions[i] for i in self._order[k * self.batch_size : (k + 1) * self.batch_size].tolist()
        ]

    @property
    def fingerprint(self) -> str:
        """The shards' identity (their manifest lists every shard's sha256), for the training run key."""
        manifest = json.dumps(read_manifest(self.train.directory), sort_keys=True)
        return hashlib.sha256(manifest.encode()).hexdigest()

    def train_batch(self, step: int, micro_step: int, rank: int, world_size: int) -> Batch:
        if self.mid is not None and step >= self.mid_from:
            generator = torch.Generator().manual_seed(_batch_seed(self.seed, step, micro_step, rank))
            starts = torch.randint(
                self.mid.numel() - self.context_length, (self.batch_size,), generator=generator
            )
            windows = torch.stack([self.mid[s : s + self.context_length + 1] for s in starts.tolist()])
            return {"input_ids": windows[:, :-1], "targets": windows[:, 1:]}
        if self.sampling == "epochs":
            # the run's n-th batch, ranks interleaved: a pure function of n, so a resumed run is exact
            number = (step * self.grad_accum + micro_step) * world_size + rank
            x, y = self.train.windows(self._epoch_batch(number), self.context_length)
        else:
            generator = torch.Generator().manual_seed(_batch_seed(self.seed, step, micro_step, rank))
            x, y = self.train.sample(self.batch_size, self.context_length, generator)
        return {"input_ids": x, "targets": y}

    def eval_batches(self) -> list[Batch]:
        return self._eval

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits, _ = model(batch["input_ids"])
        return lm_loss(logits, batch["targets"]), {}

    def count_tokens(self, batch: Batch) -> int:
        return batch["targets"].numel()


# -------------------------------------------------------------------- instruction batches


def collate(
    sequences: Sequence[tuple[list[int], list[int]]], context_length: int, pad_id: int, mask_prompt: bool
) -> dict[str, torch.Tensor]:
    """(prompt, response) id lists → ``input_ids`` and next-token ``targets``, (B, T) with T ≤ context_length.

    Rows are right-padded with ``pad_id``; padding targets, and prompt targets when ``mask_prompt``, are -100.
    """
    rows = []
    for prompt, response in sequences:
        ids = (prompt + response)[: context_length + 1]  # + 1: inputs and targets are it shifted by one
        targets = ids[1:]
        if mask_prompt:
            # targets[j] is ids[j + 1]: the first len(prompt) - 1 targets are prompt tokens, and the next one,
            # the response's first token, is learnt
            masked = min(len(prompt) - 1, len(targets))
            targets = [IGNORE_INDEX] * masked + targets[masked:]
        rows.append((ids[:-1], targets))
    width = max(len(inputs) for inputs, _ in rows)  # the longest row in this batch, not context_length
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    target_ids = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)  # padding is never learnt
    for row, (inputs, targets) in enumerate(rows):
        input_ids[row, : len(inputs)] = torch.tensor(inputs, dtype=torch.long)
        target_ids[row, : len(targets)] = torch.tensor(targets, dtype=torch.long)
    return {"input_ids": input_ids, "targets": target_ids}


def collate_pairs(
    data: Tokenized, indices: Sequence[int], context_length: int, pad_id: int
) -> dict[str, torch.Tensor]:
    """Preference pairs → one (2B, T) batch: rows [0, B) the chosen answers, rows [B, 2B) the rejected ones."""
    chosen = [(data.prompts[i], data.responses[i][0]) for i in indices]
    rejected = [(data.prompts[i], data.responses[i][1]) for i in indices]
    # one batch, so one forward for both; prompts always masked: DPO compares the answers' log-probs only
    return collate(chosen + rejected, context_length, pad_id, mask_prompt=True)


class EpochSampler:
    """Which items make up each micro-batch: reshuffled every epoch, a pure function of its arguments.

    Items of similar length share a batch (as Hugging Face's ``group_by_length`` does).
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, grad_accum: int, seed: int, window: int = 32):
        self.lengths, self.batch_size, self.grad_accum, self.seed, self.window = (
            list(lengths),
            batch_size,
            grad_accum,
            seed,
            window,
        )
        self.batches_per_epoch = -(-len(self.lengths) // batch_size)  # ceil: the last batch may be short
        self._epoch, self._batches = -1, []

    def indices(self, step: int, micro_step: int, rank: int, world_size: int) -> list[int]:
        number = (
            step * self.grad_accum + micro_step
        ) * world_size + rank  # the run's n-th batch, ranks interleaved
        epoch, k = divmod(number, self.batches_per_epoch)
        if epoch != self._epoch:  # built once per epoch, on first use
            self._batches, self._epoch = self._epoch_batches(epoch), epoch
        return self._batches[k]

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + epoch)  # one order per (seed, epoch)
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        size = self.batch_size * self.window
        batches = []
        for start in range(0, len(order), size):
            # sorted by length within a window of `window` batches: similar lengths, little compute spent on padding
            window = sorted(order[start : start + size], key=lambda i: self.lengths[i])
            batches += [window[i : i + self.batch_size] for i in range(0, len(window), self.batch_size)]
        rng.shuffle(batches)  # so the epoch does not run from short to long within each window
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
        lengths = [
            len(p) + len(r[0]) for p, r in zip(train.prompts, train.responses, strict=False)
        ]  # SFT learns r[0]
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
    """
    reference.eval()
    device = next(reference.parameters()).device
    out = torch.empty(len(data), 2)  # on the CPU: (N, 2), chosen then rejected
    # in order of length, so the batches carry almost no padding
    by_length = sorted(
        range(len(data)), key=lambda i: len(data.prompts[i]) + max(map(len, data.responses[i]))
    )
    chunks = [by_length[start : start + batch_size] for start in range(0, len(data), batch_size)]
    for indices in tqdm(chunks, desc=desc, leave=False):
        batch = collate_pairs(data, indices, context_length, pad_id)
        with autocast():
            logits, _ = reference(batch["input_ids"].to(device))
        logps = (
            sequence_logprobs(logits, batch["targets"].to(device), reduction).float().cpu()
        )  # (2B,), chosen first
        out[indices] = torch.stack(logps.chunk(2), dim=1)  # (B, 2)
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
        # the longer of the two answers sets the pair's width
        lengths = [len(p) + max(map(len, r)) for p, r in zip(train.prompts, train.responses, strict=False)]
        self.sampler = EpochSampler(lengths, batch_size, grad_accum, seed)
        self.beta, self.reduction = beta, reduction
        self.batch_size, self.max_eval_batches = batch_size, eval_batches
        self.context_length, self.pad_id = context_length, pad_id

    def _batch(self, data: Tokenized, ref: torch.Tensor, indices: Sequence[int]) -> Batch:
        batch = collate_pairs(data, indices, self.context_length, self.pad_id)
        batch["ref_logps"] = torch.cat(
            [ref[indices, 0], ref[indices, 1]]
        )  # (2B,), in the rows' order: chosen first
        return batch

    def train_batch(self, step: int, micro_step: int, rank: int, world_size: int) -> Batch:
        return self._batch(
            self.train, self.ref_train, self.sampler.indices(step, micro_step, rank, world_size)
        )

    def eval_batches(self) -> Iterator[Batch]:
        for indices in _eval_chunks(len(self.val), self.batch_size, self.max_eval_batches):
            yield self._batch(self.val, self.ref_val, indices)

    def policy_logprobs(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """Response-only log-probs of the batch's 2B rows (chosen first), in one forward pass."""
        logits, _ = model(batch["input_ids"])
        return sequence_logprobs(logits, batch["targets"], self.reduction)

    def loss(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        chosen, rejected = self.policy_logprobs(model, batch).chunk(2)  # rows [0, B) chosen, [B, 2B) rejected
        ref_chosen, ref_rejected = batch["ref_logps"].chunk(2)
        return dpo_loss(chosen, rejected, ref_chosen, ref_rejected, self.beta)

    def count_tokens(self, batch: Batch) -> int:
        return batch["input_ids"].numel()


def without_dropout(model: GPT) -> GPT:
    """The same weights with dropout off: DPO compares policy and reference log-probs, which noise would blur
    (TRL disables dropout for DPO too)."""
    if model.cfg.dropout == 0:
        return model
    plain = GPT(replace(model.cfg, dropout=0.0))
    plain.load_state_dict(model.state_dict())
    return plain


def data_fingerprint(*datasets: Tokenized) -> str:
    """Identity of the token data a run trains on (joins the loop's run key: no resuming onto other data)."""
    digest = hashlib.sha256()
    for data in datasets:
        digest.update(json.dumps([data.ids, data.prompts, data.responses]).encode())
    return digest.hexdigest()
