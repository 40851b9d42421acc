"""The DAG cannot lie and the house keeps its rooms: checked from the source with `ast`, nothing heavy imported."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from tests.helpers.dag import ROOT, closure, code_deps, imports, module_file

DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
STAGES = sorted(DVC)
OUTPUT_ROOTS = ("data/", "models/", "reports/", "checkpoints/", "cache/")

# The data's direction through the house: the packages of pipeline/, in order. A module in package k imports only
# packages <= k; the modules at the top (``__main__``, ``cli``) are the door and may name any room.
LAYERS = ["common", "data", "model", "train", "evaluation", "export", "serve", "orchestration"]
DOOR = len(LAYERS)
# Edges the layers allow but the house forbids: a module (or any module of a package) must not reach into another's
# concern.
FORBIDDEN = {
    (
        "train/losses",
        "data/instructions",
    ): "the losses take tensors; instruction parsing is the data's business",
    ("export", "train"): "the exports load models through model/checkpoint, never through training",
    (
        "evaluation/base_model",
        "train/loop",
    ): "evaluation takes autocast from runtime, not from the training loop",
}


def forbidden(module: str, other: str) -> str | None:
    """Why ``module`` must not import ``other``, or None (a FORBIDDEN side names a module or a whole package)."""

    def within(name: str, side: str) -> bool:
        return name == side or name.startswith(side + "/")

    return next((why for (a, b), why in FORBIDDEN.items() if within(module, a) and within(other, b)), None)


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
    assert not missing, (
        f"dvc.yaml stage '{stage}' misses deps on {', '.join(missing)} (its code imports them)"
    )


def declared_params(stage: str) -> list[str]:
    for node in module_tree(f"stages/{stage}.py").body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "PARAMS" for t in node.targets):
            return list(ast.literal_eval(node.value))
    raise AssertionError(f"stages/{stage}.py declares no PARAMS tuple")


@pytest.mark.parametrize("stage", STAGES)
def test_params_a_stage_reads_are_its_dvc_params(stage):
    assert sorted(declared_params(stage)) == sorted(DVC[stage].get("params", [])), (
        f"stages/{stage}.py PARAMS and dvc.yaml params of '{stage}' differ"
    )
    source = (ROOT / f"stages/{stage}.py").read_text(encoding="utf-8")
    assert "load_params(sections=PARAMS)" in source, f"stages/{stage}.py must load params through its PARAMS"


@pytest.mark.parametrize("stage", STAGES)
def test_paths_a_stage_names_are_its_deps_or_outputs(stage):
    """Every project path the stage's code spells out (data/…, models/…, reports/…) is declared in dvc.yaml."""
    names = set()
    for path in closure(f"stages/{stage}.py"):
        if path.startswith("stages/"):
            names |= {
                n.value
                for n in ast.walk(module_tree(path))
                if isinstance(n, ast.Constant)
                and isinstance(n.value, str)
                and n.value.startswith(OUTPUT_ROOTS)
                and " " not in n.value
            }
    declared = stage_paths(stage)
    undeclared = sorted(
        n
        for n in names
        if not covered(n, declared) and not any(d.startswith(n.rstrip("/") + "/") for d in declared)
    )
    assert not undeclared, f"dvc.yaml stage '{stage}' does not declare {', '.join(undeclared)}"


def pipeline_modules() -> list[str]:
    """Every module under pipeline/, as its path without ``pipeline/`` and ``.py`` (``model/gpt``)."""
    return sorted(
        str(p.relative_to(ROOT / "pipeline").with_suffix("")) for p in (ROOT / "pipeline").rglob("*.py")
    )


def layer(module: str) -> int:
    package = module.split("/")[0]
    return LAYERS.index(package) if "/" in module else DOOR


def test_every_module_lives_in_a_layer_package():
    stray = [m for m in pipeline_modules() if "/" in m and m.split("/")[0] not in LAYERS or m.count("/") > 1]
    assert not stray, (
        f"pipeline/{stray[0]}.py is not in one of the layer packages {LAYERS} (tests/unit/test_dag.py)"
    )
    top = {m for m in pipeline_modules() if "/" not in m}
    assert top <= {"__init__", "__main__", "cli"}, f"modules at the top of pipeline/: {sorted(top)}"


@pytest.mark.parametrize("package", LAYERS)
def test_package_markers_are_empty(package):
    """A re-exporting __init__ would hide the modules it imports from the stage closures dvc.yaml deps cover."""
    marker = ROOT / "pipeline" / package / "__init__.py"
    assert marker.is_file() and not marker.read_text(encoding="utf-8").strip(), (
        f"pipeline/{package}/__init__.py must be empty"
    )


def import_graph() -> dict[str, list[str]]:
    """module → the pipeline modules it imports, at any depth of its code (function-level imports too)."""
    return {
        m: sorted(
            str(Path(t).relative_to("pipeline").with_suffix(""))
            for t in imports(f"pipeline/{m}.py")
            if t.startswith("pipeline/")
        )
        for m in pipeline_modules()
    }


@pytest.mark.parametrize("module", pipeline_modules())
def test_no_module_imports_a_later_package_or_a_stage(module):
    path = f"pipeline/{module}.py"
    for target in imports(path):
        assert not target.startswith("stages/"), f"{path} imports the stage module {target}"
        other = str(Path(target).relative_to("pipeline").with_suffix(""))
        assert layer(other) <= layer(module), (
            f"{path} (package {LAYERS[layer(module)] if layer(module) < DOOR else 'pipeline'}) imports {target}, "
            f"a later package"
        )
        assert not (why := forbidden(module, other)), f"{path} imports {target}: {why}"


def test_every_project_import_names_a_module_that_exists():
    """A lazy import of a moved module fails only when its line runs; here it fails at once (and would otherwise
    drop out of the closures that dvc.yaml deps must cover)."""
    dangling = []
    for path in sorted(ROOT.glob("pipeline/**/*.py")) + sorted(ROOT.glob("stages/*.py")):
        for node in ast.walk(module_tree(str(path.relative_to(ROOT)))):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module]
                if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
                else []
            )
            dangling += [
                f"{path.relative_to(ROOT)}:{node.lineno} {name}"
                for name in names
                if name.split(".")[0] in ("pipeline", "stages") and module_file(name) is None
            ]
    assert not dangling, f"imports of modules that do not exist: {dangling}"


def test_no_import_cycle():
    """Imports go one way: no module reaches itself through the modules it imports, lazily or not."""
    graph, state, path = import_graph(), {}, []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        path.append(module)
        for other in graph[module]:
            if state.get(other) == "open":
                return path[path.index(other) :] + [other]
            if other not in state and (cycle := visit(other)):
                return cycle
        state[module] = "done"
        path.pop()
        return None

    for module in graph:
        if module not in state and (cycle := visit(module)):
            raise AssertionError(f"import cycle: {' → '.join(f'pipeline/{m}.py' for m in cycle)}")


def test_prefect_lives_only_in_the_flow_module():
    users = []
    for path in sorted((ROOT / "pipeline").rglob("*.py")) + sorted((ROOT / "stages").glob("*.py")):
        for node in ast.walk(module_tree(str(path.relative_to(ROOT)))):
            modules = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            if any(m.split(".")[0] == "prefect" for m in modules):
                users.append(str(path.relative_to(ROOT)))
    assert set(users) <= {"pipeline/orchestration/flow.py"}, (
        f"prefect imported outside pipeline/orchestration/flow.py: {sorted(set(users))}"
    )


@pytest.mark.parametrize("path", sorted(p.name for p in (ROOT / "stages").glob("*.py")))
def test_stages_stay_thin(path):
    """Counted in statements, so the formatter's line breaks cannot move the bar."""
    tree = module_tree(f"stages/{path}")
    statements = sum(isinstance(node, ast.stmt) for node in ast.walk(tree))
    assert statements < 60, (
        f"stages/{path} has {statements} statements (keep stages under 60: move logic into pipeline/)"
    )


def test_model_directories_have_one_loader():
    """Only model/checkpoint.py turns weight files into a GPT (train/resume.py reads its own training checkpoints)."""
    readers = {}
    for path in sorted((ROOT / "pipeline").rglob("*.py")):
        name = str(path.relative_to(ROOT))
        calls = {
            n.func.attr if isinstance(n.func, ast.Attribute) else getattr(n.func, "id", "")
            for n in ast.walk(module_tree(name))
            if isinstance(n, ast.Call)
        }
        if calls & {"load_file", "safe_open", "from_dict"} and name != "pipeline/model/gpt.py":
            readers[name] = sorted(calls & {"load_file", "safe_open", "from_dict"})
    assert set(readers) <= {"pipeline/model/checkpoint.py", "pipeline/train/resume.py"}, (
        f"weights read outside pipeline/model/checkpoint.py: {readers}"
    )
    for consumer in (
        "stages/evaluate.py",
        "stages/_finetune.py",
        "pipeline/export/onnx.py",
        "pipeline/serve/served_model.py",
    ):
        source = (ROOT / consumer).read_text(encoding="utf-8")
        assert "load_with_tokenizer" in source, (
            f"{consumer} must load models through checkpoint.load_with_tokenizer"
        )


def test_the_report_stage_reads_every_stage_report():
    """The run's page shows whatever reports exist: so every stage writing under reports/<stage> is its dep."""
    writers = {
        name
        for name in STAGES
        if name != "report"
        and any(p.startswith(f"reports/{name}/") for p in stage_paths(name) - stage_deps(name))
    }
    missing = sorted(f"reports/{name}" for name in writers if f"reports/{name}" not in stage_deps("report"))
    assert not missing, f"dvc.yaml stage 'report' misses deps on {', '.join(missing)}"
