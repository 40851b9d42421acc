"""The chat page of `serve`, driven in a real headless Chromium (Debian's chromium + chromium-driver, via Selenium).

Generation is gated token by token from the test (a wrapper around the model's token stream), so "the text
grows while streaming" and "Stop stops the generation on the server" are checked without timing races: the test
lets tokens through, watches the page, presses Stop, waits until the server has seen the client go, and then
lets exactly one more token through, after which the server's generation must end as cancelled."""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

import pipeline.serve.engine
from pipeline.model.sampling import SamplingOptions
from tests.helpers.serving import load_served, running_server, save_answering_model, save_native_model

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"  # the screenshot lands here (git-ignored; CI may upload it)
ANSWER = "En un lugar de la Mancha"
pytestmark = pytest.mark.timeout(300)


class GatedTokens:
    """Lets the wrapped model's tokens out one permit at a time, counting them."""

    def __init__(self, inner):
        self.inner, self.permits, self.produced = inner, threading.Semaphore(0), 0

    def stream(self, prompt_ids: list[int], opts: SamplingOptions) -> Iterator[int]:
        for token in self.inner.stream(prompt_ids, opts):
            if not self.permits.acquire(timeout=120):
                raise RuntimeError("the test let no more tokens through")
            self.produced += 1
            yield token

    def allow(self, n: int) -> None:
        for _ in range(n):
            self.permits.release()


class Generations:
    """The server-side hook: each generation's ``cancelled`` callable and its result, as the engine sees them."""

    def __init__(self, real):
        self.real, self.cancelled, self.results = real, [], []

    def __call__(self, model, prompt_ids, opts, stops, emit, cancelled):
        self.cancelled.append(cancelled)
        result = self.real(model, prompt_ids, opts, stops, emit, cancelled)
        self.results.append(result)
        return result


def browser(tmp_path: Path, monkeypatch) -> webdriver.Chrome:
    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must not try to download a driver
    options = Options()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--window-size=1280,800",
        f"--user-data-dir={tmp_path / 'profile'}",
    ):
        options.add_argument(flag)
    service = Service(executable_path=shutil.which("chromedriver") or "/usr/bin/chromedriver")
    return webdriver.Chrome(service=service, options=options)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tuned model in a project's layout, with what the sft stage records beside it (recipe and metrics)."""
    project = tmp_path_factory.mktemp("project")
    directory = save_answering_model(project / "models" / "sft", {"Begin the novel.": ANSWER})
    config = json.loads((directory / "config.json").read_text())
    config["stage"] = "sft"
    config["instructions"] |= {"data": "data/raw/sft.json", "data_sha256": "ab" * 32}
    (directory / "config.json").write_text(json.dumps(config))
    (project / "reports" / "sft").mkdir(parents=True)
    (project / "reports" / "sft" / "metrics.json").write_text(
        json.dumps(
            {
                "step": 150,
                "train": {"loss": 0.0123},
                "val": {"loss": 0.0456},
                "data": {"train": 1, "truncated": 0},
            }
        )
    )
    return directory


def test_root_answers_api_clients_as_ollama_and_browsers_with_the_page(model_dir):
    with running_server(load_served({"sft": model_dir})) as (url, _):
        assert httpx.get(url).text == "Ollama is running"
        page = httpx.get(url, headers={"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"})
        assert page.headers["content-type"].startswith("text/html") and "/api/chat" in page.text
        assert "http://" not in page.text and "https://" not in page.text  # nothing fetched from elsewhere
        card = httpx.get(f"{url}/chat/card/sft:latest").json()
        assert card["template"] == "alpaca" and card["shape"]["context_length"] == 96 and card["size_mb"] > 0
        assert card["stage"] == "sft" and card["training_data"] == [f"data/raw/sft.json (sha256 {'ab' * 6}…)"]
        assert card["metrics"] == {"train/loss": 0.0123, "val/loss": 0.0456}
        assert httpx.get(f"{url}/chat/card/nope").status_code == 404


def test_chat_page_streams_and_stops_in_chromium(model_dir, tmp_path, monkeypatch):
    base = tmp_path / "models" / "base"  # served first: the page must still open on the tuned model
    shutil.copytree(model_dir, base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "stage": "pretrain"}))
    models = load_served({"base": base, "sft": model_dir})
    gate = models["sft:latest"].tokens = GatedTokens(models["sft:latest"].tokens)
    generations = Generations(pipeline.serve.engine.generate_text)
    monkeypatch.setattr(pipeline.serve.engine, "generate_text", generations)
    with running_server(models) as (url, _):
        driver = browser(tmp_path, monkeypatch)
        try:
            wait = WebDriverWait(driver, 60, poll_frequency=0.05)
            driver.get(url + "/")
            wait.until(lambda d: "val/loss" in d.find_element(By.ID, "card").text)  # the sft card, unasked
            model = Select(driver.find_element(By.ID, "model"))
            assert model.first_selected_option.get_attribute("value") == "sft:latest"
            assert "single-turn" in driver.find_element(By.ID, "mode").text
            temperature = driver.find_element(By.ID, "temperature")
            temperature.clear()
            temperature.send_keys("0")
            driver.find_element(By.ID, "prompt").send_keys("Begin the novel.")
            driver.find_element(By.ID, "send").click()

            def answer() -> str:
                return driver.execute_script(
                    "const a = document.querySelector('.assistant');"
                    "return a && a.firstChild ? a.firstChild.nodeValue : '';"
                )

            gate.allow(3)
            first = wait.until(lambda d: len(answer()) >= 3 and answer())
            gate.allow(5)
            second = wait.until(lambda d: len(answer()) >= 8 and answer())
            assert second.startswith(first) and len(second) > len(first)  # the same answer, grown: streamed
            assert ANSWER.startswith(second)
            assert driver.find_element(By.ID, "send").get_attribute("disabled")

            driver.find_element(By.ID, "stop").click()
            wait.until(lambda d: "stopped" in d.find_element(By.CSS_SELECTOR, ".assistant").text)
            wait.until(lambda d: generations.cancelled[0]())  # the server saw the client go away
            gate.allow(1)  # the generation takes one more token, sees the cancellation and ends
            wait.until(lambda d: generations.results)
            assert generations.results[0].done_reason == "cancelled" and gate.produced == 9
            assert not driver.find_element(By.ID, "send").get_attribute("disabled")
            ARTIFACTS.mkdir(exist_ok=True)
            driver.save_screenshot(str(ARTIFACTS / "chat-page.png"))
            assert (ARTIFACTS / "chat-page.png").stat().st_size > 0
        finally:
            driver.quit()


def test_chat_page_with_a_llama_family_model_in_its_base_template(tmp_path, monkeypatch):
    """The page against a Llama-family model tuned in its base's own ChatML template (template native): the card
    says native, the mode multi-turn, and the server renders the whole conversation (the second message carries
    the first exchange) to transformers' apply_chat_template ids; answers stop at <|im_end|>."""
    from transformers import AutoTokenizer

    answers = {"Begin the novel.": ANSWER, "Name a color.": "Blue."}
    directory = save_native_model(tmp_path / "models" / "sft", answers, context_length=256)
    generations = Generations(pipeline.serve.engine.generate_text)
    monkeypatch.setattr(pipeline.serve.engine, "generate_text", generations)
    with running_server(load_served({"sft": directory})) as (url, _):
        assert httpx.get(f"{url}/chat/card/sft:latest").json()["template"] == "native"
        driver = browser(tmp_path, monkeypatch)
        try:
            wait = WebDriverWait(driver, 60, poll_frequency=0.05)
            driver.get(url + "/")
            wait.until(lambda d: "multi-turn" in d.find_element(By.ID, "mode").text)
            assert "the base's own chat template" in driver.find_element(By.ID, "mode").text
            temperature = driver.find_element(By.ID, "temperature")
            temperature.clear()
            temperature.send_keys("0")
            for turn, question in enumerate(answers, 1):
                driver.find_element(By.ID, "prompt").send_keys(question)
                driver.find_element(By.ID, "send").click()
                wait.until(lambda d, n=turn: len(generations.results) == n)
                wait.until(lambda d: not d.find_element(By.ID, "send").get_attribute("disabled"))
            shown = [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".assistant")]
        finally:
            driver.quit()
    assert shown[0].startswith(ANSWER)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "models" / "sft-base")
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    conversation = []
    for generated, question in zip(generations.results, answers, strict=True):
        conversation.append({"role": "user", "content": question})
        expected = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, return_dict=False)
        assert generated.prompt_ids == expected and generated.stop_id == im_end
        conversation.append({"role": "assistant", "content": tokenizer.decode(generated.output_ids).strip()})
