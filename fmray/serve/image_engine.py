"""The batcher of a served image model: concurrent requests with the same size and step count
share one denoising loop, run by one engine thread per replica.

    fmray serve --config jobs/serve/image_tiny.yaml      # up to max_batch_size images per loop
    python bench/serve_diffusion.py                      # batched vs one at a time

A request is one task (its n images stay together). The thread takes the oldest waiting task,
waits `batch_wait_s` for company, then adds every waiting task with the same (width, height,
steps) while the images fit in `max_batch_size`; tasks of other shapes go first next time, so
none starves. The event loop only awaits futures: health checks and new requests are answered
while a batch denoises. Serve's @serve.batch would group by arrival only, and does not run in
Serve's local testing mode; this thread works in-process too (the unit tests drive it there).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from fmray.generation.engine import EngineOverloaded, EngineStopped
from fmray.serve.denoise import ImageSpec

logger = logging.getLogger(__name__)
Generate = Callable[[list[ImageSpec], int, int, int], np.ndarray]


@dataclass
class ImageTask:
    specs: list[ImageSpec]
    width: int
    height: int
    steps: int
    future: Future = field(default_factory=Future)

    def key(self) -> tuple[int, int, int]:
        return self.width, self.height, self.steps


class ImageEngine:
    def __init__(
        self,
        generate: Generate,
        max_batch_size: int = 8,
        max_waiting: int = 64,
        batch_wait_s: float = 0.01,
        stall_timeout_s: float = 300.0,
    ) -> None:
        self.generate = generate
        self.max_batch_size = max_batch_size
        self.max_waiting = max_waiting
        self.batch_wait_s = batch_wait_s
        self.stall_timeout_s = stall_timeout_s
        self.waiting: deque[ImageTask] = deque()
        self.cond = threading.Condition()
        self.thread: threading.Thread | None = None
        self.accepting = True
        self.stopped = False
        self.busy_since: float | None = None
        self.error: BaseException | None = None
        self.num_batches = 0
        self.num_images = 0
        self.running_images = 0

    def start(self) -> ImageEngine:
        self.thread = threading.Thread(target=self._run, name="image-engine", daemon=True)
        self.thread.start()
        return self

    def submit(self, specs: list[ImageSpec], width: int, height: int, steps: int) -> Future:
        """Queue one request's images; its future gets their N x H x W x 3 array."""
        task = ImageTask(list(specs), width, height, steps)
        with self.cond:
            if not self.accepting:
                raise EngineStopped("the image engine is shutting down")
            queued = sum(len(t.specs) for t in self.waiting)
            if queued + len(specs) > self.max_waiting + self.max_batch_size:
                raise EngineOverloaded(f"{queued} images already wait for a batch")
            self.waiting.append(task)
            self.cond.notify()
        return task.future

    def stats(self) -> dict[str, int]:
        with self.cond:
            waiting = sum(len(t.specs) for t in self.waiting)
        return {
            "waiting_images": waiting,
            "running_images": self.running_images,
            "batches": self.num_batches,
            "images": self.num_images,
        }

    def check_health(self) -> None:
        if self.thread is None or not self.thread.is_alive():
            raise RuntimeError(f"the image engine thread is not running ({self.error!r})")
        busy_since = self.busy_since
        if busy_since is not None and time.monotonic() - busy_since > self.stall_timeout_s:
            raise RuntimeError(f"a denoising loop has run for over {self.stall_timeout_s:.0f}s")

    def shutdown(self, drain_timeout_s: float = 30.0) -> None:
        """Take no new requests, finish the queued ones (at most drain_timeout_s), then stop."""
        deadline = time.monotonic() + drain_timeout_s
        with self.cond:
            self.accepting = False
            while (self.waiting or self.busy_since is not None) and time.monotonic() < deadline:
                self.cond.wait(timeout=0.05)
            self.stopped = True
            left = list(self.waiting)
            self.waiting.clear()
            self.cond.notify_all()
        for task in left:
            if task.future.set_running_or_notify_cancel():
                task.future.set_exception(EngineStopped("the image engine stopped"))
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout=max(0.0, deadline - time.monotonic()) + 5.0)

    # ---- the engine thread ----

    def _run(self) -> None:
        try:
            while True:
                batch = self._next_batch()
                if batch is None:
                    return
                if batch:
                    self._run_batch(batch)
        except BaseException as err:  # noqa: BLE001 - recorded for check_health, then re-raised
            self.error = err
            raise

    def _next_batch(self) -> list[ImageTask] | None:
        """The next batch (None: stopped): the oldest task, plus waiting ones of its shape."""
        with self.cond:
            while not self.waiting and not self.stopped:
                self.cond.wait()
            if self.stopped:
                return None
            first_seen = time.monotonic()
            while time.monotonic() - first_seen < self.batch_wait_s and not self.stopped:
                if sum(len(t.specs) for t in self.waiting) >= self.max_batch_size:
                    break
                self.cond.wait(timeout=self.batch_wait_s - (time.monotonic() - first_seen))
            key = self.waiting[0].key()
            batch: list[ImageTask] = []
            size = 0
            for task in list(self.waiting):
                if task.key() != key or size + len(task.specs) > self.max_batch_size:
                    continue
                self.waiting.remove(task)
                if task.future.set_running_or_notify_cancel():  # False: the client went away
                    batch.append(task)
                    size += len(task.specs)
            if batch:
                self.busy_since = time.monotonic()
                self.running_images = size
            return batch

    def _run_batch(self, batch: list[ImageTask]) -> None:
        specs = [spec for task in batch for spec in task.specs]
        width, height, steps = batch[0].key()
        try:
            images = self.generate(specs, width, height, steps)
        except Exception as err:  # noqa: BLE001 - each request of the batch gets the error
            logger.exception("denoising a batch of %d images failed", len(specs))
            for task in batch:
                task.future.set_exception(err)
        else:
            start = 0
            for task in batch:
                task.future.set_result(images[start : start + len(task.specs)])
                start += len(task.specs)
            self.num_images += len(specs)
        finally:
            self.num_batches += 1
            with self.cond:
                self.busy_since = None
                self.running_images = 0
                self.cond.notify_all()
