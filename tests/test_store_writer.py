"""The gateway's single writer thread: results batched, a retained prune state not held back by the batching."""

from __future__ import annotations

import threading

from gateway.store import Store


def test_a_callback_waiting_for_the_write_does_not_wait_for_the_batch_interval(tmp_path):
    """A prune command goes out only once its desired state is committed (after_write). With results batched
    every interval, it waited up to a whole interval: the writer now writes at once for it."""
    store = Store(tmp_path / "g.db")
    written = threading.Event()
    store.start_writer(3600.0, on_failure=lambda exc: None)  # a batch interval no test outlives
    try:
        store.after_write(written.set)
        assert written.wait(60), "the callback waited for the batch interval"
    finally:
        store.close()


def test_a_failing_disk_still_backs_off_whatever_waits(tmp_path, monkeypatch):
    """While writes fail the writer backs off; a waiting callback is called (control goes on) but does not make it
    retry at once, again and again."""
    store = Store(tmp_path / "g.db")
    attempts = []

    def refuse(pending):
        attempts.append(len(attempts))
        raise OSError("disk full")

    monkeypatch.setattr(store, "_write", refuse)
    called = threading.Event()
    failed = threading.Event()
    store.start_writer(3600.0, on_failure=lambda exc: failed.set())
    try:
        store.after_write(called.set)
        assert called.wait(60) and failed.wait(60)
        store.after_write(lambda: None)  # backing off now: this waits for the next try
        assert not threading.Event().wait(0.5) and len(attempts) == 1
    finally:
        monkeypatch.undo()
        store.close()
