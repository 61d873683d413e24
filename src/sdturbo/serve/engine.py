"""Engine: owns the pipeline and the queue in front of it; one model worker thread, dynamic batching.

Requests that agree on everything the pipeline takes as a scalar (size, steps, guidance, strength) run as one call
with concatenated prompt and per-image seed lists, so each image depends only on its own prompt, seed and settings:
a request gets the same images alone or batched, up to rounding (kernels round differently per batch size, visibly in
a few pixels in bf16). The pipeline is any callable with TurboPipeline's signature."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from .metrics import ServeMetrics

log = logging.getLogger("sdturbo.serve")


class QueueFull(Exception):
    def __init__(self, retry_after_s: int):
        super().__init__(f"the server is busy: the queue is full, retry in {retry_after_s} s")
        self.retry_after_s = retry_after_s


class GenerationTimeout(Exception):
    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s  # the model may still be busy with the batch that took too long


class ShuttingDown(Exception):
    """The server is stopping: queued and running jobs are answered at once instead of cut off."""


SHUTTING_DOWN = "the server is shutting down; retry when it is back"


class InvalidJob(Exception):
    """The pipeline refused the arguments (its ValueError)."""


class GenerationFailed(Exception):
    pass


class Dropped(Exception):
    """The caller replaced this job with a newer one before it started."""


@dataclass(frozen=True)
class Job:
    """One request, validated: `len(seeds)` images of one prompt."""

    prompt: str
    seeds: tuple[int, ...]  # one per image
    steps: int
    width: int
    height: int
    guidance_scale: float = 0.0
    negative_prompt: str | None = None
    image: Image.Image | None = None  # img2img source, already width x height
    strength: float = 0.5

    @property
    def uses_negative(self) -> bool:
        return self.negative_prompt is not None and self.guidance_scale > 1.0

    @property
    def batch_key(self) -> tuple:
        """Jobs with equal keys can share a pipeline call: these are the pipeline's scalar arguments."""
        strength = self.strength if self.image is not None else None
        return (self.width, self.height, self.steps, self.guidance_scale, strength, self.uses_negative)


@dataclass
class Generation:
    images: list[Image.Image]
    parameters: list[Any]  # sdturbo.output.GenerationParameters, one per image
    queue_ms: float  # submitted -> its batch started
    inference_ms: float  # the whole batch's pipeline call
    batch_images: int  # images in that call, this job's included


PreviewSink = Callable[[Image.Image, int], None]  # (preview of the job's first image, step index)


@dataclass(eq=False)
class Ticket:
    job: Job
    future: asyncio.Future
    submitted_at: float = field(default_factory=time.perf_counter)
    started: bool = False
    on_preview: PreviewSink | None = None  # called on the event loop after every denoising step


class Engine:
    def __init__(
        self,
        pipeline: Callable,
        max_batch: int = 8,
        max_queue: int = 64,
        timeout_s: float = 120.0,
        metrics: ServeMetrics | None = None,
    ):
        self.pipeline, self.max_batch, self.max_queue, self.timeout_s = pipeline, max_batch, max_queue, timeout_s
        self.metrics = metrics or ServeMetrics()
        self._queue: deque[Ticket] = deque()
        self._running: list[Ticket] = []  # the batch handed to the model thread
        self._model_busy = False  # set by the model thread itself: true until its call returns, even after stop()
        self.stopping = asyncio.Event()  # set by close(): the server is shutting down
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        # One thread: the model runs one batch at a time and the event loop never waits on it.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sdturbo-model")
        self._batch_s = 1.0  # running mean of a batch's duration, for Retry-After
        self._running_since: float | None = None

    # -- lifecycle ----------------------------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        self._worker = asyncio.create_task(self._run_forever(), name="sdturbo-engine")

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        while self._queue:
            self._queue.popleft().future.cancel()
        # Not waiting: a batch still running finishes in its thread, without holding up the event loop.
        self._executor.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        """Refuse new jobs and answer the waiting and running ones now (503), so a stopping server's open requests
        get an error they can act on, not a connection cut at the end of the grace period. A batch already in the
        model thread runs on, unseen."""
        self.stopping.set()
        stopping = ShuttingDown(SHUTTING_DOWN)
        for ticket in [*self._queue, *self._running]:
            if not ticket.future.done():
                ticket.future.set_exception(stopping)
        self._queue.clear()
        self.metrics.queue_depth.set(0)

    def close_soon(self) -> None:
        """close() from a signal handler or another thread."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.close)

    @property
    def busy(self) -> bool:
        """Whether the model thread is in a pipeline call."""
        return self._model_busy

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    # -- callers ------------------------------------------------------------------------------------------------

    def submit(self, job: Job, on_preview: PreviewSink | None = None) -> Ticket:
        """on_preview: gets a small linear preview of the job's first image after every step (a live view shows it
        while the VAE decodes, the slow part on a CPU); the pipeline needs a preview_images method for it."""
        if self.stopping.is_set():
            raise ShuttingDown(SHUTTING_DOWN)
        if len(self._queue) >= self.max_queue:
            raise QueueFull(self.retry_after_s())
        ticket = Ticket(job, asyncio.get_running_loop().create_future(), on_preview=on_preview)
        self._queue.append(ticket)
        self.metrics.queue_depth.set(len(self._queue))
        self._wakeup.set()
        return ticket

    async def wait(self, ticket: Ticket) -> Generation:
        """The ticket's images; if the caller goes away or times out, a job still queued leaves the queue."""
        try:
            return await asyncio.wait_for(ticket.future, self.timeout_s)
        except asyncio.TimeoutError:
            message = f"no result within the server's {self.timeout_s:g} s request timeout"
            raise GenerationTimeout(message, self.retry_after_s()) from None
        finally:
            self._remove(ticket)
            ticket.future.cancel()

    async def generate(self, job: Job) -> Generation:
        return await self.wait(self.submit(job))

    def cancel(self, ticket: Ticket) -> bool:
        """Drop a job that has not started (its waiter gets Dropped); False once it runs."""
        if ticket.started or ticket.future.done():
            return False
        self._remove(ticket)
        ticket.future.set_exception(Dropped("replaced by a newer request before it started"))
        return True

    def retry_after_s(self) -> int:
        """Seconds until the work ahead of a new request is likely done: the queue, in batches of the mean duration,
        and the running batch, which when overdue is expected to run as long again as it has (a timed-out request's
        batch is overdue by definition)."""
        running_s = 0.0
        if self._running_since is not None:
            elapsed = time.perf_counter() - self._running_since
            running_s = max(self._batch_s - elapsed, elapsed)
        queued_s = math.ceil(len(self._queue) / self.max_batch) * self._batch_s
        return max(1, math.ceil(queued_s + running_s))

    def _remove(self, ticket: Ticket) -> None:
        try:
            self._queue.remove(ticket)
        except ValueError:
            return
        self.metrics.queue_depth.set(len(self._queue))

    # -- the worker ---------------------------------------------------------------------------------------------

    async def _run_forever(self) -> None:
        while True:
            while not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            batch = self._take_batch()
            self._running = batch
            try:
                await self._run_batch(batch)
            except Exception:  # a bug here must not leave every later request waiting for its timeout
                log.exception("engine: a batch failed outside the pipeline call")
                for ticket in batch:
                    if not ticket.future.done():
                        ticket.future.set_exception(GenerationFailed("generation failed: internal error"))
            finally:
                self._running, self._running_since = [], None

    def _take_batch(self) -> list[Ticket]:
        """The oldest job, plus every later one that can share its call, up to max_batch images (FIFO-fair)."""
        first = self._queue.popleft()
        batch, images = [first], len(first.job.seeds)
        for ticket in list(self._queue):
            n = len(ticket.job.seeds)
            if ticket.job.batch_key == first.job.batch_key and images + n <= self.max_batch:
                self._queue.remove(ticket)
                batch.append(ticket)
                images += n
        for ticket in batch:
            ticket.started = True
        self.metrics.queue_depth.set(len(self._queue))
        return batch

    async def _run_batch(self, batch: list[Ticket]) -> None:
        started = self._running_since = time.perf_counter()
        jobs = [t.job for t in batch]
        loop = asyncio.get_running_loop()
        sinks = [_threadsafe(loop, t.on_preview) if t.on_preview else None for t in batch]
        outcomes = await loop.run_in_executor(self._executor, self._call_marked_busy, jobs, sinks)
        inference_s = time.perf_counter() - started
        images = sum(len(j.seeds) for j in jobs)
        self._batch_s = 0.8 * self._batch_s + 0.2 * inference_s
        self.metrics.observe_batch(images, inference_s)
        for ticket, outcome in zip(batch, outcomes, strict=True):
            if ticket.future.done():  # its caller left or timed out while it ran
                continue
            if isinstance(outcome, Exception):
                ticket.future.set_exception(outcome)
                continue
            queue_ms = (started - ticket.submitted_at) * 1000
            images_, params = outcome
            ticket.future.set_result(Generation(images_, params, queue_ms, inference_s * 1000, images))

    # -- in the model thread ------------------------------------------------------------------------------------

    def _call_marked_busy(self, jobs: list[Job], sinks: list[PreviewSink | None]) -> list:
        self._model_busy = True
        try:
            return self._call_jobs(jobs, sinks)
        finally:
            self._model_busy = False

    def _call_jobs(self, jobs: list[Job], sinks: list[PreviewSink | None]) -> list[tuple[list, list] | Exception]:
        """Per job: (images, parameters) or the exception for it. One call for all; if that fails, each job alone,
        so a request the pipeline rejects cannot fail the requests batched with it."""
        try:
            return self._call_pipeline(jobs, sinks)
        except Exception as e:
            if len(jobs) == 1:
                return [_as_job_error(e)]
        outcomes = []
        for job, sink in zip(jobs, sinks, strict=True):
            try:
                outcomes.extend(self._call_pipeline([job], [sink]))
            except Exception as e:
                outcomes.append(_as_job_error(e))
        return outcomes

    def _call_pipeline(self, jobs: list[Job], sinks: list[PreviewSink | None]) -> list[tuple[list, list]]:
        first = jobs[0]
        kwargs: dict[str, Any] = dict(
            prompt=[j.prompt for j in jobs for _ in j.seeds],
            seed=[s for j in jobs for s in j.seeds],
            num_inference_steps=first.steps,
            guidance_scale=first.guidance_scale,
            height=first.height,
            width=first.width,
            num_images_per_prompt=1,
            output_type="pil",
        )
        if first.uses_negative:
            kwargs["negative_prompt"] = [j.negative_prompt for j in jobs for _ in j.seeds]
        if first.image is not None:
            kwargs["image"] = [j.image for j in jobs for _ in j.seeds]
            kwargs["strength"] = first.strength
        if any(sinks):
            kwargs["callback_on_step_end"] = _preview_callback(jobs, sinks)
            kwargs["callback_on_step_end_tensor_inputs"] = ["denoised"]
        out = self.pipeline(**kwargs)
        outcomes, i = [], 0
        for job in jobs:
            n = len(job.seeds)
            outcomes.append((list(out.images[i : i + n]), list(out.parameters[i : i + n])))
            i += n
        return outcomes


def _threadsafe(loop: asyncio.AbstractEventLoop, sink: PreviewSink) -> PreviewSink:
    """Runs the sink on the event loop; a failing sink is logged once per failure, like a failing preview."""

    def run(image: Image.Image, step: int) -> None:
        try:
            sink(image, step)
        except Exception:
            log.exception("engine: preview sink failed")

    return lambda image, step: loop.call_soon_threadsafe(run, image, step)


def _preview_callback(jobs: list[Job], sinks: list[PreviewSink | None]):
    """A step callback that previews each asking job's first image from the step's x0 estimate."""
    firsts, i = [], 0
    for job in jobs:
        firsts.append(i)
        i += len(job.seeds)

    def on_step_end(pipe, step: int, timestep, tensors: dict) -> dict:
        try:  # a preview is a courtesy: it must never fail the generation
            wanted = [(first, sink) for first, sink in zip(firsts, sinks) if sink is not None]
            images = pipe.preview_images(tensors["denoised"][[first for first, _ in wanted]])
            for (_, sink), image in zip(wanted, images):
                sink(image, step)
        except Exception:
            log.exception("engine: preview failed")
        return {}

    return on_step_end


def _as_job_error(e: Exception) -> Exception:
    if isinstance(e, ValueError):
        return InvalidJob(str(e).splitlines()[0] if str(e) else "invalid generation arguments")
    log.error("pipeline call failed", exc_info=e)
    return GenerationFailed(f"generation failed: {type(e).__name__}")
