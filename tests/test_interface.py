"""The prompt-learner interface from outside the repository: a method defined here, with a recipe
field of its own, registered in textrefiner.METHODS, trains through train.main (its field a flag,
its checkpoint holding only its trainable state), evaluates the new classes through eval.main and
is benchmarked by bench.py, with no change to any of them."""
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bench
import clip_model
import data
import eval as evaluate_cli
import hosts
import textrefiner
import flags
import train
from clip_model import tokenize
from helpers import REPO, assert_usage_error, synthetic, train_argv


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

# ----------------------------------------------------------------------------- a method from a file, the contract


EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "clip_adapter.py")


def test_a_method_in_a_file_outside_the_repository_trains_and_evaluates_with_nothing_registered(tmp_path, capsys):
    """--method FILE.py:CLASS: its own field is a flag recorded with the run; a fresh eval.py rebuilds it
    from the checkpoint alone; the adapter trains the image side, so the run's test accuracy (its last
    epoch) is what eval.py computes from last.pt; with the file gone, one line names it."""
    root, weights = synthetic(str(tmp_path))
    method_file = tmp_path / "elsewhere" / "adapter.py"
    os.makedirs(method_file.parent)
    shutil.copy(EXAMPLE, method_file)
    spec = f"{method_file}:CLIPAdapter"
    out = tmp_path / "run"
    results = train.main(["--method", spec, "--ratio", "0.5", *train_argv(root, weights, str(out))[:-2],
                          "--selection", "last", "--output-dir", str(out)])
    last = torch.load(out / "last.pt", weights_only=True)
    assert (last["args"]["ratio"], last["args"]["method"], last["args"]["method_file"]) == (0.5, spec, str(method_file))
    assert "CLIPAdapter" not in {M.__name__ for M in textrefiner.METHODS.values()}
    again = evaluate_cli.main(["--checkpoint", str(out / "last.pt"), "--workers", "0", "--device", "cpu"])
    assert again["accuracy"] == results["accuracy"] and again["method"] == spec
    os.rename(method_file, tmp_path / "moved.py")
    assert_usage_error(evaluate_cli.main, ["--checkpoint", str(out / "last.pt"), "--workers", "0"],
                       f"--method {spec}: cannot import {method_file}", capsys)


def test_stored_image_features_are_never_served_to_a_model_that_computes_its_own(run):
    """A method overriding image_features (CLIP-Adapter, which does not declare frozen image features)
    is encoded at every evaluation: after a change of its adapter, the cached evaluation is the uncached one."""
    root, weights, _ = run
    Adapter = flags.load_method(f"{EXAMPLE}:CLIPAdapter")
    splits = data.load_splits("caltech101", root, subsample="base")
    model = Adapter(clip_model.load_clip(weights), splits["classnames"])
    loader = data.build_eval_loader(splits["test"], 4, 32, workers=0)
    cache = {}
    train.evaluate(model, loader, splits["classnames"], torch.device("cpu"), "fp32", cache)
    with torch.no_grad():
        for param in model.adapter.parameters():
            param.mul_(-3.0)
    cached = train.evaluate(model, loader, splits["classnames"], torch.device("cpu"), "fp32", cache)
    assert cache == {} and cached == train.evaluate(model, loader, splits["classnames"], torch.device("cpu"), "fp32")


@dataclass
class PlainRecipe(textrefiner.Recipe):  # no TextRefiner: the interface alone
    epochs: int = 2
    warmup_epochs: int = 0
    batch_size: int = 4
    lr: float = 0.05
    shift_scale: float = 0.5


class PlainShiftCLIP(ShiftCLIP):
    recipe = PlainRecipe


def test_a_method_without_textrefiner_settings_trains_and_evaluates(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(textrefiner.METHODS, "plain-shift", PlainShiftCLIP)
    root, weights = synthetic(str(tmp_path))
    common = ["--dataset", "caltech101", "--root", root, "--clip", weights, "--device", "cpu", "--workers", "0"]
    results = train.main(["--method", "plain-shift", *common, "--subsample", "base", "--output-dir",
                          str(tmp_path / "base")])
    last = torch.load(tmp_path / "base" / "last.pt", weights_only=True)
    assert set(last["model"]) == {"shift"} and results["refiner"] is False
    new = evaluate_cli.main(["--checkpoint", str(tmp_path / "base" / "best.pt"), "--subsample", "new", "--workers",
                             "0", "--device", "cpu"])
    assert new["num_classes"] == 3 and new["method"] == "plain-shift"
    assert_usage_error(train.main, ["--method", "plain-shift", *common, "--no-refiner", "--output-dir",
                                    str(tmp_path / "x")], "--no-refiner applies to --method coop", capsys)


def test_a_recipe_that_redeclares_a_textrefiner_setting_is_refused(monkeypatch, tmp_path, capsys):
    """A method's own `alpha` (CLIP-Adapter's name for its ratio) would silently set TextRefiner's."""
    @dataclass
    class AlphaRecipe(ShiftRecipe):
        alpha: float = 0.5

    class AlphaCLIP(ShiftCLIP):
        recipe = AlphaRecipe

    monkeypatch.setitem(textrefiner.METHODS, "alpha", AlphaCLIP)
    root, weights = synthetic(str(tmp_path))
    assert_usage_error(train.main, ["--method", "alpha", *train_argv(root, weights, str(tmp_path / "out"))],
                       "--method alpha: AlphaRecipe.alpha redeclares TextRefiner's setting 'alpha'", capsys)
    assert not os.path.exists(tmp_path / "out")


def test_every_host_starts_from_the_same_tensors_with_and_without_textrefiner():
    """host vs host + TextRefiner at one seed is a paired comparison: the host's trainable tensors before
    the first step do not depend on whether the refiner is built."""
    clip = clip_model.build_model(clip_model.random_state_dict(clip_model.CONFIGS["tiny"]))
    teacher_clip = clip_model.build_model(clip_model.random_state_dict(clip_model.CONFIGS["tiny-teacher"], seed=1))
    width = teacher_clip.config.transformer_width
    prompts = (torch.randn(4, width), torch.randn(1, 4, width), torch.randn(2, 4, teacher_clip.config.vision_width))
    for name, Method in textrefiner.METHODS.items():
        recipe = Method.recipe(**({"depth": 2} if "depth" in flags.recipe_field_names(Method) else {}))
        parts = dict(teacher=hosts.PromptSRCTeacher(teacher_clip, *prompts, ["cat", "dog"])) if name == "promptkd" else {}
        host = {}
        for refiner in (True, False):
            torch.manual_seed(5)
            model = Method(clip, ["cat", "dog"], dataclasses.replace(recipe, refiner=refiner), **parts)
            host[refiner] = {k: v for k, v in model.named_parameters() if v.requires_grad and "refiner." not in k}
        assert host[True].keys() == host[False].keys(), name
        assert all(torch.equal(host[True][k], host[False][k]) for k in host[True]), name


def test_make_runs_a_method_from_a_file_under_torchrun_and_over_two_table_workers(tmp_path, capsys):
    """METHOD=FILE.py:CLASS through the make targets users run: base2new with GPUS=2 (each step under
    torchrun, 2 CPU ranks) and a table over two spawned workers; runs land in OUTPUT/<CLASS>/, the
    method's own flag is recorded, and the benchmark takes the same spec."""
    root, weights = synthetic(str(tmp_path))
    method_file = tmp_path / "adapter.py"
    shutil.copy(EXAMPLE, method_file)
    spec = f"{method_file}:CLIPAdapter"
    train_args = "--epochs 1 --warmup-epochs 0 --batch-size 4 --workers 0 --device cpu --ratio 0.4"
    common = [f"DATA={root}", f"CLIP={weights}", f"METHOD={spec}", f"PYTHON={sys.executable}",
              f"TRAIN_ARGS={train_args}", "EVAL_ARGS=--workers 0 --device cpu"]
    for target, extra in (("base2new", ["DATASET=caltech101", "GPUS=2"]),
                          ("table", ["DATASETS=caltech101", "SEEDS=1 2", "GPUS=2"])):
        output = tmp_path / target
        proc = subprocess.run(["make", "--no-print-directory", "-C", REPO, target, f"OUTPUT={output}", *common, *extra],
                              capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        seeds = (1,) if target == "base2new" else (1, 2)
        for seed in seeds:
            run = output / "CLIPAdapter" / "base2new" / "caltech101" / f"seed{seed}"
            base = json.load(open(run / "base" / "results.json"))
            assert base["method"] == spec and base["args"]["ratio"] == 0.4, target
            assert json.load(open(run / "new" / "results.json"))["method"] == spec
    assert "torch.distributed.run --standalone --nproc_per_node=2" in subprocess.run(
        ["make", "-n", "-C", REPO, "base2new", "DATASET=caltech101", *common, "GPUS=2"],
        capture_output=True, text=True).stdout
    rates = bench.main(["step", "--method", spec, "--clip", "tiny", "--device", "cpu", "--batch-size", "2",
                        "--num-classes", "3", "--steps", "1", "--warmup", "1"])
    assert set(rates) == {"CLIP-Adapter+TextRefiner", "CLIP-Adapter"}

# ----------------------------------------------------------------------------- a method's author's mistakes, named


@pytest.mark.parametrize("field, message", [
    ("seed", "its recipe field 'seed' is also train.py's own flag --seed; rename the field"),
    ("output_dir", "its recipe field 'output_dir' is also train.py's own flag --output-dir"),
    ("dataset", "its recipe field 'dataset' is also train.py's own flag --dataset"),
    ("resume", "its recipe field 'resume' is also train.py's own flag --resume"),
    ("workers", "its recipe field 'workers' is also train.py's own flag --workers"),
    ("method_file", "ClashRecipe.method_file is a name train.py records with each run"),
    ("teacher_sha256", "ClashRecipe.teacher_sha256 is a name train.py records with each run"),
])
def test_a_recipe_field_named_like_a_run_flag_is_refused_and_the_other_methods_still_work(
        field, message, monkeypatch, tmp_path, capsys):
    Recipe = dataclasses.make_dataclass("ClashRecipe", [(field, int, 3)], bases=(ShiftRecipe,))
    monkeypatch.setitem(textrefiner.METHODS, "clash", type("ClashCLIP", (ShiftCLIP,), dict(recipe=Recipe)))
    argv = ["--dataset", "caltech101", "--root", str(tmp_path), "--output-dir", str(tmp_path / "out")]
    assert_usage_error(train.main, ["--method", "clash", *argv], f"--method clash: {message}", capsys)
    # while it is registered, every other method's commands parse as before
    assert train.parse_args(["--method", "kgcoop", *argv]).method == "kgcoop"
    assert evaluate_cli.parse_args(["--zeroshot", "--dataset", "caltech101"]).zeroshot
    assert bench.get_parser(flags.load_method("coop")).parse_args(["step"]).command == "step"


class FrozenShiftCLIP(PlainShiftCLIP):
    def build(self, clip, classnames, recipe):
        super().build(clip, classnames, recipe)
        self.shift.requires_grad_(False)  # nothing left to train


class UnreturnedLossCLIP(PlainShiftCLIP):
    loss_keys = ("loss", "loss_kl")  # train_forward never returns loss_kl


class DetachedLossCLIP(PlainShiftCLIP):
    def train_forward(self, images, labels):
        with torch.no_grad():
            return super().train_forward(images, labels)


class TupleCLIP(PlainShiftCLIP):
    def train_forward(self, images, labels):
        out = super().train_forward(images, labels)
        return out["loss"], out["logits"]


@pytest.mark.parametrize("Method, message", [
    (FrozenShiftCLIP, "--method broken: FrozenShiftCLIP has no trainable tensor (no parameter that requires grad"),
    (UnreturnedLossCLIP, "UnreturnedLossCLIP.train_forward returned no tensor 'loss_kl' (its keys: loss, "),
    (DetachedLossCLIP, "DetachedLossCLIP.train_forward's 'loss' does not require grad"),
    (TupleCLIP, "TupleCLIP.train_forward returned a tuple; it must return a dict holding loss"),
])
def test_a_method_breaking_the_contract_is_named_before_its_first_step(Method, message, run, monkeypatch, tmp_path,
                                                                       capsys):
    """Were raw exceptions: "optimizer got an empty parameter list", KeyError, "element 0 of tensors does not
    require grad"."""
    root, weights, _ = run
    monkeypatch.setitem(textrefiner.METHODS, "broken", Method)
    assert_usage_error(train.main, ["--method", "broken", *train_argv(root, weights, str(tmp_path / "out"))], message,
                       capsys)
    assert not os.path.exists(tmp_path / "out" / "last.pt")


def test_a_method_registered_under_a_built_in_name_is_refused(run, monkeypatch, tmp_path, capsys):
    """METHODS["coop"] = MyCLIP trained MyCLIP and recorded its runs as coop."""
    root, weights, out = run
    monkeypatch.setitem(textrefiner.METHODS, "coop", ShiftCLIP)
    message = "--method coop: textrefiner.METHODS['coop'] is <class 'test_interface.ShiftCLIP'>, not the built-in " \
              "TextRefinerCLIP; register your method under a name of its own"
    assert_usage_error(train.main, train_argv(root, weights, str(tmp_path / "out")), message, capsys)
    assert_usage_error(evaluate_cli.main, ["--checkpoint", os.path.join(out, "best.pt"), "--workers", "0"], message,
                       capsys)
    assert not os.path.exists(tmp_path / "out")
