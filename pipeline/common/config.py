"""params.yaml → frozen, validated dataclasses: one place that checks every key and names the bad one.

Each section of params.yaml maps to one dataclass below. Unknown keys, wrong types and out-of-range
values raise ``ConfigError("params.yaml: pretrain.lr must be > 0, got -1")``: a field's range is a rule in its
metadata, checked as the value is parsed. Stages load params first, so a bad value stops them before any work or
deletion. tests/test_params_validation.py enumerates every field and requires an invalid example for each.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.common.errors import PipelineError, one_line

DEFAULT_CACHE = Path("~/.cache/llm-pipeline")
CACHE_ENV = "LLM_PIPELINE_CACHE"


def resolve_cache_dir(configured: str | None = None) -> Path:
    """Where downloads and per-machine measurements are kept: ``data.cache_dir`` if set, else
    $LLM_PIPELINE_CACHE, else ~/.cache/llm-pipeline."""
    chosen = configured or os.environ.get(CACHE_ENV) or DEFAULT_CACHE
    return Path(chosen).expanduser()


class ConfigError(PipelineError):
    pass


# ------------------------------------------------------------------------------------------- value rules
# A field's rule lives in its metadata: ``rule(default, check, "what it must be")``. `_build` applies it to every
# value params.yaml gives (after the type check), so a new field states its range where it is declared.

Check = typing.Callable[[Any], bool]
SEED_LIMIT = 2**32  # numpy's and torch's generators both accept [0, 2**32)
_HOST_PORT = re.compile(r"^[A-Za-z0-9.\-\[\]:]*[A-Za-z0-9\]]:(\d{1,5})$")
_URL = re.compile(r"^https?://[^\s/:]+(:(\d{1,5}))?/?$")
_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def rule(default: Any, check: Check, must: str) -> Any:
    """A field with a default and a value rule, checked on every non-null value params.yaml gives."""
    return field(default=default, metadata={"check": check, "must": must})


def _port_ok(text: str) -> bool:
    return 1 <= int(text) <= 65535


def _positive(default: Any) -> Any:
    return rule(default, lambda v: v > 0, "> 0")


def _non_negative(default: Any) -> Any:
    return rule(default, lambda v: v >= 0, ">= 0")


def _at_least_one(default: Any) -> Any:
    return rule(default, lambda v: v >= 1, ">= 1")


def _open_fraction(default: float) -> Any:
    return rule(default, lambda v: 0 < v < 1, "in (0, 1)")


def _closed_fraction(default: float) -> Any:
    return rule(default, lambda v: 0 <= v <= 1, "in [0, 1]")


def _half_open_fraction(default: float) -> Any:
    return rule(default, lambda v: 0 <= v < 1, "in [0, 1)")


def _seed(default: int) -> Any:
    return rule(default, lambda v: 0 <= v < SEED_LIMIT, "in [0, 2**32)")


def _top_k(default: int | None) -> Any:
    return rule(default, lambda v: v >= 1, ">= 1 or null")


def _repeat_penalty(default: float) -> Any:
    return rule(default, lambda v: 0 < v < math.inf, "a positive number (1: no penalty)")


def _repeat_last_n(default: int) -> Any:
    return rule(default, lambda v: v >= -1, ">= -1 (0: no penalty, -1: the whole context)")


def _non_empty(default: Any) -> Any:
    return rule(default, lambda v: v.strip() != "", "a non-empty string")


@dataclass(frozen=True)
class Source:
    """A URL, local file or directory; ``sha256`` is verified when given (required to hit the cache offline)."""

    location: str
    sha256: str | None = None


@dataclass(frozen=True)
class CorpusSource(Source):
    """A corpus source: a text file (one document), or dataset records (one document each) read by pipeline/datasets.

    ``location`` may also be a glob or ``hf://datasets/<owner>/<name>/<path>`` (with ``revision``).
    """

    format: Literal["text", "jsonl", "json", "csv", "tsv", "parquet"] | None = (
        None  # None → from the file name
    )
    text_field: str = _non_empty("text")
    member: str | None = None  # the file inside a .zip
    revision: str | None = None  # hf:// sources: the commit to read (required)
    where: tuple[tuple[str, Any], ...] = ()  # keep records whose fields equal these values
    min_chars: int = _non_negative(0)  # keep records whose text has at least this many characters
    bad_records: Literal["error", "skip"] = (
        "error"  # a record without a string text field: stop, or skip and count
    )


@dataclass(frozen=True)
class DataParams:
    cache_dir: str | None = _non_empty(None)  # None → $LLM_PIPELINE_CACHE or ~/.cache/llm-pipeline
    timeout_s: float = _positive(30.0)
    retries: int = _non_negative(3)


@dataclass(frozen=True)
class CorpusParams:
    sources: tuple[CorpusSource, ...] = rule((), lambda v: len(v) > 0, "at least one source")
    strip_gutenberg: bool = True
    normalize: bool = True  # BOM, CRLF → LF, Unicode NFC
    unwrap: bool | Literal["gutenberg"] = (
        "gutenberg"  # join hard-wrapped lines of text files: all, none, or Gutenberg books
    )


@dataclass(frozen=True)
class TokenizerParams:
    kind: Literal["bpe", "gpt2", "char", "hf"] = "bpe"
    # hf: a model's own tokenizer.json — a directory (or the file) holding it, or a Hub repo id (owner/name)
    source: str | None = _non_empty(None)
    revision: str | None = _non_empty(None)  # hf from the Hub: commit, branch or tag (None → main)
    vocab_size: int = rule(
        4096, lambda v: 256 + 16 <= v <= 2**31 - 1, "in [272, 2**31) (256 bytes + special tokens)"
    )
    include_instruction_text: bool = True  # train the BPE on the SFT/DPO text too (the corpus may be Spanish)
    # train on a seeded sample of this many bytes of the train split; None → all of it
    train_bytes: int | None = rule(None, lambda v: v >= 1 << 20, ">= 1048576 (1 MiB) or null")
    seed: int = _seed(1337)  # which sample

    def __post_init__(self) -> None:
        if (self.kind == "hf") != (self.source is not None):
            raise ConfigError(
                "tokenizer.source names the tokenizer.json of tokenizer.kind: hf, and only of it "
                f"(kind {self.kind}, source {self.source!r})"
            )


@dataclass(frozen=True)
class ShardsParams:
    val_fraction: float = _open_fraction(0.1)
    shard_tokens: int = _positive(10_000_000)
    batch_bytes: int = _positive(4_000_000)


@dataclass(frozen=True)
class ModelParams:
    preset: str = _non_empty("cpu-small")  # ignored with init_from: the shape is then the checkpoint's
    # scratch | gpt2 | gpt2-medium | gpt2-large | gpt2-xl | a Hub repo id (owner/name) | a local checkpoint (dir or
    # file) of GPT-2 or the Llama family (Llama, Qwen2, Qwen3)
    init_from: str = rule("scratch", lambda v: bool(v.strip()), "scratch, a GPT-2 name, a repo id or a path")
    revision: str | None = _non_empty(
        None
    )  # Hub revision (commit, branch or tag); None → the commit pinned in model/gpt2_weights.py
    init: Literal["gpt2", "pytorch"] = (
        "gpt2"  # from scratch: GPT-2's N(0, 0.02) or each layer's PyTorch default (the book's)
    )
    context_length: int | None = _positive(None)
    n_embd: int | None = _positive(None)
    n_head: int | None = _positive(None)
    n_layer: int | None = _positive(None)
    dropout: float | None = _half_open_fraction(None)
    qkv_bias: bool | None = None
    tie_weights: bool | None = None
    # Architecture options beyond GPT-2 (docs/training.md, "Architecture options"); None → the preset's (GPT-2's)
    pos_emb: Literal["learned", "rope"] | None = None
    rope_base: float | None = _positive(None)
    norm: Literal["layernorm", "rmsnorm"] | None = None
    mlp: Literal["gelu", "relu2", "swiglu"] | None = None
    qk_norm: bool | None = None
    # The Llama family's shape (docs/training.md): key/value heads, head width, MLP width, biases, norm epsilon
    n_kv_head: int | None = _positive(None)
    head_size: int | None = _positive(None)
    hidden_dim: int | None = _positive(None)
    bias: bool | None = None
    norm_eps: float | None = _positive(None)

    def __post_init__(self) -> None:
        if (
            self.head_size is None
            and self.n_embd is not None
            and self.n_head is not None
            and self.n_embd % self.n_head
        ):
            raise ConfigError(f"model.n_head={self.n_head} must divide model.n_embd={self.n_embd}")


@dataclass(frozen=True)
class LoRAParams:
    """Low-rank adapters (pipeline/model/lora.py); ``rank: 0`` trains the weights themselves."""

    rank: int = rule(0, lambda v: v >= 0, ">= 0 (0 turns LoRA off)")
    alpha: float = _positive(16.0)  # the update is scaled by alpha / rank
    dropout: float = _half_open_fraction(0.0)  # on the adapter's input only
    # attention | mlp | head, or a layer name such as att.qkv
    targets: tuple[str, ...] = rule(
        ("attention", "mlp"),
        lambda v: len(v) > 0 and all(t.strip() for t in v),
        "a non-empty list of non-empty names",
    )
    merge: bool = True  # false: the model directory holds the adapter and a pointer to its base


@dataclass(frozen=True)
class TrainParams:
    """What the one training loop needs, whichever objective it serves."""

    batch_size: int = _positive(16)
    grad_accum: int = _positive(1)
    max_steps: int = _non_negative(1000)
    lr: float = _positive(1e-3)
    min_lr_ratio: float = _closed_fraction(0.1)
    warmup_steps: int = _non_negative(50)
    weight_decay: float = _non_negative(0.1)
    beta1: float = _half_open_fraction(0.9)
    beta2: float = _half_open_fraction(0.95)
    grad_clip: float = rule(1.0, lambda v: v >= 0, ">= 0 (0 disables clipping)")
    dtype: Literal["auto", "fp32", "bf16"] = "auto"
    # adamw (the book's) | muon: Muon for the blocks' matrices, AdamW for embeddings, head, norms (pipeline/train/optim.py)
    optimizer: Literal["adamw", "muon"] = "adamw"
    compile: bool = False
    device: str = rule("auto", lambda v: bool(_DEVICE.match(v)), "auto, cpu, mps, cuda or cuda:N")
    eval_every: int = _positive(100)
    eval_batches: int = _positive(20)
    checkpoint_every: int = _positive(100)
    keep_checkpoints: int = _at_least_one(2)
    log_every: int = _positive(10)
    # the model a run returns: the last step's, or the evaluated step's with the lowest val loss / highest val accuracy
    keep: Literal["last", "best_loss", "best_accuracy"] = "last"
    seed: int = _seed(1337)
    # DDP: >1 re-launches the stage under torchrun (rdzv_endpoint = host:port of the rendezvous when nnodes > 1).
    nproc_per_node: int = _at_least_one(1)
    nnodes: int = _at_least_one(1)
    rdzv_endpoint: str | None = rule(
        None,
        lambda v: bool((m := _HOST_PORT.match(v)) and _port_ok(m.group(1))),
        "host:port with a port in 1-65535, or null",
    )
    # ddp: every process holds the whole model | fsdp: FSDP2 shards weights, gradients and optimizer state
    parallel: Literal["ddp", "fsdp"] = "ddp"
    # torchrun's elastic restarts after a worker dies (the restarted group resumes its newest checkpoint)
    max_restarts: int = _non_negative(0)
    rdzv_timeout: int = _positive(600)  # seconds to wait for every node at the rendezvous (nnodes > 1)
    lora: LoRAParams = field(default_factory=LoRAParams)

    def check_fields(self, where: str) -> None:
        """Rules across fields, naming the section they sit in (``_build`` calls it)."""
        if self.optimizer == "muon" and self.parallel == "fsdp":  # Newton–Schulz needs whole matrices
            raise ConfigError(
                f"{where}.optimizer: muon cannot run with {where}.parallel: fsdp (Muon orthogonalises whole "
                "matrices, FSDP holds shards of them); use optimizer: adamw or parallel: ddp"
            )
        if self.keep != "last" and self.parallel == "fsdp":  # the kept copy would be each rank's shards
            raise ConfigError(
                f"{where}.keep: {self.keep} cannot run with {where}.parallel: fsdp (the best step's copy of the "
                "weights is kept whole, FSDP holds shards); use keep: last or parallel: ddp"
            )


@dataclass(frozen=True)
class PretrainParams(TrainParams):
    context_length: int | None = _positive(
        None
    )  # training window; None → the model's context_length (its position table)
    # random: windows at any offset, drawn afresh each step | epochs: the book's loader (windows every `stride`
    # tokens, shuffled each epoch, the last partial batch dropped)
    sampling: Literal["random", "epochs"] = "random"
    stride: int | None = _positive(
        None
    )  # epochs: distance between window starts; None → the context (non-overlapping)
    epochs: int | None = _positive(
        None
    )  # epochs: train this many epochs (replaces max_steps); None → max_steps
    # mid-training: the last mid_steps steps train on the SFT training split in its template (never held-out items)
    mid_steps: int = _non_negative(0)

    def __post_init__(self) -> None:
        if self.epochs is None and self.mid_steps > self.max_steps:
            raise ConfigError(
                f"pretrain.mid_steps ({self.mid_steps}) must be at most pretrain.max_steps ({self.max_steps})"
            )
        if self.sampling == "random" and (self.stride is not None or self.epochs is not None):
            raise ConfigError("pretrain.stride and pretrain.epochs need pretrain.sampling: epochs")
        # LoRA adapts a trained model; pretraining trains every weight (from scratch or from model.init_from).
        if self.lora.rank != 0:
            raise ConfigError(
                f"pretrain.lora.rank must be 0: LoRA needs trained weights to adapt (fine-tune them in the "
                f"sft stage), got {self.lora.rank}"
            )


def _prompts_ok(prompts: tuple[str, ...]) -> bool:
    return all(p.strip() for p in prompts)


@dataclass(frozen=True)
class EvaluateParams:
    batches: int = _positive(50)
    batch_size: int = _positive(16)
    prompts: tuple[str, ...] = rule((), _prompts_ok, "a list of non-empty strings")
    max_new_tokens: int = _non_negative(80)
    temperature: float = _non_negative(0.8)
    top_k: int | None = _top_k(40)
    seed: int = _seed(1337)
    dtype: Literal["auto", "fp32", "bf16"] = "auto"  # as pretrain.dtype: bf16 autocast where it is faster


@dataclass(frozen=True)
class AnsweringParams(TrainParams):
    """What SFT and DPO share: how the tuned model answers the held-out instructions after training."""

    max_new_tokens: int = _positive(96)
    temperature: float = _non_negative(0.0)  # held-out responses: 0 → greedy, else sampled with `seed`
    top_k: int | None = _top_k(None)
    repeat_penalty: float = _repeat_penalty(1.0)  # llama.cpp's, over the last repeat_last_n tokens
    repeat_last_n: int = _repeat_last_n(64)


@dataclass(frozen=True)
class SFTParams(AnsweringParams):
    data: Source = rule(Source(""), lambda v: v.location.strip() != "", "a URL, file or directory")
    template: Literal["alpaca", "chat", "native"] = "alpaca"  # native: the base's own chat template
    mask_prompt: bool = True
    strict: bool = False
    split_train: float = _open_fraction(0.85)
    split_val: float = _open_fraction(0.05)  # the test split (held-out responses) is what train and val leave
    split_seed: int = _seed(123)

    def __post_init__(self) -> None:
        if self.split_train + self.split_val >= 1:
            raise ConfigError(
                f"sft.split_train + sft.split_val must be < 1 (the rest is the test split), "
                f"got {self.split_train} + {self.split_val}"
            )


@dataclass(frozen=True)
class DPOParams(AnsweringParams):
    """Preference pairs whose prompt is in the SFT test split are left out; ``split_val`` of the rest validate."""

    data: Source = rule(Source(""), lambda v: v.location.strip() != "", "a URL, file or directory")
    beta: float = _positive(0.1)
    reduction: Literal["sum", "mean"] = "sum"
    strict: bool = False
    split_val: float = _open_fraction(0.05)
    split_seed: int = _seed(123)


@dataclass(frozen=True)
class ClassifyParams(TrainParams):
    """A classifier from a trained GPT (pipeline/train/classifier.py). ``data: null`` → the tone data built from the
    preference pairs (pipeline/data/labelled.py), whose pairs on SFT test prompts all go to the test split."""

    model: Literal["base", "sft", "dpo"] = "base"
    data: Source | None = rule(None, lambda v: v.location.strip() != "", "a URL, file or directory, or null")
    format: Literal["auto", "csv", "tsv", "json", "jsonl"] = "auto"
    member: str | None = _non_empty(None)  # the file inside a zip (needed when it holds several)
    columns: tuple[str, ...] = rule(
        (), lambda v: all(c.strip() for c in v), "a list of non-empty field names"
    )  # header-less CSV/TSV
    text_field: str = _non_empty("text")
    label_field: str = _non_empty("label")
    balance: bool = False  # undersample every class to the smallest
    split_train: float = _open_fraction(0.7)
    split_val: float = _open_fraction(0.1)  # the test split is what train and val leave
    split_seed: int = _seed(123)
    trainable: Literal["head", "last_block", "all", "lora"] = "last_block"

    def __post_init__(self) -> None:
        if self.split_train + self.split_val >= 1:
            raise ConfigError(
                f"classify.split_train + classify.split_val must be < 1 (the rest is the test split), "
                f"got {self.split_train} + {self.split_val}"
            )


@dataclass(frozen=True)
class JudgeParams:
    host: str | None = rule(  # None → $OLLAMA_HOST or http://127.0.0.1:11434
        None,
        lambda v: bool((m := _URL.match(v)) and (m.group(2) is None or _port_ok(m.group(2)))),
        "http(s)://host[:port] with a port in 1-65535, or null",
    )
    model: str = _non_empty("llama3.1:8b")
    style: Literal["score100", "rubric5"] = "score100"
    pairwise: bool = True
    temperature: float = _non_negative(0.0)
    seed: int = _seed(123)  # the judge's sampling seed, and the bootstrap's
    num_ctx: int = _positive(4096)
    timeout_s: float = _positive(120.0)
    retries: int = _non_negative(2)  # extra attempts after a connection error, timeout or 5xx
    backoff_s: float = _non_negative(0.5)  # wait before retry n: backoff_s * 2**n
    concurrency: int = _at_least_one(2)
    on_unavailable: Literal["fail", "fallback"] = "fallback"
    prompt_template: str | None = _non_empty(
        None
    )  # None → the style's prompt; placeholders in pipeline/evaluation/judge.py
    pairwise_template: str | None = _non_empty(None)
    bootstrap_samples: int = rule(1000, lambda v: v >= 100, ">= 100")


@dataclass(frozen=True)
class ExportParams:
    model: Literal["base", "sft", "dpo", "classifier"] = "dpo"  # classifier: class logits, parity of those
    opset: int = rule(23, lambda v: v >= 18, ">= 18")  # 23: ONNX Attention + Gelu ops; 18 for older runtimes
    quantize_int8: bool = True
    parity_atol: float = _positive(1e-4)  # max |logit(onnxruntime fp32) - logit(torch)|, else the stage fails
    parity_tokens: int = _positive(64)  # greedy tokens that must equal torch's, token for token
    int8_min_agreement: float = _closed_fraction(
        0.95
    )  # top-1 next-token agreement of int8 with fp32 over real text
    # gguf: llama.cpp / Ollama (pipeline/export/gguf.py); hf: transformers' GPT-2 layout (pipeline/export/hf.py)
    formats: tuple[Literal["onnx", "gguf", "hf"], ...] = ("onnx", "gguf", "hf")
    gguf_types: tuple[Literal["f32", "f16", "q8_0"], ...] = (
        "f16",
        "q8_0",
    )  # one file each; the Modelfile uses the first
    gguf_check_positions: int = _positive(2048)  # real validation positions of the llama.cpp agreement check
    gguf_check_timeout: float = _positive(
        900.0
    )  # seconds per file for llama.cpp's checks (its child is killed after)

    def __post_init__(self) -> None:
        for name in ("formats", "gguf_types"):
            value = getattr(self, name)
            if not value or len(set(value)) != len(value):
                raise ConfigError(
                    f"export.{name} must be a non-empty list without repeats, got {list(value)}"
                )


@dataclass(frozen=True)
class HubCopy:
    """A local copy of a Hugging Face Hub dataset repo (``huggingface-cli download --repo-type dataset``), used
    in its place by every harness task that reads it: offline machines and air-gapped clusters."""

    repo: str = field(default="", metadata={"check": lambda v: v.count("/") == 1, "must": "'owner/name'"})
    path: str = _non_empty("")

    def __post_init__(self) -> None:
        if not self.repo or not self.path:
            raise ConfigError(f"benchmark.hub_copies: each entry needs repo and path, got {self!r}")


_TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")


@dataclass(frozen=True)
class BenchmarkParams:
    # lm-evaluation-harness task names: the pipeline's two offline tasks (pipeline/evaluation/benchmark_tasks.py)
    # and any of the harness's own (hellaswag, arc_easy, lambada_openai_mt_es…: their data comes from the Hub).
    tasks: tuple[str, ...] = ("pipeline_cloze", "pipeline_preference")
    limit: int = _positive(60)  # items per task: CPU-sized; the stderr in the report says what it costs
    seed: int = _seed(1337)  # which held-out passages the cloze draws
    hub_copies: tuple[HubCopy, ...] = ()  # local copies of Hub datasets, used instead of downloading them

    def __post_init__(self) -> None:
        if not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise ConfigError(
                f"benchmark.tasks must be a non-empty list without repeats, got {list(self.tasks)}"
            )
        if bad := [t for t in self.tasks if not _TASK_NAME.fullmatch(t)]:
            raise ConfigError(f"benchmark.tasks: {bad[0]!r} is not a task name (letters, digits, _ . -)")
        repos = [copy.repo for copy in self.hub_copies]
        if len(set(repos)) != len(repos):
            raise ConfigError(f"benchmark.hub_copies names a repo twice: {repos}")


@dataclass(frozen=True)
class Params:
    seed: int = _seed(1337)
    data: DataParams = field(default_factory=DataParams)
    corpus: CorpusParams = field(default_factory=CorpusParams)
    tokenizer: TokenizerParams = field(default_factory=TokenizerParams)
    shards: ShardsParams = field(default_factory=ShardsParams)
    model: ModelParams = field(default_factory=ModelParams)
    pretrain: PretrainParams = field(default_factory=PretrainParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    sft: SFTParams = field(default_factory=SFTParams)
    dpo: DPOParams = field(default_factory=DPOParams)
    classify: ClassifyParams = field(default_factory=ClassifyParams)
    judge: JudgeParams = field(default_factory=JudgeParams)
    export: ExportParams = field(default_factory=ExportParams)
    benchmark: BenchmarkParams = field(default_factory=BenchmarkParams)


def _source(value: Any, where: str) -> Source:
    if isinstance(value, str) and value.strip():
        return Source(value)
    if isinstance(value, dict):
        unknown = set(value) - {"url", "path", "sha256"}
        location = value.get("url", value.get("path"))
        if unknown or not isinstance(location, str) or not location.strip():
            raise ConfigError(
                f"{where} must be a string or a mapping {{url: ..., sha256: ...}}, got {value!r}"
            )
        sha = value.get("sha256")
        if sha is not None and not (isinstance(sha, str) and _SHA256.match(sha)):
            raise ConfigError(f"{where}.sha256 must be 64 hex characters, got {sha!r}")
        return Source(location, sha.lower() if sha else None)
    raise ConfigError(f"{where} must be a string or a mapping {{url: ..., sha256: ...}}, got {value!r}")


_SOURCE_KEYS = {"url", "path", "sha256"}


def _corpus_source(value: Any, where: str) -> CorpusSource:
    if not isinstance(value, dict):
        return CorpusSource(_source(value, where).location)
    known = _SOURCE_KEYS | {f.name for f in dataclasses.fields(CorpusSource)} - {"location"}
    if unknown := sorted(set(value) - known):
        raise ConfigError(f"unknown key '{where}.{unknown[0]}' (known: {', '.join(sorted(known))})")
    base = _source({k: v for k, v in value.items() if k in _SOURCE_KEYS}, where)
    options = {k: v for k, v in value.items() if k not in _SOURCE_KEYS}
    where_rows = options.pop("where", None) or {}
    if not isinstance(where_rows, dict) or not all(
        isinstance(v, str | int | float | bool) for v in where_rows.values()
    ):
        raise ConfigError(f"{where}.where must map field names to values, got {where_rows!r}")
    built = _build(CorpusSource, {"location": base.location, "sha256": base.sha256} | options, where)
    built = dataclasses.replace(built, where=tuple((str(k), v) for k, v in where_rows.items()))
    if built.location.startswith("hf://") and not built.revision:
        raise ConfigError(f"{where}.revision is required for {built.location} (pin a commit of the dataset)")
    return built


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if hint is CorpusSource:
        return _corpus_source(value, where)
    if hint is Source:
        return _source(value, where)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0]
    if origin is Literal:
        if value not in typing.get_args(hint):
            choices = ", ".join(repr(c) for c in typing.get_args(hint))
            raise ConfigError(f"{where} must be one of {choices}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        item = typing.get_args(hint)[0]
        return tuple(_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ConfigError(f"{where} must be a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    raise TypeError(f"config.py cannot coerce type {hint!r} at {where}")


def _build(cls: type, data: Any, where: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'params'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"unknown key '{prefix}{unknown[0]}' (known: {', '.join(sorted(names))})")
    rules = {f.name: f.metadata for f in dataclasses.fields(cls) if "check" in f.metadata}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{where}.{key}" if where else key
        kwargs[key] = _coerce(value, hints[key], dotted)
        if key in rules and kwargs[key] is not None and not rules[key]["check"](kwargs[key]):
            raise ConfigError(f"{dotted} must be {rules[key]['must']}, got {value!r}")
    built = cls(**kwargs)
    if hasattr(built, "check_fields"):
        built.check_fields(where)
    return built


def parse_params(data: dict, origin: str = "params.yaml") -> Params:
    """Validate a params mapping; errors are prefixed with ``origin`` and name the dotted key."""
    try:
        params = _build(Params, data, "")
    except ConfigError as exc:
        raise ConfigError(f"{origin}: {exc}") from None
    return params


class DeclaredParams:
    """The sections of the params a stage declared (its dvc.yaml ``params``); reading another one is an error.

    So a stage cannot depend on a param that DVC does not know about (tests/test_dag.py checks the declarations
    against dvc.yaml).
    """

    def __init__(self, params: Params, sections: typing.Iterable[str]):
        self._params = params
        self._sections = frozenset(name.split(".")[0] for name in sections)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if name not in self._sections:
            raise ConfigError(
                f"this stage reads params '{name}' without declaring it (add it to the stage's PARAMS "
                "and to its params in dvc.yaml)"
            )
        return getattr(self._params, name)


def read_yaml(path: str | Path) -> Any:
    """The one YAML reader: a missing file or invalid YAML is a one-line error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({one_line(str(exc))})") from None


@typing.overload
def load_params(path: str | Path = ..., sections: None = None) -> Params: ...
@typing.overload
def load_params(path: str | Path = ..., *, sections: typing.Iterable[str]) -> DeclaredParams: ...


def load_params(
    path: str | Path = "params.yaml", sections: typing.Iterable[str] | None = None
) -> Params | DeclaredParams:
    """The validated params file; with ``sections``, a view that refuses to read any other section."""
    params = parse_params(read_yaml(path) or {}, str(path))
    return params if sections is None else DeclaredParams(params, sections)


def as_dict(obj: Any) -> Any:
    """A params dataclass as plain data (for metadata files and hashes)."""
    return dataclasses.asdict(obj)
