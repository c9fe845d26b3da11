"""What a checkpoint says about itself: class names, input size, resizing and normalisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from edgeprune.dataset import RenderConfig, _backgrounds, render_frame, synthetic_class_names, to_model_input
from node_agent.runtime import Request, StageRuntime
from shared.imaging import decode_frame, encode_png, fit_square
from shared.model import CLASS_NAMES, INPUT_SIZE, MEAN, STD, TrapNetConfig, build_model, make_model
from shared.schemas import Result, StageAssignment, parse_json


def test_old_config_dicts_load_with_todays_defaults():
    old = TrapNetConfig.from_dict({"width": 32, "blocks_per_stage": [1, 1, 1, 1], "num_classes": 10, "arch": "resnet"})
    assert old.class_names == CLASS_NAMES
    assert (old.input_size, old.resize, old.mean, old.std) == (INPUT_SIZE, "squash", MEAN, STD)


def test_the_shipped_model_calls_empty_frames_blank():
    """Most camera-trap frames are empty: the shipped model has a class for them (the last), and finds them."""
    model = build_model()
    assert model.config.class_names == synthetic_class_names(0.1) == (*CLASS_NAMES, "blank")
    assert (model.config.input_size, model.config.resize) == (INPUT_SIZE, "squash")  # CI's cost stays as it was
    backgrounds, config = _backgrounds(), RenderConfig()
    # frames no training run rendered (generators past the data set's), a third of them night shots
    empty = np.stack([render_frame(None, backgrounds, np.random.default_rng([0, 100_000 + j]), config, j % 3 == 0)
                      for j in range(30)])
    with torch.inference_mode():
        predicted = model(to_model_input(empty)).argmax(1)
    assert int((predicted == len(CLASS_NAMES)).sum()) >= 27  # blank recall 0.96 on its test split (docs/model.md)


def test_config_round_trips_and_rejects_mismatches():
    config = TrapNetConfig(width=11, class_names=("blank", "fox"), scientific_names=("", "Vulpes vulpes"),
                           input_size=96, resize="letterbox")
    assert config.num_classes == 2
    assert TrapNetConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="class names"):
        TrapNetConfig(num_classes=3, class_names=("a", "b"))
    with pytest.raises(ValueError, match="resize"):
        TrapNetConfig(resize="stretch")


@pytest.mark.parametrize("fit, expected", [("letterbox", (128, 128, 128)), ("crop", (200, 0, 0))])
def test_wide_frames_keep_their_proportions(fit, expected):
    wide = np.zeros((50, 200, 3), np.uint8)
    wide[:, 50:150] = (200, 0, 0)  # a red centre square between black sides
    out = np.asarray(fit_square(Image.fromarray(wide), 40, fit))
    assert out.shape == (40, 40, 3)
    assert tuple(out[0, 20]) == expected  # top edge: padding (letterbox) or the centre square (crop)
    squashed = np.asarray(fit_square(Image.fromarray(wide), 40, "squash"))
    assert tuple(squashed[20, 0]) == (0, 0, 0)  # the stretched black side is still in view


def test_a_results_label_and_taxon_come_from_the_checkpoint():
    config = TrapNetConfig(width=11, class_names=("badger", "fox", "owl"), input_size=48, resize="crop",
                           scientific_names=("Meles meles", "Vulpes vulpes", "Strix aluco"),
                           mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.4))
    torch.manual_seed(0)
    model = make_model(config).eval()
    runtime = StageRuntime(model, "node-1", StageAssignment(stage=1, node_id="node-1", first_block=0,
                                                            last_block=model.n_blocks - 1), 1, "out")
    frame = encode_png(np.random.default_rng(0).integers(0, 255, (30, 60, 3), dtype=np.uint8))
    result = parse_json(Result, runtime.run(Request("t", frame, {}, 1.0, "cam"), 1.0).payload)
    with torch.inference_mode():
        logits = model(torch.from_numpy(decode_frame(frame, **config.preprocessing())))
    assert result.label_index == int(logits.argmax())
    assert result.label == config.class_names[result.label_index]
    assert result.scientific_name == config.scientific_names[result.label_index]
