"""Real batching for ``batch()``/``abatch()``: the ``_generate`` calls of one batch meet here and run as one
engine batch (LangChain's default runs ``invoke`` in a thread pool, one generation each)."""

from __future__ import annotations

import asyncio
import contextvars
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..runtime.engine import SafeInferEngine
from ..runtime.generation import Generation


@dataclass
class Request:
    """One ``_generate`` call waiting to join a batch."""

    engine: SafeInferEngine
    prompt: Any
    tools: list[dict[str, Any]] | None
    settings: dict[str, Any]
    result: Generation | None = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)
    future: Any = None  # asyncio.Future in the async collector

    def key(self) -> tuple[Any, ...]:
        settings = json.dumps(self.settings, sort_keys=True, default=str)
        return (id(self.engine), settings, json.dumps(self.tools, sort_keys=True, default=str))


def _groups(requests: list[Request]) -> list[list[Request]]:
    groups: dict[tuple[Any, ...], list[Request]] = {}
    for request in requests:
        groups.setdefault(request.key(), []).append(request)
    return list(groups.values())


class BatchCollector:
    """Makes the ``_generate`` calls of one ``batch()`` meet and run as one engine batch.

    ``batch`` runs each input's ``invoke`` concurrently (each is its own run for callbacks and tracing);
    their ``_generate`` calls wait here until every input has either arrived or finished without generating
    (a cache hit, a streamed call, an error), then requests with the same settings run as one
    ``engine.generate`` batch. Each input joins at most once: later calls from the same input (an agent
    step, say) run on their own."""

    def __init__(self, owner: object, size: int) -> None:
        self.owner = owner
        self.expected = size  # inputs that have not yet finished without arriving
        self.arrived: set[int] = set()
        self.finished: set[int] = set()
        self.waiting: list[Request] = []
        self.spent = False
        self._lock = threading.Lock()

    def can_join(self, owner: object, slot: int) -> bool:
        with self._lock:
            return owner is self.owner and not self.spent and slot not in self.arrived

    # -------------------------------------------------------------- sync
    def submit(self, slot: int, request: Request) -> Generation:
        with self._lock:
            self.arrived.add(slot)
            self.waiting.append(request)
            ready = self._take_if_ready()
        if ready:
            self._run(ready)
        request.done.wait()
        if request.error is not None:
            raise request.error
        assert request.result is not None  # noqa: S101 (set together with done)
        return request.result

    def leave(self, slot: int) -> None:
        """Input ``slot`` finished; if it never arrived, stop waiting for it."""
        with self._lock:
            if slot in self.arrived or slot in self.finished:
                return
            self.finished.add(slot)
            self.expected -= 1
            ready = self._take_if_ready()
        if ready:
            self._run(ready)

    def _take_if_ready(self) -> list[Request]:
        if self.spent or not self.waiting or len(self.waiting) < self.expected:
            return []
        self.spent = True
        ready, self.waiting = self.waiting, []
        return ready

    @staticmethod
    def _run(requests: list[Request]) -> None:
        for group in _groups(requests):
            first = group[0]
            try:
                results = first.engine.generate([r.prompt for r in group], tools=first.tools, **first.settings)
                for request, result in zip(group, results):
                    request.result = result
            except BaseException as error:  # every caller of the group sees the error
                for request in group:
                    request.error = error
            finally:
                for request in group:
                    request.done.set()

    # -------------------------------------------------------------- async (one event loop)
    async def asubmit(self, slot: int, request: Request) -> Generation:
        request.future = asyncio.get_running_loop().create_future()
        with self._lock:
            self.arrived.add(slot)
            self.waiting.append(request)
            ready = self._take_if_ready()
        if ready:
            await self._arun(ready)
        return await request.future  # type: ignore[no-any-return]

    async def aleave(self, slot: int) -> None:
        with self._lock:
            if slot in self.arrived or slot in self.finished:
                return
            self.finished.add(slot)
            self.expected -= 1
            ready = self._take_if_ready()
        if ready:
            await self._arun(ready)

    @staticmethod
    async def _arun(requests: list[Request]) -> None:
        for group in _groups(requests):
            first = group[0]
            try:
                results = await first.engine.agenerate([r.prompt for r in group], tools=first.tools, **first.settings)
                for request, result in zip(group, results):
                    if not request.future.done():
                        request.future.set_result(result)
            except BaseException as error:
                for request in group:
                    if not request.future.done():
                        request.future.set_exception(error)


BATCH: contextvars.ContextVar[tuple[BatchCollector, int] | None] = contextvars.ContextVar(
    "safeinfer_langchain_batch", default=None
)


def run_batch_sync(owner: object, count: int, run_one: Callable[[int], Any], max_workers: int) -> list[Any]:
    """Run ``run_one(i)`` for every input in threads, with a collector so their generations batch."""
    from concurrent.futures import ThreadPoolExecutor

    collector = BatchCollector(owner, count)

    def task(index: int) -> Any:
        token = BATCH.set((collector, index))
        try:
            return run_one(index)
        finally:
            BATCH.reset(token)
            collector.leave(index)

    with ThreadPoolExecutor(max_workers=max_workers) as pool:
        futures = [pool.submit(contextvars.copy_context().run, task, index) for index in range(count)]
        return [future.result() for future in futures]


async def run_batch_async(owner: object, count: int, run_one: Callable[[int], Any]) -> list[Any]:
    collector = BatchCollector(owner, count)

    async def task(index: int) -> Any:
        token = BATCH.set((collector, index))
        try:
            return await run_one(index)
        finally:
            BATCH.reset(token)
            await collector.aleave(index)

    return list(await asyncio.gather(*(task(index) for index in range(count))))
