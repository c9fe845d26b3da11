"""``edgeprune export``: detections out of the gateway's SQLite log, or the central store (SQLite or PostgreSQL,
per site or all sites), as CSV or a Camtrap DP package."""

from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("export", help="export detections as CSV or a Camtrap DP 1.0 package (streaming)")
    p.add_argument("--db", required=True, help="the gateway's SQLite file, or the central store: its SQLite file "
                   "or postgresql://user:password@host/database (edgeprune collect)")
    p.add_argument("--site", action="append", help="central store: only this site (repeat for more; default all); "
                   "a deployment is one camera at one site, <site>/<camera>")
    p.add_argument("--format", choices=["csv", "camtrap-dp"], default="csv")
    p.add_argument("--out", type=Path, required=True,
                   help="CSV file, or a directory for the Camtrap DP package ('-' for CSV on stdout)")
    p.add_argument("--from", dest="start", help="first capture time, ISO 8601 (no offset = UTC)")
    p.add_argument("--to", dest="end", help="capture times before this, ISO 8601")
    p.add_argument("--camera", help="only this camera id")
    p.set_defaults(func=run)


def run(args) -> int:
    import sys
    import time

    from gateway.collect import is_postgres, open_central_for_export
    from gateway.export import (
        EMPTY_WARNING,
        Filters,
        camtrap_dp_rows,
        detections_csv,
        parse_time,
        undescribed_cameras,
        write_camtrap_dp,
    )
    from gateway.store import connect_read_only

    if not is_postgres(args.db) and not Path(args.db).exists():
        print(f"edgeprune export: no database at {args.db}", file=sys.stderr)
        return 2
    try:
        filters = Filters(start_ts=parse_time(args.start) if args.start else None,
                          end_ts=parse_time(args.end) if args.end else None, camera_id=args.camera)
    except ValueError as exc:
        print(f"edgeprune export: {exc}", file=sys.stderr)
        return 2
    conn = open_central_for_export(args.db, args.site)
    if conn is None:  # one gateway's file
        if args.site:
            print(f"edgeprune export: {args.db} is one site's gateway log, not a central store: no --site",
                  file=sys.stderr)
            return 2
        conn = connect_read_only(args.db)
    try:
        if args.format == "csv":
            out = sys.stdout if str(args.out) == "-" else open(args.out, "w", encoding="utf-8", newline="")
            with out:
                out.writelines(detections_csv(conn, filters))
            return 0
        missing = undescribed_cameras(conn, filters)
        if missing:
            print(f"edgeprune export: left out detections of {', '.join(missing)}: no deployment (location, "
                  "start) for them yet; describe them on the operator page's Cameras section (central store: "
                  "edgeprune collect --import-cameras)", file=sys.stderr)
        if camtrap_dp_rows(conn, filters) == 0:
            print(f"edgeprune export: warning: {EMPTY_WARNING}", file=sys.stderr)
        for path in write_camtrap_dp(conn, filters, args.out, created=time.time()):
            print(path)
        return 0
    finally:
        conn.close()
