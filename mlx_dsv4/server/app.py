"""`mlx_dsv4 serve`: OpenAI- and Anthropic-compatible HTTP API over one loaded model.

Routes: GET /health, GET /v1/models, POST /v1/chat/completions, POST /v1/completions,
POST /v1/messages, POST /v1/messages/count_tokens. Errors are 4xx JSON in each API's own format.
"""

from __future__ import annotations

import asyncio
import json
import queue
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..chat import (ContentDelta, ReasoningDelta, StreamingParser, ToolCallArgumentsDelta, ToolCallEnd,
                    ToolCallStart, encode_messages)
from .engine import _DONE, Engine
from .requests import RequestError, anthropic_messages, openai_chat, sampling


def _oa_error(msg, status=400, param=None, kind="invalid_request_error"):
    return JSONResponse({"error": {"message": msg, "type": kind, "param": param, "code": None}}, status_code=status)


def _an_error(msg, status=400, kind="invalid_request_error"):
    return JSONResponse({"type": "error", "error": {"type": kind, "message": msg}}, status_code=status)


class Server:
    def __init__(self, model, tokenizer, model_name: str = "deepseek-v4", api_key: str | None = None,
                 max_tokens_limit: int = 32768, max_body_bytes: int = 16 << 20, max_context: int | None = None,
                 engine: Engine | None = None):
        self.model, self.tokenizer, self.name = model, tokenizer, model_name
        self.api_key, self.max_tokens_limit, self.max_body = api_key, max_tokens_limit, max_body_bytes
        self.max_context = max_context or model.args.max_position_embeddings
        if engine is None:
            import mlx.core as mx

            mx.eval(model.parameters())  # lazy graphs are bound to this thread's stream: finish them here
            engine = Engine(model, tokenizer)
        self.engine = engine

    # -- shared steps ----------------------------------------------------------------------
    def key_ok(self, request: Request) -> bool:
        if not self.api_key:
            return True
        auth = request.headers.get("authorization", "")
        key = auth[7:] if auth.lower().startswith("bearer ") else request.headers.get("x-api-key")
        return key == self.api_key

    async def body(self, request: Request) -> dict:
        if not self.key_ok(request):
            raise RequestError("invalid or missing API key", status=401)
        raw = await request.body()
        if len(raw) > self.max_body:
            raise RequestError(f"request body of {len(raw)} bytes exceeds the limit of {self.max_body}", status=413)
        try:
            body = json.loads(raw or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(f"malformed JSON: {e}") from None
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")
        return body

    def tokens(self, messages, mode, effort) -> list[int]:
        try:
            prompt = encode_messages(messages, mode, effort)
        except ValueError as e:
            raise RequestError(str(e)) from None
        ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        if len(ids) >= self.max_context:
            raise RequestError(f"the prompt has {len(ids)} tokens; the context limit is {self.max_context}")
        return ids

    async def events(self, request: Request, ids: list[int], params: dict):
        """Run a job; yield GenerationResponses; cancel it if the client goes away."""
        job = self.engine.submit(ids, **params)
        try:
            while True:
                try:
                    item = job.events.get_nowait()
                except queue.Empty:
                    if await request.is_disconnected():
                        job.cancelled.set()
                        return
                    await asyncio.sleep(0.005)
                    continue
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            job.cancelled.set()


def _top_logprobs(body: dict) -> int:
    n = body.get("top_logprobs") or 0
    if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= 20:
        raise RequestError("top_logprobs must be an integer between 0 and 20", param="top_logprobs")
    return n


def _usage(last, n_prompt):
    gen = last.generation_tokens if last else 0
    return n_prompt, gen, (last.cached_tokens if last else 0)


def create_app(model, tokenizer, **kw) -> FastAPI:
    srv = Server(model, tokenizer, **kw)
    app = FastAPI(title="mlx-dsv4", version="0.1.0")
    app.state.server = srv

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": srv.name}

    @app.get("/v1/models")
    async def models(request: Request):
        if not srv.key_ok(request):
            return _oa_error("invalid or missing API key", 401, kind="authentication_error")
        return {"object": "list", "data": [{"id": srv.name, "object": "model", "created": 0, "owned_by": "mlx-dsv4"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            body = await srv.body(request)
            messages, mode, effort = openai_chat(body)
            params = sampling(body, srv.max_tokens_limit)
            want_lp = bool(body.get("logprobs"))
            if want_lp:
                params["num_top_logprobs"] = int(_top_logprobs(body))
            ids = srv.tokens(messages, mode, effort)
        except RequestError as e:
            return _oa_error(str(e), e.status, e.param, "authentication_error" if e.status == 401 else
                             "invalid_request_error")
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def logprob(r):
            if not want_lp or r.token is None:
                return None
            dec = srv.tokenizer.decode
            return {"token": dec([r.token]), "logprob": r.logprob,
                    "top_logprobs": [{"token": dec([t]), "logprob": v} for t, v in (r.top_logprobs or [])]}

        def usage(last):
            p, g, c = _usage(last, len(ids))
            return {"prompt_tokens": p, "completion_tokens": g, "total_tokens": p + g,
                    "prompt_tokens_details": {"cached_tokens": c}}

        def finish_of(last, n_calls):
            if n_calls:
                return "tool_calls"
            return "length" if last is not None and last.finish_reason == "length" else "stop"

        async def deltas():
            """(delta dict or None, logprob entry or None) per parser event, then a final (None, r)."""
            parser = StreamingParser(mode)
            async for r in srv.events(request, ids, params):
                lp = logprob(r)
                evs = parser.feed(r.text) + (parser.finish() if r.finish_reason else [])
                for ev in evs:
                    yield ev, lp, r
                    lp = None
                if lp:
                    yield None, lp, r

        if body.get("stream"):
            def chunk(delta, finish=None, usage_=None, lp=None):
                c = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": srv.name,
                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                                  "logprobs": {"content": [lp]} if lp else None}]}
                if usage_:
                    c["usage"] = usage_
                return f"data: {json.dumps(c, ensure_ascii=False)}\n\n"

            async def stream():
                yield chunk({"role": "assistant", "content": ""})
                last, ids_of = None, {}
                try:
                    async for ev, lp, r in deltas():
                        last = r
                        if isinstance(ev, ReasoningDelta):
                            yield chunk({"reasoning_content": ev.text}, lp=lp)
                        elif isinstance(ev, ContentDelta):
                            yield chunk({"content": ev.text}, lp=lp)
                        elif isinstance(ev, ToolCallStart):
                            ids_of[ev.index] = f"call_{uuid.uuid4().hex[:24]}"
                            yield chunk({"tool_calls": [{"index": ev.index, "id": ids_of[ev.index], "type": "function",
                                                         "function": {"name": ev.name, "arguments": ""}}]}, lp=lp)
                        elif isinstance(ev, ToolCallArgumentsDelta):
                            yield chunk({"tool_calls": [{"index": ev.index, "function": {"arguments": ev.text}}]},
                                        lp=lp)
                        elif lp:
                            yield chunk({}, lp=lp)
                except Exception as e:  # noqa: BLE001 - the status line is sent: report in-stream
                    yield f"data: {json.dumps({'error': {'message': str(e), 'type': 'server_error'}})}\n\n"
                    return
                yield chunk({}, finish_of(last, len(ids_of)), usage(last))
                yield "data: [DONE]\n\n"

            return StreamingResponse(stream(), media_type="text/event-stream")

        msg = {"role": "assistant", "content": "", "reasoning_content": None}
        calls, lps, last = [], [], None
        async for ev, lp, r in deltas():
            last = r
            if lp:
                lps.append(lp)
            if isinstance(ev, ReasoningDelta):
                msg["reasoning_content"] = (msg["reasoning_content"] or "") + ev.text
            elif isinstance(ev, ContentDelta):
                msg["content"] += ev.text
            elif isinstance(ev, ToolCallStart):
                calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                              "function": {"name": ev.name, "arguments": ""}})
            elif isinstance(ev, ToolCallEnd):
                calls[ev.index]["function"]["arguments"] = ev.arguments_json
        if calls:
            msg["tool_calls"] = calls
        return {"id": cid, "object": "chat.completion", "created": created, "model": srv.name,
                "choices": [{"index": 0, "message": msg, "finish_reason": finish_of(last, len(calls)),
                             "logprobs": {"content": lps} if want_lp else None}],
                "usage": usage(last)}

    @app.post("/v1/completions")
    async def completions(request: Request):
        try:
            body = await srv.body(request)
            prompt = body.get("prompt")
            if not isinstance(prompt, str):
                raise RequestError("prompt must be a string", param="prompt")
            params = sampling(body, srv.max_tokens_limit)
            ids = [srv.model.args.bos_token_id] + srv.tokenizer.encode(prompt, add_special_tokens=False)
            if len(ids) >= srv.max_context:
                raise RequestError(f"the prompt has {len(ids)} tokens; the context limit is {srv.max_context}")
        except RequestError as e:
            return _oa_error(str(e), e.status, e.param)
        text, last = "", None
        async for r in srv.events(request, ids, params):
            text, last = text + r.text, r
        p, g, c = _usage(last, len(ids))
        return {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
                "model": srv.name, "choices": [{"index": 0, "text": text, "logprobs": None,
                                                "finish_reason": "length" if last and last.finish_reason == "length"
                                                else "stop"}],
                "usage": {"prompt_tokens": p, "completion_tokens": g, "total_tokens": p + g}}

    @app.post("/v1/messages/count_tokens")
    async def count_tokens(request: Request):
        try:
            body = await srv.body(request)
            messages, mode, effort = anthropic_messages(body)
            return {"input_tokens": len(srv.tokens(messages, mode, effort))}
        except RequestError as e:
            return _an_error(str(e), e.status, "authentication_error" if e.status == 401 else "invalid_request_error")

    @app.post("/v1/messages")
    async def messages(request: Request):
        try:
            body = await srv.body(request)
            if not isinstance(body.get("max_tokens"), int) or isinstance(body.get("max_tokens"), bool):
                raise RequestError("max_tokens: Field required (an integer)")
            msgs, mode, effort = anthropic_messages(body)
            params = sampling(body, srv.max_tokens_limit)
            ids = srv.tokens(msgs, mode, effort)
        except RequestError as e:
            return _an_error(str(e), e.status, "authentication_error" if e.status == 401 else "invalid_request_error")
        from .anthropic_out import AnthropicOutput

        out = AnthropicOutput(srv.name, len(ids), mode)
        if body.get("stream"):
            async def stream():
                yield out.start()
                last = None
                try:
                    async for r in srv.events(request, ids, params):
                        last = r
                        for s in out.feed(r.text, final=r.finish_reason is not None):
                            yield s
                except Exception as e:  # noqa: BLE001
                    yield out.sse("error", {"type": "error", "error": {"type": "api_error", "message": str(e)}})
                    return
                for s in out.end(last, body.get("stop_sequences")):
                    yield s

            return StreamingResponse(stream(), media_type="text/event-stream")
        last = None
        async for r in srv.events(request, ids, params):
            last = r
            list(out.feed(r.text, final=r.finish_reason is not None))
        return out.message(last)

    return app


def serve(model: str = "deepseek-ai/DeepSeek-V4-Flash", host: str = "127.0.0.1", port: int = 8080,
          api_key: str | None = None, **kw) -> None:
    import uvicorn

    from ..load import load

    m, tok = load(model)
    app = create_app(m, tok, model_name=str(model), api_key=api_key, **kw)
    uvicorn.run(app, host=host, port=port, log_level="info")
