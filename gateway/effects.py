"""What one call of the coordinator decided, for :mod:`gateway.service` to carry out without judging it.

The coordinator and the parts it composes (:mod:`gateway.data_path`, :mod:`gateway.placing`,
:mod:`gateway.desired_states`, :mod:`gateway.commands`) write into the same :class:`Effects`, so one call's
publishes and store rows keep the order they were decided in.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shared.schemas import BadMessage


@dataclass(frozen=True)
class Publish:
    topic: str
    payload: bytes | str
    qos: int = 1
    retain: bool = False
    user: dict[str, str] | None = None  # MQTT v5 user properties (a re-sent frame's request id and capture time)
    # sent only once the rows decided before it are written (or their write failed): a retained state a restarted
    # gateway recalls from its database must not be undone by a SIGKILL before the write (a desired prune state)
    after_write: bool = False


@dataclass
class Effects:
    """What the service must carry out after one call, each list in order."""

    publish: list[Publish] = field(default_factory=list)
    store: list[tuple[str, tuple]] = field(default_factory=list)  # (a `Store` method, its arguments)
    drains: list[tuple[str, str]] = field(default_factory=list)   # (a gone node, the input it subscribed to)
    refusal: BadMessage | None = None  # the message was refused: reported once the rest is carried out

    def send(self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False,
             after_write: bool = False) -> None:
        self.publish.append(Publish(topic, payload, qos, retain, after_write=after_write))

    def write(self, method: str, *args) -> None:
        self.store.append((method, args))

    def extend(self, later: Effects) -> None:
        """``later``'s effects after these (one call's effects, then the next's)."""
        self.publish.extend(later.publish)
        self.store.extend(later.store)
        self.drains.extend(later.drains)
        self.refusal = self.refusal or later.refusal

    def rows(self, method: str) -> list:
        """The first argument of every call of ``method`` (for tests and logs)."""
        return [args[0] for m, args in self.store if m == method]

    def sent(self, topic: str) -> list[bytes | str]:
        return [p.payload for p in self.publish if p.topic == topic]
