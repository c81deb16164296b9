"""A small micro-batcher for the served chat model (tasks/pipeline/chat.py).

The scoring server runs each request in its own thread. Instead of one lock held for a
whole generation, every request hands its job to one worker thread, which owns the model:
the jobs that arrive within ``wait_s`` of the first (at most ``max_batch``) are generated
together, those with the same sampling settings in one left-padded batch. The BaFT gates
keep per-sequence state (editing/attach.py), so a batched answer is the answer alone.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class Job:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 0.0       # 0: greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()     # strings that end the answer
    result: Any = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def sampling(self) -> tuple[float, float]:
        return (self.temperature, self.top_p) if self.temperature > 0 else (0.0, 1.0)


class MicroBatcher:
    """``submit(job)`` blocks until ``run(jobs)`` (called on the worker thread with jobs
    of one sampling setting) has returned that job's result, or raises its error."""

    def __init__(self, run: Callable[[list[Job]], list[Any]], max_batch: int, wait_s: float):
        self.run, self.max_batch, self.wait_s = run, max(1, max_batch), max(0.0, wait_s)
        self.queue: queue.Queue[Job] = queue.Queue()
        self.sizes: list[int] = []          # the size of each batch run (for tests and logs)
        self.worker = threading.Thread(target=self._loop, name="chat-batcher", daemon=True)
        self.worker.start()

    def submit(self, job: Job):
        self.queue.put(job)
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.result

    def _collect(self) -> list[Job]:
        batch = [self.queue.get()]
        deadline = time.monotonic() + self.wait_s
        while len(batch) < self.max_batch:
            left = deadline - time.monotonic()
            try:
                batch.append(self.queue.get(timeout=left) if left > 0 else self.queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _loop(self) -> None:
        while True:
            batch = self._collect()
            groups: dict[tuple[float, float], list[Job]] = {}
            for job in batch:
                groups.setdefault(job.sampling, []).append(job)
            for jobs in groups.values():
                self.sizes.append(len(jobs))
                try:
                    for job, result in zip(jobs, self.run(jobs), strict=True):
                        job.result = result
                except BaseException as e:  # noqa: BLE001 -- handed to every waiting request
                    for job in jobs:
                        job.error = e
                for job in jobs:
                    job.done.set()
