"""Shared fixtures: the real demo data when ../shared is present, generated data otherwise."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
INTEGRATION = Path(__file__).resolve().parent / "integration"

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.hookimpl(tryfirst=True)  # before `-m` selects by marker
def pytest_collection_modifyitems(items):
    """Every test under tests/integration/ carries the `integration` marker: `make test-fast` leaves them out."""
    for item in items:
        if INTEGRATION in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(autouse=True, scope="session")
def _isolated_download_cache(tmp_path_factory):
    """Tests never read or write the user's download cache."""
    old = os.environ.get("LLM_PIPELINE_CACHE")
    os.environ["LLM_PIPELINE_CACHE"] = str(tmp_path_factory.mktemp("download-cache"))
    yield
    if old is None:
        os.environ.pop("LLM_PIPELINE_CACHE", None)
    else:
        os.environ["LLM_PIPELINE_CACHE"] = old


@pytest.fixture(scope="session")
def shared_data() -> Path | None:
    return SHARED_DATA if SHARED_DATA.is_dir() else None


@pytest.fixture(scope="session")
def corpus_text(shared_data) -> str:
    """A Spanish text of ~200 kB: the start of Don Quijote when present, else a generated stand-in."""
    from tests.helpers.project import generated_corpus

    if shared_data is not None:
        text = (shared_data / "quijote.txt").read_text(encoding="utf-8-sig")
        return text[20_000:220_000]
    return generated_corpus(200_000)


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    """One temporary Prefect API (SQLite) for every flow test: real states, task runs and artifacts."""
    from prefect.settings import PREFECT_HOME, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    with temporary_settings({PREFECT_HOME: str(tmp_path_factory.mktemp("prefect-home"))}):
        with prefect_test_harness(server_startup_timeout=180):  # a loaded 2-core machine can take a minute
            yield
