"""Dynamic batching: concurrent requests' images gathered into one model call.

A batch starts with the oldest waiting image and closes at `max_batch` images or `max_wait_s` after it
started, whichever comes first, or as soon as no other image is on its way (requests being read or decoded,
counted by `on_the_way`): a lone request does not wait for company that is not coming. It then runs on the
model's own thread while the event loop keeps accepting, decoding and queueing; requests that arrive
meanwhile form the next batch. The queue is bounded: a full one refuses at once (Overloaded), so waiting
stays bounded in time. One batch runs at a time: the model uses every core it was given.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import torch

# images (B, 3, H, W) -> (maps (B, R, R), scores (B,)): mpad.prediction.Scorer
Scorer = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class Overloaded(RuntimeError):
    """The queue is full: the caller should answer 503 and ask the client to retry later."""


@dataclass
class _Waiting:
    images: torch.Tensor  # (1, 3, H, W)
    result: asyncio.Future[tuple[torch.Tensor, float, int]]


class Batcher:
    """Runs `scorer` on batches of queued images; `await submit(image)` -> (map (R, R), score, batch size).

    Start it with `start()` inside the running event loop and stop it with `await stop()`. `batch_sizes`
    counts the batches run by size (what a test or a benchmark reads to see the batching happen); `observe`,
    when given, hears (batch size, seconds of the model call) after each batch (the service's /metrics).
    """

    def __init__(
        self,
        scorer: Scorer,
        max_batch: int,
        max_wait_s: float,
        max_queue: int,
        observe: Callable[[int, float], None] | None = None,
    ) -> None:
        if max_batch < 1 or max_wait_s < 0 or max_queue < 1:
            raise ValueError(f"max_batch {max_batch} >= 1, max_wait_s {max_wait_s} >= 0, max_queue {max_queue} >= 1")
        self.scorer, self.max_batch, self.max_wait_s, self.observe = scorer, max_batch, max_wait_s, observe
        self.queue: asyncio.Queue[_Waiting] = asyncio.Queue(max_queue)
        self.batch_sizes: dict[int, int] = {}
        self.coming = 0  # images on their way to `submit` (see `on_the_way`)
        self._model_thread = ThreadPoolExecutor(1, thread_name_prefix="mpad-model")
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="mpad-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._model_thread.shutdown(wait=True)

    @contextmanager
    def on_the_way(self) -> Iterator[None]:
        """Around the work that precedes a `submit` (decoding): while it lasts, a batch waits for this image
        (up to max_wait_s) instead of leaving without it."""
        self.coming += 1
        try:
            yield
        finally:
            self.coming -= 1

    async def run_now(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`scorer(images)` on the model's thread, outside the queue (the warm-up batch)."""
        return await asyncio.get_running_loop().run_in_executor(self._model_thread, self.scorer, images)

    async def submit(self, images: torch.Tensor) -> tuple[torch.Tensor, float, int]:
        """Queue one image (1, 3, H, W); its map (R, R), score and batch size once its batch has run. Overloaded
        when the queue is full; the scorer's exception when its batch failed."""
        waiting = _Waiting(images, asyncio.get_running_loop().create_future())
        try:
            self.queue.put_nowait(waiting)
        except asyncio.QueueFull:
            raise Overloaded(f"{self.queue.maxsize} images are already waiting for the model") from None
        return await waiting.result

    async def _next_batch(self) -> list[_Waiting]:
        batch = [await self.queue.get()]
        deadline = asyncio.get_running_loop().time() + self.max_wait_s
        while len(batch) < self.max_batch:
            if not self.queue.empty():
                batch.append(self.queue.get_nowait())
                continue
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0 or self.coming == 0:
                break
            try:
                batch.append(await asyncio.wait_for(self.queue.get(), left))
            except asyncio.TimeoutError:
                break
        return [w for w in batch if not w.result.done()]  # a request that timed out meanwhile is not scored

    async def _run(self) -> None:
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            self.batch_sizes[len(batch)] = self.batch_sizes.get(len(batch), 0) + 1
            started = time.perf_counter()
            try:
                maps, scores = await self.run_now(torch.cat([w.images for w in batch]))
            except Exception as err:  # the scorer's failure is each waiting request's, not the loop's
                for w in batch:
                    if not w.result.done():
                        w.result.set_exception(err)
                continue
            if self.observe is not None:
                self.observe(len(batch), time.perf_counter() - started)
            for w, amap, score in zip(batch, maps, scores, strict=True):
                if not w.result.done():
                    w.result.set_result((amap, float(score), len(batch)))
