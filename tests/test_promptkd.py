"""PromptKD + TextRefiner (SPEC 11): the teacher file reader against the released layout
(write_teacher_checkpoint), its errors, and one training step plus evaluation of
PromptKDCLIP against an independent float64 implementation of SPEC 11.1/11.2 written here
from the equations, with student and teacher CLIPs of different widths and a teacher file
whose CLIP weights differ from the base CLIP's."""
import copy
import math
import os
from unittest import mock

import pytest
import torch

import clip_model as cm
import textrefiner as tr
from clip_model import CONFIGS, build_model, random_state_dict, tokenize
from test_clip import ref_encode_image, ref_encode_text
from textrefiner import PromptKDCLIP, PromptSRCTeacher, TextRefinerCLIP

CLASSNAMES = ["cat", "golden_retriever", "sports car", "tabby_cat", "airliner"]
BASE = CLASSNAMES[:3]  # a base2new teacher is trained on the first ceil(n/2) classes
STUDENT, TEACHER = CONFIGS["tiny"], CONFIGS["tiny-teacher"]  # embeddings 64 and 96
TEACHER_DEPTH, TEACHER_CTX = 3, 4
SPEC_KEYS = {"visual_prompts"} | {
    f"{module}.{layer}.{name}"
    for module in ("image_proj", "refiner.align")
    for layer, names in (("fc1", ("weight", "bias")), ("fc2", ("weight", "bias")),
                         ("bn", ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")))
    for name in names} | {"refiner.extractor.weight", "refiner.cache"}


def perturbed(state_dict, seed):
    """The base weights moved by a few percent: a teacher whose weight averaging changed CLIP."""
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.05 * v.abs().mean() * torch.randn(v.shape, generator=g) if v.dim() else v + 0.1
            for k, v in state_dict.items()}


@pytest.fixture(scope="module")
def student_sd():
    return random_state_dict(STUDENT, seed=0)


@pytest.fixture(scope="module")
def teacher_base_sd():
    return random_state_dict(TEACHER, seed=1)


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory, teacher_base_sd):
    path = tmp_path_factory.mktemp("teacher") / "model-best.pth.tar"
    tr.write_teacher_checkpoint(path, perturbed(teacher_base_sd, seed=2), BASE, depth=TEACHER_DEPTH,
                                n_ctx=TEACHER_CTX, seed=3, prompt_std=0.3)
    return str(path)


@pytest.fixture(scope="module")
def teacher(teacher_base_sd, teacher_file):
    return PromptSRCTeacher.from_checkpoint(build_model(teacher_base_sd), teacher_file, CLASSNAMES)


@pytest.fixture(scope="module")
def student(student_sd):
    return build_model(student_sd)


def make_model(student, teacher, seed=0, **kwargs):
    torch.manual_seed(seed)
    kwargs = dict(dict(depth=2, n_ctx=3), **kwargs)
    return PromptKDCLIP(student, teacher, CLASSNAMES, **kwargs)


def images(batch, seed=1):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def rel_err(actual, expected):
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


def file_state(path):
    """The teacher file's state dict, read fully (our own test file: trusted)."""
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


def teacher_weights(path, base_sd):
    """SPEC 11.1 read by hand, float64: the file's CLIP under OpenAI names, the base CLIP's
    token_embedding (the file has none), and the prompts."""
    state = {k: v.double() for k, v in file_state(path).items()}
    sd = {"token_embedding.weight": base_sd["token_embedding.weight"].double(), "logit_scale": state["logit_scale"]}
    for key, value in state.items():
        if "VPT" in key:
            continue
        if key.startswith("image_encoder."):
            sd["visual." + key[len("image_encoder."):]] = value
        elif key.startswith("text_encoder."):
            sd[key[len("text_encoder."):]] = value
    visual = torch.stack([state["image_encoder.VPT"]] + [
        state[f"image_encoder.transformer.resblocks.{i}.VPT_shallow"] for i in range(1, TEACHER_DEPTH)])
    text = torch.stack([state[f"text_encoder.transformer.resblocks.{i}.VPT_shallow"] for i in range(1, TEACHER_DEPTH)])
    return sd, state["prompt_learner.ctx"], text, visual


def ref_teacher(sd, ctx, text_prompts, visual_prompts, classnames, x):
    """t_T (n, D_T) and z_T (B, n) of SPEC 11.1 in float64."""
    ids = tokenize([f"a photo of a {name.replace('_', ' ')}." for name in classnames])
    emb = sd["token_embedding.weight"][ids].clone()
    emb[:, 1:1 + ctx.shape[0]] = ctx
    text = ref_encode_text(sd, ids, emb, text_prompts)
    t = text / text.norm(dim=-1, keepdim=True)
    v, _, _ = ref_encode_image(sd, x, visual_prompts)
    z = sd["logit_scale"].exp() * (v / v.norm(dim=-1, keepdim=True)) @ t.t()
    return t, z


# ----------------------------------------------------------------------------- teacher file

def test_teacher_file_has_the_released_layout(teacher_file, teacher_base_sd):
    state = file_state(teacher_file)
    n_visual = sum(k.startswith("visual.") for k in teacher_base_sd)
    n_text = sum(not k.startswith("visual.") and k not in ("logit_scale", "token_embedding.weight")
                 for k in teacher_base_sd)
    vpt = 1 + 2 * (TEACHER_DEPTH - 1)
    # logit_scale, ctx, token_prefix/suffix, ZS copy, image and text towers, prompts
    assert len(state) == 1 + 3 + n_visual + n_visual + n_text + vpt
    assert state["prompt_learner.ctx"].dtype == torch.float16 and state["image_encoder.VPT"].dtype == torch.float32
    assert state["image_encoder.conv1.weight"].dtype == torch.float16
    assert state["text_encoder.ln_final.weight"].dtype == torch.float32
    assert state["prompt_learner.token_prefix"].shape == (3, 1, TEACHER.transformer_width)
    assert state["prompt_learner.token_suffix"].shape == (3, 77 - 1 - TEACHER_CTX, TEACHER.transformer_width)
    assert not any("token_embedding" in k for k in state)
    content = cm.read_dassl_file(teacher_file)  # tensors only: the pickled scheduler is not built
    assert isinstance(content["scheduler"]["successor"], cm._NotLoaded)
    assert content["scheduler"]["successor"].origin == "torch.optim.lr_scheduler.CosineAnnealingLR"
    assert torch.equal(content["state_dict"]["image_encoder.VPT"], state["image_encoder.VPT"])


def test_teacher_uses_the_files_weights_and_prompts(teacher, teacher_file, teacher_base_sd):
    """t_T and z_T equal SPEC 11.1 in float64 on the FILE's CLIP weights (not the base CLIP's)."""
    assert teacher.depth == (TEACHER_DEPTH, TEACHER_DEPTH) and teacher.path == teacher_file
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.train().training
    x = images(3)
    sd, ctx, text, visual = teacher_weights(teacher_file, teacher_base_sd)
    ref_t, ref_z = ref_teacher(sd, ctx, text, visual, CLASSNAMES, x)
    assert rel_err(teacher.class_features(), ref_t) < 1e-5
    assert rel_err(teacher(x), ref_z) < 1e-5
    base = {k: v.double() for k, v in teacher_base_sd.items()}
    base_t, base_z = ref_teacher(base, ctx, text, visual, CLASSNAMES, x)
    assert rel_err(teacher.class_features(), base_t) > 1e-3 and rel_err(teacher(x), base_z) > 1e-3
    _, plain_z = ref_teacher(sd, ctx, text[:0], visual[:1], CLASSNAMES, x)
    assert rel_err(teacher(x), plain_z) > 1e-3  # the deep prompts matter


def test_teacher_class_features_once_per_class_set(teacher, monkeypatch):
    teacher = copy.deepcopy(teacher)
    teacher.set_classnames(CLASSNAMES)  # the copy's memo holds the fixture's features
    calls = []
    encode = teacher.clip.encode_prompts
    monkeypatch.setattr(teacher.clip, "encode_prompts", lambda *a, **k: calls.append(1) or encode(*a, **k))
    first = teacher.class_features()
    teacher(images(2))
    teacher(images(2, seed=3))
    assert len(calls) == 1
    teacher.set_classnames(["airliner", "cat"])
    # rebuilt prefix/suffix, the same rows (up to the shorter prompts' truncation)
    torch.testing.assert_close(teacher.class_features(), first[[4, 0]], rtol=1e-5, atol=1e-6)
    assert len(calls) == 2


def test_zero_shot_copy_in_the_file_is_ignored(tmp_path, teacher_base_sd, teacher_file, teacher):
    path = tmp_path / "zs.pth.tar"
    tr.write_teacher_checkpoint(path, perturbed(teacher_base_sd, seed=2), BASE, depth=TEACHER_DEPTH,
                                n_ctx=TEACHER_CTX, seed=3, prompt_std=0.3,
                                zero_shot_state_dict=random_state_dict(TEACHER, seed=9))
    other = PromptSRCTeacher.from_checkpoint(build_model(teacher_base_sd), path, CLASSNAMES)
    x = images(2)
    assert torch.equal(other(x), teacher(x))


def rewrite(src, dst, edit):
    content = torch.load(src, map_location="cpu", weights_only=False)
    edit(content["state_dict"])
    torch.save(content, dst)
    return str(dst)


def test_teacher_file_errors(tmp_path, teacher_base_sd, teacher_file):
    clip = build_model(teacher_base_sd)

    def load(path, names=CLASSNAMES, **kwargs):
        return PromptSRCTeacher.from_checkpoint(clip, path, names, **kwargs)

    with pytest.raises(ValueError, match=r"model-best.pth.tar: trained on 3 classes .*expected 4 or 7 .*7 classes"):
        load(teacher_file, CLASSNAMES + ["a", "b"])
    with pytest.raises(ValueError, match=r"trained on 3 classes .*expected 1000"):
        load(teacher_file, num_trained_classes=1000)
    assert load(teacher_file, BASE).depth == (TEACHER_DEPTH, TEACHER_DEPTH)  # n itself is fine too

    def drop(key):
        return lambda sd: sd.pop(key)

    cases = {
        "no_ctx": (drop("prompt_learner.ctx"), r"no_ctx.pth.tar: no prompt_learner.ctx"),
        "no_vpt": (drop("image_encoder.VPT"), r"no image_encoder.VPT"),
        "gap": (drop("text_encoder.transformer.resblocks.1.VPT_shallow"),
                r"gap.pth.tar: text_encoder.transformer.resblocks.1.VPT_shallow is missing, yet block 2 has one"),
        "shape": (lambda sd: sd.__setitem__("image_encoder.transformer.resblocks.2.VPT_shallow", torch.zeros(5, 192)),
                  r"image_encoder.transformer.resblocks.2.VPT_shallow has shape \(5, 192\), expected \(4, 192\)"),
        "width": (lambda sd: sd.__setitem__("prompt_learner.ctx", torch.zeros(4, 128)),
                  r"prompt_learner.ctx has shape \(4, 128\), expected \(4, 192\)"),
        "deep": (lambda sd: sd.__setitem__("text_encoder.transformer.resblocks.3.VPT_shallow", torch.zeros(4, 192)),
                 r"text_encoder has VPT_shallow up to block 3, but the CLIP given has 3 blocks"),
        "prefix": (drop("prompt_learner.token_prefix"), r"no prompt_learner.token_prefix"),
        "unknown": (lambda sd: sd.__setitem__("VPT_image_trans.conv1.0.weight", torch.zeros(1)),
                    r"unexpected keys \['VPT_image_trans.conv1.0.weight'\]"),
    }
    for name, (edit, message) in cases.items():
        with pytest.raises(ValueError, match=message):
            load(rewrite(teacher_file, tmp_path / f"{name}.pth.tar", edit))
    with pytest.raises(ValueError, match=r"model-best.pth.tar: \S+ \(\d+, 192\) does not fit the CLIP given "
                                         r"\(CLIP has \(\d+, 128\)\); pass the CLIP the teacher was trained from"):
        PromptSRCTeacher.from_checkpoint(build_model(random_state_dict(STUDENT)), teacher_file, CLASSNAMES)
    with pytest.raises(FileNotFoundError, match="nope.pth.tar"):
        load(tmp_path / "nope.pth.tar")
    (tmp_path / "text.pth.tar").write_text("hello")
    with pytest.raises(ValueError, match="text.pth.tar: unreadable"):
        load(tmp_path / "text.pth.tar")
    torch.save({"model": {}}, tmp_path / "other.pth.tar")
    with pytest.raises(ValueError, match="other.pth.tar: not a Dassl checkpoint"):
        load(tmp_path / "other.pth.tar")
