"""EngineProcessClient: the engine in a child process gives every stream what the in-thread
ThreadEngineClient gives it, keeps the EngineClient on_finish contract, fails loudly (never hangs) when
the child dies, and replaces a dead child under its restart policy."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import threading
import time

import pytest

from muse.common.errors import CheckpointError, UsageError
from muse.infer.client import EngineClient, ThreadEngineClient
from muse.infer.engine import Engine, EngineConfig, EngineDeadError, EngineRestartingError
from muse.infer.engine_process import EngineProcessClient, EngineSpec, RestartPolicy
from muse.infer.sampling_params import SamplingParams

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.timeout(120)]

CONFIG = EngineConfig(max_num_seqs=4, num_blocks=48, block_size=8)


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint


@pytest.fixture(scope="module")
def client(checkpoint):
    c = EngineProcessClient(EngineSpec(str(checkpoint), CONFIG, threads=1))
    yield c
    c.close()


async def collect(client, prompt, params, rid, finished: list):
    """Every RequestOutput of one stream; checks that the deltas add up to the cumulative token ids."""
    outs = []
    async for out in client.add_request(prompt, params, rid, on_finish=finished.append):
        outs.append(out)
    for i in range(len(outs[-1].outputs)):
        streamed = [t for o in outs for t in o.outputs[i].new_token_ids]
        assert streamed == outs[-1].outputs[i].token_ids
    return outs


def wait_until(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def same_logprobs(a, b) -> bool:
    if a is None or b is None:
        return a is b
    return len(a) == len(b) and all(
        x.token_id == y.token_id and x.rank == y.rank and x.logprob == pytest.approx(y.logprob, abs=1e-5)
        and [t for t, _ in x.top] == [t for t, _ in y.top] for x, y in zip(a, b))


def test_outputs_equal_the_in_thread_client(client, checkpoint):
    """Sampled (seeded) and greedy requests, n = 2, logprobs and prompt logprobs, more requests than
    max_num_seqs, all at once: the same results as the in-thread client. (How steps batch the requests
    depends on when each arrives, so logprobs agree to fp32 rounding, token ids exactly.)"""
    rng = random.Random(1)
    prompts = [[rng.randrange(1, 300) for _ in range(rng.randrange(3, 30))] for _ in range(7)]
    params = [SamplingParams(max_tokens=rng.randrange(4, 14), temperature=0.9 if i % 2 else 0.0, seed=i, n=1 + i % 2,
                             logprobs=2 if i % 3 == 0 else None, prompt_logprobs=1 if i % 3 == 1 else None)
              for i in range(len(prompts))]

    async def run(c):
        finished: list = []
        outs = await asyncio.gather(*(collect(c, p, sp, f"r{i}", finished)
                                      for i, (p, sp) in enumerate(zip(prompts, params))))
        return outs, finished

    proc_outs, proc_finished = asyncio.run(run(client))

    async def threaded():
        c = ThreadEngineClient(Engine.from_checkpoint(checkpoint, CONFIG))
        try:
            return await run(c)
        finally:
            await c.shutdown()

    thread_outs, thread_finished = asyncio.run(threaded())
    for mine, ref in zip(proc_outs, thread_outs):
        a, b = mine[-1], ref[-1]
        assert a.finished and a.request_id == b.request_id and a.prompt_token_ids == b.prompt_token_ids
        assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
        assert [(c.finish_reason, c.stop_reason) for c in a.outputs] == [(c.finish_reason, c.stop_reason)
                                                                         for c in b.outputs]
        assert all(same_logprobs(c.logprobs, d.logprobs) for c, d in zip(a.outputs, b.outputs))
        assert same_logprobs(a.prompt_logprobs, b.prompt_logprobs)
        assert all(not o.finished for o in mine[:-1])
    assert any(c.logprobs for o in proc_outs for c in o[-1].outputs)
    assert any(o[-1].prompt_logprobs for o in proc_outs)
    # on_finish: once per request, with the final output
    assert sorted(f.request_id for f in proc_finished) == sorted(f"r{i}" for i in range(len(prompts)))
    assert {f.request_id: f for f in proc_finished} == {o[-1].request_id: o[-1] for o in proc_outs}
    assert len(thread_finished) == len(proc_finished)
    stats = client.stats()
    assert stats.num_free_blocks == stats.num_blocks and stats.num_running == 0
    assert stats.num_generation_tokens >= sum(len(c.token_ids) for o in proc_outs for c in o[-1].outputs)


def test_refused_requests_raise_and_the_engine_goes_on(client):
    async def run():
        finished: list = []
        with pytest.raises(UsageError, match="outside the vocabulary"):
            await collect(client, [1, 2, 10_000], SamplingParams(max_tokens=2), "bad-vocab", finished)
        assert len(finished) == 1 and isinstance(finished[0], UsageError)
        with pytest.raises(UsageError, match="max length is 128"):
            await collect(client, [1] * 200, SamplingParams(max_tokens=2), "too-long", finished)
        assert len(finished) == 2 and isinstance(finished[1], UsageError)
        outs = await collect(client, [1, 2, 3], SamplingParams(max_tokens=3), "fine", finished)
        assert outs[-1].finished and len(outs[-1].token_ids) == 3 and finished[-1] == outs[-1]

    asyncio.run(run())
    assert client.is_healthy


def test_duplicate_id_is_refused(client):
    async def run():
        first = client.add_request([1, 2], SamplingParams(max_tokens=30, ignore_eos=True), "dup")
        await first.__anext__()
        finished: list = []
        with pytest.raises(UsageError, match="already streaming"):
            await collect(client, [3], SamplingParams(max_tokens=2), "dup", finished)
        assert len(finished) == 1
        await first.aclose()

    asyncio.run(run())


def test_leaving_a_stream_aborts_the_request_and_frees_its_blocks(client):
    async def run():
        finished: list = []
        got = 0
        async for out in client.add_request([4, 5, 6], SamplingParams(max_tokens=100, ignore_eos=True), "leave",
                                            on_finish=finished.append):
            got += len(out.outputs[0].new_token_ids)
            if got >= 3:
                break
        return finished

    finished = asyncio.run(run())
    wait_until(lambda: len(finished) == 1)
    (final,) = finished
    assert final.finish_reason == "abort" and 3 <= len(final.token_ids) < 100
    wait_until(lambda: client.stats().num_free_blocks == client.stats().num_blocks and client.stats().num_running == 0)


def test_a_dead_engine_process_past_its_restart_limit_fails_streams_and_refuses_work(checkpoint):
    c = EngineProcessClient(EngineSpec(str(checkpoint), CONFIG, threads=1), restart=RestartPolicy(max_restarts=0))

    async def run():
        finished: list = []
        stream = c.add_request([1, 2, 3], SamplingParams(max_tokens=120, ignore_eos=True), "doomed",
                               on_finish=finished.append)
        await stream.__anext__()
        os.kill(c.pid, signal.SIGKILL)
        with pytest.raises(EngineDeadError) as info:
            async for _ in stream:
                pass
        assert len(finished) == 1 and isinstance(finished[0], EngineDeadError)
        wait_until(lambda: c.dead)
        assert not c.is_healthy and c.restarts == 0
        with pytest.raises(EngineDeadError, match="repeated failures") as late:
            await collect(c, [1], SamplingParams(max_tokens=1), "after", finished)
        assert not late.value.retryable
        assert len(finished) == 2 and isinstance(finished[1], EngineDeadError)
        return info.value

    err = asyncio.run(run())
    assert "0x" not in str(err) and "Error(" not in str(err)  # no reprs or addresses for clients
    c.close()


def test_shutdown_stops_the_process_and_fails_what_runs(checkpoint):
    c = EngineProcessClient(EngineSpec(str(checkpoint), CONFIG, threads=1))

    async def run():
        finished: list = []
        stream = c.add_request([1, 2, 3], SamplingParams(max_tokens=120, ignore_eos=True), "cut",
                               on_finish=finished.append)
        await stream.__anext__()
        await c.shutdown()
        assert c.exit_code == 0 and not c.is_healthy
        with pytest.raises(EngineDeadError, match="shut down"):
            async for _ in stream:
                pass
        assert len(finished) == 1 and isinstance(finished[0], EngineDeadError)
        with pytest.raises(EngineDeadError):
            await collect(c, [1], SamplingParams(max_tokens=1), "after", finished)

    asyncio.run(run())


def test_a_checkpoint_that_cannot_load_is_the_error_of_the_constructor(tmp_path):
    with pytest.raises(CheckpointError):
        EngineProcessClient(EngineSpec(str(tmp_path / "missing"), CONFIG, threads=1))


def test_the_engine_process_exits_when_its_parent_is_killed(checkpoint):
    """No orphan holding a GPU: SIGKILL the owner and the child sees its command pipe close, and exits."""
    import subprocess
    import sys

    code = ("import sys\n"
            "from muse.infer.engine import EngineConfig\n"
            "from muse.infer.engine_process import EngineProcessClient, EngineSpec\n"
            f"c = EngineProcessClient(EngineSpec({str(checkpoint)!r}, EngineConfig(num_blocks=16, block_size=8), threads=1))\n"
            "print(c.pid, flush=True)\n"
            "sys.stdin.read()\n")
    owner = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        child = int(owner.stdout.readline())
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait(10)

        def gone() -> bool:
            try:
                os.kill(child, 0)
            except ProcessLookupError:
                return True
            # a zombie (exited, not yet reaped by init) counts as gone
            with open(f"/proc/{child}/stat") as f:
                return f.read().split(") ")[-1].startswith("Z")
        wait_until(gone)
    finally:
        owner.kill()


# ---- both clients: the EngineClient contract ----------------------------------------------------------


@pytest.fixture(params=["thread", "process"])
def any_client(request, client, checkpoint):
    """The shared process client, or a fresh ThreadEngineClient over the same checkpoint."""
    if request.param == "process":
        yield client
        return
    c = ThreadEngineClient(Engine.from_checkpoint(checkpoint, CONFIG))
    yield c
    asyncio.run(c.shutdown())


def test_consumers_that_hang_up_before_the_engine_answers_never_take_it_down(any_client):
    """Regression: a consumer cancelled right after add_request (a client closing its connection) made
    the engine's side resolve a future the cancellation had cancelled (InvalidStateError), which killed
    the engine thread (ThreadEngineClient) or the reader (EngineProcessClient) for every request. The
    engine's side is held (an on_finish that blocks runs on it) while the consumers are cancelled, so
    every answer comes after its cancellation."""
    client = any_client
    assert isinstance(client, EngineClient)
    n = 24
    hold, held, all_done = threading.Event(), threading.Event(), threading.Event()
    finals: list = []

    def blocker(_):
        held.set()
        hold.wait(60)

    def on_finish(result):
        finals.append(result)
        if len(finals) == n:
            all_done.set()

    async def run():
        loop = asyncio.get_running_loop()
        holder = asyncio.create_task(collect(client, [1, 2, 3], SamplingParams(max_tokens=1), "holder", []))
        gen = client.add_request([4, 5], SamplingParams(max_tokens=1), "blocker", on_finish=blocker)
        blocking = asyncio.create_task(anext(gen))
        assert await loop.run_in_executor(None, held.wait, 60)
        streams = [client.add_request([1 + i, 2, 3], SamplingParams(max_tokens=50, ignore_eos=True), f"gone-{i}",
                                      on_finish=on_finish) for i in range(n)]
        tasks = [asyncio.create_task(anext(s)) for s in streams]
        await asyncio.sleep(0)  # one turn: each task sends its request and waits for the first output
        for t in tasks:
            t.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, asyncio.CancelledError) for r in results)
        hold.set()
        await blocking
        await gen.aclose()
        await holder
        assert await loop.run_in_executor(None, all_done.wait, 60)
        # the engine is alive and serves a later request; nothing was finished twice
        later = await collect(client, [7, 8, 9], SamplingParams(max_tokens=4, ignore_eos=True), "later", [])
        assert later[-1].finished and len(later[-1].token_ids) == 4
        return client.stats()

    stats = asyncio.run(run())
    assert client.is_healthy and not client.dead
    assert len(finals) == n and sorted(f.request_id for f in finals) == sorted(f"gone-{i}" for i in range(n))
    assert all(f.finished and f.finish_reason == "abort" for f in finals)
    assert stats.num_free_blocks == stats.num_blocks and stats.num_running == 0 and stats.num_waiting == 0


def test_reset_prefix_cache_drops_what_a_later_request_would_hit(any_client):
    client = any_client
    prompt = list(range(1, 40))  # 4 full blocks of 8

    async def run():
        first = await collect(client, prompt, SamplingParams(max_tokens=2, temperature=0), "p1", [])
        again = await collect(client, prompt, SamplingParams(max_tokens=2, temperature=0), "p2", [])
        dropped = await client.reset_prefix_cache()
        after = await collect(client, prompt, SamplingParams(max_tokens=2, temperature=0), "p3", [])
        return first[-1], again[-1], dropped, after[-1]

    first, again, dropped, after = asyncio.run(run())
    assert again.num_cached_tokens == 32 and dropped >= 4
    assert after.num_cached_tokens == 0 and after.token_ids == first.token_ids


# ---- supervision -------------------------------------------------------------------------------------


def test_a_killed_engine_process_is_restarted_and_in_flight_requests_fail_retryably(checkpoint):
    c = EngineProcessClient(EngineSpec(str(checkpoint), CONFIG, threads=1), restart=RestartPolicy(backoff_s=0.0))
    try:
        async def run():
            finished: list = []
            stream = c.add_request([1, 2, 3], SamplingParams(max_tokens=120, ignore_eos=True), "doomed",
                                   on_finish=finished.append)
            await stream.__anext__()
            old = c.pid
            os.kill(old, signal.SIGKILL)
            with pytest.raises(EngineRestartingError) as info:
                async for _ in stream:
                    pass
            assert info.value.retryable and isinstance(info.value, EngineDeadError)
            assert len(finished) == 1 and finished[0] is info.value
            # while the new process loads, requests are refused with the same retryable error
            with pytest.raises(EngineRestartingError):
                await collect(c, [1], SamplingParams(max_tokens=1), "early", finished)
            await asyncio.get_running_loop().run_in_executor(None, wait_until, lambda: c.is_healthy, 60)
            assert c.pid != old and not c.dead
            outs = await collect(c, [1, 2, 3], SamplingParams(max_tokens=5, ignore_eos=True), "after", finished)
            assert outs[-1].finished and len(outs[-1].token_ids) == 5 and finished[-1] == outs[-1]
            return info.value

        err = asyncio.run(run())
        assert c.restarts == 1
        assert "0x" not in str(err) and "Error(" not in str(err) and "Traceback" not in str(err)
    finally:
        c.close()


def test_restart_policy_backs_off_and_gives_up():
    p = RestartPolicy(max_restarts=3, window_s=60, backoff_s=1.0, max_backoff_s=3.0)
    assert [p.record_death(t) for t in (0, 1, 2)] == [1.0, 2.0, 3.0]
    assert p.record_death(3) is None                    # a fourth death within the window: give up
    q = RestartPolicy(max_restarts=1, window_s=10, backoff_s=0.5)
    assert q.record_death(0) == 0.5 and q.record_death(20) == 0.5  # the first one left the window


def test_default_threads_leave_the_parent_a_core():
    from muse.infer.engine_process import default_threads

    assert default_threads("cpu", 2, {}) == 1
    assert default_threads("cpu", 1, {}) == 1
    assert default_threads("cpu", 16, {}) == 15
    assert default_threads("cpu", 2, {"OMP_NUM_THREADS": "2"}) is None  # the user's choice stands
    assert default_threads("cuda", 16, {}) is None
