"""Screenshots of the playground, the arena and the leaderboard on the embedded model, for the docs.

    .venv/bin/python scripts/screenshots.py [--out docs/screenshots]

Starts `kestrel serve` with the embedded model served under two names (its base and a second endpoint naming the
same server), chats in the playground, fights one arena battle, imports a simulated battle log (six models of
known ratings, 3,000 votes) for the leaderboard, and saves a PNG of each page. Needs chromium and chromium-driver.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import httpx
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kestrel.arena.ratings import Battle, draw_pair  # noqa: E402
from tests.server_utils import ServerProcess, free_port  # noqa: E402

TRUE = {"llama-3-8b": 1150, "qwen2-7b": 1120, "mistral-7b": 1060, "smollm2-1.7b": 980, "smollm2-360m": 900,
        "smollm2-135m": 790}


def simulated_log(n: int = 3000, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    battles = []
    for _ in range(n):
        a, b = draw_pair(sorted(TRUE), battles, "uniform", rng)
        p = 1 / (1 + 10 ** ((TRUE[b] - TRUE[a]) / 400))
        winner = "tie" if rng.random() < 0.1 else ("model_a" if rng.random() < p else "model_b")
        battles.append(Battle(a, b, winner))
    return "".join(json.dumps({"model_a": b.model_a, "model_b": b.model_b, "winner": b.winner}) + "\n"
                   for b in battles)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="docs/screenshots")
    args = p.parse_args()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    os.makedirs(args.out, exist_ok=True)
    port = free_port()
    data = tempfile.mkdtemp()
    server = ServerProcess("--data-dir", data, "--arena-endpoint", f"smollm2-again=http://127.0.0.1:{port}/v1",
                           port=port)
    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,860"):
        options.add_argument(flag)
    options.binary_location = "/usr/bin/chromium"
    b = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        b.get(server.url + "/")
        WebDriverWait(b, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#model option"))
        b.find_element(By.ID, "input").send_keys("Give me three tips for writing clear emails, as a list.")
        b.find_element(By.ID, "send").click()
        WebDriverWait(b, 300).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant .stats"))
        b.save_screenshot(os.path.join(args.out, "playground.png"))
        b.get(server.url + "/arena")
        b.find_element(By.ID, "input").send_keys("What is the capital of France? One sentence.")
        b.find_element(By.ID, "send").click()
        WebDriverWait(b, 300).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-done='1']")) == 2)
        b.find_element(By.CSS_SELECTOR, ".votes button[data-winner='tie']").click()
        WebDriverWait(b, 60).until(lambda d: d.find_element(By.ID, "name-a").text.startswith("A: "))
        b.save_screenshot(os.path.join(args.out, "arena.png"))
        server.stop()  # the leaderboard from the simulated log alone, in a fresh store
        server = ServerProcess("--data-dir", tempfile.mkdtemp())
        httpx.post(server.url + "/arena/api/battles.jsonl", content=simulated_log(), timeout=60)
        b.get(server.url + "/leaderboard")
        WebDriverWait(b, 120).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#plot img"))
        b.save_screenshot(os.path.join(args.out, "leaderboard.png"))
        board = httpx.get(server.url + "/arena/api/leaderboard", timeout=60).json()["leaderboard"]
        print("true ratings:", TRUE)
        for r in board:
            print(r)
    finally:
        b.quit()
        server.stop()


if __name__ == "__main__":
    main()
