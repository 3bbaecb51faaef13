"""Wrappers around any serving engine: a deadline (`with_timeout`) and micro-batching for blocking ones.

`with_timeout` turns an engine's slowness into `EngineTimeout` and its other exceptions into `EngineFailure`,
so the detector can answer 503 and count them apart. `MicroBatcher` lets a blocking batch function (ms-swift's
transformers engine) serve concurrent callers: continuous batching as far as such an engine can.
`close_engine` releases any engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from teleguard.engines.contract import (
    EngineError,
    EngineFailure,
    EngineRequest,
    EngineTimeout,
    Generate,
    Generation,
)

# --- a deadline on any engine --------------------------------------------------------------------------------


def with_timeout(generate: Generate, timeout_s: float) -> Generate:
    """`generate` with a deadline: EngineTimeout after `timeout_s`; any other exception becomes EngineFailure."""

    async def timed(requests: Sequence[EngineRequest]) -> Sequence[str | Generation]:
        try:
            return await asyncio.wait_for(generate(requests), timeout_s)
        except EngineError:
            raise
        except TimeoutError:
            raise EngineTimeout(
                f"the engine did not answer {len(requests)} request(s) within {timeout_s:g} s"
            ) from None
        except asyncio.CancelledError:
            raise
        except Exception as err:
            raise EngineFailure(f"the engine failed: {type(err).__name__}: {err}") from err

    return timed


# --- micro-batching for blocking engines ---------------------------------------------------------------------


@dataclass
class _Pending:
    request: EngineRequest
    future: asyncio.Future[Generation]
    queued_at: float = field(default_factory=time.perf_counter)


BatchFn = Callable[[list[EngineRequest]], list[Generation]]


class MicroBatcher:
    """Runs a blocking batch function on one worker thread, batching the requests of concurrent callers.

    A batch starts when the first request arrives and collects further requests for up to `wait_ms` or until
    `max_batch_size` are there, then one call of `batch_fn` answers them all. While a batch runs, new requests
    queue for the next one. A caller that gives up (a timeout cancels its await) does not stop the batch; its
    answer is dropped. `batches` records the size of each batch run (for tests and logs).
    """

    def __init__(self, batch_fn: BatchFn, *, max_batch_size: int = 8, wait_ms: float = 5.0) -> None:
        self.batch_fn = batch_fn
        self.max_batch_size = max_batch_size
        self.wait_s = wait_ms / 1000
        self.batches: list[int] = []
        self._queue: asyncio.Queue[_Pending] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="teleguard-engine")
        self._closed = False

    async def generate(self, requests: Sequence[EngineRequest]) -> list[Generation]:
        if self._closed:
            raise EngineFailure("the engine is shut down")
        loop = asyncio.get_running_loop()
        if self._queue is None or self._worker is None or self._worker.done():
            self._queue = asyncio.Queue()
            self._worker = loop.create_task(self._run(), name="teleguard-micro-batcher")
        pending = [_Pending(r, loop.create_future()) for r in requests]
        for item in pending:
            self._queue.put_nowait(item)
        return list(await asyncio.gather(*(p.future for p in pending)))

    __call__ = generate

    async def _run(self) -> None:
        assert self._queue is not None
        queue = self._queue
        loop = asyncio.get_running_loop()
        while True:
            batch = [await queue.get()]
            deadline = loop.time() + self.wait_s
            while len(batch) < self.max_batch_size:
                timeout = deadline - loop.time()
                if timeout <= 0 and queue.empty():
                    break
                try:
                    batch.append(
                        queue.get_nowait() if timeout <= 0 else await asyncio.wait_for(queue.get(), timeout)
                    )
                except (TimeoutError, asyncio.QueueEmpty):
                    break
            live = [p for p in batch if not p.future.done()]  # a caller that timed out is not asked about
            if not live:
                continue
            self.batches.append(len(live))
            try:
                answers = await loop.run_in_executor(self._executor, self.batch_fn, [p.request for p in live])
                if len(answers) != len(live):
                    raise EngineFailure(
                        f"the engine returned {len(answers)} answers for {len(live)} requests"
                    )
            except Exception as err:  # one failed batch fails its callers, not the batcher
                failure = (
                    err if isinstance(err, EngineError) else EngineFailure(f"{type(err).__name__}: {err}")
                )
                for p in live:
                    if not p.future.done():
                        p.future.set_exception(failure)
                continue
            for p, answer in zip(live, answers, strict=True):
                if not p.future.done():
                    p.future.set_result(answer)

    async def aclose(self) -> None:
        self._closed = True
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._worker
        self._executor.shutdown(wait=False, cancel_futures=True)


async def close_engine(engine: Generate | Any) -> None:
    """Release an engine's resources, whatever kind it is (engines without `aclose` need nothing)."""
    close = getattr(engine, "aclose", None)
    if close is None:
        return
    result = close()
    if isinstance(result, Awaitable):
        await result
