"""``edgeprune profile``: measure what every block of the model costs on this device."""

from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("profile", help="measure per-block latency, memory and output size on this device")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (as the node agent runs)")
    p.add_argument("--repeats", type=int, default=20, help="measured runs per block (the median is kept)")
    p.add_argument("--warmup", type=int, default=3, help="unmeasured runs per block first")
    p.add_argument("--wire-dtype", choices=["float16", "float32"], default="float16",
                   help="precision activations travel in (sets output bytes)")
    p.add_argument("--checkpoint", type=Path, help="model checkpoint (default: the shipped one)")
    p.add_argument("--out", type=Path, default=Path("profile.json"), help="where to write the profile")
    p.set_defaults(func=run)


def run(args) -> int:
    from edgeprune.tables import format_table
    from shared.model import MODEL_NAME, build_model
    from shared.profiling import profile_model, save_profile

    profile = profile_model(build_model(args.checkpoint), threads=args.threads, repeats=args.repeats,
                            warmup=args.warmup, wire_dtype=args.wire_dtype, model_name=MODEL_NAME)
    rows = [{"block": i, "name": b.name, "latency_ms": b.latency_s * 1e3, "params_MB": b.param_bytes / 1e6,
             "activation_MB": b.activation_bytes / 1e6, "output_KB": b.output_bytes / 1e3}
            for i, b in enumerate(profile.blocks)]
    print(format_table(f"{profile.model} on {profile.host}, {profile.threads} thread(s), "
                       f"median of {profile.repeats}", rows))
    save_profile(profile, args.out)
    print(f"wrote {args.out}")
    return 0
