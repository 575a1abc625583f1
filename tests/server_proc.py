"""A `qwen-edge serve` subprocess for tests: started on a free port, reached on 127.0.0.1, stopped by a signal."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai

KEY = "sk-test-key"


class Server:
    def __init__(self, artifact: Path, log: Path, *args: str, env: dict[str, str] | None = None):
        self.log_path = log
        self._log = open(log, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "qwen_edge.cli", "serve", str(artifact), "--port", "0",
                                      *args], stdout=subprocess.DEVNULL, stderr=self._log,
                                     env={**os.environ, **(env or {})})
        deadline = time.monotonic() + 180
        port = None
        while port is None:
            m = re.search(r"on http://\S+:(\d+)/v1", log.read_text())
            if m:
                port = int(m.group(1))
            elif self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"server did not start: {log.read_text()}")
            else:
                time.sleep(0.05)
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        while True:
            try:
                self.health()
                break
            except OSError:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)

    def client(self, key: str | None = KEY, **kw):
        return openai.OpenAI(base_url=self.base + "/v1", api_key=key or "none", max_retries=0, **kw)

    def health(self) -> dict:
        with urllib.request.urlopen(self.base + "/health", timeout=30) as r:
            return json.loads(r.read())

    def post(self, path: str, body: bytes | dict, key: str | None = KEY) -> tuple[int, dict]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        req = urllib.request.Request(self.base + path, data=data, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(60)
        finally:
            self._log.close()

    def wait_idle(self) -> dict:
        deadline = time.monotonic() + 60
        while True:
            h = self.health()
            if not h["busy"] or time.monotonic() > deadline:
                return h
            time.sleep(0.02)
