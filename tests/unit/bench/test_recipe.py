"""bench.recipe: every variant builds and trains (tiny preset, a fraction of a second each)."""

from __future__ import annotations

import math

import pytest
import yaml

from bench import recipe
from pipeline.data.shards import write_shards
from pipeline.data.textstream import Segment
from pipeline.data.tokenizer import save_tokenizer, train_tokenizer

ROOT = recipe.ROOT


@pytest.fixture(scope="module")
def project(tmp_path_factory, corpus_text):
    """A char tokenizer, train/val shards of the demo text and params.yaml with the tiny preset."""
    root = tmp_path_factory.mktemp("recipe")
    text = corpus_text[:40_000]
    corpus = root / "corpus.txt"
    corpus.write_text(text, encoding="utf-8")
    enc = train_tokenizer("char", [text], 256)
    fingerprint = save_tokenizer(enc, root / "tokenizer", "char")
    data = corpus.read_bytes()
    cut = int(len(data) * 0.8)
    while data[cut] & 0xC0 == 0x80:  # never inside a UTF-8 character
        cut += 1
    write_shards(
        enc,
        corpus,
        {"train": [Segment(0, cut)], "val": [Segment(cut, len(data) - cut)]},
        root / "shards",
        fingerprint=fingerprint,
        shard_tokens=10**6,
        batch_bytes=10_000,
        threads=1,
    )
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["model"] = {"preset": "cpu-tiny"}
    params["pretrain"].update(batch_size=4, dtype="fp32")
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


@pytest.mark.integration  # trains every variant
def test_every_variant_trains_and_is_scored(project, capsys):
    names = ",".join(recipe.VARIANTS)
    recipe.main(
        [
            "--params",
            str(project / "params.yaml"),
            "--shards",
            str(project / "shards"),
            "--tokenizer",
            str(project / "tokenizer"),
            "--budget-s",
            "0.2",
            "--eval-batches",
            "1",
            "--variants",
            names,
        ]
    )
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| variant")]
    assert [row.split("|")[1].strip() for row in rows] == list(recipe.VARIANTS)
    for row in rows:
        steps, bpb = int(row.split("|")[4]), float(row.split("|")[6])
        assert steps >= 1 and math.isfinite(bpb) and bpb > 0
    assert out.splitlines()[-1].startswith("budget_s=0.2 ") and "baseline=recipe" in out.splitlines()[-1]


def test_unknown_variant_is_one_error_line(project, capsys):
    with pytest.raises(SystemExit) as exc:
        recipe.main(
            [
                "--shards",
                str(project / "shards"),
                "--tokenizer",
                str(project / "tokenizer"),
                "--variants",
                "recipe,adamw_please",
            ]
        )
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --variants: unknown adamw_please")
