"""`ForwardPasses`: when each forward pass of a model begins (optionally slowed down), for the tests that check
how much work a cancelled or timed-out call still does."""

from __future__ import annotations

import time
from typing import Any


class ForwardPasses:
    """A forward pre-hook that records when each pass of ``model`` begins and then waits ``delay`` seconds (so a
    tiny model's passes take as long as a real one's). ``handle.remove()`` takes it off."""

    def __init__(self, model: Any, delay: float = 0.0) -> None:
        self.starts: list[float] = []
        self.delay = delay
        self.handle = model.register_forward_pre_hook(self._hook)

    def _hook(self, *_args: Any) -> None:
        self.starts.append(time.monotonic())
        if self.delay:
            time.sleep(self.delay)

    def after(self, moment: float) -> int:
        """How many passes began after ``moment`` (a ``time.monotonic()`` reading)."""
        return sum(start > moment for start in self.starts)
