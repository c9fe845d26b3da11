"""Profiles measure the real blocks, survive a JSON round trip, and bad files fail with the field named."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from edgeprune.commands import profile as profile_command
from shared.model import build_model
from shared.profiling import ClusterSpec, ProfileError, load_cluster, load_profile, profile_model, save_profile
from shared.schemas import ModelProfile


@pytest.fixture(scope="module")
def model():
    return build_model()


@pytest.fixture(scope="module")
def measured(model) -> ModelProfile:
    return profile_model(model, threads=1, repeats=2, warmup=1, wire_dtype="float16")


def test_profile_describes_every_block(model, measured: ModelProfile) -> None:
    assert [b.name for b in measured.blocks] == model.block_names
    for block, module in zip(measured.blocks, model.blocks):
        assert block.param_bytes == sum(p.numel() * 4 for p in module.parameters()) + sum(
            b.numel() * b.element_size() for b in module.buffers())
        assert block.latency_s > 0
    assert measured.blocks[0].activation_bytes == 3 * 64 * 64 * 4 + measured.blocks[0].output_bytes * 2
    assert measured.blocks[-1].output_bytes == len(model(torch.zeros(1, 3, 64, 64))[0]) * 2  # float16 logits


def test_wire_dtype_sets_the_output_bytes(model, measured: ModelProfile) -> None:
    wide = profile_model(model, threads=1, repeats=1, warmup=0, wire_dtype="float32")
    assert [b.output_bytes for b in wide.blocks] == [2 * b.output_bytes for b in measured.blocks]
    assert [b.activation_bytes for b in wide.blocks] == [b.activation_bytes for b in measured.blocks]


def test_profiling_restores_the_thread_count(model) -> None:
    before = torch.get_num_threads()
    profile_model(model, threads=before + 1, repeats=1, warmup=0)
    assert torch.get_num_threads() == before


def test_profile_json_round_trip(tmp_path, measured: ModelProfile) -> None:
    save_profile(measured, tmp_path / "profile.json")
    assert load_profile(tmp_path / "profile.json") == measured


def test_scaled_profile_multiplies_latency_only(measured: ModelProfile) -> None:
    slow = measured.scaled(2.5)
    assert [b.latency_s for b in slow.blocks] == [2.5 * b.latency_s for b in measured.blocks]
    assert [b.param_bytes for b in slow.blocks] == [b.param_bytes for b in measured.blocks]


def test_profile_schema_errors_name_file_and_field(tmp_path, measured: ModelProfile) -> None:
    raw = json.loads(measured.model_dump_json())
    raw["blocks"][2]["latency_s"] = -1
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(ProfileError, match=r"bad.json: ModelProfile: blocks.2.latency_s: .*greater than or equal"):
        load_profile(path)
    path.write_text("{not json")
    with pytest.raises(ProfileError, match="bad.json: .*not JSON"):
        load_profile(path)
    with pytest.raises(ProfileError, match="missing.json: cannot read"):
        load_profile(tmp_path / "missing.json")


CLUSTER = {
    "camera": {"frame_bytes": 12288, "bandwidth_mbit_s": 20},
    "devices": [{"id": "pi-a", "memory_mb": 256, "bandwidth_mbit_s": 50},
                {"id": "pi-b", "memory_mb": 128, "bandwidth_mbit_s": 20, "speed_factor": 2, "profile": "b.json"}],
    "links": [{"from": "pi-a", "to": "pi-b", "bandwidth_mbit_s": 10}, {"from": "camera", "to": "pi-a",
                                                                       "bandwidth_mbit_s": 5}],
}


def test_cluster_file_loads_with_units_converted(tmp_path) -> None:
    path = tmp_path / "devices.json"
    path.write_text(json.dumps(CLUSTER))
    cluster = load_cluster(path)
    assert cluster.devices[1].memory_bytes == 128_000_000
    assert cluster.devices[1].bandwidth_bps == 2_500_000
    assert cluster.links[0].sender == "pi-a" and cluster.links[0].bandwidth_bps == 1_250_000
    assert ClusterSpec.model_validate_json(cluster.model_dump_json(by_alias=True)) == cluster


@pytest.mark.parametrize("change, message", [
    (lambda c: c["devices"].append(dict(c["devices"][0])), "device ids must be unique: pi-a repeated"),
    (lambda c: c["devices"][0].update(id="gateway"), "reserved"),
    (lambda c: c["devices"][0].update(id="pi/a"), "must be 1-64 characters"),
    (lambda c: c["links"].append({"from": "pi-a", "to": "pi-z", "bandwidth_mbit_s": 1}), "pi-a->pi-z names an unknown"),
    (lambda c: c["devices"][0].update(memory_mb=0), "devices.0.memory_mb: .*greater than 0"),
    (lambda c: c["devices"][0].update(ram=1), "devices.0.ram: Extra inputs"),
    (lambda c: c.pop("camera"), "camera: Field required"),
])
def test_cluster_schema_errors(tmp_path, change, message) -> None:
    cluster = json.loads(json.dumps(CLUSTER))
    change(cluster)
    path = tmp_path / "devices.json"
    path.write_text(json.dumps(cluster))
    with pytest.raises(ProfileError, match=message):
        load_cluster(path)


def test_profile_command_writes_the_profile(tmp_path, capsys) -> None:
    parser = argparse.ArgumentParser()
    profile_command.register(parser.add_subparsers())
    args = parser.parse_args(["profile", "--repeats", "1", "--warmup", "0", "--out", str(tmp_path / "p.json")])
    assert args.func(args) == 0
    written = load_profile(tmp_path / "p.json")
    assert written.repeats == 1 and written.wire_dtype == "float16"
    printed = capsys.readouterr().out
    assert all(b.name in printed for b in written.blocks)


def test_node_offers_a_configured_profile_file_instead_of_measuring(tmp_path) -> None:
    from node_agent.agent import NodeAgent
    from shared.settings import MqttSettings, NodeSettings

    profile = ModelProfile(model="trapnet", host="elsewhere", threads=1, repeats=1, warmup=0, wire_dtype="float16",
                           blocks=[dict(name=n, latency_s=0.001 * (i + 1), param_bytes=1, activation_bytes=1,
                                        output_bytes=1) for i, n in enumerate(build_model().block_names)])
    save_profile(profile, tmp_path / "fixed.json")
    agent = NodeAgent(NodeSettings(node_id="n1", profile=tmp_path / "fixed.json", emulated_slowdown=2.0,
                                   memory_mb=100), MqttSettings())
    offer = agent.measure_offer()
    assert [b.latency_s for b in offer.profile.blocks] == pytest.approx([0.002 * (i + 1) for i in range(6)])
    assert offer.profile.host == "elsewhere"  # the file's figures, not a measurement here

    other = profile.model_copy(update={"blocks": profile.blocks[:-1]})
    save_profile(other, tmp_path / "other.json")
    agent.settings = NodeSettings(node_id="n1", profile=tmp_path / "other.json")
    with pytest.raises(ProfileError, match="other.json"):
        agent.measure_offer()


def test_an_emulated_node_offers_its_device_models_block_times(tmp_path) -> None:
    """The planner and the controller's provisional curves after a move read the offer: an emulated node that
    served with the device model but offered a profile measured elsewhere mispredicted a moved slice ~1.4-4x."""
    from node_agent.agent import NodeAgent
    from shared.device_model import DeviceModel
    from shared.model import model_fingerprint
    from shared.settings import MqttSettings, NodeSettings

    model = build_model()
    per_block = [0.001 * (i + 1) for i in range(model.n_blocks)]
    ratios = (0.0, 0.5)
    DeviceModel(model_fingerprint(model), model.n_blocks, ratios,
                {(a, b): tuple(sum(per_block[a:b + 1]) * (1 - r) for r in ratios)
                 for a in range(model.n_blocks) for b in range(a, model.n_blocks)}).save(tmp_path / "device.json")
    agent = NodeAgent(NodeSettings(node_id="n1", device_model=tmp_path / "device.json", emulated_slowdown=3.0,
                                   memory_mb=100, profile_repeats=1), MqttSettings())
    assert [b.latency_s for b in agent.measure_offer().profile.blocks] == pytest.approx([3 * t for t in per_block])
