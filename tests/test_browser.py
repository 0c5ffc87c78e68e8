"""The web pages in a real browser (Debian's chromium, driven by Selenium through chromium-driver): the
playground streams a reply with its figures, the arena shows two answers and records a vote, the leaderboard
renders. Screenshots go to test-artifacts/ (or $KESTREL_TEST_ARTIFACTS)."""
from __future__ import annotations

import os
import shutil

import httpx
import pytest

from tests.lora_utils import make_adapter
from tests.server_utils import ServerProcess

KEY = "browser-key"
ARTIFACTS = os.environ.get("KESTREL_TEST_ARTIFACTS",
                           os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "test-artifacts"))


@pytest.fixture(scope="module")
def browser():
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.fail("the browser tests need Debian's chromium and chromium-driver: "
                    "sudo apt-get install chromium chromium-driver (./test's set-up does this where it may)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(flag)
    b = webdriver.Chrome(service=Service(driver), options=options)
    b.set_page_load_timeout(60)
    os.makedirs(ARTIFACTS, exist_ok=True)
    yield b
    b.quit()


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_llama_dir):
    root = tmp_path_factory.mktemp("browser")
    adapters = {name: make_adapter(tiny_llama_dir, str(root / name), 4, ["q_proj", "v_proj"], seed=i)
                for i, name in enumerate(["terse", "chatty"])}
    srv = ServerProcess("--model", tiny_llama_dir, "--dtype", "float32", "--api-key", KEY,
                        "--data-dir", str(root / "data"), "--lora-modules", *(f"{n}={d}" for n, d in adapters.items()),
                        headers={"Authorization": f"Bearer {KEY}"})
    yield srv
    assert srv.stop() == 0


def _wait(browser, condition, timeout: float = 90):
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(browser, timeout).until(condition)


def _with_key(browser, server, page: str) -> None:
    browser.get(server.url + page)
    browser.execute_script(f"localStorage.setItem('kestrel-api-key', '{KEY}')")  # as the key field does
    browser.get(server.url + page)


def test_playground_streams_a_reply_with_its_figures(browser, server):
    from selenium.webdriver.common.by import By

    _with_key(browser, server, "/")
    _wait(browser, lambda b: len(b.find_elements(By.CSS_SELECTOR, "#model option")) == 3)
    assert [o.text for o in browser.find_elements(By.CSS_SELECTOR, "#model option")][0] == "default"
    browser.find_element(By.ID, "max_tokens").clear()
    browser.find_element(By.ID, "max_tokens").send_keys("12")
    browser.find_element(By.ID, "input").send_keys("Write **one** word.")
    browser.find_element(By.ID, "send").click()
    stats = _wait(browser, lambda b: b.find_elements(By.CSS_SELECTOR, ".msg.assistant .stats"))
    assert "tokens" in stats[0].text and "tok/s" in stats[0].text and "TTFT" in stats[0].text
    assert "cached prompt tokens" in stats[0].text
    assert browser.find_element(By.CSS_SELECTOR, ".msg.user").text == "Write **one** word."
    assert browser.find_element(By.ID, "error").text == ""
    browser.save_screenshot(os.path.join(ARTIFACTS, "playground.png"))


def test_arena_shows_two_answers_and_records_a_vote(browser, server):
    from selenium.webdriver.common.by import By

    before = len(httpx.get(server.url + "/arena/api/battles.jsonl", headers=server.headers).text.splitlines())
    _with_key(browser, server, "/arena")
    browser.find_element(By.ID, "input").send_keys("Say hello.")
    browser.find_element(By.ID, "send").click()
    _wait(browser, lambda b: len(b.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-done='1']")) == 2)
    assert browser.find_element(By.ID, "name-a").text == "Model A"  # anonymous until the vote
    browser.find_element(By.CSS_SELECTOR, ".votes button[data-winner='model_a']").click()
    _wait(browser, lambda b: b.find_element(By.ID, "name-a").text.startswith("A: "))
    names = {browser.find_element(By.ID, f"name-{s}").text[3:] for s in "ab"}
    assert len(names) == 2 and names <= {"default", "terse", "chatty"}
    browser.save_screenshot(os.path.join(ARTIFACTS, "arena.png"))
    log = httpx.get(server.url + "/arena/api/battles.jsonl", headers=server.headers).text.splitlines()
    assert len(log) == before + 1 and '"winner": "model_a"' in log[-1]


def test_leaderboard_renders(browser, server):
    from selenium.webdriver.common.by import By

    # a simulated battle log, imported, so the board has something to rank
    lines = "".join(f'{{"model_a": "{a}", "model_b": "{b}", "winner": "{w}"}}\n' for a, b, w in
                    [("default", "terse", "model_a"), ("chatty", "default", "model_b"), ("terse", "chatty", "tie")] * 8)
    assert httpx.post(server.url + "/arena/api/battles.jsonl", content=lines, headers=server.headers).status_code == 200
    _with_key(browser, server, "/leaderboard")
    rows = _wait(browser, lambda b: b.find_elements(By.CSS_SELECTOR, "#ratings tbody tr"))
    assert len(rows) == 3 and rows[0].find_elements(By.TAG_NAME, "td")[1].text == "default"
    _wait(browser, lambda b: b.find_elements(By.CSS_SELECTOR, "#plot img"))
    assert len(browser.find_elements(By.CSS_SELECTOR, "#matrix tr")) == 4
    browser.save_screenshot(os.path.join(ARTIFACTS, "leaderboard.png"))
