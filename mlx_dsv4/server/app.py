"""`mlx_dsv4 serve`: OpenAI- and Anthropic-compatible HTTP API over one loaded model.

Routes: GET /health, GET /v1/models, POST /v1/chat/completions, /v1/completions, /v1/responses
(openai_api.py, responses_api.py), POST /v1/messages, /v1/messages/count_tokens
(anthropic_api.py). The Engine (engine.py) owns the model on its own thread; handlers here only
validate, tokenize and relay. Bad requests get 4xx JSON errors in the API's own format (errors.py).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import sys

from fastapi import FastAPI, Request
from starlette.concurrency import run_in_threadpool

from .. import __version__
from ..chat import EOS, encode_messages
from .engine import DONE, Engine, PrefixCache
from .errors import RequestError, error_response, install_error_handlers


def _no_constants(name: str):
    raise ValueError(f"{name} is not valid JSON")


class Server:
    """Limits and the steps every route shares: read the body, encode the prompt, run a job."""

    def __init__(self, tokenizer, engine, *, model_name: str, vocab_size: int, max_tokens_limit: int,
                 max_body_bytes: int, max_context: int, default_thinking: bool, default_temperature: float,
                 keepalive_s: float = 10.0):
        self.tokenizer, self.engine, self.name, self.vocab_size = tokenizer, engine, model_name, vocab_size
        self.max_tokens_limit, self.max_body, self.max_context = max_tokens_limit, max_body_bytes, max_context
        self.default_thinking, self.default_temperature = default_thinking, default_temperature
        self.keepalive_s = keepalive_s

    async def json(self, request: Request) -> dict:
        raw, size = [], 0
        async for chunk in request.stream():  # counted as it arrives: a huge body is refused early
            size += len(chunk)
            if size > self.max_body:
                raise RequestError(f"request body exceeds the limit of {self.max_body} bytes", status=413)
            raw.append(chunk)
        try:
            body = json.loads(b"".join(raw) or b"null", parse_constant=_no_constants)
        except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise RequestError(f"malformed JSON body: {str(e)[:200]}") from None
        if not isinstance(body, dict):
            raise RequestError(f"the request body must be a JSON object, got {type(body).__name__}")
        if body.get("model") is not None and not isinstance(body["model"], str):
            raise RequestError("model must be a string", param="model")
        return body

    async def encode(self, messages: list[dict], mode: str, effort: str | None,
                     continue_last: bool = False) -> list[int]:
        """Prompt ids. continue_last: the reply continues the final assistant message (its EOS is left out)."""
        def work():
            try:
                prompt = encode_messages(messages, mode, effort)
            except (ValueError, RecursionError) as e:
                raise RequestError(f"messages: {e}") from None
            if continue_last and prompt.endswith(EOS):
                prompt = prompt[: -len(EOS)]
            return self.tokenizer.encode(prompt, add_special_tokens=False)

        return self.check_context(await run_in_threadpool(work))

    def check_context(self, ids: list[int]) -> list[int]:
        if len(ids) >= self.max_context:
            raise RequestError(f"the prompt has {len(ids)} tokens; the context limit is {self.max_context} "
                               "(prompt plus at least one generated token)", param="messages")
        return ids

    def budget(self, params: dict, ids: list[int]) -> dict:
        """Generation never runs past the context: max_tokens is cut to what is left of it."""
        return dict(params, max_tokens=min(params["max_tokens"], self.max_context - len(ids)))

    async def run(self, request: Request, ids: list[int], params: dict):
        """Yield the job's GenerationResponses (None after keepalive_s of silence, e.g. during a long
        prefill); cancel the job when the client goes away or the consumer stops early."""
        loop, q = asyncio.get_running_loop(), asyncio.Queue()

        def emit(item):  # called on the engine thread
            try:
                loop.call_soon_threadsafe(q.put_nowait, item)
            except RuntimeError:  # the event loop is gone: the server is shutting down
                pass

        job = self.engine.submit(ids, params, emit)
        getter, checked = None, loop.time()
        heard = checked
        try:
            while True:
                getter = getter or asyncio.ensure_future(q.get())
                done, _ = await asyncio.wait({getter}, timeout=0.5)  # never loses an item, unlike wait_for
                now = loop.time()
                if now - checked >= 0.5:  # also while tokens flow: a non-streaming client may leave
                    checked = now
                    if await request.is_disconnected():
                        return
                if not done:
                    if now - heard >= self.keepalive_s:
                        heard = now
                        yield None
                    continue
                item, getter, heard = getter.result(), None, now
                if item is DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            job.cancel()
            if getter is not None:
                getter.cancel()


class Guard:
    """ASGI middleware: the API key on every route, and the declared body size before reading it."""

    def __init__(self, app, api_key: str | None, max_body: int):
        self.app, self.api_key, self.max_body = app, api_key, max_body

    def key_ok(self, headers: dict) -> bool:
        auth = headers.get(b"authorization", b"").decode("latin-1")
        key = auth[7:].strip() if auth[:7].lower() == "bearer " else headers.get(b"x-api-key", b"").decode("latin-1")
        return hmac.compare_digest(key.encode(), self.api_key.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers, path = dict(scope["headers"]), scope["path"]
        if self.api_key and not self.key_ok(headers):
            return await error_response(path, "invalid or missing API key (send 'Authorization: Bearer KEY' "
                                        "or 'x-api-key: KEY')", 401)(scope, receive, send)
        size = headers.get(b"content-length", b"")
        if size.isdigit() and int(size) > self.max_body:
            return await error_response(path, f"request body of {int(size)} bytes exceeds the limit of "
                                        f"{self.max_body} bytes", 413)(scope, receive, send)
        await self.app(scope, receive, send)


def create_app(model, tokenizer, *, model_name: str = "deepseek-v4", api_key: str | None = None,
               max_tokens_limit: int = 65536, max_body_bytes: int = 32 << 20, max_context: int | None = None,
               default_thinking: bool = False, default_temperature: float = 1.0,
               prefix_cache: PrefixCache | None = None, engine=None) -> FastAPI:
    """The FastAPI app. `engine` replaces the model-owning Engine (tests script the output with it)."""
    from . import anthropic_api, openai_api, responses_api

    engine = engine if engine is not None else Engine(model, tokenizer, prefix_cache)
    context = model.args.max_position_embeddings
    srv = Server(tokenizer, engine, model_name=model_name, vocab_size=model.args.vocab_size,
                 max_tokens_limit=max_tokens_limit,
                 max_body_bytes=max_body_bytes, max_context=min(max_context or context, context),
                 default_thinking=default_thinking, default_temperature=default_temperature)
    app = FastAPI(title="mlx-dsv4", version=__version__, docs_url=None, redoc_url=None)
    app.state.server = srv
    install_error_handlers(app)
    app.add_middleware(Guard, api_key=api_key, max_body=max_body_bytes)

    @app.get("/health")
    async def health():
        body = {"status": "ok", "model": srv.name, "queued": getattr(srv.engine, "pending", 0)}
        store = getattr(model, "expert_store", None)
        if store is not None:  # streamed experts: hit rate and bytes read from disk (per token) since load
            body["experts"] = store.stats()
        return body

    openai_api.add_routes(app, srv)
    responses_api.add_routes(app, srv)
    anthropic_api.add_routes(app, srv)
    return app


def serve(model: str = "deepseek-ai/DeepSeek-V4-Flash", host: str = "127.0.0.1", port: int = 8080,
          api_key: str | None = None, max_tokens_limit: int = 65536, max_body_bytes: int = 32 << 20,
          max_context: int | None = None, default_thinking: bool = False, prefix_cache_entries: int = 8,
          prefix_cache_bytes: int = 4 << 30, log_level: str = "info", expert_memory_gb: float | None = None,
          **kw) -> None:
    """Load `model` (Hub id, directory or "tiny") once and serve it until interrupted."""
    import uvicorn

    from ..load import load

    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print(f"warning: listening on {host} without --api-key: anyone who can reach this port can use the model",
              file=sys.stderr)
    m, tok = load(model, expert_memory_gb=expert_memory_gb)
    app = create_app(m, tok, model_name=str(model), api_key=api_key, max_tokens_limit=max_tokens_limit,
                     max_body_bytes=max_body_bytes, max_context=max_context, default_thinking=default_thinking,
                     prefix_cache=PrefixCache(prefix_cache_entries, prefix_cache_bytes), **kw)
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level)
    finally:
        app.state.server.engine.close()
