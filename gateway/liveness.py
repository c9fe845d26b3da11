"""A node that stops publishing stats is hung (SIGSTOP, a stuck kernel, a full disk), even while its
TCP connection and so its MQTT status still look alive: the broker's will only fires after ~1.5x the
keepalive. Pure logic; the gateway passes the time in.
"""

from __future__ import annotations


class Liveness:
    """Nodes heard from (stats or an ``online`` status) within ``silence_s``."""

    def __init__(self, silence_s: float):
        self.silence_s = silence_s
        self._last: dict[str, float] = {}
        self._silent: set[str] = set()

    def heard(self, node_id: str, now: float) -> bool:
        """Record a sign of life; True if the node had been declared silent (it is back)."""
        self._last[node_id] = now
        if node_id in self._silent:
            self._silent.discard(node_id)
            return True
        return False

    def gone(self, node_id: str) -> None:
        """The node left by the broker's account (offline, stopped, retired): nothing to watch."""
        self._last.pop(node_id, None)
        self._silent.discard(node_id)

    def newly_silent(self, now: float) -> list[str]:
        """Nodes silent for longer than ``silence_s`` that were not reported yet."""
        found = [n for n, ts in self._last.items() if n not in self._silent and now - ts > self.silence_s]
        self._silent.update(found)
        return found

    def is_silent(self, node_id: str) -> bool:
        return node_id in self._silent
