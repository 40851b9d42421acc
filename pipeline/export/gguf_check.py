"""Proof of a GGUF file in the real runtime: llama.cpp (through ``llama-cpp-python``) loads it, tokenizes as we do,
formats chats as our server does, and predicts the tokens our model predicts.

Agreement is teacher-forced top-1 (at every position of real validation windows, is llama.cpp's most likely
next token ours?) with an f32 KV cache, so only the weights' storage type and ggml's kernels differ: ggml's GELU
goes through an f16 table and f16/q8_0 round the weights, which flips near-ties — token-for-token greedy
equality over long runs is too strict a test, so greedy agreement is reported (with the first divergence and
our logit margin there), and the teacher-forced share must reach ``MIN_TOP1``.

llama.cpp is native code with CPU-specific paths, so it only ever runs in a child process (``pipeline.common.isolated``):
the export and the tests call ``check_in_child`` and never import ``llama_cpp`` themselves. In the child, the file
is loaded without weight repacking: on CPUs with AMX, llama.cpp repacks q8_0 weights into its AMX buffer type and
the first decode segfaults there (ggml-org/llama.cpp#20824); without repacking the same file decodes correctly.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tiktoken
import torch

from pipeline.common.errors import PipelineError
from pipeline.common.isolated import run_isolated
from pipeline.model.generate import stream_tokens
from pipeline.model.gpt import GPT
from pipeline.model.sampling import SamplingOptions

MIN_TOP1 = {"f32": 0.99, "f16": 0.98, "q8_0": 0.95}
GREEDY_PROMPT_TOKENS = 16
# Digits, runs of newlines and spaces, accents (composed and decomposed), emoji, contractions, special tokens.
EDGE_CASE = (
    "Año 1605: 1234567 x 89.5%  —  ¡Olé! café naïve Ma\u0301laga 🙂🙂\n\n\n\t\ttabs   and    spaces  \n"
    "don't I'LL we've <|endoftext|><|user|>hi<|end|><|assistant|>  trailing   "
)


RUNTIME = "llama.cpp (llama-cpp-python)"
# What a user can do when llama.cpp dies on one of our files: the check's one line ends with it.
CRASH_ADVICE = (
    "the file itself was written; load it with llama.cpp's --no-repack, or use the f16 file, and see "
    "docs/export.md (GGUF on CPUs with AMX)"
)


def runtime_name() -> str | None:
    """``llama.cpp via llama-cpp-python X`` when the runtime is installed, else None (found, never imported)."""
    if importlib.util.find_spec("llama_cpp") is None:
        return None
    return f"llama.cpp via llama-cpp-python {importlib.metadata.version('llama_cpp_python')}"


@contextlib.contextmanager
def no_weight_repacking() -> Iterator[None]:
    """Models loaded in the block keep their weights in llama.cpp's plain CPU buffers (``--no-repack``).

    llama-cpp-python's ``Llama`` has no argument for ``use_extra_bufts``; it builds its model params from
    ``llama_model_default_params`` at load time, so the defaults are changed for the load only."""
    from llama_cpp import llama_cpp as lib

    defaults = lib.llama_model_default_params

    def without_extra_buffers():
        params = defaults()
        params.use_extra_bufts = False  # the extra buffer types are the repacked ones (AMX, CPU_REPACK)
        return params

    lib.llama_model_default_params = without_extra_buffers
    try:
        yield
    finally:
        lib.llama_model_default_params = defaults


def load(path: Path, context_length: int):
    """The GGUF file in llama.cpp: all logits kept (teacher forcing), f32 KV cache, no weight repacking, quiet."""
    from llama_cpp import GGML_TYPE_F32, Llama

    try:
        with no_weight_repacking():
            return Llama(
                model_path=str(path),
                n_ctx=context_length,
                n_batch=context_length,
                n_ubatch=context_length,
                n_threads=len(os.sched_getaffinity(0)),
                logits_all=True,
                type_k=GGML_TYPE_F32,
                type_v=GGML_TYPE_F32,
                verbose=False,
            )
    except (ValueError, RuntimeError) as exc:
        raise PipelineError(f"{path}: llama.cpp cannot load it ({exc})") from None


def tokenizer_mismatches(llm, enc: tiktoken.Encoding, texts: Sequence[str]) -> tuple[int, dict | None]:
    """(tokens compared, the first text whose llama.cpp ids differ from ours, or None)."""
    compared = 0
    for text in texts:
        ours = enc.encode(text, allowed_special="all")
        theirs = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        compared += len(ours)
        if ours != theirs:
            at = next(
                (i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b),
                min(len(ours), len(theirs)),
            )
            return compared, {
                "text": text[:200],
                "index": at,
                "ours": ours[at : at + 8],
                "llama_cpp": theirs[at : at + 8],
            }
    return compared, None


def logits_of(llm, ids: Sequence[int]) -> np.ndarray:
    """llama.cpp's logits at every position of ``ids`` (a fresh sequence)."""
    llm.reset()
    llm.eval(list(ids))
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


@dataclass
class Agreement:
    positions: int
    top1: float
    max_abs_logit_diff: float


@torch.inference_mode()
def teacher_forced(llm, model: GPT, windows: np.ndarray) -> Agreement:
    agree, positions, diff = 0, 0, 0.0
    for row in windows:
        ours = model(torch.from_numpy(row[None, :]).long())[0][0].float().numpy()
        theirs = logits_of(llm, row.tolist())
        agree += int((ours.argmax(-1) == theirs.argmax(-1)).sum())
        positions += len(row)
        diff = max(diff, float(np.abs(ours - theirs).max()))
    return Agreement(positions, agree / positions, diff)


@torch.inference_mode()
def greedy(llm, model: GPT, prompts: Sequence[Sequence[int]], tokens: int) -> dict:
    """Greedy continuations side by side: tokens equal before the first divergence, and our top-1 minus
    top-2 logit at the divergence (a small margin is a near-tie that rounding may flip)."""
    matched, total, first = 0, 0, None
    for prompt in prompts:
        opts = SamplingOptions(max_new_tokens=tokens, temperature=0.0)
        ours = [int(t) for t in stream_tokens(model, torch.tensor([list(prompt)]), opts)]
        llm.reset()
        llm.eval(list(prompt))
        theirs = []
        for _ in range(len(ours)):
            theirs.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval([theirs[-1]])
        same = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b), len(ours))
        matched, total = matched + same, total + len(ours)
        if same < len(ours) and first is None:
            logits = model(torch.tensor([list(prompt) + ours[:same]]))[0][0, -1]
            top2 = torch.topk(logits, 2).values
            first = {
                "prompt": prompts.index(prompt),
                "token": same,
                "ours": ours[same],
                "llama_cpp": theirs[same],
                "our_logit_margin": round(float(top2[0] - top2[1]), 6),
            }
    return {
        "tokens_matched": matched,
        "tokens": total,
        "share": matched / max(total, 1),
        "first_divergence": first,
    }


def chat_template_check(
    llm,
    enc: tiktoken.Encoding,
    conversations: Sequence[Sequence[tuple[str, str]]],
    expected: Sequence[list[int]],
) -> bool:
    """Whether llama-cpp-python's Jinja chat formatter, fed the file's ``tokenizer.chat_template``, gives our
    prompt ids for each conversation."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        return False
    # the file's bos/eos texts, as llama-cpp-python's own formatter takes them (a base's template may write them)
    bos, eos = (llm.detokenize([t], special=True).decode() for t in (llm.token_bos(), llm.token_eos()))
    formatter = Jinja2ChatFormatter(template, eos_token=eos, bos_token=bos)
    for turns, ids in zip(conversations, expected, strict=True):
        messages = [{"role": r, "content": c} for r, c in turns]
        prompt = formatter(messages=messages, enable_thinking=False).prompt  # as chat_template.py renders
        if enc.encode(prompt, allowed_special="all") != ids:
            return False
    return True


def verify(
    path: Path,
    gguf_type: str,
    model: GPT,
    enc: tiktoken.Encoding,
    texts: Sequence[str],
    windows: np.ndarray,
    greedy_tokens: int,
    chats: Sequence[Sequence[tuple[str, str]]] = (),
    chat_ids: Sequence[list[int]] = (),
) -> dict:
    """Run every check on one GGUF file; raise PipelineError when one fails, else return the figures."""
    llm = load(path, model.cfg.context_length)
    try:
        compared, mismatch = tokenizer_mismatches(llm, enc, [*texts, EDGE_CASE])
        if mismatch:
            raise PipelineError(
                f"{path.name}: llama.cpp tokenizes differently from ours at token {mismatch['index']} "
                f"of {mismatch['text']!r}: ours {mismatch['ours']}, llama.cpp {mismatch['llama_cpp']}"
            )
        agreement = teacher_forced(llm, model, windows)
        if agreement.top1 < MIN_TOP1[gguf_type]:
            raise PipelineError(
                f"{path.name}: llama.cpp's top-1 next token agrees with ours at {agreement.top1:.2%} "
                f"of {agreement.positions} positions < {MIN_TOP1[gguf_type]:.0%} for {gguf_type}"
            )
        prompts = [row[:GREEDY_PROMPT_TOKENS].tolist() for row in windows[:2]]
        greedy_tokens = min(greedy_tokens, model.cfg.context_length - GREEDY_PROMPT_TOKENS)
        chat_ok = chat_template_check(llm, enc, chats, chat_ids) if chats else None
        if chat_ok is False:
            raise PipelineError(
                f"{path.name}: tokenizer.chat_template, rendered by llama-cpp-python, does not give "
                "our prompt ids"
            )
        return {
            "tokenizer_tokens_compared": compared,
            "tokenizer_identical": True,
            "teacher_forced_positions": agreement.positions,
            "top1_agreement": agreement.top1,
            "min_top1_agreement": MIN_TOP1[gguf_type],
            "max_abs_logit_diff": agreement.max_abs_logit_diff,
            "greedy": greedy(llm, model, prompts, greedy_tokens),
            "chat_template_matches": chat_ok,
            "passed": True,
        }
    finally:
        llm.close()


# ---------------------------------------------------------------------------------------------- the child's side


def check_file(
    gguf: str,
    gguf_type: str,
    model_dir: str,
    tokenizer_dir: str,
    windows: str,
    texts: list[str],
    greedy_tokens: int,
    chats: list,
    chat_ids: list,
) -> dict:
    """In the child: every check of ``verify`` on one file, against the model saved in ``model_dir`` and the
    validation windows saved (``.npy``) at ``windows``."""
    from pipeline.model.checkpoint import load_with_tokenizer

    loaded = load_with_tokenizer(Path(model_dir), Path(tokenizer_dir))
    return verify(
        Path(gguf),
        gguf_type,
        loaded.model.eval(),
        loaded.enc,
        texts,
        np.load(windows, allow_pickle=False),
        greedy_tokens,
        [[tuple(turn) for turn in chat] for chat in chats],
        chat_ids,
    )


def check_tokenizer(
    gguf: str, tokenizer_dir: str, context_length: int, texts: list[str], chats: list, chat_ids: list
) -> dict:
    """In the child: llama.cpp's tokenizer and chat template against ours, on one file (no decoding)."""
    from pipeline.data.tokenizer import load_tokenizer

    enc = load_tokenizer(Path(tokenizer_dir))
    llm = load(Path(gguf), context_length)
    try:
        compared, mismatch = tokenizer_mismatches(llm, enc, [*texts, EDGE_CASE])
        chat_ok = (
            chat_template_check(llm, enc, [[tuple(t) for t in c] for c in chats], chat_ids) if chats else None
        )
    finally:
        llm.close()
    return {"tokenizer_tokens_compared": compared, "mismatch": mismatch, "chat_template_matches": chat_ok}


# ---------------------------------------------------------------------------------------------- the caller's side


def check_in_child(check: str, gguf: Path, timeout: float, **request) -> dict:
    """``check`` (``check_file`` or ``check_tokenizer``) on ``gguf`` in a child process: its figures, a
    PipelineError for a failed check, or ChildCrashed when llama.cpp dies or hangs."""
    return run_isolated(
        f"{__name__}:{check}",
        {"gguf": str(gguf), **request},
        subject=str(gguf),
        runtime=RUNTIME,
        advice=CRASH_ADVICE,
        timeout=timeout,
    )
