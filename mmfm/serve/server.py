"""`mmfm serve`: one FastAPI app on one port, the OpenAI-compatible API under `/v1` and the Gradio web app at "/",
both over one `Engine`, behind an optional API key, run by uvicorn.

```python
from mmfm.serve.server import serve
serve("runs/demo-chat/final", port=7860, api_key="s3cret", allowed_dirs=["/srv/media"])
```
"""

from __future__ import annotations

import hmac
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

from torch import nn

from mmfm.config import DEFAULT_BATCH_WAIT_MS, DEFAULT_SERVE_BATCH_SIZE
from mmfm.serve.engine import Engine

KEY_COOKIE = "mmfm_api_key"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def serve(model_ref: str | Path | nn.Module, **options: Any) -> None:
    """Serves a model until interrupted (Ctrl-C); `options` are `create_server`'s (host, port, device, ...)."""
    server = create_server(model_ref, **options)
    try:
        server.run()
    finally:
        server.config.app.state.engine.close()


def create_server(
    model_ref: str | Path | nn.Module,
    host: str = "127.0.0.1",
    port: int = 7860,
    device: str | None = None,
    dtype: str | None = None,
    max_batch_size: int = DEFAULT_SERVE_BATCH_SIZE,
    api_key: str | None = None,
    allowed_dirs: Sequence[str | Path] = (),
    ui: bool = True,
    batch_wait_ms: float = DEFAULT_BATCH_WAIT_MS,
) -> Any:
    """A uvicorn server, not yet running, for a model's API and web app; binding anywhere but localhost warns.

    Args:
        model_ref: a model, or anything `mmfm.load` takes (a checkpoint folder, a tag, a GGUF file...).
        host: the address to listen on (the default answers this machine only).
        port: the port; 0 lets the system choose a free one.
        device: the device to load the model on (a given model stays where it is).
        dtype: the dtype to load the model in.
        max_batch_size: most chat requests decoded together.
        api_key: when set, every request (API and web app) must carry it (`app_with_key`).
        allowed_dirs: folders whose files requests may name.
        ui: mount the Gradio web app at "/" (needs the `serve` extra).
        batch_wait_ms: how long a batch of chat requests waits for more to join it before it starts (`Engine`).

    Returns:
        A `uvicorn.Server`; its `config.app.state.engine` is the engine, to `close()` after the server stops.
    """
    import uvicorn

    model = model_ref
    if not isinstance(model, nn.Module):
        from mmfm.loader import open_model, parse_dtype

        model, _ = open_model(str(model_ref), device=device, dtype=parse_dtype(dtype))
    engine = Engine(model, max_batch_size=max_batch_size, batch_wait_ms=batch_wait_ms, allowed_dirs=allowed_dirs)
    if host not in LOCAL_HOSTS:
        print(
            f"mmfm: warning: serving on {host}: other machines can reach this model"
            + ("" if api_key else " and use it freely; set --api-key to require a key"),
            file=sys.stderr,
        )
    app = build_app(engine, ui=ui)
    config = uvicorn.Config(app_with_key(app, api_key), host=host, port=port, log_level="warning")
    return uvicorn.Server(config)


@contextmanager
def running_in_thread(server: Any, timeout: float = 60.0) -> Iterator[str]:
    """Runs a `create_server` server in a background thread for the length of a `with` block (a notebook, a test,
    a benchmark), yielding its base URL; then stops it and closes its engine.

    Raises:
        RuntimeError: the server did not start within `timeout` seconds (its port taken, say).
    """
    thread = threading.Thread(target=server.run, name="mmfm-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            server.config.app.state.engine.close()
            raise RuntimeError(f"the server on {server.config.host}:{server.config.port} did not start")
        time.sleep(0.01)
    host, port = server.servers[0].sockets[0].getsockname()[:2]  # the port the system chose for port 0
    try:
        yield f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=timeout)
        server.config.app.state.engine.close()


def build_app(engine: Engine, ui: bool = True) -> Any:
    """The FastAPI app: the `/v1` API over `engine`, and the Gradio app (`mmfm.serve.ui.build_ui`) at "/"."""
    from fastapi import FastAPI

    from mmfm.serve.api import add_api

    app = FastAPI(title=f"mmfm serve: {engine.model_name}", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    add_api(app, engine)
    if ui:
        import gradio

        from mmfm.serve.ui import build_ui

        app = gradio.mount_gradio_app(app, build_ui(engine), path="/")
    return app


def app_with_key(app: Any, api_key: str | None) -> Any:
    """`app` behind an API key, or `app` itself when there is none.

    A request passes with `Authorization: Bearer KEY` (what the `openai` client sends) or with the key's cookie. A
    browser gets the cookie by opening any page once with `?api_key=KEY`: it is sent back to the same address
    without the key, the cookie set (HttpOnly, SameSite=Strict). Anything else gets a 401 OpenAI-shaped error.
    """
    if not api_key:
        return app
    return _KeyedApp(app, api_key)


class _KeyedApp:
    """ASGI middleware: HTTP and websocket requests without the key are refused before they reach the app."""

    def __init__(self, app: Any, api_key: str):
        self.app, self.key = app, api_key.encode()
        self.state = app.state  # `create_server`'s callers find the engine here

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)  # lifespan
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if (scheme.lower() == "bearer" and self._matches(token.strip())) or self._matches(
            _cookie(headers.get("cookie", ""))
        ):
            await self.app(scope, receive, send)
            return
        query = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        given = [v for k, v in query if k == "api_key"]
        if scope["type"] == "http" and given and self._matches(given[0]):
            rest = urlencode([(k, v) for k, v in query if k != "api_key"])
            location = scope.get("root_path", "") + scope["path"] + (f"?{rest}" if rest else "")
            cookie = f"{KEY_COOKIE}={given[0]}; Path=/; HttpOnly; SameSite=Strict"
            await _respond(send, 303, b"", [(b"location", location.encode()), (b"set-cookie", cookie.encode())])
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        from mmfm.serve.api import error_response

        response = error_response(
            401, "a valid API key is required: send 'Authorization: Bearer KEY'", code="invalid_api_key"
        )
        await response(scope, receive, send)

    def _matches(self, given: str | None) -> bool:
        return bool(given) and hmac.compare_digest(given.encode(), self.key)


def _cookie(header: str) -> str | None:
    cookies = SimpleCookie()
    try:
        cookies.load(header)
    except Exception:  # a malformed Cookie header carries no key
        return None
    morsel = cookies.get(KEY_COOKIE)
    return morsel.value if morsel else None


async def _respond(send: Any, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
