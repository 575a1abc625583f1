"""`qwen-edge serve`: an OpenAI-compatible local server (the [serve] extra)."""

from __future__ import annotations

import argparse
from typing import Callable

Add = Callable[..., argparse.ArgumentParser]


def cmd_serve(args: argparse.Namespace) -> int:
    from ..serve.server import require_extra

    require_extra()  # one line and exit 2 without the extra, before loading anything
    from ..log import say
    from ..runtime.meta import model_meta
    from ..serve.protocol import Limits
    from ..serve.server import serve
    from ..text.tokenizer import Tokenizer
    from .options import close_speculative, speculative_from_args

    limits = Limits(max_tokens=args.max_tokens, deadline_s=args.timeout, max_stop=args.max_stop)
    spec = speculative_from_args(args, Tokenizer.from_dir(model_meta(args.artifact).tokenizer_dir))
    try:
        return serve(args.artifact, host=args.host, port=args.port, api_key=args.api_key,
                     max_context=args.max_context, threads=args.threads, queue=args.queue, parallel=args.parallel,
                     target=args.target, device=args.device, allow_origins=args.allow_origin or (),
                     allow_hosts=args.allow_host or (), limits=limits, verbose=bool(getattr(args, "verbose", False)),
                     announce=say, speculative=spec)
    finally:
        close_speculative(spec)


def add_verbs(add: Add) -> None:
    from ..serve.protocol import DEFAULT_LIMITS as DEFAULTS
    from .options import add_runtime_args, add_speculative_args

    p = add("serve", help="serve an artifact over an OpenAI-compatible HTTP API (extra [serve])",
            description="Serve one artifact on an OpenAI-compatible HTTP API: POST /v1/chat/completions (streamed "
            "or not; tools, response_format, reasoning_content), POST /v1/completions, GET /v1/models, GET /health. "
            "Up to --parallel requests generate at once, their decode steps batched; --queue more may wait, more get 503. "
            "GET /metrics: Prometheus text. Needs the [serve] extra: "
            "pip install 'qwen-edge[serve]'.")
    p.add_argument("artifact")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080; 0 picks a free one)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every request but /health "
                   "(default: $QWEN_EDGE_API_KEY when set; the variable keeps the key out of the process list)")
    p.add_argument("--allow-origin", action="append", metavar="ORIGIN",
                   help="a browser origin allowed to call the API, with CORS headers, e.g. http://localhost:3000; "
                   "'*' for any (repeatable). A request whose Origin is neither this nor a page on localhost, "
                   "127.0.0.1 or [::1] gets 403; requests without an Origin (non-browser clients) are not affected")
    p.add_argument("--allow-host", action="append", metavar="NAME",
                   help="on a loopback bind, a Host name answered besides localhost, 127.0.0.1 and ::1 (e.g. a name "
                   "in /etc/hosts; repeatable). Other names get 403, so a DNS-rebinding web page cannot read replies")
    p.add_argument("--queue", type=int, default=8,
                   help="requests that may wait while all slots generate (default 8; more get 503)")
    p.add_argument("--parallel", type=int, default=None, metavar="N",
                   help="slots: requests generating at once, one batched decode step for all (default 4 on GGUF and on "
                   "ONNX on cpu, fewer when their KV caches at the context would take over half the available "
                   "memory; 1 otherwise). Each slot has its own KV cache of the full context")
    p.add_argument("--max-tokens", type=int, default=DEFAULTS.max_tokens,
                   help=f"the most tokens one request may generate (default {DEFAULTS.max_tokens}; a request's "
                   "max_tokens above it is 400, a request without one gets it)")
    p.add_argument("--timeout", type=float, default=DEFAULTS.deadline_s, metavar="SECONDS",
                   help=f"how long one generation may run, prefill included (default {DEFAULTS.deadline_s:g}); "
                   "then it ends as it is, finish_reason length")
    p.add_argument("--max-stop", type=int, default=DEFAULTS.max_stop,
                   help=f"stop strings one request may send (default {DEFAULTS.max_stop}, each at most "
                   f"{DEFAULTS.max_stop_chars} characters)")
    add_speculative_args(p)
    add_runtime_args(p)
    p.set_defaults(func=cmd_serve)
