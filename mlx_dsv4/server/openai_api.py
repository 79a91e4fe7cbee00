"""OpenAI-compatible routes: GET /v1/models, POST /v1/chat/completions, POST /v1/completions.

OpenAI's "developer" role is its name for system instructions and is encoded as system (the
V4 encoder's own "developer" role is DeepSeek-internal). Tools go into the system message for the
encoder; tool_choice "none" leaves them out, "required" and named tools are accepted but cannot
force the model. A last assistant message with "prefix": true (DeepSeek's chat prefix completion)
is continued by the reply.
"""

from __future__ import annotations

import json
import time
import uuid

from fastapi import FastAPI, Request

from ..chat import ContentDelta, ReasoningDelta, ToolCallArgumentsDelta, ToolCallStart
from .errors import RequestError, sse_error
from .output import Completion, event_stream, sse
from .params import attach_tools, content, get, in_range, reasoning, sampling

ROLES = ("system", "developer", "user", "assistant", "tool")


def tool_calls(calls, where: str) -> list[dict]:
    if not isinstance(calls, list):
        raise RequestError(f"{where}.tool_calls must be an array", param="messages")
    for k, c in enumerate(calls):
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise RequestError(f"{where}.tool_calls[{k}].function.name must be a string", param="messages")
        if not isinstance(fn.get("arguments", ""), (str, dict)):
            raise RequestError(f"{where}.tool_calls[{k}].function.arguments must be a JSON string", param="messages")
    return calls


def function_tools(tools, field: str = "tools") -> list[dict]:
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise RequestError(f"{field} must be an array", param=field)
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or t.get("type", "function") != "function":
            raise RequestError(f"{field}[{i}] must be a function tool ({{\"type\": \"function\", ...}})", param=field)
        fn = t.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise RequestError(f"{field}[{i}].function.name must be a string", param=field)
    return tools


def tool_choice(body: dict) -> str:
    tc = body.get("tool_choice")
    if tc is None or tc in ("none", "auto", "required"):
        return tc or "auto"
    if isinstance(tc, dict) and tc.get("type") in ("function", "allowed_tools", "custom"):
        return "named"
    raise RequestError('tool_choice must be "none", "auto", "required" or {"type": "function", ...}',
                       param="tool_choice")


def response_format(body: dict) -> dict | None:
    rf = body.get("response_format")
    if rf is None:
        return None
    if not isinstance(rf, dict) or rf.get("type") not in ("text", "json_object", "json_schema"):
        raise RequestError('response_format must be {"type": "text" | "json_object" | "json_schema", ...}',
                           param="response_format")
    return None if rf["type"] == "text" else rf


def chat_request(body: dict, default_thinking: bool) -> tuple[list[dict], str, str | None]:
    """(messages for encode_messages, thinking mode, effort) of a chat.completions body."""
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise RequestError("messages must be a non-empty array", param="messages")
    out = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise RequestError(f"{where} must be an object", param="messages")
        role = m.get("role")
        if role not in ROLES:
            raise RequestError(f"{where}.role must be one of {list(ROLES)}, got {role!r}", param="messages")
        msg = {"role": "system" if role == "developer" else role,
               "content": content(m.get("content"), where + ".content")}
        if role == "assistant":
            if m.get("reasoning_content") is not None:
                msg["reasoning_content"] = get(m, "reasoning_content", str, where=where + ".")
            if m.get("tool_calls"):
                msg["tool_calls"] = tool_calls(m["tool_calls"], where)
        if role == "tool":
            msg["tool_call_id"] = get(m, "tool_call_id", str, where=where + ".")
        if get(m, "prefix", bool, False, where=where + ".") and (role != "assistant" or i != len(msgs) - 1):
            raise RequestError(f"{where}.prefix: only the last message, an assistant one, can be a prefix",
                               param="messages")
        out.append(msg)
    tools = function_tools(body.get("tools"))
    attach_tools(out, tools if tool_choice(body) != "none" else [], response_format(body))
    th = body.get("thinking")
    if th is not None and (not isinstance(th, dict) or th.get("type") not in ("enabled", "disabled")):
        raise RequestError('thinking must be {"type": "enabled"} or {"type": "disabled"}', param="thinking")
    effort = get(body, "reasoning_effort", str)
    mode, effort = reasoning(th and th["type"], effort, default_thinking, "reasoning_effort")
    return out, mode, effort


def _usage(c: Completion) -> dict:
    return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
            "total_tokens": c.prompt_tokens + c.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": c.cached_tokens},
            "completion_tokens_details": {"reasoning_tokens": c.reasoning_tokens}}


def _finish(c: Completion) -> str:
    return {"stop_sequence": "stop"}.get(c.finish, c.finish)


def add_routes(app: FastAPI, srv) -> None:
    def logprob_entry(r):
        def one(t, v):
            s = srv.tokenizer.decode([t])
            return {"token": s, "logprob": v, "bytes": list(s.encode())}

        return dict(one(r.token, r.logprob), top_logprobs=[one(t, v) for t, v in (r.top_logprobs or [])])

    @app.get("/v1/models")
    async def models(request: Request):
        if "anthropic-version" in request.headers:  # Anthropic's SDK lists models here too
            return {"data": [{"type": "model", "id": srv.name, "display_name": srv.name,
                              "created_at": "1970-01-01T00:00:00Z"}],
                    "has_more": False, "first_id": srv.name, "last_id": srv.name}
        return {"object": "list", "data": [{"id": srv.name, "object": "model", "created": 0, "owned_by": "mlx-dsv4"}]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        return {"id": model_id, "object": "model", "created": 0, "owned_by": "mlx-dsv4"}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await srv.json(request)
        messages, mode, effort = chat_request(body, srv.default_thinking)
        params = sampling(body, max_keys=("max_completion_tokens", "max_tokens"), limit=srv.max_tokens_limit,
                          default_max=srv.max_tokens_limit, default_temperature=srv.default_temperature)
        if get(body, "n", int, 1) != 1:
            raise RequestError("n must be 1: one completion per request", param="n")
        want_lp = get(body, "logprobs", bool, False)
        if want_lp:
            params["num_top_logprobs"] = in_range("top_logprobs", get(body, "top_logprobs", int, 0), 0, 20)
        stream = get(body, "stream", bool, False)
        opts = get(body, "stream_options", dict, {})
        include_usage = get(opts, "include_usage", bool, False, where="stream_options.")
        prefix = body["messages"][-1].get("prefix") is True  # DeepSeek's chat prefix completion
        ids = await srv.encode(messages, mode, effort, continue_last=prefix)
        params = srv.budget(params, ids)
        comp = Completion(srv.tokenizer, "chat" if prefix else mode, params["stop"])
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        call_ids: list[str] = []

        def delta_of(ev) -> dict | None:
            if isinstance(ev, ReasoningDelta):
                return {"reasoning_content": ev.text}
            if isinstance(ev, ContentDelta):
                return {"content": ev.text}
            if isinstance(ev, ToolCallStart):
                call_ids.append(f"call_{uuid.uuid4().hex[:24]}")
                return {"tool_calls": [{"index": ev.index, "id": call_ids[-1], "type": "function",
                                        "function": {"name": ev.name, "arguments": ""}}]}
            if isinstance(ev, ToolCallArgumentsDelta):
                return {"tool_calls": [{"index": ev.index, "function": {"arguments": ev.text}}]}
            return None  # ToolCallEnd: the arguments are already out

        if stream:
            def chunk(delta: dict, finish=None, lp=None, choices=True) -> str:
                c = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": srv.name,
                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                                  "logprobs": {"content": lp} if lp else None}] if choices else []}
                return sse(c)

            def feed(r) -> list[str]:
                lp = [logprob_entry(r)] if want_lp and r.token is not None else None
                out = []
                for d in filter(None, map(delta_of, comp.feed(r))):
                    out.append(chunk(d, lp=lp))
                    lp = None
                return out + ([chunk({}, lp=lp)] if lp else [])

            def end() -> list[str]:
                usage = [sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": srv.name,
                              "choices": [], "usage": _usage(comp)})] if include_usage else []
                return [chunk({}, _finish(comp)), *usage, "data: [DONE]\n\n"]

            return event_stream(srv.run(request, ids, params), start=[chunk({"role": "assistant", "content": ""})],
                                feed=feed, keepalive=": keepalive\n\n",
                                error=lambda m: sse(sse_error(request.url.path, m)), end=end)

        text, reasoning_text, lps = "", "", []
        async for r in srv.run(request, ids, params):
            if r is None:
                continue
            if want_lp and r.token is not None:
                lps.append(logprob_entry(r))
            for ev in comp.feed(r):
                if isinstance(ev, ReasoningDelta):
                    reasoning_text += ev.text
                elif isinstance(ev, ContentDelta):
                    text += ev.text
                elif isinstance(ev, ToolCallStart):
                    delta_of(ev)
        msg = {"role": "assistant", "content": text if text or not comp.calls else None,
               "reasoning_content": reasoning_text or None}
        if comp.calls:
            msg["tool_calls"] = [{"id": i, "type": "function", "function": dict(c)}
                                 for i, c in zip(call_ids, comp.calls)]
        return {"id": cid, "object": "chat.completion", "created": created, "model": srv.name,
                "choices": [{"index": 0, "message": msg, "finish_reason": _finish(comp),
                             "logprobs": {"content": lps} if want_lp else None}],
                "usage": _usage(comp)}

    @app.post("/v1/completions")
    async def completions(request: Request):
        """Raw text completion (no chat template), for -Base models: BOS + the prompt."""
        body = await srv.json(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        for k, ok in (("echo", (None, False)), ("suffix", (None, "")), ("best_of", (None, 1))):
            v = body.get(k)  # `is`, not ==: True == 1, and echo=true would otherwise pass unnoticed
            if not any(v is x or (type(v) is type(x) and v == x) for x in ok):
                raise RequestError(f"{k} is not supported (only {' or '.join(json.dumps(x) for x in ok[1:])})",
                                   param=k)
        if isinstance(prompt, str):
            ids = await srv.encode_text(prompt)
        elif (isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                            and 0 <= t < srv.vocab_size for t in prompt)):
            ids = list(prompt)
        else:
            raise RequestError(f"prompt must be a string or a non-empty array of token ids in [0, {srv.vocab_size})",
                               param="prompt")
        params = sampling(body, max_keys=("max_tokens",), limit=srv.max_tokens_limit,
                          default_max=min(16, srv.max_tokens_limit), default_temperature=srv.default_temperature)
        if get(body, "n", int, 1) != 1:
            raise RequestError("n must be 1: one completion per request", param="n")
        n_lp = in_range("logprobs", get(body, "logprobs", int), 0, 5)
        if n_lp is not None:
            params["num_top_logprobs"] = n_lp
        params = srv.budget(params, srv.check_context(ids, "prompt"))
        cid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        comp = Completion(srv.tokenizer, "chat", params["stop"], parse=False)
        lp = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

        def record(r):
            if n_lp is not None and r.token is not None:
                lp["text_offset"].append(len(comp.text) - len(r.text))
                lp["tokens"].append(srv.tokenizer.decode([r.token]))
                lp["token_logprobs"].append(r.logprob)
                lp["top_logprobs"].append({srv.tokenizer.decode([t]): v for t, v in (r.top_logprobs or [])})

        def choice(text: str, finish, logprobs=None) -> dict:
            return {"id": cid, "object": "text_completion", "created": created, "model": srv.name,
                    "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}]}

        def finish() -> str:
            return "length" if comp.finish == "length" else "stop"

        if get(body, "stream", bool, False):
            def feed(r) -> list[str]:
                comp.feed(r)
                return [sse(choice(r.text, None))] if r.text else []

            return event_stream(srv.run(request, ids, params), start=[], feed=feed, keepalive=": keepalive\n\n",
                                error=lambda m: sse(sse_error(request.url.path, m)),
                                end=lambda: [sse(dict(choice("", finish()), usage=_usage(comp))), "data: [DONE]\n\n"])

        async for r in srv.run(request, ids, params):
            if r is not None:
                comp.feed(r)
                record(r)
        u = _usage(comp)
        return dict(choice(comp.text, finish(), lp if n_lp is not None else None),
                    usage={k: u[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")})
