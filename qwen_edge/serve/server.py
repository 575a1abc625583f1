"""`qwen-edge serve`'s process: `serve()` loads the artifact into one ChatSession per slot (--parallel) and its Engine,
binds host:port (a loopback host answers loopback Host names only; beyond loopback without an API key, a warning),
runs the app on uvicorn and stops on SIGINT/SIGTERM, cancelling running generations. `require_extra`: the one-line
error when the [serve] extra is missing."""

from __future__ import annotations

import os
import socket
from typing import TYPE_CHECKING, Any, Callable, Sequence

from ..errors import NotAvailable, QwenEdgeError
from ..log import logger
from .app import API_KEY_ENV, LOOPBACK_HOSTS, create_app, is_loopback
from .engine import Engine
from .protocol import DEFAULT_LIMITS, Limits

if TYPE_CHECKING:
    import uvicorn


EXTRA_HINT = "pip install 'qwen-edge[serve]'"
DEFAULT_PARALLEL = 4
"""Slots when --parallel is not given, on GGUF and on ONNX (cpu); fewer when their KV caches would not fit
(default_parallel). On our 2-core AVX2 machine 4 streams gave 1.2-1.4x one stream's aggregate on GGUF q4_0 (once
every step ran on one thread) and 1.2-1.6x on ONNX int4 (benchmarks/RESULTS.md, bench_serve)."""
BATCHED_FORMATS = ("gguf", "onnx")
"""Artifact formats whose backend has a batched step (BatchRuntime; ONNX on the cpu device); others serve one request
at a time."""


def _available_memory() -> int | None:
    """Memory available to new allocations (psutil's MemAvailable on Linux); None where it cannot say."""
    import psutil

    try:
        return int(psutil.virtual_memory().available)
    except (OSError, RuntimeError, AttributeError):
        return None


def default_parallel(artifact: str | os.PathLike[str], max_context: int | None, device: str = "cpu") -> int:
    """--parallel's default: DEFAULT_PARALLEL slots, fewer while their KV caches (at the context asked for, else the
    artifact's) would take over half the available memory; 1 for a format without a batched step or a bare file."""
    from ..backends.base import kv_bytes_per_token
    from ..model.artifact import Artifact

    path = os.fspath(artifact)
    if not os.path.isfile(os.path.join(path, "manifest.json")):
        return 1
    art = Artifact.open(path, check_hashes=False)
    if art.format not in BATCHED_FORMATS or (art.format == "onnx" and device == "cuda"):
        return 1
    per_slot = (kv_bytes_per_token(art.manifest) or 0) * int(max_context or art.context_length)
    free = _available_memory()
    n = DEFAULT_PARALLEL
    while n > 1 and free and per_slot * n > free // 2:
        n -= 1
    return n


def require_extra() -> None:
    """NotAvailable (exit 2, one line) when the [serve] extra is not installed."""
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise NotAvailable(f"qwen-edge serve needs the [serve] extra ({e.name or e} missing): {EXTRA_HINT}") from None


# --- the server ---------------------------------------------------------------------------------------------------
def _bind(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise QwenEdgeError(f"--host {host}: cannot resolve ({e.strerror})") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise QwenEdgeError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
    sock.set_inheritable(True)
    return sock


def serve(artifact: str | os.PathLike[str], *, host: str = "127.0.0.1", port: int = 8080,
          api_key: str | None = None, max_context: int | None = None, threads: int | None = None,
          queue: int = 8, parallel: int | None = None, target: str | None = None, device: str = "cpu",
          verbose: bool = False,
          allow_origins: Sequence[str] = (), allow_hosts: Sequence[str] = (), limits: Limits = DEFAULT_LIMITS,
          announce: Callable[[str], None] | None = None, speculative: Any = None) -> int:
    """Load `artifact`, bind host:port (port 0: any free one) and serve until SIGINT/SIGTERM; returns 0.

    A bad artifact or a port that cannot be bound is a QwenEdgeError before anything listens. `announce` gets the
    one startup line (the URL); the CLI prints it on stderr. `api_key` None takes $QWEN_EDGE_API_KEY if set. On a
    loopback `host` only loopback Host names and `allow_hosts` are answered; beyond loopback without a key, a
    warning says that anyone who reaches the port can use the model. `parallel`: slots generating at once, their
    decode steps batched (None: default_parallel). `speculative` (runtime.speculative.Speculative: prompt lookup, a
    draft model, fast-forward) applies to every generation, in every slot (a draft model only with one slot: it
    holds one sequence).
    """
    require_extra()
    import uvicorn

    from ..runtime.meta import model_meta

    if queue < 0:
        raise QwenEdgeError(f"--queue must be >= 0, not {queue}")
    if api_key is None:
        api_key = os.environ.get(API_KEY_ENV) or None
    if api_key is not None and (not api_key.strip() or any(c.isspace() for c in api_key)):
        raise QwenEdgeError("the API key must be a non-empty string without spaces")
    if parallel is not None and (isinstance(parallel, bool) or not isinstance(parallel, int) or parallel < 1):
        raise QwenEdgeError(f"--parallel must be a positive number of slots, not {parallel}")
    meta = model_meta(os.fspath(artifact))
    if speculative is not None and speculative.draft is not None and parallel is not None and parallel > 1:
        raise QwenEdgeError(f"--draft runs one sequence: use it with --parallel 1 (not {parallel}), or --lookup N, "
                            "which works in every slot")
    n_slots = (1 if speculative is not None and speculative.draft is not None else
               default_parallel(artifact, max_context, device)) if parallel is None else parallel
    sessions, scheduler = _sessions(artifact, meta, n_slots, device=device, target=target, max_context=max_context,
                                    threads=threads)
    session = sessions[0]
    for s in sessions:
        s.speculative = speculative
    model_id = os.path.basename(os.path.normpath(str(artifact)))
    engine = Engine(sessions, model_id, queue=queue, generation_config=meta.generation_config, limits=limits,
                    scheduler=scheduler)
    try:
        sock = _bind(host, port)
    except BaseException:
        engine.close()
        raise
    loopback = is_loopback(host)
    if not loopback and api_key is None:
        logger.warning(f"warning: serving on {host} without an API key: anyone who can reach this port can use the "
                       f"model (--api-key or ${API_KEY_ENV} to require one)")
    app = create_app(engine, api_key=api_key, allow_origins=allow_origins,
                     allowed_hosts=[*LOOPBACK_HOSTS, *allow_hosts] if loopback else None)
    config = uvicorn.Config(app, log_level="info" if verbose else "warning", access_log=verbose,
                            timeout_graceful_shutdown=5, lifespan="off")
    server = _server(config, engine)
    bound = sock.getsockname()
    shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
    info = session.runtime.info
    line = (f"serving {model_id} ({info.backend} {info.format}/{info.quant}, context {info.context_length}, "
            f"{n_slots} slot{'s' if n_slots > 1 else ''}{_speculative_label(speculative)}) on "
            f"http://{shown}:{bound[1]}/v1")
    (announce or (lambda s: None))(line)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        engine.close()
    return 0


def _speculative_label(spec: Any) -> str:
    if spec is None:
        return ""
    how = f", prompt lookup {spec.lookup}" if spec.lookup else \
        f", draft {os.path.basename(str(spec.draft.info.artifact))} x{spec.draft_tokens}" if spec.draft else ""
    return how + ("" if spec.fast_forward else ", no fast-forward")


def _sessions(artifact: str | os.PathLike[str], meta: Any, n_slots: int, **load_args: Any) -> tuple[list[Any], Any]:
    """One ChatSession per slot ([one], None for one slot; else each on a SlotRuntime of one Scheduler over a
    runtime loaded with `parallel=n_slots`)."""
    from ..backends import load
    from ..backends.base import BatchRuntime
    from ..runtime.batch import Scheduler
    from ..runtime.chat import ChatSession
    from ..text.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(meta.tokenizer_dir)
    rt = load(artifact, **load_args, **({"parallel": n_slots} if n_slots > 1 else {}))
    scheduler = None
    if n_slots > 1:
        if not isinstance(rt, BatchRuntime):
            rt.close()
            raise QwenEdgeError(f"--parallel {n_slots}: the {rt.info.backend} backend has no batched step "
                                "(use --parallel 1)")
        scheduler = Scheduler(rt)
        runtimes: list[Any] = [scheduler.view(i) for i in range(n_slots)]
    else:
        runtimes = [rt]
    sessions = [ChatSession(r, tok, stop_ids=meta.stop_ids) for r in runtimes]
    for s in sessions:
        s.max_new_tokens = s.context_length  # no max_tokens: until a stop or the context is full
    return sessions, scheduler


def _server(config: uvicorn.Config, engine: Engine) -> uvicorn.Server:
    """A uvicorn.Server that cancels running generations on SIGINT/SIGTERM and exits 0 instead of re-raising them."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            engine.shutdown.set()
            super().handle_exit(sig, frame)
            self._captured_signals.clear()  # a clean stop: exit 0, not the signal again

    return Server(config)
