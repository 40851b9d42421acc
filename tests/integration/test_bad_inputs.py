"""The bad-input sweep as a suite: one named case per bad input a new user can meet, in every stage and the server.

Each case copies one prepared tiny project (download → tokenize → pretrain → sft → dpo → judge, run once per
session), breaks one thing, runs the stage in-process, and asserts the promise of the README: exactly one
`error:` line naming the file or param and exit 1 (or, where documented, a `warning:` line and success) — and,
through a snapshot of the project tree before and after, that nothing partial was left and nothing good deleted.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
import zstandard

from pipeline.cli import main as cli_main
from tests.helpers.project import make_project, venv_env

pytestmark = pytest.mark.timeout(900)

PREPARED_STAGES = ("download", "tokenize", "pretrain", "sft", "dpo", "judge")


@pytest.fixture(scope="session")
def prepared(tmp_path_factory) -> Path:
    """A tiny project whose stages up to judge have run (subprocesses, as DVC runs them)."""
    root = make_project(tmp_path_factory.mktemp("bad-inputs") / "project")
    for stage in PREPARED_STAGES:
        done = subprocess.run(
            [sys.executable, "-m", f"stages.{stage}"],
            cwd=root,
            capture_output=True,
            text=True,
            env={**venv_env(), "PYTHONPATH": str(root)},
        )
        assert done.returncode == 0, f"{stage}: {done.stderr[-3000:]}"
    return root


@pytest.fixture(scope="session")
def busy_port():
    """A port something already listens on: a serve case that wrongly passed validation ends there, not hangs."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


# ---------------------------------------------------------------------------------------------- helpers


def snapshot(root: Path) -> dict[str, str]:
    """Every file (its sha256) and directory under ``root``, but git's own files and Python caches."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in (".git", "__pycache__", ".dvc")]
        rel = Path(dirpath).relative_to(root)
        found[f"{rel.as_posix()}/"] = "dir"
        for name in filenames:
            path = Path(dirpath) / name
            found[(rel / name).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def params_set(key: str, value: object) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        path = root / "params.yaml"
        data = yaml.safe_load(path.read_text())
        *sections, name = key.split(".")
        node = data
        for section in sections:
            node = node.setdefault(section, {})
        node[name] = value
        path.write_text(yaml.safe_dump(data, sort_keys=False))

    return edit


def write(relative: str, content: str | bytes) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)

    return edit


def remove(relative: str) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        path = root / relative
        shutil.rmtree(path) if path.is_dir() else path.unlink()

    return edit


def edit_json(relative: str, change: Callable[[object], object]) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        path = root / relative
        data = json.loads(path.read_text())
        change(data)  # in place
        path.write_text(json.dumps(data))

    return edit


def zero_bytes(relative: str, count: int) -> Callable[[Path], None]:
    """Zero ``count`` bytes in the middle of a file's data; a safetensors header stays intact (it still parses)."""

    def edit(root: Path) -> None:
        path = root / relative
        data = bytearray(path.read_bytes())
        header = 8 + int.from_bytes(data[:8], "little") if path.suffix == ".safetensors" else 0
        assert len(data) - header >= count, f"{relative} has fewer than {count} data bytes"
        start = header + (len(data) - header - count) // 2
        data[start : start + count] = bytes(count)
        path.write_bytes(bytes(data))

    return edit


def both(*edits: Callable[[Path], None]) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        for one in edits:
            one(root)

    return edit


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class Case:
    name: str
    category: str
    stage: str  # a stage module name, or "serve" (argv in `args`)
    edit: Callable[[Path], None]
    expect: str  # a fragment of the one `error:` (or `warning:`) line: the file or param it names
    args: tuple[str, ...] = ()
    warning: bool = False  # a documented warning: the stage succeeds
    rewrites: tuple[str, ...] = field(
        default=()
    )  # a warning case's stage succeeds: the outputs it may replace


def _sft_record(**fields) -> dict:
    return {"instruction": "Say hi.", "input": "", "output": "Hi.", **fields}


def _pair(**fields) -> dict:
    return {
        "instruction": "Say hi.",
        "input": "",
        "output": "Hi.",
        "chosen": "Hi.",
        "rejected": "No.",
        **fields,
    }


RAW = "data/raw"
BASE, SFT, DPO = "models/base/", "models/sft/", "models/dpo/"
WEIGHTS, CONFIG = "model.safetensors", "config.json"

CASES = [
    # -- download ------------------------------------------------------------------------------------------------
    Case(
        "corpus_file_missing",
        "download",
        "download",
        params_set("corpus.sources", ["inputs/nowhere.txt"]),
        "corpus.sources[0]: inputs/nowhere.txt: no such file",
    ),
    Case(
        "corpus_sha256_mismatch",
        "download",
        "download",
        params_set("corpus.sources", [{"path": "inputs/corpus.txt", "sha256": "0" * 64}]),
        "sha256 mismatch",
    ),
    Case(
        "corpus_file_empty",
        "download",
        "download",
        both(write("inputs/empty.txt", ""), params_set("corpus.sources", ["inputs/empty.txt"])),
        "inputs/empty.txt",
    ),
    Case(
        "corpus_directory_without_files",
        "download",
        "download",
        both(write("inputs/emptydir/.keep", ""), params_set("corpus.sources", ["inputs/emptydir"])),
        "directory inputs/emptydir has no files",
    ),
    Case(
        "corpus_not_utf8",
        "download",
        "download",
        both(
            write("inputs/latin1.txt", "Se\xf1or\n".encode("latin-1") * 50),
            params_set("corpus.sources", ["inputs/latin1.txt"]),
        ),
        "inputs/latin1.txt",
    ),
    Case(
        "corpus_url_unreachable",
        "download",
        "download",
        both(params_set("corpus.sources", ["http://127.0.0.1:9/corpus.txt"]), params_set("data.retries", 0)),
        "http://127.0.0.1:9/corpus.txt",
    ),
    Case(
        "sft_data_directory_of_two_json_files",
        "download",
        "download",
        both(
            write("inputs/two/a.json", json.dumps([_sft_record()])),
            write("inputs/two/b.json", json.dumps([_sft_record()])),
            params_set("sft.data", "inputs/two"),
        ),
        "sft.data: inputs/two is a directory of 2 files",
    ),
    Case(
        "sft_data_missing",
        "download",
        "download",
        params_set("sft.data", "inputs/nowhere.json"),
        "sft.data: inputs/nowhere.json: no such file",
    ),
    Case(
        "sft_data_not_json", "download", "download", write("inputs/sft.json", "{this is not json"), "sft.data"
    ),
    Case("sft_data_empty_list", "download", "download", write("inputs/sft.json", "[]"), "sft.data"),
    Case(
        "dpo_data_sha256_mismatch",
        "download",
        "download",
        params_set("dpo.data", {"path": "inputs/dpo.json", "sha256": "f" * 64}),
        "dpo.data",
    ),
    Case(
        "dpo_data_url_unreachable",
        "download",
        "download",
        both(params_set("dpo.data", "http://127.0.0.1:9/dpo.json"), params_set("data.retries", 0)),
        "dpo.data",
    ),
    Case(
        "cache_dir_is_a_file",
        "download",
        "download",
        both(
            write("inputs/cachefile", "x"),
            params_set("data.cache_dir", "inputs/cachefile"),
            params_set("corpus.sources", ["http://127.0.0.1:9/corpus.txt"]),
        ),
        "inputs/cachefile",
    ),
    Case(
        "corpus_txt_gz_cut_in_half",
        "download",
        "download",
        both(
            lambda root: (root / "inputs/cut.txt.gz").write_bytes(
                (lambda data: data[: len(data) // 2])(
                    gzip.compress((root / "inputs/corpus.txt").read_bytes())
                )
            ),
            params_set("corpus.sources", ["inputs/cut.txt.gz"]),
        ),
        "corpus.sources[0] (inputs/cut.txt.gz): not a valid gzip file (EOFError",
    ),
    Case(
        "corpus_plain_text_named_gz",
        "download",
        "download",
        both(
            write("inputs/plain.gz", "plain text\n" * 50), params_set("corpus.sources", ["inputs/plain.gz"])
        ),
        "corpus.sources[0] (inputs/plain.gz): not a valid gzip file (BadGzipFile",
    ),
    Case(
        "corpus_jsonl_zst_truncated",
        "download",
        "download",
        both(
            write(
                "inputs/cut.jsonl.zst",
                zstandard.ZstdCompressor().compress(
                    "".join(json.dumps({"text": f"linea {i} " * 30}) + "\n" for i in range(200)).encode()
                )[:-50],
            ),
            params_set("corpus.sources", ["inputs/cut.jsonl.zst"]),
        ),
        "corpus.sources[0] (inputs/cut.jsonl.zst): not a valid zstd file (EOFError",
    ),
    Case(
        "corpus_garbage_zst",
        "download",
        "download",
        both(write("inputs/junk.zst", b"junk" * 100), params_set("corpus.sources", ["inputs/junk.zst"])),
        "corpus.sources[0] (inputs/junk.zst): not a valid zstd file (ZstdError",
    ),
    Case(
        "corpus_csv_quote_never_closed",
        "download",
        "download",
        both(
            write(
                "inputs/rows.csv",
                "id,text\n"
                + "".join(f"{i},row {i}\n" for i in range(1, 20))
                + '20,"open\n'
                + "".join(f"{i},row {i}\n" for i in range(21, 202)),
            ),
            params_set("corpus.sources", ["inputs/rows.csv"]),
        ),
        "corpus.sources[0] (inputs/rows.csv): line 21: a quoted field is never closed",
    ),
    Case(
        "corpus_csv_row_wider_than_header",
        "download",
        "download",
        both(
            write("inputs/rows.csv", "id,text\n1,uno\n2,dos, tres\n"),
            params_set("corpus.sources", ["inputs/rows.csv"]),
        ),
        "corpus.sources[0] (inputs/rows.csv): line 3: 3 fields, the header has 2",
    ),
    Case(
        "corpus_ftp_url",
        "download",
        "download",
        params_set("corpus.sources", ["ftp://example.com/corpus.txt"]),
        "corpus.sources[0]: ftp://example.com/corpus.txt: unsupported URL scheme 'ftp://'; a source is an http(s)://",
    ),
    Case(
        "corpus_file_url",
        "download",
        "download",
        params_set("corpus.sources", ["file:///tmp/corpus.txt"]),
        "(for a local file give its path: /tmp/corpus.txt)",
    ),
    Case(
        "corpus_dev_null",
        "download",
        "download",
        params_set("corpus.sources", ["/dev/null"]),
        "corpus.sources[0]: /dev/null: not a regular file",
    ),
    # -- params --------------------------------------------------------------------------------------------------
    Case(
        "weight_decay_negative_keeps_models_and_checkpoints",
        "params",
        "pretrain",
        params_set("pretrain.weight_decay", -1),
        "pretrain.weight_decay must be >= 0",
    ),
    Case(
        "beta1_above_one",
        "params",
        "pretrain",
        params_set("pretrain.beta1", 1.5),
        "pretrain.beta1 must be in [0, 1)",
    ),
    Case(
        "evaluate_top_k_zero",
        "params",
        "evaluate",
        params_set("evaluate.top_k", 0),
        "evaluate.top_k must be >= 1",
    ),
    Case(
        "evaluate_empty_prompt",
        "params",
        "evaluate",
        params_set("evaluate.prompts", ["ok", ""]),
        "evaluate.prompts",
    ),
    Case(
        "vocab_size_below_bytes",
        "params",
        "tokenize",
        params_set("tokenizer.vocab_size", 100),
        "tokenizer.vocab_size",
    ),
    Case(
        "unknown_key", "params", "pretrain", params_set("pretrain.warmup", 3), "unknown key 'pretrain.warmup'"
    ),
    Case(
        "params_not_yaml",
        "params",
        "pretrain",
        write("params.yaml", "pretrain: [unclosed"),
        "params.yaml: not valid YAML",
    ),
    Case("params_missing", "params", "sft", remove("params.yaml"), "params.yaml: file not found"),
    Case("device_unknown", "params", "pretrain", params_set("pretrain.device", "gpu"), "pretrain.device"),
    Case(
        "unknown_model_preset",
        "params",
        "pretrain",
        params_set("model.preset", "gpt5"),
        "unknown model preset 'gpt5'",
    ),
    Case(
        "n_head_does_not_divide_n_embd", "params", "pretrain", params_set("model.n_head", 5), "model.n_head"
    ),
    Case("lr_zero", "params", "sft", params_set("sft.lr", 0), "sft.lr must be > 0"),
    Case(
        "split_fractions_leave_no_test",
        "params",
        "sft",
        both(params_set("sft.split_train", 0.9), params_set("sft.split_val", 0.1)),
        "sft.split_train + sft.split_val",
    ),
    Case(
        "judge_port_out_of_range",
        "params",
        "judge",
        params_set("judge.host", "http://127.0.0.1:70000"),
        "judge.host",
    ),
    Case(
        "rdzv_port_out_of_range",
        "params",
        "pretrain",
        params_set("pretrain.rdzv_endpoint", "node0:99999"),
        "pretrain.rdzv_endpoint",
    ),
    Case(
        "seed_out_of_range", "params", "dpo", params_set("dpo.seed", 2**32), "dpo.seed must be in [0, 2**32)"
    ),
    # -- tokenize / shards ---------------------------------------------------------------------------------------
    Case("raw_corpus_missing", "tokenize", "tokenize", remove(f"{RAW}/corpus.txt"), f"{RAW}/corpus.txt"),
    Case(
        "raw_manifest_missing", "tokenize", "tokenize", remove(f"{RAW}/manifest.json"), f"{RAW}/manifest.json"
    ),
    Case(
        "raw_manifest_not_json",
        "tokenize",
        "tokenize",
        write(f"{RAW}/manifest.json", "{"),
        f"{RAW}/manifest.json",
    ),
    Case(
        "raw_corpus_changed_size",
        "tokenize",
        "tokenize",
        write(f"{RAW}/corpus.txt", "short\n"),
        f"{RAW}/corpus.txt",
    ),
    Case(
        "vocab_size_unreachable_warns",
        "tokenize",
        "tokenize",
        both(params_set("tokenizer.vocab_size", 70000), params_set("shards.val_fraction", 0.1)),
        "warning: tokenizer.vocab_size=70000 is more than this text supports",
        warning=True,
        rewrites=("data/tokenizer/", "data/shards/", "reports/tokenize/"),
    ),
    Case(
        "shard_manifest_without_splits",
        "tokenize",
        "pretrain",
        edit_json("data/shards/manifest.json", lambda m: m.pop("splits")),
        "data/shards/manifest.json",
    ),
    Case(
        "shard_manifest_not_json",
        "tokenize",
        "pretrain",
        write("data/shards/manifest.json", "[1"),
        "data/shards/manifest.json",
    ),
    Case(
        "shard_manifest_shard_without_sha256",
        "tokenize",
        "evaluate",
        edit_json("data/shards/manifest.json", lambda m: m["splits"]["val"]["shards"][0].pop("sha256")),
        "splits.val.shards[0].sha256",
    ),
    Case(
        "shard_truncated",
        "tokenize",
        "evaluate",
        write("data/shards/val_0000.bin", b"\x00\x01"),
        "data/shards/val_0000.bin",
    ),
    Case(
        "shard_garbled",
        "tokenize",
        "pretrain",
        zero_bytes("data/shards/train_0000.bin", 64),
        "data/shards/train_0000.bin",
    ),
    Case(
        "shard_missing",
        "tokenize",
        "evaluate",
        remove("data/shards/val_0000.bin"),
        "data/shards/val_0000.bin",
    ),
    Case("tokenizer_missing", "tokenize", "pretrain", remove("data/tokenizer"), "data/tokenizer"),
    Case(
        "tokenizer_metadata_not_json",
        "tokenize",
        "sft",
        write("data/tokenizer/metadata.json", "{"),
        "data/tokenizer",
    ),
    Case(
        "shards_of_another_tokenizer",
        "tokenize",
        "evaluate",
        edit_json("data/shards/manifest.json", lambda m: m.update(tokenizer_fingerprint="0" * 64)),
        "data/shards/manifest.json",
    ),
    # -- models / checkpoints ------------------------------------------------------------------------------------
    Case(
        "base_weights_400kB_zeroed", "models", "evaluate", zero_bytes(BASE + WEIGHTS, 400_000), BASE + WEIGHTS
    ),
    Case(
        "base_config_tokenizer_is_a_string",
        "models",
        "evaluate",
        edit_json(BASE + CONFIG, lambda c: c.update(tokenizer="data/tokenizer")),
        BASE + CONFIG,
    ),
    Case(
        "base_config_float_n_embd",
        "models",
        "evaluate",
        edit_json(BASE + CONFIG, lambda c: c["model"].update(n_embd=64.0)),
        "model.n_embd must be an integer",
    ),
    Case("base_missing", "models", "evaluate", remove("models/base"), BASE + CONFIG),
    Case("base_weights_truncated", "models", "sft", write(BASE + WEIGHTS, b"\x08\x00"), BASE + WEIGHTS),
    Case("base_config_not_json", "models", "sft", write(BASE + CONFIG, "{"), BASE + CONFIG),
    Case(
        "base_config_unknown_field",
        "models",
        "sft",
        edit_json(BASE + CONFIG, lambda c: c["model"].update(n_experts=8)),
        "n_experts",
    ),
    Case(
        "sft_weights_sha256_not_recorded",
        "models",
        "dpo",
        edit_json(SFT + CONFIG, lambda c: c.pop("sha256")),
        "no sha256 recorded",
    ),
    Case("sft_weights_garbled", "models", "dpo", zero_bytes(SFT + WEIGHTS, 4096), SFT + WEIGHTS),
    Case(
        "sft_weights_of_another_shape",
        "models",
        "dpo",
        edit_json(SFT + CONFIG, lambda c: c["model"].update(n_layer=3)),
        SFT + WEIGHTS,
    ),
    Case(
        "base_trained_with_another_tokenizer",
        "models",
        "sft",
        edit_json(BASE + CONFIG, lambda c: c["tokenizer"].update(fingerprint="0" * 64)),
        BASE + CONFIG,
    ),
    Case(
        "only_corrupt_checkpoints",
        "models",
        "pretrain",
        lambda root: [
            (p / "state.json").write_text("{") for p in (root / "checkpoints/pretrain").glob("step_*")
        ],
        "checkpoints/pretrain",
    ),
    Case(
        "interrupted_checkpoint_write_is_removed",
        "models",
        "pretrain",
        write("checkpoints/pretrain/.step_00000009.abc123/step_00000009/trainer.pt", b"half"),
        "removed 1 temp entry of an interrupted checkpoint write",
        warning=True,
        rewrites=("checkpoints/pretrain/.step_00000009.abc123/", "models/base/", "reports/pretrain/"),
    ),
    # -- sft / dpo data ------------------------------------------------------------------------------------------
    Case("sft_raw_not_json", "sft/dpo data", "sft", write(f"{RAW}/sft.json", "[{"), f"{RAW}/sft.json"),
    Case("sft_raw_missing", "sft/dpo data", "sft", remove(f"{RAW}/sft.json"), f"{RAW}/sft.json"),
    Case(
        "sft_raw_not_a_list",
        "sft/dpo data",
        "sft",
        write(f"{RAW}/sft.json", json.dumps({"a": 1})),
        f"{RAW}/sft.json",
    ),
    Case(
        "sft_raw_every_record_malformed",
        "sft/dpo data",
        "sft",
        write(f"{RAW}/sft.json", json.dumps([{"prompt": "x"}] * 20)),
        f"{RAW}/sft.json",
    ),
    Case(
        "sft_strict_record_without_output",
        "sft/dpo data",
        "sft",
        both(
            write(f"{RAW}/sft.json", json.dumps([_sft_record()] * 30 + [{"instruction": "x", "input": ""}])),
            params_set("sft.strict", True),
        ),
        f"{RAW}/sft.json",
    ),
    Case(
        "sft_strict_instruction_not_a_string",
        "sft/dpo data",
        "sft",
        both(
            write(f"{RAW}/sft.json", json.dumps([_sft_record()] * 30 + [_sft_record(instruction=5)])),
            params_set("sft.strict", True),
        ),
        f"{RAW}/sft.json",
    ),
    Case(
        "sft_too_few_records_to_split",
        "sft/dpo data",
        "sft",
        write(f"{RAW}/sft.json", json.dumps([_sft_record()])),
        f"{RAW}/sft.json",
    ),
    Case("dpo_raw_not_json", "sft/dpo data", "dpo", write(f"{RAW}/dpo.json", "nope"), f"{RAW}/dpo.json"),
    Case(
        "dpo_strict_pair_without_rejected",
        "sft/dpo data",
        "dpo",
        both(edit_json(f"{RAW}/dpo.json", lambda d: d[0].pop("rejected")), params_set("dpo.strict", True)),
        f"{RAW}/dpo.json",
    ),
    Case(
        "dpo_every_pair_malformed",
        "sft/dpo data",
        "dpo",
        write(f"{RAW}/dpo.json", json.dumps([{"instruction": "x"}] * 20)),
        f"{RAW}/dpo.json",
    ),
    Case(
        "sft_data_changed_since_sft",
        "sft/dpo data",
        "dpo",
        edit_json(f"{RAW}/sft.json", lambda d: d.append(_sft_record())),
        f"{RAW}/sft.json",
    ),
    Case(
        "sft_model_without_recipe",
        "sft/dpo data",
        "dpo",
        edit_json(SFT + CONFIG, lambda c: c.pop("instructions")),
        "no 'instructions' record",
    ),
    Case(
        "sft_recipe_field_missing",
        "sft/dpo data",
        "dpo",
        edit_json(SFT + CONFIG, lambda c: c["instructions"].pop("split_seed")),
        "instructions.split_seed",
    ),
    # -- judge / export ------------------------------------------------------------------------------------------
    Case(
        "judge_responses_missing",
        "judge/export",
        "judge",
        remove("reports/dpo/responses.jsonl"),
        "reports/dpo/responses.jsonl",
    ),
    Case(
        "judge_responses_line_not_json",
        "judge/export",
        "judge",
        write("reports/sft/responses.jsonl", "{\n"),
        "reports/sft/responses.jsonl",
    ),
    Case(
        "judge_responses_field_wrong_type",
        "judge/export",
        "judge",
        lambda root: (root / "reports/sft/responses.jsonl").write_text(
            "\n".join(
                json.dumps({**json.loads(line), "response": 5})
                for line in (root / "reports/sft/responses.jsonl").read_text().splitlines()
            )
            + "\n"
        ),
        "reports/sft/responses.jsonl",
    ),
    Case(
        "judge_responses_ids_differ",
        "judge/export",
        "judge",
        lambda root: (root / "reports/dpo/responses.jsonl").write_text(
            "\n".join((root / "reports/dpo/responses.jsonl").read_text().splitlines()[1:]) + "\n"
        ),
        "reports/dpo/responses.jsonl",
    ),
    Case(
        "judge_unreachable_and_fail",
        "judge/export",
        "judge",
        params_set("judge.on_unavailable", "fail"),
        "127.0.0.1:9",
    ),
    Case(
        "judge_template_unknown_placeholder",
        "judge/export",
        "judge",
        params_set("judge.prompt_template", "Score {answer}: {response}"),
        "judge.prompt_template",
    ),
    Case(
        "judge_template_without_response",
        "judge/export",
        "judge",
        params_set("judge.prompt_template", "Score {prompt}"),
        "judge.prompt_template must contain {response}",
    ),
    Case(
        "judge_pairwise_template_broken",
        "judge/export",
        "judge",
        params_set("judge.pairwise_template", "{response_1"),
        "judge.pairwise_template",
    ),
    Case(
        "export_model_missing",
        "judge/export",
        "export",
        both(remove("models/dpo"), params_set("export.model", "dpo")),
        DPO + CONFIG,
    ),
    Case("export_weights_garbled", "judge/export", "export", zero_bytes(DPO + WEIGHTS, 4096), DPO + WEIGHTS),
    Case(
        "export_opset_below_exporter",
        "judge/export",
        "export",
        params_set("export.opset", 17),
        "export.opset",
    ),
    Case(
        "export_opset_above_runtime",
        "judge/export",
        "export",
        params_set("export.opset", 99),
        "export.opset=99",
    ),
    Case(
        "export_tokenizer_changed",
        "judge/export",
        "export",
        edit_json(DPO + CONFIG, lambda c: c["tokenizer"].update(fingerprint="1" * 64)),
        DPO + CONFIG,
    ),
    Case("export_shards_missing", "judge/export", "export", remove("data/shards"), "data/shards"),
    Case(
        "export_int8_agreement_out_of_range",
        "judge/export",
        "export",
        params_set("export.int8_min_agreement", 2),
        "export.int8_min_agreement",
    ),
    # -- serve (the command line; the HTTP API's cases are in tests/test_serve_client_errors.py) ------------------
    Case(
        "serve_port_too_large",
        "serve",
        "serve",
        lambda root: None,
        "--port must be in 1-65535, got 99999",
        args=("--port", "99999"),
    ),
    Case(
        "serve_port_zero",
        "serve",
        "serve",
        lambda root: None,
        "--port must be in 1-65535, got 0",
        args=("--port", "0"),
    ),
    Case(
        "serve_port_negative",
        "serve",
        "serve",
        lambda root: None,
        "--port must be in 1-65535",
        args=("--port", "-5"),
    ),
    Case(
        "serve_model_dir_missing",
        "serve",
        "serve",
        lambda root: None,
        "nowhere: model directory not found",
        args=("--models", "x=nowhere"),
    ),
    Case(
        "serve_model_name_with_space",
        "serve",
        "serve",
        lambda root: None,
        "a model name must be non-empty",
        args=("--models", "a b=models/sft"),
    ),
    Case(
        "serve_concurrency_zero",
        "serve",
        "serve",
        lambda root: None,
        "--concurrency must be >= 1",
        args=("--concurrency", "0"),
    ),
    Case(
        "serve_max_queue_negative",
        "serve",
        "serve",
        lambda root: None,
        "--max-queue >= 0",
        args=("--max-queue", "-1"),
    ),
    Case(
        "serve_weights_garbled",
        "serve",
        "serve",
        zero_bytes(SFT + WEIGHTS, 4096),
        SFT + WEIGHTS,
        args=("--models", "sft"),
    ),
    Case(
        "serve_config_tokenizer_is_a_string",
        "serve",
        "serve",
        edit_json(SFT + CONFIG, lambda c: c.update(tokenizer="data/tokenizer")),
        SFT + CONFIG,
        args=("--models", "sft"),
    ),
    Case(
        "serve_no_models_at_all",
        "serve",
        "serve",
        both(remove("models/base"), remove("models/sft"), remove("models/dpo")),
        "models/: no model directories to serve",
    ),
    Case(
        "serve_onnx_dir_without_config",
        "serve",
        "serve",
        write("models/onnx/model.onnx", b"\x08\x01"),
        "models/onnx/config.json",
        args=("--models", "onnx"),
    ),
]


def run_case(case: Case, root: Path, port: int, capsys) -> tuple[int, str]:
    """Run the stage (or the serve command) in ``root``, in this process; (exit code, stderr)."""
    cwd = os.getcwd()
    os.chdir(root)
    try:
        if case.stage == "serve":
            argv = (
                ["serve", "--port", str(port), *case.args]
                if "--port" not in case.args
                else ["serve", *case.args]
            )
            code = cli_main(argv)
        else:
            module = importlib.import_module(f"stages.{case.stage}")
            try:
                module.main()
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
    finally:
        os.chdir(cwd)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("case", CASES, ids=[f"{c.category.split('/')[0]}-{c.name}" for c in CASES])
def test_bad_input(case: Case, prepared: Path, busy_port: int, tmp_path: Path, capsys, caplog):
    root = tmp_path / "project"
    shutil.copytree(prepared, root, symlinks=True)
    case.edit(root)
    before = snapshot(root)
    code, err = run_case(case, root, busy_port, capsys)
    after = snapshot(root)
    if case.warning:  # printed, or logged (a stage's log warnings reach stderr through logging's last resort)
        assert code == 0, err
        assert [line for line in err.splitlines() + caplog.messages if case.expect in line], err
        changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
        assert [k for k in changed if not k.startswith(case.rewrites)] == [], (
            "changed outside the stage's outputs"
        )
        assert not [
            p
            for p in after
            if Path(p).name.startswith(".")
            and Path(p).name not in (".gitignore", ".dvcignore")
            and p not in before
        ], "temp files left behind"
    else:
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 1, err[-3000:]
        assert len(errors) == 1 and err.rstrip("\n").splitlines()[-1] == errors[0], err[-3000:]
        assert case.expect in errors[0], errors[0]
        assert before == after, (
            f"changed: {sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))}"
        )


def test_every_category_has_at_least_eight_cases():
    counts: dict[str, int] = {}
    for case in CASES:
        counts[case.category] = counts.get(case.category, 0) + 1
    print("bad-input cases per category:", counts, "total", len(CASES))
    assert set(counts) == {
        "download",
        "params",
        "tokenize",
        "models",
        "sft/dpo data",
        "judge/export",
        "serve",
    }
    assert all(n >= 8 for n in counts.values()) and len(CASES) >= 90, counts
    assert len({c.name for c in CASES}) == len(CASES)


STORAGE_FULL = (
    'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
)


@pytest.mark.parametrize("write", ["checkpoint", "model"])
def test_sft_on_a_full_disk_is_one_line_naming_the_file(write, prepared, tmp_path, capsys, monkeypatch):
    """The disk fills while sft writes a training checkpoint or the final model: safetensors' own error (injected
    at its lowest call, serialize_file) becomes one line naming the file, and nothing partial is left."""
    import safetensors.torch
    from safetensors import SafetensorError

    root = tmp_path / "project"
    shutil.copytree(prepared, root, symlinks=True)
    if write == "checkpoint":  # no checkpoint to resume from: training writes one at step 2
        shutil.rmtree(root / "checkpoints/sft")
    real = safetensors.torch.serialize_file

    def full(tensors, filename, *args, **kwargs):
        if ("checkpoints" in str(filename)) == (write == "checkpoint"):
            raise SafetensorError(STORAGE_FULL)
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "serialize_file", full)
    before = snapshot(root)
    code, err = run_case(Case("sft_disk_full", "models", "sft", lambda root: None, ""), root, 0, capsys)
    assert code == 1, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and err.rstrip("\n").splitlines()[-1] == errors[0], err[-3000:]
    where = "checkpoints/sft/step_00000002/model/" if write == "checkpoint" else "models/sft/"
    assert errors[0] == (
        f"error: {where}model.safetensors: no space left on device (errno 28: free some space, then rerun)"
    )
    after = snapshot(root)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    # only the live training logs (reports/sft/, rewritten as any run trains) and the checkpoint directory, empty
    assert [k for k in changed if not k.startswith("reports/sft/") and k != "checkpoints/sft/"] == [], changed
    assert not [
        k for k in after if k.startswith("checkpoints/sft/") and k not in before and k != "checkpoints/sft/"
    ]
    assert not [k for k in after if Path(k).name.startswith(".") and k not in before], (
        "temp files left behind"
    )


def test_checkpoint_trainer_state_on_a_full_disk_names_the_file(tmp_path, monkeypatch, capsys):
    """The disk fills halfway through trainer.pt (OSError 28 at the file's write): one line naming it, no
    checkpoint directory and no temp entry left."""
    import errno
    import io

    import torch

    from pipeline.common.errors import exit_on_error
    from pipeline.train import resume
    from tests.helpers.train_worker import tiny_model

    real_save = torch.save

    class FillsUp(io.RawIOBase):
        def __init__(self, out):
            self.out, self.room = out, 4096

        def writable(self):
            return True

        def write(self, data):
            if len(data) > self.room:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.room -= len(data)
            return self.out.write(data)

    monkeypatch.setattr(torch, "save", lambda obj, f, *a, **k: real_save(obj, FillsUp(f), *a, **k))
    monkeypatch.chdir(tmp_path)
    save = exit_on_error(resume.save_checkpoint)
    with pytest.raises(SystemExit) as info:
        save(Path("checkpoints"), 2, tiny_model(), {"x": torch.zeros(100_000)}, {"run_key": "k"})
    assert info.value.code == 1
    assert capsys.readouterr().err == (
        "error: checkpoints/step_00000002/trainer.pt: no space left on device "
        "(errno 28: free some space, then rerun)\n"
    )
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == []


def test_safetensors_full_disk_is_an_oserror_naming_the_file_and_other_errors_pass(tmp_path, monkeypatch):
    """save_tensors (every weight write: model directories, checkpoints, the Hugging Face export) turns
    safetensors' disk-full error into errno 28 naming the file; any other safetensors error is left as it is."""
    import errno

    import safetensors.torch
    import torch
    from safetensors import SafetensorError

    from pipeline.model.checkpoint import save_tensors

    message = {"full": STORAGE_FULL, "other": "Error while serializing: something else"}

    def failing(kind):
        def serialize_file(*args, **kwargs):
            raise SafetensorError(message[kind])

        return serialize_file

    monkeypatch.setattr(safetensors.torch, "serialize_file", failing("full"))
    with pytest.raises(OSError) as info:
        save_tensors({"w": torch.zeros(2)}, tmp_path / "w.safetensors", metadata={"format": "pt"})
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(tmp_path / "w.safetensors")
    monkeypatch.setattr(safetensors.torch, "serialize_file", failing("other"))
    with pytest.raises(SafetensorError, match="something else"):
        save_tensors({"w": torch.zeros(2)}, tmp_path / "w.safetensors")
