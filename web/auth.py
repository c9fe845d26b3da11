"""Operator login: one password (werkzeug's salted scrypt hash), Flask's signed session cookie, and a
small in-process limit on failed attempts per client address. CSRF is Flask-WTF's CSRFProtect (app.py)."""

from __future__ import annotations

import threading
from collections import defaultdict, deque

from werkzeug.security import check_password_hash


class LoginLimiter:
    """At most ``attempts`` failed logins per address in any ``window_s``; the clock is passed in."""

    def __init__(self, attempts: int, window_s: float = 60.0):
        self.attempts = attempts
        self.window_s = window_s
        self._failures: dict[str, deque[float]] = defaultdict(deque)
        self._lock = threading.Lock()

    def retry_after(self, address: str, now: float) -> float:
        """Seconds until ``address`` may try again (0 = now)."""
        with self._lock:
            failures = self._failures[address]
            while failures and failures[0] <= now - self.window_s:
                failures.popleft()
            if len(failures) < self.attempts:
                return 0.0
            return failures[0] + self.window_s - now

    def failed(self, address: str, now: float) -> None:
        with self._lock:
            self._failures[address].append(now)

    def succeeded(self, address: str) -> None:
        with self._lock:
            self._failures.pop(address, None)


def password_ok(password_hash: str | None, password: str) -> bool:
    return bool(password_hash) and check_password_hash(password_hash, password)
