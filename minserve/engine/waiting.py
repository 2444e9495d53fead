"""The scheduler's waiting requests in admission order: priority (lower first, vLLM's policy),
then arrival."""
from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator

from minserve.engine.request import Request


class WaitingQueue:
    """Waiting requests, lowest priority value first, then in arrival order. appendleft puts a
    request at the front of its own priority (a preempted request resumes first), so with every
    priority equal this is exactly a FIFO deque."""

    def __init__(self) -> None:
        self._items: list[tuple[int, int, Request]] = []   # (priority, seq, request), sorted
        self._back = self._front = 0

    def append(self, request: Request) -> None:
        self._back += 1
        bisect.insort(self._items, (request.priority, self._back, request),
                      key=lambda item: item[:2])

    def appendleft(self, request: Request) -> None:
        self._front -= 1
        bisect.insort(self._items, (request.priority, self._front, request),
                      key=lambda item: item[:2])

    def extendleft(self, requests: Iterable[Request]) -> None:
        for request in requests:
            self.appendleft(request)

    def peek(self) -> Request:
        return self._items[0][2]

    def popleft(self) -> Request:
        return self._items.pop(0)[2]

    def remove(self, request: Request) -> None:
        for i, item in enumerate(self._items):
            if item[2] is request:
                del self._items[i]
                return
        raise ValueError(f"{request.request_id} is not waiting")

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[Request]:
        return (item[2] for item in self._items)
