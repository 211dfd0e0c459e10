"""futex(2) wait/wake (kernel/futex/, reduced): waiters sleep on (mm, address) until a
FUTEX_WAKE picks them, in FIFO order. Timeouts are not modelled (a timed wait waits
until woken)."""
from __future__ import annotations

from collections import defaultdict, deque


class FutexWaiter:
    """One sleeping thread; the scheduler lets it run once ``woken`` is set."""

    def __init__(self, thread: object) -> None:
        self.thread = thread
        self.woken = False

    def try_acquire(self, task: object, mode: str = "wait") -> bool:
        return self.woken

    def post(self) -> None:
        self.woken = True

    def __repr__(self) -> str:
        return f"<futex waiter {getattr(self.thread, 'tid', '?')}>"


class Futexes:
    def __init__(self) -> None:
        self.queues: dict[tuple[int, int], deque[FutexWaiter]] = defaultdict(deque)

    def enqueue(self, mm: object, uaddr: int, thread: object) -> FutexWaiter:
        waiter = FutexWaiter(thread)
        self.queues[(id(mm), uaddr)].append(waiter)
        return waiter

    def wake(self, mm: object, uaddr: int, n: int) -> int:
        """Wake up to ``n`` waiters on ``uaddr``; returns how many."""
        q = self.queues.get((id(mm), uaddr))
        woken = 0
        while q and woken < n:
            q.popleft().post()
            woken += 1
        return woken

    def wake_all_of(self, threads: list) -> None:
        """exit_group(): every sleeping thread of the process must get up and die."""
        for q in self.queues.values():
            for w in list(q):
                if w.thread in threads:
                    q.remove(w)
                    w.post()
