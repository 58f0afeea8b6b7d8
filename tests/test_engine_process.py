"""EngineProcessClient: the engine in a child process gives every stream what the in-thread EngineClient
gives it, keeps EngineClient's on_finish contract, and fails loudly (never hangs) when the child dies."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time

import pytest

from muse.common.errors import CheckpointError, UsageError
from muse.infer.engine import Engine, EngineClient, EngineConfig, EngineDeadError
from muse.infer.engine_process import EngineProcessClient, EngineSpec
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
        c = EngineClient(Engine.from_checkpoint(checkpoint, CONFIG))
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


def test_a_dead_engine_process_fails_streams_and_refuses_work(checkpoint):
    c = EngineProcessClient(EngineSpec(str(checkpoint), CONFIG, threads=1))

    async def run():
        finished: list = []
        stream = c.add_request([1, 2, 3], SamplingParams(max_tokens=120, ignore_eos=True), "doomed",
                               on_finish=finished.append)
        await stream.__anext__()
        os.kill(c._proc.pid, signal.SIGKILL)
        with pytest.raises(EngineDeadError, match="exited unexpectedly"):
            async for _ in stream:
                pass
        assert len(finished) == 1 and isinstance(finished[0], EngineDeadError)
        assert not c.is_healthy and c.dead
        with pytest.raises(EngineDeadError):
            await collect(c, [1], SamplingParams(max_tokens=1), "after", finished)
        assert len(finished) == 2 and isinstance(finished[1], EngineDeadError)

    asyncio.run(run())
    c.close()


def test_shutdown_stops_the_process_and_fails_what_runs(checkpoint):
    c = EngineProcessClient(EngineSpec(str(checkpoint), CONFIG, threads=1))

    async def run():
        finished: list = []
        stream = c.add_request([1, 2, 3], SamplingParams(max_tokens=120, ignore_eos=True), "cut",
                               on_finish=finished.append)
        await stream.__anext__()
        await c.shutdown()
        assert c._proc.returncode == 0 and not c.is_healthy
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
            "print(c._proc.pid, flush=True)\n"
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
