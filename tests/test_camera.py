"""The camera simulator lets paho's thread send a frame before it makes the next one (no broker: a fake bus)."""

from __future__ import annotations

from camera import simulator
from camera.simulator import Camera, wait_acknowledged
from shared.settings import CameraSettings, MqttSettings


class FakeInfo:
    def __init__(self, events: list, error: Exception | None = None):
        self.events, self.error = events, error

    def wait_for_publish(self, timeout: float) -> None:
        self.events.append(("acknowledged", timeout))
        if self.error:
            raise self.error


class FakeBus:
    def __init__(self, events: list):
        self.events = events

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def publish(self, topic: str, payload: bytes, qos: int, user: dict) -> FakeInfo:
        self.events.append(("publish", user["request_id"]))
        return FakeInfo(self.events)


def test_each_frame_is_made_only_after_the_previous_one_is_acknowledged(monkeypatch):
    events: list = []
    monkeypatch.setattr(simulator, "Bus", lambda *_args: FakeBus(events))
    made = simulator.camera_frame

    def camera_frame(*args):
        events.append(("make", None))
        return made(*args)

    monkeypatch.setattr(simulator, "camera_frame", camera_frame)
    sent = Camera(CameraSettings(rate_hz=2.0, arrival="fixed", count=3), MqttSettings()).run()
    assert sent == 3
    kinds = [kind for kind, _ in events]
    assert kinds == ["make", "publish", "acknowledged", "make", "publish", "acknowledged", "make", "publish",
                     "acknowledged"]  # the last wait: before disconnecting
    between_frames = [timeout for kind, timeout in events[:-1] if kind == "acknowledged"]
    assert all(0 < t < 1 / 2.0 for t in between_frames)  # never past the next frame's time


def test_waiting_is_bounded_and_never_raises():
    events: list = []
    wait_acknowledged(FakeInfo(events), 0.0)
    wait_acknowledged(FakeInfo(events), -1.0)
    assert events == []  # the next frame is already due: no wait
    wait_acknowledged(FakeInfo(events, RuntimeError("not connected")), 0.5)
    wait_acknowledged(FakeInfo(events, ValueError("queue full")), 0.5)
    assert events == [("acknowledged", 0.5), ("acknowledged", 0.5)]
