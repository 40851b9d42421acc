"""Downloads over real HTTP from a server on 127.0.0.1: success, cache hits, bad checksum, drops, retries, refusal."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from pipeline.cli import main as cli_main
from pipeline.common.config import Source, load_params
from pipeline.common.errors import PipelineError
from pipeline.data.corpus import DownloadCache
from tests.helpers.project import ROOT, generated_corpus, make_project

TEXT = generated_corpus(30_000).rstrip() + "\n"
BOOK = f"*** START OF THE PROJECT GUTENBERG EBOOK X ***\r\n{TEXT}*** END OF THE PROJECT GUTENBERG EBOOK X ***\r\n".encode()
BOOK_SHA = hashlib.sha256(BOOK).hexdigest()


class Handler(BaseHTTPRequestHandler):
    """Serves ``routes``: path → (body, failures): the first requests fail as told ("drop", "500", "slow")."""

    routes: dict[str, tuple[bytes, list[str]]] = {}
    hits: dict[str, int] = {}

    def do_GET(self):  # noqa: N802 (http.server's naming)
        Handler.hits[self.path] = Handler.hits.get(self.path, 0) + 1
        if self.path not in Handler.routes:
            self.send_error(404)
            return
        body, failures = Handler.routes[self.path]
        failure = failures.pop(0) if failures else None
        if failure == "500":
            self.send_error(500)
            return
        if failure == "slow":
            time.sleep(1.5)
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if failure == "drop":
            self.wfile.write(body[: len(body) // 3])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client timed out first: that was the test
            pass

    def log_message(self, *args):
        pass


@pytest.fixture()
def server():
    Handler.routes, Handler.hits = {}, {}
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


@pytest.fixture()
def cache(tmp_path):
    return DownloadCache(tmp_path / "cache", timeout_s=5, retries=2, backoff_s=0.05)


def test_download_is_verified_cached_and_not_fetched_again(server, cache):
    Handler.routes["/book.txt"] = (BOOK, [])
    path = cache.fetch(f"{server}/book.txt", BOOK_SHA)
    assert path.read_bytes() == BOOK and path == cache.object_path(BOOK_SHA)
    assert cache.fetch(f"{server}/book.txt", BOOK_SHA) == path
    assert Handler.hits["/book.txt"] == 1
    assert cache.fetch(f"{server}/book.txt").read_bytes() == BOOK  # unpinned: always asks the server
    assert Handler.hits["/book.txt"] == 2
    assert not list((cache.root / "tmp").iterdir())


def test_wrong_checksum_is_refused_without_retrying(server, cache):
    Handler.routes["/book.txt"] = (BOOK, [])
    with pytest.raises(
        PipelineError,
        match=rf"corpus.sources\[0\]: {server}/book.txt: sha256 mismatch: expected 0+, got {BOOK_SHA}",
    ):
        cache.fetch(f"{server}/book.txt", "0" * 64, "corpus.sources[0]")
    assert Handler.hits["/book.txt"] == 1


def test_dropped_connection_and_server_errors_are_retried(server, cache):
    Handler.routes["/book.txt"] = (BOOK, ["drop", "500"])
    assert cache.fetch(f"{server}/book.txt", BOOK_SHA).read_bytes() == BOOK
    assert Handler.hits["/book.txt"] == 3


def test_retries_give_up_with_one_line_naming_the_url(server, cache):
    Handler.routes["/book.txt"] = (BOOK, ["drop", "drop", "drop"])
    with pytest.raises(PipelineError, match=r"book.txt: download failed after 3 attempts") as err:
        cache.fetch(f"{server}/book.txt", BOOK_SHA, "corpus.sources[0]")
    assert "\n" not in str(err.value) and Handler.hits["/book.txt"] == 3
    assert not cache.object_path(BOOK_SHA).exists() and not list((cache.root / "tmp").iterdir())


def test_timeout_is_retried(server, tmp_path):
    Handler.routes["/book.txt"] = (BOOK, ["slow"])
    cache = DownloadCache(tmp_path / "c", timeout_s=0.3, retries=1, backoff_s=0.05)
    assert cache.fetch(f"{server}/book.txt", BOOK_SHA).read_bytes() == BOOK
    assert Handler.hits["/book.txt"] == 2


def test_not_found_fails_at_once_and_unreachable_after_retries(server, cache):
    with pytest.raises(PipelineError, match=r"sft.data: .*/missing.json: HTTP 404"):
        cache.fetch(f"{server}/missing.json", None, "sft.data")
    assert Handler.hits["/missing.json"] == 1
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    with pytest.raises(
        PipelineError, match=rf"127.0.0.1:{closed}/x.txt: download failed after 3 attempts \(ConnectionError"
    ):
        cache.fetch(f"http://127.0.0.1:{closed}/x.txt", BOOK_SHA, "corpus.sources[0]")


def test_seeded_cache_resolves_the_default_sources_offline(shared_data, tmp_path):
    """`make seed-cache`: the shared copies make params.yaml's pinned URLs resolve with no network at all."""
    params = load_params(ROOT / "params.yaml")
    defaults = {
        "quijote.txt": params.corpus.sources[0],
        "instruction-data.json": params.sft.data,
        "instruction-data-with-preference.json": params.dpo.data,
    }
    cache = DownloadCache(tmp_path / "cache", timeout_s=1, retries=0)
    if shared_data is None:  # no shared copies: seed a generated file under a pinned, unreachable URL instead
        (tmp_path / "book.txt").write_bytes(BOOK)
        defaults = {"book.txt": Source("http://127.0.0.1:9/book.txt", BOOK_SHA)}
        shared_data = tmp_path
    files = [str(shared_data / name) for name in defaults]
    assert cli_main(["cache", "--cache-dir", str(cache.root), "add", *files]) == 0
    for name, source in defaults.items():
        path = cache.fetch(source.location, source.sha256)
        assert path.read_bytes() == (shared_data / name).read_bytes()


@pytest.mark.integration  # the download stage's process
def test_download_stage_over_http(server, tmp_path):
    """The real stage: a Gutenberg book over a flaky connection, SFT/DPO JSON verbatim, and the manifest."""
    sft = json.dumps([{"instruction": "Say hi", "input": "", "output": "Hi"}]).encode()
    Handler.routes.update(
        {"/book.txt": (BOOK, ["drop"]), "/sft.json": (sft, []), "/dpo.json": (sft, ["500"])}
    )
    project = make_project(
        tmp_path / "p",
        {
            "data": {"cache_dir": str(tmp_path / "cache"), "retries": 1},
            "corpus": {"sources": [{"url": f"{server}/book.txt", "sha256": BOOK_SHA}]},
            "sft": {"data": f"{server}/sft.json"},
            "dpo": {"data": f"{server}/dpo.json"},
        },
    )
    out = subprocess.run(
        [sys.executable, "-m", "stages.download"],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(project)},
    )
    assert out.returncode == 0, out.stderr
    raw = project / "data" / "raw"
    corpus = (raw / "corpus.txt").read_text(encoding="utf-8")
    assert corpus == TEXT
    assert (raw / "sft.json").read_bytes() == sft == (raw / "dpo.json").read_bytes()
    manifest = json.loads((raw / "manifest.json").read_text())
    assert manifest["files"]["corpus.txt"]["sha256"] == hashlib.sha256(corpus.encode()).hexdigest()
    assert manifest["files"]["sft.json"] == {
        "source": f"{server}/sft.json",
        "bytes": len(sft),
        "sha256": hashlib.sha256(sft).hexdigest(),
        "records": 1,
        "format": "json",
    }
    assert (
        manifest["sources"][0]["files"][0]["sha256"] == BOOK_SHA and manifest["sources"][0]["documents"] == 1
    )
    assert Handler.hits == {"/book.txt": 2, "/sft.json": 1, "/dpo.json": 2}
