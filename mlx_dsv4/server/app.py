"""`mlx_dsv4 serve`: OpenAI- and Anthropic-compatible HTTP API over one loaded model.

Routes: GET /health, GET /v1/models, POST /v1/chat/completions, /v1/completions, /v1/responses
(openai_api.py, responses_api.py), POST /v1/messages, /v1/messages/count_tokens
(anthropic_api.py). The Engine (engine.py) owns the model on its own thread; handlers here only
validate, tokenize and relay. Bad requests get 4xx JSON errors in the API's own format (errors.py).

Hostile input: bodies are read with an idle timeout and checked for lone surrogates; request text
is tokenized as plain text (tokenizer.PromptTokenizer: only the template's markers are control
tokens); a prompt that cannot fit the context is refused before it is tokenized in full; token
ids are checked against the model's vocabulary before any model call. On shutdown, requests get
`shutdown_grace_s` to finish, then end with their API's error event (or a 503).

Under mlx.launch rank 0 serves HTTP and the other ranks run the same engine steps (lockstep.py).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import re
import signal
import socket
import sys
import time
from typing import NoReturn

from fastapi import FastAPI, Request
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from .. import __version__
from ..chat import BOS, EOS, encode_segments
from ..tokenizer import PromptTokenizer, PromptTooLong
from .engine import DONE, Engine, PrefixCache
from .errors import RequestError, error_response, install_error_handlers

log = logging.getLogger("mlx_dsv4.server")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _no_constants(name: str):
    raise ValueError(f"{name} is not valid JSON")


def surrogate_field(body: dict) -> tuple[str, str] | None:
    """(where, top-level field) of the first string or key in `body` holding a lone UTF-16
    surrogate: JSON lets a body spell one (\\ud800), Python's json reads raw ED A0 80 as one too,
    and no text encoder or tokenizer accepts it."""
    todo: list = [(body, "")]
    while todo:
        v, path = todo.pop()
        if isinstance(v, str):
            if not v.isascii() and _SURROGATE.search(v):
                return path, re.match(r"[^.\[]*", path)[0]
        elif isinstance(v, dict):
            for k in v:
                if not k.isascii() and _SURROGATE.search(k):
                    return f"a key of {path or 'the body'}", re.match(r"[^.\[]*", path or k)[0]
            todo += reversed([(x, f"{path}.{k}" if path else k) for k, x in v.items()])
        elif isinstance(v, list):
            todo += reversed([(x, f"{path}[{i}]") for i, x in enumerate(v)])
    return None


class ClientGone(RequestError):
    """The client closed the connection before its request was read: nobody gets the answer."""

    def __init__(self, message: str):
        super().__init__(message, status=499)


class ShuttingDown(RequestError):
    def __init__(self):
        super().__init__("the server is shutting down: generation stopped", status=503)


class Server:
    """Limits and the steps every route shares: read the body, encode the prompt, run a job."""

    def __init__(self, tokenizer, engine, *, model_name: str, vocab_size: int, max_tokens_limit: int,
                 max_body_bytes: int, max_context: int, default_thinking: bool, default_temperature: float,
                 keepalive_s: float = 10.0, body_timeout_s: float = 60.0, shutdown_grace_s: float = 10.0,
                 special_in_text: bool = False):
        self.tokenizer, self.engine, self.name, self.vocab_size = tokenizer, engine, model_name, vocab_size
        self.max_tokens_limit, self.max_body, self.max_context = max_tokens_limit, max_body_bytes, max_context
        self.default_thinking, self.default_temperature = default_thinking, default_temperature
        self.keepalive_s, self.body_timeout_s, self.shutdown_grace_s = keepalive_s, body_timeout_s, shutdown_grace_s
        self.prompts = PromptTokenizer(tokenizer, special_in_text)
        self.stop_at: float | None = None  # monotonic time after which running requests are ended

    def begin_shutdown(self) -> None:
        if self.stop_at is None:
            self.stop_at = time.monotonic() + self.shutdown_grace_s
            log.info("shutting down: running requests get %.0f s to finish", self.shutdown_grace_s)

    async def json(self, request: Request) -> dict:
        raw, size = bytearray(), 0  # one buffer: a 30 MB body is held once, not as chunks and their join
        chunks = request.stream().__aiter__()
        while True:
            try:  # an idle timeout between reads, as nginx's client_body_timeout: a stalled upload ends
                chunk = await asyncio.wait_for(chunks.__anext__(), self.body_timeout_s)
            except StopAsyncIteration:
                break
            except asyncio.TimeoutError:  # TimeoutError itself from 3.11 on
                raise RequestError(f"the request body stalled: nothing received for {self.body_timeout_s:g} s "
                                   f"after {size} bytes", status=408) from None
            except ClientDisconnect:
                log.info("%s %s: the client went away after sending %d bytes of the body", request.method,
                         request.url.path, size)
                raise ClientGone("the client went away while sending the body") from None
            size += len(chunk)  # counted as it arrives: a huge body is refused early
            if size > self.max_body:
                raise RequestError(f"request body exceeds the limit of {self.max_body} bytes", status=413)
            raw += chunk
        try:  # decoded here, as json.loads would (surrogatepass included), so the bytes go before parsing
            text = raw.decode(json.detect_encoding(raw), "surrogatepass") if raw else "null"
            del raw
            body = json.loads(text, parse_constant=_no_constants)
        except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise RequestError(f"malformed JSON body: {str(e)[:200]}") from None
        del text
        if not isinstance(body, dict):
            raise RequestError(f"the request body must be a JSON object, got {type(body).__name__}")
        bad = surrogate_field(body)
        if bad is not None:
            raise RequestError(f"{bad[0]}: a lone UTF-16 surrogate (\\ud800-\\udfff) is not text; send valid "
                               "Unicode", param=bad[1])
        if body.get("model") is not None and not isinstance(body["model"], str):
            raise RequestError("model must be a string", param="model")
        return body

    async def encode(self, messages: list[dict], mode: str, effort: str | None,
                     continue_last: bool = False) -> list[int]:
        """Prompt ids. continue_last: the reply continues the final assistant message (its EOS is left out)."""
        def work():
            try:
                segments = encode_segments(messages, mode, effort)
            except (ValueError, RecursionError) as e:
                raise RequestError(f"messages: {e}") from None
            if continue_last and segments and segments[-1] == (EOS, True):
                segments = segments[:-1]
            return self.tokenize(segments, "messages")

        return await run_in_threadpool(work)

    async def encode_text(self, text: str) -> list[int]:
        """BOS + a raw completion prompt, read as plain text."""
        return await run_in_threadpool(self.tokenize, [(BOS, True), (text, False)], "prompt")

    def tokenize(self, segments: list, field: str) -> list[int]:
        try:
            ids = self.prompts.encode(segments, limit=self.max_context)
        except PromptTooLong as e:  # found before tokenizing it all: a 30 MB prompt costs ~0.1 s
            self.context_error(e.tokens, field, "at least ")
        bad = max(ids, default=0)
        if bad >= self.vocab_size:  # a checkpoint whose vocabulary is smaller than its tokenizer's
            raise RequestError(f"{field}: the prompt holds token id {bad}, outside the model's vocabulary of "
                               f"{self.vocab_size}: the checkpoint does not match its tokenizer", status=500)
        return self.check_context(ids, field)

    def check_context(self, ids: list[int], field: str = "messages") -> list[int]:
        if len(ids) >= self.max_context:
            self.context_error(len(ids), field)
        return ids

    def context_error(self, n: int, field: str, qualifier: str = "") -> NoReturn:
        raise RequestError(f"{field}: the prompt has {qualifier}{n} tokens; the context limit is {self.max_context} "
                           "(prompt plus at least one generated token)", param=field)

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

        if self.stop_at is not None:
            raise ShuttingDown()
        job = self.engine.submit(ids, params, emit)
        getter, checked = None, loop.time()
        heard, last, end = checked, None, "cancelled (client gone)"
        try:
            while True:
                getter = getter or asyncio.ensure_future(q.get())
                done, _ = await asyncio.wait({getter}, timeout=0.5)  # never loses an item, unlike wait_for
                now = loop.time()
                if self.stop_at is not None and time.monotonic() >= self.stop_at:
                    end = "cancelled (shutdown)"
                    raise ShuttingDown()
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
                    end = last.finish_reason if last is not None else "skipped"
                    return
                if isinstance(item, BaseException):
                    end = f"error ({type(item).__name__})"
                    raise item
                last = item
                yield item
        finally:
            job.cancel()
            if getter is not None:
                getter.cancel()
            self.log_request(request, ids, last, end)

    @staticmethod
    def log_request(request: Request, ids: list[int], r, end: str) -> None:
        """One line per generation, as mlx_lm.server and llama-server print them."""
        if r is None:
            log.info("%s %s: %d prompt tokens, nothing generated, %s", request.method, request.url.path,
                     len(ids), end)
        else:
            drafts = "" if r.mean_accepted_length is None else (
                f", {r.mean_accepted_length:.2f} tokens per verify (acceptance by draft position "
                f"{', '.join(f'{a:.2f}' for a in r.draft_acceptance)})")
            log.info("%s %s: %d prompt tokens (%d cached, %.1f tok/s), %d generated (%.1f tok/s)%s, %s",
                     request.method, request.url.path, r.prompt_tokens, r.cached_tokens, r.prompt_tps,
                     r.generation_tokens, r.generation_tps, drafts, end)


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
               prefix_cache: PrefixCache | None = None, engine=None, body_timeout_s: float = 60.0,
               shutdown_grace_s: float = 10.0, special_in_text: bool = False, progress=None,
               num_draft_tokens: int = 0, max_batch: int = 8, batch_cache_bytes: int = 8 << 30,
               lockstep=None) -> FastAPI:
    """The FastAPI app. `engine` replaces the model-owning Engine (tests script the output with it).
    max_batch: requests decoded together; batch_cache_bytes: what their caches may hold (admission).
    special_in_text: request text may hold control tokens (unsafe: a request can then fake turns,
    EOS and tool calls). progress(done_bytes, total_bytes) follows the weights as they load.
    lockstep (lockstep.Lockstep): rank 0 of a model split by mlx.launch."""
    from . import anthropic_api, openai_api, responses_api

    if api_key is not None and not api_key.strip():
        raise ValueError("the API key is empty: give a non-empty key, or none to serve without one")
    engine = engine if engine is not None else Engine(model, tokenizer, prefix_cache, progress=progress,
                                                      num_draft_tokens=num_draft_tokens, max_batch=max_batch,
                                                      cache_budget=batch_cache_bytes, lockstep=lockstep)
    context = model.args.max_position_embeddings
    srv = Server(tokenizer, engine, model_name=model_name, vocab_size=model.args.vocab_size,
                 max_tokens_limit=max_tokens_limit,
                 max_body_bytes=max_body_bytes, max_context=min(max_context or context, context),
                 default_thinking=default_thinking, default_temperature=default_temperature,
                 body_timeout_s=body_timeout_s, shutdown_grace_s=shutdown_grace_s, special_in_text=special_in_text)
    if srv.prompts.full.get_vocab_size() > srv.vocab_size:
        log.warning("the tokenizer has %d ids but the model only %d: prompts holding the others are refused",
                    srv.prompts.full.get_vocab_size(), srv.vocab_size)
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


def uvicorn_server(app, host: str = "127.0.0.1", port: int = 0, log_level: str = "info"):
    """uvicorn.Server for `app` that tells the app when shutdown begins (uvicorn otherwise waits
    for every open stream to end before its lifespan hears of it)."""
    import uvicorn

    srv: Server = app.state.server

    class _Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            for sock in sockets or []:  # uvicorn announces only the sockets it opened itself
                host, port = sock.getsockname()[:2]
                log.info("serving %s on http://%s:%d (CTRL+C to quit)", srv.name,
                         f"[{host}]" if ":" in host else host, port)

        async def shutdown(self, sockets=None):
            srv.begin_shutdown()
            await super().shutdown(sockets)

    # uvicorn's own deadline is a backstop: the app ends its streams after shutdown_grace_s
    return _Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                  timeout_graceful_shutdown=srv.shutdown_grace_s + 5))


def listen_socket(host: str, port: int) -> socket.socket:
    """Bind (host, port) now, before the model loads: a taken port is a one-line error at once."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    return sock


def serve(model: str = "deepseek-ai/DeepSeek-V4-Flash", host: str = "127.0.0.1", port: int = 8080,
          api_key: str | None = None, max_tokens_limit: int = 65536, max_body_bytes: int = 32 << 20,
          max_context: int | None = None, default_thinking: bool = False, prefix_cache_entries: int = 8,
          prefix_cache_bytes: int = 4 << 30, log_level: str = "info", expert_memory_gb: float | None = None,
          group=None, sharding: str = "pipeline", **kw) -> None:
    """Load `model` (Hub id, directory or "tiny") once and serve it until interrupted. group: the
    ranks mlx.launch started (each loads its share by `sharding`); rank 0 serves, the others follow."""
    from ..load import load
    from .lockstep import Lockstep

    lockstep = Lockstep(group) if group is not None else None
    if lockstep is not None and not lockstep.leader:
        return follow(model, lockstep, sharding, expert_memory_gb, prefix_cache_entries, prefix_cache_bytes, **kw)
    if api_key is not None and not api_key.strip():
        raise ValueError("--api-key is empty: give a non-empty key, or leave the option out to serve without one")
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print(f"warning: listening on {host} without --api-key: anyone who can reach this port can use the model",
              file=sys.stderr)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
    log.addHandler(handler)
    log.setLevel(log_level.upper())
    sock = listen_socket(host, port)
    try:
        t0 = time.perf_counter()
        print(f"loading {model} ...", file=sys.stderr, flush=True)
        m, tok = load(model, expert_memory_gb=expert_memory_gb, group=group, sharding=sharding)
        shown = [-1]

        def progress(done: int, total: int):  # one line per tenth, not a line per tensor
            tenth = done * 10 // max(total, 1)
            if tenth > shown[0]:
                shown[0] = tenth
                print(f"loading weights: {done / 2**30:.1f} / {total / 2**30:.1f} GiB "
                      f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)

        app = create_app(m, tok, model_name=str(model), api_key=api_key, max_tokens_limit=max_tokens_limit,
                         max_body_bytes=max_body_bytes, max_context=max_context, default_thinking=default_thinking,
                         prefix_cache=PrefixCache(prefix_cache_entries, prefix_cache_bytes), progress=progress,
                         lockstep=lockstep, **kw)
        print(f"loaded {model} in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    except BaseException:
        sock.close()
        raise
    if lockstep is not None:  # SIGTERM is uvicorn's graceful shutdown now, not the loading-time watcher's exit
        signal.set_wakeup_fd(-1)
    try:
        uvicorn_server(app, host, port, log_level).run(sockets=[sock])
    finally:
        app.state.server.engine.close()  # in lockstep this also ends the other ranks
    if lockstep is not None:  # as follow() does: teardown with the ring group's threads alive can abort
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def follow(model: str, lockstep, sharding: str, expert_memory_gb: float | None, prefix_cache_entries: int,
           prefix_cache_bytes: int, max_batch: int = 8, batch_cache_bytes: int = 8 << 30, num_draft_tokens: int = 0,
           **_http) -> None:
    """A rank > 0 under mlx.launch: load this rank's share and run rank 0's engine steps, no HTTP,
    until rank 0 shuts down (its last message) or dies (the collective fails: one error line)."""
    from ..load import load

    m, tok = load(model, expert_memory_gb=expert_memory_gb, group=lockstep.group, sharding=sharding)
    engine = Engine(m, tok, PrefixCache(prefix_cache_entries, prefix_cache_bytes), num_draft_tokens=num_draft_tokens,
                    max_batch=max_batch, cache_budget=batch_cache_bytes, lockstep=lockstep)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C reaches every rank: rank 0 decides when all end
    engine.thread.join()
    sys.stderr.flush()
    os._exit(0)  # done: skip interpreter teardown, where MLX's ring group aborts on its live threads
