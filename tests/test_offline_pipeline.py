"""The read/score/write threads: order kept, errors raised in the caller, nothing hangs."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from oodmon.offline._pipeline import BackgroundConsumer, prefetch


def test_prefetch_keeps_order_and_raises_the_producers_error() -> None:
    assert list(prefetch(range(50), depth=2)) == list(range(50))

    def broken() -> Iterator[int]:
        yield 1
        raise OSError("disk gone")

    got = []
    with pytest.raises(OSError, match="disk gone"):
        for item in prefetch(broken()):
            got.append(item)
    assert got == [1]
    early = prefetch(range(1000), depth=1)
    assert next(early) == 0
    early.close()  # stops the producer thread instead of leaving it blocked


def test_background_consumer_raises_the_consumers_error() -> None:
    seen: list[int] = []
    consumer: BackgroundConsumer[int] = BackgroundConsumer(seen.append)
    for i in range(20):
        consumer.put(i)
    consumer.close()
    assert seen == list(range(20))

    def fail(item: int) -> None:
        raise ValueError(f"cannot write {item}")

    failing: BackgroundConsumer[int] = BackgroundConsumer(fail, depth=1)
    with pytest.raises(ValueError, match="cannot write 0"):
        for i in range(100):  # put() notices the failure; it never blocks forever
            failing.put(i)
        failing.close()
