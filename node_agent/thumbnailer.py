"""Thumbnails off the hot path: made and sent by a thread of their own, at the lowest CPU priority.

Stage 1's inference thread only hands over the image its decode reduced anyway (no copy, no work); this thread
makes the JPEG (:func:`shared.thumbnail.make_thumbnail`, ~1 ms for a 12 MP frame) and sends it. Its queue is
short: a node too slow to keep up sends fewer thumbnails (counted, logged), never serves frames later. Free of MQTT:
``send`` (request id, JPEG bytes) is the agent's publish.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable

from PIL import Image

from shared.thumbnail import make_thumbnail

log = logging.getLogger(__name__)
LOWEST_PRIORITY = 19  # nice value: the thread runs when stage 1's own threads leave the CPU idle


class Thumbnailer:
    def __init__(self, send: Callable[[str, bytes], None], capacity: int = 4):
        self._send = send
        self._queue: queue.Queue[tuple[str, Image.Image] | None] = queue.Queue(capacity)
        self.sent = 0
        self.skipped = 0  # frames that got no thumbnail because the queue was full
        self.failed = 0
        self._thread = threading.Thread(target=self._run, name="thumbnails", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        try:
            self._queue.put_nowait(None)
        except queue.Full:  # busy: the daemon thread ends with the process
            return
        self._thread.join(timeout=5)

    def offer(self, request_id: str, frame: Image.Image) -> bool:
        """Queue a frame's thumbnail; False (counted) when the queue is full: that frame gets none."""
        try:
            self._queue.put_nowait((request_id, frame))
            return True
        except queue.Full:
            self.skipped += 1
            if self.skipped in (1, 10, 100) or self.skipped % 1000 == 0:
                log.warning("thumbnails fall behind: %d frames sent without one so far", self.skipped)
            return False

    def _run(self) -> None:
        try:  # Linux: a thread has a nice value of its own (setpriority on its thread id)
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LOWEST_PRIORITY)
        except OSError as exc:
            log.info("thumbnails run at normal priority: %s", exc)
        while (item := self._queue.get()) is not None:
            request_id, frame = item
            try:
                self._send(request_id, make_thumbnail(frame))
                self.sent += 1
            except Exception:  # never let one thumbnail end the thread: the frame itself is served already
                self.failed += 1
                log.exception("thumbnail of %s failed", request_id)
