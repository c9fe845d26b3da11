"""The raw baseline of `edgeprune bench overhead`: paho clients and nothing of ours, at the pipeline's sizes.

A source publishes, two relays (each its own process) pass the message on, a sink receives; QoS 1 as the pipeline
sends. Its own module, importing neither torch nor the pipeline: each relay is a spawned process that imports
only this, so starting one costs an interpreter, not the model's libraries.
"""

from __future__ import annotations

import multiprocessing
import queue
import socket
import struct
import sys
import threading
import time

import numpy as np

from shared.settings import MqttSettings

RELAY_MODES = ("callback", "worker")
_STAMPS = struct.Struct("<I3d")  # sequence number, then when the source sent it and relay 1 and 2 received it


def _client(mqtt: MqttSettings, name: str):
    """A plain paho client (MQTT v5, the project's login, TCP_NODELAY as shared/bus.py sets it), connected."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=name, protocol=paho.MQTTv5)
    client.username_pw_set(mqtt.username, mqtt.password.get_secret_value())
    client.connect(mqtt.host, mqtt.port)
    client.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return client


def _topics(mqtt: MqttSettings, mode: str) -> list[str]:
    base = f"{mqtt.topic_root}/bench/overhead/{mode}"
    return [f"{base}/hop{i}" for i in (1, 2, 3)]


def _relay(mqtt: MqttSettings, index: int, out_size: int, ready, stop) -> None:
    """One relay process, with a client of its own for each mode (the modes run one after the other): stamp the
    arrival into the message, resize it to the next hop's size, publish it on."""
    clients = [_relay_client(mqtt, index, out_size, mode, stop) for mode in RELAY_MODES]
    ready.set()
    stop.wait()
    for client in clients:
        client.loop_stop()
        client.disconnect()


def _relay_client(mqtt: MqttSettings, index: int, out_size: int, mode: str, stop):
    client = _client(mqtt, f"bench-relay-{mode}-{index}")
    topics = _topics(mqtt, mode)
    in_topic, out_topic = topics[index - 1], topics[index]
    subscribed = threading.Event()
    work: queue.Queue = queue.Queue()

    def forward(payload: bytes, received: float) -> None:
        seq, *stamps = _STAMPS.unpack_from(payload)
        stamps[index] = received
        out = bytearray(out_size)
        _STAMPS.pack_into(out, 0, seq, *stamps)
        client.publish(out_topic, bytes(out), qos=1)

    def on_message(_client, _userdata, msg) -> None:
        received = time.time()
        if mode == "callback":
            forward(msg.payload, received)
        else:
            work.put((msg.payload, received))

    def worker() -> None:
        while not stop.is_set():
            try:
                forward(*work.get(timeout=0.2))
            except queue.Empty:
                pass

    client.on_message = on_message
    client.on_subscribe = lambda *_: subscribed.set()
    client.loop_start()
    client.subscribe(in_topic, qos=1)
    subscribed.wait(10)
    if mode == "worker":
        threading.Thread(target=worker, daemon=True).start()
    return client


def relay_chains(mqtt: MqttSettings, sizes: tuple[int, int, int], messages: int, rate: float) -> dict[str, dict]:
    """Each mode's chain, source -> relay 1 -> relay 2 -> sink, one message at a time at ``rate``; per-hop and
    total (ms). Two relay processes serve every mode: starting an interpreter costs more than the runs."""
    context = multiprocessing.get_context("spawn")
    stop = context.Event()
    readies = [context.Event() for _ in (1, 2)]
    relays = [context.Process(target=_relay, args=(mqtt, i, sizes[i], readies[i - 1], stop), daemon=True)
              for i in (1, 2)]
    for relay in relays:
        relay.start()
    try:
        if not all(r.wait(120) for r in readies):
            raise SystemExit("the raw relays did not start; is the broker up?")
        return {mode: _chain(mqtt, sizes, messages, rate, mode) for mode in RELAY_MODES}
    finally:
        stop.set()
        for relay in relays:
            relay.join(10)


def _chain(mqtt: MqttSettings, sizes: tuple[int, int, int], messages: int, rate: float, mode: str) -> dict:
    topics = _topics(mqtt, mode)
    arrivals: dict[int, tuple[tuple[float, ...], float]] = {}
    got = threading.Event()
    sink = _client(mqtt, f"bench-sink-{mode}")
    subscribed = threading.Event()

    def on_message(_client, _userdata, msg) -> None:
        received = time.time()
        seq, *stamps = _STAMPS.unpack_from(msg.payload)
        arrivals[seq] = (tuple(stamps), received)
        got.set()

    sink.on_message = on_message
    sink.on_subscribe = lambda *_: subscribed.set()
    sink.loop_start()
    sink.subscribe(topics[2], qos=1)
    source = _client(mqtt, f"bench-source-{mode}")
    source.loop_start()
    try:
        if not subscribed.wait(10):
            raise SystemExit("the raw sink could not subscribe; is the broker up?")
        warmup = 10
        print(f"raw relay ({mode}): {messages} messages at {rate:g}/s", file=sys.stderr, flush=True)
        started = time.monotonic()
        for seq in range(warmup + messages):
            time.sleep(max(0.0, started + seq / rate - time.monotonic()))
            payload = bytearray(sizes[0])
            _STAMPS.pack_into(payload, 0, seq, time.time(), 0.0, 0.0)
            source.publish(topics[0], bytes(payload), qos=1)
        deadline = time.monotonic() + 30
        while len(arrivals) < warmup + messages and time.monotonic() < deadline:
            got.wait(1.0)
            got.clear()
    finally:
        for client in (source, sink):
            client.loop_stop()
            client.disconnect()
    parts: dict[str, list[float]] = {}
    for seq, ((sent, relay1, relay2), received) in arrivals.items():
        if seq < warmup:
            continue
        for name, value in (("hop 1 (frame)", relay1 - sent), ("hop 2 (activation)", relay2 - relay1),
                            ("hop 3 (result)", received - relay2), ("total, 3 hops", received - sent),
                            ("hops 2+3", received - relay1)):
            parts.setdefault(name, []).append(value)
    out = {name: {"p50_ms": 1000 * float(np.percentile(v, 50)), "p99_ms": 1000 * float(np.percentile(v, 99))}
           for name, v in parts.items()}
    out["messages"] = sum(1 for seq in arrivals if seq >= warmup)
    return out
