"""The LRU cache behind a plan's programs and the server's plans: its bounds, its order of
dropping, its counts, and a value made by two threads at once."""

from __future__ import annotations

import threading

from gradserve.engine.cache import LRU


def test_the_least_recently_used_goes_first() -> None:
    cache: LRU[str, int] = LRU(2)
    cache.get_or_make("a", lambda: 1)
    cache.get_or_make("b", lambda: 2)
    assert cache.get("a") == 1  # a is now the most recently used
    assert "b" in cache  # asking whether it is held is no use of it
    cache.get_or_make("c", lambda: 3)
    assert ("a" in cache, "b" in cache, "c" in cache) == (True, False, True)
    assert len(cache) == 2
    assert (cache.hits, cache.misses) == (1, 3)


def test_a_held_value_is_not_made_again() -> None:
    cache: LRU[str, int] = LRU(2)
    made: list[int] = []

    def make() -> int:
        made.append(7)
        return 7

    for _ in range(3):
        assert cache.get_or_make("a", make) == 7
    assert made == [7]
    assert (cache.hits, cache.misses) == (2, 1)


def test_the_weight_bound_keeps_the_newest_whatever_its_weight() -> None:
    cache: LRU[str, str] = LRU(100, weight=len, max_weight=10)
    cache.get_or_make("aaaa", lambda: "aaaa")
    cache.get_or_make("bbbb", lambda: "bbbb")
    cache.get("aaaa")
    cache.get_or_make("cccc", lambda: "cccc")  # 12: bbbb, the least recently used, goes
    assert ("aaaa" in cache, "bbbb" in cache, "cccc" in cache) == (True, False, True)
    cache.get_or_make("d" * 25, lambda: "d" * 25)  # over the bound alone: kept alone
    assert len(cache) == 1 and "d" * 25 in cache


def test_a_value_made_meanwhile_by_another_thread_stays() -> None:
    cache: LRU[str, object] = LRU(4, weight=lambda _: 1, max_weight=4)
    started, go = threading.Event(), threading.Event()
    first, second = object(), object()

    def slow() -> object:
        started.set()
        go.wait()
        return second

    worker = threading.Thread(target=lambda: cache.get_or_make("k", slow))
    worker.start()
    started.wait()
    assert cache.get_or_make("k", lambda: first) is first  # not held while the other makes it
    go.set()
    worker.join()
    assert cache.get("k") is first  # the one held first stays
    assert len(cache) == 1 and cache.misses == 2
