"""Our models as the server and the terminal commands see them: loading and text generation.

A served model couples a token generator (torch for the base/SFT/DPO directories, onnxruntime for the export)
with its tokenizer and prompt template (rendered by pipeline/data/prompts.py). Generation runs synchronously in a
worker thread and hands text to a callback piece by piece: whole UTF-8 characters only, and never a piece that
could be the start of a stop string.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol

import tiktoken

from pipeline.common.errors import PipelineError
from pipeline.data.prompts import Template, chat_prompt_ids, resolve, stop_id, template_name
from pipeline.data.tokenizer import END_OF_TURN, read_metadata
from pipeline.model.sampling import SamplingOptions


class TokenStream(Protocol):
    def stream(self, prompt_ids: list[int], opts: SamplingOptions) -> Iterator[int]: ...


class TorchTokens:
    """Token ids from a torch GPT with the KV cache (``pipeline.model.generate.stream_tokens``)."""

    def __init__(self, model):
        self.model = model

    def stream(self, prompt_ids: list[int], opts: SamplingOptions) -> Iterator[int]:
        import torch

        from pipeline.model.generate import stream_tokens

        for token in stream_tokens(self.model, torch.tensor([prompt_ids], dtype=torch.long), opts):
            yield int(token[0, 0])

    def embed(self, ids: list[int]) -> list[float]:
        from pipeline.model.embeddings import embed

        return embed(self.model, ids)

    def score(self, ids: list[int], k: int):
        """``pipeline.model.scoring.score_ids``: each token's log-probability and the ``k`` likeliest at each step."""
        from pipeline.model.scoring import score_ids

        return score_ids(self.model, ids, k)


@dataclass
class ServedModel:
    """One model the server answers for, under ``name`` (``sft:latest``)."""

    name: str
    tokens: TokenStream
    encoding: tiktoken.Encoding
    template: Template | None  # "alpaca" | "chat" | the base's ChatTemplate (native) | None: a base model
    context_length: int
    details: dict  # Ollama's model details: format, family, parameter_size, quantization_level
    info: dict  # Ollama's model_info: architecture and shape
    source: str  # the directory it was loaded from
    size: int  # bytes of its files
    digest: str  # sha256 of its files
    modified_at: str

    @property
    def stop_ids(self) -> set[int]:
        ids = {self.encoding.eot_token, stop_id(self.encoding, self.template)}
        if END_OF_TURN in self.encoding.special_tokens_set:
            ids.add(self.encoding.encode_single_token(END_OF_TURN))
        return ids

    @property
    def embeds(self) -> bool:
        """Whether it can embed text (the torch models; the ONNX graph outputs logits only)."""
        return hasattr(self.tokens, "embed")

    @property
    def scores(self) -> bool:
        """Whether it can report log-probabilities (the torch models; not the ONNX export)."""
        return hasattr(self.tokens, "score")

    @property
    def template_name(self) -> str | None:
        return template_name(self.template)

    def chat_ids(self, messages: Sequence[tuple[str, str]]) -> list[int]:
        return chat_prompt_ids(self.encoding, self.template, messages)


def human_count(n: int) -> str:
    """Ollama's parameter_size style: 124.4M, 1.2B."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def _digest(paths: Sequence[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _file_facts(directory: Path, files: Sequence[Path] | None = None) -> dict:
    """Size, digest and time of the files that make the model (default: all of ``directory``)."""
    files = sorted(p for p in directory.rglob("*") if p.is_file()) if files is None else list(files)
    modified = max(p.stat().st_mtime for p in files)
    return {
        "source": str(directory),
        "size": sum(p.stat().st_size for p in files),
        "digest": _digest(files),
        "modified_at": datetime.fromtimestamp(modified, timezone.utc).isoformat(),
    }


def load_torch_model(name: str, directory: str | Path) -> ServedModel:
    """A model directory written by ``checkpoint.save_model`` (models/base, models/sft, models/dpo)."""
    from pipeline.model.checkpoint import load_with_tokenizer

    directory = Path(directory)
    loaded = load_with_tokenizer(directory)
    model, encoding = loaded.model, loaded.enc
    cfg = model.cfg
    template = loaded.template
    n_params = model.num_params(non_embedding=False)
    return ServedModel(
        name=name,
        tokens=TorchTokens(model),
        encoding=encoding,
        template=template,
        context_length=cfg.context_length,
        details={
            "parent_model": "",
            "format": "safetensors",
            "family": "gpt",
            "families": ["gpt"],
            "parameter_size": human_count(n_params),
            "quantization_level": "F32",
        },
        info={
            "general.architecture": "gpt",
            "general.parameter_count": n_params,
            "gpt.context_length": cfg.context_length,
            "gpt.embedding_length": cfg.n_embd,
            "gpt.block_count": cfg.n_layer,
            "gpt.attention.head_count": cfg.n_head,
            "gpt.vocab_size": cfg.vocab_size,
            "tokenizer.name": encoding.name,
            "template": template_name(template) or "raw",
        },
        **_file_facts(directory),
    )


def template_of(meta: dict) -> str | None:
    """The instruction template a model was tuned with, as the sft/dpo stages record it; None for a base model."""
    return (meta.get("instructions") or {}).get("template")


def load_onnx_model(
    name: str, directory: str | Path, variant: str, threads: int | None = None
) -> ServedModel:
    """The ONNX export (models/onnx): ``variant`` fp32 or int8, run by onnxruntime."""
    from pipeline.export.onnx_generate import OnnxGenerator

    directory = Path(directory)
    generator = OnnxGenerator(directory, variant, threads)
    config = generator.config
    template = template_of(config)
    source = Path(config.get("source", {}).get("directory") or "") / "config.json"
    if template is None and source.is_file():  # exported from a tuned model: its recipe names the template
        template = template_of(json.loads(source.read_text(encoding="utf-8")))
    if template is not None:  # native: the base's chat template, in the tokenizer copied beside the graph
        meta = read_metadata(generator.directory / "tokenizer")
        template = resolve(template, meta, generator.tokenizer, f"{directory}: instructions.template")
    cfg = config["model"]
    return ServedModel(
        name=name,
        tokens=generator,
        encoding=generator.tokenizer,
        template=template,
        context_length=generator.context_length,
        details={
            "parent_model": config.get("source", {}).get("directory", ""),
            "format": "onnx",
            "family": "gpt",
            "families": ["gpt"],
            "quantization_level": "INT8" if variant == "int8" else "F32",
        },
        info={
            "general.architecture": "gpt",
            "gpt.context_length": cfg["context_length"],
            "gpt.embedding_length": cfg["n_embd"],
            "gpt.block_count": cfg["n_layer"],
            "gpt.attention.head_count": cfg["n_head"],
            "gpt.vocab_size": cfg["vocab_size"],
            "tokenizer.name": generator.tokenizer.name,
            "template": template_name(template) or "raw",
            "onnx.variant": variant,
            "onnx.opset": config["onnx"].get("opset"),
        },
        **_file_facts(directory, [generator.path, directory / "config.json"]),
    )


def load_model_dir(
    name: str, directory: str | Path, variant: str = "fp32", threads: int | None = None
) -> ServedModel:
    """A torch model directory (model.safetensors, or a LoRA adapter on its base) or the ONNX export (``variant``
    fp32 or int8)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise PipelineError(f"{directory}: model directory not found")
    config = directory / "config.json"
    if config.is_file() and (json.loads(config.read_text(encoding="utf-8")).get("model") or {}).get(
        "n_classes"
    ):
        raise PipelineError(
            f"{directory}: a classifier, not a language model (use: python -m pipeline classify)"
        )
    if (directory / "model.safetensors").is_file() or (directory / "adapter.safetensors").is_file():
        if variant != "fp32":
            raise PipelineError(f"{directory}: only the ONNX export has an {variant} variant")
        return load_torch_model(name, directory)
    if any(directory.glob("*.onnx")):
        return load_onnx_model(name, directory, variant, threads)
    raise PipelineError(f"{directory}: holds neither model.safetensors nor an ONNX model")


# ---------------------------------------------------------------------------------------------- generation


class StopScanner:
    """Cuts generated text at the first stop string, holding back any tail that could still become one."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text that is safe to emit, whether a stop string was hit)."""
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        hold = max(
            (k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0
        )
        out, self.pending = self.pending[: len(self.pending) - hold], self.pending[len(self.pending) - hold :]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


@dataclass
class Generated:
    """What a finished generation reports (Ollama's final-chunk fields)."""

    done_reason: str  # "stop" (EOT, end of turn or a stop string), "length", or "cancelled"
    prompt_ids: list[int]
    output_ids: list[int]
    prompt_ns: int
    eval_ns: int
    stop_id: int | None = None  # the end-of-text / end-of-turn token that ended it (not in output_ids)


def fit_prompt(prompt_ids: list[int], context_length: int, num_predict: int | None) -> tuple[list[int], int]:
    """(the prompt's kept tail, how many tokens may follow): like Ollama, a too-long prompt loses its start.

    The answer is guaranteed min(num_predict, context/4) tokens of room; without num_predict it may fill
    the context.
    """
    wanted = num_predict if num_predict is not None and num_predict > 0 else context_length
    room = min(wanted, max(1, context_length // 4))
    kept = prompt_ids[-(context_length - room) :] if len(prompt_ids) > context_length - room else prompt_ids
    return kept, min(wanted, context_length - len(kept))


def generate_text(
    model: ServedModel,
    prompt_ids: list[int],
    opts: SamplingOptions,
    stops: Sequence[str],
    emit: Callable[[str], None],
    cancelled: Callable[[], bool],
) -> Generated:
    """Generate with ``opts``, handing text pieces to ``emit``; stops at EOT/end-of-turn, a stop string, or
    ``opts.max_new_tokens``. Runs in a worker thread; ``cancelled()`` is polled between tokens."""
    start = time.perf_counter_ns()
    first_token = None
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    scanner = StopScanner(stops)
    stop_ids, output, reason, hit, stop_id = model.stop_ids, [], "length", False, None
    specials = {model.encoding.encode_single_token(t) for t in model.encoding.special_tokens_set}
    for token in model.tokens.stream(prompt_ids, opts):
        first_token = first_token or time.perf_counter_ns()
        if cancelled():
            reason = "cancelled"
            break
        if token in stop_ids:
            reason, stop_id = "stop", token
            break
        output.append(token)
        if token in specials:  # control tokens are not text
            continue
        text, hit = scanner.feed(decoder.decode(model.encoding.decode_single_token_bytes(token)))
        if text:
            emit(text)
        if hit:
            reason = "stop"
            break
    if reason != "cancelled" and not hit:
        text, hit = scanner.feed(decoder.decode(b"", final=True))
        reason = "stop" if hit else reason
        if tail := text + ("" if hit else scanner.flush()):
            emit(tail)
    end = time.perf_counter_ns()
    first_token = first_token or end
    return Generated(reason, prompt_ids, output, first_token - start, end - first_token, stop_id)
