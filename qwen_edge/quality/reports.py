"""The typed shapes of what `verify()` and `bench()` return (also their `--json` documents)."""

from __future__ import annotations

from typing import Any, Callable, Optional, TypedDict

Log = Optional[Callable[[str], None]]
"""A progress callback: called with one line of text per step, or None for silence."""


class VerifyReport(TypedDict):
    """`verify()`'s result; `passed` is False when a metric in `failed` is outside its threshold."""

    passed: bool
    metrics: dict[str, float]
    """kl_mean, kl_p99, max_abs_logit_error, mean_abs_logit_error, top1_agreement, ppl_rel_change,
    greedy_common_prefix_mean/min (see docs/verify.md)."""
    thresholds: dict[str, float]
    failed: list[str]
    artifact: str
    reference: str
    reference_adapters: list[str]
    """LoRA adapters the manifest records, merged on the reference by PEFT (empty: none)."""
    format: str
    quant: str
    tokens_evaluated: int
    windows: int
    vocab_compared: int
    greedy_tokens: int
    greedy_prefixes: list[int]
    """Per greedy prompt: tokens the artifact follows the reference, near-ties passed over (verify.greedy_agreement)."""
    greedy_ties: list[int]
    """Per greedy prompt: near-ties met (the reference's top-2 margin < greedy_tie_margin, the artifact's pick other)."""
    greedy_tie_margin: float
    quick: bool
    reference_weights_sha256: str
    reference_matches_source: bool | None
    tokenizer: dict[str, Any]
    """matches_reference (else `tokenizer` is in `failed`), texts_compared, texts_differing, added_tokens_match."""
    random_weights: bool
    """The reference is a `qwen-edge synth` checkpoint (random weights)."""
    ungated: list[str]
    """Metrics reported but not gated because the reference has random weights (see RANDOM_WEIGHT_THRESHOLDS)."""
    eval_text_sha256: str
    backends: dict[str, str]
    reference_cache: dict[str, Any]
    """used (a cached reference was read), key (the entry's sha256 key, None when off), state: hit, computed,
    computed, not stored, or off (refcache.py)."""
    seconds: float
    verified_at: str


class Stat(TypedDict):
    """Median, minimum and maximum over a bench's repeats."""

    median: float
    min: float
    max: float


class BenchResult(TypedDict, total=False):
    """One artifact (at one thread count) in a bench report; see docs and `qwen-edge bench --json`."""

    artifact: str
    name: str
    format: str
    quant: str
    engine: str
    backend: str
    threads: int
    sweep: bool
    decode_tokens_per_s: Stat
    prefill_tokens_per_s: Stat
    time_to_first_token_s: Stat
    load_s: Stat
    inter_token_latency_s: dict[str, float]
    peak_rss_bytes: int
    size_bytes: int
    bits_per_weight: float | None
    prompt_tokens: int
    generated_tokens: int
    decode_tokens: int
    generated_ids: list[int]
    per_repeat: dict[str, list[float]]
    repeats: int
    roofline: dict[str, Any]
    ratio_to_first: dict[str, float | None]
    paired_ratio_to_first: dict[str, Stat]
    kv_cache_bytes: int | None
    rss_budget_bytes: int | None


class BenchReport(TypedDict):
    """`bench()`'s result: the machine, one row per artifact and thread count, and how it was run."""

    machine: dict[str, Any]
    results: list[BenchResult]
    config: dict[str, Any]
