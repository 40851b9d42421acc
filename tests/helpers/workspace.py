"""Tiny stage workspaces for the model tests: a corpus tokenized into data/tokenizer + data/shards, a briefly trained model."""

from __future__ import annotations

from pathlib import Path

import tiktoken
import torch

from pipeline.data.shards import ShardDataset, write_shards
from pipeline.data.textstream import Segment
from pipeline.data.tokenizer import save_tokenizer
from pipeline.model.gpt import GPT


def tokenize_corpus(
    root: Path, text: str, enc: tiktoken.Encoding, kind: str, train_fraction: float, **metadata: object
) -> tuple[str, int]:
    """root/corpus.txt, root/data/tokenizer and root/data/shards: train up to the first line break after
    ``train_fraction`` of the bytes, val after it (``metadata``: more for the tokenizer's metadata.json).
    Returns (tokenizer fingerprint, byte offset of the cut)."""
    corpus = root / "corpus.txt"
    corpus.write_text(text, encoding="utf-8")
    fingerprint = save_tokenizer(enc, root / "data/tokenizer", kind, **metadata)
    data = corpus.read_bytes()
    cut = data.index(b"\n", int(len(data) * train_fraction)) + 1
    write_shards(
        enc,
        corpus,
        {"train": [Segment(0, cut)], "val": [Segment(cut, len(data) - cut)]},
        root / "data/shards",
        fingerprint=fingerprint,
        shard_tokens=10**6,
        batch_bytes=10**6,
    )
    return fingerprint, cut


def train_briefly(model: GPT, shards: Path, steps: int) -> GPT:
    """``steps`` seeded AdamW steps on random train windows: outputs far from uniform, cheaply."""
    train = ShardDataset(shards, "train")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x, y = train.sample(8, model.cfg.context_length, generator)
        loss = torch.nn.functional.cross_entropy(model(x)[0].flatten(0, 1), y.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()
