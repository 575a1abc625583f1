"""`GET /metrics`: the engine's counters, gauges and latency histograms in Prometheus' text format (0.0.4), as
llama.cpp's server offers. Updated from the slots' threads (under one lock), rendered on the event loop."""

from __future__ import annotations

import threading
from typing import Any, Callable, Sequence

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0)
PREFIX = "qwen_edge_"


class Histogram:
    def __init__(self, buckets: Sequence[float]):
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float, times: int = 1) -> None:
        for i, b in enumerate(self.buckets):
            if value <= b:
                self.counts[i] += times
        self.sum += value * times
        self.count += times

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{b:g}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        return out + [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum:.6f}",
                      f"{name}_count {self.count}"]


class Metrics:
    """What /metrics reports. `finished(result)` after each generation (its GenerationStats), `step(...)` after each
    batched step; gauges are read from the engine when rendered."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.generated_tokens = 0
        self.steps = 0
        self.step_decode_tokens = 0
        self.step_prefill_tokens = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.token = Histogram(TOKEN_BUCKETS)

    def finished(self, result: Any) -> None:
        st = result.stats
        n = len(result.output_ids)
        with self.lock:
            self.prompt_tokens += len(result.prompt_ids)
            self.cached_tokens += int(st.reused_tokens)
            self.generated_tokens += n
            if st.time_to_first_token_s is not None:
                self.ttft.observe(st.time_to_first_token_s)
            if n > 1 and st.decode_s > 0:  # each later token counted at the request's mean gap between tokens
                self.token.observe(st.decode_s / (n - 1), n - 1)

    def step(self, n_decode: int, n_prefill: int, seconds: float) -> None:
        with self.lock:
            self.steps += 1
            self.step_decode_tokens += n_decode
            self.step_prefill_tokens += n_prefill

    def render(self, gauges: dict[str, tuple[str, float]], requests: dict[str, int]) -> str:
        """The text format: `gauges` {name: (help, value)}, `requests` {result: count}."""
        lines: list[str] = []

        def metric(name: str, kind: str, help: str, values: Callable[[str], list[str]]) -> None:
            full = PREFIX + name
            lines.extend([f"# HELP {full} {help}", f"# TYPE {full} {kind}", *values(full)])

        metric("requests_total", "counter", "Requests by how they ended (served, cancelled, errors, rejected).",
               lambda n: [f'{n}{{result="{k}"}} {v}' for k, v in requests.items()])
        for name, (help, value) in gauges.items():
            metric(name, "gauge", help, lambda n, v=value: [f"{n} {v:g}"])
        with self.lock:
            for name, help, value in (
                    ("prompt_tokens_total", "Prompt tokens of finished requests.", self.prompt_tokens),
                    ("prompt_tokens_cached_total", "Prompt tokens found in a slot's KV cache.", self.cached_tokens),
                    ("generated_tokens_total", "Tokens generated.", self.generated_tokens),
                    ("batch_steps_total", "Batched model steps (parallel slots).", self.steps),
                    ("batch_decode_tokens_total", "Decode tokens run in batched steps.", self.step_decode_tokens),
                    ("batch_prefill_tokens_total", "Prompt tokens run in batched steps.", self.step_prefill_tokens)):
                metric(name, "counter", help, lambda n, v=value: [f"{n} {v}"])
            metric("time_to_first_token_seconds", "histogram", "From a generation's start to its first token.",
                   self.ttft.lines)
            metric("token_latency_seconds", "histogram", "Seconds per generated token after the first (each "
                   "request's mean gap, counted once per token).", self.token.lines)
        return "\n".join(lines) + "\n"
