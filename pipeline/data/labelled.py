"""Labelled texts for the classify stage: read a table, check it, balance it, split it.

Any CSV / TSV / JSON / JSONL file (or a member of a zip, as the book's SMS Spam Collection comes) with a text
field and a label field. The default data is a tone set built from the preference pairs the pipeline already
has (``tone_records``), so the default classifier needs no other download.
"""

from __future__ import annotations

import csv
import io
import json
import random
import zipfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.common.config import ClassifyParams
from pipeline.common.errors import PipelineError
from pipeline.data.corpus import DownloadCache, source_files
from pipeline.data.datasets import csv_rows
from pipeline.data.instructions import read_records, split_dataset

FORMATS = ("csv", "tsv", "json", "jsonl")


@dataclass(frozen=True)
class LabelledText:
    text: str
    label: str
    key: tuple = ()  # the prompt it answers (tone data): keeps held-out prompts out of training


@dataclass(frozen=True)
class Splits:
    train: list[LabelledText]
    val: list[LabelledText]
    test: list[LabelledText]


def _format_of(name: str, requested: str, origin: str) -> str:
    if requested != "auto":
        return requested
    suffix = Path(name).suffix.lower().lstrip(".")
    found = {
        "csv": "csv",
        "tsv": "tsv",
        "tab": "tsv",
        "json": "json",
        "jsonl": "jsonl",
        "ndjson": "jsonl",
    }.get(suffix)
    if found is None:
        raise PipelineError(
            f"{origin}: cannot tell the format from '{name}' (set classify.format: {' | '.join(FORMATS)})"
        )
    return found


def _unzip(path: Path, member: str | None, origin: str) -> tuple[bytes, str]:
    try:
        with zipfile.ZipFile(path) as archive:
            names = [
                n for n in archive.namelist() if not n.endswith("/") and not n.startswith("__MACOSX")
            ]  # no macOS metadata
            if member is None and len(names) != 1:
                raise PipelineError(
                    f"{origin}: a zip of {len(names)} files needs classify.member (one of: {', '.join(names[:8])})"
                )
            name = member or names[0]
            if name not in names:
                raise PipelineError(
                    f"{origin}: no member '{name}' in the zip (members: {', '.join(names[:8])})"
                )
            return archive.read(name), name
    except zipfile.BadZipFile as exc:
        raise PipelineError(f"{origin}: not a readable zip ({exc})") from None


def read_table(
    path: Path, *, fmt: str = "auto", member: str | None = None, columns: Sequence[str] = (), origin: str = ""
) -> list[dict]:
    """The file's records as dicts. ``columns`` names the fields of a header-less CSV/TSV (SMSSpamCollection)."""
    origin = origin or str(path)
    name = Path(origin).name  # a cached download is named by its hash: the URL tells the format
    raw = path.read_bytes()
    if zipfile.is_zipfile(path):
        raw, name = _unzip(path, member, origin)
        origin = f"{origin}!{name}"
    kind = _format_of(name, fmt, origin)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise PipelineError(f"{origin}: not UTF-8 text ({exc})") from None
    try:
        if kind == "json":
            records = json.loads(text)
        elif kind == "jsonl":
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            quoting = (
                csv.QUOTE_NONE if kind == "tsv" else csv.QUOTE_MINIMAL
            )  # TSV texts hold bare quotes (SMSSpamCollection)
            rows = csv_rows(
                io.StringIO(text, newline=""),
                origin,
                "\t" if kind == "tsv" else ",",
                fieldnames=list(columns) or None,
                quoting=quoting,
            )
            records = [row for _, row in rows]
    except json.JSONDecodeError as exc:
        raise PipelineError(f"{origin}: not valid {kind} ({exc})") from None
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise PipelineError(f"{origin}: expected a list of records (objects / rows)")
    return records


def labelled(
    records: Sequence[dict], text_field: str, label_field: str, origin: str
) -> tuple[list[LabelledText], int]:
    """(texts with labels, records skipped for an empty text).

    Nothing is turned into a string behind the user's back: a record without one of the fields, a text that is not
    a string, or a label that is empty or neither a string nor an integer (a list, a fraction, true/false) is an
    error naming the record and the field.
    """
    out, empty = [], 0
    for i, record in enumerate(records, 1):
        for field in (text_field, label_field):
            if record.get(field) is None:
                raise PipelineError(
                    f"{origin}: record {i} has no '{field}' field (fields: {', '.join(map(str, record))})"
                )
        text, label = record[text_field], record[label_field]
        if not isinstance(text, str):
            raise PipelineError(
                f"{origin}: record {i}: field '{text_field}' is a {type(text).__name__} ({_shown(text)}), "
                "not a string"
            )
        if isinstance(label, bool) or not isinstance(label, str | int):
            raise PipelineError(
                f"{origin}: record {i}: field '{label_field}' is a {type(label).__name__} ({_shown(label)}); "
                "a label is a string or an integer"
            )
        if not str(label).strip():
            raise PipelineError(
                f"{origin}: record {i}: field '{label_field}' is empty (every record needs a label)"
            )
        if not text.strip():
            empty += 1
            continue
        out.append(LabelledText(text.strip(), str(label).strip()))
    return out, empty


def _shown(value: object) -> str:
    shown = json.dumps(value, ensure_ascii=False, default=str)
    return shown if len(shown) <= 40 else shown[:37] + "..."


def tone_records(path: str | Path) -> tuple[list[LabelledText], int]:
    """The default data: in each preference pair one side is the original ``output`` and the other a rewrite,
    more polite when it is ``chosen``, more impolite when it is ``rejected``. Only the rewrite is labelled
    (the neutral original would sit under both labels); pairs whose sides are identical are dropped.
    Returns (texts, pairs dropped)."""
    texts, dropped = [], 0
    for i, record in enumerate(read_records(path), 1):
        if not isinstance(record, dict) or not all(
            isinstance(record.get(k), str) for k in ("output", "chosen", "rejected")
        ):
            raise PipelineError(
                f"{path}: record {i} lacks the 'output', 'chosen' and 'rejected' texts the tone data needs"
            )
        output, chosen, rejected = (record[k].strip() for k in ("output", "chosen", "rejected"))
        key = ((), record.get("instruction", ""), record.get("input", ""))  # the shape of Example.key
        if chosen == rejected or output not in (chosen, rejected):
            dropped += 1
        elif output == chosen:
            texts.append(LabelledText(rejected, "impolite", key))
        else:
            texts.append(LabelledText(chosen, "polite", key))
    return texts, dropped


def balance(texts: Sequence[LabelledText], seed: int) -> list[LabelledText]:
    """Undersample every class to the size of the smallest (the book's spam data), seeded, order kept."""
    by_label: dict[str, list[int]] = {}
    for i, t in enumerate(texts):
        by_label.setdefault(t.label, []).append(i)
    smallest = min(len(v) for v in by_label.values())
    rng = random.Random(seed)
    # labels in sorted order, so the seeded draws do not depend on the data's order; kept rows in their first order
    keep = sorted(i for label in sorted(by_label) for i in rng.sample(by_label[label], smallest))
    return [texts[i] for i in keep]


def split(
    texts: Sequence[LabelledText],
    train: float,
    val: float,
    seed: int,
    origin: str,
    held_out: set[tuple] = frozenset(),
) -> Splits:
    """Seeded train/val/test split; texts whose ``key`` is in ``held_out`` all go to test (never trained on)."""
    labels = Counter(t.label for t in texts)
    if len(labels) < 2:
        raise PipelineError(
            f"{origin}: {len(texts)} records of {len(labels)} class(es) "
            f"({', '.join(labels) or 'none'}): a classifier needs at least two"
        )
    kept = [t for t in texts if t.key not in held_out] if held_out else list(texts)
    forced = [t for t in texts if t.key in held_out] if held_out else []
    tr, va, te = split_dataset(kept, train, val, seed, origin)
    parts = Splits(tr, va, te + forced)
    for name in ("train", "val", "test"):
        if not getattr(parts, name):
            raise PipelineError(
                f"{origin}: the {name} split is empty ({len(texts)} records; "
                "raise its fraction in classify.split_train / split_val)"
            )
    return parts


def classify_texts(
    p: ClassifyParams, cache: DownloadCache, tone_file: Path
) -> tuple[list[LabelledText], str, dict]:
    """(texts, their origin, counts of what was left out) for the classify stage's params."""
    if p.data is None:
        texts, dropped = tone_records(tone_file)
        return texts, str(tone_file), {"pairs_dropped": dropped}
    files = source_files(p.data, cache, "classify.data")
    if len(files) != 1:
        raise PipelineError(f"classify.data: {p.data.location} is a directory; name one file (or a zip)")
    origin, path = files[0]
    records = read_table(path, fmt=p.format, member=p.member, columns=p.columns, origin=origin)
    texts, empty = labelled(records, p.text_field, p.label_field, origin)
    return texts, origin, {"empty_texts": empty}
