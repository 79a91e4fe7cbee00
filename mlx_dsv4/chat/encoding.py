"""encode_messages: OpenAI-style messages -> the exact DeepSeek-V4 prompt string.

Reproduces the official encoder (checked byte for byte against golden vectors produced by it).
Three reasoning modes: "chat" (the answer starts after `<｜Assistant｜></think>`), "thinking"
(after `<｜Assistant｜><think>`), and "thinking" with reasoning_effort "max" (a fixed paragraph
right after BOS). Tool calls use the DSML block; tool results fold into the next user turn.
"""

from __future__ import annotations

import copy
import json

from .tokens import (ASSISTANT, BOS, DSML, EOS, LATEST_REMINDER, THINK_END, THINK_START, TOOL_CALLS_END,
                     TOOL_CALLS_START, USER)

ROLES = ("system", "user", "assistant", "tool", "developer", "latest_reminder")
THINKING_MODES = ("chat", "thinking")
EFFORTS = (None, "high", "max")

MAX_EFFORT_PREFIX = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root "
    "cause, rigorously stress-testing your logic against all potential paths, edge cases, and adversarial "
    "scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, considered "
    "alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n"
)

TOOLS_TEMPLATE = f"""## Tools

You have access to a set of tools to help answer the user's question. You can invoke tools by writing a "<{DSML}tool_calls>" block like the following:

<{DSML}tool_calls>
<{DSML}invoke name="$TOOL_NAME">
<{DSML}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</{DSML}parameter>
...
</{DSML}invoke>
<{DSML}invoke name="$TOOL_NAME2">
...
</{DSML}invoke>
</{DSML}tool_calls>

String parameters should be specified as is and set `string="true"`. For all other types (numbers, booleans, arrays, objects), pass the value in JSON format and set `string="false"`.

If thinking_mode is enabled (triggered by <think>), you MUST output your complete reasoning inside <think>...</think> BEFORE any tool calls or final response.

Otherwise, output directly after </think> with tool calls or final response.

### Available Tool Schemas

{{schemas}}

You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.
"""

RESPONSE_FORMAT_TEMPLATE = "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n{schema}"


def _dumps(v) -> str:
    return json.dumps(v, ensure_ascii=False)


def render_tools(tools: list) -> str:
    schemas = []
    for t in tools:
        if not isinstance(t, dict):
            raise ValueError(f"each tool must be an object, got {type(t).__name__}")
        fn = t.get("function", t) if t.get("type", "function") == "function" else t
        if not isinstance(fn, dict) or "name" not in fn:
            raise ValueError(f"tool without a function name: {t!r}")
        schemas.append(_dumps(fn))
    return TOOLS_TEMPLATE.replace("{schemas}", "\n".join(schemas))


def render_tool_calls(tool_calls: list) -> str:
    invokes = []
    for i, call in enumerate(tool_calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ValueError(f"tool_calls[{i}] needs function.name")
        raw = fn.get("arguments", "{}")
        if isinstance(raw, dict):
            args = raw
        else:
            try:
                args = json.loads(raw) if isinstance(raw, str) else None
            except json.JSONDecodeError:
                args = None
            if not isinstance(args, dict):
                args = None
        if args is None:  # not a JSON object: pass the text through as one string parameter
            params = [_param("arguments", raw if isinstance(raw, str) else _dumps(raw), True)]
        else:
            params = [_param(k, v, True) if isinstance(v, str) else _param(k, _dumps(v), False)
                      for k, v in args.items()]
        invokes.append(f'<{DSML}invoke name="{fn["name"]}">\n' + "\n".join(params) + f"\n</{DSML}invoke>")
    return TOOL_CALLS_START + "\n".join(invokes) + TOOL_CALLS_END


def _param(name: str, value: str, is_string: bool) -> str:
    flag = "true" if is_string else "false"
    return f'<{DSML}parameter name="{name}" string="{flag}">{value}</{DSML}parameter>'


def _content_text(content, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for block in content:
            if isinstance(block, str):
                parts.append(block)
            elif isinstance(block, dict) and block.get("type") == "text":
                parts.append(block.get("text", ""))
            elif isinstance(block, dict):
                parts.append(f"[Unsupported {block.get('type')}]")
            else:
                raise ValueError(f"{where}: content blocks must be objects")
        return "\n\n".join(parts)
    raise ValueError(f"{where}: content must be a string or a list of blocks, got {type(content).__name__}")


def _merge_tool_results(messages: list[dict]) -> list[dict]:
    """Fold role-"tool" messages (and a user message right after them) into single user turns,
    with results in the order of the preceding assistant's tool calls; merge consecutive users."""
    out: list[dict] = []
    order: list[str] = []
    for i, m in enumerate(messages):
        role = m["role"]
        if role == "assistant":
            order = [c.get("id") for c in (m.get("tool_calls") or []) if isinstance(c, dict)]
        if role == "tool":
            block = {"id": m.get("tool_call_id"), "text": _content_text(m.get("content"), f"messages[{i}]")}
            if out and out[-1]["role"] == "user" and "_results" in out[-1] and "_text" not in out[-1]:
                out[-1]["_results"].append(block)
            else:
                out.append({"role": "user", "_results": [block], "_order": order})
            continue
        if role == "user":
            text = _content_text(m.get("content"), f"messages[{i}]")
            if out and out[-1]["role"] == "user" and out[-1].get("_mergeable", True):
                prev = out[-1]
                prev["_text"] = prev["_text"] + "\n\n" + text if "_text" in prev else text
                continue
            out.append({**m, "role": "user", "_text": text})
            continue
        out.append(m)
    for m in out:
        if "_results" in m:
            ids = m.pop("_order")
            rank = {cid: k for k, cid in enumerate(ids)}
            res = sorted(m.pop("_results"), key=lambda b: rank.get(b["id"], len(rank)))
            text = "\n\n".join(f"<tool_result>{b['text']}</tool_result>" for b in res)
            m["_text"] = text + ("\n\n" + m["_text"] if "_text" in m else "")
    return out


def _validate(messages, thinking_mode, reasoning_effort):
    if thinking_mode not in THINKING_MODES:
        raise ValueError(f"thinking_mode must be one of {THINKING_MODES}, got {thinking_mode!r}")
    if reasoning_effort not in EFFORTS:
        raise ValueError(f"reasoning_effort must be one of {EFFORTS}, got {reasoning_effort!r}")
    if not isinstance(messages, list):
        raise ValueError("messages must be a list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise ValueError(f"messages[{i}] must be an object with a 'role'")
        if m["role"] not in ROLES:
            raise ValueError(f"messages[{i}]: unknown role {m['role']!r}; expected one of {ROLES}")
        if m["role"] == "developer" and not m.get("content"):
            raise ValueError(f"messages[{i}]: a developer message needs content")
        if m.get("tool_calls") is not None and not isinstance(m["tool_calls"], list):
            raise ValueError(f"messages[{i}]: tool_calls must be a list")


def encode_messages(messages: list[dict], thinking_mode: str = "chat", reasoning_effort: str | None = None,
                    drop_thinking: bool = True, context: list[dict] | None = None,
                    add_default_bos_token: bool = True) -> str:
    """The prompt string (special tokens as text; tokenize it with add_special_tokens=False).

    `context` holds earlier messages already encoded (their text is not re-emitted and no BOS is added)."""
    _validate(messages, thinking_mode, reasoning_effort)
    context = context or []
    _validate(context, thinking_mode, reasoning_effort)
    full = copy.deepcopy(context) + copy.deepcopy(messages)
    thinking = thinking_mode == "thinking"
    if any(m.get("tools") for m in full):
        drop_thinking = False
    merged = _merge_tool_results(full)
    n_ctx = len(_merge_tool_results(copy.deepcopy(context))) if context else 0
    last_user = max((i for i, m in enumerate(merged) if m["role"] in ("user", "developer")), default=-1)
    drop = thinking and drop_thinking

    parts = []
    if add_default_bos_token and not context:
        parts.append(BOS)
        if thinking and reasoning_effort == "max":
            parts.append(MAX_EFFORT_PREFIX)
    for i, m in enumerate(merged):
        role = m["role"]
        if drop and role == "developer" and i < last_user:
            continue
        if role == "system":
            text = _content_text(m.get("content"), f"messages[{i}]")
        elif role in ("user", "developer"):
            text = USER + (m["_text"] if "_text" in m else _content_text(m.get("content"), f"messages[{i}]"))
        elif role == "latest_reminder":
            text = LATEST_REMINDER + _content_text(m.get("content"), f"messages[{i}]")
        else:  # assistant
            keep_reasoning = thinking and (not drop or i > last_user)
            text = ""
            if keep_reasoning:
                text += (m.get("reasoning_content") or "") + THINK_END
            text += _content_text(m.get("content"), f"messages[{i}]")
            if m.get("tool_calls"):
                text += render_tool_calls(m["tool_calls"])
            text += EOS
        if role in ("system", "developer"):
            if m.get("tools"):
                text += "\n\n" + render_tools(m["tools"])
            if m.get("response_format") is not None:
                text += "\n\n" + RESPONSE_FORMAT_TEMPLATE.format(schema=_dumps(m["response_format"]))
        if role in ("user", "developer"):
            nxt = merged[i + 1]["role"] if i + 1 < len(merged) else None
            if nxt in (None, "assistant", "latest_reminder"):
                opens_thinking = thinking and (not drop or i >= last_user)
                text += ASSISTANT + (THINK_START if opens_thinking else THINK_END)
        if i >= n_ctx:
            parts.append(text)
    return "".join(parts)
