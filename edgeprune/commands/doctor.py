"""``edgeprune doctor``: check this device and its place in the site; the fix for each problem in one line."""

from __future__ import annotations

import sys
from pathlib import Path

from edgeprune.commands import add_broker_flags, broker_settings


def register(sub) -> None:
    p = sub.add_parser("doctor", help="check this device: broker, gateway, clock, model, disk, services, errors",
                       description="Prints ok / warning / fail per check with the fix; exit status 1 on any fail.")
    p.add_argument("--role", choices=["gateway", "node", "camera"],
                   help="what this device is (default: from the systemd units install.sh wrote)")
    p.add_argument("--config", type=Path, help="TOML config file (default: EDGEPRUNE_CONFIG, else "
                   "/etc/edgeprune/edgeprune.toml when present: the services' file)")
    add_broker_flags(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import os

    from edgeprune.doctor import CONFIG_FILE, FAIL, gather, infer_role, installed_units, report, run_checks
    from shared.settings import CONFIG_ENV

    if args.config is None and not os.environ.get(CONFIG_ENV) and Path(CONFIG_FILE).exists():
        args.config = Path(CONFIG_FILE)
    if args.config is not None and args.config.exists() and not os.access(args.config, os.R_OK):
        print(f"edgeprune doctor: cannot read {args.config} (it holds passwords): run `sudo edgeprune doctor`",
              file=sys.stderr)
        return 2
    role = args.role or infer_role(installed_units())
    if role is None:
        print("edgeprune doctor: no edgeprune systemd unit here to tell the role: pass --role gateway|node|camera",
              file=sys.stderr)
        return 2
    facts = gather(role, args.config, broker_settings(args))
    checks = run_checks(facts)
    print(report(facts, checks))
    return 1 if any(c.level == FAIL for c in checks) else 0
