"""The overview document (`GET /api/status`): what the page draws, and the state in words and badges.

The state is worded here, not in the browser, so it is tested once and scripts get the same sentences. A page
polls with ``since=<cursor>`` (the ``cursor`` of its last answer) and gets only the frames and windows written
after it; everything else is small and comes whole each time. Frames are picked by rowid, not time: the gateway
writes in batches, so a frame that finished before the last poll can be written after it.
"""

from __future__ import annotations

from datetime import datetime

from gateway.store import Reader
from shared.clock import offset_suspect
from shared.schemas import INGEST_STAGE
from shared.settings import ControllerSettings

RECENT_ATTAINMENT_S = 300.0  # the header's attainment: the last 5 minutes of the current run
IDLE_AFTER_S = 30.0  # a node that ran no hop for this long is idle: its slowdown estimate is stale, not shown
# the controller's own line between "slowed" and "slowdown gone" (its documented default)
SLOWED_ABOVE = ControllerSettings.model_fields["slowdown_gone"].default
TOLERANCE = 1e-6


def pipeline_of(placement: dict | None) -> list[dict]:
    """The placement as hops, each with every node serving it: the ingest node (stage 0, when there is one),
    then each stage with its first node and its replicas and its pipeline (0 unless there are parallel ones), so
    nobody has to know how a placement row nests them."""
    if placement is None:
        return []
    ingest = placement.get("ingest_node")
    hops = [{"stage": INGEST_STAGE, "pipeline": 0, "first_block": None, "last_block": None, "nodes": [ingest]}
            ] if ingest else []
    return hops + [{"stage": s["stage"], "pipeline": s.get("pipeline", 0), "first_block": s["first_block"],
                    "last_block": s["last_block"], "nodes": [s["node_id"], *s.get("replicas", [])]}
                   for s in placement["stages"]]


def placement_words(number: int, pipeline: list[dict]) -> str:
    """"placement 3: ingest pi-e → 1 pi-a (blocks 0–2) → 2 pi-b + pi-c (blocks 3–5)"; parallel pipelines apart by
    " ∥ "."""
    chains: dict[int, list[str]] = {}
    for h in pipeline:
        chains.setdefault(h["pipeline"], []).append(
            f"ingest {h['nodes'][0]}" if h["stage"] == INGEST_STAGE else
            f"{h['stage']} {' + '.join(h['nodes'])} (blocks {h['first_block']}–{h['last_block']})")
    return f"placement {number}: " + " ∥ ".join(" → ".join(hops) for _, hops in sorted(chains.items()))


def infeasible_nodes(events: list[dict]) -> set[str]:
    """Nodes whose predicted stage time exceeds the budget in the controller's latest decision, when that decision
    said no ratio meets the budget (an ``infeasible`` event no older than the last ``set``)."""
    last = {}
    for event in events:  # newest first
        last.setdefault(event["kind"], event)
    bad = last.get("infeasible")
    if bad is None or ("set" in last and last["set"]["ts"] > bad["ts"] + 1e-3):
        return set()
    stage_s, budget = bad.get("predicted_stage_s") or [], bad.get("budget_s")
    return {node for node, s in zip((bad.get("ratios") or {}), stage_s) if budget is not None and s > budget}


def badges(node: dict, controller: dict, serving: set[str], infeasible: set[str]) -> list[dict]:
    """What a technician needs to see on a node's card, each as ``{"kind", "text"}``."""
    node_id, out = node["node_id"], []
    if node.get("status") != "online":
        out.append({"kind": "offline", "text": node.get("status") or "never seen"})
    if node.get("stage") == INGEST_STAGE:
        out.append({"kind": "ingest", "text": "ingest"})
    elif len(node.get("stage_nodes") or []) > 1:
        out.append({"kind": "replica", "text": "replica of " + ", ".join(n for n in node["stage_nodes"]
                                                                          if n != node_id)})
    slowdown = (controller.get("slowdowns") or {}).get(node_id)
    if slowdown is not None and slowdown > SLOWED_ABOVE and node_id in serving:
        out.append({"kind": "slowed", "text": f"slowed ×{slowdown:.1f}"})
    desired, applied = node.get("desired_ratio"), node.get("prune_ratio")
    if node_id in (controller.get("manual") or {}):
        out.append({"kind": "held", "text": f"held {controller['manual'][node_id]:g} by the operator"})
    elif desired:
        out.append({"kind": "pruned", "text": f"pruned {desired:g} by the controller"})
    if desired is not None and applied is not None and abs(desired - applied) > TOLERANCE:
        out.append({"kind": "applying", "text": f"going to {desired:g} (node still at {applied:g})"})
    if node_id in infeasible:
        out.append({"kind": "infeasible", "text": "infeasible: over budget at the highest ratio"})
    if node.get("clock_suspect"):
        out.append({"kind": "clock", "text": "clock off: latencies unreliable"})
    return out


def controller_words(controller: dict | None, nodes: list[dict], events: list[dict], infeasible: set[str]) -> str:
    """The controller's state as a sentence: what it prunes and why, what the operator holds, what it cannot do."""
    if not controller:
        return "no controller status yet (is the gateway running?)"
    if not controller.get("enabled"):
        return f"controller off: {controller.get('reason') or 'no reason given'}"
    manual, slowdowns = controller.get("manual") or {}, controller.get("slowdowns") or {}
    parts = []
    pruned = [n for n in nodes if n.get("desired_ratio") and n["node_id"] not in manual]
    for n in pruned:
        k = slowdowns.get(n["node_id"])
        why = f" because its compute is {k:.1f}× its calibration" if k is not None and k > SLOWED_ABOVE else ""
        parts.append(f"pruning {n['node_id']} to {n['desired_ratio']:g}{why}")
    last_set = next((e for e in events if e["kind"] == "set" and e.get("predicted_accuracy") is not None), None)
    floor = controller.get("accuracy_floor")
    if pruned and last_set and floor is not None:
        sign = "≥" if last_set["predicted_accuracy"] >= floor - TOLERANCE else "<"
        parts[-1] += f"; accuracy {last_set['predicted_accuracy']:.2f} {sign} floor {floor:.2f}"
    parts += [f"{node} held at {ratio:g} by the operator" for node, ratio in manual.items()]
    if infeasible:
        parts.append(f"cannot meet the {controller['budget_s'] * 1e3:.0f} ms stage budget on "
                     f"{', '.join(sorted(infeasible))} even at the highest ratio")
    waiting = [n for n in nodes if n.get("desired_ratio") is not None and n.get("prune_ratio") is not None
               and abs(n["desired_ratio"] - n["prune_ratio"]) > TOLERANCE]
    parts += [f"{n['node_id']} asked for {n['desired_ratio']:g}, still at {n['prune_ratio']:g}" for n in waiting]
    head = f"{controller.get('policy')} policy"
    return f"{head}: " + "; ".join(parts) if parts else f"{head}: watching, nothing pruned"


def _frame(row: dict) -> dict:
    """A frame as the charts need it: time, latency, and per hop (node, compute s, queue wait s, ratio)."""
    hops = [[h["node_id"], round(h["finished_ts"] - h["started_ts"] - h.get("decode_s", 0.0), 5),
             round(max(0.0, h["started_ts"] - h["received_ts"]), 5), h["prune_ratio"]] for h in row["hops"] or []]
    return {"t": round(row["finish_ts"], 3), "e2e_s": round(row["e2e_s"], 5), "hops": hops}


def parse_cursor(text: str | None) -> tuple[int, int] | None:
    """``"<requests rowid>.<windows rowid>"`` as sent in ``cursor``; ValueError in words otherwise."""
    if not text:
        return None
    try:
        frames, windows = (int(part) for part in text.split("."))
    except ValueError:
        raise ValueError(f"since must be the cursor of an earlier answer, like '1234.56' (got {text!r})") from None
    return frames, windows


def site_zone(now: float) -> dict:
    """The site's time zone (the gateway's machine): the page shows times in it, with the offset."""
    local = datetime.fromtimestamp(now).astimezone()
    offset = local.strftime("%z")
    return {"utc_offset_s": int(local.utcoffset().total_seconds()), "name": local.tzname(),
            "offset": f"UTC{offset[:3]}:{offset[3:]}"}


def site_time(ts: float) -> str:
    """A time as the page shows it outside the charts: site local, to the millisecond, with the offset."""
    return datetime.fromtimestamp(ts).astimezone().isoformat(timespec="milliseconds")


def status(reader: Reader, recent_s: float, now: float, since: tuple[int, int] | None = None) -> dict:
    """Everything the overview shows, as one JSON document; with ``since``, only newer frames and windows."""
    run = reader.current_run()
    controller = reader.controller_status()
    slo_s = (controller or {}).get("slo_s") or (run["slo_s"] if run else None)
    nodes = reader.nodes()
    placement = reader.placement()
    pipeline = pipeline_of(placement)
    serving_now = {node: hop["nodes"] for hop in pipeline for node in hop["nodes"]}
    desired = (controller or {}).get("ratios", {})
    max_offset_s = (run or {}).get("max_clock_offset_s")
    for node in nodes:
        node["seen_s_ago"] = now - node["last_seen"] if node.get("last_seen") else None
        node["desired_ratio"] = desired.get(node["node_id"])
        node["clock_suspect"] = bool(max_offset_s) and offset_suspect(node.get("clock_offset_s"), max_offset_s)
        node["stage_nodes"] = serving_now.get(node["node_id"], [])  # every node of its stage (replicas)
    events = reader.prune_events(limit=10)
    infeasible = infeasible_nodes(events)
    busy = reader.nodes_serving_since(now - IDLE_AFTER_S)
    for node in nodes:
        node["badges"] = badges(node, controller or {}, busy, infeasible)
    suspects = [n["node_id"] for n in nodes if n["clock_suspect"]]
    latest = reader.latest_rowids()
    if since is not None and (since[0] > latest[0] or since[1] > latest[1]):
        since = None  # the file was replaced or emptied: start over
    run_start = run["started_ts"] if run else 0.0
    recent = reader.window_attainment(now - RECENT_ATTAINMENT_S, run_start)
    return {
        "now": now,
        "cursor": f"{latest[0]}.{latest[1]}",
        "incremental": since is not None,
        "recent_s": recent_s,
        "zone": site_zone(now),
        "run": run,
        "slo_s": slo_s,
        "nodes": nodes,
        "placement": placement,
        "placement_words": placement_words(reader.placement_number(placement["version"]), pipeline)
        if placement else "no placement yet",
        "pipeline": pipeline,
        "latency": [_frame(r) for r in reader.frames_after(since[0] if since else 0, now - recent_s)],
        "windows": reader.windows_after(since[1] if since else 0, limit=30),
        # judged by the windows' own verdicts: each stores the SLO in force when it was served (frames do not)
        "recent": {**recent, "span_s": RECENT_ATTAINMENT_S, "since_ts": max(now - RECENT_ATTAINMENT_S, run_start)},
        "errors": reader.errors(limit=10),
        "controller": controller,
        "controller_words": controller_words(controller, nodes, events, infeasible),
        "prune_events": events,
        "operator_actions": reader.operator_actions(limit=15),
        "cameras": reader.cameras(),
        # end-to-end latency subtracts other devices' timestamps from the gateway's: marked when a clock is off
        "clock": {"max_offset_s": max_offset_s, "suspect_nodes": suspects, "latency_reliable": not suspects},
        "accounting": reader.accounting(),
    }
