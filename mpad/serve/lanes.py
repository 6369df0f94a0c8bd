"""Where images are decoded: two lanes, so that a small image never waits behind large ones, and a pixel budget,
so that memory stays bounded whatever arrives.

- Small lane: images of up to LANE_PIXELS pixels, on `threads` threads, in arrival order.
- Large lane: larger images, on `threads` threads of their own at a lower CPU priority (nice +10: they get the
  cores the small lane and the model leave), holding at most `budget` pixels being decoded at once (an image
  larger than the budget holds all of it), in arrival order.

Pixels being decoded at once are then at most threads x LANE_PIXELS + budget (the app's budget is --max-pixels:
one largest image, or several smaller ones), about 7 bytes each while decoding (PIL's decoded image, 4 bytes a
pixel, and numpy's copy, 3; mpad.serve.images.decode).
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")
# Up to 4 megapixels (2448x2048 and 2048x2048 inspection cameras, the common 5 MP sensors just over it) a decode
# takes tens of milliseconds; above it, hundreds (a 25-megapixel PNG: about a second of a core).
LANE_PIXELS = 4_000_000
NICE = 10


class PixelBudget:
    """At most `capacity` pixels held at once, granted in arrival order (`acquire` waits, `release` gives back)."""

    def __init__(self, capacity: int) -> None:
        self.capacity, self.held = capacity, 0
        self.waiting: deque[tuple[int, asyncio.Future[None]]] = deque()

    def share(self, pixels: int) -> int:
        """What an image of `pixels` holds: itself, or all of the budget when it is larger."""
        return min(pixels, self.capacity)

    async def acquire(self, pixels: int) -> None:
        pixels = self.share(pixels)
        if not self.waiting and self.held + pixels <= self.capacity:
            self.held += pixels
            return
        granted = asyncio.get_running_loop().create_future()
        self.waiting.append((pixels, granted))
        try:
            await granted
        except asyncio.CancelledError:  # given up while waiting (its request ran out of time)
            if granted.done() and not granted.cancelled():
                self.release(pixels)
            elif (pixels, granted) in self.waiting:
                self.waiting.remove((pixels, granted))
                self._grant()
            raise

    def release(self, pixels: int) -> None:
        self.held -= self.share(pixels)
        self._grant()

    def _grant(self) -> None:
        while self.waiting and self.held + self.waiting[0][0] <= self.capacity:
            pixels, granted = self.waiting.popleft()
            if granted.done():  # cancelled meanwhile
                continue
            self.held += pixels
            granted.set_result(None)


class Lanes:
    """The two decode lanes; `await run(pixels, work, *args)` runs `work` on the lane for an image of `pixels`."""

    def __init__(self, threads: int, budget: int) -> None:
        self.small = ThreadPoolExecutor(threads, thread_name_prefix="mpad-decode")
        self.large = ThreadPoolExecutor(threads, thread_name_prefix="mpad-decode-large", initializer=_lower_priority)
        self.budget = PixelBudget(budget)

    async def run(self, pixels: int, work: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        if pixels <= LANE_PIXELS:
            return await loop.run_in_executor(self.small, work, *args)
        await self.budget.acquire(pixels)
        done = loop.run_in_executor(self.large, work, *args)
        # given back when the thread is done, not when the request stops waiting: the pixels are held until then
        done.add_done_callback(lambda _: self.budget.release(pixels))
        return await done

    def shutdown(self) -> None:
        for pool in (self.small, self.large):
            pool.shutdown(wait=False, cancel_futures=True)


def _lower_priority() -> None:
    try:  # Linux: a thread's own niceness (its id as a process id); elsewhere the lane keeps the process' priority
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + NICE))
    except (AttributeError, OSError):
        pass
