"""Generated token ids -> text deltas: incremental, UTF-8 safe, and cut at stop strings.

    python -m pytest -q tests/unit/test_serve_text.py

Decoding a token alone loses context (SentencePiece drops the leading space, byte-level BPE can
split a character across tokens), so each delta is the difference between decoding a short
window with and without the new token, and a delta ending in U+FFFD waits for the next token.
Text that could be the start of a stop string is held back until it is known not to be one, so
a stream never shows part of a stop string.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

PROMPT_CONTEXT_TOKENS = 5


class TextAssembler:
    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt_ids: list[int],
        stop: list[str] | None = None,
        incremental: bool = True,
    ) -> None:
        """`incremental=False` (no stop strings, nobody watching the text grow) decodes once,
        in flush(): it keeps the per-token tokenizer calls off the replica's event loop."""
        self.tokenizer = tokenizer
        # A few prompt tokens give the first generated token its context (e.g. a leading space).
        self.ids = list(prompt_ids[-PROMPT_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.stops = list(stop or [])
        self.pending = ""
        self.text = ""
        self.stopped = False
        self.incremental = incremental or bool(self.stops)

    def add(self, token_id: int) -> str:
        """Append one generated token; return the text that became visible (maybe "")."""
        if self.stopped:
            return ""
        self.ids.append(token_id)
        if not self.incremental:
            return ""
        before = self._decode(self.ids[self.prefix_offset : self.read_offset])
        after = self._decode(self.ids[self.prefix_offset :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return self._release(after[len(before) :])

    def flush(self) -> str:
        """At the end of generation: all text still held back, an incomplete character too
        (none after a stop string matched)."""
        if self.stopped:
            return ""
        before = self._decode(self.ids[self.prefix_offset : self.read_offset])
        after = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        out = self._release(after[len(before) :]) if len(after) > len(before) else ""
        if not self.stopped:
            out += self.pending
            self.text += self.pending
        self.pending = ""
        return out

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _release(self, delta: str) -> str:
        self.pending += delta
        cut = self._first_stop()
        if cut is not None:
            self.stopped = True
            out, self.pending = self.pending[:cut], ""
        else:
            keep = self._partial_stop_length()
            out = self.pending[: len(self.pending) - keep]
            self.pending = self.pending[len(out) :]
        self.text += out
        return out

    def _first_stop(self) -> int | None:
        found = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        return min(found) if found else None

    def _partial_stop_length(self) -> int:
        """Length of the longest tail of `pending` that begins some stop string."""
        longest = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(self.pending)), longest, -1):
                if self.pending.endswith(stop[:size]):
                    longest = size
                    break
        return longest
