"""Engine: batching by the pipeline's scalar arguments, each caller's own images, the bounded queue, cancellation."""

from __future__ import annotations

import asyncio

import pytest
from PIL import Image

from sdturbo.serve.engine import (
    Dropped,
    Engine,
    GenerationTimeout,
    InvalidJob,
    Job,
    QueueFull,
    ShuttingDown,
)

from fake_pipeline import FakePipeline, expected_image
from serve_helpers import same_pixels


def job(prompt="a cat", seeds=(1,), steps=1, side=64, **kw) -> Job:
    return Job(prompt=prompt, seeds=tuple(seeds), steps=steps, width=side, height=side, **kw)


def run(coro_fn, pipeline, **engine_kw):
    """Run coro_fn(engine) inside a started engine."""

    async def main():
        engine = Engine(pipeline, **engine_kw)
        await engine.start()
        try:
            return await coro_fn(engine)
        finally:
            await engine.stop()

    return asyncio.run(main())


def expected(j: Job) -> list[Image.Image]:
    neg = j.negative_prompt if j.uses_negative else None
    return [
        expected_image(j.prompt, s, j.width, j.height, j.steps, j.guidance_scale, neg, j.image, j.strength)
        for s in j.seeds
    ]


def test_concurrent_compatible_jobs_share_one_call_and_each_gets_its_own_images():
    pipe = FakePipeline(delay_s=0.05)
    jobs = [job("warm-up")] + [job(f"prompt {i}", seeds=(10 * i, 10 * i + 1)) for i in range(4)]

    async def go(engine):
        first = asyncio.create_task(engine.generate(jobs[0]))  # occupies the worker while the rest queue up
        await asyncio.sleep(0.01)
        return await asyncio.gather(first, *(engine.generate(j) for j in jobs[1:]))

    results = run(go, pipe, max_batch=8)
    assert pipe.batch_sizes == [1, 8]
    for j, gen in zip(jobs, results, strict=True):
        assert all(same_pixels(a, b) for a, b in zip(gen.images, expected(j), strict=True))
        assert [p.seed for p in gen.parameters] == list(j.seeds)
        assert [p.prompt for p in gen.parameters] == [j.prompt] * len(j.seeds)
    assert results[1].batch_images == 8


def test_jobs_differing_in_a_scalar_argument_run_in_separate_calls():
    pipe = FakePipeline(delay_s=0.05)
    jobs = [job("warm-up"), job("a", side=64), job("b", side=128), job("c", steps=2), job("d", side=64)]

    async def go(engine):
        first = asyncio.create_task(engine.generate(jobs[0]))
        await asyncio.sleep(0.01)
        return await asyncio.gather(first, *(engine.generate(j) for j in jobs[1:]))

    results = run(go, pipe, max_batch=8)
    assert pipe.calls == [["warm-up"], ["a", "d"], ["b"], ["c"]]  # oldest first; "d" joins "a"
    for j, gen in zip(jobs, results, strict=True):
        assert all(same_pixels(a, b) for a, b in zip(gen.images, expected(j), strict=True))


def test_max_batch_counts_images_not_requests():
    pipe = FakePipeline(delay_s=0.05)

    async def go(engine):
        first = asyncio.create_task(engine.generate(job("warm-up")))
        await asyncio.sleep(0.01)
        await asyncio.gather(first, *(engine.generate(job(str(i), seeds=(i, i + 100))) for i in range(5)))

    run(go, pipe, max_batch=4)
    assert pipe.batch_sizes == [1, 4, 4, 2]


def test_negative_prompt_and_img2img_batches_keep_per_image_arguments():
    pipe = FakePipeline(delay_s=0.05)
    red, blue = Image.new("RGB", (64, 64), "red"), Image.new("RGB", (64, 64), "blue")
    jobs = [
        job("warm-up"),
        job("x", guidance_scale=2.0, negative_prompt="blurry"),
        job("y", guidance_scale=2.0, negative_prompt="dark"),
        job("x", guidance_scale=2.0),  # no negative: zeros, not an encoded "", so it cannot share the call
        job("r", image=red, strength=0.5),
        job("b", image=blue, strength=0.5),
    ]

    async def go(engine):
        first = asyncio.create_task(engine.generate(jobs[0]))
        await asyncio.sleep(0.01)
        return await asyncio.gather(first, *(engine.generate(j) for j in jobs[1:]))

    results = run(go, pipe)
    assert pipe.calls == [["warm-up"], ["x", "y"], ["x"], ["r", "b"]]
    for j, gen in zip(jobs, results, strict=True):
        assert all(same_pixels(a, b) for a, b in zip(gen.images, expected(j), strict=True))


def test_a_rejected_job_fails_alone_not_its_batch():
    pipe = FakePipeline(delay_s=0.05)

    async def go(engine):
        first = asyncio.create_task(engine.generate(job("warm-up")))
        await asyncio.sleep(0.01)
        return await asyncio.gather(
            first, engine.generate(job("fine")), engine.generate(job("raise ValueError")), return_exceptions=True
        )

    _, good, bad = run(go, pipe)
    assert isinstance(bad, InvalidJob) and "refused" in str(bad)
    assert same_pixels(good.images[0], expected(job("fine"))[0])


def test_full_queue_refuses_with_retry_after():
    pipe = FakePipeline(delay_s=0.2)

    async def go(engine):
        tasks = [asyncio.create_task(engine.generate(job("running")))]
        await asyncio.sleep(0.05)
        tasks += [asyncio.create_task(engine.generate(job(str(i)))) for i in range(2)]
        await asyncio.sleep(0.01)  # one runs, two wait: the queue (max 2) is full
        with pytest.raises(QueueFull) as err:
            engine.submit(job("one too many"))
        assert err.value.retry_after_s >= 1
        await asyncio.gather(*tasks)
        return await engine.generate(job("after"))  # accepted again once drained

    assert run(go, pipe, max_batch=1, max_queue=2).images


def test_cancelled_caller_leaves_the_queue():
    pipe = FakePipeline(delay_s=0.2)

    async def go(engine):
        running = asyncio.create_task(engine.generate(job("running")))
        await asyncio.sleep(0.05)
        waiting = asyncio.create_task(engine.generate(job("abandoned")))
        await asyncio.sleep(0.01)
        assert engine.queue_depth == 1
        waiting.cancel()
        await asyncio.sleep(0.01)
        assert engine.queue_depth == 0
        await running

    run(go, pipe, max_batch=1)
    assert pipe.calls == [["running"]]


def test_cancel_drops_a_queued_ticket_but_not_a_running_one():
    pipe = FakePipeline(delay_s=0.2)

    async def go(engine):
        running = engine.submit(job("running"))
        await asyncio.sleep(0.05)
        queued = engine.submit(job("queued"))
        assert engine.cancel(queued) and not engine.cancel(running)
        with pytest.raises(Dropped):
            await engine.wait(queued)
        return await engine.wait(running)

    assert run(go, pipe, max_batch=1).images
    assert pipe.calls == [["running"]]


def test_timeout():
    async def go(engine):
        with pytest.raises(GenerationTimeout):
            await engine.generate(job("slow"))
        assert engine.queue_depth == 0

    run(go, FakePipeline(delay_s=0.3), timeout_s=0.1)


def test_metrics_count_batches_and_images():
    pipe = FakePipeline()

    async def go(engine):
        await engine.generate(job(seeds=(1, 2, 3)))
        return engine.metrics.render().decode()

    text = run(go, pipe)
    assert "sdturbo_images_generated_total 3.0" in text
    assert "sdturbo_batch_images_count 1.0" in text


def test_previews_reach_only_the_jobs_that_ask_and_never_fail_a_job(caplog):
    pipe = FakePipeline(delay_s=0.05)
    jobs = [job("warm-up")] + [job(p, seeds=s, steps=2) for p, s in (("quiet", (1, 2)), ("watched", (3,)), ("bad", (4,)))]
    seen: list[tuple[int, Image.Image]] = []

    def broken(image, step):
        raise RuntimeError("a sink that fails")

    async def go(engine):
        first = asyncio.create_task(engine.generate(jobs[0]))
        await asyncio.sleep(0.01)
        tickets = [engine.submit(jobs[1]), engine.submit(jobs[2], lambda im, step: seen.append((step, im))),
                   engine.submit(jobs[3], broken)]
        return await asyncio.gather(first, *(engine.wait(t) for t in tickets))

    results = run(go, pipe, max_batch=8)
    assert pipe.batch_sizes == [1, 4]  # asking for previews does not split a batch
    want = expected(jobs[2])[0].resize((8, 8), Image.NEAREST)
    assert [step for step, _ in seen] == [0, 1] and all(same_pixels(im, want) for _, im in seen)
    assert caplog.text.count("engine: preview sink failed") == 2  # the engine's log, not asyncio's "Exception in"
    for j, gen in zip(jobs, results, strict=True):
        assert all(same_pixels(a, b) for a, b in zip(gen.images, expected(j), strict=True))


def test_close_answers_queued_and_running_jobs_at_once_and_refuses_new_ones():
    async def scenario(engine):
        running = engine.submit(job("running"))
        queued = engine.submit(job("queued", steps=2))  # another call: still queued while the first runs
        await asyncio.sleep(0.1)
        assert engine.busy and engine.queue_depth == 1
        engine.close_soon()  # as the server's signal handler calls it
        loop = asyncio.get_running_loop()
        started = loop.time()
        outcomes = await asyncio.gather(engine.wait(running), engine.wait(queued), return_exceptions=True)
        assert loop.time() - started < 0.5  # not after the 2 s call
        assert [type(o) for o in outcomes] == [ShuttingDown, ShuttingDown]
        assert engine.queue_depth == 0 and engine.busy
        with pytest.raises(ShuttingDown, match="the server is shutting down"):
            engine.submit(job("late"))

    run(scenario, FakePipeline(delay_s=2))


def test_a_timeout_retry_after_counts_the_batch_still_running():
    async def scenario(engine):
        with pytest.raises(GenerationTimeout) as e:
            await engine.generate(job())
        return e.value.retry_after_s

    assert run(scenario, FakePipeline(delay_s=3), timeout_s=1.2) >= 2  # 1.2 s run, so ~1.2 s more expected
