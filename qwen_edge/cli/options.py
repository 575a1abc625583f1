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


def add_speculative_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lookup", type=int, metavar="N", default=0,
                   help="prompt-lookup decoding: draft up to N tokens copied from the prompt and reply, verified in "
                   "one pass (exact: the output is what plain decoding gives; 0 = off)")
    p.add_argument("--draft", metavar="ARTIFACT", help="speculative decoding with this smaller artifact (same "
                   "tokenizer, any format) as the draft model; exact")
    p.add_argument("--draft-tokens", type=int, default=4, metavar="K", help="tokens the draft proposes per step "
                   "(default 4)")
    p.add_argument("--no-fast-forward", dest="fast_forward", action="store_false",
                   help="feed the tokens a constraint forces one step each (the output is the same; slower)")


def speculative_from_args(args: Any, tokenizer: Any) -> Any:
    """The Speculative of --lookup/--draft/--draft-tokens/--no-fast-forward; with --draft it holds a loaded draft
    runtime the caller closes (`close_speculative`). A draft with another vocabulary is a QwenEdgeError."""
    from ..errors import QwenEdgeError
    from ..runtime.speculative import Speculative

    if getattr(args, "lookup", 0) and getattr(args, "draft", None):
        raise QwenEdgeError("use either --lookup or --draft, not both")
    spec = Speculative(fast_forward=getattr(args, "fast_forward", True), lookup=getattr(args, "lookup", 0) or 0,
                       draft_tokens=getattr(args, "draft_tokens", 4))
    if getattr(args, "draft", None):
        from ..backends import load
        from ..runtime.meta import model_meta
        from ..text.tokenizer import Tokenizer

        theirs = Tokenizer.from_dir(model_meta(args.draft).tokenizer_dir)
        probe = "Hello, world! 123 <|im_start|>user\n def f(x): return x"
        if theirs.vocab_size != tokenizer.vocab_size or \
                theirs.encode(probe, parse_special=True) != tokenizer.encode(probe, parse_special=True):
            raise QwenEdgeError(f"--draft {args.draft}: its tokenizer is not the target's (a draft must share the "
                                "vocabulary)")
        spec.draft = load(args.draft, device=getattr(args, "device", "cpu"), max_context=args.max_context,
                          threads=args.threads)
    return spec


def close_speculative(spec: Any) -> None:
    if spec is not None and spec.draft is not None:
        spec.draft.close()


def load_with_speculative(args: Any, tokenizer: Any) -> tuple[Any, Any]:
    """(the target runtime, its Speculative) for generate and chat; the caller closes both (`close_speculative`)."""
    from ..backends import load

    spec = speculative_from_args(args, tokenizer)
    try:
        return load(args.artifact, device=args.device, target=args.target, max_context=args.max_context,
                    threads=args.threads, **adapter_options(args)), spec
    except BaseException:
        close_speculative(spec)
        raise
