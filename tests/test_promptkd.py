"""PromptKD + TextRefiner: the teacher file reader against the released layout
(write_teacher_checkpoint), its errors, and one training step plus evaluation of
PromptKDCLIP against an independent float64 implementation of its equations (textrefiner.PromptKDCLIP) written here
from the equations, with student and teacher CLIPs of different widths and a teacher file
whose CLIP weights differ from the base CLIP's."""
import copy

import pytest
import torch

import released
from clip_model import CONFIGS, build_model, random_state_dict, tokenize
from hosts import PromptKDCLIP, PromptKDRecipe, PromptSRCTeacher
from textrefiner import TextRefinerCLIP
from helpers import (ref_encode_image, ref_encode_text, ref_projection, rel_err, save_half_batch_step, spec_cache_update,
                     spec_semantic_tokens)

CLASSNAMES = ["cat", "golden_retriever", "sports car", "tabby_cat", "airliner"]
BASE = CLASSNAMES[:3]  # a base2new teacher is trained on the first ceil(n/2) classes
STUDENT, TEACHER = CONFIGS["tiny"], CONFIGS["tiny-teacher"]  # embeddings 64 and 96
TEACHER_DEPTH, TEACHER_CTX = 3, 4
STATE_KEYS = {"visual_prompts"} | {
    f"{module}.{layer}.{name}"
    for module in ("image_proj", "refiner.align")
    for layer, names in (("fc1", ("weight", "bias")), ("fc2", ("weight", "bias")),
                         ("bn", ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")))
    for name in names} | {"refiner.extractor.weight", "refiner.cache"}


def perturbed(state_dict, seed):
    """The base weights moved by a few percent: a teacher whose weight averaging changed CLIP.
    Not token_embedding: the file holds none (PromptSRC never trains or saves it), and its class
    prompt buffers were built from the base CLIP's."""
    g = torch.Generator().manual_seed(seed)
    return {k: v if k == "token_embedding.weight" else
            v + 0.05 * v.abs().mean() * torch.randn(v.shape, generator=g) if v.dim() else v + 0.1
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
    released.write_teacher_checkpoint(path, perturbed(teacher_base_sd, seed=2), BASE, depth=TEACHER_DEPTH,
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
    kwargs = dict(dict(depth=2, n_ctx_vision=3), **kwargs)
    return PromptKDCLIP(student, CLASSNAMES, PromptKDRecipe(**kwargs), teacher=teacher)


def images(batch, seed=1):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def depth(teacher):
    """(text depth, vision depth) of a teacher: 1 + the blocks with deep prompts."""
    return 1 + teacher.text_prompts.shape[0], teacher.visual_prompts.shape[0]


def file_state(path):
    """The teacher file's state dict, read fully (our own test file: trusted)."""
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


def teacher_weights(path, base_sd):
    """The teacher file read by hand, float64: the file's CLIP under OpenAI names, the base CLIP's
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
    """The teacher's t_T (n, D_T) and z_T (B, n) in float64."""
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
    # PromptSRC stores the token_embedding of its "a photo of a {name}." ("_" -> " "),
    # position 0 (SOT) and positions 5.. ("{name}.", EOT, padding), fp16
    rows = teacher_base_sd["token_embedding.weight"][tokenize([f"a photo of a {name.replace('_', ' ')}."
                                                               for name in BASE])]  # (3, 77, W)
    assert torch.equal(state["prompt_learner.token_prefix"], rows[:, :1].half())
    assert torch.equal(state["prompt_learner.token_suffix"], rows[:, 5:].half())
    assert not any("token_embedding" in k for k in state)
    content = released.read_dassl_file(teacher_file)  # tensors only: the pickled scheduler is not built
    assert isinstance(content["scheduler"]["successor"], released._NotLoaded)
    assert content["scheduler"]["successor"].origin == "torch.optim.lr_scheduler.CosineAnnealingLR"
    assert torch.equal(content["state_dict"]["image_encoder.VPT"], state["image_encoder.VPT"])


def test_teacher_uses_the_files_weights_and_prompts(teacher, teacher_file, teacher_base_sd):
    """t_T and z_T equal the equations in float64 on the FILE's CLIP weights (not the base CLIP's)."""
    assert depth(teacher) == (TEACHER_DEPTH, TEACHER_DEPTH)
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


def test_teacher_and_student_class_features_follow_a_move(teacher, student, monkeypatch):
    """The memos see the teacher's tensors move: model.to(device) after a first evaluation
    must not serve class features of the old device. Moved here in dtype (no second device
    on a CPU machine); a device move replaces the same tensors."""
    for refiner in (True, False):
        model = make_model(copy.deepcopy(student), copy.deepcopy(teacher), refiner=refiner).eval()
        calls = []
        encode = model.teacher.clip.encode_prompts
        monkeypatch.setattr(model.teacher.clip, "encode_prompts", lambda *a, **k: calls.append(1) or encode(*a, **k))
        features = torch.randn(2, 96)
        first = model.logits(features)
        model.logits(features)
        assert len(calls) == 1
        model.teacher.double()
        torch.testing.assert_close(model.logits(features), first, rtol=1e-5, atol=1e-5)
        assert len(calls) == 2


def test_zero_shot_copy_in_the_file_is_ignored(tmp_path, teacher_base_sd, teacher_file, teacher):
    path = tmp_path / "zs.pth.tar"
    released.write_teacher_checkpoint(path, perturbed(teacher_base_sd, seed=2), BASE, depth=TEACHER_DEPTH,
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
    assert depth(load(teacher_file, BASE)) == (TEACHER_DEPTH, TEACHER_DEPTH)  # n itself is fine too

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
    with pytest.raises(released.TeacherCLIPMismatch, match=r"^is not the CLIP teacher file \S+model-best.pth.tar was "
                                                           r"trained from: the file's \S+ is \(\d+, 192\), it has "
                                                           r"\(\d+, 128\); pass that CLIP"):
        PromptSRCTeacher.from_checkpoint(build_model(random_state_dict(STUDENT)), teacher_file, CLASSNAMES)
    other = build_model(random_state_dict(TEACHER, seed=11))  # the teacher's shapes, another token embedding
    for trained_on in (dict(trained_classnames=BASE), dict(num_trained_classes=3)):
        with pytest.raises(released.TeacherCLIPMismatch, match="its start-of-text token embedding differs"):
            PromptSRCTeacher.from_checkpoint(other, teacher_file, CLASSNAMES, **trained_on)
    with pytest.raises(FileNotFoundError, match="nope.pth.tar"):
        load(tmp_path / "nope.pth.tar")
    (tmp_path / "text.pth.tar").write_text("hello")
    with pytest.raises(ValueError, match="text.pth.tar: unreadable"):
        load(tmp_path / "text.pth.tar")
    torch.save({"model": {}}, tmp_path / "other.pth.tar")
    with pytest.raises(ValueError, match="other.pth.tar: not a Dassl checkpoint"):
        load(tmp_path / "other.pth.tar")


def test_teacher_of_other_classes_with_the_same_count_is_refused(tmp_path, teacher_base_sd, teacher_file):
    """The file's token_suffix rows are the prompts of the classes the teacher learnt: a teacher of
    another dataset (or class order) with as many classes is refused, naming the first wrong row."""
    clip = build_model(teacher_base_sd)

    def load(path=teacher_file, names=CLASSNAMES, **kwargs):
        return PromptSRCTeacher.from_checkpoint(clip, path, names, **kwargs)

    textures = ["banded", "blotchy", "braided", "bubbly", "bumpy"]  # another dataset, 5 classes too
    refused = {
        r"trained on other classes: 3 of its 3 class prompts \(prompt_learner.token_suffix rows\) differ from ours, "
        r"the first at row 0 \(our 'banded'\); another dataset's teacher, or another class order\? "
        r"Pass the dataset's own teacher": textures,
        r"2 of its 3 class prompts .* row 0 \(our 'golden_retriever'\)": ["golden_retriever", "cat"] + CLASSNAMES[2:],
        r"1 of its 3 class prompts .* row 2 \(our 'race car'\)": BASE[:2] + ["race car"] + CLASSNAMES[3:],
    }
    for message, names in refused.items():
        with pytest.raises(ValueError, match=r"^teacher file \S+model-best.pth.tar: .*" + message):
            load(names=names)
    with pytest.raises(ValueError, match=r"3 of its 3 class prompts .* row 0 \(our 'banded'\)"):
        load(trained_classnames=textures[:3])  # the trained classes named explicitly
    assert depth(load(trained_classnames=BASE)) == (TEACHER_DEPTH, TEACHER_DEPTH)
    load(names=["cat", "golden retriever", "sports_car", "x", "y"])  # "_" and " " are one name
    load(names=textures, num_trained_classes=3)  # a count alone (cross-dataset): names unknown
    with pytest.raises(ValueError, match="pass num_trained_classes or trained_classnames, not both"):
        load(num_trained_classes=3, trained_classnames=BASE)

    suffix = file_state(teacher_file)["prompt_learner.token_suffix"]  # (3, 72, W) fp16
    # PromptSRC's Gaussian weight averaging: the fp16 sum of per-epoch copies weighted w_i (sum 1)
    weights = torch.tensor([-1.0, 0.0, 1.0]).pow(2).mul(-0.5).exp()  # Gaussian at -1, 0, 1
    weights = (weights / weights.sum()).tolist()
    averaged = suffix * weights[0] + suffix * weights[1] + suffix * weights[2]  # fp16 throughout
    assert averaged.dtype == torch.float16 and not torch.equal(averaged, suffix)  # rounding happened
    load(rewrite(teacher_file, tmp_path / "averaged.pth.tar",
                 lambda sd: sd.__setitem__("prompt_learner.token_suffix", averaged)))
    off = suffix.clone()
    off[1, 3] *= 1.03  # one token of one class 3% off: beyond any fp16 rounding
    with pytest.raises(ValueError, match=r"off.pth.tar: trained on other classes: 1 of its 3 .* row 1 \(our "
                                         r"'golden_retriever'\)"):
        load(rewrite(teacher_file, tmp_path / "off.pth.tar",
                     lambda sd: sd.__setitem__("prompt_learner.token_suffix", off)))
    with pytest.raises(ValueError, match=r"short.pth.tar: prompt_learner.token_suffix has shape \(3, 71, 192\), "
                                         r"expected \(3, 72, 192\)"):
        load(rewrite(teacher_file, tmp_path / "short.pth.tar",
                     lambda sd: sd.__setitem__("prompt_learner.token_suffix", suffix[:, 1:])))
    # no token_suffix: only the class count can be checked
    load(rewrite(teacher_file, tmp_path / "no_suffix.pth.tar", lambda sd: sd.pop("prompt_learner.token_suffix")),
         names=textures)


# ------------------------------------------------------ float64 reference of PromptKD + TextRefiner

def kl_per_element(student_logits, teacher_probs, temperature):
    log_q = student_logits / temperature
    log_q = log_q - torch.logsumexp(log_q, 1, keepdim=True)
    return temperature**2 * (teacher_probs * (teacher_probs.log() - log_q)).sum() / student_logits.numel()


def reference_step(model, student_sd, teacher_sd, teacher_prompts, x, x_eval, kd_weight, temperature):
    """One PromptKD + TextRefiner training step and the following evaluation, float64, from
    the equations and copies of the model's raw trainable tensors."""
    raw = {k: v.detach().double().clone() for k, v in model.trainable_state_dict().items()}
    names = ["visual_prompts"] + [f"{m}.{l}.{w}" for m in ("image_proj", "refiner.align")
                                  for l in ("fc1", "bn", "fc2") for w in ("weight", "bias")] + \
        ["refiner.extractor.weight"]
    p = {k: raw[k].requires_grad_() for k in names}
    cache, alpha, topk = raw["refiner.cache"], 0.2, 5
    student = {k: v.double() for k, v in student_sd.items()}
    ls = student["logit_scale"].exp()

    t, z_teacher = ref_teacher(teacher_sd, *teacher_prompts, CLASSNAMES, x)
    p_teacher = torch.softmax(z_teacher / temperature, 1)

    def refine(cache):
        s = t @ cache.t()
        a = torch.exp(s - s.max(1, keepdim=True).values)
        return t + alpha * torch.cat([t, (a / a.sum(1, keepdim=True)) @ cache], 1) @ p["refiner.extractor.weight"].t()

    c, tokens, cls_attn = ref_encode_image(student, x, p["visual_prompts"])
    b, n_tok, _ = tokens.shape
    g, proj_mean, proj_var = ref_projection(c, p, "image_proj")
    g = g / g.norm(dim=-1, keepdim=True)
    refined = refine(cache)
    logits = ls * g @ refined.t()
    aligned, align_mean, align_var = ref_projection(tokens.reshape(b * n_tok, -1), p, "refiner.align")
    aligned = aligned.reshape(b, n_tok, -1)
    local = spec_semantic_tokens(aligned, cls_attn, topk)  # (B, 7, D_T)
    local_logits = ls * local.reshape(b * 7, -1) @ t.t()
    loss_kd = kl_per_element(logits, p_teacher, temperature)
    loss_local = kl_per_element(local_logits, p_teacher[torch.arange(b).repeat_interleave(7)], temperature)
    loss_reg = (refined / refined.norm(dim=-1, keepdim=True) - t).abs().mean()
    loss = kd_weight * loss_kd + kd_weight / 100 * loss_local + kd_weight / 50 * loss_reg
    grads = dict(zip(names, torch.autograd.grad(loss, list(p.values()))))

    new_cache = spec_cache_update(cache, aligned)  # the cache rule, on all B*T aligned tokens

    running = {}
    for prefix, mean, var, rows in (("image_proj", proj_mean, proj_var, b),
                                    ("refiner.align", align_mean, align_var, b * n_tok)):
        running[prefix] = (0.9 * raw[prefix + ".bn.running_mean"] + 0.1 * mean.detach(),
                           0.9 * raw[prefix + ".bn.running_var"] + 0.1 * var.detach() * rows / (rows - 1))

    with torch.no_grad():  # eval: BN running statistics, the updated cache, no alignment
        c_eval, _, _ = ref_encode_image(student, x_eval, p["visual_prompts"])
        g_eval, _, _ = ref_projection(c_eval, p, "image_proj", running=running["image_proj"])
        eval_logits = ls * (g_eval / g_eval.norm(dim=-1, keepdim=True)) @ refine(new_cache).t()
    return dict(loss=loss, loss_kd=loss_kd, loss_local=loss_local, loss_reg=loss_reg, logits=logits,
                grads=grads, cache=new_cache, running=running, eval_logits=eval_logits)


def perturb_trainables(model, seed):
    """Off their init values, so every BatchNorm term and the visual prompts' effect are exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.visual_prompts.normal_(0, 0.3, generator=g)
        for bn in (model.image_proj.bn, model.refiner.align.bn):
            bn.weight.uniform_(0.5, 1.5, generator=g)
            bn.bias.uniform_(-0.2, 0.2, generator=g)
            bn.running_mean.uniform_(-0.1, 0.1, generator=g)
            bn.running_var.uniform_(0.5, 1.5, generator=g)


def grad_errors(model, ref):
    """Relative error of every gradient; the first Linears' biases have an exactly-zero
    gradient (BatchNorm subtracts them again): measured against their weight gradient's scale."""
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    assert grads.keys() == ref["grads"].keys()
    errors = {}
    for name, expected in ref["grads"].items():
        if name.endswith("fc1.bias"):
            assert expected.abs().max() < 1e-10, name
            scale = ref["grads"][name.replace("bias", "weight")].abs().max()
            errors[name] = ((grads[name].double() - expected).abs().max() / scale).item()
        else:
            assert expected.abs().max() > 0, name
            errors[name] = rel_err(grads[name], expected)
    return errors


def test_training_step_and_eval_match_float64_reference(student, student_sd, teacher, teacher_file, teacher_base_sd):
    kd_weight, temperature = 200.0, 1.5
    model = make_model(student, teacher, seed=4, kd_weight=kd_weight, temperature=temperature).train()
    perturb_trainables(model, seed=5)
    x, x_eval = images(4, seed=11), images(3, seed=12)
    sd, ctx, text, visual = teacher_weights(teacher_file, teacher_base_sd)
    ref = reference_step(model, student_sd, sd, (ctx, text, visual), x, x_eval, kd_weight, temperature)

    out = model(x, labels=torch.tensor([0, 1, 2, 3]))  # labels are ignored
    out["loss"].backward()
    errors = {name: rel_err(out[name], ref[name]) for name in ("loss", "loss_kd", "loss_local", "loss_reg", "logits")}
    errors.update(grad_errors(model, ref))
    errors["cache"] = rel_err(model.refiner.cache, ref["cache"])
    for prefix, bn in (("image_proj", model.image_proj.bn), ("refiner.align", model.refiner.align.bn)):
        errors[prefix + ".running_mean"] = rel_err(bn.running_mean, ref["running"][prefix][0])
        errors[prefix + ".running_var"] = rel_err(bn.running_var, ref["running"][prefix][1])
        assert bn.num_batches_tracked.item() == 1
    errors["eval_logits"] = rel_err(model.eval()(x_eval), ref["eval_logits"])
    print("\nmax relative errors vs float64:", {k: f"{v:.1e}" for k, v in errors.items()})
    bad = {k: v for k, v in errors.items() if not v < 1e-4}
    assert not bad, bad
    for name in ("loss_kd", "loss_local", "loss_reg"):  # every term is exercised
        assert ref[name] > 1e-4, name


# ------------------------------------------------------------------------- model behaviour

def test_gradient_routing_of_each_loss_term(student, teacher):
    """Gradient routing: L_kd reaches P, image_proj and the extractor; L_local P and align; L_reg
    the extractor only. Nothing else trains."""
    model = make_model(student, teacher).train()
    out = model(images(4))
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    groups = {"visual_prompts": ["visual_prompts"],
              "image_proj": [n for n in params if n.startswith("image_proj.")],
              "align": [n for n in params if n.startswith("refiner.align.")],
              "extractor": ["refiner.extractor.weight"]}
    assert sorted(sum(groups.values(), [])) == sorted(params)
    reaches = {"loss_kd": {"visual_prompts", "image_proj", "extractor"},
               "loss_local": {"visual_prompts", "align"}, "loss_reg": {"extractor"}}
    for term, expected in reaches.items():
        grads = torch.autograd.grad(out[term], list(params.values()), allow_unused=True, retain_graph=True)
        by_name = dict(zip(params, grads))
        reached = {group for group, names in groups.items()
                   if any(by_name[n] is not None and by_name[n].abs().sum() > 0 for n in names)}
        assert reached == expected, term
    assert not model.refiner.cache.requires_grad and not student.training


def test_refiner_false_is_plain_promptkd(student, teacher):
    model = make_model(student, teacher, refiner=False, kd_weight=1000.0).train()
    assert model.trainable_state_dict().keys() == {k for k in STATE_KEYS if not k.startswith("refiner.")}
    x = images(4)
    out = model(x)
    with torch.no_grad():
        glob = student.encode_image(x, prompts=model.visual_prompts)
        proj = model.image_proj
        h = proj.fc1(glob)
        h = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + 1e-5) * proj.bn.weight + proj.bn.bias
        g = torch.nn.functional.normalize(proj.fc2(torch.relu(h)), dim=-1)
        logits = student.logit_scale.exp() * g @ teacher.class_features().t()
        p_t = torch.softmax(teacher(x), dim=-1)
        kd = (p_t * (p_t.log() - torch.log_softmax(logits, dim=-1))).sum() / p_t.numel()
    torch.testing.assert_close(out["logits"], logits)
    torch.testing.assert_close(out["loss_kd"], kd)
    torch.testing.assert_close(out["loss"], 1000.0 * kd)
    assert out["loss_local"].item() == 0 and out["loss_reg"].item() == 0
    out["loss"].backward()
    assert model.visual_prompts.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        g = torch.nn.functional.normalize(proj(student.encode_image(x, prompts=model.visual_prompts)), dim=-1)
    torch.testing.assert_close(model(x), student.logit_scale.exp() * g @ teacher.class_features().t())


def test_eval_class_features_are_reused_and_invalidated(student, teacher, monkeypatch):
    model = make_model(student, copy.deepcopy(teacher)).eval()
    calls = []
    refine = model.refiner.refine
    monkeypatch.setattr(model.refiner, "refine", lambda t: calls.append(1) or refine(t))
    x = images(3)
    first = model(x)
    model(images(2, seed=7))
    assert len(calls) == 1  # once per evaluation, not per batch
    with torch.no_grad():
        model.refiner.cache.copy_(torch.nn.functional.normalize(model.refiner.cache + torch.rand(25, 96), dim=-1))
    second = model(x)
    assert len(calls) == 2 and not torch.allclose(first, second)
    with torch.no_grad():
        model.refiner.extractor.weight.mul_(-2)  # in place, as an optimizer step
    assert not torch.allclose(model(x), second) and len(calls) == 3
    model.set_classnames(["airliner", "cat"])
    logits = model(x)
    assert logits.shape == (3, 2) and len(calls) == 4
    model.set_classnames(CLASSNAMES)
    torch.testing.assert_close(logits, model(x)[:, [4, 0]], rtol=1e-5, atol=1e-5)
    assert PromptKDCLIP.frozen_image_features is False  # trained prompts: features never reusable


def test_eval_leaves_state_untouched_and_training_moves_it(student, teacher):
    model = make_model(student, teacher).eval()
    before = {k: v.clone() for k, v in model.trainable_state_dict().items()}
    model(images(2))
    assert all(torch.equal(v, before[k]) for k, v in model.trainable_state_dict().items())
    model.train()(images(2))
    after = model.trainable_state_dict()
    for name in ("refiner.cache", "image_proj.bn.running_mean", "refiner.align.bn.running_var"):
        assert not torch.equal(after[name], before[name]), name
    assert not model.teacher.training and not model.clip.training


def test_state_dict_round_trip_and_method_mixups(student, teacher):
    model = make_model(student, teacher).train()
    model(images(2))
    state = model.trainable_state_dict()
    assert state.keys() == STATE_KEYS
    assert state["visual_prompts"].shape == (2, 3, STUDENT.vision_width)
    assert state["image_proj.fc1.weight"].shape == (96, 64) and state["refiner.align.fc1.weight"].shape == (96, 64)
    assert state["refiner.cache"].shape == (25, 96) and state["refiner.extractor.weight"].shape == (96, 192)
    other = make_model(student, teacher, seed=8).eval()
    model.eval()
    x = images(3)
    assert not torch.allclose(other(x), model(x))
    other.load_trainable_state_dict(copy.deepcopy(state))
    torch.testing.assert_close(other(x), model(x))

    coop = TextRefinerCLIP(student, CLASSNAMES)
    with pytest.raises(ValueError, match=r"PromptKDCLIP.load_trainable_state_dict: not a PromptKDCLIP checkpoint: "
                                         r"its prompt_learner.ctx, .* are not the model's \(image_proj.*another method"):
        other.load_trainable_state_dict(coop.trainable_state_dict())
    with pytest.raises(ValueError, match=r"TextRefinerCLIP.load_trainable_state_dict: not a TextRefinerCLIP checkpoint: "
                                         r"its image_proj.*another method"):
        coop.load_trainable_state_dict(state)
    with pytest.raises(ValueError, match=r"missing keys \['refiner.cache'\]"):
        other.load_trainable_state_dict({k: v for k, v in state.items() if k != "refiner.cache"})
    shallow = make_model(student, teacher, depth=1)
    with pytest.raises(ValueError, match=r"visual_prompts: checkpoint \(2, 3, 128\), model \(1, 3, 128\)"):
        shallow.load_trainable_state_dict(state)


def test_losses_stay_fp32_under_bf16_autocast(student, teacher):
    x = images(2)
    reference = make_model(student, teacher).train()(x)
    model = make_model(student, copy.deepcopy(teacher)).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    for name, value in out.items():
        assert value.dtype == torch.float32, name
        torch.testing.assert_close(value, reference[name], rtol=0.1, atol=0.1 * reference[name].abs().max().item())
    state = model.trainable_state_dict()
    assert all(v.dtype == torch.float32 for k, v in state.items() if not k.endswith("num_batches_tracked"))
    model.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(x).dtype == torch.float32


# ------------------------------------------------------------------------------ two ranks

def _two_rank_step(rank, init_file, out_dir, teacher_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    teacher = PromptSRCTeacher.from_checkpoint(build_model(random_state_dict(TEACHER, seed=1)), teacher_path,
                                               CLASSNAMES)
    model = make_model(build_model(random_state_dict(STUDENT, seed=0)), teacher, seed=3).train()
    model.set_process_group(dist.group.WORLD)
    save_half_batch_step(model, rank, out_dir, images(4, seed=11))
    dist.destroy_process_group()


def test_two_ranks_match_one_process_on_the_global_batch(student, teacher, teacher_file, tmp_path):
    """Both BatchNorms' statistics over the global batch, the cache combined over the ranks,
    averaged gradients: one process on the concatenated batch."""
    torch.multiprocessing.spawn(_two_rank_step, args=(str(tmp_path / "init"), str(tmp_path), teacher_file), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    model = make_model(student, teacher, seed=3).train()
    out = model(images(4, seed=11))
    out["loss"].backward()
    torch.testing.assert_close((ranks[0]["loss"] + ranks[1]["loss"]) / 2, out["loss"].detach())
    for name, p in model.named_parameters():
        if p.requires_grad:
            scale = p.grad.abs().max() if not name.endswith("fc1.bias") else \
                dict(model.named_parameters())[name.replace("bias", "weight")].grad.abs().max()
            assert (ranks[0]["grads"][name] - p.grad).abs().max() <= 1e-4 * scale, name
    for name, value in model.trainable_state_dict().items():  # cache and both BN statistics
        assert torch.equal(ranks[0]["state"][name], ranks[1]["state"][name]), name
        torch.testing.assert_close(ranks[0]["state"][name], value, rtol=1e-5, atol=1e-6,
                                   msg=lambda message: f"{name}: {message}")
