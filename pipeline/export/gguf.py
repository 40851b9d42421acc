"""GGUF export for llama.cpp and Ollama: our GPT as llama.cpp's ``gpt2``, ``llama`` or ``qwen3`` architecture,
tokenizer embedded.

With learned positions the model maps one to one onto llama.cpp's GPT-2 graph (pre-LN blocks, fused QKV,
tanh-GELU MLP, LayerNorm eps 1e-5); biases the model lacks are written as zeros, which llama.cpp requires.
With rotary positions it is the Llama family (RMSNorm, SwiGLU, grouped-query attention): ``qwen3`` when it
has q/k norms, else ``llama``, whose rope rotates adjacent pairs where ours (and transformers') rotates
halves, so q and k rows are permuted within each head; Llama 3's frequency scaling travels as the
``rope_freqs`` factors. Linear weights are stored as they are ((out, in) in torch is ggml's {in, out}); a tied
head is left out and llama.cpp reuses ``token_embd``.

The tokenizer travels as llama.cpp's byte-level BPE (``tokenizer.ggml.model = gpt2``): every token as GPT-2's
byte-to-unicode string, the merges recovered from tiktoken's ranks, our special tokens as CONTROL tokens. The
split regex cannot travel — llama.cpp only knows a fixed set of pre-tokenizers (``tokenizer.ggml.pre``) — so
each of our patterns maps to the one that reproduces it (``PRE_TOKENIZERS``); a pattern none reproduces (the
``char`` kind's one character per piece) is refused.

Beside the weights: ``tokenizer.chat_template`` (Jinja, for llama-server) and an Ollama ``Modelfile`` whose Go
``TEMPLATE`` renders the same prompt as our server.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import tiktoken
import torch

from pipeline.common.atomic import atomic_path
from pipeline.common.config import ExportParams
from pipeline.common.errors import PipelineError, one_line
from pipeline.data import tokenizer_json
from pipeline.data.chat_template import ChatTemplate
from pipeline.data.prompts import ALPACA_PREAMBLE, Template, template_name
from pipeline.data.tokenizer import ASSISTANT, CHAR_PATTERN, END_OF_TURN, EOT, GPT2_PATTERN
from pipeline.data.tokenizer_json import byte_to_unicode
from pipeline.model import llama_layout
from pipeline.model.gpt import GPT, GPTConfig
from pipeline.model.gpt2_layout import require_gpt2

GGUF_TYPES = ("f32", "f16", "q8_0")
FILE_TYPES = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
}
# The GPT-4 pattern rustbpe trains with (our ``bpe`` kind): llama.cpp's "llama-bpe" pre-tokenizer is the same
# regex (case-insensitive contractions spelt out, greedy instead of possessive quantifiers: the same splits) and,
# like tiktoken, takes a piece that is a whole vocabulary entry as one token.
GPT4_PATTERN = (
    r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]"
    r"|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS = {
    GPT4_PATTERN: "llama-bpe",
    GPT2_PATTERN: "gpt-2",
    # tokenizer.kind hf: the patterns of the Llama family's own tokenizer.json files (data/tokenizer_json.py)
    tokenizer_json.LLAMA3_PATTERN: "llama-bpe",
    tokenizer_json.QWEN2_PATTERN: "qwen2",
    tokenizer_json.DIGITS_PATTERN: "smollm",
    tokenizer_json.BYTE_LEVEL_PATTERN: "gpt-2",
}
MODELFILE = "Modelfile"
FORMAT = "the GGUF GPT-2 format (llama.cpp's gpt2 architecture)"
LLAMA_FORMAT = "GGUF's Llama family (llama.cpp's llama and qwen3 architectures)"


def gguf_architecture(cfg: GPTConfig) -> str:
    """llama.cpp's architecture for our shape (refusing, in one line, a shape none of them holds)."""
    if cfg.pos_emb == "learned":
        require_gpt2(cfg, FORMAT, "gguf")
        return "gpt2"
    llama_layout.require_llama(cfg, LLAMA_FORMAT, "gguf")
    if cfg.qk_norm and cfg.qkv_bias:
        raise PipelineError(
            f"model.qkv_bias=true: {LLAMA_FORMAT} has no q/k/v biases in qwen3 (qk_norm); train with "
            "qkv_bias: false (or drop gguf from export.formats)"
        )
    return llama_layout.architecture(cfg)


def pre_tokenizer(enc: tiktoken.Encoding, kind: str) -> str:
    """llama.cpp's name for the pre-tokenizer that splits text as ``enc``'s pattern does."""
    pattern = enc._pat_str
    if pattern in PRE_TOKENIZERS:
        return PRE_TOKENIZERS[pattern]
    why = "one character per piece" if pattern == CHAR_PATTERN else f"the split pattern {pattern!r}"
    raise PipelineError(
        f"tokenizer.kind={kind}: llama.cpp has no pre-tokenizer that reproduces {why}; GGUF export "
        "needs tokenizer.kind bpe or gpt2 (or drop gguf from export.formats)"
    )


# ---------------------------------------------------------------------------------------------- tokenizer


def _split_below(token: bytes, ranks: dict[bytes, int]) -> list[bytes]:
    """``token``'s bytes merged as BPE does, with only the merges of lower rank than ``token`` itself."""
    limit = ranks[token]
    parts = [bytes([b]) for b in token]
    while len(parts) > 1:
        candidates = [
            (ranks.get(a + b, limit), i) for i, (a, b) in enumerate(zip(parts, parts[1:], strict=False))
        ]
        rank, i = min(candidates)
        if rank >= limit:
            break
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts


def merges(ranks: dict[bytes, int]) -> Iterator[tuple[bytes, bytes]]:
    """The merge list, in rank order, that rebuilds every multi-byte token from two lower-ranked ones."""
    for token, _ in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        rank = ranks[token]
        splits = [
            (token[:k], token[k:])
            for k in range(1, len(token))
            if ranks.get(token[:k], rank) < rank and ranks.get(token[k:], rank) < rank
        ]
        # BPE's own split is one of these: when it is the only one, no need to replay the merges.
        parts = list(splits[0]) if len(splits) == 1 else _split_below(token, ranks)
        if len(parts) != 2:
            raise PipelineError(
                f"tokenizer: token {token!r} is not the merge of two earlier tokens; "
                "not a byte-level BPE vocabulary"
            )
        yield parts[0], parts[1]


def vocabulary(enc: tiktoken.Encoding, size: int) -> tuple[list[str], list[int]]:
    """Token strings and types for ids 0..size-1 (ids the tokenizer does not use: UNUSED padding)."""
    state = enc.__getstate__()
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    byte_char = byte_to_unicode()
    for token, rank in state["mergeable_ranks"].items():
        tokens[rank], types[rank] = "".join(byte_char[b] for b in token), gguf.TokenType.NORMAL
    for text, rank in state["special_tokens"].items():
        tokens[rank], types[rank] = text, gguf.TokenType.CONTROL
    return tokens, [int(t) for t in types]


# ---------------------------------------------------------------------------------------------- prompt formats


def chat_template(template: Template | None) -> str:
    """Jinja for ``tokenizer.chat_template``: the prompt ``prompts.chat_prompt_ids`` builds, as text (a native
    template is the base's own Jinja)."""
    if isinstance(template, ChatTemplate):
        return template.template
    if template == "chat":
        return (
            "{%- for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '" + END_OF_TURN + "' }}"
            "{%- endfor %}{%- if add_generation_prompt %}{{ '" + ASSISTANT + "' }}{%- endif %}"
        )
    if template == "alpaca":
        preamble = ALPACA_PREAMBLE.replace("'", "\\'")
        return (
            "{{- '" + preamble + "\\n\\n### Instruction:\\n' + messages[-1]['content'] }}"
            "{%- if messages | length > 1 %}{{ '\\n\\n### Input:\\n' }}"
            "{%- for m in messages[:-1] %}{{ m['role'] + ': ' + m['content'] }}"
            "{%- if not loop.last %}{{ '\\n' }}{%- endif %}{%- endfor %}{%- endif %}"
            "{{- '\\n\\n### Response:\\n' }}"
        )
    return "{%- for m in messages %}{%- if not loop.first %}{{ '\\n\\n' }}{%- endif %}{{ m['content'] }}{%- endfor %}"


def go_template(template: Template | None) -> str | None:
    """Ollama's TEMPLATE (Go text/template over ``.Messages``) for the same prompt as ``chat_template``; None for a
    native template (Jinja has no general translation to Go: Ollama takes the GGUF's chat template as it can)."""
    if isinstance(template, ChatTemplate):
        return None
    if template == "chat":
        return "{{- range .Messages }}<|{{ .Role }}|>{{ .Content }}" + END_OF_TURN + "{{ end }}" + ASSISTANT
    if template == "alpaca":
        return (
            "{{- range $i, $m := .Messages }}{{- if eq (len (slice $.Messages $i)) 1 }}"
            + ALPACA_PREAMBLE
            + "\n\n### Instruction:\n{{ $m.Content }}"
            "{{- if gt $i 0 }}\n\n### Input:\n"
            "{{ range $j, $c := slice $.Messages 0 $i }}{{ if $j }}\n{{ end }}{{ $c.Role }}: {{ $c.Content }}{{ end }}"
            "{{- end }}\n\n### Response:\n{{ end }}{{- end }}"
        )
    return "{{- range $i, $m := .Messages }}{{ if $i }}\n\n{{ end }}{{ $m.Content }}{{ end }}"


def stop_strings(template: Template | None) -> list[str]:
    if isinstance(template, ChatTemplate):
        return [EOT, template.stop]
    return [EOT, END_OF_TURN] if template == "chat" else [EOT]


# Ollama reads ``#`` lines of a Modelfile as comments: the one known crash, for whoever runs these files.
AMX_NOTE = (
    "# q8_0 on Intel CPUs with AMX (lscpu flag amx_int8): llama.cpp repacks q8_0 weights for AMX and can\n"
    "# segfault on the first token (ggml-org/llama.cpp#20824). llama.cpp: run with --no-repack. Ollama has\n"
    "# no such switch: use the f16 file here, or see docs/export.md (GGUF on CPUs with AMX).\n"
)


def modelfile(gguf_name: str, template: Template | None, context_length: int) -> str:
    """An Ollama Modelfile: ``ollama create NAME -f Modelfile`` from the directory holding ``gguf_name``.

    Sampling defaults are Ollama's own, except ``repeat_penalty 1`` (our server's default: no penalty) and ``num_ctx``, which
    must not exceed the model's learned positions."""
    stops = "".join(f'PARAMETER stop "{s}"\n' for s in stop_strings(template))
    go = go_template(template)
    return (
        f"{AMX_NOTE}FROM ./{gguf_name}\n" + (f'TEMPLATE """{go}"""\n' if go is not None else "") + f"{stops}"
        f"PARAMETER num_ctx {context_length}\n"
        "PARAMETER temperature 0.8\nPARAMETER top_k 40\nPARAMETER top_p 0.9\nPARAMETER repeat_penalty 1\n"
    )


# ---------------------------------------------------------------------------------------------- weights


def _bias(layer: torch.nn.Linear) -> torch.Tensor:
    """The layer's bias, or zeros where it has none (they compute the same)."""
    return layer.bias if layer.bias is not None else torch.zeros(layer.out_features)


def gguf_tensors(model: GPT) -> Iterator[tuple[str, torch.Tensor]]:
    """(llama.cpp name, tensor) for every weight of llama.cpp's graph for the model's architecture."""
    if model.cfg.pos_emb != "learned":
        yield from llama_tensors(model)
        return
    cfg = model.cfg
    yield "token_embd.weight", model.tok_emb.weight
    yield "position_embd.weight", model.pos_emb.weight
    for i, block in enumerate(model.blocks):
        yield from (
            (f"blk.{i}.{name}", t)
            for name, t in (
                ("attn_norm.weight", block.norm1.weight),
                ("attn_norm.bias", block.norm1.bias),
                ("attn_qkv.weight", block.att.qkv.weight),
                ("attn_qkv.bias", _bias(block.att.qkv)),
                ("attn_output.weight", block.att.out_proj.weight),
                ("attn_output.bias", _bias(block.att.out_proj)),
                ("ffn_norm.weight", block.norm2.weight),
                ("ffn_norm.bias", block.norm2.bias),
                ("ffn_up.weight", block.ff.fc.weight),
                ("ffn_up.bias", _bias(block.ff.fc)),
                ("ffn_down.weight", block.ff.proj.weight),
                ("ffn_down.bias", _bias(block.ff.proj)),
            )
        )
    yield "output_norm.weight", model.final_norm.weight
    yield "output_norm.bias", model.final_norm.bias
    if not cfg.tie_weights:
        yield "output.weight", model.out_head.weight


def interleave_pairs(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """q or k rows (or their bias) reordered within each head so that llama.cpp's adjacent-pair rope turns the
    pairs ours turns: row i and row i + head_dim/2 of a head become rows 2i and 2i + 1."""
    shape = rows.shape
    return rows.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def rope_freq_factors(cfg: GPTConfig) -> torch.Tensor:
    """Llama 3's scaling as llama.cpp takes it: one divisor per rotation frequency (``rope_freqs.weight``)."""
    from pipeline.model.gpt import llama3_frequencies

    inv_freq = cfg.rope_base ** (-torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim)
    return inv_freq / llama3_frequencies(inv_freq, cfg.rope_scaling)


def llama_tensors(model: GPT) -> Iterator[tuple[str, torch.Tensor]]:
    """(llama.cpp name, tensor) for llama.cpp's llama / qwen3 graph: q, k and v apart, llama's q/k permuted."""
    cfg = model.cfg
    permute = llama_layout.architecture(cfg) == "llama"  # qwen3 rotates halves in llama.cpp too
    yield "token_embd.weight", model.tok_emb.weight
    if cfg.rope_scaling is not None:
        yield "rope_freqs.weight", rope_freq_factors(cfg)
    for i, block in enumerate(model.blocks):
        att, ff = block.att, block.ff
        names = [("attn_norm.weight", block.norm1.weight)]
        heads = (cfg.n_head, cfg.kv_heads, cfg.kv_heads)
        weights = att.qkv.weight.split(att.sizes)
        biases = att.qkv.bias.split(att.sizes) if att.qkv.bias is not None else None
        for j, p in enumerate("qkv"):
            turn = permute and p != "v"  # v is not rotated
            names.append((f"attn_{p}.weight", interleave_pairs(weights[j], heads[j]) if turn else weights[j]))
            if biases is not None or cfg.bias:
                bias = biases[j] if biases is not None else torch.zeros(att.sizes[j])
                names.append((f"attn_{p}.bias", interleave_pairs(bias, heads[j]) if turn else bias))
        if cfg.qk_norm:
            names += [("attn_q_norm.weight", att.q_norm.weight), ("attn_k_norm.weight", att.k_norm.weight)]
        names.append(("attn_output.weight", att.out_proj.weight))
        if cfg.bias or cfg.qkv_bias:
            names.append(("attn_output.bias", _bias(att.out_proj)))
        names += [
            ("ffn_norm.weight", block.norm2.weight),
            ("ffn_gate.weight", ff.gate.weight),
            ("ffn_up.weight", ff.fc.weight),
            ("ffn_down.weight", ff.proj.weight),
        ]
        if cfg.bias:
            names += [
                ("ffn_gate.bias", ff.gate.bias),
                ("ffn_up.bias", ff.fc.bias),
                ("ffn_down.bias", ff.proj.bias),
            ]
        yield from ((f"blk.{i}.{name}", t) for name, t in names)
    yield "output_norm.weight", model.final_norm.weight
    if not cfg.tie_weights:
        yield "output.weight", model.out_head.weight


def encode_tensor(tensor: torch.Tensor, gguf_type: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """Norms and biases stay f32 (as llama.cpp's converters keep them); matrices take ``gguf_type``, except
    rows q8_0's 32-wide blocks cannot tile, which fall back to f16."""
    data = tensor.detach().float().cpu().numpy()
    if data.ndim < 2 or gguf_type == "f32":
        return data, gguf.GGMLQuantizationType.F32
    if gguf_type == "q8_0" and data.shape[-1] % 32 == 0:
        return gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    return data.astype(np.float16), gguf.GGMLQuantizationType.F16


@dataclass(frozen=True)
class GGUFTokenizer:
    """The tokenizer as GGUF keys (the merges take seconds for GPT-2's 50k: built once per export)."""

    pre: str
    tokens: list[str]
    types: list[int]
    merges: list[str]
    eot_id: int
    end_of_turn_id: int

    @classmethod
    def of(cls, enc: tiktoken.Encoding, kind: str, vocab_size: int) -> GGUFTokenizer:
        pre = pre_tokenizer(enc, kind)
        tokens, types = vocabulary(enc, vocab_size)
        byte_char = byte_to_unicode()
        lines = [
            " ".join("".join(byte_char[b] for b in part) for part in pair)
            for pair in merges(enc.__getstate__()["mergeable_ranks"])
        ]
        return cls(pre, tokens, types, lines, enc.eot_token, enc.encode_single_token(END_OF_TURN))


def write_gguf(
    model: GPT,
    tokenizer: GGUFTokenizer,
    template: Template | None,
    path: Path,
    gguf_type: str,
    name: str,
    native_ids: tuple[int, int, int] | None = None,
) -> None:
    """Write ``model`` with its tokenizer as one GGUF file (``gguf_type`` f32, f16 or q8_0); ``native_ids``: a
    native template's (bos, eos, end-of-turn) ids (``native_special_ids``)."""
    cfg = model.cfg
    arch = gguf_architecture(cfg)
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name(name)
    writer.add_context_length(cfg.context_length)
    writer.add_embedding_length(cfg.n_embd)
    writer.add_feed_forward_length(cfg.mlp_hidden)
    writer.add_block_count(cfg.n_layer)
    writer.add_head_count(cfg.n_head)
    if arch == "gpt2":
        writer.add_layer_norm_eps(cfg.norm_eps)
    else:
        writer.add_head_count_kv(cfg.kv_heads)
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
        writer.add_rope_dimension_count(cfg.head_dim)
        writer.add_rope_freq_base(cfg.rope_base)
        writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_file_type(FILE_TYPES[gguf_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(tokenizer.pre)
    writer.add_token_list(tokenizer.tokens)
    writer.add_token_types(tokenizer.types)
    writer.add_token_merges(tokenizer.merges)
    bos, eos, eot = native_ids or (tokenizer.eot_id, tokenizer.eot_id, None)
    writer.add_bos_token_id(bos)
    writer.add_eos_token_id(eos)
    if template == "chat":
        writer.add_eot_token_id(tokenizer.end_of_turn_id)
    elif eot is not None:  # the base's end-of-turn token: llama.cpp stops there
        writer.add_eot_token_id(eot)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    writer.add_chat_template(chat_template(template))
    for tensor_name, tensor in gguf_tensors(model):
        data, qtype = encode_tensor(tensor, gguf_type)
        writer.add_tensor(tensor_name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# ---------------------------------------------------------------------------------------------- the export

# Instructions the checks render in the model's prompt format (with a system message and earlier turns too).
SAMPLE_CHATS: tuple[tuple[tuple[str, str], ...], ...] = (
    (("user", "Name three colours of the rainbow."),),
    (("user", "Rewrite the sentence in the passive voice:\n\nThe knight rode the horse."),),
    (
        ("system", "Answer briefly."),
        ("user", "¿Quién escribió el Quijote?"),
        ("assistant", "Cervantes, en 1605."),
        ("user", "How many pages does it have?"),
    ),
)


def native_special_ids(enc: tiktoken.Encoding, template: ChatTemplate) -> tuple[int, int, int]:
    """(bos, eos, end-of-turn) ids of a native template: the base's bos and eos where its tokenizer_config.json
    names them (llama.cpp hands their text to the template, as transformers does), else EOT."""
    bos, eos = (template.tokens.get(key) for key in ("bos_token", "eos_token"))
    ids = [enc.encode_single_token(t) if t in enc.special_tokens_set else enc.eot_token for t in (bos, eos)]
    return ids[0], ids[1], template.stop_id(enc)


def val_text(windows: np.ndarray, enc: tiktoken.Encoding) -> list[str]:
    """The validation windows as text (one string per window: tokenized again, it must give our ids)."""
    return [enc.decode(row.tolist()) for row in windows]


def export_gguf(
    model_dir: Path,
    tokenizer_dir: Path,
    shards_dir: Path,
    out_dir: Path,
    params: ExportParams,
    shown_as: Path | None = None,
) -> dict:
    """``out_dir``/<model>-<type>.gguf per ``export.gguf_types`` and a Modelfile (replaced atomically, only when
    every check passed); verified in llama.cpp, in a child process, when llama-cpp-python is installed. Returns
    the metrics. ``shown_as``: where the files will be published, if not ``out_dir`` (for messages).

    A check that fails (tokenizer, agreement, chat template) fails the export: nothing is published. When
    llama.cpp itself dies (a signal) or hangs on a file, the file is still published, marked unverified with the
    reason in the metrics and one ``warning:`` line: the crash is the runtime's on this CPU, not the file's, and
    the other formats' outputs stay whole."""
    from pipeline.common.isolated import ChildCrashed
    from pipeline.data.prompts import chat_prompt_ids
    from pipeline.data.shards import ShardDataset
    from pipeline.data.tokenizer import read_metadata
    from pipeline.export.gguf_check import CRASH_ADVICE, check_in_child, runtime_name
    from pipeline.model.checkpoint import load_with_tokenizer

    loaded = load_with_tokenizer(model_dir, tokenizer_dir)
    model, enc, cfg = loaded.model.eval(), loaded.enc, loaded.model.cfg
    if cfg.n_classes:
        raise PipelineError(
            f"{model_dir}: a classifier has no place in llama.cpp's {gguf_architecture(cfg)} architecture "
            "(a language model's head); set export.formats: [onnx] to export it"
        )
    gguf_architecture(cfg)
    template = loaded.template
    native_ids = native_special_ids(enc, template) if isinstance(template, ChatTemplate) else None
    tokenizer = GGUFTokenizer.of(enc, read_metadata(tokenizer_dir)["kind"], cfg.vocab_size)
    dataset = ShardDataset(shards_dir, "val", expected_fingerprint=loaded.tokenizer_fingerprint)
    batches = [
        x.numpy()
        for x, _ in dataset.sequential(
            -(-params.gguf_check_positions // cfg.context_length), cfg.context_length, max_batches=1
        )
    ]
    if not batches:
        raise PipelineError(
            f"{shards_dir}: the validation split holds no window of context_length "
            f"{cfg.context_length} tokens to check the GGUF export on"
        )
    windows = np.concatenate(batches)
    multi_turn = template == "chat" or isinstance(template, ChatTemplate)
    chats = [list(c) for c in SAMPLE_CHATS if multi_turn or c[0][0] != "system"]
    chat_ids = [chat_prompt_ids(enc, template, chat) for chat in chats]
    runtime = runtime_name()
    metrics: dict = {
        "pre_tokenizer": tokenizer.pre,
        "template": template_name(template) or "raw",
        "files": {},
        "size_mb": {},
        "verified_by": runtime,
    }
    if runtime is None:
        metrics["unverified"] = (
            "llama_cpp is not importable (pip install llama-cpp-python): the files were not loaded"
        )
    name = model_dir.name
    crashes = []
    with atomic_path(out_dir) as tmp, tempfile.TemporaryDirectory(prefix="gguf-check-") as scratch:
        tmp.mkdir()
        np.save(Path(scratch) / "windows.npy", windows)  # the child's copy of the validation windows
        request = {
            "model_dir": str(model_dir.resolve()),
            "tokenizer_dir": str(tokenizer_dir.resolve()),
            "windows": str(Path(scratch) / "windows.npy"),
            "texts": val_text(windows, enc) + [enc.decode(ids) for ids in chat_ids],
            "greedy_tokens": params.parity_tokens,
            "chats": chats,
            "chat_ids": chat_ids,
        }
        for gguf_type in params.gguf_types:
            path = tmp / f"{name}-{gguf_type}.gguf"
            print(f"export: {model_dir} → {path.name}", file=sys.stderr)
            write_gguf(model, tokenizer, template, path, gguf_type, f"llm-pipeline-{name}", native_ids)
            metrics["files"][gguf_type] = path.name
            metrics["size_mb"][gguf_type] = round(path.stat().st_size / 1e6, 3)
            if runtime:
                try:
                    metrics[gguf_type] = check_in_child(
                        "check_file", path, params.gguf_check_timeout, gguf_type=gguf_type, **request
                    )
                except ChildCrashed as exc:
                    reason = one_line(
                        str(exc).replace(str(tmp), str(shown_as or out_dir))
                    )  # the path the user will find
                    print(f"warning: {reason}", file=sys.stderr)
                    metrics[gguf_type] = {"passed": False, "crashed": exc.cause, "reason": reason}
                    crashes.append(f"{gguf_type}: llama.cpp crashed ({exc.cause})")
        if crashes:
            metrics["unverified"] = "; ".join(crashes) + f" — published unverified ({CRASH_ADVICE})"
        (tmp / MODELFILE).write_text(
            modelfile(metrics["files"][params.gguf_types[0]], template, cfg.context_length), encoding="utf-8"
        )
    return metrics
