"""Shards: block-wise encoding equals whole-text encoding, the writer/manifest round-trip, and the reader's checks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.common.errors import PipelineError
from pipeline.data.shards import (
    MANIFEST,
    ShardDataset,
    ShardWriter,
    dtype_for_vocab,
    encode_piece,
    write_shards,
)
from pipeline.data.textstream import (
    DocumentTable,
    Segment,
    Segments,
    fallback_cut,
    read_blocks,
    read_runs,
    safe_cut,
    sample_text,
    split_tail,
)
from pipeline.data.tokenizer import train_tokenizer

FINGERPRINT = "f" * 64


@pytest.fixture(scope="module")
def bpe(corpus_text):
    return train_tokenizer("bpe", [corpus_text[:80_000]], 600)


@pytest.fixture()
def corpus(tmp_path, corpus_text):
    """Three documents, one of blank, indented and space-ended lines (its only safe cuts are before " word")."""
    docs = [
        corpus_text[:50_000],
        "  Uno dos.\n\n\n   tres  cuatro \n\tcinco \n" * 300,
        corpus_text[50_000:90_000],
    ]
    path = tmp_path / "corpus.txt"
    path.write_text("".join(docs), encoding="utf-8")
    offsets = np.cumsum([0] + [len(d.encode()) for d in docs])
    return path, docs, [Segment(int(offsets[i]), int(offsets[i + 1] - offsets[i])) for i in range(len(docs))]


def test_safe_cut_falls_where_no_split_pattern_joins_the_sides():
    assert safe_cut(b"abc\n  def\n\nghi\nj  ") == len(b"abc\n  def\n\nghi\n")
    assert safe_cut(b"end. \n  x\ny") == len(b"end. \n  x\n")
    assert safe_cut(b"  two words") == len(b"  two")
    assert safe_cut(b"no\n  cut \n\there 12 34") == -1
    euro = "añ€".encode()  # 1 + 2 + 3 bytes: the fallback never cuts inside the euro sign
    assert fallback_cut(euro[:5]) == 3 and fallback_cut(euro) == 3 and fallback_cut(b"abc") == 3


@pytest.mark.parametrize("kind", ["bpe", "gpt2", "char"])
def test_block_wise_encoding_equals_whole_text_encoding(corpus, bpe, kind):
    path, docs, segments = corpus
    enc = bpe if kind == "bpe" else train_tokenizer(kind, docs, 600)
    blocks = list(read_blocks(path, segments, 997))
    assert len(blocks) > 100 and max(n for _, n, _ in blocks) <= 997
    assert sum(ends for _, _, ends in blocks) == len(docs)
    per_doc, current = [], []
    for text, _, ends in blocks:
        current += enc.encode_ordinary(text)
        if ends:
            per_doc.append(current)
            current = []
    assert per_doc == [enc.encode_ordinary(d) for d in docs]


@pytest.mark.parametrize("kind", ["bpe", "gpt2", "char"])
def test_encode_piece_is_encode_ordinary_even_for_a_literal_end_of_text(corpus_text, bpe, kind):
    enc = bpe if kind == "bpe" else train_tokenizer(kind, [corpus_text[:20_000]], 600)
    text = corpus_text[:3000] + " <|endoftext|> ¿Qué?\r\n"
    tokens = encode_piece(enc, text)
    assert tokens.dtype == np.uint32 and tokens.tolist() == enc.encode_ordinary(text)
    assert enc.eot_token not in tokens.tolist() and encode_piece(enc, "").size == 0


def test_split_tail_cuts_a_single_document_at_a_line_boundary(corpus):
    path, docs, segments = corpus
    whole = [Segment(0, path.stat().st_size)]
    head, tail = split_tail(path, whole, 0.1)
    assert len(head) == len(tail) == 1 and head[0].length + tail[0].length == whole[0].length
    assert 0.09 < tail[0].length / whole[0].length < 0.11
    data = path.read_bytes()
    assert data[tail[0].offset - 1] == ord("\n") and data[tail[0].offset] not in b" \t\r\n"
    head, tail = split_tail(path, segments, 0.2)  # the cut falls inside the third document
    assert head[:2] == segments[:2] and tail[0].offset == segments[2].offset + head[2].length
    assert head[2].length + tail[0].length == segments[2].length and len(tail) == 1
    head, tail = split_tail(
        path, segments, 0.5
    )  # inside the second, whose lines start with blanks: before " word"
    assert head[:1] == segments[:1] and len(head) == 2 and tail[1:] == segments[2:]
    assert data[tail[0].offset : tail[0].offset + 2] in (b" d", b" t", b" c", b" U")


def _paragraphs(corpus_text: str, n: int = 400) -> list[str]:
    """Whole sentences of the corpus, a few per paragraph, each paragraph on one line (no hard wrapping)."""
    words = corpus_text.split()
    return [" ".join(words[i : i + 60]) for i in range(0, 60 * n, 60)]


def _verdict_or_paragraphs(shared_data, corpus_text) -> str:
    """The Verdict (one paragraph per line, blank lines between) when present, else text of that shape."""
    if shared_data is not None:
        return (shared_data / "the-verdict.txt").read_text(encoding="utf-8")
    return "\n\n".join(_paragraphs(corpus_text, 40))


SHAPES = {
    "blank-line paragraphs": lambda shared, text: "\n\n".join(_paragraphs(text)) + "\n",
    "one paragraph per line": lambda shared, text: "\n".join("\u2014" + p for p in _paragraphs(text)) + "\n",
    "the verdict": _verdict_or_paragraphs,
    "a single very long line": lambda shared, text: " ".join(_paragraphs(text)),
    "crlf blank-line paragraphs": lambda shared, text: "\r\n\r\n".join(_paragraphs(text)) + "\r\n",
    "gutenberg hard-wrapped": lambda shared, text: text[:100_000],
}


@pytest.mark.parametrize("shape", SHAPES)
def test_split_tail_cuts_any_text_with_paragraphs_or_words(tmp_path, bpe, shared_data, corpus_text, shape):
    """Both splits exist, near the asked fraction, at a line start (else before a word); each is encoded whole."""
    text = SHAPES[shape](shared_data, corpus_text)
    path = tmp_path / "corpus.txt"
    path.write_bytes(text.encode())
    data = path.read_bytes()
    whole = [Segment(0, len(data))]
    head, tail = split_tail(path, whole, 0.1)
    cut = tail[0].offset
    assert head == [Segment(0, cut)] and tail == [Segment(cut, len(data) - cut)]
    assert 0.08 < tail[0].length / len(data) < 0.12
    if "\n" in text:
        assert data[cut - 1] == ord("\n") and data[cut] not in b" \t\r\n"
    else:
        assert data[cut] == ord(" ") and data[cut - 1] != ord(" ") and chr(data[cut + 1]).isalpha()
    manifest = write_shards(
        bpe,
        path,
        {"train": head, "val": tail},
        tmp_path / "shards",
        fingerprint=FINGERPRINT,
        shard_tokens=10**6,
        batch_bytes=4000,
        threads=2,
    )
    tokens = [
        np.fromfile(tmp_path / "shards" / f"{split}_0000.bin", dtype="<u2").tolist()
        for split in ("train", "val")
    ]
    assert tokens == [
        bpe.encode_ordinary(data[:cut].decode()) + [bpe.eot_token],
        bpe.encode_ordinary(data[cut:].decode()) + [bpe.eot_token],
    ]
    assert manifest["splits"]["val"]["text_bytes"] == len(data) - cut


def test_split_tail_refuses_a_text_too_short_or_without_a_place_to_cut(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_bytes(b"Una frase corta.\n" * 500)  # 8,500 bytes: a val split of 0.1 would be 850
    with pytest.raises(
        PipelineError,
        match=r"corpus.txt: 8,500 bytes of text, too short for a val split at "
        r"shards.val_fraction=0.1: each split needs at least 1,024 bytes, "
        r"so the corpus at least 10,240$",
    ):
        split_tail(path, [Segment(0, 8500)], 0.1)
    with pytest.raises(PipelineError, match=r"too short for a train split at shards.val_fraction=0.95"):
        split_tail(path, [Segment(0, 8500)], 0.95)
    assert split_tail(path, [Segment(0, 8500)], 0.2)[1][0].length == 1700
    path.write_bytes(b"x" * 20_000)
    with pytest.raises(
        PipelineError,
        match=r"corpus.txt: no line start or space before a word within 1,048,576 bytes "
        r"of byte 18,000 .* shards.val_fraction=0.1",
    ):
        split_tail(path, [Segment(0, 20_000)], 0.1)
    documents = [Segment(0, 10_000), Segment(10_000, 10_000)]  # no cut inside: the document boundary is one
    assert split_tail(path, documents, 0.3) == (documents[:1], documents[1:])


def test_write_shards_round_trip(tmp_path, corpus, bpe):
    path, docs, segments = corpus
    head, tail = split_tail(path, segments, 0.2)
    manifest = write_shards(
        bpe,
        path,
        {"train": head, "val": tail},
        tmp_path / "shards",
        fingerprint=FINGERPRINT,
        shard_tokens=3000,
        batch_bytes=8000,
        threads=2,
    )
    assert manifest == json.loads((tmp_path / "shards" / MANIFEST).read_text())
    train = manifest["splits"]["train"]
    assert len(train["shards"]) > 3 and all(s["tokens"] == 3000 for s in train["shards"][:-1])
    assert manifest["dtype"] == "uint16" and manifest["tokenizer_fingerprint"] == FINGERPRINT
    tokens = []
    for split in ("train", "val"):
        ds = ShardDataset(tmp_path / "shards", split, expected_fingerprint=FINGERPRINT)
        assert ds.num_tokens == manifest["splits"][split]["tokens"]
        tokens += np.concatenate([np.asarray(a) for a in ds.arrays]).tolist()
    expected = []
    for segment in head + tail:
        expected += bpe.encode_ordinary(
            path.read_bytes()[segment.offset : segment.offset + segment.length].decode()
        )
        expected.append(bpe.eot_token)
    assert tokens == expected
    assert manifest["total_tokens"] == len(expected)


@pytest.fixture()
def short_documents(tmp_path, corpus_text):
    """Hundreds of short documents back to back (a dataset's shape), one long one, one holding the EOT text."""
    words = corpus_text.split()
    docs = [
        " ".join(words[i : i + 7 + i % 40]) + ("\r\n" if i % 3 else "\n\n¿Sí?") for i in range(0, 12_000, 29)
    ]
    docs[57] = corpus_text[:30_000]  # longer than a run: read in pieces cut at safe positions
    docs[200] = "Dijo <|endoftext|> y calló."  # ordinary text, never the EOT token
    path = tmp_path / "corpus.txt"
    path.write_text("".join(docs), encoding="utf-8")
    return path, docs, Segments.from_ends(np.cumsum([len(d.encode()) for d in docs]))


def test_read_runs_reads_consecutive_documents_at_once_and_cuts_long_ones_safely(short_documents):
    path, docs, segments = short_documents
    data = path.read_bytes()
    runs = list(read_runs(path, segments, 4096))
    assert len(runs) < len(docs) / 3 and max(len(buf) for _, buf, _ in runs) <= 4096
    assert b"".join(buf for _, buf, _ in runs) == data and all(data[o : o + len(b)] == b for o, b, _ in runs)
    assert [offset + end for offset, _, ends in runs for end in ends] == [
        s.offset + s.length for s in segments
    ]
    long = [(buf, ends) for offset, buf, ends in runs if segments[57].offset <= offset < segments[58].offset]
    assert len(long) > 7 and [ends for _, ends in long] == [[]] * (len(long) - 1) + [[len(long[-1][0])]]
    gaps = [
        segments[0],
        Segment(segments[2].offset, 0),
        segments[2],
        segments[1],
    ]  # not back to back, one empty
    assert list(read_runs(path, gaps, 4096)) == [
        (s.offset, data[s.offset : s.offset + s.length], [s.length])
        for s in (segments[0], segments[2], segments[1])
    ]


@pytest.mark.parametrize("kind", ["bpe", "gpt2", "char"])
def test_write_shards_of_many_short_documents_is_each_document_encoded_whole(
    tmp_path, short_documents, bpe, kind
):
    path, docs, segments = short_documents
    enc = bpe if kind == "bpe" else train_tokenizer(kind, docs, 600)
    manifest = write_shards(
        enc,
        path,
        {"train": segments},
        tmp_path / "shards",
        fingerprint=FINGERPRINT,
        shard_tokens=5000,
        batch_bytes=16_000,
        threads=2,
    )
    tokens = np.concatenate(
        [np.asarray(a) for a in ShardDataset(tmp_path / "shards", "train").arrays]
    ).tolist()
    assert tokens == [t for doc in docs for t in [*enc.encode_ordinary(doc), enc.eot_token]]
    assert tokens.count(enc.eot_token) == len(docs) == manifest["splits"]["train"]["documents"]


def test_write_shards_names_the_byte_of_invalid_utf8_inside_a_run(tmp_path, short_documents, bpe):
    path, _, segments = short_documents
    data = bytearray(path.read_bytes())
    bad = segments[120].offset + 3
    data[bad] = 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(PipelineError, match=rf"corpus.txt: not valid UTF-8 at byte {bad}$"):
        write_shards(
            bpe,
            path,
            {"train": segments},
            tmp_path / "shards",
            fingerprint=FINGERPRINT,
            shard_tokens=5000,
            batch_bytes=16_000,
            threads=2,
        )


def test_dtype_follows_the_vocab_and_the_writer_refuses_ids_beyond_it(tmp_path):
    assert dtype_for_vocab(50272) == np.uint16 and dtype_for_vocab(65536) == np.uint32
    writer = ShardWriter(tmp_path, "train", np.dtype(np.uint16), 100)
    writer.write(np.array([1, 65535], dtype=np.uint32))
    with pytest.raises(PipelineError, match=r"train_0000\.bin: token id 70000 does not fit uint16"):
        writer.write(np.array([5, 70000], dtype=np.uint32))
    wide = ShardWriter(tmp_path, "wide", np.dtype(np.uint32), 100)
    wide.write(np.array([70000], dtype=np.uint32))
    assert wide.close()[0]["dtype"] == "uint32"
    assert np.fromfile(tmp_path / "wide_0000.bin", dtype="<u4").tolist() == [70000]


@pytest.fixture()
def shards(tmp_path):
    """Two small shards with known contents: 0..99 and 100..159."""
    directory = tmp_path / "shards"
    directory.mkdir()
    writer = ShardWriter(directory, "train", np.dtype(np.uint16), 100)
    writer.write(np.arange(160, dtype=np.uint32))
    manifest = {
        "format": 1,
        "dtype": "uint16",
        "vocab_size": 300,
        "eot_token": 299,
        "tokenizer_fingerprint": FINGERPRINT,
        "splits": {"train": {"tokens": 160, "text_bytes": 640, "documents": 1, "shards": writer.close()}},
    }
    (directory / MANIFEST).write_text(json.dumps(manifest))
    return directory


def test_sample_is_reproducible_and_never_crosses_a_shard(shards):
    ds = ShardDataset(shards, "train")
    x1, y1 = ds.sample(64, 8, torch.Generator().manual_seed(3))
    x2, y2 = ds.sample(64, 8, torch.Generator().manual_seed(3))
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert x1.dtype == y1.dtype == torch.int64 and x1.shape == (64, 8)
    assert torch.equal(y1[:, :-1], x1[:, 1:])
    assert torch.all(y1 - x1 == 1)  # consecutive ids: the window is one contiguous slice of one shard
    assert not torch.equal(x1, ds.sample(64, 8, torch.Generator().manual_seed(4))[0])
    starts = {int(v) for v in ds.sample(4000, 8, torch.Generator().manual_seed(0))[0][:, 0]}
    assert starts == set(range(0, 92)) | set(range(100, 152))  # every start in both shards, none crossing


def test_sequential_windows_are_deterministic_and_disjoint(shards):
    ds = ShardDataset(shards, "train")
    batches = list(ds.sequential(3, 10))
    xs = torch.cat([x for x, _ in batches])
    assert xs[:, 0].tolist() == [0, 10, 20, 30, 40, 50, 60, 70, 80, 100, 110, 120, 130, 140]
    assert [len(x) for x, _ in batches] == [3, 3, 3, 3, 2]
    assert len(list(ds.sequential(3, 10, max_batches=2))) == 2
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, ds.sequential(3, 10), strict=False))


def test_reader_refuses_bad_shards(shards):
    with pytest.raises(PipelineError, match="tokenizer"):
        ShardDataset(shards, "train", expected_fingerprint="0" * 64)
    with pytest.raises(PipelineError, match="no split 'val'"):
        ShardDataset(shards, "val")
    with pytest.raises(PipelineError, match="101 tokens"):
        ShardDataset(shards, "train").sample(1, 100, torch.Generator())
    first = shards / "train_0000.bin"
    first.write_bytes(first.read_bytes()[:-1])
    with pytest.raises(PipelineError, match=r"train_0000\.bin: 199 bytes, expected 200.*truncated"):
        ShardDataset(shards, "train")
    first.write_bytes(b"\0" * 200)
    with pytest.raises(PipelineError, match=r"train_0000\.bin: sha256"):
        ShardDataset(shards, "train")
    manifest = json.loads((shards / MANIFEST).read_text())
    manifest["splits"]["train"]["shards"][1]["dtype"] = "uint32"
    (shards / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(PipelineError, match=r"train_0001\.bin: dtype uint32"):
        ShardDataset(shards, "train", verify=False)
    (shards / MANIFEST).unlink()
    with pytest.raises(PipelineError, match="manifest.json"):
        ShardDataset(shards, "train")


def test_sample_text_is_a_seeded_spread_of_windows(tmp_path, corpus_text):
    """tokenizer.train_bytes: about that many bytes, in 1 MiB windows over the whole corpus, the same for a seed."""
    text = (corpus_text + "¿Qué? ¡Sí! — años\n") * 40  # ~8 MB with multi-byte characters at every window edge
    path = tmp_path / "corpus.txt"
    path.write_bytes(text.encode())
    size = path.stat().st_size
    data = path.read_bytes()
    starts = sorted({0} | {data.index(b"\n", o) + 1 for o in range(300_000, size - 300_000, 300_000)})
    documents = [Segment(a, b - a) for a, b in zip(starts, [*starts[1:], size], strict=True)]
    sample = list(sample_text(path, documents, 3 << 20, seed=5))
    assert sample == list(sample_text(path, documents, 3 << 20, seed=5))
    assert sample != list(sample_text(path, documents, 3 << 20, seed=6))
    assert (3 << 20) - 64 <= sum(len(t.encode()) for t in sample) <= (3 << 20)
    assert len(sample) >= 3 * 4 and all(
        t in text for t in sample
    )  # three windows, each across document boundaries
    assert sum(len(t.encode()) for t in sample_text(path, documents, 10 * size, seed=5)) >= size - 64


def test_segments_arrays_behave_as_a_list_of_segments():
    ends = np.cumsum(np.arange(1, 150_001))
    documents = Segments.from_ends(ends)
    listed = list(documents)
    assert len(listed) == len(documents) == 150_000 and listed[70_000] == documents[70_000] == Segment(
        int(ends[69_999]), 70_001
    )
    assert documents[:2] + [Segment(9, 1)] == [Segment(0, 1), Segment(1, 2), Segment(9, 1)]
    assert documents.total() == int(ends[-1]) and Segments.of(listed) == documents


def test_document_table_on_disk_splits_and_samples_as_the_arrays_do(tmp_path, monkeypatch):
    """150,000 documents (three chunks of the table): the same segments, splits and tokenizer sample as in memory."""
    data = "".join(f"Línea {i} de{' texto' * (i % 7)}.\n" for i in range(150_000)).encode()
    ends = np.cumsum([len(line.encode()) + 1 for line in data.decode().split("\n")[:-1]])
    path, table = tmp_path / "corpus.txt", tmp_path / "documents.bin"
    path.write_bytes(data)
    table.write_bytes(ends.astype("<u8").tobytes())
    documents, listed = DocumentTable(table, len(ends)), Segments.from_ends(ends)
    assert len(documents) == 150_000 and documents.total() == len(data) and documents == listed
    assert (
        documents[70_000] == listed[70_000]
        and documents[-1] == listed[-1]
        and documents[10:20] == listed[10:20]
    )
    for fraction in (0.1, 0.5):
        head, tail = split_tail(path, documents, fraction)
        assert isinstance(head, DocumentTable) and (head, tail) == split_tail(path, listed, fraction)
        assert head.total() + tail.total() == len(data) and len(head) + len(tail) in (150_000, 150_001)
    sample = list(sample_text(path, tail, 3 << 20, seed=5))  # windows that run across chunks of the table
    whole = Segments.chunks
    monkeypatch.setattr(
        Segments, "chunks", lambda self, size=None: whole(self, 10**9)
    )  # the arrays in one piece
    assert sample == list(sample_text(path, Segments.of(list(tail)), 3 << 20, seed=5)) and len(sample) > 1000
