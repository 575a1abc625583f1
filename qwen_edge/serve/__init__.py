"""`qwen-edge serve`: an OpenAI-compatible HTTP server over one loaded artifact (the `[serve]` extra).

Starlette routes on uvicorn. The model runs in one worker thread, never on the event loop: one generation at a time,
a bounded queue of waiting requests (503 when full), a cancel Event per request (set when its client disconnects or
the server shuts down). Chat requests go through `ChatSession.complete` on one session, so a conversation extended
request after request reuses its KV-cache prefix; `/v1/completions` runs `generate` on the same runtime.

- protocol.py: request parsing and validation, plain Python with no web framework (a bad field is an `ApiError`, 400
  naming it), the operator's `Limits`, the response shapes and SSE chunks
- engine.py: the one model thread, its bounded queue and cancellation
- app.py: the Starlette routes (the API key, the Host/Origin guard, bodies parsed off the event loop, streaming)
- server.py: `serve()`: load, bind, run uvicorn, stop on a signal

`qwen_edge.serve` was one module before the package had rooms; its names (`serve`, `Engine`, `parse_chat_request`,
`Limits`, ...) still resolve here, loaded on first use.
"""

from __future__ import annotations

from .. import _names_of

__getattr__ = _names_of(__name__, (".protocol", ".engine", ".app", ".server"))
