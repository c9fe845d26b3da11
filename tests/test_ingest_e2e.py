"""Decoding as its own stage, end to end: an ingest node, two stage nodes and the gateway on a real mosquitto."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from shared.imaging import decode_frame, encode_jpeg, textured_scene
from shared.model import DEFAULT_CHECKPOINT, build_model
from tests.conftest import STARTUP_S, Processes, component_env, mosquitto_pub_login, open_reader, wait_until

pytestmark = pytest.mark.integration


def test_an_ingest_node_turns_a_real_jpeg_into_a_result_row_with_its_decode_recorded(broker, tmp_path):
    """The planner picks node-3 (ingest role) to ingest: the site's frames are 12 MP and the nodes emulate
    devices 1000x slower at the model (2.3 s for all of it, 1.26 s for the larger half), so two stages behind
    an ingest node (1.26 s) beat two stages of which one also decodes (1.26 s + its decode, or worse) unless
    node-3 measured its own decode over a second slower than theirs."""
    db = tmp_path / "edgeprune.db"
    env = component_env(broker, EDGEPRUNE_GATEWAY_DB_PATH=str(db), EDGEPRUNE_GATEWAY_NODES="node-1,node-2,node-3",
                        EDGEPRUNE_GATEWAY_FRAME_MEGAPIXELS="12", EDGEPRUNE_GATEWAY_FLUSH_INTERVAL_S="0.2",
                        EDGEPRUNE_NODE_STATS_INTERVAL_S="0.5",
                        EDGEPRUNE_NODE_PROFILE=str(DEFAULT_CHECKPOINT.with_name("trapnet.profile.json")),
                        EDGEPRUNE_NODE_EMULATED_SLOWDOWN="1000",
                        EDGEPRUNE_GATEWAY_REPLAN_MIN_GAIN="0")  # ingesting gains ~5% here: take any gain
    procs = Processes(tmp_path, env)
    try:
        procs.start("gateway", "gateway")
        procs.start("node-1", "node", "--node-id", "node-1")
        procs.start("node-2", "node", "--node-id", "node-2")
        procs.start("node-3", "node", "--node-id", "node-3", "--role", "ingest")
        reader = open_reader(db)
        wait_until(lambda: sorted((-1 if n["stage"] is None else n["stage"], n["node_id"] == "node-3")
                                  for n in reader.nodes()) == [(0, True), (1, False), (2, False)],
                   STARTUP_S, "node-3 never ingested for two stage nodes")
        placement = reader.placement()
        assert placement["ingest_node"] == "node-3"
        assert sorted(s["node_id"] for s in placement["stages"]) == ["node-1", "node-2"]

        photo = tmp_path / "IMG_0001.JPG"
        photo.write_bytes(encode_jpeg(textured_scene(1600, 1200, seed=4)))  # 2 MP: a real JPEG, quick to send
        subprocess.run(["mosquitto_pub", *mosquitto_pub_login(broker), "-q", "1", "-f", str(photo),
                        "-t", "edgeprune/camera/trap-9/frame", "-V", "mqttv5",
                        "-D", "publish", "user-property", "true_label", "2"], check=True, timeout=10)
        try:  # 1000x-emulated stages and a calibration ladder per node: minutes on a loaded host, not seconds
            wait_until(lambda: [r for r in reader.recent_requests(0) if r["camera_id"] == "trap-9"], 150,
                       "the JPEG never came out as a row")
        except AssertionError as missing:  # say where it stopped
            tails = "\n".join(f"--- {name}\n" + "\n".join(procs.log(name).splitlines()[-12:])
                               for name in ("gateway", "node-1", "node-2", "node-3"))
            raise AssertionError(f"{missing}; accounting {reader.accounting()}\n{tails}") from None
        (row,) = [r for r in reader.recent_requests(0) if r["camera_id"] == "trap-9"]
        hops = reader.db.execute("SELECT hops FROM requests WHERE request_id = ?", (row["request_id"],)).fetchone()[0]
        hops = json.loads(hops)
        assert [(h["stage"], h["node_id"]) for h in hops] == [(0, "node-3")] + [
            (s["stage"], s["node_id"]) for s in placement["stages"]]
        assert hops[0]["decode_s"] > 0  # the frame's decode, at the ingest hop (the stages' is the wire parse)
        assert row["decode_s"] == pytest.approx(sum(h["decode_s"] for h in hops))
        assert row["prune_ratios"] == [0.0, 0.0]  # one per stage: the ingest hop runs no slice
        with torch.inference_mode():
            expected = int(build_model()(torch.from_numpy(decode_frame(photo.read_bytes()))).argmax())
        assert row["label_index"] == expected
        assert reader.db.execute("SELECT true_label FROM requests WHERE request_id = ?",
                                 (row["request_id"],)).fetchone()[0] == 2
        (announced_by,) = reader.db.execute("SELECT node_id FROM accepted WHERE request_id = ?",
                                            (row["request_id"],)).fetchone()
        assert announced_by == "node-3"  # the ingest node took the frame: it announced it, as stage 1 did before
        assert reader.accounting()["in_flight"] == 0
    finally:
        procs.stop_all()
