"""The real-photo set's assembler on generated package files (no Debian package needed), and the split column."""

from __future__ import annotations

import csv
import io
import struct
import zlib
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgeprune import real_photos
from edgeprune.own_data import LabelledImage, read_labels_csv, split_by_group
from edgeprune.real_photos import (
    assemble,
    load_photos,
    photo_splits,
    read_rcc,
    readme_licences,
    unlabelled_photos,
    write_unlabelled,
)


def make_rcc(files: dict[str, bytes], compressed: frozenset[str] = frozenset()) -> bytes:
    """A Qt resource file (format 2) holding ``files`` (path -> bytes); paths in ``compressed`` qCompress'ed."""
    root: dict = {}
    for path, payload in files.items():
        node = root
        *folders, leaf = path.split("/")
        for folder in folders:
            node = node.setdefault(folder, {})
        node[leaf] = (path in compressed, payload)
    nodes, first_child, i = [("", root)], {}, 0
    while i < len(nodes):  # breadth first: each folder's children are contiguous, as Qt lays them out
        if isinstance(nodes[i][1], dict):
            first_child[i] = len(nodes)
            nodes += sorted(nodes[i][1].items())
        i += 1
    tree, names, data = b"", b"", b""
    for index, (name, content) in enumerate(nodes):
        name_offset = len(names)
        names += struct.pack(">HI", len(name), 0) + name.encode("utf-16-be")
        if isinstance(content, dict):
            tree += struct.pack(">IHII", name_offset, 2, len(content), first_child[index]) + bytes(8)
            continue
        squeeze, payload = content
        stored = struct.pack(">I", len(payload)) + zlib.compress(payload) if squeeze else payload
        tree += struct.pack(">IHHHI", name_offset, int(squeeze), 0, 0, len(data)) + bytes(8)
        data += struct.pack(">I", len(stored)) + stored
    names_at = 20 + len(tree)
    return b"qres" + struct.pack(">IIII", 2, 20, names_at + len(names), names_at) + tree + names + data


def test_rcc_reader_returns_every_file_raw_or_compressed():
    files = {"a/b/one.webp": b"\x00first" * 50, "a/b/README": b"text", "a/two.bin": b"second"}
    blob = make_rcc(files, compressed=frozenset({"a/b/one.webp"}))
    assert read_rcc(blob) == files
    with pytest.raises(ValueError):
        read_rcc(b"not an rcc file")


def test_readme_licences_read_both_file_list_styles():
    readme = ("Copyright: Ann\nSource: https://example.org/a.jpg\nLicense: CC0-1.0\nFiles: a.webp\n\n"
              "Copyright: Bob\nLicense: Public Domain\nFiles:\nb.webp\nc.webp\n")
    out = readme_licences(readme)
    assert out["a.webp"] == "CC0-1.0, Ann, https://example.org/a.jpg"
    assert out["b.webp"] == out["c.webp"] == "Public Domain, Bob"


def test_photo_split_is_stratified_by_class_and_seeded():
    photos = {f"{label}{i}": label for label in ("cat", "dog") for i in range(20)}
    splits = photo_splits(photos, seed=0)
    for label in ("cat", "dog"):
        mine = [s for name, s in splits.items() if photos[name] == label]
        assert (mine.count("test"), mine.count("val"), mine.count("train")) == (5, 2, 13)
    assert photo_splits(photos, seed=0) == splits
    assert photo_splits(photos, seed=1) != splits
    # a class's split does not depend on which other classes exist
    assert photo_splits({n: lab for n, lab in photos.items() if lab == "cat"}, seed=0) == \
        {n: s for n, s in splits.items() if photos[n] == "cat"}


@pytest.fixture
def packages(tmp_path: Path) -> dict[str, Path]:
    """Stand-ins for the three Debian packages: a GCompris .rcc, Tux Paint cut-outs, a darknet JPEG."""
    rng = np.random.default_rng(0)

    def photo(h: int, w: int, channels: int = 3) -> Image.Image:
        return Image.fromarray(rng.integers(0, 255, (h, w, channels), dtype=np.uint8))

    webp = {}
    for i in range(4):
        buf = io.BytesIO()
        photo(60, 80).save(buf, "WEBP")
        webp[f"gcompris/src/activities/zoo/resource/fish{i}.webp"] = buf.getvalue()
    webp["gcompris/src/activities/zoo/resource/README"] = b"Copyright: Ann\nLicense: CC0-1.0\nFiles: fish0.webp\n"
    gcompris = tmp_path / "rcc"
    gcompris.mkdir()
    (gcompris / "zoo.rcc").write_bytes(make_rcc(webp))
    tuxpaint = tmp_path / "stamps"
    (tuxpaint / "birds").mkdir(parents=True)
    for i in range(4):
        cutout = np.zeros((40, 50, 4), np.uint8)
        cutout[10:30, 10:40] = (200, 30, 30, 255)  # an opaque bird on a transparent ground
        Image.fromarray(cutout).save(tuxpaint / "birds" / f"bird{i}.png")
    darknet = tmp_path / "darknet"
    darknet.mkdir()
    photo(50, 70).save(darknet / "eagle.jpg")
    catalogue = {"fish": [f"zoo:gcompris/src/activities/zoo/resource/fish{i}.webp" for i in range(4)],
                 "bird": [f"tuxpaint:birds/bird{i}.png" for i in range(4)] + ["darknet:eagle.jpg"]}
    return {"gcompris": gcompris, "tuxpaint": tuxpaint, "darknet": darknet, "catalogue": catalogue}


def test_assembled_set_keeps_every_view_of_a_photo_in_one_split(packages, tmp_path):
    backgrounds = [np.full((100, 120, 3), (40, 160, 40), np.uint8)]
    out = tmp_path / "real"
    counts = assemble(out, load_photos(**packages), backgrounds, n_views=3, seed=0)
    assert {label: sum(per.values()) for label, per in counts.items()} == {"fish": 4, "bird": 5}
    rows = list(csv.DictReader((out / "labels.csv").open()))
    assert len(rows) == 9 * 3
    by_photo = defaultdict(set)
    for row in rows:
        by_photo[row["photo"]].add(row["split"])
        assert (out / row["path"]).is_file()
    assert all(len(splits) == 1 for splits in by_photo.values())
    licences = {row["photo"]: row["licence"] for row in rows}
    assert licences["gcompris/zoo/fish0"] == "CC0-1.0, Ann (gcompris-qt-data)"
    assert licences["tuxpaint/birds/bird0"].startswith("GPL-2")
    # a cut-out is pasted onto the background: no transparent (black) ground left, the bird's red kept
    first = np.asarray(Image.open(out / "bird" / "tuxpaint_birds_bird0-0.jpg")).reshape(-1, 3).astype(int)
    assert (np.abs(first - (40, 160, 40)).sum(1) < 60).mean() > 0.3
    assert (np.abs(first - (200, 30, 30)).sum(1) < 60).any()
    # the split column carries the photo split into training: no photo in two splits
    items = read_labels_csv(out / "labels.csv", split_column="split")
    split = split_by_group(items)
    photo_of = {out / row["path"]: row["photo"] for row in rows}
    seen = {name: {photo_of[items[i].path] for i in idx} for name, idx in split.items()}
    assert not (seen["train"] & seen["test"]) and not (seen["val"] & seen["test"])
    assert sum(map(len, split.values())) == len(rows)
    assert assemble(tmp_path / "again", load_photos(**packages), backgrounds, 3, 0) == counts
    assert (tmp_path / "again" / "labels.csv").read_bytes() == (out / "labels.csv").read_bytes()


def test_unlabelled_photos_leave_out_every_labelled_one_even_a_resized_copy(packages, monkeypatch):
    """Distilling on a test photo would leak the held-out split: copies in another resource file are caught too."""
    monkeypatch.setattr(real_photos, "MIN_GCOMPRIS_BYTES", 0)

    def smooth(seed: int, size: tuple[int, int] = (80, 60)) -> Image.Image:
        coarse = np.random.default_rng(seed).integers(0, 255, (4, 4, 3), dtype=np.uint8)
        return Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC)

    def webp(image: Image.Image) -> bytes:
        buf = io.BytesIO()
        image.save(buf, "WEBP", quality=70)
        return buf.getvalue()

    smooth(1).save(packages["darknet"] / "eagle.jpg")  # a catalogued photo ...
    (packages["gcompris"] / "erase.rcc").write_bytes(make_rcc({  # ... shipped again, larger, by another activity
        "gcompris/src/activities/erase/resource/eagle.webp": webp(smooth(1, (120, 90))),
        "gcompris/src/activities/erase/resource/meadow.webp": webp(smooth(2))}))
    (packages["tuxpaint"] / "plants").mkdir()
    smooth(3).convert("RGBA").save(packages["tuxpaint"] / "plants" / "tree.png")
    labelled = load_photos(**packages)
    found = list(unlabelled_photos(labelled, packages["gcompris"], packages["tuxpaint"], packages["darknet"]))
    assert sorted(p.name for p in found) == ["gcompris/erase/meadow", "tuxpaint/plants/tree"]
    out = packages["darknet"].parent / "unlabelled"
    assert write_unlabelled(out, iter(found), [np.full((100, 120, 3), 90, np.uint8)]) == 2
    assert sorted(p.name for p in out.iterdir()) == ["gcompris_erase_meadow.jpg", "tuxpaint_plants_tree.jpg"]


def test_a_missing_package_file_is_named(packages, tmp_path):
    packages["catalogue"] = {"fish": ["zoo:gcompris/src/activities/zoo/resource/nothere.webp"]}
    with pytest.raises(FileNotFoundError, match="nothere"):
        list(load_photos(**packages))


def test_split_column_fixes_the_split_and_rejects_unknown_values(tmp_path):
    items = [LabelledImage(Path(f"{i}.jpg"), "a", split=s) for i, s in enumerate(["test", "train", "val", "train"])]
    assert split_by_group(items) == {"train": [1, 3], "val": [2], "test": [0]}
    (tmp_path / "labels.csv").write_text("path,label,split\n0.jpg,a,train\n1.jpg,b,holdout\n")
    with pytest.raises(SystemExit, match="holdout"):
        read_labels_csv(tmp_path / "labels.csv", split_column="split")
