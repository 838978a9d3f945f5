"""`strategy: fsdp` (lrkit.training.sharding): what is sharded and what stays whole, and what a sharded run records.
The two-process run (equal to one process with twice the batch, resumed half-way): tests/test_launch.py."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lrkit.training.config import load_config
from lrkit.training.folder import training_inputs
from lrkit.training.model import ConceptModel
from lrkit.training.sharding import build_strategy, clean_name


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / "a.png")
    return folder


def config(photos, **overrides):
    return load_config(dict(dict(base="tiny-random-xl", method="dreambooth", output_dir="unused", strategy="fsdp",
                                 data=dict(photos=str(photos), class_word="vase", resolution=64),
                                 dreambooth=dict(prior_preservation=False)), **overrides))


@pytest.mark.parametrize("train_text_encoder", [False, True])
def test_what_trains_is_sharded_by_block_and_what_is_frozen_stays_whole(photos, train_text_encoder):
    model = ConceptModel(config(photos, dreambooth=dict(prior_preservation=False,
                                                        train_text_encoder=train_text_encoder)))
    strategy = build_strategy("fsdp", model)
    sharded = {cls.__name__ for cls in strategy.kwargs["auto_wrap_policy"]._module_classes}
    ignored = strategy.kwargs["ignored_modules"]
    encoders = {"CLIPTextModel", "CLIPTextModelWithProjection", "CLIPEncoderLayer"}
    assert {"UNet2DConditionModel", "BasicTransformerBlock", "ResnetBlock2D"} <= sharded
    if train_text_encoder:
        assert encoders <= sharded and ignored == [model.vae]
    else:
        assert not encoders & sharded and ignored == [model.vae, *model.text_encoders]
    assert strategy.kwargs["use_orig_params"] and strategy._state_dict_type == "full"
    assert build_strategy("ddp", model) == "ddp" and build_strategy("auto", model) == "auto"


def test_a_sharded_run_records_it_so_an_unsharded_resume_is_refused(photos):
    sharded, plain = config(photos), config(photos, strategy="ddp")
    assert training_inputs(sharded, [])["strategy"] == "fsdp"
    assert "strategy" not in training_inputs(plain, [])  # ddp and auto checkpoints resume each other


def test_names_are_the_unsharded_names():
    assert clean_name("unet._fsdp_wrapped_module.down_blocks.0._fsdp_wrapped_module.conv.weight") == \
        "unet.down_blocks.0.conv.weight"
