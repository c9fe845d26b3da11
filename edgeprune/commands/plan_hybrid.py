"""``edgeprune plan-hybrid``: one pipeline, parallel pipelines or replicated stages, for an arrival rate and an SLO."""

from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("plan-hybrid", help="choose pipelines, replicas and pruning levels for an arrival rate")
    p.add_argument("--devices", type=Path, required=True, help="devices.json (see docs/placement.md)")
    p.add_argument("--profile", type=Path, help="profile.json for devices without their own (as for `place`)")
    p.add_argument("--arrival-hz", type=float, required=True, help="frames per second the site must sustain")
    p.add_argument("--slo-ms", type=float, required=True, help="mean end-to-end latency allowed, ms")
    p.add_argument("--levels", default="0:1",
                   help="pruning levels RATIO:TIME_FACTOR,... (compute at RATIO = TIME_FACTOR x unpruned; "
                        "e.g. 0:1,0.3:0.6,0.5:0.4 from `edgeprune bench speedup`); default: no pruning")
    p.add_argument("--accuracy-model", type=Path,
                   help="accuracy model JSON written by `edgeprune calibrate` (needed with pruning levels)")
    p.add_argument("--accuracy-floor", type=float, default=0.0, help="lowest predicted accuracy allowed")
    p.add_argument("--json", action="store_true", help="print only the plan as JSON")
    p.set_defaults(func=run)


def parse_levels(text: str):
    from gateway.hybrid import Level

    try:
        levels = tuple(Level(float(r), float(f)) for r, f in (item.split(":") for item in text.split(",")))
    except ValueError as exc:
        raise ValueError(f"--levels {text!r}: expected RATIO:TIME_FACTOR,... ({exc})") from None
    return levels


def run(args) -> int:
    import json
    import sys

    from edgeprune.tables import format_table
    from edgeprune.commands.place import load_problem
    from gateway.curves import AccuracyFit
    from gateway.hybrid import HybridRequest, plan_hybrid
    from gateway.placement import InfeasiblePlacement

    try:
        problem = load_problem(args.devices, args.profile)
        levels = parse_levels(args.levels)
        accuracy = None
        if args.accuracy_model is not None:
            fit = AccuracyFit.from_dict(json.loads(args.accuracy_model.read_text())["fit"])
            if fit.n_stages != problem.n_blocks:
                raise ValueError(f"{args.accuracy_model}: calibrated for {fit.n_stages} blocks, the profile has "
                                 f"{problem.n_blocks}")
            accuracy = fit.logistic
        elif len(levels) > 1:
            raise ValueError("pruning levels need --accuracy-model, so the accuracy floor can be checked")
        request = HybridRequest(problem, args.arrival_hz, args.slo_ms / 1e3, levels, accuracy, args.accuracy_floor)
        plan = plan_hybrid(request)
    except (ValueError, OSError, KeyError) as exc:
        print(f"edgeprune plan-hybrid: {exc}", file=sys.stderr)
        return 1 if isinstance(exc, InfeasiblePlacement) else 2
    if not args.json:
        rows = [{"pipeline": i, "stage": k, "blocks": f"{s.first_block}..{s.last_block}",
                 "replicas": ",".join(s.replicas), "ratio": s.ratio}
                for i, stages in enumerate(plan.pipelines, start=1) for k, s in enumerate(stages, start=1)]
        verdict = "meets" if plan.sustainable_hz >= args.arrival_hz else "CANNOT meet"
        accuracy_text = "" if plan.accuracy is None else f", predicted accuracy {plan.accuracy:.3f}"
        print(format_table(f"{plan.kind}: sustains {plan.sustainable_hz:.4g} frames/s within {args.slo_ms:g} ms "
                           f"({verdict} {args.arrival_hz:g}/s; latency there {plan.latency_s * 1e3:.3g} ms), "
                           f"capacity {plan.capacity_hz:.4g}/s{accuracy_text}", rows))
    print(json.dumps(plan.to_dict(), indent=2))
    return 0
