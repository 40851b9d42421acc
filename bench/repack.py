"""Does llama.cpp's weight repacking crash on this CPU? A q8_0 GGUF of the default shape (random weights, our
exporter), loaded with and without repacking and decoded once, each in its own child process.

On an Intel Xeon with AMX the repacked load dies with SIGSEGV (ggml-org/llama.cpp#20824); without repacking it
decodes. The export's checks always load without repacking (pipeline/export/gguf_check.py).

    python -m bench.repack            # prints the CPU line, then one line per load
"""

from __future__ import annotations

import contextlib
import subprocess
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from pipeline.common.config import load_params
from pipeline.common.isolated import ChildCrashed, run_isolated
from pipeline.data.tokenizer import train_bpe
from pipeline.export.gguf import GGUFTokenizer, write_gguf
from pipeline.model.gpt import GPT
from pipeline.train.pretrain_setup import model_config

ROOT = Path(__file__).resolve().parents[1]


def decode_once(gguf: str, repack: bool) -> dict:
    """In the child: load ``gguf`` (repacking as asked), decode 32 tokens in one batch; the next token."""
    import numpy as np
    from llama_cpp import Llama

    from pipeline.export.gguf_check import no_weight_repacking

    with contextlib.nullcontext() if repack else no_weight_repacking():
        llm = Llama(model_path=gguf, n_ctx=64, logits_all=True, verbose=False)
    llm.eval(list(range(1, 33)))
    return {"next_token": int(np.argmax(llm.scores[31]))}


def main() -> None:
    print(
        subprocess.run(
            ["bash", str(ROOT / "scripts/cpu_summary.sh")], capture_output=True, text=True
        ).stdout.strip()
    )
    params = load_params(ROOT / "params.yaml")
    enc = train_bpe(["En un lugar de la Mancha, de cuyo nombre no quiero acordarme " * 200], 512)
    torch.manual_seed(0)
    model = GPT(replace(model_config(params.model, enc.n_vocab), vocab_size=enc.n_vocab))
    with tempfile.TemporaryDirectory(prefix="bench-repack-") as tmp:
        path = Path(tmp) / "default-q8_0.gguf"
        write_gguf(model, GGUFTokenizer.of(enc, "bpe", enc.n_vocab), None, path, "q8_0", "bench")
        for repack in (True, False):
            label = "with repacking (llama.cpp's default)" if repack else "without repacking (--no-repack)"
            try:
                found = run_isolated(
                    "bench.repack:decode_once",
                    {"gguf": str(path), "repack": repack},
                    subject=path.name,
                    runtime="llama.cpp",
                    advice="",
                    timeout=300,
                )
                print(f"q8_0 {label}: decoded, next token {found['next_token']}")
            except ChildCrashed as exc:
                print(f"q8_0 {label}: crashed ({exc.cause})")


if __name__ == "__main__":
    main()
