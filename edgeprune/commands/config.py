"""``edgeprune config``: print every setting with its env var, default and meaning."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("config", help="list every setting (markdown), or check a config file")
    p.add_argument("--check", metavar="FILE", help="validate FILE (TOML) and the environment for every section")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from shared import settings

    if args.check:
        for cls in settings.ALL_SECTIONS:
            settings.load(cls, Path(args.check))
        print(f"{args.check}: every section is valid")
        return 0
    print(settings.describe())
    return 0
