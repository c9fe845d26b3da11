"""Clock offset to the gateway, measured from its time beacon: pure (times are passed in).

End-to-end latency subtracts a camera's or node's timestamp from the gateway's, so what matters
is each device's offset to the *gateway's* clock, not to true time. A beacon carries the gateway's
``time.time()``; on arrival ``local - beacon`` is the offset plus the delivery delay (never
negative), so the smallest value over recent beacons is the best estimate (NTP's minimum filter):
accurate to the quickest delivery, a few milliseconds on a site LAN. It needs nothing but the
broker, so it works with or without chrony, in tests as on a Pi, and it checks what chrony only
promises.
"""

from __future__ import annotations

from collections import deque


class ClockOffset:
    """Offset of this device's clock minus the gateway's, from the last ``window`` beacons."""

    def __init__(self, window: int = 16):
        self._samples: deque[float] = deque(maxlen=window)

    def add(self, gateway_ts: float, received_ts: float) -> None:
        self._samples.append(received_ts - gateway_ts)

    @property
    def offset_s(self) -> float | None:
        """Positive: this device is ahead of the gateway. None before the first beacon."""
        return min(self._samples) if self._samples else None


def offset_suspect(offset_s: float | None, max_offset_s: float) -> bool:
    """True when a measured offset makes this device's timestamps unfit for end-to-end latency."""
    return offset_s is not None and abs(offset_s) > max_offset_s
