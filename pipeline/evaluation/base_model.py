"""How good is the base model: validation loss, perplexity, bits per byte, the unigram baseline, accuracy,
samples from fixed prompts, the loss curve as a PNG, and a short markdown report.

Bits per byte divide the model's nats by the UTF-8 bytes of the text it predicted, so runs with different
tokenizers compare. The unigram baseline (token frequencies of the train split, add-one smoothed, scored on
the same validation tokens) is the loss a model that ignores context would get: beating it clearly is the
first sign the model learned anything about sequences.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import tiktoken
import torch
import torch.nn.functional as F

from pipeline.common.atomic import atomic_path
from pipeline.data.shards import ShardDataset
from pipeline.model.generate import generate
from pipeline.model.gpt import GPT
from pipeline.model.runtime import autocast
from pipeline.model.sampling import SamplingOptions


def token_byte_lengths(enc: tiktoken.Encoding) -> torch.Tensor:
    """UTF-8 bytes each token id stands for; 0 for special tokens (they are markup, not text)."""
    special = {enc.encode_single_token(t) for t in enc.special_tokens_set}
    lengths = torch.zeros(enc.n_vocab, dtype=torch.int64)
    for token in range(enc.n_vocab):
        if token in special:
            continue
        try:
            lengths[token] = len(enc.decode_single_token_bytes(token))
        except KeyError:  # a hole in the id space: never produced by the encoder
            continue
    return lengths


def unigram_log_probs(train: ShardDataset, vocab_size: int) -> torch.Tensor:
    """log p(token) from the train split's token counts, add-one smoothed over the whole vocabulary."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for array in train.arrays:
        counts += np.bincount(array, minlength=vocab_size)[:vocab_size]
    probs = (counts + 1) / (counts.sum() + vocab_size)
    return torch.from_numpy(np.log(probs))


@dataclass
class LMMetrics:
    val_loss: float
    perplexity: float
    bits_per_byte: float
    unigram_loss: float
    unigram_bits_per_byte: float
    accuracy: float
    tokens: int
    text_bytes: int

    def as_dict(self) -> dict[str, float]:
        return {
            "val_loss": self.val_loss,
            "perplexity": self.perplexity,
            "bits_per_byte": self.bits_per_byte,
            "unigram_loss": self.unigram_loss,
            "unigram_bits_per_byte": self.unigram_bits_per_byte,
            "loss_below_unigram": self.unigram_loss - self.val_loss,
            "accuracy": self.accuracy,
            "tokens": self.tokens,
            "text_bytes": self.text_bytes,
        }


@torch.no_grad()
def language_model_metrics(
    model: GPT,
    val: ShardDataset,
    unigram: torch.Tensor,
    byte_lengths: torch.Tensor,
    batch_size: int,
    max_batches: int,
    dtype: torch.dtype,
) -> LMMetrics:
    """Score the first ``max_batches`` validation windows (in order) with the model and the unigram baseline."""
    model.eval()
    device = next(model.parameters()).device
    nats = text_nats = unigram_nats = unigram_text_nats = 0.0
    tokens = text_bytes = correct = 0
    for x, y in val.sequential(batch_size, model.cfg.context_length, max_batches):
        x, y = x.to(device), y.to(device)
        with autocast(device, dtype):
            logits, _ = model(x)
        logits = logits.float()
        nll = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").double().cpu()
        y = y.flatten().cpu()
        lengths = byte_lengths[y]
        text = lengths > 0
        base = -unigram[y]
        nats += float(nll.sum())
        unigram_nats += float(base.sum())
        text_nats += float(nll[text].sum())
        unigram_text_nats += float(base[text].sum())
        tokens += y.numel()
        text_bytes += int(lengths.sum())
        correct += int((logits.argmax(-1).flatten().cpu() == y).sum())
    val_loss = nats / tokens
    return LMMetrics(
        val_loss=val_loss,
        perplexity=math.exp(val_loss),
        bits_per_byte=text_nats / math.log(2) / max(text_bytes, 1),
        unigram_loss=unigram_nats / tokens,
        unigram_bits_per_byte=unigram_text_nats / math.log(2) / max(text_bytes, 1),
        accuracy=correct / tokens,
        tokens=tokens,
        text_bytes=text_bytes,
    )


def samples(
    model: GPT, enc: tiktoken.Encoding, prompts: tuple[str, ...], opts: SamplingOptions
) -> list[dict]:
    """One continuation per prompt, prompt i sampled with seed ``opts.seed + i``: reruns produce the same text."""
    device = next(model.parameters()).device
    out = []
    for i, prompt in enumerate(prompts):
        ids = enc.encode_ordinary(prompt)[-(model.cfg.context_length - 1) :]
        prompt_opts = replace(opts, seed=opts.seed + i)
        full = generate(model, torch.tensor([ids], device=device), prompt_opts)[0, len(ids) :].tolist()
        new = [t for t in full if t != opts.eos_id]
        out.append({"prompt": prompt, "completion": enc.decode(new), "tokens": len(new)})
    return out


def read_curve(path: Path) -> tuple[list[int], list[float]]:
    """A dvclive metric history (TSV with ``step`` and the value); empty when it was never logged."""
    if not path.is_file():
        return [], []
    with path.open(newline="") as fh:
        rows = list(csv.reader(fh, delimiter="\t"))[1:]
    return [int(r[0]) for r in rows], [float(r[1]) for r in rows]


def plot_loss(plots_dir: Path, metrics: LMMetrics, out: Path, title: str) -> None:
    """Train/val loss against steps with the unigram baseline, and the learning rate, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_lr) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [2.2, 1]})
    for name, style in (("train/loss", "-"), ("val/loss", "o-")):
        steps, values = read_curve(plots_dir / f"{name}.tsv")
        if steps:
            ax.plot(steps, values, style, label=name, markersize=4)
    ax.axhline(
        metrics.unigram_loss,
        color="grey",
        linestyle="--",
        label=f"unigram baseline {metrics.unigram_loss:.2f}",
    )
    ax.axhline(
        metrics.val_loss, color="green", linestyle=":", label=f"evaluated val loss {metrics.val_loss:.2f}"
    )
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    steps, values = read_curve(plots_dir / "train/lr.tsv")
    ax_lr.plot(steps, values, color="tab:purple")
    ax_lr.set_xlabel("step")
    ax_lr.set_title("learning rate")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)


def markdown_report(metrics: LMMetrics, sample_rows: list[dict], model_line: str, png_name: str) -> str:
    m = metrics
    lines = [
        "# Base model evaluation",
        "",
        model_line,
        "",
        "| metric | model | unigram baseline |",
        "|---|---|---|",
        f"| validation loss (nats/token) | {m.val_loss:.4f} | {m.unigram_loss:.4f} |",
        f"| perplexity | {m.perplexity:.1f} | {math.exp(m.unigram_loss):.1f} |",
        f"| bits per byte | {m.bits_per_byte:.4f} | {m.unigram_bits_per_byte:.4f} |",
        f"| next-token accuracy | {m.accuracy:.2%} | |",
        "",
        f"Scored on {m.tokens:,} validation tokens ({m.text_bytes:,} bytes of text). The model is "
        f"{m.unigram_loss - m.val_loss:.2f} nats/token below the unigram baseline.",
        "",
        f"![loss curve]({png_name})",
        "",
        "## Samples",
        "",
    ]
    for row in sample_rows:
        lines += [
            f"**{row['prompt']}**",
            "",
            "> " + (row["prompt"] + row["completion"]).replace("\n", "\n> "),
            "",
        ]
    return "\n".join(lines)
