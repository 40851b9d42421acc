"""The docs stay true: every params key they mention exists in the params schema, every params YAML they show
validates, every `python -m pipeline …` command they show parses (its `--help` runs and knows each option), and
ARCHITECTURE.md's tree of rooms names exactly the modules under pipeline/."""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import io
import re
import shlex
from pathlib import Path

import pytest
import yaml

from pipeline import cli
from pipeline.common.config import Params, parse_params

ROOT = Path(__file__).resolve().parents[2]
PAGES = sorted([ROOT / "README.md", ROOT / "README.es.md", *(ROOT / "docs").glob("*.md")])
SECTIONS = {f.name for f in dataclasses.fields(Params)}
FILE_SUFFIX = re.compile(r"\.(tiktoken|json|jsonl|onnx|safetensors|md|png|csv|tsv|txt|bin|yaml|py|html)$")
QUOTED_ERROR = re.compile(r"(error: )?params\.yaml: ")
COMMAND = re.compile(r"(?:python -m pipeline|^llm-pipeline) [^`\n#]*")


def section_fields(name: str) -> set[str]:
    """The keys of one params section ({} for a scalar such as ``seed``)."""
    factory = {f.name: f for f in dataclasses.fields(Params)}[name].default_factory
    return {f.name for f in dataclasses.fields(factory)} if dataclasses.is_dataclass(factory) else set()


def code_spans(text: str) -> list[str]:
    """Inline code spans and the lines of fenced blocks: where the docs quote names and commands."""
    blocks = re.findall(r"^```[a-z]*\n(.*?)^```", text, flags=re.M | re.S)
    prose = re.sub(r"^```[a-z]*\n.*?^```", "", text, flags=re.M | re.S)
    spans = [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", prose)]  # a span may wrap a line
    return spans + [line for block in blocks for line in block.splitlines()]


def expand_braces(token: str) -> list[str]:
    match = re.search(r"\{([^{}]+)\}", token)
    if not match:
        return [token]
    return [
        t
        for alt in match.group(1).split(",")
        for t in expand_braces(token[: match.start()] + alt + token[match.end() :])
    ]


def params_mentions(page: Path) -> set[str]:
    """Dotted names whose first part is a params section (`pretrain.lr`, `{sft,dpo}.beta`), file names aside,
    plus the first-column keys of tables headed "param (`judge.`)"."""
    text = page.read_text(encoding="utf-8")
    found = set()
    for span in code_spans(text):
        if QUOTED_ERROR.match(span):  # an error message quoted to show what a bad key looks like
            continue
        for token in re.findall(r"[{}\w,]+(?:\.[\w{},*]+)+", span):
            for name in expand_braces(token):
                parts = name.split(".")
                if parts[0] in SECTIONS and len(parts) == 2 and not FILE_SUFFIX.search(name):
                    found.add(name)
    for prefix, table in re.findall(
        r"^\| param \(`(\w+)\.`\)[^\n]*\n\|[-| ]+\n((?:\|[^\n]*\n)+)", text, flags=re.M
    ):
        for row in table.splitlines():
            for key in re.findall(r"`(\w+)`", row.split("|")[1]):
                found.add(f"{prefix}.{key}")
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_params_key_in_the_docs_exists(page):
    mentioned = params_mentions(page)
    unknown = sorted(
        name
        for name in mentioned  # `sft.split_*` stands for every key it matches
        if not fnmatch.filter(section_fields(name.split(".")[0]), name.split(".")[1])
    )
    assert not unknown, (
        f"{page.name} mentions params keys that pipeline/common/config.py does not define: {unknown}"
    )


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_params_yaml_in_the_docs_validates(page):
    text = page.read_text(encoding="utf-8")
    for block in re.findall(r"^```yaml\n(.*?)^```", text, flags=re.M | re.S):
        parse_params(yaml.safe_load(block), origin=page.name)


def shown_commands() -> dict[tuple[str, ...], set[str]]:
    """{(command, subcommand?): options shown with it} over every page."""
    shown: dict[tuple[str, ...], set[str]] = {}
    for page in PAGES:
        for span in code_spans(page.read_text(encoding="utf-8")):
            for command in COMMAND.findall(span):
                words = shlex.split(command.split(" | ")[0].split(" && ")[0], comments=True)
                words = words[3:] if words[0] == "python" else words[1:]
                if not words or words[0].startswith(("-", "<")):  # the command list itself, a placeholder
                    continue
                key = tuple(words[:2]) if words[0] in ("flow", "cache") and len(words) > 1 else (words[0],)
                shown.setdefault(key, set()).update(w.split("=")[0] for w in words if w.startswith("-"))
    return shown


def test_docs_show_commands():
    assert ("serve",) in shown_commands() and ("flow", "run") in shown_commands()


@pytest.mark.parametrize("command", sorted(shown_commands()), ids=" ".join)
def test_every_command_in_the_docs_parses(command):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exited:
        cli.main([*command, "--help"])
    assert exited.value.code == 0, f"python -m pipeline {' '.join(command)} --help failed"
    options = shown_commands()[command]
    missing = sorted(o for o in options if o not in out.getvalue())
    assert not missing, (
        f"python -m pipeline {' '.join(command)}: the docs show options it does not have: {missing}"
    )


def test_mentions_are_found_in_prose_braces_and_tables(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "Set `pretrain.lrr`, `sft.split_*`, `{sft,dpo}.beta` and\n`model.safetensors`.\n\n| param (`judge.`) | x |\n"
        "|---|---|\n| `hots` | y |\n",
        encoding="utf-8",
    )
    assert params_mentions(page) == {"pretrain.lrr", "sft.split_*", "sft.beta", "dpo.beta", "judge.hots"}


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_links_between_pages_resolve(page):
    text = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.M | re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if "://" in target or target.startswith("mailto:"):
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{page.name}: link to {target}: no such file"
        if anchor and linked.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", linked.read_text(encoding="utf-8"), flags=re.M)
            assert anchor in {slug(h) for h in headings}, f"{page.name}: link to {target}: no such heading"


def architecture_tree() -> list[str]:
    """The modules ARCHITECTURE.md's tree of rooms names, as paths under pipeline/ (``model/gpt.py``)."""
    text = (ROOT / "ARCHITECTURE.md").read_text(encoding="utf-8")
    tree = re.search(r"^## The rooms\n+```\n(.*?)^```", text, flags=re.M | re.S).group(1)
    named, package = [], ""
    for line in tree.splitlines()[1:]:  # the first line is pipeline/ itself
        entry = re.match(r"(\w+/|\w+\.py(?:, \w+\.py)*)", line.lstrip("│├└─ ")).group(1)
        if entry.endswith("/"):
            package = entry
        else:
            top = not line.startswith(("│", " "))
            named += [("" if top else package) + name for name in entry.split(", ")]
    return named


def test_architecture_names_every_module_and_no_other():
    named = architecture_tree()
    actual = sorted(
        str(p.relative_to(ROOT / "pipeline"))
        for p in (ROOT / "pipeline").rglob("*.py")
        if p.name != "__init__.py"
    )
    assert len(named) == len(set(named)), f"ARCHITECTURE.md names a module twice: {sorted(named)}"
    assert not set(actual) - set(named), (
        f"ARCHITECTURE.md's tree misses pipeline/{sorted(set(actual) - set(named))}"
    )
    assert not set(named) - set(actual), (
        f"ARCHITECTURE.md's tree names modules that do not exist: {sorted(set(named) - set(actual))}"
    )
