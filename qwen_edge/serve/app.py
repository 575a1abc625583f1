"""The Starlette app of `qwen-edge serve`: routes, the API key, the Host/Origin guard, request bodies parsed off the
event loop, streaming. With server.py, the only modules that import the [serve] extra (lazily)."""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import math
import re
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Mapping, Sequence

from ..errors import first_line
from ..log import logger
from .engine import Engine, Job
from .protocol import (ApiError, Chunks, bad_request, chat_response, completion_response, parse_chat_request,
                       parse_completion_request, sse)

if TYPE_CHECKING:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response


# --- the app ------------------------------------------------------------------------------------------------------
DISCONNECT_POLL_S = 0.1
MAX_BODY_BYTES = 16 << 20
"""The largest request body read (16 MiB: far above any conversation a small model's context holds); more is 413."""
API_KEY_ENV = "QWEN_EDGE_API_KEY"
"""Where `serve` takes its API key when --api-key is not given (a key on the command line shows in `ps`)."""
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
"""The Host names a loopback-bound server answers (plus --allow-host): a DNS-rebinding page sends its own name."""
MAX_INT_DIGITS = 100
"""Longer JSON integers are read as infinity, so the field they are in is refused by name (Python refuses to read
integers over 4,300 digits at all)."""


def is_loopback(host: str) -> bool:
    """Whether binding `host` listens on this machine only."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _host_name(header: str) -> str:
    """The name of a Host header, without its port: "[::1]:8080" -> "::1", "LocalHost:80" -> "localhost"."""
    h = header.strip().lower()
    if h.startswith("["):
        return h[1: h.find("]")] if "]" in h else h
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


_ORIGIN = re.compile(r"(https?)://(\[[0-9a-f:.]+\]|[a-z0-9.\-]+)(?::(\d{1,5}))?/?")


def is_loopback_origin(origin: str) -> bool:
    """Whether a browser `Origin` is a page served from this machine: http(s) on localhost, 127.0.0.0/8 or [::1],
    any port ("null", file pages, userinfo and other names are not)."""
    m = _ORIGIN.fullmatch(origin.strip().lower())
    return m is not None and is_loopback(m.group(2))


def _parse_int(digits: str) -> int | float:
    return int(digits) if len(digits.lstrip("-")) <= MAX_INT_DIGITS else math.inf


class _Guard:
    """ASGI middleware in front of every route: on a loopback bind, only loopback Host names (and `allowed_hosts`)
    are answered (403 otherwise: DNS rebinding); a request that carries an `Origin` (a browser's) is answered only
    from a loopback origin or one of `origins` ("*": any; 403 otherwise: a page elsewhere cannot even start a
    generation); a POST must send `Content-Type: application/json` (415 otherwise: a web page can POST text/plain
    cross-origin with no CORS preflight)."""

    def __init__(self, app: Any, hosts: Sequence[str] | None, origins: Sequence[str] = ()):
        self.app = app
        self.hosts = None if hosts is None else {h.lower().strip("[]") for h in hosts}
        self.origins = {o.strip().lower().rstrip("/") for o in origins}

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        err = None
        if self.hosts is not None and _host_name(headers.get("host", "")) not in self.hosts:
            err = ApiError(403, f"Host {headers.get('host', '')!r} is not served: this server answers "
                           f"{', '.join(sorted(self.hosts))} (--allow-host NAME adds one)", code="host_not_allowed")
        elif "origin" in headers and not self._origin_ok(headers["origin"]):
            err = ApiError(403, f"Origin {headers['origin'][:100]!r} is not allowed: this server answers pages from "
                           "localhost, 127.0.0.1 and [::1] (--allow-origin ORIGIN adds one)", code="origin_not_allowed")
        elif scope["method"] == "POST":
            kind = headers.get("content-type", "").split(";")[0].strip().lower()
            if kind != "application/json":
                err = ApiError(415, f"Content-Type must be application/json, not {kind or 'none'!r}",
                               code="unsupported_media_type")
        if err is None:
            return await self.app(scope, receive, send)
        from starlette.responses import JSONResponse

        await JSONResponse(err.body(), status_code=err.status)(scope, receive, send)

    def _origin_ok(self, origin: str) -> bool:
        return "*" in self.origins or origin.strip().lower().rstrip("/") in self.origins or is_loopback_origin(origin)


def create_app(engine: Engine, *, api_key: str | None = None, allow_origins: Sequence[str] = (),
               max_body_bytes: int = MAX_BODY_BYTES, allowed_hosts: Sequence[str] | None = None) -> Starlette:
    """The Starlette app: /v1/chat/completions, /v1/completions, /v1/models, /health, /metrics (Prometheus text;
    with the API key, as the /v1 routes).

    `allow_origins`: browser origins allowed to call it besides this machine's own (CORS headers are sent to these
    only; "*" for any); none by default, so a web page on another origin gets 403 and cannot drive a local model
    unless the user says so. `allowed_hosts`: the Host names answered (None: any; `serve` gives LOOPBACK_HOSTS and
    --allow-host on a loopback bind).
    """
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.middleware.cors import CORSMiddleware
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    def error(e: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'", code="invalid_api_key")

    async def read_body(request: Request) -> bytes:
        too_big = ApiError(413, f"the request body is over {max_body_bytes} bytes", code="request_too_large")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_body_bytes:
            raise too_big
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body_bytes:
                raise too_big
            chunks.append(chunk)
        return b"".join(chunks)

    def parse_body(raw: bytes, parse: Callable[..., Any]) -> Any:
        """JSON and the request's checks (a response_format or tool schema compiles here), on a parser thread."""
        try:
            body = json.loads(raw, parse_int=_parse_int)
        except (ValueError, RecursionError) as e:
            raise bad_request(None, f"the request body is not valid JSON ({first_line(e)})") from None
        return parse(body, engine.generation_config, engine.limits)

    parser = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qwen-edge-parse")
    parsing = [0]

    async def parsed(request: Request, parse: Callable[..., Any]) -> Any:
        """The request, parsed off the event loop (a heavy schema stalls no stream nor /health); as many may wait
        as the model's queue holds (503 beyond), each at most Limits.parse_timeout_s (400 beyond)."""
        raw = await read_body(request)
        if parsing[0] >= engine.parallel + engine.queue:
            raise ApiError(503, "the server is busy checking other requests; retry later", type="server_error",
                           code="server_busy")
        parsing[0] += 1
        try:
            fut = asyncio.get_running_loop().run_in_executor(parser, parse_body, raw, parse)
            return await asyncio.wait_for(fut, engine.limits.parse_timeout_s)
        except asyncio.TimeoutError:
            raise bad_request("response_format", f"the request's schemas did not compile within "
                       f"{engine.limits.parse_timeout_s:g} s") from None
        finally:
            parsing[0] -= 1

    async def next_event(job: Job, request: Request) -> tuple[str, Any] | None:
        """The job's next event, or None when the client went away (the job is then cancelled)."""
        while True:
            try:
                return await asyncio.wait_for(job.events.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    cancel(job, "client disconnected")
                    return None

    def cancel(job: Job, why: str) -> None:
        if not job.cancel.is_set():
            logger.info(f"{job.id}: {why}: cancelling")
            job.cancel.set()

    async def run(request: Request, kind: str, parse: Callable[[Any, Mapping[str, Any]], Any],
                  work: Callable[[Any], Callable[[Job], Any]], respond: Callable[[Job, str, Any], dict[str, Any]]
                  ) -> Response:
        try:
            check_key(request)
            req = await parsed(request, parse)
            job = engine.submit(kind, work(req), engine.chat_prompt(req) if kind == "chat"
                                else engine.completion_prompt(req))
        except ApiError as e:
            return error(e)
        first = await next_event(job, request)
        if first is None:
            return JSONResponse({}, status_code=499)
        if first[0] == "error":
            return error(first[1])
        if not req.stream:  # only "done" or "error" come to a request that does not stream
            return JSONResponse(respond(job, engine.model_id, first[1]))
        return StreamingResponse(stream(job, req, first), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def stream(job: Job, req: Any, first: tuple[str, Any]) -> AsyncIterator[str]:
        chunks = Chunks(job, engine.model_id, req.include_usage)
        kind, value = first
        finished = False
        try:
            if job.kind == "chat":
                yield chunks.chunk({"role": "assistant", "content": ""})
            while True:
                if kind in ("text", "thinking", "tool"):
                    if value:
                        yield chunks.event(kind, value)
                elif kind == "done":
                    finished = True
                    for c in chunks.end(value):
                        yield c
                    break
                else:
                    finished = True
                    yield sse(value.body())
                    break
                kind, value = await job.events.get()
            yield "data: [DONE]\n\n"
        finally:
            if not finished:  # the client went away mid-stream (Starlette cancels this generator)
                cancel(job, "client disconnected")

    async def chat_completions(request: Request) -> Response:
        return await run(request, "chat", parse_chat_request, engine.chat_work, chat_response)

    async def completions(request: Request) -> Response:
        return await run(request, "completion", parse_completion_request, engine.completion_work,
                         completion_response)

    async def models(request: Request) -> Response:
        try:
            check_key(request)
        except ApiError as e:
            return error(e)
        return JSONResponse({"object": "list", "data": [
            {"id": engine.model_id, "object": "model", "created": engine.created, "owned_by": "qwen-edge"}]})

    async def health(request: Request) -> Response:
        s = engine.stats
        return JSONResponse({"status": "ok", "model": engine.model_id, "busy": engine.busy,
                             "waiting": engine.waiting, "queue": engine.queue, "parallel": engine.parallel,
                             "active": min(engine.active, engine.parallel), "served": s.served,
                             "cancelled": s.cancelled, "errors": s.errors, "rejected": s.rejected})

    async def metrics(request: Request) -> Response:
        from starlette.responses import PlainTextResponse

        try:
            check_key(request)
        except ApiError as e:
            return error(e)
        return PlainTextResponse(engine.render_metrics(), media_type="text/plain; version=0.0.4")

    async def http_error(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 500)
        detail = getattr(exc, "detail", None) or "error"
        return error(ApiError(status, f"{request.method} {request.url.path}: {detail}",
                              code="not_found" if status == 404 else None))

    middleware = [Middleware(_Guard, hosts=allowed_hosts, origins=allow_origins)]
    if allow_origins:
        middleware.append(Middleware(CORSMiddleware, allow_origins=list(allow_origins), allow_methods=["GET", "POST"],
                                     allow_headers=["Authorization", "Content-Type"]))
    return Starlette(routes=[
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ], exception_handlers={HTTPException: http_error}, middleware=middleware)
