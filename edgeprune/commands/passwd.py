"""``edgeprune passwd``: set the operator page's password (only its salted hash is stored)."""

from __future__ import annotations

import re
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("passwd", help="set the operator page's login password ([web] password_hash)")
    p.add_argument("--config", type=Path,
                   help="TOML config file to write password_hash into (created if missing); "
                        "without it the line to add is printed")
    p.add_argument("--stdin", action="store_true", help="read the password from one line of stdin (scripts)")
    p.set_defaults(func=run)


def set_in_config(text: str, password_hash: str) -> str:
    """``text`` with ``[web] password_hash`` set, other lines untouched (a TOML writer would reformat it)."""
    line = f'password_hash = "{password_hash}"'
    section = re.search(r"(?m)^\[web\][ \t]*$", text)
    if section is None:
        return (text.rstrip("\n") + "\n\n" if text.strip() else "") + f"[web]\n{line}\n"
    body_end = re.search(r"(?m)^\[", text[section.end():])
    end = section.end() + body_end.start() if body_end else len(text)
    body = text[section.end():end]
    if re.search(r"(?m)^password_hash\s*=.*$", body):
        body = re.sub(r"(?m)^password_hash\s*=.*$", line, body)
    else:
        body = "\n" + line + body
    return text[:section.end()] + body + text[end:]


def run(args) -> int:
    import getpass
    import sys

    from werkzeug.security import generate_password_hash

    if args.stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = getpass.getpass("new operator password: ")
        if getpass.getpass("again: ") != password:
            print("edgeprune passwd: the two entries differ; nothing changed", file=sys.stderr)
            return 2
    if len(password) < 8:
        print("edgeprune passwd: use at least 8 characters; nothing changed", file=sys.stderr)
        return 2
    password_hash = generate_password_hash(password)  # scrypt with a random salt (werkzeug's default)
    if args.config is None:
        print("add this to the [web] section of your config file (or set EDGEPRUNE_WEB_PASSWORD_HASH):")
        print(f'password_hash = "{password_hash}"')
        return 0
    text = args.config.read_text() if args.config.exists() else ""
    args.config.write_text(set_in_config(text, password_hash))
    args.config.chmod(0o600)
    print(f"password hash written to [web] password_hash in {args.config}")
    return 0
