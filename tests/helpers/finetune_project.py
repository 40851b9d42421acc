"""The sft and dpo stages' inputs made directly (no earlier stage runs), and the stages run in this process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.data.tokenizer import save_tokenizer, train_bpe
from pipeline.model.checkpoint import save_model
from pipeline.model.gpt import GPT, config_from_preset
from tests.helpers.project import SHARED_DATA, generated_instructions, tiny_params


def stage_project(dest: Path, overrides: dict | None = None) -> Path:
    """What the sft and dpo stages read, made directly: tokenizer, base model, raw data, params."""
    if SHARED_DATA.is_dir():
        sft = json.loads((SHARED_DATA / "instruction-data.json").read_text())[:40]
        dpo = json.loads((SHARED_DATA / "instruction-data-with-preference.json").read_text())[:40]
    else:
        sft, dpo = generated_instructions(40), generated_instructions(40, seed=1, preferences=True)
    (dest / "data" / "raw").mkdir(parents=True)
    (dest / "data" / "raw" / "sft.json").write_text(json.dumps(sft))
    (dest / "data" / "raw" / "dpo.json").write_text(json.dumps(dpo))
    texts = [f"{r['instruction']}\n{r['input']}\n{r['output']}" for r in sft]
    fingerprint = save_tokenizer(train_bpe(texts, 400), dest / "data" / "tokenizer", "bpe")
    torch.manual_seed(0)
    base = GPT(config_from_preset("cpu-tiny", vocab_size=400, context_length=64))
    save_model(
        dest / "models" / "base", base, tokenizer={"path": "data/tokenizer", "fingerprint": fingerprint}
    )
    params = tiny_params()
    for section in ("sft", "dpo"):
        params[section].update(max_steps=12, checkpoint_every=3, eval_every=6, log_every=3, dtype="fp32")
    for section, values in (overrides or {}).items():
        params[section].update(values)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return dest


def run_here(name: str, cwd: Path, monkeypatch) -> None:
    """Run a stage in this process (cheaper than a new interpreter) on one thread, as the subprocesses are:
    bitwise-equal weights need the same reduction order."""
    module = __import__(f"stages.{name}", fromlist=["main"])
    monkeypatch.chdir(cwd)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        module.main()
    finally:
        torch.set_num_threads(threads)


def fails(name: str, cwd: Path, monkeypatch, capsys) -> str:
    """Run a stage in this process; it must exit 1 with one line on stderr and write no model."""
    module = __import__(f"stages.{name}", fromlist=["main"])
    monkeypatch.chdir(cwd)
    with pytest.raises(SystemExit) as info:
        module.main()
    assert info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert not (cwd / "models" / name).exists()
    return err
