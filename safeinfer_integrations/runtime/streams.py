"""Streams of one generation's text pieces, sync and async. Every streaming path of the package (the
engine's ``stream``/``astream``, both adapters) goes through these two classes.

`GenerationStream` runs the decode loop step by step as it is read; ``generation`` holds the result once
the stream is exhausted, and ``close()`` stops generation at once (hooks removed before it returns).

`AsyncGenerationStream` computes each step in a worker thread, so an event loop is never blocked. A caller
cancelled mid-step leaves that step to finish in its thread (it cannot be interrupted), and ``aclose()``
waits for it before closing the stream.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

from .generation import Generation


class GenerationStream:
    """Iterator of text pieces for one input; ``generation`` holds the result once exhausted.

    ``close()`` (or leaving a ``with`` block, or dropping the iterator) stops generation at once."""

    def __init__(self, events: Iterator[tuple[int, str]], build: Callable[[], Generation]) -> None:
        self._events = events
        self._build = build
        self.generation: Generation | None = None

    def __iter__(self) -> GenerationStream:
        return self

    def __next__(self) -> str:
        for _row, piece in self._events:
            if piece:
                return piece
        if self.generation is None:
            self.generation = self._build()
        raise StopIteration

    def close(self) -> None:
        """Stop generation; ``generation`` then holds what was generated (finish reason ``cancelled`` when the
        stream was closed before its end)."""
        self._events.close()  # type: ignore[attr-defined]
        if self.generation is None:
            self.generation = self._build()

    def __enter__(self) -> GenerationStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncGenerationStream:
    """Async twin of `GenerationStream`: each step runs in a worker thread, so the event loop never blocks.

    ``async for piece in stream`` yields the pieces; ``generation`` holds the result once exhausted;
    ``aclose()`` (or leaving ``async with``, or the consumer's ``async for`` being cancelled) stops
    generation."""

    _DONE = object()

    def __init__(self, stream: GenerationStream) -> None:
        self._stream = stream
        self._pending: asyncio.Future[Any] | None = None

    @property
    def generation(self) -> Generation | None:
        return self._stream.generation

    def __aiter__(self) -> AsyncGenerationStream:
        return self

    async def __anext__(self) -> str:
        self._pending = asyncio.get_running_loop().run_in_executor(None, next, self._stream, self._DONE)
        piece = await asyncio.shield(self._pending)  # a cancelled caller leaves the step to finish
        self._pending = None
        if piece is self._DONE:
            raise StopAsyncIteration
        return piece  # type: ignore[no-any-return]

    async def aclose(self) -> None:
        """Stop generation (hooks are removed before this returns). If a step is still running in its
        worker thread (the caller was cancelled mid-step), it is let finish first."""
        if self._pending is not None and not self._pending.done():
            await asyncio.wait([self._pending])
        self._pending = None
        self._stream.close()

    async def __aenter__(self) -> AsyncGenerationStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @classmethod
    async def open(cls, start: Callable[[], GenerationStream]) -> AsyncGenerationStream:
        """Build the stream in a worker thread (prompt encoding can take a while), then wrap it. Bad input
        raises here."""
        return cls(await asyncio.to_thread(start))
