"""`python -m pipeline chat`: talk to an instruction-tuned model in the terminal, in its own template.

    python -m pipeline chat --model models/sft

A ``chat``-template model, or one tuned in its base's own template (``native``: SmolLM2's or Qwen3's ChatML,
Llama 3's headers), sees the whole conversation, oldest turns dropped (and said so) when it outgrows the
context; an ``alpaca`` model is single-turn by design, so each message is answered on its own, and the screen says
so. ``/reset`` forgets the conversation, ``/exit``, Ctrl-D or Ctrl-C quit. Loading, sampling and generation are
``generate``'s, which are the server's.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.common.errors import PipelineError
from pipeline.serve.generate_cli import add_model_arguments, check_sampling, load, run, sampling_options
from pipeline.serve.served_model import ServedModel

COMMANDS_HELP = "/reset starts over, /exit (or Ctrl-D, Ctrl-C) quits"


class Conversation:
    """The turns sent with the next message: every earlier turn that fits for a ``chat`` model, none otherwise."""

    def __init__(self, model: ServedModel, answer_room: int, system: str | None = None):
        self.model = model
        self.multi_turn = model.template_name in ("chat", "native")
        self.system = [("system", system)] if system else []
        # What the prompt may fill; the server's fit_prompt keeps min(max tokens, context / 4) for the answer.
        self.budget = model.context_length - min(answer_room, max(1, model.context_length // 4))
        self.turns: list[tuple[str, str]] = []

    def prompt(self, message: str) -> tuple[list[int], int]:
        """(prompt ids for ``message``, how many earlier exchanges were dropped to fit the context)."""
        history = self.turns if self.multi_turn else []
        dropped = 0
        while True:
            ids = self.model.chat_ids([*self.system, *history, ("user", message)])
            if len(ids) <= self.budget or not history:
                break
            history, dropped = history[2:], dropped + 1
        self.turns = history
        return ids, dropped

    def add(self, message: str, answer: str) -> None:
        if self.multi_turn:
            self.turns += [("user", message), ("assistant", answer)]

    def reset(self) -> None:
        self.turns = []


def banner(model: ServedModel, name: str) -> str:
    if model.template_name in ("chat", "native"):
        which = "the base's own chat template" if model.template_name == "native" else "chat template"
        mode = (
            f"{which}: multi-turn, the model sees the conversation so far (its context is "
            f"{model.context_length} tokens; the oldest exchanges are dropped when it is full)"
        )
    elif model.template == "alpaca":
        mode = (
            "alpaca template: single-turn, each message is answered on its own; the model does not see "
            "earlier exchanges"
        )
    else:
        mode = "base model (no template): it continues the text you type, one message at a time"
    return f"chatting with {name} — {mode}\n{COMMANDS_HELP}"


def answer(model: ServedModel, conversation: Conversation, message: str, args: argparse.Namespace) -> None:
    ids, dropped = conversation.prompt(message)
    if dropped:
        print(f"[context full: dropped the {dropped} oldest exchange(s)]", flush=True)
    pieces: list[str] = []

    def emit(text: str) -> None:
        pieces.append(text)
        sys.stdout.write(text)
        sys.stdout.flush()

    run(model, ids, sampling_options(args, model), args.stop, emit)
    print("\n", flush=True)
    conversation.add(message, "".join(pieces).strip())


def loop(model: ServedModel, conversation: Conversation, args: argparse.Namespace) -> None:
    while True:
        try:
            message = input(">>> ").strip()
        except EOFError:
            return
        if not message:
            continue
        if message == "/exit":
            return
        if message == "/reset":
            conversation.reset()
            print("[conversation reset]\n", flush=True)
        elif message.startswith("/"):
            print(f"[unknown command {message.split()[0]}: {COMMANDS_HELP}]\n", flush=True)
        else:
            answer(model, conversation, message, args)


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline chat", description=__doc__.split("\n\n")[0])
    add_model_arguments(parser, "models/sft")
    parser.add_argument("--system", help="a system message sent with every message")
    args = parser.parse_args(argv)
    check_sampling(args)  # bad options fail before the model loads
    if sys.stdin is None:
        raise PipelineError("chat: stdin is closed: chat reads your messages from it (run it in a terminal)")
    model = load(args)
    try:
        import readline  # noqa: F401  line editing and history for input()
    except ImportError:
        pass
    print(banner(model, args.model), flush=True)
    try:
        loop(model, Conversation(model, args.max_tokens, args.system), args)
    except KeyboardInterrupt:
        pass
    print("\n[bye]", flush=True)
    return 0
