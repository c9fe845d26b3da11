"""A camera's connection: frames published QoS 1 on its frame topic with their user properties, a frame over the
broker's size limit logged and not sent, and (on request) each frame the broker refused in its PUBACK reported.

The simulator's :class:`camera.simulator.Camera` and the soak's camera (its own trace, exact request ids, bad frames)
publish through it, so every camera of the project connects the way a device does: through ``shared.bus``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from shared.bus import Bus
from shared.settings import MqttSettings
from shared.topics import Topics

log = logging.getLogger(__name__)


class FramePublisher:
    def __init__(self, mqtt_settings: MqttSettings, camera_id: str, on_refused: Callable[[int], None] | None = None):
        """``on_refused(mid)``: called (on paho's thread) for each frame the broker answered with a failure code."""
        self.camera_id = camera_id
        self.topics = Topics(mqtt_settings.topic_root)
        self.bus = Bus(mqtt_settings, camera_id, self.topics.component_status(camera_id))
        if on_refused is not None:
            self.bus.on_publish_refused(on_refused)

    def start(self) -> None:
        self.bus.start()

    @property
    def connected(self) -> bool:
        return self.bus.connected

    def publish(self, payload: bytes, user: dict[str, str], camera: str | None = None):
        """One frame (``user`` holds its ``request_id``) on ``camera``'s topic (default: this camera's); its publish
        info, or None when it is over the broker's limit: the broker would cut the connection (docs/mqtt.md)."""
        topic = self.topics.camera_frame(camera or self.camera_id)
        if not self.bus.fits(topic, payload, user):
            log.error("%s: frame %s of %d B is over the broker's limit of %d B per message: not sent",
                      self.camera_id, user["request_id"], len(payload), self.bus.max_packet_size)
            return None
        return self.bus.publish(topic, payload, qos=1, user=user)

    def stop(self) -> None:
        self.bus.stop()
