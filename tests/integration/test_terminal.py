"""`python -m pipeline generate` and `chat`: the server's loading and generation, in a terminal.

The chat runs in a real terminal: a tmux session that the test types into and reads the screen of."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import pipeline.serve.generate_cli
from pipeline.cli import main
from pipeline.model.sampling import SamplingOptions
from pipeline.serve.chat_cli import Conversation
from pipeline.serve.served_model import generate_text, load_model_dir
from tests.helpers.serving import save_answering_model, save_native_model, save_tiny_model

ROOT = Path(__file__).resolve().parents[2]
CONTEXT = 96
ANSWERS = {"Name a color.": "Blue.", "¿Qué fruta comió Sancho?": "Una manzana."}  # any language in, as typed


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """An alpaca model trained to give ANSWERS, an untrained chat-template model, a base model, and a Llama-family
    model tuned in its base's own ChatML template (template native) to give ANSWERS."""
    root = tmp_path_factory.mktemp("terminal")
    return {
        "sft": save_answering_model(root / "sft", ANSWERS, CONTEXT),
        "native": save_native_model(root / "native", ANSWERS, 256),  # room for a whole conversation
        "chat": save_tiny_model(root / "chat", "chat", CONTEXT, seed=1),
        "base": save_tiny_model(root / "base", None, CONTEXT, seed=2),
    }


# ---------------------------------------------------------------------------------------------- generate


def test_generate_streams_what_the_server_generates(models, capsys):
    assert main(["generate", "--model", str(models["base"]), "--seed", "7", "--max-tokens", "20", "abc"]) == 0
    printed = capsys.readouterr().out
    model = load_model_dir("base", models["base"])
    pieces: list[str] = []
    opts = SamplingOptions(
        max_new_tokens=20, temperature=0.8, top_k=40, eos_id=model.encoding.eot_token, seed=7
    )
    generate_text(model, model.encoding.encode_ordinary("abc"), opts, [], pieces.append, lambda: False)
    assert printed == "".join(pieces) + "\n" and len(pieces) > 1


def test_generate_json_from_stdin_in_the_model_template(models, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("¿Qué fruta comió Sancho?"))
    assert main(["generate", "--model", str(models["sft"]), "--temperature", "0", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (
        result["response"] == "Una manzana."
        and result["template"] == "alpaca"
        and result["done_reason"] == "stop"
    )
    assert result["prompt"] == "¿Qué fruta comió Sancho?" and result["tokens"] > 0


def test_generate_stop_and_max_tokens(models, capsys):
    assert (
        main(
            [
                "generate",
                "--model",
                str(models["sft"]),
                "--temperature",
                "0",
                "--stop",
                "man",
                "¿Qué fruta comió Sancho?",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out == "Una \n"
    assert main(["generate", "--model", str(models["base"]), "--max-tokens", "3", "--json", "abc"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tokens"] == 3 and result["done_reason"] == "length"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--temperature", "-1", "x"], "error: --temperature must be a number >= 0, got -1.0"),
        (["--temperature", "nan", "x"], "error: --temperature must be a number >= 0, got nan"),
        (["--seed", str(2**64), "x"], "error: --seed must be in [0, 2**64), got 18446744073709551616"),
        (["--seed", "-1", "x"], "error: --seed must be in [0, 2**64), got -1"),
        (["--top-p", "0", "x"], "error: --top-p must be in (0, 1], got 0.0"),
        (["--max-tokens", "0", "x"], "error: --max-tokens must be > 0, got 0"),
        (["  "], "error: generate: the prompt is empty"),
    ],
)
def test_generate_bad_options_are_one_line(models, capsys, args, message):
    assert main(["generate", "--model", str(models["base"]), *args]) == 1
    captured = capsys.readouterr()
    assert captured.err.strip() == message and captured.out == ""


@pytest.mark.parametrize(
    "args, message",
    [
        (["--temperature", "inf"], "error: --temperature must be a number >= 0, got inf"),
        (["--top-k", "-2"], "error: --top-k must be >= 0 (0 = off), got -2"),
        (["--top-p", "nan"], "error: --top-p must be in (0, 1], got nan"),
        (["--max-tokens", "-5"], "error: --max-tokens must be > 0, got -5"),
        (["--seed", str(2**64)], "error: --seed must be in [0, 2**64), got 18446744073709551616"),
    ],
)
@pytest.mark.parametrize("command", ["generate", "chat"])
def test_sampling_flags_are_checked_before_the_model_loads(tmp_path, capsys, command, args, message):
    """The model directory does not exist: the flag's error, not the directory's, proves nothing was loaded."""
    prompt = ["hi"] if command == "generate" else []
    assert main([command, "--model", str(tmp_path / "nowhere"), *args, *prompt]) == 1
    assert capsys.readouterr().err.strip() == message


def _cli(args: list[str], shell_redirect: str) -> subprocess.CompletedProcess:
    """``python -m pipeline ARGS`` as a user runs it, stdin redirected by the shell (``<&-`` closes it)."""
    quoted = " ".join(f"'{a}'" for a in args)
    return subprocess.run(
        ["bash", "-c", f"{sys.executable} -m pipeline {quoted} {shell_redirect}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_generate_and_chat_with_stdin_closed_or_empty_are_one_line(models):
    closed = _cli(["generate", "--model", str(models["base"]), "-"], "<&-")
    assert (closed.returncode, closed.stderr.strip()) == (
        1,
        "error: generate: stdin is closed: give the prompt as an argument, or pipe it on stdin",
    )
    empty = _cli(["generate", "--model", str(models["base"]), "-"], "</dev/null")
    assert (empty.returncode, empty.stderr.strip()) == (1, "error: generate: the prompt is empty")
    chat = _cli(["chat", "--model", str(models["sft"])], "<&-")
    assert (chat.returncode, chat.stderr.strip(), chat.stdout) == (
        1,
        "error: chat: stdin is closed: chat reads your messages from it (run it in a terminal)",
        "",
    )
    ended = _cli(["chat", "--model", str(models["sft"])], "</dev/null")  # Ctrl-D at once: a normal goodbye
    assert ended.returncode == 0 and ended.stdout.rstrip().endswith("[bye]") and ended.stderr == ""


def test_generate_seed_out_of_range_through_the_real_cli(models):
    done = _cli(["generate", "--model", str(models["base"]), "--seed", str(2**64), "x"], "")
    assert (done.returncode, done.stderr.strip()) == (
        1,
        "error: --seed must be in [0, 2**64), got 18446744073709551616",
    )


def test_generate_missing_model_dir(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "nowhere"), "hi"]) == 1
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'nowhere'}: model directory not found"


def test_generate_without_a_prompt_at_a_terminal(models, capsys, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stdin", Terminal())
    assert main(["generate", "--model", str(models["base"])]) == 1
    assert (
        capsys.readouterr().err.strip()
        == "error: generate: give a prompt argument, or pipe the prompt on stdin"
    )


def test_chat_bad_input_fails_before_the_session(models, tmp_path, capsys):
    assert main(["chat", "--model", str(tmp_path / "nowhere")]) == 1
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'nowhere'}: model directory not found"
    assert main(["chat", "--model", str(models["sft"]), "--top-k", "-1"]) == 1
    captured = capsys.readouterr()
    assert (
        captured.err.strip() == "error: --top-k must be >= 0 (0 = off), got -1"
        and "chatting" not in captured.out
    )


def interrupted_after_one_piece(model, prompt_ids, opts, stops, emit, cancelled):
    """generate_text as it is when Ctrl-C arrives mid-answer: a piece is out, then KeyboardInterrupt."""
    emit("Bl")
    raise KeyboardInterrupt


def test_ctrl_c_in_the_middle_of_an_answer(models, capsys, monkeypatch):
    monkeypatch.setattr(pipeline.serve.generate_cli, "generate_text", interrupted_after_one_piece)
    assert main(["generate", "--model", str(models["sft"]), "Name a color."]) == 130
    captured = capsys.readouterr()
    assert captured.out == "Bl" and captured.err.strip().endswith("\n(interrupted)")
    monkeypatch.setattr("builtins.input", lambda prompt: "Name a color.")
    assert main(["chat", "--model", str(models["sft"])]) == 0  # the session ends cleanly, no traceback
    assert capsys.readouterr().out.endswith("Bl\n[bye]\n")


# ---------------------------------------------------------------------------------------------- conversation


def test_chat_template_keeps_turns_and_drops_the_oldest_when_full(models):
    model = load_model_dir("chat", models["chat"])
    conversation = Conversation(model, answer_room=16)
    assert conversation.budget == CONTEXT - 16
    ids, dropped = conversation.prompt("hi")
    assert dropped == 0 and ids == model.chat_ids([("user", "hi")])
    conversation.add("hi", "hello")
    ids, dropped = conversation.prompt("more")
    assert dropped == 0 and ids == model.chat_ids([("user", "hi"), ("assistant", "hello"), ("user", "more")])
    conversation.add("more", "x" * 30)
    ids, dropped = conversation.prompt("y" * 30)  # three exchanges no longer fit 80 tokens: the oldest goes
    assert dropped == 1 and len(ids) <= conversation.budget
    assert conversation.turns == [("user", "more"), ("assistant", "x" * 30)]
    conversation.reset()
    assert conversation.prompt("hi") == (model.chat_ids([("user", "hi")]), 0)


def test_alpaca_is_single_turn(models):
    model = load_model_dir("sft", models["sft"])
    conversation = Conversation(model, answer_room=16)
    conversation.add("Name a color.", "Blue.")
    assert conversation.prompt("Name a fruit.") == (model.chat_ids([("user", "Name a fruit.")]), 0)
    assert conversation.turns == []


def test_chat_with_a_llama_family_model_in_its_base_template(models, capsys, monkeypatch):
    """`python -m pipeline chat` on a Llama-family model tuned in template native: every prompt it feeds the model
    is transformers' apply_chat_template of the conversation so far (the base's tokenizer.json and
    tokenizer_config.json, loaded by AutoTokenizer), and each answer stops at the template's <|im_end|>."""
    from transformers import AutoTokenizer

    typed = iter(["Name a color.", "¿Qué fruta comió Sancho?", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt: next(typed))
    generations = []

    def recorded(model, prompt_ids, opts, stops, emit, cancelled):
        generations.append(generate_text(model, prompt_ids, opts, stops, emit, cancelled))
        return generations[-1]

    monkeypatch.setattr(pipeline.serve.generate_cli, "generate_text", recorded)
    assert (
        main(["chat", "--model", str(models["native"]), "--temperature", "0", "--system", "Sé breve."]) == 0
    )
    out = capsys.readouterr().out
    assert "the base's own chat template: multi-turn" in out and "Blue.\n" in out
    tokenizer = AutoTokenizer.from_pretrained(models["native"].parent / "native-base")
    conversation = [{"role": "system", "content": "Sé breve."}]
    for generated, question in zip(generations, ANSWERS, strict=True):
        conversation.append({"role": "user", "content": question})
        expected = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, return_dict=False)
        assert generated.prompt_ids == expected
        assert generated.done_reason == "stop" and generated.stop_id == tokenizer.convert_tokens_to_ids(
            "<|im_end|>"
        )
        answer = tokenizer.decode(generated.output_ids).strip()  # what the chat keeps of the answer
        conversation.append({"role": "assistant", "content": answer})


# ---------------------------------------------------------------------------------------------- tmux


class Tmux:
    """A detached tmux session running one command; keys in, screen out."""

    def __init__(self, name: str, command: list[str], cwd: Path):
        self.name = name
        tmux = shutil.which("tmux")
        self.base = [tmux, "-u", "-L", name]  # UTF-8, and a server of its own: no clash with the user's tmux
        subprocess.run(
            [
                *self.base,
                "new-session",
                "-d",
                "-s",
                name,
                "-x",
                "160",
                "-y",
                "50",
                "-c",
                str(cwd),
                "bash",
                "--norc",
                "--noprofile",
            ],
            check=True,
        )
        subprocess.run([*self.base, "set-option", "-t", name, "remain-on-exit", "on"], check=True)
        self.keys(" ".join(command), "Enter")

    def keys(self, *keys: str) -> None:
        subprocess.run([*self.base, "send-keys", "-t", self.name, *keys], check=True)

    def screen(self) -> str:
        return subprocess.run(
            [*self.base, "capture-pane", "-p", "-t", self.name, "-S", "-200"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout

    def wait_for(self, predicate, what: str, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while not predicate(screen := self.screen()):
            assert time.monotonic() < deadline, f"timed out waiting for {what}; screen:\n{screen}"
            time.sleep(0.2)
        return screen

    def close(self) -> None:
        subprocess.run([*self.base, "kill-server"], check=False)


def test_chat_in_a_real_terminal(models):
    command = [
        sys.executable,
        "-m",
        "pipeline",
        "chat",
        "--model",
        str(models["sft"]),
        "--temperature",
        "0",
        "--max-tokens",
        "24",
        "; echo exit-status=$?",
    ]
    session = Tmux(f"chat-test-{time.monotonic_ns()}", command, ROOT)
    try:
        screen = session.wait_for(lambda s: s.rstrip().endswith(">>>"), "the first prompt")
        assert "alpaca template: single-turn, each message is answered on its own" in screen
        session.keys("Name a color.", "Enter")
        screen = session.wait_for(lambda s: s.count(">>>") == 2, "the first answer")
        assert re.search(
            r"Name a color\.\n(\[the prompt's first \d+ tokens were dropped.*\]\n)?Blue\.\n", screen
        )
        session.keys("¿Qué fruta comió Sancho?", "Enter")
        screen = session.wait_for(lambda s: s.count(">>>") == 3, "the second answer")
        assert re.search(r"¿Qué fruta comió Sancho\?\n(\[.*\]\n)?Una manzana\.\n", screen)
        session.keys("/reset", "Enter")
        session.wait_for(lambda s: "[conversation reset]" in s and s.count(">>>") == 4, "the reset")
        session.keys("C-c")
        screen = session.wait_for(lambda s: re.search(r"exit-status=\d", s), "the exit")
        assert "[bye]" in screen and "exit-status=0" in screen and "Traceback" not in screen
    finally:
        session.close()
