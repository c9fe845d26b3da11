"""Which results and desired states the gateway may believe, and where every accepted frame went.

Pure logic (no MQTT, no clock, no SQLite): the coordinator's parts (:mod:`gateway.data_path`, :mod:`gateway.placing`,
:mod:`gateway.desired_states`) feed it messages and store what it returns. Two defences against a leaked credential or
a confused device:

- :class:`RequestLedger`: a result counts only for a request the first stage announced as
  accepted, once; every accepted request ends as exactly one row or one failure with a reason,
  so *accepted = rows + failures + in flight* holds at any moment.
- :class:`DesiredGuard`: the gateway is the only writer of ``prune/set`` and ``placement``; a retained
  state it did not issue is never adopted.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from enum import Enum

# Error records that carry a request id but do not end the request (it is still served).
WARNING_KINDS = frozenset({"implausible_capture_ts"})
LOST = "lost"  # no result and no failure report within the gateway's result_timeout_s


class Verdict(str, Enum):
    STORE = "store"              # the first result of an accepted request: a new row
    LATE = "late"                # a result after the request was given up as lost: a row after all
    REDELIVERED = "redelivered"  # the same result again (QoS 1 redelivery): nothing to do
    DUPLICATE = "duplicate"      # the same frame served twice (another result, same camera and capture time)
    UNKNOWN = "unknown"          # no stage 1 accepted this request: forged or misrouted
    CONFLICT = "conflict"        # a different second result, or one that does not match the request


@dataclass
class _Entry:
    camera_id: str
    accepted_ts: float
    node_id: str | None = None  # the last node known to have held it: stage 1, or a node that reported it since
    digest: str | None = None   # of the stored result
    capture_ts: float | None = None  # of the stored result
    duplicates: set[str] = field(default_factory=set)  # digests of its duplicates, counted once each
    failed: str | None = None   # reason, once failed
    accepted_by: str | None = None  # stage 1's node (None: restored from a database without it)
    thumbnail: bool = False     # its thumbnail was stored


def digest(payload: bytes) -> str:
    return hashlib.blake2b(payload, digest_size=16).hexdigest()


class RequestLedger:
    """Requests stage 1 accepted, and how each ended; bounded to the ``capacity`` most recent."""

    def __init__(self, capacity: int = 200_000):
        self.capacity = capacity
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._pending: OrderedDict[str, None] = OrderedDict()  # accepted, no row, no failure (oldest first)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def accept(self, request_id: str, camera_id: str, ts: float, node_id: str | None = None) -> bool:
        """A request stage 1 (``node_id``) took; False if it was already known (a redelivered announcement)."""
        if request_id in self._entries:
            return False
        self._entries[request_id] = _Entry(camera_id, ts, node_id, accepted_by=node_id)
        self._pending[request_id] = None
        while len(self._entries) > self.capacity:
            old, _ = self._entries.popitem(last=False)
            self._pending.pop(old, None)
        return True

    def restore(self, request_id: str, camera_id: str, ts: float, stored: bool, failed: str | None,
                node_id: str | None = None) -> None:
        """Rebuild one entry from the database after a gateway restart."""
        self.accept(request_id, camera_id, ts, node_id)
        entry = self._entries[request_id]
        if stored:
            entry.digest = ""  # a row exists; its payload is unknown, so a repeat is not judged
        entry.failed = failed
        if stored or failed:
            self._pending.pop(request_id, None)

    def result(self, request_id: str, camera_id: str, payload: bytes, capture_ts: float | None = None) -> Verdict:
        """Judge one result message; only STORE and LATE may become rows.

        A second, different result of the same camera and capture time is the frame served twice (a replica
        killed between publishing its output and acknowledging its input, docs/reliability.md): a DUPLICATE,
        counted once; any other second result is a CONFLICT."""
        entry = self._entries.get(request_id)
        if entry is None:
            return Verdict.UNKNOWN
        this = digest(payload)
        if entry.digest is not None:
            if entry.digest in (this, "") or this in entry.duplicates:
                return Verdict.REDELIVERED
            if capture_ts is None or (camera_id, capture_ts) != (entry.camera_id, entry.capture_ts):
                return Verdict.CONFLICT
            entry.duplicates.add(this)
            return Verdict.DUPLICATE
        if camera_id != entry.camera_id:
            return Verdict.CONFLICT
        entry.digest, entry.capture_ts = this, capture_ts
        self._pending.pop(request_id, None)
        return Verdict.LATE if entry.failed else Verdict.STORE

    def thumbnail(self, request_id: str, node_id: str) -> str | None:
        """The camera of a request ``node_id`` accepted, the first time its thumbnail comes; else None (a node
        may show only the frames it took, once each)."""
        entry = self._entries.get(request_id)
        if entry is None or entry.accepted_by != node_id or entry.thumbnail:
            return None
        entry.thumbnail = True
        return entry.camera_id

    def held_by(self, request_id: str, node_id: str) -> None:
        """A node reported something about the request (an error or a warning): it got that far."""
        entry = self._entries.get(request_id)
        if entry is not None:
            entry.node_id = node_id

    def last_known(self, request_id: str) -> tuple[float | None, str | None]:
        """When the request was accepted and the last node known to have held it (None, None if unknown):
        the gateway sees a frame only when stage 1 announces it, a node reports it, or its result comes."""
        entry = self._entries.get(request_id)
        return (entry.accepted_ts, entry.node_id) if entry else (None, None)

    def fail(self, request_id: str, reason: str) -> bool:
        """A stage reported it could not serve the request; True if this ends an in-flight request."""
        if request_id not in self._pending:
            return False
        self._entries[request_id].failed = reason
        del self._pending[request_id]
        return True

    def expire(self, now: float, timeout_s: float) -> list[str]:
        """Requests in flight longer than ``timeout_s``: given up as :data:`LOST` (returned)."""
        lost = []
        for request_id in self._pending:
            if now - self._entries[request_id].accepted_ts < timeout_s:
                break  # oldest first
            lost.append(request_id)
        for request_id in lost:
            self.fail(request_id, LOST)
        return lost


class DesiredGuard:
    """Remembers the exact retained states the gateway recently issued, per key (a node id).

    Several are kept, not just the latest: when forgeries come fast, the echo of an earlier correction
    arrives after a newer one was issued, and must not count as a forgery (that would loop forever).
    """

    def __init__(self, issued: dict[str, bytes] | None = None, remember: int = 32):
        self._remember = remember
        self._issued: dict[str, deque[bytes]] = {}
        for key, payload in (issued or {}).items():
            self.issue(key, payload)

    def issue(self, key: str, payload: bytes) -> None:
        self._issued.setdefault(key, deque(maxlen=self._remember)).append(payload)

    def forget(self, key: str) -> None:
        self._issued.pop(key, None)

    def own(self, key: str, payload: bytes) -> bool:
        return payload in self._issued.get(key, ())

    def issued(self, key: str) -> bytes | None:
        """The latest: what to put back on the topic when someone else wrote there."""
        recent = self._issued.get(key)
        return recent[-1] if recent else None
