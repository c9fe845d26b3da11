"""``edgeprune place``: the optimal pipeline placement for a cluster described in devices.json."""

from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("place", help="compute the minimum-bottleneck placement of the model's slices")
    p.add_argument("--devices", type=Path, required=True, help="devices.json (see docs/placement.md)")
    p.add_argument("--profile", type=Path,
                   help="profile.json for every device without its own \"profile\" (scaled by speed_factor)")
    p.add_argument("--json", action="store_true", help="print only the plan as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    import json
    import sys

    from edgeprune.tables import format_table
    from gateway.placement import InfeasiblePlacement, solve_plan

    try:
        problem = load_problem(args.devices, args.profile)
        plan = solve_plan(problem)
    except ValueError as exc:  # a bad file, inconsistent profiles, or nothing fits
        print(f"edgeprune place: {exc}", file=sys.stderr)
        return 1 if isinstance(exc, InfeasiblePlacement) else 2
    if not args.json:
        rows = [{"stage": k, "device": s.device, "blocks": f"{s.first_block}..{s.last_block}",
                 "names": "..".join(dict.fromkeys(problem.blocks[b].name for b in (s.first_block, s.last_block))),
                 "compute_ms": s.compute_s * 1e3, "transfer_ms": s.transfer_s * 1e3,
                 "memory_MB": s.memory_bytes / 1e6} for k, s in enumerate(plan.stages, start=1)]
        print(format_table(f"bottleneck {plan.bottleneck_s * 1e3:.3g} ms ({1 / plan.bottleneck_s:.3g} frames/s), "
                           f"frame upload {plan.frame_upload_s * 1e3:.3g} ms, "
                           f"{'optimal' if plan.exact else 'best found, not proven optimal'} ({plan.method})", rows))
    print(json.dumps(plan.to_dict(), indent=2))
    return 0


def load_problem(devices_path: Path, default_profile: Path | None):
    """devices.json + profiles -> the planner's input; each device's own profile wins over ``default_profile``."""
    from gateway.placement import Device, problem_from_profiles
    from shared.profiling import ProfileError, load_cluster, load_profile

    cluster = load_cluster(devices_path)
    loaded = {}

    def profile_of(path: Path):
        if path not in loaded:
            loaded[path] = load_profile(path)
        return loaded[path]

    profiles = {}
    for spec in cluster.devices:
        if spec.profile is not None:
            path = devices_path.parent / spec.profile
        elif default_profile is not None:
            path = default_profile
        else:
            raise ProfileError(f"{devices_path}: device {spec.id} has no \"profile\" and --profile was not given")
        profiles[spec.id] = profile_of(path).scaled(spec.speed_factor).blocks
    devices = [Device(spec.id, spec.memory_bytes, spec.bandwidth_bps) for spec in cluster.devices]
    links = {(link.sender, link.receiver): link.bandwidth_bps for link in cluster.links}
    return problem_from_profiles(profiles, devices, cluster.camera.frame_bytes, cluster.camera.bandwidth_bps, links)
