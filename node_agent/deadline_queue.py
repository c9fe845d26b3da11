"""The node's bounded work queue, served timely-first: pure (the clock is passed in), no MQTT.

A request's deadline is its camera capture time plus the end-to-end SLO. In a backlog, serving in
arrival order spends the node on frames that can no longer meet the SLO while frames that still can
wait and miss it too. So :meth:`DeadlineQueue.get` returns the earliest deadline among the requests
that can still meet theirs (deadline > now: no service-time estimate, a frame that will miss by a
little still counts as timely), and only when none is left the oldest late one: a late frame is
still served, and marked ``deferred`` (it waited behind timely ones because it had missed its
deadline). The SLO is the same for every request, so earliest deadline = oldest capture, and the
late ones are exactly the oldest captures: one list sorted by capture time holds both lines.

Without an SLO (``slo_s`` None: none received yet), or with ``ordered`` off, it is FIFO as before.

Full: whichever request would be served last is dropped, the newcomer included: the youngest
of the late ones if any is late (it would wait behind every other), else the timely one with the
latest deadline (usually the newcomer); FIFO drops the newcomer, as a plain bounded queue does.

The queue also knows whether its one server is busy, so a request that finds the node idle is served at
once by the thread that received it, without a hand-off (:meth:`DeadlineQueue.claim`, docs/architecture.md).
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(order=True)
class _Entry(Generic[T]):
    capture_ts: float
    seq: int  # arrival order: FIFO, and ties between equal capture times
    item: T = field(compare=False)


class DeadlineQueue(Generic[T]):
    """Thread-safe, bounded; ``put`` never blocks (it returns what it dropped), ``get`` blocks like queue.Queue.

    Entries stay in arrival order and each choice scans them: the queue is short (``queue_size``), and an
    SLO that changes, or arrives while requests wait, needs no re-sorting.
    """

    def __init__(self, maxsize: int, clock: Callable[[], float], ordered: bool = True):
        if maxsize < 1:
            raise ValueError("maxsize must be at least 1")
        self.maxsize = maxsize
        self.ordered = ordered
        self.slo_s: float | None = None  # set from the gateway's placement; None: FIFO
        self._clock = clock  # the gateway's time (capture times are on the cameras', i.e. the gateway's, clock)
        self._entries: list[_Entry[T]] = []  # in arrival order
        self._seq = itertools.count()
        self._ready = threading.Condition()
        self._serving = False  # a request or a calibration run is in hand: from get or claim until done
        self._refuse_next = False  # input waited while a request was served on the receiving thread

    def _late_cutoff(self) -> float | None:
        """Capture times at or before this have missed their deadline; None: serve FIFO."""
        if not self.ordered or self.slo_s is None:
            return None
        return self._clock() - self.slo_s

    def put(self, item: T, capture_ts: float) -> T | None:
        """Queue ``item``; returns the item dropped to make room (maybe ``item`` itself), or None."""
        with self._ready:
            entry = _Entry(capture_ts, next(self._seq), item)
            self._entries.append(entry)
            dropped = None
            if len(self._entries) > self.maxsize:
                cutoff = self._late_cutoff()
                if cutoff is None:
                    dropped = entry
                else:  # the one that would be served last
                    late = [e for e in self._entries if e.capture_ts <= cutoff]
                    dropped = max(late or self._entries)
                self._entries.remove(dropped)
            if dropped is not entry:
                self._ready.notify()
            return dropped.item if dropped is not None else None

    def get(self, timeout: float) -> tuple[T, bool]:
        """The next item and whether it is *deferred* (late, served after the timely ones); queue.Empty on timeout."""
        with self._ready:
            if not self._ready.wait_for(lambda: self._entries, timeout):
                raise queue.Empty
            cutoff = self._late_cutoff()
            if cutoff is None:
                return self._entries.pop(0).item, False
            timely = [e for e in self._entries if e.capture_ts > cutoff]
            chosen = min(timely or self._entries)
            self._entries.remove(chosen)
            self._serving = True
            return chosen.item, not timely

    def claim(self, arriving: bool = True) -> bool:
        """Take the server now, on the caller's thread, instead of queueing: True when nothing waits and nothing
        is in hand (the caller serves, then calls :meth:`done`). Only the thread that puts may claim for an
        ``arriving`` request, so nothing can be queued while it serves.

        Refused once after :meth:`done` said input was waiting: what arrived while the receiving thread served
        is queued (served by deadline, shed when full), or a lasting overload would be served in arrival order
        by that thread and back up into the broker instead of being shed and counted. A calibration run
        (``arriving`` False) leaves that refusal to the next arrival."""
        with self._ready:
            if self._entries or self._serving:
                return False
            if arriving and self._refuse_next:
                self._refuse_next = False
                return False
            self._serving = True
            return True

    def late(self, capture_ts: float) -> bool:
        """Whether a request captured then has missed its deadline: one served at once after :meth:`claim` is
        ``deferred`` exactly when it is late, as :meth:`get` would mark it with nothing else waiting."""
        cutoff = self._late_cutoff()
        return cutoff is not None and capture_ts <= cutoff

    def done(self, input_waiting: bool = False) -> None:
        """The request (or calibration run) from :meth:`get` or :meth:`claim` is finished; ``input_waiting``:
        more input arrived meanwhile (the next :meth:`claim` for an arrival is refused)."""
        with self._ready:
            self._serving = False
            self._refuse_next = self._refuse_next or input_waiting

    def qsize(self) -> int:
        with self._ready:
            return len(self._entries)
