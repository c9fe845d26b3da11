"""Training on one's own photos: the three sources, the split, bad files, classify, and a real pipeline."""

from __future__ import annotations

import csv
import io
import json
import subprocess
from collections import Counter
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from edgeprune import dataset
from edgeprune.dataset import RenderConfig, _backgrounds, render_frame, synthetic_class_names
from edgeprune.cli import main
from edgeprune.own_data import LabelledImage, build_own_data, read_camtrap_dp, split_by_group, splits_for_checkpoint
from shared.model import build_model, load_checkpoint
from tests.conftest import STARTUP_S, Processes, component_env, mosquitto_pub_login, open_reader, wait_until

CLASSES = {"blank": (60, 120, 50), "fox": (210, 90, 30), "owl": (150, 150, 160)}
PER_CLASS = 8
# a tiny model and few images keep each training run to seconds (width 16: the ladder's p=0.9 keeps 1 channel)
TINY = ["--epochs", "1", "--width", "16", "--batch-size", "8", "--image-size", "32", "--no-progress",
        "--threads", "1"]


def write_photos(root: Path) -> list[tuple[Path, str, str]]:
    """(file, label, camera) of small non-square JPEGs, a colour per class; plus one corrupt file per source."""
    rng = np.random.default_rng(0)
    rows = []
    for name, colour in CLASSES.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(PER_CLASS):
            path = root / name / f"{name}_{i}.jpg"
            Image.fromarray(np.clip(rng.normal(colour, 25, (24, 36, 3)), 0, 255).astype(np.uint8)).save(path)
            rows.append((path, name, f"cam-{i % 4}"))
    (root / "fox" / "IMG_broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    rows.append((root / "fox" / "IMG_broken.jpg", "fox", "cam-0"))
    return rows


def edgeprune(*args: str) -> str:
    """The command's stdout, run in this process (a subprocess would spend most of the test importing torch)."""
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(list(args)) == 0
    return out.getvalue()


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> tuple[Path, list[tuple[Path, str, str]]]:
    root = tmp_path_factory.mktemp("photos")
    return root, write_photos(root / "by-class")


@pytest.fixture(scope="module")
def folder_checkpoint(photos) -> tuple[Path, str]:
    root, _ = photos
    return root / "own.pt", edgeprune("train", "--images", str(root / "by-class"), "--out", str(root / "own.pt"), *TINY)


def test_images_folder_trains_skips_the_corrupt_file_and_records_the_classes(folder_checkpoint):
    path, stdout = folder_checkpoint
    assert "skipped 1 unreadable or corrupt file(s)" in stdout and "IMG_broken.jpg" in stdout
    assert "Class balance (24 images" in stdout
    state = load_checkpoint(path)
    assert state["config"]["class_names"] == ["blank", "fox", "owl"]
    assert (state["config"]["input_size"], state["config"]["resize"]) == (32, "letterbox")
    assert state["meta"]["data"]["unreadable"] == 1
    assert len(state["meta"]["history"]["epochs"]) == 1 and state["bn_tables"] and state["entry_bn_tables"]
    assert not path.with_name("own.pt.resume").exists()  # removed once training finished
    assert build_model(path).config.class_names == ("blank", "fox", "owl")


def test_labels_csv_with_own_column_names_trains(photos):
    root, rows = photos
    with (root / "labels.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["file", "species", "site"])
        writer.writerows([(p.relative_to(root), label, cam) for p, label, cam in rows])
    stdout = edgeprune("train", "--labels", str(root / "labels.csv"), "--path-column", "file", "--label-column",
                       "species", "--group-column", "site", "--out", str(root / "csv.pt"), *TINY)
    assert "split by column site" in stdout and "skipped 1 unreadable" in stdout
    assert load_checkpoint(root / "csv.pt")["config"]["class_names"] == ["blank", "fox", "owl"]


def test_split_column_and_lr_reach_the_checkpoint_and_its_test_split(photos):
    """A set's own hold-out (--split-column) is the split trained on and the one later tools rebuild."""
    root, rows = photos
    readable = [(p, label) for p, label, _ in rows if "broken" not in p.name]
    fixed = {p: ("test" if i % 4 == 0 else "val" if i % 4 == 1 else "train") for i, (p, _) in enumerate(readable)}
    with (root / "split.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "split"])
        writer.writerows([(p.relative_to(root), label, fixed[p]) for p, label in readable])
    stdout = edgeprune("train", "--labels", str(root / "split.csv"), "--split-column", "split", "--lr", "0.0123",
                       "--out", str(root / "split.pt"), *TINY)
    assert "split by column split" in stdout
    state = load_checkpoint(root / "split.pt")
    assert state["meta"]["train_config"]["lr"] == 0.0123 and state["meta"]["data"]["split_column"] == "split"
    splits = splits_for_checkpoint(root / "split.pt", threads=1, progress=False)
    assert {name: len(split) for name, split in splits.items()} == \
        {name: list(fixed.values()).count(name) for name in ("train", "val", "test")}


def write_camtrap_dp(root: Path, rows: list[tuple[Path, str, str]]) -> None:
    scientific = {"fox": "Vulpes vulpes", "owl": "Strix aluco"}
    media, observations = [], []
    for k, (path, label, camera) in enumerate(rows):
        media.append({"mediaID": f"m{k}", "deploymentID": camera, "timestamp": f"2026-05-01T10:{k:02d}:00Z",
                      "filePath": str(path.relative_to(root))})
        observations.append({"observationID": f"o{k}", "deploymentID": camera, "mediaID": f"m{k}",
                             "observationType": "blank" if label == "blank" else "animal",
                             "scientificName": scientific.get(label, "")})
    media.append({"mediaID": "m-human", "deploymentID": "cam-1", "timestamp": "2026-05-01T11:00:00Z",
                  "filePath": str(rows[0][0].relative_to(root))})
    observations.append({"observationID": "o-human", "deploymentID": "cam-1", "mediaID": "m-human",
                         "observationType": "human", "scientificName": ""})
    for name, table in (("media.csv", media), ("observations.csv", observations)):
        with (root / name).open("w", newline="") as fh:
            writer = csv.DictWriter(fh, list(table[0]))
            writer.writeheader()
            writer.writerows(table)
    (root / "datapackage.json").write_text(json.dumps({"taxonomic": [
        {"scientificName": "Vulpes vulpes", "vernacularNames": {"eng": "red fox"}},
        {"scientificName": "Strix aluco", "vernacularNames": {"eng": "tawny owl"}}]}))


@pytest.fixture(scope="module")
def camtrap_checkpoint(photos) -> tuple[Path, str]:
    root, rows = photos
    write_camtrap_dp(root, rows)
    return root / "dp.pt", edgeprune("train", "--camtrap-dp", str(root), "--out", str(root / "dp.pt"), *TINY)


def test_camtrap_dp_package_trains_with_common_and_scientific_names(photos, camtrap_checkpoint):
    root, _ = photos
    items, vernacular, skipped = read_camtrap_dp(root)
    assert Counter(i.label for i in items) == {"blank": 8, "Vulpes vulpes": 9, "Strix aluco": 8}
    assert skipped == {"no usable observation (human, vehicle, unknown or no scientificName)": 1}
    path, stdout = camtrap_checkpoint
    assert "split by deployment" in stdout
    config = load_checkpoint(path)["config"]
    assert config["class_names"] == ["blank", "tawny owl", "red fox"]
    assert config["scientific_names"] == ["", "Strix aluco", "Vulpes vulpes"]


def test_split_keeps_each_camera_in_one_split_and_ignores_file_order():
    items = [LabelledImage(Path(f"{cam}/{i}.jpg"), "fox" if i % 2 else "owl", cam)
             for cam in ("a", "b", "c", "d", "e", "f", "g", "h", "i", "j") for i in range(10)]
    splits = split_by_group(items, seed=0)
    cameras = {name: {items[i].group for i in idx} for name, idx in splits.items()}
    assert all(cameras[a].isdisjoint(cameras[b]) for a, b in (("train", "val"), ("train", "test"), ("val", "test")))
    assert all(cameras.values())
    shuffled = items[::-1]
    again = split_by_group(shuffled, seed=0)
    assert {n: sorted(str(shuffled[i].path) for i in idx) for n, idx in again.items()} == \
        {n: sorted(str(items[i].path) for i in idx) for n, idx in splits.items()}


def test_unreadable_files_are_counted_not_fatal(tmp_path):
    rows = write_photos(tmp_path)
    (tmp_path / "owl" / "empty.png").write_bytes(b"")
    rows.append((tmp_path / "owl" / "empty.png", "owl", ""))
    rows.append((tmp_path / "owl" / "missing.jpg", "owl", ""))
    data = build_own_data([LabelledImage(p, label) for p, label, _ in rows], 32, "crop", progress=False)
    assert sorted(Path(p).name for p in data.unreadable) == ["IMG_broken.jpg", "empty.png", "missing.jpg"]
    assert sum(len(s) for s in data.splits.values()) == len(CLASSES) * PER_CLASS


def test_classify_prints_label_confidence_and_top3(folder_checkpoint, photos):
    path, _ = folder_checkpoint
    _, rows = photos
    images = [str(rows[0][0]), str(rows[-2][0])]
    lines = edgeprune("classify", "--checkpoint", str(path), *images).splitlines()
    assert len(lines) == 2
    for line, image in zip(lines, images):
        fields = line.split("\t")
        assert fields[0] == image and fields[1] in CLASSES and 0 < float(fields[2]) <= 1
        assert [f.split(":")[0] for f in fields[3:]][0] == fields[1] and len(fields[3:]) == 3
    pruned = json.loads(edgeprune("classify", "--checkpoint", str(path), "--json", "--ratios", "0.5", *images))
    assert [r["image"] for r in pruned] == images
    for record in pruned:
        assert set(record) == {"image", "label", "confidence", "top3"}
        assert record["top3"][0]["label"] == record["label"] and len(record["top3"]) == 3


def test_synthetic_blank_frames_have_no_animal_and_their_own_class():
    assert synthetic_class_names(0.0)[-1] == "zebra" and synthetic_class_names(0.1)[-1] == "blank"
    config = RenderConfig(size=32)
    backgrounds = _backgrounds()
    silhouette = np.zeros((28, 28), np.uint8)
    silhouette[4:24, 6:22] = 255
    for night in (False, True):
        animal = render_frame(silhouette, backgrounds, np.random.default_rng([0, 7]), config, night)
        # the same generator draws the same background crop and light: only the animal differs
        blank = render_frame(None, backgrounds, np.random.default_rng([0, 7]), config, night)
        assert animal.shape == blank.shape == (32, 32, 3)
        assert not np.array_equal(animal, blank)


def test_blank_fraction_adds_blank_frames_and_leaves_the_animal_frames_alone(monkeypatch):
    rng = np.random.default_rng(0)
    few = (rng.integers(0, 255, (40, 28, 28)).astype(np.uint8), np.arange(40) % 10)
    monkeypatch.setattr(dataset, "load_silhouettes", lambda: few)
    plain = dataset.build_frames(RenderConfig(size=32))
    with_blanks = dataset.build_frames(RenderConfig(size=32, blank_fraction=0.25))
    assert sum(int((s.labels == 10).sum()) for s in with_blanks.values()) == 10
    for name in plain:
        animals = with_blanks[name].labels != 10
        np.testing.assert_array_equal(with_blanks[name].images[animals], plain[name].images)
        assert with_blanks[name].labels[~animals].size > 0 or name != "train"


@pytest.mark.integration
def test_own_class_and_scientific_names_reach_result_rows_through_mosquitto(broker, camtrap_checkpoint, photos,
                                                                             tmp_path):
    path, _ = camtrap_checkpoint
    _, rows = photos
    edgeprune("calibrate", "--checkpoint", str(path), "--random", "2", "--no-progress", "--threads", "1")
    db = tmp_path / "edgeprune.db"
    env = component_env(broker, EDGEPRUNE_GATEWAY_DB_PATH=str(db), EDGEPRUNE_GATEWAY_NODES="node-1",
                        EDGEPRUNE_GATEWAY_FLUSH_INTERVAL_S="0.2", EDGEPRUNE_GATEWAY_CHECKPOINT=str(path),
                        EDGEPRUNE_NODE_CHECKPOINT=str(path), EDGEPRUNE_NODE_PROFILE_REPEATS="2")
    procs = Processes(tmp_path, env)
    procs.start("gateway", "gateway")
    procs.start("node-1", "node", "--node-id", "node-1")
    try:
        reader = open_reader(db)
        wait_until(lambda: any(n["stage"] for n in reader.nodes()), STARTUP_S,
                   "the node running the own checkpoint was not placed")
        photos_sent = {f"trap-{label}": photo for photo, label, _ in rows[:-1:PER_CLASS]}  # one of each class
        for camera, photo in photos_sent.items():
            subprocess.run(["mosquitto_pub", *mosquitto_pub_login(broker), "-q", "1", "-f", str(photo),
                            "-t", f"edgeprune/camera/{camera}/frame"], check=True, timeout=10)
        wait_until(lambda: {r["camera_id"] for r in reader.recent_requests(0)} >= set(photos_sent), 30,
                   "a photo never became a result row")
        model = build_model(path)
        config = model.config
        from shared.imaging import decode_frame
        for row in reader.recent_requests(0):
            with torch.inference_mode():
                expected = int(model(torch.from_numpy(decode_frame(photos_sent[row["camera_id"]].read_bytes(),
                                                                   **config.preprocessing()))).argmax())
            assert (row["label"], row["label_index"]) == (config.class_names[expected], expected)
            assert row["scientific_name"] == config.scientific_names[expected]  # "" for blank, else the taxon
        log = procs.log("gateway")  # the gateway loaded own.accuracy.json, calibrated for these weights
        assert "no accuracy model" not in log and "calibrated for other weights" not in log
    finally:
        procs.stop_all()
