"""Taking a stage topic over from its old reader in a move, without losing or repeating an input: pure (time in).

A node prepared for a stage whose topic another node reads under the placement in force gets a copy of every input on
that topic from the moment it subscribes. Until the old reader says where it stopped (its hand-over marker,
:mod:`shared.handover`), this node holds those copies instead of leaving them to it: once the old reader has
switched to its new job it serves nothing more from the topic, and an input that reached it then, and this node
before its own switch, was acknowledged unserved by both and lost (docs/placement.md). On the marker the held inputs
up to the last one the old reader took are dropped (it served them) and the rest are served; later inputs on the
topic are this node's. If this node leaves the topic to its reader after all (another placement), the held copies
are dropped: the reader serves them. If the marker has not come ``timeout_s`` after this node put the topic's job in
force (the old reader died), the held inputs are served: a duplicate at worst, never a loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")  # the agent's held input (opaque here)
MAX_HELD = 2000  # per topic; beyond it the oldest copies go (the old reader, still serving, has them)


@dataclass
class _Waiting(Generic[T]):
    old_reader: str
    held: list[tuple[str | None, T]] = field(default_factory=list)  # (request id, input), in arrival order
    deadline: float | None = None  # set once this node reads the topic under the placement in force


class InputHandover(Generic[T]):
    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self._waiting: dict[str, _Waiting[T]] = {}
        self._handed: dict[str, str] = {}  # topic -> the old reader whose marker came: later inputs are this node's

    def holding(self, topic: str) -> bool:
        return topic in self._waiting

    def handed_over(self, topic: str) -> bool:
        return topic in self._handed

    def hold(self, topic: str, request_id: str | None, item: T, old_reader: str | None = None) -> None:
        """Keep ``item`` until ``old_reader``'s marker (named when the topic is first held)."""
        waiting = self._waiting.get(topic)
        if waiting is None:
            if old_reader is None:
                raise ValueError(f"holding {topic} for no reader")
            waiting = self._waiting[topic] = _Waiting(old_reader)
        waiting.held.append((request_id, item))
        del waiting.held[:-MAX_HELD]

    def marker(self, topic: str, from_node: str, last_request_id: str | None, leaving: str | None) -> list[T] | None:
        """``from_node`` stopped reading ``topic`` after taking ``last_request_id``: the held inputs to serve (those
        after it; all of them if it is not among them), and later inputs on the topic are this node's. ``leaving``:
        the reader this node is taking the topic over from (:meth:`Assignment.leaving_reader`), for a marker that
        comes before any input. None: not a marker this node waits for."""
        waiting = self._waiting.get(topic)
        if waiting is None or waiting.old_reader != from_node:
            if waiting is None and leaving == from_node:
                self._handed[topic] = from_node
                return []
            return None
        del self._waiting[topic]
        self._handed[topic] = from_node
        ids = [request_id for request_id, _ in waiting.held]
        start = ids.index(last_request_id) + 1 if last_request_id is not None and last_request_id in ids else 0
        return [item for _, item in waiting.held[start:]]

    def in_force(self, topics: set[str], now: float) -> None:
        """This node's job in force reads ``topics``: a marker that does not come within ``timeout_s`` for one of them
        is not waited for; held inputs of topics it does not read are dropped (their reader serves them)."""
        for topic in list(self._waiting):
            if topic in topics:
                waiting = self._waiting[topic]
                waiting.deadline = waiting.deadline if waiting.deadline is not None else now + self.timeout_s
            else:
                del self._waiting[topic]
        self._handed.clear()

    def expire(self, now: float) -> list[tuple[str, list[T]]]:
        """The held inputs of topics whose marker is overdue, to serve now."""
        overdue = [t for t, w in self._waiting.items() if w.deadline is not None and w.deadline <= now]
        return [(topic, [item for _, item in self._waiting.pop(topic).held]) for topic in overdue]
