"""`python -m pipeline <command>` / `llm-pipeline <command>`: the verbs around the DVC stages.

Each command lives in its own module as ``cli(argv) -> int`` and is imported only when used,
so `python -m pipeline --help` stays fast.
"""

from __future__ import annotations

import importlib
import sys

from pipeline.common.errors import PipelineError, disk_full, one_line

COMMANDS: dict[str, tuple[str, str]] = {
    "cache": ("pipeline.data.corpus", "manage the content-addressed download cache (cache add FILE...)"),
    "generate": (
        "pipeline.serve.generate_cli",
        "continue a prompt with a model, streamed to the terminal (or --json)",
    ),
    "chat": ("pipeline.serve.chat_cli", "chat with an SFT/DPO model in the terminal (/reset, /exit)"),
    "serve": ("pipeline.serve.app", "serve base/SFT/DPO/ONNX models over the Ollama HTTP API"),
    "flow": (
        "pipeline.orchestration.flow",
        "run or schedule the pipeline with Prefect (flow run | flow serve)",
    ),
    "sweep": ("pipeline.orchestration.compare", "queue and run several `dvc exp run -S ...` variants"),
    "compare": ("pipeline.orchestration.compare", "compare DVC experiments: params, metrics, loss curves"),
    "classify": (
        "pipeline.train.classifier",
        "label texts with a classifier (classify --model models/classifier TEXT...)",
    ),
}


def usage() -> str:
    lines = ["usage: python -m pipeline <command> [args]", "", "commands:"]
    lines += [f"  {name:<9} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command '{name}'\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    command = getattr(module, f"cli_{name}", None) or module.cli
    try:
        return int(command(rest) or 0)
    except PipelineError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 1
    except OSError as exc:
        if (message := disk_full(exc)) is None:
            raise
        print(f"error: {one_line(message)}", file=sys.stderr)
        return 1
