"""Field checks shared by the APIs: typed getters whose errors name the field, sampling
parameters, and the mapping of each API's reasoning switches onto the model's three modes."""

from __future__ import annotations

from ..sampling import SamplingError, SamplingParams
from .errors import RequestError

_NAMES = {int: "an integer", float: "a number", str: "a string", list: "an array", dict: "an object",
          bool: "a boolean"}


def get(body: dict, key: str, kinds, default=None, where: str = ""):
    """body[key] if present and not null, checked against `kinds` (bool is not an int; int is a number)."""
    v = body.get(key)
    if v is None:
        return default
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    ok = isinstance(v, kinds) and not (isinstance(v, bool) and bool not in kinds)
    if float in kinds and isinstance(v, int) and not isinstance(v, bool):
        ok = True
    if not ok:
        raise RequestError(f"{where}{key} must be {' or '.join(_NAMES.get(k, k.__name__) for k in kinds)}, "
                           f"got {type(v).__name__}", param=key)
    return v


def in_range(name: str, v, lo, hi, lo_open: bool = False):
    if v is None:
        return None
    if not ((lo < v if lo_open else lo <= v) and v <= hi):
        raise RequestError(f"{name} must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}", param=name)
    return v


def sampling(body: dict, *, max_keys: tuple[str, ...], limit: int, default_max: int,
             max_temperature: float = 2.0, default_temperature: float = 1.0) -> dict:
    """Keyword arguments for stream_generate from the body's sampling fields."""
    n, key = None, max_keys[0]
    for k in max_keys:
        if body.get(k) is not None:
            n, key = get(body, k, int), k
            break
    if n is not None:
        in_range(key, n, 1, limit)
    try:  # the rules are generation's (sampling.py); the API caps temperature and the penalty
        sp = SamplingParams(float(get(body, "temperature", float, default_temperature)),
                            float(get(body, "top_p", float, 1.0)), get(body, "top_k", int, 0),
                            float(get(body, "min_p", float, 0.0)), get(body, "repetition_penalty", float),
                            get(body, "seed", int)).check(max_temperature, max_repetition_penalty=10.0)
    except SamplingError as e:
        raise RequestError(str(e), param=e.field) from None
    stop_key = "stop_sequences" if "stop_sequences" in body else "stop"
    stop = body.get(stop_key)
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop)
                             or len(stop) > 16):
        raise RequestError(f"{stop_key} must be a non-empty string or an array of at most 16 of them",
                           param=stop_key)
    return {"max_tokens": n if n is not None else default_max, **sp.kwargs(), "stop": stop or None}


# DeepSeek's API: "none" turns thinking off; low / medium / high think at the standard ("high")
# effort; xhigh / max add the maximum-effort instruction. ("minimal" is OpenAI's smallest
# reasoning setting: it still asks for reasoning, so it thinks at the standard effort.)
EFFORTS = {"none": ("chat", None), "minimal": ("thinking", "high"), "low": ("thinking", "high"),
           "medium": ("thinking", "high"), "high": ("thinking", "high"), "xhigh": ("thinking", "max"),
           "max": ("thinking", "max")}


def reasoning(thinking: str | None, effort: str | None, default_thinking: bool, effort_field: str,
              effort_enables: bool = True) -> tuple:
    """(thinking_mode, reasoning_effort) for encode_messages.

    thinking: "enabled" / "disabled" / None (not given); effort: one of EFFORTS or None.
    An explicit thinking switch wins over the effort; the effort then only picks high or max.
    Without a switch the effort decides (effort_enables) or the server default does."""
    if effort is not None and effort not in EFFORTS:
        raise RequestError(f"{effort_field} must be one of {list(EFFORTS)}, got {effort!r}", param=effort_field)
    if thinking is None and effort is not None and effort_enables:
        return EFFORTS[effort]
    if thinking == "disabled" or (thinking is None and not default_thinking):
        return "chat", None
    return "thinking", "max" if effort is not None and EFFORTS[effort][1] == "max" else "high"


_TEXT_PARTS = ("text", "input_text", "output_text")
_MEDIA_PARTS = ("image_url", "input_image", "image", "input_audio", "file", "input_file", "document")


def content(value, where: str):
    """A message's content for encode_messages: a string, or a list of text blocks (the encoder joins
    them with blank lines). Media parts become the encoder's "[Unsupported <type>]" placeholder, as the
    official encoder renders them in tool results: the model reads text only."""
    if value is None or isinstance(value, str):
        return value or ""
    if not isinstance(value, list):
        raise RequestError(f"{where} must be a string or an array of content parts, got {type(value).__name__}")
    out = []
    for j, part in enumerate(value):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in _TEXT_PARTS or kind == "refusal":
            text = part.get("refusal" if kind == "refusal" else "text")
            if not isinstance(text, str):
                raise RequestError(f"{where}[{j}].{'refusal' if kind == 'refusal' else 'text'} must be a string")
            out.append({"type": "text", "text": text})
        elif kind in _MEDIA_PARTS:
            out.append({"type": kind})
        else:
            raise RequestError(f"{where}[{j}]: unsupported content part type {kind!r}")
    return out


def attach_tools(messages: list[dict], tools: list[dict], response_format: dict | None = None) -> list[dict]:
    """Tools (and a response format) go on the first system message, as the encoder expects."""
    if not tools and response_format is None:
        return messages
    if not messages or messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": ""})
    if tools:
        messages[0]["tools"] = tools
    if response_format is not None:
        messages[0]["response_format"] = response_format
    return messages
