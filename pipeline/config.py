"""params.yaml → frozen, validated dataclasses: one place that checks every key and names the bad one.

Each section of params.yaml maps to one dataclass below. Unknown keys, wrong types and out-of-range
values raise ``ConfigError("params.yaml: pretrain.lr must be > 0, got -1")``.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.errors import PipelineError, one_line

DEFAULT_CACHE = Path("~/.cache/llm-pipeline")
CACHE_ENV = "LLM_PIPELINE_CACHE"


def resolve_cache_dir(configured: str | None = None) -> Path:
    """Where downloads and per-machine measurements are kept: ``data.cache_dir`` if set, else
    $LLM_PIPELINE_CACHE, else ~/.cache/llm-pipeline."""
    chosen = configured or os.environ.get(CACHE_ENV) or DEFAULT_CACHE
    return Path(chosen).expanduser()


class ConfigError(PipelineError):
    pass


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

    format: Literal["text", "jsonl", "json", "csv", "tsv", "parquet"] | None = None  # None → from the file name
    text_field: str = "text"
    member: str | None = None  # the file inside a .zip
    revision: str | None = None  # hf:// sources: the commit to read (required)
    where: tuple[tuple[str, Any], ...] = ()  # keep records whose fields equal these values
    min_chars: int = 0  # keep records whose text has at least this many characters
    bad_records: Literal["error", "skip"] = "error"  # a record without a string text field: stop, or skip and count


@dataclass(frozen=True)
class DataParams:
    cache_dir: str | None = None  # None → $LLM_PIPELINE_CACHE or ~/.cache/llm-pipeline
    timeout_s: float = 30.0
    retries: int = 3


@dataclass(frozen=True)
class CorpusParams:
    sources: tuple[CorpusSource, ...] = ()
    strip_gutenberg: bool = True
    normalize: bool = True  # BOM, CRLF → LF, Unicode NFC
    unwrap: bool | Literal["gutenberg"] = "gutenberg"  # join hard-wrapped lines of text files: all, none, or Gutenberg books


@dataclass(frozen=True)
class TokenizerParams:
    kind: Literal["bpe", "gpt2", "char"] = "bpe"
    vocab_size: int = 4096
    include_instruction_text: bool = True  # train the BPE on the SFT/DPO text too (the corpus may be Spanish)
    train_bytes: int | None = None  # train on a seeded sample of this many bytes of the train split; None → all of it
    seed: int = 1337  # which sample


@dataclass(frozen=True)
class ShardsParams:
    val_fraction: float = 0.1
    shard_tokens: int = 10_000_000
    batch_bytes: int = 4_000_000


@dataclass(frozen=True)
class ModelParams:
    preset: str = "cpu-small"  # ignored with init_from: the shape is then the checkpoint's
    # scratch | gpt2 | gpt2-medium | gpt2-large | gpt2-xl (the Hugging Face Hub) | a local GPT-2 checkpoint (dir or file)
    init_from: str = "scratch"
    revision: str | None = None  # Hub revision (commit, branch or tag); None → the commit pinned in pipeline/pretrained.py
    init: Literal["gpt2", "pytorch"] = "gpt2"  # from scratch: GPT-2's N(0, 0.02) or each layer's PyTorch default (the book's)
    context_length: int | None = None
    n_embd: int | None = None
    n_head: int | None = None
    n_layer: int | None = None
    dropout: float | None = None
    qkv_bias: bool | None = None
    tie_weights: bool | None = None


@dataclass(frozen=True)
class LoRAParams:
    """Low-rank adapters (pipeline/lora.py); ``rank: 0`` trains the weights themselves."""

    rank: int = 0
    alpha: float = 16.0  # the update is scaled by alpha / rank
    dropout: float = 0.0  # on the adapter's input only
    targets: tuple[str, ...] = ("attention", "mlp")  # attention | mlp | head, or a layer name such as att.qkv
    merge: bool = True  # false: the model directory holds the adapter and a pointer to its base


@dataclass(frozen=True)
class TrainParams:
    """What the one training loop needs, whichever objective it serves."""

    batch_size: int = 16
    grad_accum: int = 1
    max_steps: int = 1000
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    dtype: Literal["auto", "fp32", "bf16"] = "auto"
    compile: bool = False
    device: str = "auto"
    eval_every: int = 100
    eval_batches: int = 20
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 1337
    # DDP: >1 re-launches the stage under torchrun (rdzv_endpoint = host:port of the rendezvous when nnodes > 1).
    nproc_per_node: int = 1
    nnodes: int = 1
    rdzv_endpoint: str | None = None
    lora: LoRAParams = field(default_factory=LoRAParams)


@dataclass(frozen=True)
class PretrainParams(TrainParams):
    context_length: int | None = None  # training window; None → the model's context_length (its position table)
    # random: windows at any offset, drawn afresh each step | epochs: the book's loader (windows every `stride`
    # tokens, shuffled each epoch, the last partial batch dropped)
    sampling: Literal["random", "epochs"] = "random"
    stride: int | None = None  # epochs: distance between window starts; None → the context (non-overlapping)
    epochs: int | None = None  # epochs: train this many epochs (replaces max_steps); None → max_steps

    def __post_init__(self) -> None:
        if self.sampling == "random" and (self.stride is not None or self.epochs is not None):
            raise ConfigError("pretrain.stride and pretrain.epochs need pretrain.sampling: epochs")


@dataclass(frozen=True)
class EvaluateParams:
    batches: int = 50
    batch_size: int = 16
    prompts: tuple[str, ...] = ()
    max_new_tokens: int = 80
    temperature: float = 0.8
    top_k: int | None = 40
    seed: int = 1337
    dtype: Literal["auto", "fp32", "bf16"] = "auto"  # as pretrain.dtype: bf16 autocast where it is faster


@dataclass(frozen=True)
class SFTParams(TrainParams):
    data: Source = Source("")
    template: Literal["alpaca", "chat"] = "alpaca"
    mask_prompt: bool = True
    strict: bool = False
    split_train: float = 0.85
    split_val: float = 0.05  # the test split (held-out responses) is what train and val leave
    split_seed: int = 123
    max_new_tokens: int = 96
    temperature: float = 0.0  # held-out responses: 0 → greedy, else sampled with `seed`
    top_k: int | None = None

    def __post_init__(self) -> None:
        if self.split_train + self.split_val >= 1:
            raise ConfigError(
                f"sft.split_train + sft.split_val must be < 1 (the rest is the test split), "
                f"got {self.split_train} + {self.split_val}"
            )


@dataclass(frozen=True)
class DPOParams(TrainParams):
    """Preference pairs whose prompt is in the SFT test split are left out; ``split_val`` of the rest validate."""

    data: Source = Source("")
    beta: float = 0.1
    reduction: Literal["sum", "mean"] = "sum"
    strict: bool = False
    split_val: float = 0.05
    split_seed: int = 123
    max_new_tokens: int = 96
    temperature: float = 0.0
    top_k: int | None = None


@dataclass(frozen=True)
class ClassifyParams(TrainParams):
    """A classifier from a trained GPT (pipeline/classifier.py). ``data: null`` → the tone data built from the
    preference pairs (pipeline/labelled.py), whose pairs on SFT test prompts all go to the test split."""

    model: Literal["base", "sft", "dpo"] = "base"
    data: Source | None = None
    format: Literal["auto", "csv", "tsv", "json", "jsonl"] = "auto"
    member: str | None = None  # the file inside a zip (needed when it holds several)
    columns: tuple[str, ...] = ()  # field names of a header-less CSV/TSV
    text_field: str = "text"
    label_field: str = "label"
    balance: bool = False  # undersample every class to the smallest
    split_train: float = 0.7
    split_val: float = 0.1  # the test split is what train and val leave
    split_seed: int = 123
    trainable: Literal["head", "last_block", "all", "lora"] = "last_block"

    def __post_init__(self) -> None:
        if self.split_train + self.split_val >= 1:
            raise ConfigError(f"classify.split_train + classify.split_val must be < 1 (the rest is the test split), "
                              f"got {self.split_train} + {self.split_val}")


@dataclass(frozen=True)
class JudgeParams:
    host: str | None = None  # None → $OLLAMA_HOST or http://127.0.0.1:11434
    model: str = "llama3.1:8b"
    style: Literal["score100", "rubric5"] = "score100"
    pairwise: bool = True
    temperature: float = 0.0
    seed: int = 123  # the judge's sampling seed, and the bootstrap's
    num_ctx: int = 4096
    timeout_s: float = 120.0
    retries: int = 2  # extra attempts after a connection error, timeout or 5xx
    backoff_s: float = 0.5  # wait before retry n: backoff_s * 2**n
    concurrency: int = 2
    on_unavailable: Literal["fail", "fallback"] = "fallback"
    prompt_template: str | None = None  # None → the style's prompt; placeholders in pipeline/judge.py
    pairwise_template: str | None = None
    bootstrap_samples: int = 1000


@dataclass(frozen=True)
class ExportParams:
    model: Literal["base", "sft", "dpo", "classifier"] = "dpo"  # classifier: class logits, parity of those
    opset: int = 23  # ONNX Attention + Gelu ops (see pipeline/export.py); 18 for older runtimes
    quantize_int8: bool = True
    parity_atol: float = 1e-4  # max |logit(onnxruntime fp32) - logit(torch)|, else the stage fails
    parity_tokens: int = 64  # greedy tokens that must equal torch's, token for token
    int8_min_agreement: float = 0.95  # top-1 next-token agreement of int8 with fp32 over real text
    # gguf: llama.cpp / Ollama (pipeline/gguf_export.py); hf: transformers' GPT-2 layout (pipeline/hf_export.py)
    formats: tuple[Literal["onnx", "gguf", "hf"], ...] = ("onnx", "gguf", "hf")
    gguf_types: tuple[Literal["f32", "f16", "q8_0"], ...] = ("f16", "q8_0")  # one file each; the Modelfile uses the first
    gguf_check_positions: int = 2048  # real validation positions of the llama.cpp agreement check

    def __post_init__(self) -> None:
        for name in ("formats", "gguf_types"):
            value = getattr(self, name)
            if not value or len(set(value)) != len(value):
                raise ConfigError(f"export.{name} must be a non-empty list without repeats, got {list(value)}")


@dataclass(frozen=True)
class Params:
    seed: int = 1337
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


# Range checks: (section.key, predicate, what it must be).
_CHECKS: list[tuple[str, typing.Callable[[Any], bool], str]] = [
    ("data.timeout_s", lambda v: v > 0, "> 0"),
    ("data.retries", lambda v: v >= 0, ">= 0"),
    ("tokenizer.vocab_size", lambda v: v >= 256 + 16, ">= 272 (256 bytes + special tokens)"),
    ("tokenizer.train_bytes", lambda v: v is None or v >= 1 << 20, ">= 1048576 (1 MiB) or null"),
    ("shards.val_fraction", lambda v: 0 < v < 1, "in (0, 1)"),
    ("shards.shard_tokens", lambda v: v > 0, "> 0"),
    ("shards.batch_bytes", lambda v: v > 0, "> 0"),
    ("evaluate.batches", lambda v: v > 0, "> 0"),
    ("evaluate.batch_size", lambda v: v > 0, "> 0"),
    ("evaluate.max_new_tokens", lambda v: v >= 0, ">= 0"),
    ("evaluate.temperature", lambda v: v >= 0, ">= 0"),
    ("pretrain.context_length", lambda v: v is None or v > 0, "> 0"),
    # LoRA adapts a trained model; pretraining trains every weight (from scratch or from model.init_from).
    ("pretrain.lora.rank", lambda v: v == 0, "0: LoRA needs trained weights to adapt (fine-tune them in the sft stage)"),
    ("model.init_from", lambda v: bool(v.strip()), "scratch, a GPT-2 name or a path"),
    ("pretrain.stride", lambda v: v is None or v > 0, "> 0"),
    ("pretrain.epochs", lambda v: v is None or v > 0, "> 0"),
    ("dpo.beta", lambda v: v > 0, "> 0"),
    ("sft.split_train", lambda v: 0 < v < 1, "in (0, 1)"),
    ("sft.split_val", lambda v: 0 < v < 1, "in (0, 1)"),
    ("dpo.split_val", lambda v: 0 < v < 1, "in (0, 1)"),
    ("classify.split_train", lambda v: 0 < v < 1, "in (0, 1)"),
    ("classify.split_val", lambda v: 0 < v < 1, "in (0, 1)"),
    ("judge.concurrency", lambda v: v >= 1, ">= 1"),
    ("judge.temperature", lambda v: v >= 0, ">= 0"),
    ("judge.num_ctx", lambda v: v > 0, "> 0"),
    ("judge.timeout_s", lambda v: v > 0, "> 0"),
    ("judge.retries", lambda v: v >= 0, ">= 0"),
    ("judge.backoff_s", lambda v: v >= 0, ">= 0"),
    ("judge.bootstrap_samples", lambda v: v >= 100, ">= 100"),
    ("export.parity_atol", lambda v: v > 0, "> 0"),
    ("export.parity_tokens", lambda v: v > 0, "> 0"),
    ("export.int8_min_agreement", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("export.gguf_check_positions", lambda v: v > 0, "> 0"),
]
for _section in ("sft", "dpo"):
    _CHECKS += [
        (f"{_section}.max_new_tokens", lambda v: v > 0, "> 0"),
        (f"{_section}.temperature", lambda v: v >= 0, ">= 0"),
        (f"{_section}.top_k", lambda v: v is None or v > 0, "> 0 or null"),
    ]
for _section in ("pretrain", "sft", "dpo", "classify"):
    _CHECKS += [
        (f"{_section}.lora.rank", lambda v: v >= 0, ">= 0 (0 turns LoRA off)"),
        (f"{_section}.lora.alpha", lambda v: v > 0, "> 0"),
        (f"{_section}.lora.dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
        (f"{_section}.lora.targets", lambda v: len(v) > 0, "a non-empty list"),
        (f"{_section}.batch_size", lambda v: v > 0, "> 0"),
        (f"{_section}.grad_accum", lambda v: v > 0, "> 0"),
        (f"{_section}.max_steps", lambda v: v >= 0, ">= 0"),
        (f"{_section}.lr", lambda v: v > 0, "> 0"),
        (f"{_section}.min_lr_ratio", lambda v: 0 <= v <= 1, "in [0, 1]"),
        (f"{_section}.warmup_steps", lambda v: v >= 0, ">= 0"),
        (f"{_section}.grad_clip", lambda v: v >= 0, ">= 0 (0 disables clipping)"),
        (f"{_section}.eval_every", lambda v: v > 0, "> 0"),
        (f"{_section}.eval_batches", lambda v: v > 0, "> 0"),
        (f"{_section}.checkpoint_every", lambda v: v > 0, "> 0"),
        (f"{_section}.keep_checkpoints", lambda v: v >= 1, ">= 1"),
        (f"{_section}.log_every", lambda v: v > 0, "> 0"),
        (f"{_section}.nproc_per_node", lambda v: v >= 1, ">= 1"),
        (f"{_section}.nnodes", lambda v: v >= 1, ">= 1"),
    ]


def _source(value: Any, where: str) -> Source:
    if isinstance(value, str):
        return Source(value)
    if isinstance(value, dict):
        unknown = set(value) - {"url", "path", "sha256"}
        location = value.get("url", value.get("path"))
        if unknown or not isinstance(location, str):
            raise ConfigError(f"{where} must be a string or a mapping {{url: ..., sha256: ...}}, got {value!r}")
        sha = value.get("sha256")
        if sha is not None and (not isinstance(sha, str) or len(sha) != 64):
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
    if not isinstance(where_rows, dict) or not all(isinstance(v, str | int | float | bool) for v in where_rows.values()):
        raise ConfigError(f"{where}.where must map field names to values, got {where_rows!r}")
    built = _build(CorpusSource, {"location": base.location, "sha256": base.sha256} | options, where)
    built = dataclasses.replace(built, where=tuple((str(k), v) for k, v in where_rows.items()))
    if built.min_chars < 0:
        raise ConfigError(f"{where}.min_chars must be >= 0, got {built.min_chars}")
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
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where} must be a number, got {value!r}")
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
    kwargs = {
        key: _coerce(value, hints[key], f"{where}.{key}" if where else key) for key, value in data.items()
    }
    return cls(**kwargs)


def parse_params(data: dict, origin: str = "params.yaml") -> Params:
    """Validate a params mapping; errors are prefixed with ``origin`` and name the dotted key."""
    try:
        params = _build(Params, data, "")
        for key, ok, must in _CHECKS:
            value = functools.reduce(getattr, key.split("."), params)
            if not ok(value):
                raise ConfigError(f"{key} must be {must}, got {value!r}")
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
            raise ConfigError(f"this stage reads params '{name}' without declaring it (add it to the stage's PARAMS "
                              "and to its params in dvc.yaml)")
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


def load_params(path: str | Path = "params.yaml", sections: typing.Iterable[str] | None = None) -> Params | DeclaredParams:
    """The validated params file; with ``sections``, a view that refuses to read any other section."""
    params = parse_params(read_yaml(path) or {}, str(path))
    return params if sections is None else DeclaredParams(params, sections)


def as_dict(obj: Any) -> Any:
    """A params dataclass as plain data (for metadata files and hashes)."""
    return dataclasses.asdict(obj)
