"""The DAG cannot lie and the house keeps its rooms: checked from the source with `ast`, nothing heavy imported."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
import yaml

from tests.helpers.dag import ROOT, closure, code_deps, imports, module_file, python_files

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


def sources(*paths: str) -> dict[str, str]:
    return {path: (ROOT / path).read_text(encoding="utf-8") for path in paths}


# Every check that walks pipeline/ walks it whole (subpackages included) and says how many modules it saw.
PIPELINE_FILES = python_files("pipeline")
STAGE_FILES = python_files("stages")


def walk_problem(files: list[str]) -> str | None:
    """Why a walk of pipeline/ missed modules: each layer package holds modules, and os.walk sees every file."""
    walked = sorted(
        str(Path(d, f).relative_to(ROOT))
        for d, _, names in os.walk(ROOT / "pipeline")
        for f in names
        if f.endswith(".py")
    )
    empty = [p for p in LAYERS if not any(f.startswith(f"pipeline/{p}/") for f in files)]
    if empty or files != walked:
        return f"saw {len(files)} of {len(walked)} modules under pipeline/ (none in {empty}): walk it recursively"
    return None


def test_checks_walk_every_module_under_pipeline():
    assert not (why := walk_problem(PIPELINE_FILES)), why
    assert len(pipeline_modules()) == len(PIPELINE_FILES), "pipeline_modules() walks pipeline/ whole"


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


def marker_problem(path: str, text: str) -> str | None:
    return f"{path} must be empty" if text.strip() else None


@pytest.mark.parametrize("package", LAYERS)
def test_package_markers_are_empty(package):
    """A re-exporting __init__ would hide the modules it imports from the stage closures dvc.yaml deps cover."""
    marker = ROOT / "pipeline" / package / "__init__.py"
    assert marker.is_file(), f"pipeline/{package}/__init__.py is missing"
    assert not (
        why := marker_problem(f"pipeline/{package}/__init__.py", marker.read_text(encoding="utf-8"))
    ), why


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


def edge_problems(module: str, targets: list[str]) -> list[str]:
    """What is wrong with ``module`` (``model/gpt``) importing ``targets`` (``pipeline/common/errors.py``…)."""
    path, problems = f"pipeline/{module}.py", []
    for target in targets:
        if target.startswith("stages/"):
            problems.append(f"{path} imports the stage module {target}")
            continue
        other = str(Path(target).relative_to("pipeline").with_suffix(""))
        if layer(other) > layer(module):
            package = LAYERS[layer(module)] if layer(module) < DOOR else "pipeline"
            problems.append(f"{path} (package {package}) imports {target}, a later package")
        if why := forbidden(module, other):
            problems.append(f"{path} imports {target}: {why}")
    return problems


@pytest.mark.parametrize("module", pipeline_modules())
def test_no_module_imports_a_later_package_or_a_stage(module):
    problems = edge_problems(module, sorted(imports(f"pipeline/{module}.py")))
    assert not problems, "; ".join(problems)


def import_nodes(source: str) -> list[tuple[int, ast.Import | ast.ImportFrom]]:
    """Every import statement, at any depth of the code (lazy imports included), with its line."""
    return [
        (node.lineno, node)
        for node in ast.walk(ast.parse(source))
        if isinstance(node, (ast.Import, ast.ImportFrom))
    ]


def imported_modules(node: ast.Import | ast.ImportFrom) -> list[str]:
    """The modules an import statement names (``from a.b import c`` names ``a.b``); relative ones are skipped."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    return [node.module] if node.level == 0 and node.module else []


def dangling_imports(files: dict[str, str]) -> list[str]:
    return [
        f"{path}:{line} {name}"
        for path, source in files.items()
        for line, node in import_nodes(source)
        for name in imported_modules(node)
        if name.split(".")[0] in ("pipeline", "stages") and module_file(name) is None
    ]


def test_every_project_import_names_a_module_that_exists():
    """A lazy import of a moved module fails only when its line runs; here it fails at once (and would otherwise
    drop out of the closures that dvc.yaml deps must cover)."""
    files = sources(*PIPELINE_FILES, *STAGE_FILES)
    assert len(files) == len(PIPELINE_FILES) + len(STAGE_FILES) and not walk_problem(PIPELINE_FILES)
    assert not (dangling := dangling_imports(files)), f"imports of modules that do not exist: {dangling}"


def is_package(name: str) -> bool:
    return (ROOT / name.replace(".", "/") / "__init__.py").is_file()


def package_imports(files: dict[str, str]) -> list[str]:
    """Imports that name a package of the project rather than a module: ``import pipeline.model``,
    ``from pipeline import model``, ``from pipeline.model import GPT`` (a name from the empty __init__).
    ``from pipeline.model import lora`` imports the module lora and is fine."""
    found = []
    for path, source in files.items():
        for line, node in import_nodes(source):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names if is_package(a.name)]
            elif node.level == 0 and node.module and is_package(node.module):
                names = [
                    f"{node.module}.{a.name}"
                    for a in node.names
                    if is_package(f"{node.module}.{a.name}") or not module_file(f"{node.module}.{a.name}")
                ]
            else:
                names = []
            found += [
                f"{path}:{line} {name}" for name in names if name.split(".")[0] in ("pipeline", "stages")
            ]
    return found


def test_imports_name_modules_not_packages():
    """The closures (tests/helpers/dag.py) follow modules; a package's name hides which module the code runs."""
    files = sources(*PIPELINE_FILES, *STAGE_FILES, *python_files("bench"), *python_files("tests"))
    assert len(files) > len(PIPELINE_FILES) + len(STAGE_FILES) and not walk_problem(PIPELINE_FILES)
    assert not (found := package_imports(files)), f"imports of a package, not a module: {found}"


# Torch in the first two layers, lazily: ShardDataset's sampler (windows, sample, sequential) hands tensors to the
# training loop. The rule says no torch in data/; moving the sampler to train/ is production work (issue 24).
TORCH_EXEMPT = {"pipeline/data/shards.py"}


def torch_importers(files: dict[str, str]) -> list[str]:
    return [
        f"{path}:{line}"
        for path, source in files.items()
        for line, node in import_nodes(source)
        if any(name.split(".")[0] == "torch" for name in imported_modules(node))
    ]


def test_common_and_data_import_no_torch():
    """The judge, the server's ONNX path and the tokenizer run without torch: common/ and data/ never import it,
    lazily included (a TYPE_CHECKING import counts too: it costs nothing to keep the rule simple)."""
    files = sources(*(f for f in PIPELINE_FILES if f.startswith(("pipeline/common/", "pipeline/data/"))))
    assert len(files) == sum(m.split("/")[0] in ("common", "data") for m in pipeline_modules())
    found = torch_importers({path: text for path, text in files.items() if path not in TORCH_EXEMPT})
    assert not found, f"torch imported in common/ or data/: {found}"
    exempt_and_true = {line.split(":")[0] for line in torch_importers(sources(*TORCH_EXEMPT))}
    assert exempt_and_true == TORCH_EXEMPT, (
        "a module in TORCH_EXEMPT imports no torch now: drop it from the set"
    )


def find_cycle(graph: dict[str, list[str]]) -> list[str] | None:
    """A path that comes back to its start, or None."""
    state, path = {}, []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        path.append(module)
        for other in graph.get(module, []):
            if state.get(other) == "open":
                return path[path.index(other) :] + [other]
            if other not in state and (cycle := visit(other)):
                return cycle
        state[module] = "done"
        path.pop()
        return None

    for module in graph:
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def test_no_import_cycle():
    """Imports go one way: no module reaches itself through the modules it imports, lazily or not."""
    graph = import_graph()
    assert len(graph) == len(PIPELINE_FILES), (
        f"the import graph saw {len(graph)} of {len(PIPELINE_FILES)} modules"
    )
    if cycle := find_cycle(graph):
        raise AssertionError(f"import cycle: {' → '.join(f'pipeline/{m}.py' for m in cycle)}")


def prefect_users(files: dict[str, str]) -> set[str]:
    return {
        path
        for path, source in files.items()
        for _, node in import_nodes(source)
        if any(m.split(".")[0] == "prefect" for m in imported_modules(node))
        or isinstance(node, ast.ImportFrom)
        and (node.module or "").split(".")[0] == "prefect"
    }


def test_prefect_lives_only_in_the_flow_module():
    files = sources(*PIPELINE_FILES, *STAGE_FILES)
    assert len(files) == len(PIPELINE_FILES) + len(STAGE_FILES) and not walk_problem(PIPELINE_FILES)
    users = prefect_users(files)
    assert users <= {"pipeline/orchestration/flow.py"}, (
        f"prefect imported outside pipeline/orchestration/flow.py: {sorted(users)}"
    )


def statements(source: str) -> int:
    """Counted in statements, so the formatter's line breaks cannot move the bar."""
    return sum(isinstance(node, ast.stmt) for node in ast.walk(ast.parse(source)))


@pytest.mark.parametrize("path", sorted(Path(p).name for p in STAGE_FILES))
def test_stages_stay_thin(path):
    count = statements((ROOT / "stages" / path).read_text(encoding="utf-8"))
    assert count < 60, (
        f"stages/{path} has {count} statements (keep stages under 60: move logic into pipeline/)"
    )


WEIGHT_READS = {"load_file", "safe_open", "from_dict"}


def weight_readers(files: dict[str, str]) -> dict[str, list[str]]:
    readers = {}
    for path, source in files.items():
        calls = {
            n.func.attr if isinstance(n.func, ast.Attribute) else getattr(n.func, "id", "")
            for n in ast.walk(ast.parse(source))
            if isinstance(n, ast.Call)
        }
        if calls & WEIGHT_READS and path != "pipeline/model/gpt.py":
            readers[path] = sorted(calls & WEIGHT_READS)
    return readers


def test_model_directories_have_one_loader():
    """Only model/checkpoint.py turns weight files into a GPT (train/resume.py reads its own training checkpoints)."""
    files = sources(*PIPELINE_FILES)
    assert len(files) == len(PIPELINE_FILES) and not walk_problem(PIPELINE_FILES)
    readers = weight_readers(files)
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


def imports_of_test_modules(files: dict[str, str]) -> list[str]:
    """Imports of a test module (tests/…/test_*.py) or of a conftest: shared code lives in tests/helpers/."""
    return [
        f"{path}:{line} {name}"
        for path, source in files.items()
        for line, node in import_nodes(source)
        for name in imported_modules(node)
        + ([f"{node.module}.{a.name}" for a in node.names] if isinstance(node, ast.ImportFrom) else [])
        if name.split(".")[0] == "tests" and name.split(".")[-1].startswith(("test_", "conftest"))
    ]


def test_no_test_module_imports_another():
    files = sources(*python_files("tests"), *python_files("bench"))
    assert len(files) > 40, f"saw only {len(files)} files under tests/ and bench/"
    assert not (found := imports_of_test_modules(files)), (
        f"a test module imported (move it to tests/helpers/): {found}"
    )


def test_the_tiers_are_laid_out():
    """tests/unit/<package>/ mirrors pipeline/; what runs stages, servers or other runtimes is in tests/integration/."""
    tests = [Path(p) for p in python_files("tests") if Path(p).name.startswith("test_")]
    stray = [str(p) for p in tests if p.parts[1] not in ("unit", "integration")]
    assert not stray, f"test modules outside tests/unit/ and tests/integration/: {stray}"
    mirror = {p.parts[2] for p in tests if p.parts[1] == "unit" and len(p.parts) == 4}
    assert mirror <= set(LAYERS) | {"bench"}, (
        f"tests/unit/ packages that mirror no package: {mirror - set(LAYERS)}"
    )


# Each check above catches what it is for: a violation planted in a synthetic source (cheap, ast only).
PLANTED = {
    "later package": lambda: edge_problems("common/errors", ["pipeline/model/gpt.py"]),
    "stage import": lambda: edge_problems("model/gpt", ["stages/pretrain.py"]),
    "forbidden edge": lambda: edge_problems("export/onnx", ["pipeline/train/loop.py"]),
    "cycle": lambda: find_cycle({"data/a": ["data/b"], "data/b": ["data/c"], "data/c": ["data/a"]}),
    "non-empty marker": lambda: marker_problem("pipeline/model/__init__.py", "from .gpt import GPT\n"),
    "dangling lazy import": lambda: dangling_imports(
        {"x.py": "def f():\n    from pipeline.model.gone import g\n"}
    ),
    "package import": lambda: package_imports({"x.py": "import pipeline.model\n"}),
    "package from-import": lambda: package_imports({"x.py": "from pipeline import model\n"}),
    "name from a package marker": lambda: package_imports({"x.py": "from pipeline.model import GPT\n"}),
    "lazy torch": lambda: torch_importers({"pipeline/data/x.py": "def f():\n    import torch.nn\n"}),
    "torch from-import": lambda: torch_importers({"pipeline/common/x.py": "from torch import nn\n"}),
    "prefect": lambda: prefect_users({"pipeline/model/x.py": "def f():\n    from prefect import flow\n"}),
    "fat stage": lambda: statements("x = 1\n" * 60) >= 60,
    "second loader": lambda: weight_readers({"pipeline/serve/x.py": "w = safe_open(p, 'pt')\n"}),
    "test module import": lambda: imports_of_test_modules(
        {"tests/a.py": "from tests.unit.test_dag import ROOT\n"}
    ),
    "conftest import": lambda: imports_of_test_modules({"tests/a.py": "from tests.conftest import ROOT\n"}),
    "test module from-import": lambda: imports_of_test_modules(
        {"tests/a.py": "from tests.unit import test_dag\n"}
    ),
    "shallow walk": lambda: walk_problem(
        sorted(str(p.relative_to(ROOT)) for p in (ROOT / "pipeline").glob("*.py"))
    ),
    "undeclared dep": lambda: (
        not covered("pipeline/model/gpt.py", {"pipeline/common/", "stages/pretrain.py"})
    ),
}
ALLOWED = {
    "module from a package": lambda: package_imports({"x.py": "from pipeline.model import lora\n"}),
    "module import": lambda: package_imports(
        {"x.py": "import pipeline.model.gpt\nfrom stages import _finetune\n"}
    ),
    "helper import": lambda: imports_of_test_modules({"tests/a.py": "from tests.helpers.dag import ROOT\n"}),
    "torch elsewhere": lambda: torch_importers({"pipeline/data/x.py": "import numpy\n# import torch\n"}),
    "earlier package": lambda: edge_problems("model/gpt", ["pipeline/common/errors.py"]),
    "no cycle": lambda: find_cycle({"data/a": ["data/b"], "data/b": [], "data/c": ["data/a"]}),
}


@pytest.mark.parametrize("case", sorted(PLANTED))
def test_each_check_catches_a_planted_violation(case):
    assert PLANTED[case](), f"the check for '{case}' let a planted violation through"


@pytest.mark.parametrize("case", sorted(ALLOWED))
def test_the_checks_allow_what_the_rules_allow(case):
    assert not ALLOWED[case](), f"the check flags '{case}', which the rules allow"


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
