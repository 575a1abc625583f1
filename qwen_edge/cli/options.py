"""Flags and argument conversions shared by the run verbs (generate, chat, bench) and serve."""

from __future__ import annotations

import argparse
from typing import Any

from ..runtime.sampling import Sampling


def sampling_from_args(args: Any, generation_config: dict[str, Any], *, default_greedy: bool) -> Sampling:
    """Greedy unless --temperature (or, for chat, the model's generation config) asks for sampling."""
    flags = {"top_k": args.top_k, "top_p": args.top_p, "min_p": args.min_p,
             "repetition_penalty": args.repetition_penalty, "presence_penalty": args.presence_penalty,
             "frequency_penalty": args.frequency_penalty, "seed": args.seed}
    # Validate every flag even when decoding is greedy: a bad value is an error, never silently ignored.
    Sampling(temperature=1.0, **{k: v for k, v in flags.items() if v is not None})
    if args.temperature is None and default_greedy:
        ignored = [f"--{k.replace('_', '-')}" for k in ("top_k", "top_p", "min_p") if flags[k] is not None]
        if ignored:
            from ..log import logger

            logger.warning(f"note: {', '.join(ignored)} ignored: decoding is greedy without --temperature")
        return Sampling(temperature=0.0, repetition_penalty=args.repetition_penalty or 1.0,
                        presence_penalty=args.presence_penalty or 0.0, frequency_penalty=args.frequency_penalty or 0.0,
                        seed=args.seed)
    return Sampling.from_generation_config(generation_config, temperature=args.temperature, **flags)


def adapter_options(args: Any) -> dict[str, Any]:
    """The backends' LoRA options from --adapter / --adapter-scale (none given: the artifact's own)."""
    out: dict[str, Any] = {}
    if getattr(args, "adapter", None):
        out["adapter"] = list(args.adapter)
    if getattr(args, "adapter_scale", None) is not None:
        out["adapter_scale"] = args.adapter_scale
    return out


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", action="append", metavar="LORA_FILE", help="run with this LoRA adapter: a llama.cpp "
                   "LoRA GGUF (gguf) or an .onnx_adapter (onnx, an export with --adapter-mode separate); repeatable, "
                   "replaces the adapters the artifact ships")
    p.add_argument("--adapter-scale", type=float, help="scale of the LoRA adapters (default 1; 0 runs the base)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"], help="where to run (default cpu)")
    p.add_argument("--target", help="target profile name or YAML (runtimes/): threads, providers, GPU layers")
    p.add_argument("--threads", type=int, help="CPU threads (default: the target profile's, else physical cores)")
    p.add_argument("--max-context", type=int, help="KV cache size in tokens (default: min(model max, 4096))")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, help="0 = greedy (default: greedy for generate)")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--min-p", type=float)
    p.add_argument("--repetition-penalty", type=float)
    p.add_argument("--presence-penalty", type=float, help="OpenAI's: lowers every token already generated once")
    p.add_argument("--frequency-penalty", type=float, help="OpenAI's: lowers a token once per time it was generated")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", help="extra stop string (repeatable)")
