"""`python -m pipeline generate`: a model continues a prompt in the terminal, token by token.

    python -m pipeline generate --model models/base "En un lugar de la Mancha"
    echo "Name a primary color." | python -m pipeline generate --model models/sft --json

The model loads through the server's loader (``served_model.load_model_dir``: a torch model directory or the
ONNX export) and generates through the server's ``generate_text``, so the terminal, the Ollama API and the chat
page give the same text for the same options and seed. The sampling options are shared with ``chat``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

from pipeline.common.errors import PipelineError
from pipeline.data.prompts import stop_id
from pipeline.model.sampling import SamplingOptions
from pipeline.serve.served_model import Generated, ServedModel, fit_prompt, generate_text, load_model_dir


def add_model_arguments(parser: argparse.ArgumentParser, default_model: str) -> None:
    """The options ``generate`` and ``chat`` share: which model, and how to sample."""
    parser.add_argument(
        "--model",
        default=default_model,
        metavar="DIR",
        help=f"a model directory (models/base, models/sft, models/dpo) or the ONNX export (models/onnx); "
        f"default {default_model}",
    )
    parser.add_argument(
        "--variant", default="fp32", choices=["fp32", "int8"], help="ONNX export only: which graph"
    )
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    parser.add_argument(
        "--top-k", type=int, default=40, help="sample among the k likeliest tokens; 0 = off (default 40)"
    )
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass; 1 = off (default 1)")
    parser.add_argument(
        "--seed", type=int, default=1337, help="random seed: the same seed gives the same text"
    )
    parser.add_argument("--max-tokens", type=int, default=200, help="new tokens at most (default 200)")
    parser.add_argument(
        "--stop", action="append", default=[], metavar="TEXT", help="stop before this text (repeatable)"
    )


def check_sampling(args: argparse.Namespace) -> None:
    """Each bad sampling value named by its flag: checked before the model loads, so a typo costs no load."""
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise PipelineError(f"--temperature must be a number >= 0, got {args.temperature}")
    if args.top_k < 0:
        raise PipelineError(f"--top-k must be >= 0 (0 = off), got {args.top_k}")
    if not 0 < args.top_p <= 1:
        raise PipelineError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.max_tokens <= 0:
        raise PipelineError(f"--max-tokens must be > 0, got {args.max_tokens}")
    if not 0 <= args.seed < 2**64:
        raise PipelineError(f"--seed must be in [0, 2**64), got {args.seed}")


def sampling_options(args: argparse.Namespace, model: ServedModel) -> SamplingOptions:
    """The sampling options (``check_sampling``'s, with the model's end-of-text token)."""
    check_sampling(args)
    return SamplingOptions(
        max_new_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k or None,
        top_p=args.top_p if args.top_p < 1 else None,
        eos_id=stop_id(model.encoding, model.template),
        seed=args.seed,
    )


def load(args: argparse.Namespace) -> ServedModel:
    path = Path(args.model)
    return load_model_dir(path.name or str(path), path, args.variant)


def run(
    model: ServedModel,
    prompt_ids: list[int],
    opts: SamplingOptions,
    stops: list[str],
    emit: Callable[[str], None],
) -> Generated:
    """Generate after ``prompt_ids``, keeping the prompt's tail that leaves room for the answer (as the server
    does); says on stderr when the prompt's start is cut."""
    kept, room = fit_prompt(prompt_ids, model.context_length, opts.max_new_tokens)
    if len(kept) < len(prompt_ids):
        print(
            f"[the prompt's first {len(prompt_ids) - len(kept)} tokens were dropped: the model's context is "
            f"{model.context_length} tokens]",
            file=sys.stderr,
        )
    return generate_text(
        model, kept, dataclasses.replace(opts, max_new_tokens=room), stops, emit, lambda: False
    )


def prompt_ids(model: ServedModel, prompt: str, raw: bool) -> list[int]:
    """A tuned model gets the prompt in its template (as Ollama's /api/generate does) unless ``raw``."""
    if raw or model.template is None:
        return model.encoding.encode_ordinary(prompt)
    return model.chat_ids([("user", prompt)])


def read_prompt(argument: str | None) -> str:
    if argument is not None and argument != "-":
        return argument
    if sys.stdin is None:
        raise PipelineError("generate: stdin is closed: give the prompt as an argument, or pipe it on stdin")
    if sys.stdin.isatty():
        raise PipelineError("generate: give a prompt argument, or pipe the prompt on stdin")
    try:
        return sys.stdin.read()
    except UnicodeDecodeError as exc:
        raise PipelineError(f"generate: the prompt on stdin is not valid UTF-8 (byte {exc.start})") from None


def cli_generate(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("prompt", nargs="?", help="the prompt (default, or '-': read it from stdin)")
    add_model_arguments(parser, "models/base")
    parser.add_argument(
        "--raw", action="store_true", help="send the prompt as is, without the model's template"
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object (prompt, response, token counts, done_reason) instead of streaming",
    )
    args = parser.parse_args(argv)
    check_sampling(args)
    prompt = read_prompt(args.prompt)
    if not prompt.strip():
        raise PipelineError("generate: the prompt is empty")
    model = load(args)
    opts = sampling_options(args, model)
    ids = prompt_ids(model, prompt, args.raw)
    pieces: list[str] = []

    def emit(text: str) -> None:
        pieces.append(text)
        if not args.json:
            sys.stdout.write(text)
            sys.stdout.flush()

    try:
        generated = run(model, ids, opts, args.stop, emit)
    except KeyboardInterrupt:
        print("\n(interrupted)", file=sys.stderr)
        return 130
    if args.json:
        print(
            json.dumps(
                {
                    "model": str(args.model),
                    "template": model.template_name or "raw",
                    "prompt": prompt,
                    "response": "".join(pieces),
                    "done_reason": generated.done_reason,
                    "prompt_tokens": len(generated.prompt_ids),
                    "tokens": len(generated.output_ids),
                    "seed": opts.seed,
                },
                ensure_ascii=False,
            )
        )
    else:
        print()
    return 0
