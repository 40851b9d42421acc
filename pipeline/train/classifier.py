"""A trained GPT turned classifier (the book's chapter 6): an n-class head read at the last real token.

The head replaces the vocabulary head (``GPTConfig.n_classes``); inputs are right-padded, so under the causal
mask the last real token has seen exactly the text and nothing of the padding. ``trainable`` chooses what
learns: ``head``; ``last_block`` (the book's choice: last block, final norm and head); ``all``; or ``lora``
(adapters on the frozen model, the new head trained in full).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import tiktoken
import torch
import torch.nn.functional as F

from pipeline.common.config import LoRAParams
from pipeline.common.errors import PipelineError
from pipeline.model import lora
from pipeline.model.checkpoint import load_with_tokenizer, read_model_config
from pipeline.model.gpt import GPT
from pipeline.model.gpt import last_token_logits as class_logits
from pipeline.train.loop import Batch
from pipeline.train.objectives import EpochSampler

TRAINABLE = ("head", "last_block", "all", "lora")


def build_classifier(base: GPT, n_classes: int, trainable: str, lora_params: LoRAParams, seed: int) -> GPT:
    """``base``'s weights under a new, seeded n-class head, with only the ``trainable`` part left to learn."""
    if trainable == "lora" and lora_params.rank == 0:
        raise PipelineError("classify.trainable 'lora' needs classify.lora.rank > 0")
    if trainable != "lora" and lora_params.rank > 0:
        raise PipelineError(
            f"classify.lora.rank {lora_params.rank} is set but classify.trainable is '{trainable}' "
            "(use trainable: lora)"
        )
    model = GPT(replace(base.cfg, n_classes=n_classes, tie_weights=False))
    model.load_state_dict(
        {k: v for k, v in base.state_dict().items() if k != "out_head.weight"}, strict=False
    )
    torch.nn.init.normal_(
        model.out_head.weight, mean=0.0, std=0.02, generator=torch.Generator().manual_seed(seed)
    )
    if trainable == "lora":
        return lora.apply_lora(model, lora_params, "classify.lora", seed, train_fully=("out_head",))
    if trainable != "all":
        keep = [model.out_head] + ([model.blocks[-1], model.final_norm] if trainable == "last_block" else [])
        for p in model.parameters():
            p.requires_grad_(False)
        for module in keep:
            for p in module.parameters():
                p.requires_grad_(True)
    return model


@dataclass
class Encoded:
    ids: list[list[int]]
    labels: list[int]
    truncated: int  # texts longer than the context, cut to its length


def encode_texts(
    enc: tiktoken.Encoding, texts: Sequence[str], labels: Sequence[int], context_length: int
) -> Encoded:
    """Token ids of each text (special-token look-alikes are plain text) closed by ``<|endoftext|>``, cut to the
    context with the start kept. The head reads that closing token: one fixed position that has attended to the
    whole text (the book's padded batches end in the same token), rather than whatever word the text ends on —
    on the default tone data 84% test accuracy against 80% reading the last word (same params)."""
    ids, truncated = [], 0
    for text in texts:
        tokens = enc.encode_ordinary(text)
        if len(tokens) > context_length - 1:
            tokens, truncated = tokens[: context_length - 1], truncated + 1
        ids.append([*tokens, enc.eot_token])
    return Encoded(ids, list(labels), truncated)


def collate_texts(ids: Sequence[list[int]], pad_id: int, labels: Sequence[int] | None = None) -> Batch:
    """Right-padded ``input_ids`` (B, T), ``lengths`` (B,) and, when given, ``labels`` (B,)."""
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    for row, x in enumerate(ids):
        input_ids[row, : len(x)] = torch.tensor(x, dtype=torch.long)
    batch = {"input_ids": input_ids, "lengths": torch.tensor([len(x) for x in ids], dtype=torch.long)}
    if labels is not None:
        batch["labels"] = torch.tensor(list(labels), dtype=torch.long)
    return batch


class ClassifyObjective:
    """Cross-entropy on the last real token's class logits; accuracy logged beside the loss."""

    def __init__(
        self,
        train: Encoded,
        val: Encoded,
        *,
        batch_size: int,
        grad_accum: int,
        eval_batches: int,
        pad_id: int,
        seed: int,
    ):
        self.train, self.val, self.pad_id = train, val, pad_id
        self.sampler = EpochSampler([len(x) for x in train.ids], batch_size, grad_accum, seed)
        self.batch_size, self.max_eval_batches = batch_size, eval_batches

    def _batch(self, data: Encoded, indices: Sequence[int]) -> Batch:
        return collate_texts([data.ids[i] for i in indices], self.pad_id, [data.labels[i] for i in indices])

    def train_batch(self, step: int, micro_step: int, rank: int, world_size: int) -> Batch:
        return self._batch(self.train, self.sampler.indices(step, micro_step, rank, world_size))

    def eval_batches(self) -> Iterator[Batch]:
        n = min(len(self.val.ids), self.batch_size * self.max_eval_batches)
        for start in range(0, n, self.batch_size):
            yield self._batch(self.val, range(start, min(start + self.batch_size, n)))

    def loss(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = class_logits(model, batch["input_ids"], batch["lengths"]).float()
        accuracy = (logits.argmax(-1) == batch["labels"]).float().mean()
        return F.cross_entropy(logits, batch["labels"]), {"accuracy": accuracy}

    def count_tokens(self, batch: Batch) -> int:
        return batch["input_ids"].numel()


@torch.inference_mode()
def predict(model: GPT, ids: Sequence[list[int]], pad_id: int, batch_size: int = 32) -> torch.Tensor:
    """Class probabilities (N, n_classes) of every text, in batches of similar length."""
    model.eval()
    device = next(model.parameters()).device
    out = torch.empty(len(ids), model.cfg.n_classes)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = collate_texts([ids[i] for i in chunk], pad_id)
        logits = class_logits(model, batch["input_ids"].to(device), batch["lengths"].to(device))
        out[chunk] = torch.softmax(logits.float(), dim=-1).cpu()
    return out


def cli(argv: list[str]) -> int:
    """`python -m pipeline classify --model models/classifier "text" ...`: the label and every class's probability."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m pipeline classify", description=cli.__doc__)
    parser.add_argument(
        "--model", default="models/classifier", help="a classifier directory (default: %(default)s)"
    )
    parser.add_argument(
        "--tokenizer", default=None, help="tokenizer directory (default: the one the model recorded)"
    )
    parser.add_argument("texts", nargs="+")
    args = parser.parse_args(argv)
    model_dir = Path(args.model)
    meta = read_model_config(model_dir)
    labels = meta.get("labels")
    if not meta.get("model", {}).get("n_classes") or not isinstance(labels, list):
        raise PipelineError(f"{model_dir}: not a classifier (written by the classify stage?)")
    loaded = load_with_tokenizer(model_dir, Path(args.tokenizer or meta["tokenizer"]["path"]))
    encoded = encode_texts(loaded.enc, args.texts, [0] * len(args.texts), loaded.model.cfg.context_length)
    probabilities = predict(loaded.model, encoded.ids, loaded.enc.eot_token)
    for text, row in zip(args.texts, probabilities.tolist(), strict=True):
        best = max(range(len(labels)), key=lambda k: row[k])
        print(f"{labels[best]}\t{text}")
        for label, value in sorted(zip(labels, row, strict=True), key=lambda kv: -kv[1]):
            print(f"  {label:<12} {value:.4f}")
    if encoded.truncated:
        print(
            f"warning: {encoded.truncated} text(s) longer than the context were cut to "
            f"{loaded.model.cfg.context_length} tokens",
            file=sys.stderr,
        )
    return 0
