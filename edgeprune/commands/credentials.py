"""``edgeprune credentials``: broker users per device (password file + ACL), see docs/security.md."""

from __future__ import annotations

from pathlib import Path

from edgeprune.credentials import ROLES


def register(sub) -> None:
    p = sub.add_parser("credentials", help="make, list, rotate and remove broker users (one per device)")
    p.add_argument("--config", type=Path, help="TOML config file ([broker], [mqtt] and [gateway] sections)")
    p.add_argument("--dir", type=Path, help="credentials folder (default: the broker's credentials_dir)")
    verbs = p.add_subparsers(dest="verb", required=True, metavar="VERB")
    init = verbs.add_parser("init", help="users for the gateway, the page, an operator and the given devices; "
                            "rewrites the ACL of every user by this version's rights")
    init.add_argument("--nodes", default="", help="comma-separated node ids (default: the gateway's nodes)")
    init.add_argument("--cameras", default="cam-1", help="comma-separated camera ids")
    init.add_argument("--central", action="store_true",
                      help="a central broker's users instead: the collector and one bridge-<site> per --sites")
    init.add_argument("--sites", default="", help="with --central: comma-separated site ids")
    add = verbs.add_parser("add", help="add a user (prints its password once)")
    add.add_argument("name")
    add.add_argument("--role", required=True, choices=ROLES,
                     help="bridge and collector are a central broker's (a bridge user is named bridge-<site_id>)")
    verbs.add_parser("list", help="users and their roles")
    for verb, text in (("rotate", "give a user a new random password"), ("remove", "delete a user")):
        verbs.add_parser(verb, help=text).add_argument("name")
    p.set_defaults(func=run)


def _ids(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def run(args) -> int:
    import sys

    from edgeprune.credentials import Credentials, CredentialsError, central_users, default_users
    from shared.settings import BrokerSettings, GatewaySettings, MqttSettings, load

    broker = load(BrokerSettings, args.config)
    gateway = load(GatewaySettings, args.config)
    creds = Credentials(args.dir or broker.credentials_folder, load(MqttSettings, args.config).topic_root,
                        gateway.gateway_id)
    try:
        if args.verb == "init":
            if args.central:
                users = central_users(_ids(args.sites))
            else:
                users = default_users(_ids(args.nodes) or gateway.nodes, _ids(args.cameras), gateway.gateway_id)
            for name, role in users.items():
                if creds.ensure(name, role):
                    print(f"{role:8s} {name}: {creds.env_file(name)}")
            creds.write_acl()  # an upgrade's rights for the users made before (reload the broker to apply it)
        elif args.verb == "add":
            creds.add(args.name, args.role)
            print(f"{args.role} {args.name}: settings for the device in {creds.env_file(args.name)}")
        elif args.verb == "rotate":
            creds.rotate(args.name)
            print(f"{args.name}: new password in {creds.env_file(args.name)}")
        elif args.verb == "remove":
            creds.remove(args.name)
            print(f"removed {args.name}")
        else:
            for name, role in sorted(creds.users().items()):
                print(f"{role:8s} {name}")
    except (CredentialsError, ValueError) as exc:  # ValueError: an id that cannot be a topic level
        print(f"edgeprune credentials: {exc}", file=sys.stderr)
        return 2
    if args.verb != "list":
        print(f"the broker reads {creds.passwd_file} and {creds.acl_file}: reload it (SIGHUP, or "
              "`systemctl reload edgeprune-broker`) for changes to apply")
    return 0
