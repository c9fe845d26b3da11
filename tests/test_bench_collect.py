"""`edgeprune bench collect`'s parts: the sites' publishers and the CPU accounting (the whole run is the benchmark)."""

from __future__ import annotations

import os
import time

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.conftest import wait_until
from edgeprune.bench.collect import Publisher, cpu_times
from edgeprune.broker import free_port, start_broker, stop_process
from shared.schemas import Result, parse_json
from shared.settings import BrokerSettings


@pytest.fixture
def site_broker(tmp_path):
    """An anonymous site broker as the benchmark makes them."""
    settings = BrokerSettings(port=free_port(), data_dir=tmp_path / "site", allow_anonymous=True,
                              max_queued_messages=100_000)
    with open(tmp_path / "site.log", "w") as log:
        proc = start_broker(settings, log_file=log)
    yield settings.port
    stop_process(proc)


def test_every_published_result_reaches_the_site_broker_once_and_is_acknowledged(site_broker) -> None:
    received: list[bytes] = []
    sub = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    sub.on_message = lambda c, u, msg: received.append(msg.payload)
    sub.connect("127.0.0.1", site_broker)
    sub.subscribe("edgeprune/pipeline/results/+", qos=1)
    sub.loop_start()
    publisher = Publisher([site_broker, site_broker])  # two sites on one broker: both clients' results arrive
    try:
        before = time.time()
        offered = publisher.run(400, 1.0)
        assert offered > 0 and publisher.seq >= 200
        assert publisher.acknowledged() == publisher.seq
        wait_until(lambda: len(received) >= publisher.seq, 60, f"{len(received)} of {publisher.seq} arrived")
    finally:
        publisher.close()
        sub.loop_stop()
        sub.disconnect()
    results = [parse_json(Result, payload) for payload in received]
    assert sorted(r.request_id for r in results) == sorted(f"s{n % 2}-{n}" for n in range(publisher.seq))
    assert all(before <= r.capture_ts <= time.time() for r in results)


def test_a_site_whose_client_fails_acknowledges_none_of_its_results(site_broker) -> None:
    publisher = Publisher([site_broker, free_port()])  # nothing listens on the second site's port
    try:
        publisher.run(200, 1.0)
        assert publisher.acknowledged() == len(range(0, publisher.seq, 2))
    finally:
        publisher.close()


def test_cpu_times_count_what_a_process_used() -> None:
    cpu, _ = cpu_times([os.getpid()])
    start = time.thread_time()
    while time.thread_time() - start < 0.2:
        pass
    assert cpu_times([os.getpid()])[0] - cpu >= 0.1
    assert cpu_times([2**22 + 1]) == (0.0, 0.0)  # no such process
