"""AsyncLLMEngine against a tiny fake engine (milliseconds, no model): routing of outputs to callers, fan-out,
all-or-none admission, aborts, the queue limit, and a loop that survives a failing request."""

from __future__ import annotations

import asyncio

import pytest
from fake_engine import FakeEngine

from photoninfer.engine.async_engine import AsyncLLMEngine, QueueFullError, RequestFailedError
from photoninfer.errors import InvalidRequestError
from photoninfer.outputs import RequestOutput
from photoninfer.sampling_params import SamplingParams

pytestmark = pytest.mark.timeout(30)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=20))


async def started(fake, **kwargs) -> AsyncLLMEngine:
    engine = AsyncLLMEngine(fake, **kwargs)
    engine.start()
    return engine


async def drain(stream) -> dict[int, RequestOutput]:
    finals = {}
    async for index, output in stream:
        finals[index] = output
    return finals


def params(max_tokens=3):
    return SamplingParams(max_tokens=max_tokens)


def test_outputs_reach_their_callers_and_fan_out_indices():
    async def main():
        engine = await started(FakeEngine())
        single = await engine.submit("a", [("hi", params(2))])
        fanned = await engine.submit("b", [("x", params(3)), ("y", params(1))])
        a, b = await asyncio.gather(drain(single), drain(fanned))
        await engine.shutdown()
        return a, b

    a, b = run(main())
    assert a[0].outputs[0].token_ids == [1, 2] and a[0].finished
    assert sorted(b) == [0, 1]
    assert b[0].request_id == "b-0" and b[0].outputs[0].token_ids == [1, 2, 3]
    assert b[1].request_id == "b-1" and b[1].outputs[0].token_ids == [1]


def test_rejected_admission_is_all_or_none():
    fake = FakeEngine()

    async def main():
        engine = await started(fake)
        fake.gate.clear()  # keep the engine from finishing anything meanwhile
        with pytest.raises(InvalidRequestError):
            await engine.submit("r", [("ok", params()), ("reject", params())])
        assert fake.requests == {} and fake.aborted == ["r-0"]
        fake.gate.set()
        ok = await drain(await engine.submit("next", [("ok", params(1))]))
        await engine.shutdown()
        return ok

    assert run(main())[0].finished


def test_leaving_the_stream_early_aborts_the_request():
    fake = FakeEngine()

    async def main():
        engine = await started(fake)
        stream = await engine.submit("long", [("hi", params(10_000))])
        async for _ in stream:
            break
        stream.abort()
        for _ in range(100):
            if not fake.requests:
                break
            await asyncio.sleep(0.01)
        await engine.shutdown()

    run(main())
    assert fake.requests == {} and fake.aborted == ["long"]


def test_cancelled_caller_aborts_its_request():
    fake = FakeEngine()

    async def main():
        engine = await started(fake)

        async def consume():
            await drain(await engine.submit("c", [("hi", params(10_000))]))

        task = asyncio.ensure_future(consume())
        while not fake.requests:
            await asyncio.sleep(0.01)
        task.cancel()
        for _ in range(100):
            if not fake.requests:
                break
            await asyncio.sleep(0.01)
        await engine.shutdown()

    run(main())
    assert fake.aborted == ["c"]


def test_queue_limit_raises_queue_full():
    fake = FakeEngine(max_running=1)

    async def main():
        engine = await started(fake, max_queue=1)
        running = await engine.submit("run", [("a", params(10_000))])
        waiting = await engine.submit("wait", [("b", params(1))])
        with pytest.raises(QueueFullError):
            await engine.submit("third", [("c", params(1))])
        running.abort()
        assert (await drain(waiting))[0].finished
        await engine.shutdown()

    run(main())


def test_queue_limit_counts_sequences_not_requests():
    fake = FakeEngine(max_running=1)

    async def main():
        engine = await started(fake, max_queue=3)
        running = await engine.submit("run", [("a", params(10_000))])
        while fake.stats().num_waiting:  # let the first sequence start running
            await asyncio.sleep(0.01)
        waiting = await engine.submit("wait", [("b", params(1)), ("c", params(1))])  # 2 sequences wait
        with pytest.raises(QueueFullError, match=r"2 waiting .* 2 more .* limit of 3"):
            await engine.submit("pair", [("d", params(1)), ("e", params(1))])
        one_more = await engine.submit("one", [("f", params(1))])  # 2 + 1 fits
        with pytest.raises(InvalidRequestError, match="4 sequences"):  # could never fit, even when idle
            await engine.submit("four", [(p, params(1)) for p in "ghij"])
        running.abort()
        assert len(await drain(waiting)) == 2 and len(await drain(one_more)) == 1
        await engine.shutdown()

    run(main())
    assert not any(sub_id.startswith(("pair", "four")) for sub_id in fake.aborted)


@pytest.mark.parametrize("failure", ["poison", "broken"], ids=["step-raises", "engine-isolates-failure"])
def test_a_failing_choice_aborts_its_siblings(failure):
    fake = FakeEngine()

    async def main():
        engine = await started(fake)
        stream = await engine.submit("n3", [("fine", params(10_000)), (failure, params(3)), ("fine", params(10_000))])
        with pytest.raises(RequestFailedError):
            await drain(stream)
        for _ in range(200):
            if not fake.requests:
                break
            await asyncio.sleep(0.01)
        still_running = sorted(fake.requests)  # before shutdown aborts whatever is left
        await engine.shutdown()
        return still_running

    assert run(main()) == [], "the failed choice's siblings kept generating"
    assert {"n3-0", "n3-2"} <= set(fake.aborted)


@pytest.mark.parametrize("blame", [True, False], ids=["exception-names-request", "anonymous-exception"])
def test_loop_survives_a_failing_request(blame):
    fake = FakeEngine(blame_poison=blame)

    async def main():
        engine = await started(fake)
        good = await engine.submit("good", [("fine", params(50))])  # 50 steps: still running when bad arrives
        bad = await engine.submit("bad", [("poison", params(3))])
        with pytest.raises(RequestFailedError):
            await drain(bad)
        good_result = None
        try:
            good_result = await drain(good)
        except RequestFailedError:
            assert not blame, "only the named request may fail"
        after = await drain(await engine.submit("after", [("fine", params(2))]))
        assert engine.is_running
        await engine.shutdown()
        return good_result, after

    good, after = run(main())
    assert after[0].finished
    if blame:
        assert good[0].outputs[0].token_ids == list(range(1, 51))
    assert "bad" in fake.aborted and fake.requests == {}


def test_shutdown_without_abort_drains_in_flight_requests():
    fake = FakeEngine()

    async def main():
        engine = await started(fake)
        stream = await engine.submit("d", [("hi", params(5))])
        consumer = asyncio.ensure_future(drain(stream))
        await engine.shutdown(abort_in_flight=False)
        return await consumer

    assert run(main())[0].outputs[0].token_ids == [1, 2, 3, 4, 5]


def test_shutdown_aborts_and_wakes_waiting_readers():
    fake = FakeEngine()

    async def main():
        engine = await started(fake)
        stream = await engine.submit("s", [("hi", params(10_000))])
        consumer = asyncio.ensure_future(drain(stream))
        await asyncio.sleep(0.05)
        await engine.shutdown()
        finals = await consumer  # must end, not hang
        assert not engine.is_running
        return finals, stream

    finals, stream = run(main())
    assert stream.outcome == "abort" and fake.requests == {} and fake.aborted == ["s"]
