"""The DAG cannot lie and the house keeps its rooms: checked from the source with `ast`, nothing heavy imported."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from tests.dag import ROOT, closure, code_deps, imports

DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
STAGES = sorted(DVC)
OUTPUT_ROOTS = ("data/", "models/", "reports/", "checkpoints/", "cache/")

# The data's direction through the house: a module may import its own layer and the ones above it, never a later one.
LAYERS = [
    {"errors", "atomic", "stage_timing", "hashing", "config", "provenance", "profile", "sampling", "textstream",
     "datasets", "unwrap", "corpus", "tokenizer", "shards", "instructions", "labelled"},  # data and the params
    {"model", "generate", "perf", "runtime", "checkpoint", "lora", "embeddings", "gpt2_layout",
     "pretrained"},  # the model, where it runs, its files
    {"losses", "objectives", "distributed", "resume", "optim", "train", "pretraining", "answers", "classifier"},  # training
    {"evaluation", "rouge", "judge", "judge_report", "classify_metrics"},  # evaluation
    {"export", "onnx_generate", "serve_models", "serve", "export_classifier", "model_card", "chat_page",
     "gguf_export", "llama_cpp_check", "embed_api", "openai_api", "hf_export"},  # export, serving
    {"dvc_ops", "flow", "compare", "cli", "__main__", "__init__", "generate_cli", "chat", "report"},  # orchestration, CLI
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}
# Edges the layers allow but the house forbids: a module must not reach into another's concern.
FORBIDDEN = {
    ("losses", "instructions"): "the losses take tensors; instruction parsing is the data's business",
    ("export", "objectives"): "the export loads models through checkpoint, never through fine-tuning",
    ("export", "train"): "the export never needs the training loop",
    ("evaluation", "train"): "evaluation takes autocast from runtime, not from the training loop",
}


def stage_deps(name: str) -> set[str]:
    return {d if isinstance(d, str) else next(iter(d)) for d in DVC[name].get("deps", [])}


def stage_paths(name: str) -> set[str]:
    st = DVC[name]
    paths = stage_deps(name)
    for key in ("outs", "metrics", "plots"):
        paths |= {o if isinstance(o, str) else next(iter(o)) for o in st.get(key, [])}
    return paths


def covered(path: str, declared: set[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in declared)


def module_tree(path: str) -> ast.Module:
    return ast.parse((ROOT / path).read_text(encoding="utf-8"))


@pytest.mark.parametrize("stage", STAGES)
def test_code_deps_cover_the_stage_import_closure(stage):
    missing = [f for f in code_deps(f"stages/{stage}.py") if not covered(f, stage_deps(stage))]
    assert not missing, f"dvc.yaml stage '{stage}' misses deps on {', '.join(missing)} (its code imports them)"


def declared_params(stage: str) -> list[str]:
    for node in module_tree(f"stages/{stage}.py").body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "PARAMS" for t in node.targets):
            return list(ast.literal_eval(node.value))
    raise AssertionError(f"stages/{stage}.py declares no PARAMS tuple")


@pytest.mark.parametrize("stage", STAGES)
def test_params_a_stage_reads_are_its_dvc_params(stage):
    assert sorted(declared_params(stage)) == sorted(DVC[stage].get("params", [])), (
        f"stages/{stage}.py PARAMS and dvc.yaml params of '{stage}' differ")
    source = (ROOT / f"stages/{stage}.py").read_text(encoding="utf-8")
    assert "load_params(sections=PARAMS)" in source, f"stages/{stage}.py must load params through its PARAMS"


@pytest.mark.parametrize("stage", STAGES)
def test_paths_a_stage_names_are_its_deps_or_outputs(stage):
    """Every project path the stage's code spells out (data/…, models/…, reports/…) is declared in dvc.yaml."""
    names = set()
    for path in closure(f"stages/{stage}.py"):
        if path.startswith("stages/"):
            names |= {n.value for n in ast.walk(module_tree(path)) if isinstance(n, ast.Constant)
                      and isinstance(n.value, str) and n.value.startswith(OUTPUT_ROOTS) and " " not in n.value}
    declared = stage_paths(stage)
    undeclared = sorted(n for n in names if not covered(n, declared)
                        and not any(d.startswith(n.rstrip("/") + "/") for d in declared))
    assert not undeclared, f"dvc.yaml stage '{stage}' does not declare {', '.join(undeclared)}"


def pipeline_modules() -> list[str]:
    return sorted(p.stem for p in (ROOT / "pipeline").glob("*.py"))


def test_every_module_has_a_place_in_the_layers():
    unplaced = [m for m in pipeline_modules() if m not in LAYER]
    assert not unplaced, f"give pipeline/{unplaced[0]}.py a layer in tests/test_dag.py LAYERS"


@pytest.mark.parametrize("module", pipeline_modules())
def test_no_module_imports_a_later_concern_or_a_stage(module):
    path = f"pipeline/{module}.py"
    for target in imports(path):
        assert not target.startswith("stages/"), f"{path} imports the stage module {target}"
        other = Path(target).stem
        assert LAYER[other] <= LAYER[module], f"{path} (layer {LAYER[module]}) imports {target} (layer {LAYER[other]})"
        assert (module, other) not in FORBIDDEN, f"{path} imports {target}: {FORBIDDEN[(module, other)]}"


def test_prefect_lives_only_in_the_flow_module():
    users = []
    for path in sorted((ROOT / "pipeline").glob("*.py")) + sorted((ROOT / "stages").glob("*.py")):
        for node in ast.walk(module_tree(str(path.relative_to(ROOT)))):
            modules = ([a.name for a in node.names] if isinstance(node, ast.Import)
                       else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(m.split(".")[0] == "prefect" for m in modules):
                users.append(path.name)
    assert set(users) <= {"flow.py"}, f"prefect imported outside pipeline/orchestration/flow.py: {sorted(set(users))}"


@pytest.mark.parametrize("path", sorted(p.name for p in (ROOT / "stages").glob("*.py")))
def test_stages_stay_thin(path):
    lines = len((ROOT / "stages" / path).read_text(encoding="utf-8").splitlines())
    assert lines < 80, f"stages/{path} has {lines} lines (keep stages under 80: move logic into pipeline/)"


def test_model_directories_have_one_loader():
    """Only pipeline/model/checkpoint.py turns weight files into a GPT (resume.py reads its own training checkpoints)."""
    readers = {}
    for path in sorted((ROOT / "pipeline").glob("*.py")):
        tree = module_tree(str(path.relative_to(ROOT)))
        calls = {n.func.attr if isinstance(n.func, ast.Attribute) else getattr(n.func, "id", "")
                 for n in ast.walk(tree) if isinstance(n, ast.Call)}
        if calls & {"load_file", "safe_open", "from_dict"} and path.name != "model.py":
            readers[path.name] = sorted(calls & {"load_file", "safe_open", "from_dict"})
    assert set(readers) <= {"checkpoint.py", "resume.py"}, f"weights read outside checkpoint.py: {readers}"
    for consumer in ("stages/evaluate.py", "stages/_finetune.py", "pipeline/export/onnx.py", "pipeline/serve/served_model.py"):
        source = (ROOT / consumer).read_text(encoding="utf-8")
        assert "load_with_tokenizer" in source, f"{consumer} must load models through checkpoint.load_with_tokenizer"


def test_the_report_stage_reads_every_stage_report():
    """The run's page shows whatever reports exist: so every stage writing under reports/<stage> is its dep."""
    writers = {name for name in STAGES if name != "report"
               and any(p.startswith(f"reports/{name}/") for p in stage_paths(name) - stage_deps(name))}
    missing = sorted(f"reports/{name}" for name in writers if f"reports/{name}" not in stage_deps("report"))
    assert not missing, f"dvc.yaml stage 'report' misses deps on {', '.join(missing)}"
