"""Verbs that run artifacts: generate, chat, bench."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable, Sequence

from pathlib import Path

from ..errors import GateFailed, QwenEdgeError
from ..log import say
from .options import (add_runtime_args, add_sampling_args, add_speculative_args, close_speculative,
                      load_with_speculative, sampling_from_args)

Add = Callable[..., argparse.ArgumentParser]


def _output_constraint(args: argparse.Namespace, tools: list[dict[str, Any]] | None) -> Any:
    """The constraint of --json-schema / --json-object / --regex / --grammar / --tool-choice (None: free text)."""
    from ..runtime import constrain
    from ..runtime.tools import choice_name

    mode, name = choice_name(_tool_choice(args.tool_choice), tools or [])
    if mode in ("required", "named"):
        if args.json_schema or args.json_object or args.regex or args.grammar:
            raise QwenEdgeError("--tool-choice required/NAME already constrains the output; drop --json-schema, "
                                "--json-object, --regex and --grammar")
        return constrain.tool_call(tools or [], name)
    if args.json_schema:
        return constrain.schema_file(args.json_schema)
    if args.json_object:
        return constrain.json_object()
    if args.regex:
        return constrain.regex(args.regex)
    if args.grammar:
        from ..runtime.inputs import read_text

        return constrain.grammar(read_text(args.grammar))
    return None


def _tool_choice(value: str | None) -> Any:
    return value if value in (None, "auto", "none", "required") else {"type": "function", "function": {"name": value}}


def cmd_generate(args: argparse.Namespace) -> int:
    """`qwen-edge generate`: one prompt (or messages file) through the artifact, streamed or as one JSON document."""
    from ..runtime.generate import generate
    from ..runtime.meta import model_meta
    from ..text.tokenizer import Tokenizer, split_thinking
    from ..runtime.tools import (ToolCallFilter, load_tools, parse_tool_calls, read_messages, template_messages,
                                 tool_calls_finish)

    meta = model_meta(args.artifact)
    tok = Tokenizer.from_dir(meta.tokenizer_dir)
    tools = load_tools(args.tools) if args.tools else None
    if args.tool_choice is None:
        args.tool_choice = "auto"
    elif not tools:
        raise QwenEdgeError("--tool-choice needs --tools FILE")
    constraint = _output_constraint(args, tools)
    calls_possible = bool(tools) and args.tool_choice != "none"
    if args.raw:
        if args.messages or args.system or tools:
            raise QwenEdgeError("--raw feeds --prompt as is; it cannot be combined with --messages, --system or --tools")
        prompt_ids = tok.encode(args.prompt)
    else:
        messages = read_messages(args.messages) if args.messages else [{"role": "user", "content": args.prompt}]
        if args.system is not None:
            if messages[0]["role"] == "system":
                raise QwenEdgeError(f"{args.messages}: already has a system message; drop --system")
            messages.insert(0, {"role": "system", "content": args.system})
        prompt_ids = tok.encode_chat(template_messages(messages), add_generation_prompt=True, enable_thinking=args.think,
                                     tools=tools if calls_possible else None)
    if not prompt_ids:
        raise QwenEdgeError("empty prompt: nothing to generate from")
    sampling = sampling_from_args(args, meta.generation_config, default_greedy=True)
    runtime, spec = load_with_speculative(args, tok)
    stream = not args.json

    def on_text(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    held = ToolCallFilter(on_text) if calls_possible and stream else None
    try:
        result = generate(runtime, prompt_ids, sampling=sampling, max_new_tokens=args.max_new_tokens,
                          stop_ids=meta.stop_ids, stop_strings=args.stop or (), tokenizer=tok,
                          on_text=(held.feed if held else on_text) if stream else None, constraint=constraint,
                          thinking_budget=args.thinking_budget, speculative=spec)
        info = runtime.info.to_dict()
    finally:
        runtime.close()
        close_speculative(spec)
    thinking, answer = split_thinking(result.text) if not args.raw else (None, result.text)
    names = [t["function"]["name"] for t in tools or []]
    answer, calls = parse_tool_calls(answer, names) if calls_possible else (answer, [])
    finish = tool_calls_finish(calls, result.finish_reason)
    if args.json:
        doc = {"prompt_ids": result.prompt_ids, "output_ids": result.output_ids, "text": answer,
               "thinking": thinking, "tool_calls": [c.to_openai() for c in calls], "finish_reason": finish,
               "stats": result.stats.to_dict(), "sampling": sampling.to_dict(), "runtime": info}
        sys.stdout.write(json.dumps(doc, ensure_ascii=False, indent=2) + "\n")
    else:
        if held is not None:
            held.finish(answer)
        for c in calls:  # one JSON line per call: {"id", "type", "function": {"name", "arguments"}}
            sys.stdout.write("\n" + json.dumps(c.to_openai(), ensure_ascii=False))
        sys.stdout.write("\n")
        sys.stdout.flush()
        say(f"[{result.stats.summary()} | {finish}]")
    return 130 if result.finish_reason == "cancelled" else 0


def cmd_chat(a: argparse.Namespace) -> int:
    from .chat import run_chat_cli

    return run_chat_cli(a)


def cmd_bench(a: argparse.Namespace) -> int:
    """`qwen-edge bench`: measure, print (JSON on stdout with --json), write files, apply --budget gates."""
    from ..bench.run import bench, check_budgets, parse_budget
    from ..bench.report import markdown_table, plot

    budgets = list(a.budget or [])
    for b in budgets:
        parse_budget(b)  # bad expressions fail (exit 2) before any measuring
    sweep = None
    if a.thread_sweep:
        try:
            sweep = [int(x) for x in str(a.thread_sweep).split(",") if x.strip()]
        except ValueError:
            raise QwenEdgeError(f"--thread-sweep {a.thread_sweep!r}: expected comma-separated integers") from None
    if a.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise QwenEdgeError("--plot needs matplotlib: pip install 'qwen-edge[plot]'") from None
    log = None if a.json else say
    engines = [e.strip() for e in str(a.engine).split(",") if e.strip()]
    report = bench(a.artifacts, prompt_tokens=a.prompt_tokens, gen_tokens=a.gen_tokens, threads=a.threads,
                   repeat=a.repeat, warmup=a.warmup, thread_sweep=sweep, target=a.target,
                   max_context=a.max_context, engine=engines, log=log)
    if a.markdown:
        try:
            Path(a.markdown).write_text(markdown_table(report), encoding="utf-8")
        except OSError as e:
            raise QwenEdgeError(f"{a.markdown}: cannot write ({e.strerror or e})") from None
    if a.plot:
        plot(report, a.plot)
    if a.json:
        sys.stdout.write(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    else:
        print(markdown_table(report))
    sys.stdout.flush()
    misses = check_budgets(report["results"], budgets)
    if misses:
        raise GateFailed("budget missed: " + "; ".join(misses))
    return 0


def add_verbs(add: Add) -> None:
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
    p.add_argument("--thinking-budget", type=int, metavar="N",
                   help="Qwen3: close the thinking block after N tokens (the answer follows)")
    out = p.add_argument_group("structured output and tools (constrained decoding: the output always matches)")
    fmt = out.add_mutually_exclusive_group()
    fmt.add_argument("--json-schema", metavar="FILE", help="the answer is JSON valid under this JSON Schema file")
    fmt.add_argument("--json-object", action="store_true", help="the answer is one JSON object")
    fmt.add_argument("--regex", metavar="PATTERN", help="the answer matches this regular expression")
    fmt.add_argument("--grammar", metavar="FILE", help="the answer matches this Lark grammar (llguidance dialect)")
    out.add_argument("--tools", metavar="FILE", help="JSON list of OpenAI tool definitions, rendered by the template; "
                     "tool calls are parsed out of the answer (printed as JSON lines, 'tool_calls' with --json)")
    out.add_argument("--tool-choice", metavar="auto|none|required|NAME",
                     help="with --tools: auto (default), none, required (at least one call) or a tool's name")
    add_sampling_args(p)
    add_speculative_args(p)
    add_runtime_args(p)
    p.set_defaults(func=cmd_generate)

    p = add("chat", help="interactive chat in the terminal",
            description="Interactive chat. Sampling defaults to the model's generation_config.json (Qwen2.5: "
            "temperature 0.7, top-p 0.8, top-k 20, repetition penalty 1.05; Qwen3: 0.6, 0.95, 20; none: greedy); "
            "flags override it, --temperature 0 is greedy. A message that does not fit the context is refused and "
            "the session goes on.")
    p.add_argument("artifact")
    p.add_argument("--stats", action="store_true", help="print a one-line timing after each reply")
    p.add_argument("--thinking-budget", type=int, metavar="N",
                   help="Qwen3: close each reply's thinking block after N tokens (the answer follows)")
    p.add_argument("--system", help="system prompt")
    think = p.add_mutually_exclusive_group()
    think.add_argument("--think", dest="think", action="store_true", default=None)
    think.add_argument("--no-think", dest="think", action="store_false")
    add_sampling_args(p)
    add_speculative_args(p)
    add_runtime_args(p)
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
    p.add_argument("--engine", default="qwen-edge",
                   help="what runs the artifacts: qwen-edge (its own backends, the default) or onnxruntime-genai "
                   "(its generator, as apps embed it; ONNX artifacts and onnxruntime-genai model folders); "
                   "comma-separated: each artifact under each engine, side by side")
    p.add_argument("--json", action="store_true", help="print the JSON report on stdout")
    p.add_argument("--markdown", help="write a markdown table to this file")
    p.add_argument("--plot", help="write a PNG plot to this file (needs matplotlib)")
    p.add_argument("--budget", action="append", help="gate, e.g. decode_tokens_per_s>=20 (exit 1 when missed)")
    p.set_defaults(func=cmd_bench)

