"""kiln.server.app.EventBridge: the scheduler thread's events reach each request's queue, in
order, with one wake-up of the event loop per burst."""

from __future__ import annotations

import asyncio
import threading

import pytest

from kiln.server.app import EventBridge


def test_a_burst_wakes_the_loop_once_and_keeps_each_queue_in_order():
    async def main():
        loop = asyncio.get_running_loop()
        wakes = []
        real = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda cb, *a: (wakes.append(cb), real(cb, *a))[1]
        bridge = EventBridge(loop)
        queues = [asyncio.Queue() for _ in range(3)]
        for burst in range(2):
            for i in range(30):  # the loop cannot drain before the next await
                bridge.put(queues[i % 3], (burst, i))
            assert len(wakes) == burst + 1
            await asyncio.sleep(0)
            for j, q in enumerate(queues):
                assert [q.get_nowait() for _ in range(10)] == [(burst, i) for i in range(j, 30, 3)]
                assert q.empty()

    asyncio.run(main())


def test_events_from_other_threads_all_arrive_in_order():
    async def main():
        bridge = EventBridge(asyncio.get_running_loop())
        queues = [asyncio.Queue() for _ in range(4)]

        def emit(q):
            for i in range(500):
                bridge.put(q, i)

        threads = [threading.Thread(target=emit, args=(q,)) for q in queues]
        for t in threads:
            t.start()
        for q in queues:
            assert [await asyncio.wait_for(q.get(), 10) for _ in range(500)] == list(range(500))
        for t in threads:
            t.join()

    asyncio.run(main())


def test_a_closed_loop_raises_and_leaves_no_event_behind():
    loop = asyncio.new_event_loop()
    bridge = EventBridge(loop)
    loop.close()
    q: asyncio.Queue = asyncio.Queue()
    for _ in range(2):  # the second put must try again, not wait on a drain never scheduled
        with pytest.raises(RuntimeError):
            bridge.put(q, 1)
