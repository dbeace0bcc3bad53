"""Incremental detokenization with stop strings: the rule shared by generate and stream.

The rule: the completion's text is the decoded generated tokens (special tokens skipped), cut just before
the first occurrence of any stop string; the stop string itself is not returned, and generation ends with
``finish_reason="stop_sequence"`` at the token that completed it. A stop string may span several tokens.
While streaming, text that could still be the start of a stop string, or that ends in an incomplete
UTF-8 character, is held back until it is decided, so the joined pieces always equal the final text.
"""

from __future__ import annotations

from typing import Any

_REPLACEMENT = "\ufffd"


class TextTracker:
    """Tracks one row's generated tokens, its decided text and whether a stop string ended it."""

    def __init__(self, tokenizer: Any, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.token_ids: list[int] = []
        self.emitted = 0  # characters of text already handed out
        self._text = ""
        self.stopped = False

    @property
    def text(self) -> str:
        """The text decided so far (all of it once generation has ended)."""
        return self._text

    def _decode(self) -> str:
        return str(self.tokenizer.decode(self.token_ids, skip_special_tokens=True))

    def _held_back(self, text: str) -> int:
        """How many trailing characters might still turn into a stop string or a complete character."""
        held = len(text) - len(text.rstrip(_REPLACEMENT))
        stem = text[: len(text) - held]
        longest = 0
        for stop in self.stop:
            for size in range(min(len(stop) - 1, len(stem)), longest, -1):
                if stem.endswith(stop[:size]):
                    longest = size
                    break
        return held + longest

    def push(self, token_id: int) -> str:
        """Add one generated token; return the newly decided text (may be empty)."""
        self.token_ids.append(token_id)
        text = self._decode()
        if self.stop:
            cuts = [index for index in (text.find(s) for s in self.stop) if index >= 0]
            if cuts:
                text = text[: min(cuts)]
                self.stopped = True
                self._text = text
                return self._take(len(text))
        self._text = text
        return self._take(len(text) - self._held_back(text))

    def finish(self) -> str:
        """Generation ended: hand out whatever is still held back."""
        return self._take(len(self._text))

    def _take(self, end: int) -> str:
        if end <= self.emitted:
            return ""
        piece = self._text[self.emitted : end]
        self.emitted = end
        return piece
