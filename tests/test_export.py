"""Detections out of the SQLite log: keyset paging, exact CSV bytes, a Camtrap DP package frictionless accepts."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
import subprocess
import sys

import pytest

from gateway.export import (
    CAMTRAP_DP_DIR,
    CAMTRAP_DP_URL,
    EMPTY_WARNING,
    PROFILE_URL,
    Filters,
    camtrap_dp_files,
    camtrap_dp_zip,
    detections_csv,
    detections_page,
    parse_cursor,
    parse_time,
)
from gateway.store import Store

T0 = 1780000000.0  # 2026-05-28T20:26:40+00:00


def fill_detections(path) -> None:
    """Four frames of two cameras (one blank), and a third camera nobody described yet; each row's taxon is
    the one its result carried (the model's checkpoint names it)."""
    store = Store(path)
    frames = [("r1", "cam-1", T0, "zebra", "Equus quagga", 0.91), ("r2", "cam-1", T0 + 60, "blank", "", 0.80),
              ("r3", "cam-2", T0 + 120, "giraffe", "Giraffa camelopardalis", 0.55),
              ("r4", "cam-2", T0 + 180.5, "zebra", "Equus quagga", 0.99), ("r5", "cam-9", T0 + 200, "dog",
                                                                            "Canis familiaris", 0.70)]
    for request_id, camera, ts, label, scientific_name, confidence in frames:
        store.add_request({"request_id": request_id, "camera_id": camera, "capture_ts": ts, "finish_ts": ts + 0.25,
                           "e2e_s": 0.25, "queue_s": 0.01, "compute_s": 0.2, "transfer_s": 0.04, "label": label,
                           "scientific_name": scientific_name, "label_index": 0, "confidence": confidence,
                           "prune_ratios": [0.0, 0.3], "hops": []})
    store.set_camera({"camera_id": "cam-1", "location_name": "waterhole north", "latitude": -19.1,
                      "longitude": 23.4, "start_ts": T0 - 86400, "end_ts": None, "updated_ts": T0})
    store.set_camera({"camera_id": "cam-2", "location_name": "ridge trail", "latitude": -19.2, "longitude": 23.5,
                      "start_ts": T0 - 3600, "end_ts": T0 + 3600, "updated_ts": T0})
    store.close()


def camtrap_dp_errors(folder) -> list[str]:
    """Everything wrong with the package in ``folder`` by the official Camtrap DP 1.0 files shipped in
    gateway/camtrap_dp/, offline: the descriptor against the profile (JSON Schema, with the Data Package and
    GeoJSON schemas it refers to), then each table against its table schema (frictionless)."""
    import jsonschema
    from frictionless import Package, Schema
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT4, DRAFT7

    def shipped(name: str) -> dict:
        return json.loads((CAMTRAP_DP_DIR / name).read_text(encoding="utf-8"))
    descriptor = json.loads((folder / "datapackage.json").read_text(encoding="utf-8"))
    # 1.0's profile writes one reference without its slash ('#$defs/version'); 1.0.2 corrected it to this
    profile = json.loads(json.dumps(shipped("camtrap-dp-profile.json")).replace('"#$defs/version"',
                                                                              '"#/$defs/version"'))
    registry = Registry().with_resources([
        ("https://frictionlessdata.io/schemas/data-package.json",
         Resource.from_contents(shipped("data-package.json"), default_specification=DRAFT7)),
        ("http://json.schemastore.org/geojson.json",
         Resource.from_contents(shipped("geojson.json"), default_specification=DRAFT4))])
    validator = jsonschema.Draft4Validator(profile, registry=registry,
                                           format_checker=jsonschema.Draft4Validator.FORMAT_CHECKER)
    errors = [f"datapackage.json {'/'.join(map(str, e.absolute_path))}: {e.message}"
              for e in validator.iter_errors(descriptor)]
    assert descriptor["profile"] == PROFILE_URL
    local = dict(descriptor, profile="data-package", resources=[])
    for resource in descriptor["resources"]:
        assert resource["schema"] == f"{CAMTRAP_DP_URL}/{resource['name']}-table-schema.json"
        schema = Schema.from_descriptor(shipped(f"{resource['name']}-table-schema.json"))
        local["resources"].append(dict(resource, schema=schema.to_descriptor()))
    report = Package(local, basepath=str(folder)).validate()
    return errors + [f"{e[0]} {e[1]} {e[2]}: {e[3]}" for e in report.flatten(["rowNumber", "fieldName", "type",
                                                                                  "note"])]


@pytest.fixture
def db(tmp_path):
    path = tmp_path / "edgeprune.db"
    fill_detections(path)
    conn = sqlite3.connect(path)
    yield path, conn
    conn.close()


EXPECTED_CSV = (
    "request_id,camera_id,capture_time,label,scientific_name,confidence,prune_ratios,e2e_latency_s\n"
    "r1,cam-1,2026-05-28T20:26:40.000+00:00,zebra,Equus quagga,0.9100,0 0.3,0.2500\n"
    "r2,cam-1,2026-05-28T20:27:40.000+00:00,blank,,0.8000,0 0.3,0.2500\n"
    "r3,cam-2,2026-05-28T20:28:40.000+00:00,giraffe,Giraffa camelopardalis,0.5500,0 0.3,0.2500\n"
    "r4,cam-2,2026-05-28T20:29:40.500+00:00,zebra,Equus quagga,0.9900,0 0.3,0.2500\n"
    "r5,cam-9,2026-05-28T20:30:00.000+00:00,dog,Canis familiaris,0.7000,0 0.3,0.2500\n")


def test_csv_export_is_exactly_the_known_bytes(db):
    assert "".join(detections_csv(db[1], Filters())).encode() == EXPECTED_CSV.encode()


def test_csv_filters_by_time_camera_species_and_confidence(db):
    lines = "".join(detections_csv(db[1], Filters(start_ts=T0 + 1, camera_id="cam-2", label="zebra",
                                                  min_confidence=0.9))).splitlines()
    assert [line.split(",")[0] for line in lines[1:]] == ["r4"]


def test_keyset_pages_cover_every_row_once_newest_first(db):
    seen, cursor = [], None
    while True:
        rows, next_cursor = detections_page(db[1], Filters(), limit=2, after=cursor and parse_cursor(cursor))
        seen += [r["request_id"] for r in rows]
        if next_cursor is None:
            break
        cursor = next_cursor
    assert seen == ["r5", "r4", "r3", "r2", "r1"]


def test_times_parse_with_and_without_offset():
    assert parse_time("2026-05-28T22:26:40+02:00") == T0 == parse_time("2026-05-28T20:26:40")
    with pytest.raises(ValueError, match="ISO 8601"):
        parse_time("yesterday")


def test_camtrap_dp_package_passes_the_official_profile_and_maps_blank(db, tmp_path):
    pytest.importorskip("frictionless")
    out = tmp_path / "package"
    result = subprocess.run([sys.executable, "-m", "edgeprune", "export", "--db", str(db[0]), "--format",
                             "camtrap-dp", "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "cam-9" in result.stderr  # undescribed cameras are named, not silently dropped
    assert camtrap_dp_errors(out) == []
    package = json.loads((out / "datapackage.json").read_text())
    assert {"name": "CC0-1.0", "scope": "media"} in package["licenses"]
    media = {r["mediaID"]: r for r in csv.DictReader(io.StringIO((out / "media.csv").read_text()))}
    assert media["r4"]["timestamp"] == "2026-05-28T20:29:40+00:00"  # the format Camtrap DP gives: whole seconds
    assert json.loads(media["r4"]["exifData"]) == {"DateTimeOriginal": "2026:05:28 20:29:40",
                                                   "SubSecTimeOriginal": "500", "OffsetTimeOriginal": "+00:00"}
    assert [r["name"] for r in package["resources"]] == ["deployments", "media", "observations"]
    observations = (out / "observations.csv").read_text().splitlines()
    header = observations[0].split(",")
    rows = [dict(zip(header, line.split(","))) for line in observations[1:]]
    by_media = {r["mediaID"]: r for r in rows}
    assert set(by_media) == {"r1", "r2", "r3", "r4"}
    assert by_media["r2"]["observationType"] == "blank" and by_media["r2"]["scientificName"] == ""
    assert by_media["r1"]["observationType"] == "animal" and by_media["r1"]["scientificName"] == "Equus quagga"
    assert by_media["r4"]["classificationProbability"] == "0.99" and by_media["r4"]["classificationMethod"] == "machine"
    assert package["taxonomic"] == [{"scientificName": "Equus quagga", "vernacularNames": {"eng": "zebra"}},
                                    {"scientificName": "Giraffa camelopardalis", "vernacularNames": {"eng": "giraffe"}}]
    deployments = (out / "deployments.csv").read_text().splitlines()
    assert deployments[1].startswith("cam-1,cam-1,waterhole north,-19.1,23.4,,2026-05-27T20:26:40+00:00,"
                                     "2026-05-28T20:27:40+00:00")


def test_zip_download_streams_the_same_package(db, tmp_path):
    import zipfile

    path = tmp_path / "p.zip"
    chunks = list(camtrap_dp_zip(db[1], Filters(camera_id="cam-1"), created=T0))
    assert len(chunks) > 4
    path.write_bytes(b"".join(chunks))
    with zipfile.ZipFile(path) as archive:
        assert archive.namelist() == ["datapackage.json", "deployments.csv", "media.csv", "observations.csv"]
        assert archive.read("media.csv").decode().count("\n") == 3  # header + r1, r2
        for member in archive.infolist():  # readable by all, dated when it was made (not 0600 in 1980)
            assert member.external_attr >> 16 == 0o100644 and member.date_time == (2026, 5, 28, 20, 26, 40)


def test_an_own_models_taxa_and_observation_types_come_from_the_rows(tmp_path):
    """A model trained on one's own photos: its taxon reaches the package; a class without one is no animal."""
    path = tmp_path / "own.db"
    store = Store(path)
    for request_id, label, scientific_name in (("o1", "red fox", "Vulpes vulpes"), ("o2", "human", ""),
                                               ("o3", "empty", ""), ("o4", "rustle", ""), ("o5", "zebra", None)):
        store.add_request({"request_id": request_id, "camera_id": "cam-1", "capture_ts": T0, "finish_ts": T0 + 1,
                           "e2e_s": 1.0, "queue_s": 0.0, "compute_s": 1.0, "transfer_s": 0.0, "label": label,
                           "scientific_name": scientific_name, "label_index": 0, "confidence": 0.5,
                           "prune_ratios": [0.0], "hops": []})
    store.set_camera({"camera_id": "cam-1", "location_name": "den", "latitude": 51.0, "longitude": 4.0,
                      "start_ts": T0 - 60, "end_ts": None, "updated_ts": T0})
    store.close()
    with sqlite3.connect(path) as conn:
        files = {name: "".join(chunks) for name, chunks in camtrap_dp_files(conn, Filters(), created=T0)}
    observations = list(csv.DictReader(io.StringIO(files["observations.csv"])))
    kinds = {r["mediaID"]: (r["observationType"], r["scientificName"]) for r in observations}
    # o5: a row stored before results carried a taxon is not guessed from its label
    assert kinds == {"o1": ("animal", "Vulpes vulpes"), "o2": ("human", ""), "o3": ("blank", ""),
                     "o4": ("unknown", ""), "o5": ("unknown", "")}
    assert json.loads(files["datapackage.json"])["taxonomic"] == [
        {"scientificName": "Vulpes vulpes", "vernacularNames": {"eng": "red fox"}}]


def test_an_export_with_no_rows_warns(db, tmp_path):
    out = tmp_path / "empty"
    result = subprocess.run([sys.executable, "-m", "edgeprune", "export", "--db", str(db[0]), "--format",
                             "camtrap-dp", "--out", str(out), "--from", "2030-01-01"],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0 and EMPTY_WARNING in result.stderr
    assert EMPTY_WARNING in json.loads((out / "datapackage.json").read_text())["description"]


def add_thumbnails(path, request_ids) -> dict[str, bytes]:
    """A thumbnail (a real small JPEG) for each of ``request_ids``, as the gateway stores them."""
    from shared.imaging import encode_jpeg, textured_scene

    store = Store(path)
    made = {}
    for k, request_id in enumerate(request_ids):
        made[request_id] = encode_jpeg(textured_scene(240, 180, seed=k), quality=70)
        store.add_thumbnail({"request_id": request_id, "camera_id": "cam-x", "ts": T0 + k,
                             "bytes": len(made[request_id]), "jpeg": made[request_id]})
    store.close()
    return made


def test_frames_with_a_thumbnail_are_media_files_of_the_package_and_it_still_passes_the_profile(db, tmp_path):
    """r1 and r4 have thumbnails, r2 and r3 none, r5's camera is undescribed (not exported, nor its thumbnail)."""
    pytest.importorskip("frictionless")
    import zipfile

    from gateway.export import write_camtrap_dp

    made = add_thumbnails(db[0], ["r1", "r4", "r5"])
    out = tmp_path / "package"
    written = write_camtrap_dp(db[1], Filters(), out, created=T0)
    assert camtrap_dp_errors(out) == []
    assert sorted(p.relative_to(out).as_posix() for p in written if p.suffix == ".jpg") == ["media/r1.jpg",
                                                                                          "media/r4.jpg"]
    media = {r["mediaID"]: r for r in csv.DictReader(io.StringIO((out / "media.csv").read_text()))}
    for request_id in ("r1", "r4"):
        row = media[request_id]
        assert (row["filePath"], row["fileName"], row["fileMediatype"]) == (f"media/{request_id}.jpg",
                                                                           f"{request_id}.jpg", "image/jpeg")
        assert (out / row["filePath"]).read_bytes() == made[request_id]
    assert (media["r2"]["filePath"], media["r2"]["fileMediatype"]) == ("cam-1/r2", "image/*")  # no file: as before
    assert "2 frames have a thumbnail" in json.loads((out / "datapackage.json").read_text())["description"]
    zipped = tmp_path / "p.zip"
    zipped.write_bytes(b"".join(camtrap_dp_zip(db[1], Filters(), created=T0)))
    with zipfile.ZipFile(zipped) as archive:
        assert archive.namelist()[-2:] == ["media/r1.jpg", "media/r4.jpg"]
        assert archive.read("media/r4.jpg") == made["r4"]
        assert archive.getinfo("media/r4.jpg").compress_type == zipfile.ZIP_STORED  # a JPEG is compressed already
        assert archive.read("media.csv") == (out / "media.csv").read_bytes()


def test_a_request_id_that_is_no_safe_file_name_becomes_a_digest():
    from gateway.export import media_file

    assert media_file("cam-1-00ab12") == "media/cam-1-00ab12.jpg"
    for unsafe in ("../../etc/passwd", ".hidden", "a/b", "IMG 0042", "x..y", "é"):
        name = media_file(unsafe)
        assert name.startswith("media/id-") and name.endswith(".jpg") and len(name) == 9 + 32 + 4
    assert media_file("a/b") != media_file("a/c")


def test_the_detections_page_says_which_frames_have_a_thumbnail(db):
    add_thumbnails(db[0], ["r4"])
    rows, _ = detections_page(db[1], Filters())
    assert {r["request_id"]: r["thumbnail"] for r in rows} == {"r5": False, "r4": True, "r3": False, "r2": False,
                                                               "r1": False}
