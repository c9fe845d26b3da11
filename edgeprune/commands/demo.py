"""``edgeprune demo``: broker, gateway, web page, node agents and a camera on this machine."""

from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("demo", help="run a live local pipeline (all components as child processes)")
    p.add_argument("--config", type=Path, help="TOML config file every component reads (as on devices); the "
                   "demo overrides only the broker address, the database and the node list")
    p.add_argument("--nodes", type=int, default=2, help="node agents (pipeline stages)")
    p.add_argument("--rate", type=float, help="camera frames per second (default: [camera] rate_hz if set, else 4)")
    p.add_argument("--duration", type=float, default=0.0, help="seconds to run; 0 = until Ctrl-C")
    p.add_argument("--web-port", type=int, help="operator page port (default: [web] port)")
    p.add_argument("--slo", type=float, help="end-to-end latency objective, seconds "
                   "(default: [gateway] slo_s if set, else 0.25)")
    p.add_argument("--profile", metavar="FILE|measure",
                   help="profile.json every node offers the planner (default: [node] profile if set, else the "
                   "shipped one, so every run places the model the same way); 'measure': each node profiles itself")
    p.add_argument("--run-dir", type=Path, default=Path("run/demo"), help="logs, broker data and database")
    p.add_argument("--slowdown", action="append", default=[], metavar="NODE:FACTOR:START:END",
                   help="emulate a busy node, e.g. node-1:20:30:90 (20x slower from 30 s to 90 s); repeatable")
    p.set_defaults(func=run)


def run(args) -> int:
    from edgeprune.demo import Demo, DemoOptions, SlowdownEpisode

    if not 1 <= args.nodes <= 6:
        raise SystemExit("--nodes must be between 1 and 6")
    try:
        episodes = tuple(SlowdownEpisode.parse(text) for text in args.slowdown)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    demo = Demo(DemoOptions(run_dir=args.run_dir, nodes=args.nodes, rate_hz=args.rate, duration_s=args.duration,
                            web_port=args.web_port, slo_s=args.slo, profile=args.profile, config=args.config,
                            slowdowns=episodes))
    try:
        demo.start()
    except BaseException:
        demo.stop_processes()
        raise
    totals = demo.run()
    print(f"frames sent {totals['frames_sent']} | results {totals['results']} | "
          f"SLO {demo.slo_s * 1000:.0f} ms attainment "
          + (f"{totals['attainment_pct']:.1f} % | p50 {totals['p50_s'] * 1000:.1f} ms | "
             f"p95 {totals['p95_s'] * 1000:.1f} ms" if totals["results"] else "n/a (no results)")
          + f" | database {demo.db}")
    return 0
