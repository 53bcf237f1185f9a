"""The prompt-learner interface from outside the repository: a method defined here, with a recipe
field of its own, registered in textrefiner.METHODS, trains through train.main (its field a flag,
its checkpoint holding only its trainable state), evaluates the new classes through eval.main and
is benchmarked by bench.py, with no change to any of them."""
import json
import os
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bench
import eval as evaluate_cli
import textrefiner
import train
from clip_model import tokenize
from helpers import assert_usage_error, synthetic


@dataclass
class ShiftRecipe(textrefiner.RefinerRecipe):
    epochs: int = 2
    batch_size: int = 4
    lr: float = 0.01
    shift_scale: float = 0.5  # this method's own hyper-parameter


class ShiftCLIP(textrefiner.PromptCLIP):
    """Hand-crafted class prompts whose features are moved by one learned vector, with TextRefiner."""
    recipe = ShiftRecipe
    loss_keys = ("loss", "loss_reg")

    def build(self, clip, classnames, recipe):
        self.shift_scale = recipe.shift_scale
        self.shift = nn.Parameter(torch.zeros(clip.config.embed_dim))

    def set_classnames(self, classnames):
        ids = tokenize([f"a photo of a {name.replace('_', ' ')}." for name in classnames])
        self.register_buffer("token_ids", ids.to(self.shift.device), persistent=False)
        super().set_classnames(classnames)

    def text_features(self):
        with torch.no_grad():
            text = self.clip.encode_text(self.token_ids).float()  # (C, D)
        return F.normalize(text + self.shift_scale * self.shift, dim=-1)

    def train_forward(self, images, labels):
        image, tokens, cls_attn = textrefiner.image_pass(self, images)  # the frozen tower, once
        return textrefiner.refined_ce(self, self.text_features(), image, labels, tokens, cls_attn)


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(textrefiner.METHODS, "shift", ShiftCLIP)


def test_a_method_defined_outside_trains_evaluates_and_benchmarks(registered, tmp_path, capsys):
    root, weights = synthetic(str(tmp_path))
    out = tmp_path / "base"
    common = ["--dataset", "caltech101", "--root", root, "--clip", weights, "--device", "cpu", "--workers", "0"]
    results = train.main(["--method", "shift", *common, "--subsample", "base", "--shift-scale", "0.25",
                          "--output-dir", str(out)])
    last = torch.load(out / "last.pt", weights_only=True)
    assert last["args"]["shift_scale"] == 0.25 and last["args"]["epochs"] == 2  # its flag and its recipe
    assert {k.split(".")[0] for k in last["model"]} == {"shift", "refiner"}  # no CLIP weights
    assert last["model"]["shift"].abs().sum() > 0  # trained
    assert results["method"] == "shift" and results["selection"] == "best-val"
    new = evaluate_cli.main(["--checkpoint", str(out / "best.pt"), "--subsample", "new", "--workers", "0",
                             "--device", "cpu", "--output-dir", str(tmp_path / "new")])
    assert new["num_classes"] == 3 and new["method"] == "shift"
    assert json.load(open(tmp_path / "new" / "results.json"))["args"]["method"] == "shift"
    # the other methods' flags are refused, and its own flag is refused for them
    assert_usage_error(train.main, ["--method", "shift", *common, "--kd-weight", "3", "--output-dir",
                                    str(tmp_path / "x")], "--kd-weight applies to --method promptkd, not shift", capsys)
    assert_usage_error(train.main, [*common, "--shift-scale", "3", "--output-dir", str(tmp_path / "x")],
                       "--shift-scale applies to --method shift, not coop", capsys)
    rates = bench.main(["step", "--method", "shift", "--clip", "tiny", "--device", "cpu", "--batch-size", "2",
                        "--num-classes", "3", "--steps", "1", "--warmup", "1"])
    assert set(rates) == {"ShiftCLIP+TextRefiner", "ShiftCLIP"}
    assert not os.path.exists(tmp_path / "x")
