"""encode_messages: OpenAI-style messages -> the exact DeepSeek-V4 prompt string.

Reproduces DeepSeek's official encoder byte for byte (checked against golden vectors it produced).
Three reasoning modes: "chat" (the answer starts after `<｜Assistant｜></think>`), "thinking"
(after `<｜Assistant｜><think>`), and "thinking" with reasoning_effort "max" (a fixed paragraph
right after BOS). Tool calls use the DSML block; tool results fold into the next user turn.

`encode_segments` returns the same prompt as (text, is_template) segments: the template's own
pieces, whose marker strings are control tokens, and the request's text (message contents, tool
names, arguments, schemas), which a tokenizer must read as plain text (tokenizer.PromptTokenizer),
so that a fetched web page cannot fake a turn, an EOS or a tool call.
"""

from __future__ import annotations

import json

from .tokens import (
    ASSISTANT,
    BOS,
    DSML,
    EOS,
    LATEST_REMINDER,
    TASK_TOKENS,
    THINK_END,
    THINK_START,
    TOOL_CALLS_END,
    TOOL_CALLS_START,
    USER,
)

ROLES = ("system", "user", "assistant", "tool", "developer", "latest_reminder")
THINKING_MODES = ("chat", "thinking")
REASONING_EFFORTS = (None, "high", "max")
USER_TASKS = ("action", "query", "authority", "domain", "read_url")  # "title" goes on an assistant turn

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

RESPONSE_FORMAT_TEMPLATE = "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"


def _dumps(v) -> str:
    # Python's json defaults are part of the format: ", " / ": " separators, 2.5, 1e-07, exact big ints.
    return json.dumps(v, ensure_ascii=False)


Segment = tuple[str, bool]  # (text, is_template)
_HEAD, _TAIL = TOOLS_TEMPLATE.split("{schemas}")


def _join(segments: list[Segment]) -> str:
    return "".join(text for text, _ in segments)


def render_tools(tools: list, where: str = "tools") -> str:
    """The "## Tools" block: the fixed instructions plus one JSON schema (the function object) a line."""
    return _join(_tools_segments(tools, where))


def _tools_segments(tools: list, where: str = "tools") -> list[Segment]:
    if not isinstance(tools, list):
        raise ValueError(f"{where} must be a list, got {type(tools).__name__}")
    schemas = []
    for i, t in enumerate(tools):
        fn = t.get("function", t) if isinstance(t, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ValueError(f"{where}[{i}] must be a function schema with a 'name', got {t!r}")
        schemas.append(_dumps(fn))
    return [(_HEAD, True), ("\n".join(schemas), False), (_TAIL, True)]


def _call_arguments(raw, where: str) -> dict:
    """The arguments object of one call; text that is not JSON becomes one string parameter."""
    if isinstance(raw, dict):
        return raw
    if not isinstance(raw, str):
        raise ValueError(f"{where}.function.arguments must be a JSON string, got {type(raw).__name__}")
    try:
        args = json.loads(raw)
    except json.JSONDecodeError:
        return {"arguments": raw}
    if not isinstance(args, dict):
        raise ValueError(f"{where}.function.arguments must encode a JSON object, got {raw!r}")
    return args


def render_tool_calls(tool_calls: list, where: str = "tool_calls") -> str:
    """The DSML block an assistant turn writes for its calls (from "\\n\\n<｜DSML｜tool_calls>" on)."""
    return _join(_tool_calls_segments(tool_calls, where))


def _tool_calls_segments(tool_calls: list, where: str = "tool_calls") -> list[Segment]:
    if not isinstance(tool_calls, list):
        raise ValueError(f"{where} must be a list, got {type(tool_calls).__name__}")
    out: list[Segment] = [(TOOL_CALLS_START, True)]
    for i, call in enumerate(tool_calls):
        w = f"{where}[{i}]"
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ValueError(f"{w} needs function.name: expected {{'type': 'function', 'function': "
                             f"{{'name': str, 'arguments': JSON str}}}}, got {call!r}")
        if call.get("type", "function") != "function":
            raise ValueError(f"{w}: unsupported tool call type {call['type']!r}")
        if i:
            out.append(("\n", True))
        out += [(f'<{DSML}invoke name="', True), (fn["name"], False), ('">\n', True)]
        for j, (k, v) in enumerate(_call_arguments(fn.get("arguments", "{}"), w).items()):
            kind, text = ("true", v) if isinstance(v, str) else ("false", _dumps(v))
            out += [("\n" if j else "", True), (f'<{DSML}parameter name="', True), (str(k), False),
                    (f'" string="{kind}">', True), (text, False), (f"</{DSML}parameter>", True)]
        # A call without arguments still gets its (empty) parameter line.
        out.append((f"\n</{DSML}invoke>", True))
    return out + [(TOOL_CALLS_END, True)]


def _text(content, where: str) -> str:
    """Message content as text: a string, or a list of blocks whose non-text parts become placeholders."""
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise ValueError(f"{where}.content must be a string or a list of blocks, got {type(content).__name__}")
    parts = []
    for j, block in enumerate(content):
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, dict) and block.get("type") == "text" and isinstance(block.get("text"), str):
            parts.append(block["text"])
        elif isinstance(block, dict) and isinstance(block.get("type"), str):
            parts.append(f"[Unsupported {block['type']}]")
        else:
            raise ValueError(f"{where}.content[{j}] must be a string or a block with a 'type', got {block!r}")
    return "\n\n".join(parts)


def _validate(messages, where: str) -> None:
    if not isinstance(messages, list):
        raise ValueError(f"{where} must be a list of messages, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        w = f"{where}[{i}]"
        if not isinstance(m, dict) or "role" not in m:
            raise ValueError(f"{w} must be an object with a 'role'")
        role = m["role"]
        if role not in ROLES:
            raise ValueError(f"{w}: unknown role {role!r}; expected one of {ROLES}")
        if role == "developer" and m.get("content") is None:
            raise ValueError(f"{w}: a developer message needs content")
        if role != "assistant" and m.get("tool_calls"):
            raise ValueError(f"{w}: only assistant messages carry tool_calls, not {role!r}")
        if role == "assistant" and m.get("tool_calls") is not None:
            render_tool_calls(m["tool_calls"], f"{w}.tool_calls")  # validates every call
        if m.get("tools"):
            render_tools(m["tools"], f"{w}.tools")
        if not isinstance(m.get("reasoning_content") or "", str):
            raise ValueError(f"{w}.reasoning_content must be a string")
        task = m.get("task")
        allowed = ("title",) if role == "assistant" else USER_TASKS if role == "user" else ()
        if task is not None and task not in allowed:
            raise ValueError(f"{w}: task {task!r} is not valid on a {role} message; expected one of {allowed}")
        _text(m.get("content"), w)


def _turns(messages: list[dict]) -> list[dict]:
    """Group messages into rendered turns. Tool results become user turns; consecutive user turns
    merge; within a turn, tool results follow the order of the preceding assistant's calls.
    Each turn records the span of message indices it came from."""
    turns: list[dict] = []
    call_order: list = []
    for i, m in enumerate(messages):
        role = m["role"]
        if role == "assistant":
            call_order = [c.get("id") for c in m.get("tool_calls") or []]
        if role not in ("user", "tool"):
            turns.append({"role": role, "msg": m, "first": i, "last": i})
            continue
        if turns and turns[-1]["role"] == "user":
            turn = turns[-1]
        else:
            turn = {"role": "user", "parts": [], "task": None, "order": call_order, "first": i}
            turns.append(turn)
        text = _text(m.get("content"), f"messages[{i}]")
        if role == "tool":
            turn["parts"].append(("result", m.get("tool_call_id"),
                                  [("<tool_result>", True), (text, False), ("</tool_result>", True)]))
        else:
            turn["parts"].append(("text", None, [(text, False)]))
            turn["task"] = m.get("task") or turn["task"]
        turn["last"] = i
    for t in turns:
        if t["role"] == "user":
            rank = {cid: k for k, cid in enumerate(t.pop("order"))}
            results = sorted((p for p in t["parts"] if p[0] == "result"), key=lambda p: rank.get(p[1], len(rank)))
            it = iter(results)  # results take the slots results held, in call order
            t["segments"] = [seg for k, p in enumerate(t["parts"])
                             for seg in [("\n\n", True)] * (k > 0) + (next(it)[2] if p[0] == "result" else p[2])]
    return turns


def encode_messages(messages: list[dict], thinking_mode: str = "chat", reasoning_effort: str | None = None,
                    drop_thinking: bool = True, context: list[dict] | None = None,
                    add_default_bos_token: bool = True) -> str:
    """The prompt string (special tokens as text; tokenize it with add_special_tokens=False).

    `context`: earlier messages of the same conversation, already encoded. They shape this
    rendering (tool-call order, which turn is the last user turn) but are not emitted again, and
    no BOS is added. A message may not continue a turn that started in the context.
    """
    return _join(encode_segments(messages, thinking_mode, reasoning_effort, drop_thinking, context,
                                 add_default_bos_token))


def encode_segments(messages: list[dict], thinking_mode: str = "chat", reasoning_effort: str | None = None,
                    drop_thinking: bool = True, context: list[dict] | None = None,
                    add_default_bos_token: bool = True) -> list[Segment]:
    """encode_messages' prompt as (text, is_template) segments, in order; their texts join to it."""
    if thinking_mode not in THINKING_MODES:
        raise ValueError(f"thinking_mode must be one of {THINKING_MODES}, got {thinking_mode!r}")
    if reasoning_effort not in REASONING_EFFORTS:
        raise ValueError(f"reasoning_effort must be one of {REASONING_EFFORTS}, got {reasoning_effort!r}")
    context = context or []
    _validate(context, "context")
    _validate(messages, "messages")
    full = context + messages
    thinking = thinking_mode == "thinking"
    if any(m.get("tools") for m in full):
        drop_thinking = False  # tool-using conversations keep every turn's reasoning
    drop = thinking and drop_thinking

    turns = _turns(full)
    n_ctx = len(context)
    if any(t["first"] < n_ctx <= t["last"] for t in turns):
        raise ValueError("messages[0] continues the last turn of the context; move it into the context or "
                         "start a new turn")
    last_user = max((k for k, t in enumerate(turns) if t["role"] in ("user", "developer")), default=-1)
    if drop:  # earlier developer turns go, as if never sent (their neighbours then meet)
        turns = [t for k, t in enumerate(turns) if t["role"] != "developer" or k >= last_user]
        last_user = max((k for k, t in enumerate(turns) if t["role"] in ("user", "developer")), default=-1)

    out: list[Segment] = []
    if not context:
        out.append((BOS if add_default_bos_token else "", True))
        if thinking and reasoning_effort == "max":
            out.append((MAX_EFFORT_PREFIX, True))
    for k, t in enumerate(turns):
        role, m = t["role"], t.get("msg", {})
        if role == "system":
            segs = [(_text(m.get("content"), "system"), False)]
        elif role == "user":
            segs = [(USER, True)] + t["segments"]
        elif role == "developer":
            segs = [(USER, True), (_text(m.get("content"), "developer"), False)]
        elif role == "latest_reminder":
            segs = [(LATEST_REMINDER, True), (_text(m.get("content"), "latest_reminder"), False)]
        else:  # assistant; its <think> (if any) was written by the turn before
            segs = []
            if thinking and (not drop or k > last_user):
                segs += [(m.get("reasoning_content") or "", False), (THINK_END, True)]
            segs.append((_text(m.get("content"), "assistant"), False))
            if m.get("tool_calls"):
                segs += _tool_calls_segments(m["tool_calls"])
            segs.append((EOS, True))
            if m.get("task") == "title":
                segs.append((TASK_TOKENS["title"], True))
        if role in ("system", "developer"):
            if m.get("tools"):
                segs += [("\n\n", True)] + _tools_segments(m["tools"])
            if m.get("response_format") is not None:
                segs += [("\n\n" + RESPONSE_FORMAT_TEMPLATE, True), (_dumps(m["response_format"]), False)]
        if role in ("user", "developer"):
            task = t.get("task") if role == "user" else None
            nxt = turns[k + 1]["role"] if k + 1 < len(turns) else None
            if task in TASK_TOKENS and task != "action":
                segs.append((TASK_TOKENS[task], True))  # the classifier answers right after its token
            elif nxt in (None, "assistant", "latest_reminder"):
                opens = thinking and (not drop or k >= last_user)
                segs.append((ASSISTANT + (THINK_START if opens else THINK_END), True))
                if task == "action":
                    segs.append((TASK_TOKENS["action"], True))
        if t["first"] >= n_ctx:
            out += segs
    return [seg for seg in out if seg[0]]
