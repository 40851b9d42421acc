"""Held-out answers: the fine-tuned model answers the SFT test split, and the answers are written as JSONL.

The judge stage scores these files; SFT and DPO write them the same way so the two can be compared item by item.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import tiktoken
import torch
from tqdm.auto import tqdm

from pipeline.common.atomic import atomic_path
from pipeline.common.config import AnsweringParams
from pipeline.data.instructions import Example
from pipeline.data.prompts import Template, decode_response, encode_prompt, stop_id
from pipeline.model.generate import generate
from pipeline.model.gpt import GPT
from pipeline.model.sampling import SamplingOptions


@dataclass(frozen=True)
class Responses:
    records: list[dict]  # the responses JSONL contract: id, instruction, input, output, response
    prompts_cut: int  # prompts shortened from the left to leave room for an answer


@torch.inference_mode()
def generate_responses(
    model: GPT,
    enc: tiktoken.Encoding,
    examples: Sequence[Example],
    template: Template,
    opts: SamplingOptions,
    batch_size: int,
    desc: str = "responses",
) -> Responses:
    """Answer every held-out instruction with the KV-cache generator, stopping at EOT.

    Prompts of equal token length are generated together (the model has no padding mask, so a batch must be
    rectangular); answers come back in the examples' order. A prompt that leaves fewer than
    min(max_new_tokens, context/4) free positions is cut from the left, keeping the '### Response:' end.
    """
    device = next(model.parameters()).device
    context = model.cfg.context_length
    room = min(opts.max_new_tokens, context // 4)
    prompts, cut = [], 0
    for example in examples:
        ids = encode_prompt(enc, example.instruction, example.input, template, example.context)
        if len(ids) > context - room:
            ids, cut = ids[len(ids) - (context - room) :], cut + 1
        prompts.append(ids)
    by_length: dict[int, list[int]] = defaultdict(list)
    for i, ids in enumerate(prompts):
        by_length[len(ids)].append(i)
    groups = [
        group[s : s + batch_size] for group in by_length.values() for s in range(0, len(group), batch_size)
    ]
    answers: list[str] = [""] * len(examples)
    for group in tqdm(groups, desc=desc, leave=False):
        batch = torch.tensor([prompts[i] for i in group], dtype=torch.long, device=device)
        out = generate(model, batch, opts)[:, batch.shape[1] :].tolist()
        for i, new_ids in zip(group, out, strict=False):
            answers[i] = decode_response(enc, new_ids, template)
    records = [
        {"id": e.id, "instruction": e.instruction, "input": e.input, "output": e.output, "response": answer}
        for e, answer in zip(examples, answers, strict=False)
    ]
    return Responses(records, cut)


def sampling_options(
    enc: tiktoken.Encoding, p: AnsweringParams, template: Template | None = None
) -> SamplingOptions:
    """Held-out answers' sampling (``sft``'s or ``dpo``'s params): they stop at EOT, or at a native template's
    end-of-turn token."""
    return SamplingOptions(
        max_new_tokens=p.max_new_tokens,
        temperature=p.temperature,
        top_k=p.top_k,
        eos_id=stop_id(enc, template),
        seed=p.seed,
        repeat_penalty=p.repeat_penalty,
        repeat_last_n=p.repeat_last_n,
    )


def write_responses(path: Path, records: Sequence[dict]) -> None:
    """The responses JSONL contract, one object per line, written atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
