"""Start a real `kestrel serve` process for tests."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, *args: str, headers: dict | None = None, port: int | None = None):
        self.headers = headers or {}  # sent with metric() reads (an API key)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        # the server's output goes to a file: a pipe nobody reads would fill up and block the server
        self.log_file = tempfile.NamedTemporaryFile("w+", prefix="kestrel-serve-", suffix=".log", delete=False)
        self.proc = subprocess.Popen([sys.executable, "-m", "kestrel.cli", "serve", "--port", str(self.port), *args],
                                     stdout=self.log_file, stderr=subprocess.STDOUT, text=True, env=env)
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("server exited during start:\n" + self.log())
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.proc.kill()
        raise RuntimeError("server did not become healthy")

    def openai_client(self, api_key: str = "unused"):
        """The real openai client, pointed at this server's /v1."""
        import openai
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key)

    def log(self) -> str:
        with open(self.log_file.name) as f:
            return f.read()

    def metric(self, name: str) -> float:
        for line in httpx.get(self.url + "/metrics", headers=self.headers).text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(name)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return -9
