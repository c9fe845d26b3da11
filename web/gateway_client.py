"""The page's only way to act: one-shot commands to the gateway's command topic, answered on its reply topic."""

from __future__ import annotations

import threading
import uuid

from shared.bus import Bus
from shared.schemas import CommandReply, GatewayCommand, parse_json, to_json
from shared.settings import MqttSettings
from shared.topics import Topics


class GatewayClient:
    def __init__(self, mqtt_settings: MqttSettings, gateway_id: str, timeout_s: float):
        self.topics = Topics(mqtt_settings.topic_root)
        self.gateway_id = gateway_id
        self.timeout_s = timeout_s
        self.bus = Bus(mqtt_settings, f"web-{uuid.uuid4().hex[:8]}", self.topics.component_status("web"))
        self._waiting: dict[str, tuple[threading.Event, list[CommandReply]]] = {}
        self._lock = threading.Lock()
        self.bus.subscribe(self.topics.component_reply(gateway_id), self._on_reply, qos=1)

    def start(self) -> None:
        self.bus.start(wait_s=None)

    def stop(self) -> None:
        self.bus.stop()

    def _on_reply(self, topic: str, payload: bytes, _props: dict[str, str]) -> None:
        reply = parse_json(CommandReply, payload)
        with self._lock:
            waiting = self._waiting.get(reply.id)
        if waiting:  # replies to other pages' commands are not ours
            waiting[1].append(reply)
            waiting[0].set()

    def send(self, command: GatewayCommand) -> tuple[bool, str]:
        """Publish ``command`` (its ``id`` set here) and wait for the gateway's answer."""
        if not self.bus.connected:
            return False, "the page is not connected to the MQTT broker; the command was not sent"
        command_id = uuid.uuid4().hex[:16]
        payload = command.root.model_copy(update={"id": command_id})
        done, replies = threading.Event(), []
        with self._lock:
            self._waiting[command_id] = (done, replies)
        try:
            self.bus.publish(self.topics.component_command(self.gateway_id), to_json(payload), qos=1)
            if not done.wait(self.timeout_s):
                return False, (f"the gateway did not answer within {self.timeout_s:g} s (is it running?); "
                               "the command may or may not have been applied")
            return replies[0].ok, replies[0].message
        finally:
            with self._lock:
                self._waiting.pop(command_id, None)
