"""Operator login: one password (werkzeug's salted scrypt hash), Flask's signed session cookie naming a
server-side session, a limit on failed attempts, and a check of where a login may send the browser.
CSRF is Flask-WTF's CSRFProtect (app.py)."""

from __future__ import annotations

import secrets
import threading
from collections import defaultdict, deque
from urllib.parse import urlsplit

from werkzeug.security import check_password_hash

# Every address together may fail this many times the per-user limit in a window: one address trying many names
# (the password is shared, so a name is no secret) is still slowed, while one careless user locks out only himself.
ADDRESS_FACTOR = 4


class LoginLimiter:
    """At most ``attempts`` failed logins per (address, name) in any ``window_s``, and ``ADDRESS_FACTOR`` times
    that per address whatever the names; the clock is passed in."""

    def __init__(self, attempts: int, window_s: float = 60.0):
        self.attempts = attempts
        self.window_s = window_s
        self._failures: dict[tuple[str, str | None], deque[float]] = defaultdict(deque)
        self._lock = threading.Lock()

    def _wait(self, key: tuple[str, str | None], limit: int, now: float) -> float:
        failures = self._failures[key]
        while failures and failures[0] <= now - self.window_s:
            failures.popleft()
        if not failures:
            del self._failures[key]  # forgotten addresses and names do not pile up
            return 0.0
        return failures[-limit] + self.window_s - now if len(failures) >= limit else 0.0

    def retry_after(self, address: str, name: str, now: float) -> float:
        """Seconds until ``name`` may try again from ``address`` (0 = now)."""
        with self._lock:
            return max(self._wait((address, name), self.attempts, now),
                       self._wait((address, None), self.attempts * ADDRESS_FACTOR, now))

    def failed(self, address: str, name: str, now: float) -> None:
        with self._lock:
            self._failures[(address, name)].append(now)
            self._failures[(address, None)].append(now)

    def succeeded(self, address: str, name: str) -> None:
        with self._lock:
            self._failures.pop((address, name), None)


class Sessions:
    """Logins that are still valid, by a random id the signed cookie carries.

    Flask's cookie is signed, not stored: clearing it at logout ends nothing for a copy taken before. So the
    cookie names a session here and every request looks it up; logout forgets it. Kept in this process: a
    restart of the page logs every operator out."""

    def __init__(self, lifetime_s: float):
        self.lifetime_s = lifetime_s
        self._sessions: dict[str, tuple[str, float]] = {}  # id -> (operator, expires)
        self._lock = threading.Lock()

    def start(self, operator: str, now: float) -> str:
        session_id = secrets.token_urlsafe(32)
        with self._lock:
            for expired in [k for k, (_, until) in self._sessions.items() if until <= now]:
                del self._sessions[expired]
            self._sessions[session_id] = (operator, now + self.lifetime_s)
        return session_id

    def operator(self, session_id: object, now: float) -> str | None:
        """Who is logged in with ``session_id`` (None: no such session, ended or expired)."""
        with self._lock:
            found = self._sessions.get(session_id) if isinstance(session_id, str) else None
        return found[0] if found and found[1] > now else None

    def end(self, session_id: object) -> None:
        with self._lock:
            if isinstance(session_id, str):
                self._sessions.pop(session_id, None)


def local_path(target: str) -> str | None:
    """``target`` as a path on this site to redirect to after login, or None when it could lead elsewhere.

    Browsers drop tabs and newlines anywhere in a URL and spaces and control characters around it, and read a
    backslash as a slash: ``/\\t/evil.example`` becomes ``//evil.example``, another host. So those characters
    go first, then only a path with a single leading slash and no scheme or host is accepted."""
    cleaned = "".join(c for c in target if c > " " and c != "\x7f")
    if "\\" in cleaned or not cleaned.startswith("/") or cleaned.startswith("//"):
        return None
    parts = urlsplit(cleaned)
    return cleaned if not parts.scheme and not parts.netloc else None


def password_ok(password_hash: str | None, password: str) -> bool:
    return bool(password_hash) and check_password_hash(password_hash, password)
