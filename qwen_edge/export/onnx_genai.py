"""genai_config.json so onnxruntime-genai loads an ONNX artifact directory as it is."""

from __future__ import annotations

from typing import Any

from ..model.checkpoint import Checkpoint
from ..families import family_of

DEFAULT_MAX_LENGTH = 4096
"""search.max_length: onnxruntime-genai preallocates a KV cache of this many tokens (not the full context)."""


def spin_entries(spin: Any) -> dict[str, str]:
    """onnxruntime session config entries for a target profile's `spin` (targets.check_spin values): `auto` and true:
    onnxruntime's own spinning; false: idle compute threads sleep at once; N: spin up to N microseconds.
    onnxruntime-genai passes string-valued `session_options` keys to onnxruntime as session config entries.

    `auto` is decided at load by qwen-edge's backend (spin while its threads have the cores to themselves, else
    sleep); the export cannot see the machine an app will load on, so it writes what that rule picks on a machine
    the app has to itself. Measured on a 2-core AVX2 EPYC with benchmarks/bench_genai_threads.py (issue 24):
    on the idle machine genai decoded our int4 0.5B at 0.98x qwen-edge's backend spinning, 0.70-0.75x sleeping;
    beside busy cores (load average 6-7, where our backend stops spinning) at 0.56-0.69x spinning, 0.77-1.07x
    sleeping (benchmarks/RESULTS.md): a device whose cores are shared wants a profile with `spin: false`."""
    if spin in (True, "auto"):
        return {"session.intra_op.allow_spinning": "1"}
    if spin in (False, None, 0):
        return {"session.intra_op.allow_spinning": "0"}
    return {"session.intra_op.allow_spinning": "1", "session.intra_op.spin_duration_us": str(int(spin))}


def intra_op_threads(threads: Any) -> int:
    """`intra_op_num_threads` for a target profile's `threads`. Without the key onnxruntime-genai 0.18 runs one
    compute thread (half the decode speed of a 2-core machine, AMD and Intel alike), so the key is always written:

    - a count (arm64-mobile's 4: a phone's big cores; onnxruntime's own default counts every core, the LITTLE ones
      too, and each parallel op waits for its slowest thread) as it is;
    - `auto` as 0: onnxruntime's own default when the app loads it, the physical cores of the machine the app runs
      on, which the export cannot see (qwen-edge's backend uses the same count, less cores that are busy at load).
      onnxruntime counts the machine's cores, not the process's CPU affinity (measured: 2 threads under `taskset -c
      0`), so a device that pins the app to fewer CPUs needs a profile with a count."""
    return threads if isinstance(threads, int) and not isinstance(threads, bool) and threads > 0 else 0


def genai_config(ckpt: Checkpoint, *, model_file: str, context_length: int, tokenizer: dict[str, Any],
                 device: str = "cpu", max_length: int | None = None, spin: Any = "auto",
                 threads: Any = "auto") -> dict[str, Any]:
    a = ckpt.arch
    gen = ckpt.generation_config
    stop = list(tokenizer.get("stop_ids") or [tokenizer.get("eos_token_id")])
    provider_options: list[dict[str, Any]] = [{"cuda": {}}] if device == "cuda" else []
    session_options: dict[str, Any] = {"log_id": "onnxruntime-genai", "provider_options": provider_options}
    if device == "cpu":
        session_options["intra_op_num_threads"] = intra_op_threads(threads)
        session_options.update(spin_entries(spin))
    return {
        "model": {
            "bos_token_id": tokenizer.get("bos_token_id") if tokenizer.get("bos_token_id") is not None
            else tokenizer.get("pad_token_id"),
            "context_length": context_length,
            "decoder": {
                "session_options": session_options,
                "filename": model_file,
                "head_size": a.head_dim,
                "hidden_size": a.hidden_size,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": a.num_heads,
                "num_hidden_layers": a.num_layers,
                "num_key_value_heads": a.num_kv_heads,
            },
            "eos_token_id": stop if len(stop) > 1 else stop[0],
            "pad_token_id": tokenizer.get("pad_token_id"),
            "type": family_of(a).genai_type,
            "vocab_size": a.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": bool(gen.get("do_sample", False)),
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": min(context_length, max_length or DEFAULT_MAX_LENGTH),
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": True,
            "repetition_penalty": float(gen.get("repetition_penalty", 1.0)),
            "temperature": float(gen.get("temperature", 1.0)),
            "top_k": int(gen.get("top_k", 50) or 50),
            "top_p": float(gen.get("top_p", 1.0)),
        },
    }
