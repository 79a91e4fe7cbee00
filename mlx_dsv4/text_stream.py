"""Text out of a token stream: an incremental byte-level detokenizer and stop-string holding.

The detokenizer maps each id to its bytes (byte-level BPE: vocabulary strings through the GPT-2
byte alphabet; added tokens by their literal content) and decodes them with an incremental UTF-8
decoder, so a character split over several tokens is emitted once it is complete and the
concatenation of all pieces equals `tokenizer.decode(ids)`. (mlx-lm's streaming detokenizer drops
a leading space, which breaks that equality.) Tokenizers that are not byte-level fall back to
mlx-lm's `tokenizer.detokenizer`.
"""

from __future__ import annotations

import codecs
import weakref


def _byte_alphabet() -> dict[str, int]:
    """The GPT-2 byte -> printable character table, inverted: printable Latin-1 bytes stand for
    themselves, the rest (controls, space, a few others) take code points 256, 257, ... in order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    kept = set(keep)
    table = {chr(b): b for b in keep}
    extra = 0
    for b in range(256):
        if b not in kept:
            table[chr(256 + extra)] = b
            extra += 1
    return table


_UNI2BYTE = _byte_alphabet()
_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _ByteTable:
    """id -> bytes for one tokenizer, filled lazily (only ids that are actually generated)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.added = {i: t.content.encode("utf-8") for i, t in tokenizer.added_tokens_decoder.items()}
        self.cache: dict[int, bytes] = {}

    def __call__(self, i: int) -> bytes:
        b = self.cache.get(i)
        if b is None:
            b = self.added.get(i)
            if b is None:
                piece = self.tokenizer.convert_ids_to_tokens(i)
                b = bytes(_UNI2BYTE[c] for c in piece) if piece else b""
            self.cache[i] = b
        return b


def _byte_table(tokenizer) -> _ByteTable | None:
    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    try:
        table = _TABLES.get(hf)
    except TypeError:
        table = None
    if table is None:
        try:
            decoder = hf.backend_tokenizer.decoder
            if type(decoder).__name__ != "ByteLevel":
                return None
            table = _ByteTable(hf)
        except AttributeError:
            return None
        try:
            _TABLES[hf] = table
        except TypeError:
            pass
    return table


class Detokenizer:
    """add(id) -> newly complete text; finish() -> whatever is left (invalid bytes as U+FFFD)."""

    def __init__(self, tokenizer):
        self._bytes = _byte_table(tokenizer)
        if self._bytes is not None:
            self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        else:
            self._fallback = tokenizer.detokenizer

    def add(self, token: int) -> str:
        if self._bytes is not None:
            try:
                return self._utf8.decode(self._bytes(token))
            except KeyError:  # a piece outside the byte alphabet: not byte-level after all
                raise ValueError(f"token {token} is not a byte-level piece; unsupported tokenizer") from None
        self._fallback.add_token(token)
        return self._fallback.last_segment

    def finish(self) -> str:
        if self._bytes is not None:
            return self._utf8.decode(b"", final=True)
        self._fallback.finalize()
        return self._fallback.last_segment


class StopStrings:
    """Holds back text that could still become a stop string.

    feed(text) -> (safe text, hit): safe text never contains a stop string nor ends with a proper
    prefix of one; on a hit it ends right before the earliest stop string. flush() releases the
    held text once the stream ends without a hit."""

    def __init__(self, stops: list[str] | None):
        self.stops = [s for s in (stops or []) if s]
        self.held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        if not self.stops:
            return text, False
        buf = self.held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return buf[: min(hits)], True
        keep = 0  # longest suffix of buf that is a proper prefix of some stop string
        for s in self.stops:
            for n in range(min(len(s) - 1, len(buf)), keep, -1):
                if buf.endswith(s[:n]):
                    keep = n
                    break
        self.held = buf[len(buf) - keep :]
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out
