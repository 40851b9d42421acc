"""Local copies of Hugging Face Hub dataset repos, laid out as the Hub serves them (a README.md whose YAML header
names each config's data files, parquet files per config), filled with local text: what `benchmark.hub_copies`
points at on a machine without the Hub."""

from __future__ import annotations

import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tests.helpers.project import SHARED_DATA, generated_corpus


def passages(n: int, min_words: int = 12, max_words: int = 60) -> list[str]:
    """``n`` Quijote paragraphs (generated sentences without ../shared) ending in a plain word, as LAMBADA's do."""
    quijote = SHARED_DATA / "quijote.txt"
    text = quijote.read_text(encoding="utf-8") if quijote.is_file() else generated_corpus(200_000)
    found = []
    for paragraph in re.split(r"\n\s*\n|\n", text):
        words = paragraph.split()
        if words:
            words[-1] = words[-1].strip(".,;:!?¡¿\"'()«»—-")  # LAMBADA's last words carry no punctuation
        if min_words <= len(words) <= max_words and words[-1].isalpha():
            found.append(" ".join(words))
        if len(found) == n:
            break
    return found


def write_repo(root: Path, configs: dict[str, dict[str, list[dict]]]) -> Path:
    """``root`` as a Hub dataset repo: one parquet file per config and split under ``<config>/``, declared in
    README.md (``configs``: {config: {split: rows}})."""
    header = ["---", "configs:"]
    for name, splits in configs.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        header += [f"- config_name: {name}", "  data_files:"]
        for split, rows in splits.items():
            pq.write_table(pa.Table.from_pylist(rows), root / name / f"{split}-00000-of-00001.parquet")
            header += [f"  - split: {split}", f"    path: {name}/{split}-*.parquet"]
    (root / "README.md").write_text("\n".join([*header, "---", "", "A local copy for tests."]) + "\n")
    return root


def lambada_copy(root: Path, n: int = 12) -> Path:
    """EleutherAI/lambada_openai's layout (configs ``default`` and ``es``; one ``text`` field per passage)."""
    rows = [{"text": text} for text in passages(n)]
    return write_repo(root, {"default": {"test": rows}, "es": {"test": rows}})


def arc_copy(root: Path) -> Path:
    """allenai/ai2_arc's layout (config ``ARC-Easy``, its three splits): questions with four choices, and one
    with three."""
    rows = [
        {
            "id": f"q{i}",
            "question": question,
            "choices": {"text": choices, "label": list("ABCD"[: len(choices)])},
            "answerKey": "A",
        }
        for i, (question, choices) in enumerate(
            [
                (
                    "¿Quién es el escudero de don Quijote?",
                    ["Sancho Panza", "Dulcinea", "el cura", "Rocinante"],
                ),
                ("¿Cómo se llama el caballo?", ["Rocinante", "Rucio", "Babieca", "Clavileño"]),
                ("¿De dónde es don Quijote?", ["la Mancha", "Sevilla", "Barcelona"]),
            ]
        )
    ]
    return write_repo(root, {"ARC-Easy": {"train": rows, "validation": rows, "test": rows}})
