"""A labelled set of real animal photos, assembled offline from Debian packages (issue #22's evaluation).

No registry package ships a labelled camera-trap set, but three Debian packages ship real animal
photographs with names: GCompris (``gcompris-qt-data``: Wikimedia Commons photos, public domain /
CC0 / CC-BY / CC-BY-SA, each file's licence in the README beside it inside the package's Qt
resource files), Tux Paint's stamps (``tuxpaint-stamps-default``, GPL-2: photographic cut-outs on a
transparent background, pasted here onto a random crop of the synthetic set's background photos)
and ``darknet`` (GPL-3.0+ or MIT or WTFPL), plus scikit-image's cat. :data:`CATALOGUE` names every
photo kept and its class; cartoons, drawings and classes with fewer than 20 photos are left out
(docs/own-data.md lists them). Nothing is downloaded, nothing is committed: the set is rebuilt from
the installed packages, the same every time for one seed.

The split is by **photo**, stratified per class (:func:`photo_splits`): every view of a photo lands
in the split of its photo, so test accuracy is measured on photos the model never trained on.
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

GCOMPRIS_RCC = Path("/usr/share/gcompris-qt/rcc")
TUXPAINT_ANIMALS = Path("/usr/share/tuxpaint/stamps/animals")
DARKNET_DATA = Path("/usr/share/darknet/data")
PACKAGES = ("gcompris-qt-data", "tuxpaint-stamps-default", "darknet")
TEST_SHARE, VAL_SHARE = 0.25, 0.1
VIEWS = 6
MAX_SIDE = 640  # views are stored at most this wide or high: camera-trap size, and a quick decode
LICENCES = {"tuxpaint": "GPL-2 (tuxpaint-stamps-default)", "darknet": "GPL-3.0+ or MIT or WTFPL (darknet)",
            "skimage": "scikit-image sample data"}


def _gc(activity: str, folder: str, names: str) -> list[str]:
    return [f"{activity}:gcompris/src/activities/{activity}/resource/{folder}{n}.webp" for n in names.split()]


def _tux(folder: str, names: str) -> list[str]:
    return [f"tuxpaint:{folder}/{n}.png" for n in names.split()]


# class -> photos ("source:member"). Every entry was looked at: real photographs only.
CATALOGUE: dict[str, list[str]] = {
    "bird": _tux("birds", "adelaide-rosella albino_peahen blackbird chicken_profile crow crowned_crane cuckoo drake "
                 "duck gander guineafowl helmeted_guineafowl hen heron_greatblue heron_greatblue_flying lark "
                 "little-penguin magellanic_penguin magpie nandou ostrich owl peacock pelican penguin pigeon "
                 "pink_flamingo quetzal rainbow-lorikeet rooster seagull silver-gull tucan turkey vulture")
    + _gc("erase", "", "gosling heron kingfisher northern_harrier penguin spoonbills swans toucan")
    + _gc("explore_world_animals", "animals/", "scarlet_macaw")
    + _gc("explore_farm_animals", "animals/", "chicken duck owl") + ["darknet:eagle.jpg"],
    "fish": _gc("categorization", "images/fishes/", " ".join(f"fish{i}" for i in range(1, 29))),
    "carnivore": _tux("mammals", "bears/bear bears/european-bear cats/lion-2 cats/lion cats/tiger cats/tiger_sumatran "
                      "dogs/dingo dogs/dog dogs/fox badger ferret aquatic/otter aquatic/sea_lion")
    + _gc("erase", "", "cheetah kitten meerkats red_panda")
    + _gc("explore_world_animals", "animals/", "jaguar panda polar_bear")
    + _gc("explore_farm_animals", "animals/", "cat dog") + ["darknet:dog.jpg", "skimage:chelsea"],
    "bovid": _tux("mammals/bovines", "bison bull cow cow_white gnu-baby-stand gnu-baby gnu-sitting gnu-stand goat "
                  "indian_blackbuck mountaingoat ram sheep sheep_lamb yak zebu")
    + _gc("erase", "", "calf goat nubian_ibex") + _gc("explore_world_animals", "animals/", "bison")
    + _gc("explore_farm_animals", "animals/", "cow sheep"),
    "other hoofed": _tux("mammals", "camel/camel camel/dromedary deer/caribou deer/deer deer/doe deer/wapiti "
                         "equines/donkey equines/donkey_eating equines/horse equines/zebra giraffe hippopotamus pig "
                         "pig_golden pig_golden2 rhino_black wildboar")
    + _gc("erase", "", "alpaca camels giraffe horse rhinoceros")
    + _gc("explore_world_animals", "animals/", "giraffe moose")
    + _gc("explore_farm_animals", "animals/", "horse pig") + ["darknet:giraffe.jpg", "darknet:horses.jpg"],
}


# --- Qt resource files (GCompris ships its images inside them) ----------------------------------------


def read_rcc(blob: bytes) -> dict[str, bytes]:
    """Every file in a Qt ``.rcc`` resource (format 1-3), path -> bytes; zlib-compressed entries inflated.

    Why our own: GCompris keeps its photos only inside these, and a 40-line reader beats a Qt dependency.
    """
    if blob[:4] != b"qres":
        raise ValueError("not a Qt resource file")
    version, tree, data, names = struct.unpack(">IIII", blob[4:20])
    node_size = 14 if version == 1 else 22
    out: dict[str, bytes] = {}

    def name(offset: int) -> str:
        (length,) = struct.unpack(">H", blob[names + offset:names + offset + 2])
        return blob[names + offset + 6:names + offset + 6 + 2 * length].decode("utf-16-be")

    def walk(index: int, prefix: str) -> None:
        at = tree + index * node_size
        name_offset, flags = struct.unpack(">IH", blob[at:at + 6])
        path = prefix + name(name_offset) if index else ""
        if flags & 2:  # directory
            count, first = struct.unpack(">II", blob[at + 6:at + 14])
            for child in range(first, first + count):
                walk(child, path + "/" if index else "")
            return
        (offset,) = struct.unpack(">I", blob[at + 10:at + 14])
        (size,) = struct.unpack(">I", blob[data + offset:data + offset + 4])
        payload = blob[data + offset + 4:data + offset + 4 + size]
        if flags & 1:  # qCompress: 4-byte length, then zlib
            payload = zlib.decompress(payload[4:])
        if not flags & 4:  # zstd entries (none in the images used) are left out
            out[path] = payload

    walk(0, "")
    return out


def readme_licences(readme: str) -> dict[str, str]:
    """File name -> "licence, author, source" from a GCompris resource README (Copyright/Source/License/Files)."""
    out: dict[str, str] = {}
    for block in re.split(r"\n\s*\n", readme):
        fields, files = {}, []
        in_files = False
        for line in block.splitlines():
            key, sep, value = line.partition(":")
            if sep and key.strip() in ("Copyright", "Source", "License", "Files", "Comments"):
                fields[key.strip()] = value.strip()
                in_files = key.strip() == "Files"
                files += value.split() if in_files else []
            elif in_files:
                files += line.split()
        for f in files:
            out[f] = ", ".join(fields[k] for k in ("License", "Copyright", "Source") if fields.get(k))
    return out


# --- photos -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Photo:
    name: str                # unique, e.g. "gcompris/erase/alpaca"
    label: str
    pixels: np.ndarray       # H x W x 3 uint8, or H x W x 4 for a cut-out to paste onto a background
    licence: str


def load_photos(gcompris: Path = GCOMPRIS_RCC, tuxpaint: Path = TUXPAINT_ANIMALS,
                darknet: Path = DARKNET_DATA, catalogue: dict[str, list[str]] | None = None) -> Iterator[Photo]:
    """The catalogue's photos, read from the installed packages; a missing one raises ``FileNotFoundError``."""
    rcc_cache: dict[str, dict[str, bytes]] = {}
    for label, entries in (catalogue or CATALOGUE).items():
        for entry in entries:
            source, member = entry.split(":", 1)
            if source == "tuxpaint":
                pixels = np.asarray(Image.open(tuxpaint / member).convert("RGBA"))
                yield Photo(f"tuxpaint/{member.rsplit('.', 1)[0]}", label, pixels, LICENCES["tuxpaint"])
            elif source == "darknet":
                pixels = np.asarray(Image.open(darknet / member).convert("RGB"))
                yield Photo(f"darknet/{member.rsplit('.', 1)[0]}", label, pixels, LICENCES["darknet"])
            elif source == "skimage":
                from skimage import data

                yield Photo(f"skimage/{member}", label, getattr(data, member)(), LICENCES["skimage"])
            else:  # a GCompris activity's resource file
                if source not in rcc_cache:
                    rcc_cache[source] = read_rcc((gcompris / f"{source}.rcc").read_bytes())
                files = rcc_cache[source]
                if member not in files:
                    raise FileNotFoundError(f"{gcompris / source}.rcc has no {member}")
                payload = files[member]
                readme = files.get(member.rsplit("/", 1)[0] + "/README", b"").decode("utf-8", "replace")
                licence = readme_licences(readme).get(member.rsplit("/", 1)[1], "see the package's README")
                pixels = np.asarray(Image.open(io.BytesIO(payload)).convert("RGB"))
                stem = member.rsplit(".", 1)[0].split("/resource/")[-1]
                yield Photo(f"gcompris/{source}/{stem}", label, pixels, f"{licence} (gcompris-qt-data)")


def _stable(text: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}:{text}".encode()).hexdigest()


def photo_splits(photos: dict[str, str], seed: int = 0, test_share: float = TEST_SHARE,
                 val_share: float = VAL_SHARE) -> dict[str, str]:
    """Photo name -> split, stratified per class: a seeded hash order, then ``test_share`` to test and
    ``val_share`` (at least one) to val, the rest to train. ``photos`` maps name -> label."""
    out: dict[str, str] = {}
    for label in sorted(set(photos.values())):
        names = sorted((n for n, lab in photos.items() if lab == label), key=lambda n: _stable(n, seed))
        n_test = round(test_share * len(names))
        n_val = max(1, round(val_share * len(names))) if len(names) - n_test > 1 else 0
        for i, name in enumerate(names):
            out[name] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return out


def scene(photo: Photo, backgrounds: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """The photo as an RGB scene: a cut-out (RGBA) is pasted, 55-85 % of the frame's height, onto a random
    4:3 crop of a background photo; a photo is returned as it is."""
    if photo.pixels.shape[2] == 3:
        return photo.pixels
    rgba = Image.fromarray(photo.pixels)
    box = rgba.getbbox() or (0, 0, *rgba.size)
    animal = rgba.crop(box)
    w, h = animal.size
    height = int(max(h, w * 3 / 4) / rng.uniform(0.55, 0.85))
    width = height * 4 // 3
    ground = Image.fromarray(backgrounds[rng.integers(len(backgrounds))]).convert("RGB")
    zoom = max(width / ground.width, height / ground.height) * rng.uniform(1.0, 1.6)
    ground = ground.resize((max(width, round(ground.width * zoom)), max(height, round(ground.height * zoom))))
    x0, y0 = rng.integers(0, ground.width - width + 1), rng.integers(0, ground.height - height + 1)
    canvas = ground.crop((x0, y0, x0 + width, y0 + height)).convert("RGBA")
    canvas.alpha_composite(animal, (int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))))
    return np.asarray(canvas.convert("RGB"))


def views(rgb: np.ndarray, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    """The whole photo, then ``n - 1`` random crops of 70-100 % of each side, half of them mirrored."""
    out = [rgb]
    h, w = rgb.shape[:2]
    for _ in range(n - 1):
        ch, cw = int(h * rng.uniform(0.7, 1.0)), int(w * rng.uniform(0.7, 1.0))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        crop = rgb[y:y + ch, x:x + cw]
        out.append(np.ascontiguousarray(crop[:, ::-1] if rng.random() < 0.5 else crop))
    return out


def assemble(out: Path, photos: Iterator[Photo], backgrounds: list[np.ndarray], n_views: int = VIEWS,
             seed: int = 0) -> dict[str, dict[str, int]]:
    """Write ``out/<class>/<photo>-<view>.jpg`` and ``out/labels.csv`` (path, label, photo, split, licence);
    returns photos per class and split. Each photo's scene and views come from a generator seeded by its name."""
    from shared.imaging import encode_jpeg

    photos = list(photos)
    splits = photo_splits({p.name: p.label for p in photos}, seed)
    counts: dict[str, dict[str, int]] = {}
    rows = []
    for photo in photos:
        rng = np.random.default_rng(int(_stable(photo.name, seed)[:16], 16))
        folder = out / photo.label
        folder.mkdir(parents=True, exist_ok=True)
        stem = photo.name.replace("/", "_")
        for k, view in enumerate(views(scene(photo, backgrounds, rng), n_views, rng)):
            image = Image.fromarray(view)
            image.thumbnail((MAX_SIDE, MAX_SIDE))
            path = folder / f"{stem}-{k}.jpg"
            path.write_bytes(encode_jpeg(np.asarray(image), quality=92))
            rows.append({"path": str(path.relative_to(out)), "label": photo.label, "photo": photo.name,
                         "split": splits[photo.name], "licence": photo.licence})
        per = counts.setdefault(photo.label, {"train": 0, "val": 0, "test": 0})
        per[splits[photo.name]] += 1
    with (out / "labels.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "label", "photo", "split", "licence"])
        writer.writeheader()
        writer.writerows(rows)
    return counts


# --- unlabelled photos (distillation only) ------------------------------------------------------------

MIN_GCOMPRIS_BYTES = 15_000  # smaller webp files are icons and drawings
NEAR_DUPLICATE_BITS = 6      # average-hash distance at or below which a photo counts as a catalogued one


def average_hash(pixels: np.ndarray) -> int:
    """64-bit average hash (8x8 grey, above the mean): equal for resized or recompressed copies of a photo."""
    grey = np.asarray(Image.fromarray(pixels[..., :3]).convert("L").resize((8, 8), Image.Resampling.BILINEAR), float)
    return int("".join("1" if v else "0" for v in (grey > grey.mean()).flatten()), 2)


def unlabelled_photos(catalogued: Iterator[Photo], gcompris: Path = GCOMPRIS_RCC,
                      tuxpaint: Path = TUXPAINT_ANIMALS.parent, darknet: Path = DARKNET_DATA) -> Iterator[Photo]:
    """The same packages' other photos (every Tux Paint stamp, GCompris's larger webp files, darknet's other
    photos), without labels, for in-place distillation of the pruned widths.

    None may be a labelled photo, or the held-out test split would leak into training: anything within
    :data:`NEAR_DUPLICATE_BITS` of a catalogued photo's average hash is left out (GCompris ships many photos
    in two activities' resource files).
    """
    known = [average_hash(p.pixels) for p in catalogued]

    def fresh(pixels: np.ndarray) -> bool:
        h = average_hash(pixels)
        return all(bin(h ^ k).count("1") > NEAR_DUPLICATE_BITS for k in known)

    for path in sorted(tuxpaint.rglob("*.png")):
        pixels = np.asarray(Image.open(path).convert("RGBA"))
        if fresh(pixels):
            yield Photo(f"tuxpaint/{path.relative_to(tuxpaint).with_suffix('')}", "", pixels, LICENCES["tuxpaint"])
    for path in sorted(darknet.glob("*.jpg")):
        pixels = np.asarray(Image.open(path).convert("RGB"))
        if fresh(pixels):
            yield Photo(f"darknet/{path.stem}", "", pixels, LICENCES["darknet"])
    for rcc in sorted(gcompris.glob("*.rcc")):
        for member, payload in sorted(read_rcc(rcc.read_bytes()).items()):
            if member.endswith(".webp") and len(payload) >= MIN_GCOMPRIS_BYTES:
                pixels = np.asarray(Image.open(io.BytesIO(payload)).convert("RGB"))
                if fresh(pixels):
                    stem = member.rsplit(".", 1)[0].split("/resource/")[-1]
                    yield Photo(f"gcompris/{rcc.stem}/{stem}", "", pixels,
                                "see the package's README (gcompris-qt-data)")


def write_unlabelled(out: Path, photos: Iterator[Photo], backgrounds: list[np.ndarray], seed: int = 0) -> int:
    """One scene per photo as ``out/<name>.jpg`` (cut-outs pasted as in :func:`assemble`); returns how many."""
    from shared.imaging import encode_jpeg

    out.mkdir(parents=True, exist_ok=True)
    n = 0
    for photo in photos:
        rng = np.random.default_rng(int(_stable(photo.name, seed)[:16], 16))
        image = Image.fromarray(scene(photo, backgrounds, rng))
        image.thumbnail((MAX_SIDE, MAX_SIDE))
        (out / f"{photo.name.replace('/', '_')}.jpg").write_bytes(encode_jpeg(np.asarray(image), quality=90))
        n += 1
    return n
