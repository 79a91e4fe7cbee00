"""Request translation: OpenAI and Anthropic request bodies -> (messages for encode_messages,
thinking mode, reasoning effort, sampling parameters). Every malformed field raises
RequestError with a message naming it; the app turns that into each API's 4xx error format."""

from __future__ import annotations

import json

from ..chat.encoding import ROLES


class RequestError(ValueError):
    def __init__(self, message: str, status: int = 400, param: str | None = None):
        super().__init__(message)
        self.status, self.param = status, param


def _type(body: dict, key: str, kinds, default=None, where: str = ""):
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise RequestError(f"{where}{key} must be {_name(kinds)}", param=key)
    if not isinstance(v, kinds):
        raise RequestError(f"{where}{key} must be {_name(kinds)}, got {type(v).__name__}", param=key)
    return v


def _name(kinds) -> str:
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    return " or ".join({int: "an integer", float: "a number", str: "a string", list: "an array", dict: "an object",
                        bool: "a boolean"}.get(k, k.__name__) for k in kinds)


# DeepSeek's API: none -> no thinking; low/medium/high -> thinking (high); xhigh/max -> thinking (max)
EFFORT_MAP = {"none": ("chat", None), "low": ("thinking", "high"), "medium": ("thinking", "high"),
              "high": ("thinking", "high"), "xhigh": ("thinking", "max"), "max": ("thinking", "max")}


def sampling(body: dict, max_tokens_limit: int, max_key: str = "max_tokens") -> dict:
    n = _type(body, "max_completion_tokens", int) or _type(body, max_key, int) or 256
    if n < 1 or n > max_tokens_limit:
        raise RequestError(f"{max_key} must be between 1 and {max_tokens_limit}, got {n}", param=max_key)
    temperature = float(_type(body, "temperature", (int, float), 0.0))
    top_p = float(_type(body, "top_p", (int, float), 1.0))
    if not 0 <= temperature <= 2:
        raise RequestError("temperature must be between 0 and 2", param="temperature")
    if not 0 < top_p <= 1:
        raise RequestError("top_p must be in (0, 1]", param="top_p")
    stop = body.get("stop", body.get("stop_sequences"))
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop)):
        raise RequestError("stop must be a string or an array of non-empty strings", param="stop")
    seed = _type(body, "seed", int)
    return {"max_tokens": n, "temperature": temperature, "top_p": top_p, "stop": stop or None, "seed": seed}


def _text_of(content, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        out = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") not in ("text", "input_text"):
                raise RequestError(f"{where}.content[{i}]: only text parts are supported")
            if not isinstance(part.get("text"), str):
                raise RequestError(f"{where}.content[{i}].text must be a string")
            out.append(part["text"])
        return "".join(out)
    raise RequestError(f"{where}.content must be a string or an array of parts")


def openai_chat(body: dict) -> tuple[list[dict], str, str | None]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise RequestError("messages must be a non-empty array", param="messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise RequestError(f"messages[{i}] must be an object", param="messages")
        role = m.get("role")
        if role not in ROLES:
            raise RequestError(f"messages[{i}].role {role!r} is not one of {list(ROLES)}", param="messages")
        msg = {"role": role, "content": m["content"] if role == "tool" and isinstance(m.get("content"), list)
               else _text_of(m.get("content"), f"messages[{i}]")}
        for k in ("reasoning_content", "tool_call_id", "name"):
            if k in m and m[k] is not None:
                msg[k] = m[k]
        if m.get("tool_calls") is not None:
            calls = m["tool_calls"]
            if not isinstance(calls, list) or not all(isinstance(c, dict) and isinstance(c.get("function"), dict)
                                                      for c in calls):
                raise RequestError(f"messages[{i}].tool_calls must be an array of function calls", param="messages")
            msg["tool_calls"] = calls
        out.append(msg)
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise RequestError("tools must be an array", param="tools")
    if tools and body.get("tool_choice") != "none":
        if out[0]["role"] == "system":
            out[0]["tools"] = tools
        else:
            out.insert(0, {"role": "system", "content": "", "tools": tools})
    mode, effort = "chat", None
    th = body.get("thinking")
    if th is not None:
        if not isinstance(th, dict) or th.get("type") not in ("enabled", "disabled"):
            raise RequestError('thinking must be {"type": "enabled"} or {"type": "disabled"}', param="thinking")
        mode = "thinking" if th["type"] == "enabled" else "chat"
        effort = "high" if mode == "thinking" else None
    re_ = body.get("reasoning_effort")
    if re_ is not None:
        if re_ not in EFFORT_MAP:
            raise RequestError(f"reasoning_effort must be one of {list(EFFORT_MAP)}", param="reasoning_effort")
        if not (th is not None and th.get("type") == "disabled"):
            mode, effort = EFFORT_MAP[re_]
    return out, mode, effort


def anthropic_messages(body: dict) -> tuple[list[dict], str, str | None]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise RequestError("messages: must be a non-empty array")
    out: list[dict] = []
    system = body.get("system")
    if system is not None:
        out.append({"role": "system", "content": _text_of(system, "system")})
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise RequestError(f"messages.{i}.role: must be 'user' or 'assistant'")
        content = m.get("content")
        if isinstance(content, str):
            out.append({"role": m["role"], "content": content})
            continue
        if not isinstance(content, list):
            raise RequestError(f"messages.{i}.content: must be a string or an array of blocks")
        texts, calls, thinking = [], [], []
        for j, b in enumerate(content):
            t = b.get("type") if isinstance(b, dict) else None
            if t == "text" and isinstance(b.get("text"), str):
                texts.append(b["text"])
            elif t == "thinking" and m["role"] == "assistant":
                thinking.append(str(b.get("thinking", "")))
            elif t == "tool_use" and m["role"] == "assistant" and isinstance(b.get("name"), str):
                calls.append({"id": b.get("id"), "type": "function",
                              "function": {"name": b["name"], "arguments": json.dumps(b.get("input", {}))}})
            elif t == "tool_result" and m["role"] == "user":
                c = b.get("content", "")
                out.append({"role": "tool", "tool_call_id": b.get("tool_use_id"),
                            "content": c if isinstance(c, (str, list)) else json.dumps(c)})
            else:
                raise RequestError(f"messages.{i}.content.{j}: unsupported block {t!r} for role {m['role']}")
        if m["role"] == "user" and (texts or not any(x["role"] == "tool" for x in out[-len(content):])):
            if texts:
                out.append({"role": "user", "content": "".join(texts)})
        elif m["role"] == "assistant":
            msg = {"role": "assistant", "content": "".join(texts)}
            if thinking:
                msg["reasoning_content"] = "".join(thinking)
            if calls:
                msg["tool_calls"] = calls
            out.append(msg)
    tools = body.get("tools")
    if tools:
        if not isinstance(tools, list) or not all(isinstance(t, dict) and isinstance(t.get("name"), str) for t in tools):
            raise RequestError("tools: must be an array of {name, description, input_schema}")
        fns = [{"type": "function", "function": {"name": t["name"], "description": t.get("description", ""),
                                                 "parameters": t.get("input_schema", {})}} for t in tools]
        if out and out[0]["role"] == "system":
            out[0]["tools"] = fns
        else:
            out.insert(0, {"role": "system", "content": "", "tools": fns})
    th = body.get("thinking")
    mode = "thinking" if isinstance(th, dict) and th.get("type") == "enabled" else "chat"
    return out, mode, ("high" if mode == "thinking" else None)
