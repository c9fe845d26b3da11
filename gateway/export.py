"""Ecologists' data out of the SQLite log: filtered detections with keyset paging, CSV and Camtrap DP 1.0.

Everything streams: rows come from a SQLite cursor in batches and leave as text chunks, so an
export of a million detections holds one batch in memory, never the table. Camtrap DP
(https://camtrap-dp.tdwg.org, version 1.0) is the camera-trap data standard read by camtraptor,
Agouti, TrapTagger and GBIF's ingestion; the package names the official profile and table schemas by their
URLs, as the standard requires, and the tables follow the copies shipped in ``gateway/camtrap_dp/`` (the
tests validate against those, offline).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import re
import sqlite3
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from shared.thumbnail import THUMBNAIL_PX

log = logging.getLogger(__name__)

BATCH = 1000
BLANK_LABELS = {"blank", "empty"}  # a model's "nothing in the frame" class becomes observationType 'blank'
OTHER_OBSERVATION_TYPES = {"human", "vehicle"}  # classes Camtrap DP has an observationType of their own for


def iso(ts: float | None, timespec: str = "milliseconds") -> str:
    """ISO 8601 with an explicit UTC offset (what spreadsheets and R's lubridate parse unambiguously)."""
    return "" if ts is None else datetime.fromtimestamp(ts, UTC).isoformat(timespec=timespec)


def parse_time(text: str) -> float:
    """ISO 8601 date or date-time; without an offset it is taken as UTC. ValueError in words otherwise."""
    try:
        parsed = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} is not an ISO 8601 date or time (e.g. 2026-05-30 or 2026-05-30T14:00+02:00)")
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()


@dataclass(frozen=True)
class Filters:
    start_ts: float | None = None
    end_ts: float | None = None
    camera_id: str | None = None
    label: str | None = None
    min_confidence: float | None = None

    def where(self, table: str = "r") -> tuple[str, list]:
        clauses, params = [], []
        for sql, value in ((f"{table}.capture_ts >= ?", self.start_ts), (f"{table}.capture_ts < ?", self.end_ts),
                           (f"{table}.camera_id = ?", self.camera_id), (f"{table}.label = ?", self.label),
                           (f"{table}.confidence >= ?", self.min_confidence)):
            if value is not None:
                clauses.append(sql)
                params.append(value)
        return " AND ".join(clauses) or "TRUE", params  # TRUE, not 1: PostgreSQL too (gateway/collect.py)


# --- the detections view and CSV ------------------------------------------------------------------
DETECTION_COLUMNS = ("request_id", "camera_id", "capture_time", "label", "scientific_name", "confidence",
                     "prune_ratios", "e2e_latency_s")


def _detection(row: sqlite3.Row | tuple) -> dict:
    request_id, camera_id, capture_ts, label, scientific_name, confidence, prune_ratios, e2e_s = row
    return {"request_id": request_id, "camera_id": camera_id, "capture_time": iso(capture_ts),
            "capture_ts": capture_ts, "label": label, "scientific_name": scientific_name or "",
            "confidence": confidence, "prune_ratios": json.loads(prune_ratios), "e2e_latency_s": e2e_s}


# scientific_name is the one the model's checkpoint gave the label (NULL in rows stored before results carried it)
_FIELDS = "r.request_id, r.camera_id, r.capture_ts, r.label, r.scientific_name, r.confidence, r.prune_ratios, r.e2e_s"
_SELECT = f"SELECT {_FIELDS} FROM requests r"


def detections_page(conn: sqlite3.Connection, filters: Filters, limit: int = 100,
                    after: tuple[float, str] | None = None) -> tuple[list[dict], str | None]:
    """Newest first; ``after`` is the (capture_ts, request_id) of the last row shown, so page 1000 costs
    what page 1 does (keyset paging on the capture_ts index, no OFFSET). Returns rows and the next cursor."""
    where, params = filters.where()
    if after is not None:
        where += " AND (r.capture_ts, r.request_id) < (?, ?)"  # a row value: SQLite seeks the index to it
        params += [after[0], after[1]]
    # each row also says whether the frame has a thumbnail (GET /thumbnail?id=<request_id> on the page)
    shown, join = (("t.request_id IS NOT NULL", "LEFT JOIN thumbnails t ON t.request_id = r.request_id")
                   if has_thumbnails(conn) else ("FALSE", ""))
    rows = conn.execute(f"SELECT {_FIELDS}, {shown} FROM requests r {join} WHERE {where} "
                        "ORDER BY r.capture_ts DESC, r.request_id DESC LIMIT ?", [*params, limit + 1]).fetchall()
    more = len(rows) > limit
    rows = [dict(_detection(r[:-1]), thumbnail=bool(r[-1])) for r in rows[:limit]]
    cursor = f"{rows[-1]['capture_ts']!r}:{rows[-1]['request_id']}" if more and rows else None
    return rows, cursor


def parse_cursor(text: str) -> tuple[float, str]:
    ts, _, request_id = text.partition(":")
    try:
        return float(ts), request_id
    except ValueError:
        raise ValueError(f"bad page cursor {text!r}") from None


def _batches(conn: sqlite3.Connection, sql: str, params: list, size: int = BATCH) -> Iterator[list[tuple]]:
    cursor = conn.execute(sql, params)
    while batch := cursor.fetchmany(size):
        yield batch


def _csv_text(rows: Iterable[Iterable]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue()


def detections_csv(conn: sqlite3.Connection, filters: Filters) -> Iterator[str]:
    """The filtered detections as CSV, oldest first, one chunk per batch."""
    yield _csv_text([DETECTION_COLUMNS])
    where, params = filters.where()
    for batch in _batches(conn, f"{_SELECT} WHERE {where} ORDER BY r.capture_ts, r.request_id", params):
        rows = []
        for raw in batch:
            d = _detection(raw)
            rows.append([d["request_id"], d["camera_id"], d["capture_time"], d["label"], d["scientific_name"],
                         f"{d['confidence']:.4f}", " ".join(f"{r:g}" for r in d["prune_ratios"]),
                         f"{d['e2e_latency_s']:.4f}"])
        yield _csv_text(rows)


# --- Camtrap DP 1.0 -----------------------------------------------------------------------------------
CAMTRAP_DP_DIR = Path(__file__).with_name("camtrap_dp")  # the official 1.0 files (README.md there says whence)
CAMTRAP_DP_URL = "https://raw.githubusercontent.com/tdwg/camtrap-dp/1.0"
PROFILE_URL = f"{CAMTRAP_DP_URL}/camtrap-dp-profile.json"
TABLES = ("deployments", "media", "observations")
CAMTRAP_DP_FIELDS = {  # each table's fields, in its official table schema's order
    name: json.loads((CAMTRAP_DP_DIR / f"{name}-table-schema.json").read_text(encoding="utf-8"))["fields"]
    for name in TABLES}
EMPTY_WARNING = ("the export holds no detections (none match the filter at a described camera): the package has "
                 "no deployments, so it cannot name the area and period Camtrap DP requires")


def schema_url(table: str) -> str:
    return f"{CAMTRAP_DP_URL}/{table}-table-schema.json"


def _iso_s(ts: float | None) -> str:
    return iso(ts, "seconds")


def _row(table: str, values: dict) -> list:
    return ["" if values.get(f["name"]) is None else values[f["name"]] for f in CAMTRAP_DP_FIELDS[table]]


def _deployments(conn: sqlite3.Connection, filters: Filters) -> list[dict]:
    """Cameras the operator described, with the captures the export holds; an open end is the last capture."""
    where, params = filters.where()
    sql = (f"SELECT c.camera_id, c.location_name, c.latitude, c.longitude, c.start_ts, c.end_ts, "
           f"MIN(r.capture_ts), MAX(r.capture_ts) FROM cameras c JOIN requests r ON r.camera_id = c.camera_id "
           f"WHERE {where} GROUP BY c.camera_id, c.location_name, c.latitude, c.longitude, c.start_ts, c.end_ts "
           "ORDER BY c.camera_id")
    return [{"deploymentID": cam, "locationID": cam, "locationName": name, "latitude": lat, "longitude": lon,
             "deploymentStart": _iso_s(min(start, first)), "deploymentEnd": _iso_s(end if end else last),
             "cameraID": cam, "_first": first, "_last": last}
            for cam, name, lat, lon, start, end, first, last in conn.execute(sql, params)]


def undescribed_cameras(conn: sqlite3.Connection, filters: Filters) -> list[str]:
    """Cameras with detections in the export but no deployment (location) yet: Camtrap DP leaves them out."""
    where, params = filters.where()
    sql = (f"SELECT DISTINCT r.camera_id FROM requests r LEFT JOIN cameras c ON c.camera_id = r.camera_id "
           f"WHERE c.camera_id IS NULL AND {where} ORDER BY r.camera_id")
    return [r[0] for r in conn.execute(sql, params)]


def camtrap_dp_rows(conn: sqlite3.Connection, filters: Filters) -> int:
    """How many detections a Camtrap DP export of ``filters`` holds (those at a described camera)."""
    where, params = filters.where()
    return conn.execute(f"SELECT COUNT(*) FROM requests r JOIN cameras c ON c.camera_id = r.camera_id "
                        f"WHERE {where}", params).fetchone()[0]


def _observation_type(label: str, scientific_name: str | None) -> str:
    """A class with a scientific name is an animal; blank, human and vehicle have types of their own."""
    if label in BLANK_LABELS:
        return "blank"
    if label in OTHER_OBSERVATION_TYPES:
        return label
    return "animal" if scientific_name else "unknown"


def _exif_time(ts: float) -> str:
    """The capture time to the millisecond as EXIF writes it (frames a second apart or less share a timestamp)."""
    moment = datetime.fromtimestamp(ts, UTC)
    return json.dumps({"DateTimeOriginal": moment.strftime("%Y:%m:%d %H:%M:%S"),
                       "SubSecTimeOriginal": f"{moment.microsecond // 1000:03d}", "OffsetTimeOriginal": "+00:00"})


def has_thumbnails(conn: sqlite3.Connection) -> bool:
    """Whether ``conn`` has a thumbnails table (a central store, or a log older than thumbnails, has none)."""
    try:
        conn.execute("SELECT 1 FROM thumbnails LIMIT 0")
        return True
    except Exception:  # sqlite3.OperationalError; psycopg's UndefinedTable on a central PostgreSQL store
        return False


_SAFE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")


def media_file(request_id: str) -> str:
    """Where a frame's thumbnail lies in the package: ``media/<request id>.jpg``, or a digest of an id that is no
    safe file name (request ids come from cameras; Camtrap DP's filePath refuses a leading dot and '..')."""
    if not _SAFE_NAME.fullmatch(request_id) or ".." in request_id:
        request_id = "id-" + hashlib.blake2b(request_id.encode(), digest_size=16).hexdigest()
    return f"media/{request_id}.jpg"


def _media_and_observations(conn: sqlite3.Connection, filters: Filters,
                            thumbnails: bool) -> Iterator[tuple[list, list]]:
    where, params = filters.where()
    shown = "t.request_id IS NOT NULL" if thumbnails else "FALSE"
    sql = ("SELECT r.request_id, r.camera_id, r.capture_ts, r.finish_ts, r.label, r.scientific_name, r.confidence, "
           f"r.prune_ratios, {shown} FROM requests r JOIN cameras c ON c.camera_id = r.camera_id "
           f"{'LEFT JOIN thumbnails t ON t.request_id = r.request_id' if thumbnails else ''} WHERE {where} "
           "ORDER BY r.capture_ts, r.request_id")
    for batch in _batches(conn, sql, params):
        media, observations = [], []
        for request_id, camera_id, capture_ts, finish_ts, label, scientific_name, confidence, ratios, thumb in batch:
            when = _iso_s(capture_ts)  # Camtrap DP's timestamp format has whole seconds
            file = {"filePath": f"{camera_id}/{request_id}", "fileMediatype": "image/*",
                    "mediaComments": "frame classified on the edge; not stored"}
            if thumb:  # the package holds its thumbnail
                path = media_file(request_id)
                file = {"filePath": path, "fileName": path.split("/")[1], "fileMediatype": "image/jpeg",
                        "mediaComments": f"thumbnail of the frame (at most {THUMBNAIL_PX} px) in the package"}
            media.append(_row("media", {
                "mediaID": request_id, "deploymentID": camera_id, "captureMethod": "activityDetection",
                "timestamp": when, "filePublic": "false", "exifData": _exif_time(capture_ts), **file}))
            kind = _observation_type(label, scientific_name)
            observations.append(_row("observations", {
                "observationID": f"{request_id}_1", "deploymentID": camera_id, "mediaID": request_id,
                "eventID": request_id, "eventStart": when, "eventEnd": when, "observationLevel": "media",
                "observationType": kind, "scientificName": scientific_name if kind == "animal" else None,
                "classificationMethod": "machine",
                "classifiedBy": f"edgeprune trapnet (prune ratios {' '.join(f'{r:g}' for r in json.loads(ratios))})",
                "classificationTimestamp": _iso_s(finish_ts), "classificationProbability": round(confidence, 4),
                "observationTags": f"label:{label}"}))
        yield media, observations


def datapackage(deployments: list[dict], taxa: list[tuple[str, str]], created: float, title: str,
                thumbnails: int = 0) -> dict:
    """The package descriptor; ``taxa`` are the (scientific name, label) pairs the exported rows name, ``thumbnails``
    how many frames have one in the package."""
    starts = [d["_first"] for d in deployments]
    ends = [d["_last"] for d in deployments]
    taxonomic = [{"scientificName": scientific, "vernacularNames": {"eng": label}} for scientific, label in taxa]
    lats = [d["latitude"] for d in deployments]
    lons = [d["longitude"] for d in deployments]
    resources = [{"name": name, "path": f"{name}.csv", "profile": "tabular-data-resource", "format": "csv",
                  "mediatype": "text/csv", "encoding": "utf-8", "schema": schema_url(name)} for name in TABLES]
    kept = (f" {thumbnails} frames have a thumbnail (at most {THUMBNAIL_PX} px) in the package's media/ folder, "
            "named by media.filePath." if thumbnails else "")
    description = ("Machine classifications of camera-trap frames by edgeprune (pipelined, pruned CNN on edge "
                   "devices). Follows Camtrap DP 1.0 (https://camtrap-dp.tdwg.org). The frames themselves are not "
                   f"kept (media.filePublic is false);{kept} media.exifData has each capture time to the "
                   "millisecond.")
    package = {
        "name": "edgeprune-detections", "id": f"edgeprune-{int(created)}", "created": _iso_s(created),
        "title": title, "version": "1.0", "profile": PROFILE_URL,
        "contributors": [{"title": "edgeprune operator", "role": "contact"}],
        "licenses": [{"name": "CC0-1.0", "scope": "data"}, {"name": "CC0-1.0", "scope": "media"}],
        "description": description if deployments else f"{description} WARNING: {EMPTY_WARNING}.",
        "sources": [{"title": "edgeprune", "version": "0.1.0"}],
        "project": {"title": title, "samplingDesign": "opportunistic", "captureMethod": ["activityDetection"],
                    "individualAnimals": False, "observationLevel": ["media"]},
        "taxonomic": taxonomic, "resources": resources,
    }
    if deployments:
        package["temporal"] = {"start": _iso_s(min(starts))[:10], "end": _iso_s(max(ends))[:10]}
        package["spatial"] = {"type": "Polygon", "coordinates": [[
            [min(lons), min(lats)], [max(lons), min(lats)], [max(lons), max(lats)], [min(lons), max(lats)],
            [min(lons), min(lats)]]]}
    return package


def _thumbnails(conn: sqlite3.Connection, filters: Filters) -> Iterator[tuple[str, Iterator[bytes]]]:
    """(package path, JPEG bytes) of every exported frame's thumbnail, a hundred rows read at a time."""
    where, params = filters.where()
    sql = ("SELECT r.request_id, t.jpeg FROM requests r JOIN cameras c ON c.camera_id = r.camera_id "
           f"JOIN thumbnails t ON t.request_id = r.request_id WHERE {where} ORDER BY r.capture_ts, r.request_id")
    for batch in _batches(conn, sql, params, size=100):
        for request_id, jpeg in batch:
            yield media_file(request_id), iter([bytes(jpeg)])


def camtrap_dp_files(conn: sqlite3.Connection, filters: Filters, created: float,
                     title: str = "edgeprune detections") -> Iterator[tuple[str, Iterator[str | bytes]]]:
    """(path in the package, text or byte chunks) of every file, in an order a streaming zip can write."""
    deployments = _deployments(conn, filters)
    if not deployments:
        log.warning("Camtrap DP export: %s", EMPTY_WARNING)
    where, params = filters.where()
    taxa = [tuple(r) for r in conn.execute(
        f"SELECT r.scientific_name, MIN(r.label) FROM requests r JOIN cameras c ON c.camera_id = r.camera_id "
        f"WHERE {where} AND r.scientific_name != '' GROUP BY r.scientific_name ORDER BY r.scientific_name", params)]
    thumbnails = has_thumbnails(conn)
    kept = conn.execute(f"SELECT COUNT(*) FROM requests r JOIN cameras c ON c.camera_id = r.camera_id JOIN "
                        f"thumbnails t ON t.request_id = r.request_id WHERE {where}",
                        params).fetchone()[0] if thumbnails else 0
    yield "datapackage.json", iter([json.dumps(datapackage(deployments, taxa, created, title, kept), indent=2)])
    yield "deployments.csv", iter([_csv_text([[f["name"] for f in CAMTRAP_DP_FIELDS["deployments"]]]
                                             + [_row("deployments", d) for d in deployments])])

    def table(index: int, name: str) -> Iterator[str]:
        yield _csv_text([[f["name"] for f in CAMTRAP_DP_FIELDS[name]]])
        for pair in _media_and_observations(conn, filters, thumbnails):
            yield _csv_text(pair[index])
    yield "media.csv", table(0, "media")
    yield "observations.csv", table(1, "observations")
    if kept:
        yield from _thumbnails(conn, filters)


def _bytes(chunk: str | bytes) -> bytes:
    return chunk.encode("utf-8") if isinstance(chunk, str) else chunk


def write_camtrap_dp(conn: sqlite3.Connection, filters: Filters, out_dir: Path, created: float) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, chunks in camtrap_dp_files(conn, filters, created):
        path = out_dir / name
        path.parent.mkdir(exist_ok=True)
        with open(path, "wb") as fh:
            fh.writelines(_bytes(chunk) for chunk in chunks)
        written.append(path)
    return written


class _Pipe(io.RawIOBase):
    """A write-only, unseekable stream whose bytes the zip generator hands on as they are made."""

    def __init__(self):
        self.chunks: list[bytes] = []
        self._offset = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.chunks.append(bytes(data))
        self._offset += len(data)
        return len(data)

    def tell(self) -> int:
        return self._offset

    def drain(self) -> bytes:
        data, self.chunks = b"".join(self.chunks), []
        return data


ZIP_EPOCH = 315532800.0  # 1980-01-01 UTC, the earliest date a zip member can carry


def camtrap_dp_zip(conn: sqlite3.Connection, filters: Filters, created: float) -> Iterator[bytes]:
    """The package as a zip, produced chunk by chunk (the web download)."""
    pipe = _Pipe()
    with zipfile.ZipFile(pipe, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, chunks in camtrap_dp_files(conn, filters, created):
            # dated when the export was made, readable by all (a bare name gets 1980-01-01 and mode 0600)
            info = zipfile.ZipInfo(name, date_time=datetime.fromtimestamp(max(created, ZIP_EPOCH), UTC).timetuple()[:6])
            # a JPEG is compressed already: stored as it is
            info.compress_type = zipfile.ZIP_STORED if name.endswith(".jpg") else zipfile.ZIP_DEFLATED
            info.external_attr = 0o100644 << 16  # a regular file, rw-r--r--
            with archive.open(info, "w", force_zip64=True) as member:
                for chunk in chunks:
                    member.write(_bytes(chunk))
                    yield pipe.drain()
    yield pipe.drain()
