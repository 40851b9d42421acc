"""Hugging Face export: a model directory that ``transformers`` loads, with our tokenizer and chat templates.

Our GPT leaves as GPT-2 (``GPT2LMHeadModel``, learned positions) or as the Llama family (rotary positions:
``LlamaForCausalLM``, or ``Qwen3ForCausalLM`` with q/k norms); a shape neither holds is refused in one line.
``models/hf`` holds ``config.json`` (a GPT2Config, LlamaConfig or Qwen3Config of our shape),
``model.safetensors`` (that layout, a tied matrix stored once), ``generation_config.json`` (our stop ids),
``tokenizer.json`` + ``tokenizer_config.json`` (byte-level BPE from our tiktoken ranks with our split regex and
special tokens; ``ignore_merges`` makes a piece that is itself a token one token, as tiktoken does — the ``char``
kind's characters are reachable only that way) and the chat templates ``alpaca`` and ``chat`` (the default: the
one the model was fine-tuned with; a model tuned in its base's own template, ``native``, has that Jinja as the
default, with the base's bos/eos tokens), so ``apply_chat_template`` gives exactly our prompt ids (checked at
export). Nothing needs the network or a Hub login.

Before the directory replaces ``models/hf`` the export loads it back through transformers and checks logits,
tokenizer ids and greedy decoding against ours; a failed check leaves the old directory in place.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import tiktoken
import torch

from pipeline.common.atomic import atomic_path
from pipeline.common.config import ExportParams
from pipeline.common.errors import PipelineError, quiet_logger
from pipeline.data.chat_template import ChatTemplate
from pipeline.data.prompts import ALPACA_PREAMBLE, Template, chat_prompt_ids, template_name
from pipeline.data.shards import ShardDataset
from pipeline.data.tokenizer import ASSISTANT, END_OF_TURN, EOT, SYSTEM, USER, read_metadata
from pipeline.model import llama_layout
from pipeline.model.checkpoint import load_with_tokenizer, save_tensors
from pipeline.model.generate import stream_tokens
from pipeline.model.gpt import GPT, GPTConfig
from pipeline.model.gpt2_layout import config_to_hf, require_gpt2, to_gpt2
from pipeline.model.sampling import SamplingOptions

WEIGHTS = "model.safetensors"
FORMAT = "the Hugging Face GPT-2 format"
LLAMA_FORMAT = "the Hugging Face Llama format"
CARD = "README.md"
TEXT_WINDOWS = 32  # validation windows decoded to text for the tokenizer check
LOGIT_WINDOWS, LOGIT_TOKENS = 4, 256  # of which the first rows and tokens go through both models
# Strings a tokenizer port most often gets wrong: digits, CRLF, accents, emoji, specials between text.
EDGE_TEXTS = (
    "1234567890 3.14159 2026-11-30",
    "línea uno\r\nlínea dos\r\n\r\n",
    "Ñandú, pingüino, über, café, naïve",
    "emoji 😀🚀 y 漢字",
    f"{EOT}texto{USER}hola{END_OF_TURN}{ASSISTANT}",
    "  espacios   y\ttabs\n\n\n",
)


def _alpaca_template() -> str:
    """The book's Alpaca prompt; a user message may carry the record's ``input`` as an extra key."""
    return (
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'user' and loop.first -%}"
        "{{ '" + ALPACA_PREAMBLE + "\\n\\n### Instruction:\\n' + message['content'] }}"
        "{%- if message.get('input') -%}{{ '\\n\\n### Input:\\n' + message['input'] }}{%- endif -%}"
        "{{ '\\n\\n### Response:\\n' }}"
        "{%- elif message['role'] == 'assistant' and loop.index == 2 -%}"
        "{{ message['content'] + eos_token }}"
        "{%- else -%}"
        "{{ raise_exception('the alpaca template takes one user message and optionally its answer; use the chat template') }}"
        "{%- endif -%}"
        "{%- endfor -%}"
    )


def _chat_template() -> str:
    """Each turn framed by our markers; the last assistant answer ends with EOT, as in training."""
    markers = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
    return (
        "{%- for message in messages -%}"
        "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
        "{{ raise_exception('roles are system, user and assistant') }}"
        "{%- endif -%}"
        + "".join(
            "{%- if message['role'] == '"
            + role
            + "' -%}{{ '"
            + marker
            + "' + message['content'] + '"
            + END_OF_TURN
            + "' }}"
            "{%- endif -%}"
            for role, marker in markers.items()
        )
        + "{%- if loop.last and message['role'] == 'assistant' -%}{{ eos_token }}{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '" + ASSISTANT + "' }}{%- endif -%}"
    )


TEMPLATES = {"alpaca": _alpaca_template, "chat": _chat_template}


def _bpe_from_ranks(ranks: dict[bytes, int], pattern: str, specials: dict[str, int]):
    """A ``tokenizers`` byte-level BPE from tiktoken ranks by transformers' TikTokenConverter, fed the ranks we loaded
    and verified: its own loader reads the file through tiktoken's cache, which is keyed by the path string, so a
    relative ``data/tokenizer/…`` could return another project's ranks. Special tokens whose ids lie among the ranks
    (a base's, as SmolLM2 puts its own first: tokenizer.kind hf) go into the BPE vocabulary at those ids; the
    converter appends the others after it."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ordered = sorted(specials, key=specials.get)
    converter = TikTokenConverter(vocab_file=None, pattern=pattern, extra_special_tokens=ordered)
    converter.load_tiktoken_bpe = lambda _path: ranks
    inside = {token: i for token, i in specials.items() if i < len(ranks)}
    if inside:
        extract = converter.extract_vocab_merges_from_model

        def with_specials(url):
            vocab, merges = extract(url)
            return vocab | inside, merges

        converter.extract_vocab_merges_from_model = with_specials
    return converter.converted()


def hf_tokenizer(enc: tiktoken.Encoding, meta: dict, context_length: int, template: Template):
    """Our tokenizer as a transformers fast tokenizer (ids checked to be the same ids); a native template brings
    the base's bos/eos tokens (the template may write them), and none where the base names none."""
    from transformers import PreTrainedTokenizerFast

    specials = sorted(meta["special_tokens"], key=meta["special_tokens"].get)
    backend = _bpe_from_ranks(enc.__getstate__()["mergeable_ranks"], meta["pattern"], meta["special_tokens"])
    backend.model.ignore_merges = (
        True  # a piece that is a token stays one token (tiktoken's rule; char kind needs it)
    )
    wrong = {
        s: backend.token_to_id(s) for s in specials if backend.token_to_id(s) != meta["special_tokens"][s]
    }
    if wrong or backend.get_vocab_size() != meta["vocab_size"]:
        raise PipelineError(
            f"tokenizer {meta['fingerprint'][:12]}: special tokens {wrong} or vocab size {backend.get_vocab_size()} "
            "differ in the tokenizers port (ids must be contiguous after the mergeable ranks)"
        )
    native = isinstance(template, ChatTemplate)
    tokens = {"bos_token": EOT, "eos_token": EOT}
    if native:
        tokens = {k: template.tokens.get(k) for k in tokens} | {"unk_token": template.tokens.get("unk_token")}
        tokens = {k: v for k, v in tokens.items() if v is not None}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=EOT,
        model_max_length=context_length,
        clean_up_tokenization_spaces=False,
        **tokens,
    )
    tokenizer.chat_template = {
        "default": template.template if native else TEMPLATES[template](),
        **{name: make() for name, make in TEMPLATES.items()},
    }
    return tokenizer


def architecture(cfg: GPTConfig) -> str:
    """The transformers class our shape exports as (refusing, in one line, a shape no class holds)."""
    if cfg.pos_emb == "learned":  # GPT-2's position table
        require_gpt2(cfg, FORMAT, "hf")
        return "GPT2LMHeadModel"
    llama_layout.require_llama(cfg, LLAMA_FORMAT, "hf")
    return llama_layout.MODEL_TYPES[llama_layout.architecture(cfg)]


def write_hf(
    model: GPT, enc: tiktoken.Encoding, meta: dict, out: Path, template: Template, **extra: object
) -> None:
    """Write the Hugging Face directory ``out`` (which must not exist); the model card comes after the checks."""
    from transformers import GenerationConfig

    cfg = model.cfg
    gpt2 = architecture(cfg) == "GPT2LMHeadModel"
    stops = [enc.eot_token, enc.encode_single_token(END_OF_TURN)]
    if isinstance(template, ChatTemplate):
        stops.append(template.stop_id(enc))
    out.mkdir()
    tensors = to_gpt2(model.state_dict(), cfg) if gpt2 else llama_layout.to_hf(model.state_dict(), cfg)
    save_tensors(tensors, out / WEIGHTS, metadata={"format": "pt"})
    ours = {
        "model": cfg.to_dict(),
        "tokenizer": {"kind": meta["kind"], "fingerprint": meta["fingerprint"]},
        "template": template_name(template),
        **extra,
    }
    if gpt2:
        hf_config = config_to_hf(cfg, enc.eot_token, llm_pipeline=ours)
    else:
        hf_config = llama_layout.config_to_hf(cfg, enc.eot_token, enc.eot_token, llm_pipeline=ours)
    (out / "config.json").write_text(
        json.dumps(hf_config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    GenerationConfig(
        bos_token_id=enc.eot_token, eos_token_id=stops, pad_token_id=enc.eot_token
    ).save_pretrained(out)
    hf_tokenizer(enc, meta, cfg.context_length, template).save_pretrained(out)


def load_hf(directory: Path):
    """(model, tokenizer) through transformers' Auto classes, as a user of the directory would load them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with quiet_logger("transformers"):
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(directory)
    return model, tokenizer


def tokenizer_agreement(tokenizer, enc: tiktoken.Encoding, texts: list[str]) -> tuple[float, int]:
    """Share of ``texts`` that the transformers tokenizer encodes to exactly our ids (specials as specials)."""
    same = sum(
        tokenizer.encode(t, add_special_tokens=False) == enc.encode(t, allowed_special="all") for t in texts
    )
    return same / len(texts), len(texts)


@torch.inference_mode()
def max_logit_diff(ours: GPT, theirs, windows: np.ndarray) -> float:
    ids = torch.from_numpy(np.ascontiguousarray(windows)).long()
    return float((ours(ids)[0] - theirs(ids).logits).abs().max())


@torch.inference_mode()
def greedy_agreement(ours: GPT, theirs, prompt: list[int], tokens: int) -> int:
    """Tokens that transformers' greedy ``generate`` shares with ours before the first difference (no EOS stop)."""
    opts = SamplingOptions(max_new_tokens=tokens, temperature=0.0)
    mine = [int(t) for t in stream_tokens(ours, torch.tensor([prompt]), opts)]
    with quiet_logger("transformers"):
        out = theirs.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    generated = out[0, len(prompt) :].tolist()
    same = 0
    while same < min(len(mine), len(generated)) and mine[same] == generated[same]:
        same += 1
    return same


# Conversations whose prompt ids transformers' apply_chat_template must give (alpaca: single-turn only)
CHECK_CHATS = (
    (("user", "Name three colours of the rainbow."),),
    (
        ("system", "Answer briefly."),
        ("user", "¿Quién escribió el Quijote?"),
        ("assistant", "Cervantes."),
        ("user", "¿Cuándo?"),
    ),
)


def chat_agreement(tokenizer, enc: tiktoken.Encoding, template: Template) -> tuple[int, int]:
    """(conversations whose ``apply_chat_template`` prompt ids are ours, conversations checked)."""
    chats = [c for c in CHECK_CHATS if template != "alpaca" or len(c) == 1]
    same = 0
    for chat in chats:
        messages = [{"role": role, "content": content} for role, content in chat]
        theirs = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False, enable_thinking=False
        )
        same += list(theirs) == chat_prompt_ids(enc, template, chat)
    return same, len(chats)


def check_hf(
    model: GPT,
    enc: tiktoken.Encoding,
    directory: Path,
    windows: np.ndarray,
    params: ExportParams,
    template: Template = "alpaca",
) -> dict:
    """Load ``directory`` with transformers and compare logits, tokenizer ids, chat prompts and greedy tokens
    with ours."""
    theirs, tokenizer = load_hf(directory)
    diff = max_logit_diff(model, theirs, windows[:LOGIT_WINDOWS, :LOGIT_TOKENS])
    texts = [enc.decode(row.tolist()) for row in windows] + list(EDGE_TEXTS)
    agreement, n_texts = tokenizer_agreement(tokenizer, enc, texts)
    prompt = windows[0, : min(32, model.cfg.context_length - params.parity_tokens)].tolist()
    greedy = greedy_agreement(model, theirs, prompt, params.parity_tokens)
    chats_same, n_chats = chat_agreement(tokenizer, enc, template)
    failures = []
    if diff > params.parity_atol:
        failures.append(
            f"max |logit(transformers) - logit(torch)| = {diff:.3g} > export.parity_atol={params.parity_atol:g}"
        )
    if agreement < 1.0:
        failures.append(f"the tokenizer.json port encodes {agreement:.1%} of {n_texts} texts to our ids")
    if chats_same < n_chats:
        failures.append(
            f"apply_chat_template gives our prompt ids for {chats_same} of {n_chats} conversations "
            f"(template {template_name(template)})"
        )
    if greedy < params.parity_tokens:
        failures.append(
            f"greedy decoding left ours after {greedy} of export.parity_tokens={params.parity_tokens} tokens"
        )
    if failures:
        raise PipelineError(f"Hugging Face export failed: {'; '.join(failures)}; nothing was exported")
    return {
        "max_abs_logit_diff": diff,
        "atol": params.parity_atol,
        "tokenizer_agreement": agreement,
        "tokenizer_texts": n_texts,
        "greedy_tokens_matched": greedy,
        "chat_template_matches": chats_same == n_chats,
        "passed": True,
    }


def hf_readme(cfg: dict, source: str, template: str | None, metrics: dict, name: str) -> str:
    return f"""# {source} for transformers

A {name.removesuffix("ForCausalLM").removesuffix("LMHeadModel")}-architecture model ({cfg["n_layer"]} layers,
{cfg["n_head"]} heads, width {cfg["n_embd"]}, context {cfg["context_length"]}, vocabulary {cfg["vocab_size"]})
trained by the llm-pipeline project, exported as `{name}` with its own tokenizer (byte-level BPE,
`tokenizer.json`) and chat templates `alpaca` and `chat` (default: `{template}`, the one it was fine-tuned with).

```python
from transformers import pipeline

generator = pipeline("text-generation", model="models/hf")
print(generator("En un lugar de la Mancha", max_new_tokens=40, do_sample=False)[0]["generated_text"])
```

Checked at export: max |logit difference| to the pipeline's own model {metrics["max_abs_logit_diff"]:.2e}; the
tokenizer gives the pipeline's ids on {metrics["tokenizer_texts"]} texts; greedy decoding agrees for
{metrics["greedy_tokens_matched"]} tokens.
"""


def export_hf(
    model: GPT,
    enc: tiktoken.Encoding,
    meta: dict,
    out_dir: Path,
    windows: np.ndarray,
    params: ExportParams,
    template: Template,
    source: str,
    **extra: object,
) -> dict:
    """Write ``out_dir`` (replaced atomically, only when every check passes); the parity metrics."""
    with atomic_path(out_dir) as tmp:
        write_hf(model, enc, meta, tmp, template, source=source, **extra)
        metrics = check_hf(model, enc, tmp, windows, params, template)
        (tmp / CARD).write_text(
            hf_readme(model.cfg.to_dict(), source, template_name(template), metrics, architecture(model.cfg)),
            encoding="utf-8",
        )
    return metrics


def export_hf_model(
    model_dir: Path,
    tokenizer_dir: Path,
    shards_dir: Path,
    out_dir: Path,
    params: ExportParams,
    **metadata: object,
) -> dict:
    """Export the model directory ``model_dir`` (checked against the data's tokenizer) into ``out_dir``; the metrics."""
    loaded = load_with_tokenizer(model_dir, tokenizer_dir)
    model = loaded.model.eval()
    if model.cfg.n_classes:
        raise PipelineError(
            f"{model_dir}: a classifier is not a {architecture(model.cfg)} (a language model's head); set "
            "export.formats without hf to export it"
        )
    name = architecture(model.cfg)
    ctx = model.cfg.context_length
    if not 1 <= params.parity_tokens < ctx:
        raise PipelineError(
            f"export.parity_tokens={params.parity_tokens} must be in 1..{ctx - 1} (context_length {ctx})"
        )
    val = ShardDataset(shards_dir, "val", expected_fingerprint=loaded.tokenizer_fingerprint)
    windows = next(val.sequential(TEXT_WINDOWS, ctx, max_batches=1), None)
    if windows is None:
        raise PipelineError(
            f"{shards_dir}: the val split has fewer than {ctx + 1} tokens, no window to check the export on"
        )
    template = loaded.template or "alpaca"
    print(
        f"export: {model_dir} → Hugging Face {name} directory (template {template_name(template)}), parity through "
        "transformers",
        file=sys.stderr,
    )
    return export_hf(
        model,
        loaded.enc,
        read_metadata(tokenizer_dir),
        out_dir,
        windows[0].numpy(),
        params,
        template,
        str(model_dir),
        **metadata,
    )
