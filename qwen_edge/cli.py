"""Command-line interface: parse arguments, call one library function per verb, map errors to exit codes."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence

from . import __version__
from .errors import GateFailed, QwenEdgeError, first_line
from .log import NORMAL, QUIET, VERBOSE, configure, say


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def _overrides(items: Sequence[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or []:
        if "=" not in item:
            raise QwenEdgeError(f"override {item!r}: expected key=value (e.g. quant.block_size=64)")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


# --- verbs ---------------------------------------------------------------------------------------------------
def cmd_synth(a: argparse.Namespace) -> int:
    from .synth import synth

    path = synth(a.arch, a.output, seed=a.seed)
    say(f"wrote {path}")
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    from .recipe import run_export

    return run_export(source=a.source, fmt=a.format, quant=a.quant, target=a.target, out_dir=a.output,
                      revision=a.revision,
                      recipe_path=a.recipe, overrides=_overrides(a.set), name=a.name, verify=a.verify,
                      force=a.force, max_context=a.max_context, recipe_dirs=a.recipes_dir or ())


def cmd_verify(a: argparse.Namespace) -> int:
    if a.on_device:
        if a.reference or a.quick:
            raise QwenEdgeError("verify --on-device compares with the reference logits recorded in the artifact: "
                                "--reference and --quick do not apply")
        from .verify_device import run_verify_on_device

        return run_verify_on_device(a.artifact, as_json=a.json, threads=a.threads, target=a.target)
    if a.threads or a.target:
        raise QwenEdgeError("--threads and --target apply to verify --on-device only")
    from .verify import run_verify

    return run_verify(a.artifact, reference=a.reference, as_json=a.json, quick=a.quick)


def cmd_inspect(a: argparse.Namespace) -> int:
    from .inspect import inspect, render_inspect

    info = inspect(a.artifact)
    if a.json:
        _print_json(info)
    else:
        print(render_inspect(info))
    return 0


def cmd_generate(a: argparse.Namespace) -> int:
    from .generate import run_generate_cli

    return run_generate_cli(a)


def cmd_chat(a: argparse.Namespace) -> int:
    from .chat_cli import run_chat_cli

    return run_chat_cli(a)


def cmd_bench(a: argparse.Namespace) -> int:
    from .bench import run_bench_cli

    return run_bench_cli(a)


def cmd_recipes(a: argparse.Namespace) -> int:
    from .recipe import list_recipes, render_recipes

    rows = list_recipes(a.recipes_dir or ())
    if a.json:
        _print_json(rows)
    else:
        print(render_recipes(rows))
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(model=a.model, out_dir=a.output, quick=a.quick)


class _Parser(argparse.ArgumentParser):
    """argparse with the project's error contract: one line `error: ...` on stderr, exit 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


# --- parser --------------------------------------------------------------------------------------------------
def _add_runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"], help="where to run (default cpu)")
    p.add_argument("--target", help="target profile name or YAML (runtimes/): threads, providers, GPU layers")
    p.add_argument("--threads", type=int, help="CPU threads (default: the target profile's, else physical cores)")
    p.add_argument("--max-context", type=int, help="KV cache size in tokens (default: min(model max, 4096))")


def _add_recipes_dir_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipes-dir", action="append", metavar="DIR",
                   help="also look for recipes in DIR, before $QWEN_EDGE_RECIPES_PATH and the packaged ones "
                   "(repeatable)")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, help="0 = greedy (default: greedy for generate)")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--min-p", type=float)
    p.add_argument("--repetition-penalty", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", help="extra stop string (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    level = common.add_mutually_exclusive_group()
    level.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                       help="say more: debug messages, llama.cpp's own log")
    level.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                       help="print nothing on stderr but errors (stdout keeps its output)")
    ap = _Parser(prog="qwen-edge", description="Export, verify, run and benchmark small Qwen models "
                 "as ONNX and GGUF artifacts on CPU, arm64 and GPU.", parents=[common])
    ap.add_argument("--version", action="version", version=f"qwen-edge {__version__}")
    sub = ap.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True

    def add(name: str, **kw: Any) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], **kw)

    p = add("synth", help="write an architecture-exact checkpoint with random weights (offline)")
    from .models import MODELS

    p.add_argument("arch", choices=list(MODELS), metavar="ARCH", help="one of: " + ", ".join(MODELS))
    p.add_argument("-o", "--output", required=True, help="checkpoint directory to write")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_synth)

    p = add("export", help="export a checkpoint to a GGUF or ONNX artifact")
    p.add_argument("source", nargs="?", help="checkpoint directory or hub id, Org/Name[@revision] "
                   "(overrides the recipe's source)")
    p.add_argument("--revision", help="hub revision (branch, tag or commit) of a hub-id source; the manifest records "
                   "the commit")
    p.add_argument("--format", choices=["gguf", "onnx"])
    p.add_argument("--quant", help="gguf: f32 f16 bf16 q8_0 q4_0 q4_k_m q5_k_m q6_k iq4_nl ...; onnx: fp32 fp16 int8 int4")
    p.add_argument("--target", help="target profile (cpu-x86_64, arm64-mobile, cuda) or a YAML path")
    p.add_argument("--recipe", help="export recipe: a YAML path, or a name from `qwen-edge recipes`")
    _add_recipes_dir_arg(p)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="dotted recipe override, e.g. quant.block_size=64")
    p.add_argument("--name", help="artifact directory name (default: derived from source, format, quant)")
    p.add_argument("--max-context", type=int, help="context length recorded in the artifact")
    p.add_argument("--no-verify", dest="verify", action="store_false", help="skip the parity check after export")
    p.add_argument("--force", action="store_true", help="re-export even when an identical artifact exists")
    p.add_argument("-o", "--output", required=True, help="output directory (the artifact goes in OUTPUT/NAME)")
    p.set_defaults(func=cmd_export)

    p = add("verify", help="check an artifact against the PyTorch reference, or --on-device against its recorded "
            "reference logits (exit 1 on drift)")
    p.add_argument("artifact")
    p.add_argument("--reference", help="reference checkpoint directory or hub id (default: the manifest's source; "
                   "a hub source at its recorded commit)")
    p.add_argument("--quick", action="store_true", help="short evaluation text (for smoke tests)")
    p.add_argument("--on-device", action="store_true", help="no torch: run the artifact on this machine's runtime "
                   "against the reference logits recorded when it was verified; the same gates")
    p.add_argument("--threads", type=int, help="with --on-device: CPU threads (default: the target's)")
    p.add_argument("--target", help="with --on-device: target profile (default: this machine's)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_verify)

    p = add("inspect", help="describe an artifact or a bare .gguf/.onnx file")
    p.add_argument("artifact")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)

    p = add("generate", help="generate text from a prompt or a messages JSON file")
    p.add_argument("artifact")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="user message (rendered with the artifact's chat template)")
    src.add_argument("--messages", help="JSON file with a list of {role, content} messages")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--raw", action="store_true", help="feed --prompt as is, without the chat template")
    think = p.add_mutually_exclusive_group()
    think.add_argument("--think", dest="think", action="store_true", default=None)
    think.add_argument("--no-think", dest="think", action="store_false")
    p.add_argument("--json", action="store_true")
    _add_sampling_args(p)
    _add_runtime_args(p)
    p.set_defaults(func=cmd_generate)

    p = add("chat", help="interactive chat in the terminal",
            description="Interactive chat. Sampling defaults to the model's generation_config.json (Qwen2.5: "
            "temperature 0.7, top-p 0.8, top-k 20, repetition penalty 1.05; Qwen3: 0.6, 0.95, 20; none: greedy); "
            "flags override it, --temperature 0 is greedy. A message that does not fit the context is refused and "
            "the session goes on.")
    p.add_argument("artifact")
    p.add_argument("--stats", action="store_true", help="print a one-line timing after each reply")
    p.add_argument("--system", help="system prompt")
    think = p.add_mutually_exclusive_group()
    think.add_argument("--think", dest="think", action="store_true", default=None)
    think.add_argument("--no-think", dest="think", action="store_false")
    _add_sampling_args(p)
    _add_runtime_args(p)
    p.set_defaults(func=cmd_chat, max_new_tokens=1024)

    p = add("bench", help="measure CPU latency of one or more artifacts side by side")
    p.add_argument("artifacts", nargs="+")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, help="threads (default: the target profile's, else physical cores)")
    p.add_argument("--thread-sweep", help="comma-separated thread counts, e.g. 1,2")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--target", help="target profile")
    p.add_argument("--max-context", type=int)
    p.add_argument("--json", action="store_true", help="print the JSON report on stdout")
    p.add_argument("--markdown", help="write a markdown table to this file")
    p.add_argument("--plot", help="write a PNG plot to this file (needs matplotlib)")
    p.add_argument("--budget", action="append", help="gate, e.g. decode_tokens_per_s>=20 (exit 1 when missed)")
    p.set_defaults(func=cmd_bench)

    p = add("recipes", help="list the export recipes (packaged, plus any directory you name)")
    p.add_argument("--json", action="store_true")
    _add_recipes_dir_arg(p)
    p.set_defaults(func=cmd_recipes)

    p = add("demo", help="synthesize Qwen2.5-0.5B, export GGUF and ONNX, verify, chat, bench")
    p.add_argument("--model", help="run on this checkpoint instead of a synthesized one")
    p.add_argument("-o", "--output", default="qwen-edge-demo", help="working directory (default ./qwen-edge-demo)")
    p.add_argument("--quick", action="store_true", help="tiny model, for a smoke test")
    p.set_defaults(func=cmd_demo)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure(QUIET if getattr(args, "quiet", False) else VERBOSE if getattr(args, "verbose", False) else NORMAL,
              bars=False if getattr(args, "json", False) else None)
    try:
        return int(args.func(args) or 0)
    except QwenEdgeError as e:
        print(f"error: {first_line(e)}", file=sys.stderr)
        return 2
    except GateFailed as e:
        print(f"failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0
    except Exception as e:  # a bug, not bad input: one line unless debugging is asked for
        if os.environ.get("QWEN_EDGE_DEBUG"):
            raise
        print(f"error: internal error: {type(e).__name__}: {first_line(e)} "
              "(set QWEN_EDGE_DEBUG=1 for a traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
