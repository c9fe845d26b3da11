"""EfficientNet-Lite0: the pinned ImageNet weights, and the pipeline machinery (pruning, wire, runtime) on it."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch

from camera.simulator import camera_frame
from shared.imaging import decode_frame
from shared.lite0 import WEIGHTS_SHA256, WeightsError, imagenet_classes, load_weights, weights_path
from shared.model import IMAGENET_CHECKPOINT, build_model, model_fingerprint
from shared.profiling import profile_model
from shared.pruning import PrunableSlice, kept_channels, pruning_groups
from tests.conftest import even_split
from tests.test_pruning import run_pipeline, zeroed_copy
from tests.test_runtime import chain

SIZE = 64  # convolutions take any size: small inputs keep the pruning checks fast
SLICES = ((0, 0), (1, 1), (2, 2), (3, 3), (4, 4), (5, 5), (6, 6), (7, 7))
RATIOS = (0.1, 0.3, 0.5)


@functools.cache
def lite0():
    return build_model(IMAGENET_CHECKPOINT)


@functools.cache
def sliced():
    model = lite0()
    return [PrunableSlice(model, a, b, ladder=RATIOS, input_size=SIZE) for a, b in SLICES]


def test_the_pinned_file_loads_strictly_into_our_definition():
    model = lite0()
    assert model.n_blocks == 8 and model.config.num_classes == 1000
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(4.65e6, rel=0.01)
    loaded = load_weights(weights_path())
    assert len(loaded) == 296 and set(loaded) == set(model.state_dict())  # every key mapped, none left over


def test_a_file_with_another_hash_is_refused(tmp_path):
    other = tmp_path / "efficientnet-lite0-57934424.pth"
    torch.save({"_fc.weight": torch.zeros(1000, 1280)}, other)
    with pytest.raises(WeightsError, match="expected 579344248a93.*refusing"):
        load_weights(other)
    with pytest.raises(WeightsError, match="missing"):
        load_weights(tmp_path / "absent.pth")
    assert WEIGHTS_SHA256.startswith("579344248a93")


def test_a_real_cat_is_a_cat():
    skimage_data = pytest.importorskip("skimage.data")  # the train extra
    from shared.imaging import encode_jpeg

    model = lite0()
    x = torch.from_numpy(decode_frame(encode_jpeg(skimage_data.chelsea()), **model.config.preprocessing()))
    with torch.inference_mode():
        top3 = torch.topk(model(x)[0], 3).indices.tolist()
    assert {model.config.scientific_names[i] for i in top3} == {"Felis catus"}


def test_classes_carry_taxa_and_groups():
    classes = imagenet_classes()["classes"]
    by_name = {c["name"]: c for c in classes}
    assert len(by_name) == 1000
    assert by_name["tiger"]["scientific_name"] == "Panthera tigris" and by_name["tiger"]["group"] == "animal"
    assert by_name["bald eagle"]["scientific_name"] == "Haliaeetus leucocephalus"
    assert by_name["jeep"]["group"] == "vehicle" and "scientific_name" not in by_name["jeep"]
    assert by_name["scuba diver"]["group"] == "human"
    assert sum(c.get("group") == "animal" for c in classes) > 250


def test_no_channel_group_crosses_a_block():
    """The cut points hold: pruning_groups raises if a group spans two blocks (e.g. a depthwise-first slice)."""
    groups = pruning_groups(lite0(), SIZE)
    assert {g.block for g in groups} == set(range(8))


@pytest.mark.parametrize("ratio", RATIOS)
def test_every_slice_prunes_and_equals_the_masked_model(ratio):
    """Each block its own slice, chained through the wire format: equal to the model with pruned channels zeroed."""
    model, slices = lite0(), sliced()
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    ratios = [ratio] * len(SLICES)
    with torch.no_grad():
        expected = zeroed_copy(model, pruning_groups(model, SIZE), ratios)(x)
    torch.testing.assert_close(run_pipeline(slices, ratios, x), expected, atol=1e-4, rtol=1e-3)
    full = [model.output_norm(stage.last_block).num_features for stage in slices[:-1]]
    kept = [n if stage.keep_mask(ratio) is None else stage.keep_mask(ratio).sum() for n, stage in zip(full, slices)]
    # each slice's output keeps what kept_channels says, and some shrink (p = 0.1 keeps the stem's 16 and stage 1's 24)
    assert kept == [kept_channels(n, ratio, 8) for n in full] and kept != full


@pytest.mark.parametrize("n_nodes", [2, 3])
def test_node_runtime_chains_equal_the_whole_model(n_nodes):
    model = lite0()
    placement = even_split(model.n_blocks, [f"n{i}" for i in range(n_nodes)])
    frame = camera_frame(np.random.default_rng(0), 300, "jpeg")
    result = chain(model, placement, frame, "float16", {"request_id": "r1"})
    with torch.inference_mode():
        probs = torch.softmax(model(torch.from_numpy(decode_frame(frame, **model.config.preprocessing()))), 1)[0]
    assert result.label == model.config.class_names[int(probs.argmax())]
    assert result.confidence == pytest.approx(float(probs.max()), abs=5e-3)


def test_profiles_at_its_own_input_size():
    profile = profile_model(lite0(), repeats=1, warmup=0, model_name="efficientnet-lite0")
    assert [b.name for b in profile.blocks] == lite0().block_names
    assert profile.blocks[0].output_bytes == 16 * 112 * 112 * 2  # float16 on the wire, stem at 224 px


def test_fingerprint_is_stable():
    assert model_fingerprint(lite0()) == model_fingerprint(build_model(IMAGENET_CHECKPOINT))


def test_classify_defaults_to_the_imagenet_model(tmp_path):
    from shared.imaging import encode_jpeg, textured_scene
    from tests.test_own_data import edgeprune

    image = tmp_path / "scene.jpg"
    image.write_bytes(encode_jpeg(textured_scene(320, 240)))
    [record] = json.loads(edgeprune("classify", "--json", str(image)))
    names = set(lite0().config.class_names)
    assert len(record["top3"]) == 3 and {r["label"] for r in record["top3"]} <= names
    [trapnet] = json.loads(edgeprune("classify", "--checkpoint", "trapnet", "--json", str(image)))
    assert trapnet["label"] in build_model().config.class_names


def test_its_accuracy_model_keeps_the_controller_from_pruning_it():
    """The shipped calibration matches these weights, and the default ('measured') predictor puts every pruned
    vector below the default floor (0.9 of unpruned): the raw ImageNet weights are not pruning-robust."""
    from gateway.accuracy_model import load_block_accuracy
    from shared.ladder import DEFAULT_LADDER

    fit = load_block_accuracy(None, model_fingerprint(lite0()), IMAGENET_CHECKPOINT)
    assert fit is not None and fit.n_stages == 8
    floor = 0.9 * fit.lookup([0.0] * 8)
    for block in range(8):
        for ratio in DEFAULT_LADDER[1:]:
            vector = [0.0] * 8
            vector[block] = ratio
            assert fit.lookup(vector) < floor, vector


def test_pruned_channel_counts_are_multiples_of_eight():
    """channel_multiple 8: every pruned layer keeps a multiple of 8 (a ratio step is a speed step on SIMD kernels)."""
    counts = set()
    for stage in sliced():
        for ratio in RATIOS:
            for m in stage.module(ratio).modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    counts.add(m.num_features)
    full = {m.num_features for m in lite0().modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert counts - full and all(c % 8 == 0 for c in counts), sorted(counts - full)
    stem_out = {m.num_features for m in sliced()[0].module(0.1).modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert min(stem_out) == 16, sorted(stem_out)  # nearest, not down: p = 0.1 keeps all of the 16-channel stage 1


def test_the_benches_count_its_macs():
    """Torch-Pruning's counter knows SameConv2d: ~385 M MACs at 224 px scale to ~31 M at 64 px (else ~2 M)."""
    import torch_pruning as tp

    macs, _ = tp.utils.count_ops_and_params(lite0(), torch.zeros(1, 3, SIZE, SIZE))
    assert 28e6 < macs < 40e6
