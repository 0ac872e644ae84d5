"""Requests that take effect once: a repeat under the same request id gets the first answer, also
while the first still runs; a failure is forgotten; answers are kept for a while and in bounded
number (a next-case answer carries a proposal mask)."""

from __future__ import annotations

import asyncio

import pytest

from SegAssistLib.server.once import OnceReplies


def test_a_repeat_gets_the_first_answer_even_while_the_first_runs():
    calls = []

    async def make():
        calls.append(1)
        await asyncio.sleep(0.05)
        return f"answer {len(calls)}"

    async def scenario():
        once = OnceReplies()
        both = [once.run("alice", "next", "r1", make) for _ in range(2)]
        first, repeat = await asyncio.gather(*both)
        later = await once.run("alice", "next", "r1", make)
        other_user = await once.run("bob", "next", "r1", make)
        no_id = await once.run("alice", "next", None, make)
        return first, repeat, later, other_user, no_id

    first, repeat, later, other_user, no_id = asyncio.run(scenario())
    assert first == repeat == later == "answer 1"
    assert other_user == "answer 2" and no_id == "answer 3" and len(calls) == 3


def test_a_failure_is_forgotten_and_answers_expire_and_are_bounded():
    now = [0.0]
    calls = []

    async def fail():
        raise ValueError("locked")

    async def make():
        calls.append(1)
        return len(calls)

    async def scenario():
        once = OnceReplies(capacity=3, keep_s=600.0, clock=lambda: now[0])
        with pytest.raises(ValueError):
            await once.run("alice", "label", "r1", fail)
        assert await once.run("alice", "label", "r1", make) == 1  # the failed try is not the answer
        assert await once.run("alice", "label", "r1", make) == 1
        now[0] += 601.0
        assert await once.run("alice", "label", "r1", make) == 2  # kept ten minutes, not for ever
        for i in range(5):
            await once.run("alice", "label", f"other{i}", make)
        assert len(once) == 3
        return once

    asyncio.run(scenario())


def test_a_running_request_is_not_forgotten_when_many_others_arrive():
    """More requests than ``capacity`` while a slow save runs: its repeat still waits for it
    instead of saving a second version."""
    calls = []

    async def slow(release: asyncio.Event):
        calls.append("slow")
        await release.wait()
        return "saved once"

    async def quick():
        calls.append("quick")
        return "quick"

    async def scenario():
        once = OnceReplies(capacity=2)
        release = asyncio.Event()
        first = asyncio.ensure_future(once.run("alice", "label", "save", lambda: slow(release)))
        await asyncio.sleep(0)
        for i in range(5):
            await once.run("alice", "label", f"other{i}", quick)
        repeat = asyncio.ensure_future(once.run("alice", "label", "save", lambda: slow(release)))
        await asyncio.sleep(0)
        release.set()
        answers = await asyncio.gather(first, repeat)
        for i in range(5, 8):  # once done, the slow answer is bounded like the rest
            await once.run("alice", "label", f"other{i}", quick)
        return answers, len(once)

    answers, kept = asyncio.run(scenario())
    assert answers == ["saved once", "saved once"]
    assert calls.count("slow") == 1
    assert kept == 2
