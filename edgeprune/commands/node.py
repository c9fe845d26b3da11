"""``edgeprune node``: run a node agent (one pipeline stage on this device)."""

from __future__ import annotations

import sys
from pathlib import Path

from edgeprune.commands import add_broker_flags, broker_settings, run_until_signal


def register(sub) -> None:
    p = sub.add_parser("node", help="run a node agent: subscribe to its stage's input, run its slice, publish on")
    p.add_argument("--config", type=Path, help="TOML config file ([mqtt] and [node] sections)")
    p.add_argument("--node-id")
    p.add_argument("--threads", type=int)
    p.add_argument("--queue-size", type=int)
    p.add_argument("--checkpoint", type=Path)
    p.add_argument("--profile", type=Path, help="offer this profile.json instead of measuring at start")
    p.add_argument("--role", choices=["stage", "ingest"],
                   help="ingest: only ever decode camera frames for stage 1 (docs/decode.md); default stage")
    add_broker_flags(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from node_agent.agent import NodeAgent
    from shared.device_model import DeviceModelError
    from shared.profiling import ProfileError
    from shared.settings import NodeSettings, load

    settings = load(NodeSettings, args.config, node_id=args.node_id, threads=args.threads,
                    queue_size=args.queue_size, checkpoint=args.checkpoint, profile=args.profile,
                    role=args.role)
    try:
        agent = NodeAgent(settings, broker_settings(args))
        agent.start()
    except (ProfileError, DeviceModelError) as exc:
        print(f"edgeprune node: {exc}", file=sys.stderr)
        return 2
    run_until_signal()
    agent.stop()
    return 0
