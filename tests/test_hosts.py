"""The prompt-learning family of textrefiner.py (CoCoOp, KgCoOp, IVLP, MaPLe, PromptSRC). Without
TextRefiner, one training step and the eval logits equal what the official code computes
(tests/reference/: fp32, 1e-4 relative); with TextRefiner, a float64 reference of host and refiner
written here from the equations. Trainable counts at ViT-B/16 shapes, the recipes, and runs through
train.py / eval.py / bench.py on the synthetic dataset: bitwise resume, two ranks = one process."""
import functools
import importlib.util
import os
import re

import pytest
import torch

import bench as benchmarks
import clip_model
import eval as evaluate_cli
import results
import tables
import textrefiner
import flags
import train
from clip_model import CONFIGS, build_model, random_state_dict, tokenize
from helpers import (Interrupted, assert_same_tensors, assert_usage_error, interrupt_at_epoch, read_log, read_results,
                     ref_encode_image, ref_encode_text, ref_projection, rel_err, spec_cache_update,
                     spec_semantic_tokens, synthetic, torchrun_two_ranks, train_argv, write_result)

FAMILY = ("cocoop", "kgcoop", "ivlp", "maple", "promptsrc")
DEEP = ("ivlp", "maple", "promptsrc")  # prompts in both towers: a --depth
REFERENCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference")
TERMS = dict(ce="loss_global", kg="loss_kg", text_l1="loss_text", image_l1="loss_image", kl="loss_kl")  # theirs: ours
# The official trainable tensors in ours: (name pattern, our parameter, None or the row: offset + the name's number)
OFFICIAL_NAMES = [
    (r"prompt_learner\.ctx", "prompt_learner.ctx", None),
    (r"prompt_learner\.meta_net\.(.+)", r"meta_net.\1", None),
    (r"image_encoder\.VPT", "visual_prompts", 0),
    (r"image_encoder\.transformer\.resblocks\.(\d+)\.VPT_shallow", "visual_prompts", 0),
    (r"text_encoder\.transformer\.resblocks\.(\d+)\.VPT_shallow", "text_prompts", -1),
    (r"prompt_learner\.proj\.(.+)", r"proj.\1", None),
    (r"prompt_learner\.compound_prompts_text\.(\d+)", "text_prompts", 0),
    (r"prompt_learner\.compound_prompt_projections\.(\d+)\.(.+)", r"projections.\1.\2", None),
]
REFINER_PARAMETERS = 1_050_624  # TextRefiner's trainable values at D = 512
VIT_B16_COUNTS = dict(cocoop=35_360, kgcoop=2_048, ivlp=46_080, maple=3_555_072, promptsrc=46_080)


@functools.cache
def reference(method):
    return torch.load(os.path.join(REFERENCE, f"{method}.pt"), weights_only=True)


def recipe_for(method, *argv, dataset="oxford_pets", classnames=("cat", "dog")):
    """`method`'s recipe as train.py resolves its flags, for a base-class run on `dataset`."""
    Method = flags.load_method(method)
    p = train.get_parser(method)
    args = p.parse_args(["--method", method, "--dataset", dataset, *argv])
    return flags.fill_recipe(p, args, Method, require=False).for_run(dataset, "base", list(classnames))


def ours(model, official):
    """(our parameter, the row of it or None) that an official trainable tensor is."""
    params = dict(model.named_parameters())
    for pattern, name, offset in OFFICIAL_NAMES:
        m = re.fullmatch(pattern, official)
        if m:
            return params[m.expand(name)], None if offset is None else offset + (int(m[1]) if m.groups() else 0)
    raise KeyError(official)


def row(tensor, index):
    return tensor if index is None else tensor[index]

# ----------------------------------------------------------------------------- the official code, without TextRefiner


@pytest.fixture(scope="module")
def official_clip():
    """The reference files' random CLIP (widths 768 / 512, 3 blocks, 64 px; logit scale ln(1/0.07))."""
    ref = reference("cocoop")
    assert all((reference(m)["clip_config"], reference(m)["clip_seed"]) == (ref["clip_config"], ref["clip_seed"])
               for m in FAMILY)
    state_dict = random_state_dict(clip_model.CLIPConfig(**ref["clip_config"]), seed=ref["clip_seed"])
    spec = importlib.util.spec_from_file_location("generate", os.path.join(REFERENCE, "generate.py"))
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    assert generate.state_dict_sha256(state_dict) == ref["clip_sha256"], "random_state_dict changed: regenerate"
    return build_model(state_dict)


def official_model(method, clip, *extra):
    """Our `method` without TextRefiner as the reference run built it (its recipe, prompt depth and dataset),
    holding the official initial tensors."""
    ref = reference(method)
    depth = [str(v) for k, v in ref["hparams"].items() if k.startswith("PROMPT_DEPTH")][:1]
    recipe = recipe_for(method, "--no-refiner", *(["--depth", *depth] if depth else []), *extra,
                        dataset=ref["dataset"], classnames=ref["classnames"])
    model = textrefiner.METHODS[method](clip, ref["classnames"], recipe)
    trainable, copied = {id(p) for p in model.parameters() if p.requires_grad}, set()
    with torch.no_grad():
        for name, value in ref["init"].items():
            param, index = ours(model, name)
            row(param, index).copy_(value)
            copied.add(id(param))
    assert copied == trainable
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == ref["trainable_count"]
    return model


@pytest.mark.parametrize("method", FAMILY)
def test_no_refiner_step_and_eval_equal_the_official_code(official_clip, method):
    ref = reference(method)
    model = official_model(method, official_clip).train()
    out = model(ref["images"], ref["labels"])
    out["loss"].backward()
    assert out["loss_local"] == 0 and out["loss_reg"] == 0
    errors = {"logits": rel_err(out["logits"], ref["logits"])}
    for term, value in ref["losses"].items():  # total and each term
        errors[term] = rel_err(out[TERMS.get(term, "loss")], torch.tensor(value))
    for name, grad in ref["grads"].items():
        param, index = ours(model, name)
        errors[name] = rel_err(row(param.grad, index), grad)
    errors["eval_logits"] = rel_err(model.eval()(ref["eval_images"]), ref["eval_logits"])
    print(f"\n{method}: worst relative error {max(errors.values()):.1e} ({max(errors, key=errors.get)})")
    bad = {k: v for k, v in errors.items() if not v < 1e-4}
    assert not bad, bad


def test_frozen_references_equal_the_official_code(official_clip):
    """KgCoOp's hand-crafted class features (its OxfordPets template) and PromptSRC's text targets (the
    normalised mean over its 60 templates), both from the frozen CLIP itself."""
    kgcoop, promptsrc = official_model("kgcoop", official_clip), official_model("promptsrc", official_clip)
    assert rel_err(kgcoop.handcrafted(official_clip), reference("kgcoop")["text_features_clip"]) < 1e-5
    assert rel_err(promptsrc.zs_text(official_clip), reference("promptsrc")["fixed_embeddings"]) < 1e-5


def test_gpa_equals_the_official_aggregation(official_clip):
    """The Gaussian weights of both recipes, and the aggregate of the official 3-epoch simulation (the
    trainable tensors set to known values before each epoch end)."""
    gpa = reference("promptsrc")["gpa"]
    for (mean, std), key in (((15, 1), "weights_mu15_sigma1_epochs20"), ((6, 10), "weights_mu6_sigma10_epochs20")):
        weights = torch.tensor(textrefiner.gpa_weights(mean, std, 20), dtype=torch.float64)
        torch.testing.assert_close(weights, gpa[key], rtol=1e-12, atol=0)
    sim = gpa["sim"]
    model = official_model("promptsrc", official_clip, "--gpa-mean", str(sim["mu"]), "--gpa-std", str(sim["sigma"]))
    for epoch, state in enumerate(sim["states"]):
        with torch.no_grad():
            for name, value in state.items():
                param, index = ours(model, name)
                row(param, index).copy_(value)
        model.epoch_end(epoch, sim["epochs"])
    for name, value in sim["result"].items():
        param, index = ours(model, name)
        torch.testing.assert_close(row(param, index), value, rtol=1e-6, atol=0, msg=name)


@pytest.mark.parametrize("method", FAMILY)
def test_recipes_are_the_official_configs(method):
    hp = reference(method)["hparams"]
    args = recipe_for(method)
    assert (args.lr, args.epochs, args.batch_size, args.momentum, args.weight_decay, args.warmup_epochs,
            args.warmup_lr) == (hp["lr"], hp["max_epoch"], hp["recipe_batch_size"], hp["momentum"], hp["weight_decay"],
                                hp["warmup_epoch"], hp["warmup_cons_lr"])
    assert args.selection == "last" and args.refiner  # the host's evaluated epoch; TextRefiner by default
    assert args.n_ctx == hp.get("N_CTX_TEXT", hp.get("N_CTX"))
    assert (args.semantic_weight, args.reg_weight, args.cache_size, args.alpha) == (0.02, 20.0, 25, 0.2)  # as on CoOp
    if method in DEEP:
        assert args.depth == hp["recipe_prompt_depth"] == 9
    expected = dict(kgcoop=dict(kg_weight=hp.get("W")), ivlp=dict(n_ctx_vision=hp.get("N_CTX_VISION")),
                    promptsrc=dict(n_ctx_vision=hp.get("N_CTX_VISION"), text_weight=hp.get("TEXT_LOSS_WEIGHT"),
                                   image_weight=hp.get("IMAGE_LOSS_WEIGHT"), gpa_mean=hp.get("GPA_MEAN"),
                                   gpa_std=hp.get("GPA_STD"))).get(method, {})
    assert {k: getattr(args, k) for k in expected} == expected
    xd = recipe_for(method, "--xd")
    assert {k: getattr(xd, k, None) for k in ("lr", "epochs", "depth", "gpa_mean", "gpa_std")} == dict(
        maple=dict(lr=0.0026, epochs=2, depth=3, gpa_mean=None, gpa_std=None),
        promptsrc=dict(lr=0.0025, epochs=20, depth=3, gpa_mean=6.0, gpa_std=10.0)).get(
        method, {k: getattr(args, k, None) for k in ("lr", "epochs", "depth", "gpa_mean", "gpa_std")})


def test_few_shot_recipes_are_the_official_ones(capsys):
    """train.py --few-shot: CoOp's few-shot scripts (16 context vectors at random, the last epoch;
    50, 100, 100, 200, 200 epochs for 1, 2, 4, 8, 16 shots; ImageNet 50 at any), PromptSRC's few-shot
    config (50 epochs, its Gaussian per dataset); KgCoOp's few-shot script runs its base-to-new config,
    and a method without a few-shot recipe keeps its base-to-new one."""
    for shots, epochs in {1: 50, 2: 100, 4: 100, 8: 200, 16: 200}.items():
        coop = recipe_for("coop", "--few-shot", "--shots", str(shots), dataset="dtd")
        assert (coop.epochs, coop.n_ctx, coop.ctx_init, coop.selection) == (epochs, 16, "", "last")
        assert recipe_for("coop", "--few-shot", "--shots", str(shots), dataset="imagenet").epochs == 50
    assert recipe_for("coop", "--few-shot", "--shots", "16", "--epochs", "3").epochs == 3  # a flag wins
    for dataset, (mean, std) in (("dtd", (45, 5)), ("eurosat", (45, 5)), ("caltech101", (30, 30))):
        src = recipe_for("promptsrc", "--few-shot", "--shots", "2", dataset=dataset)
        assert (src.epochs, src.gpa_mean, src.gpa_std, src.depth, src.lr, src.batch_size, src.selection) == (
            50, mean, std, 9, 0.0025, 4, "last")
    for method in ("kgcoop", "cocoop", "ivlp", "maple", "promptkd"):
        assert recipe_for(method, "--few-shot", "--shots", "4", dataset="dtd") == recipe_for(method, dataset="dtd")
    assert_usage_error(train.main, ["--xd", "--few-shot", "--dataset", "dtd"], "not allowed with argument", capsys)


@pytest.mark.parametrize("method", FAMILY)
def test_trainable_counts_at_vit_b16_shapes(method):
    """What the official code trains at ViT-B/16 and the recipe's depth, plus TextRefiner's 1,050,624 values
    (the CLIP on the meta device: no weights allocated)."""
    assert reference(method)["trainable_count_vit_b16"] == VIT_B16_COUNTS[method]
    with torch.device("meta"):
        clip = clip_model.CLIP(CONFIGS["ViT-B/16"]).requires_grad_(False)
    official = VIT_B16_COUNTS[method]
    for argv, count in (((), official + REFINER_PARAMETERS), (("--no-refiner",), official)):
        model = textrefiner.METHODS[method](clip, ["cat", "dog"], recipe_for(method, *argv))
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) == count, argv

# ----------------------------------------------------------------------------- with TextRefiner: float64 references


CLASSNAMES = ["cat", "golden_retriever", "sports car", "tabby_cat", "airliner"]
KGCOOP_DTD = "a photo of a {}, a type of texture."  # the run below is on dtd


@pytest.fixture(scope="module")
def tiny_sd():
    """The tiny CLIP's weights in float64 (the references' .double() is then free)."""
    return {k: v.double() for k, v in random_state_dict(CONFIGS["tiny"], seed=0).items()}


def images(batch, seed):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def normalise(x):
    return x / x.norm(dim=-1, keepdim=True)


def ref_text(sd, ctx, deep=None):
    """Normalised class features of "a photo of a {name}." with positions 1..n holding ctx (n, W)."""
    ids = tokenize([f"a photo of a {name.replace('_', ' ')}." for name in CLASSNAMES])  # (C, 77)
    embedded = sd["token_embedding.weight"].double()[ids]  # (C, 77, W)
    n = ctx.shape[0]
    prompts = torch.cat([embedded[:, :1], ctx.expand(len(ids), -1, -1), embedded[:, 1 + n:]], dim=1)
    return normalise(ref_encode_text(sd, ids, prompts, deep))


def ref_templates(sd, templates):
    """normalise(mean over templates of the frozen text features)."""
    ids = tokenize([t.replace("{}", n.replace("_", " ")) for t in templates for n in CLASSNAMES])  # (templates C, 77)
    return normalise(ref_encode_text(sd, ids).reshape(len(templates), len(CLASSNAMES), -1).mean(0))


def ref_host(method, sd, p, x):
    """The host's unrefined normalised class features t ((C, D), CoCoOp (B, C, D)) and its image tower's
    global feature (B, D), tokens (B, T, D) and CLS attention (B, T - 1), from the equations."""
    ctx = p["prompt_learner.ctx"]
    if method in ("cocoop", "kgcoop"):
        glob, tokens, cls_attn = ref_encode_image(sd, x)
        if method == "kgcoop":
            return ref_text(sd, ctx), glob, tokens, cls_attn
        h = torch.relu(normalise(glob) @ p["meta_net.linear1.weight"].t() + p["meta_net.linear1.bias"])
        shift = h @ p["meta_net.linear2.weight"].t() + p["meta_net.linear2.bias"]  # (B, W)
        return torch.stack([ref_text(sd, ctx + s) for s in shift]), glob, tokens, cls_attn
    deep = p["text_prompts"]  # (depth - 1, n, W)
    if method == "maple":
        maps = [(p["proj.weight"], p["proj.bias"], ctx)] + [
            (p[f"projections.{i}.weight"], p[f"projections.{i}.bias"], deep[i]) for i in range(len(deep))]
        visual = torch.stack([prompt @ w.t() + b for w, b, prompt in maps])
    else:
        visual = p["visual_prompts"]
    return (ref_text(sd, ctx, deep),) + ref_encode_image(sd, x, visual)


def reference_step(method, model, sd, x, y, x_eval):
    """One training step of host + TextRefiner and the eval logits after it, float64 from the equations: the
    refined classifier in the logits and the host's CE (PromptSRC's KL); the local rows (CLS, top-5 patches
    by CLS attention, mean; no prompt token) against the unrefined t; the L1; the host's own terms on the
    unrefined t; the cache update."""
    raw = {k: v.detach().double().clone() for k, v in model.trainable_state_dict().items()}
    p = {n: raw[n].requires_grad_() for n, q in model.named_parameters() if q.requires_grad}
    cache, scale = raw["refiner.cache"], sd["logit_scale"].double().exp()

    def refine(t, cache):
        read = torch.softmax(t @ cache.t(), dim=-1) @ cache
        return t + 0.2 * torch.cat([t, read], dim=-1) @ p["refiner.extractor.weight"].t()

    def logits_of(glob, classes):
        g = normalise(glob.double())
        return scale * (torch.einsum("bd,bcd->bc", g, classes) if classes.dim() == 3 else g @ classes.t())

    def cross_entropy(logits, labels):
        return (torch.logsumexp(logits, 1) - logits[torch.arange(len(labels)), labels]).mean()

    t, glob, tokens, cls_attn = ref_host(method, sd, p, x)
    b, n_tok, d = tokens.shape
    refined = refine(t, cache)
    logits = logits_of(glob, refined)
    aligned = ref_projection(tokens.reshape(b * n_tok, d), p, "refiner.align")[0].reshape(b, n_tok, -1)
    local_logits = scale * spec_semantic_tokens(aligned, cls_attn) @ t.transpose(-1, -2)  # (B, 7, C)
    terms = dict(loss_global=cross_entropy(logits, y),
                 loss_local=cross_entropy(local_logits.reshape(b * 7, -1), y.repeat_interleave(7)),
                 loss_reg=(normalise(refined) - t).abs().mean())
    loss = terms["loss_global"] + terms["loss_local"] / 50 + 20 * terms["loss_reg"]
    if method == "kgcoop":
        terms["loss_kg"] = 1 - (t * ref_templates(sd, [KGCOOP_DTD])).sum(-1).mean()
        loss = loss + 8 * terms["loss_kg"]
    if method == "promptsrc":
        zs_text, zs_image = ref_templates(sd, textrefiner.PROMPTSRC_TEMPLATES), normalise(ref_encode_image(sd, x)[0])
        log_p, log_zs = torch.log_softmax(logits, 1), torch.log_softmax(scale * zs_image @ zs_text.t(), 1)
        terms.update(loss_text=(t - zs_text).abs().mean(), loss_image=(normalise(glob) - zs_image).abs().mean(),
                     loss_kl=(log_zs.exp() * (log_zs - log_p)).sum() / logits.numel())
        loss = loss + 25 * terms["loss_text"] + 10 * terms["loss_image"] + terms["loss_kl"]
    grads = dict(zip(p, torch.autograd.grad(loss, list(p.values()))))
    new_cache = spec_cache_update(cache, aligned)
    with torch.no_grad():
        t_eval, glob_eval, _, _ = ref_host(method, sd, p, x_eval)
        eval_logits = logits_of(glob_eval, refine(t_eval, new_cache))
    return dict(terms, loss=loss, logits=logits, grads=grads, cache=new_cache, eval_logits=eval_logits)


@pytest.mark.parametrize("method", FAMILY)
def test_training_step_and_eval_with_textrefiner_match_float64_reference(tiny_sd, method):
    clip = build_model({k: v.float() for k, v in tiny_sd.items()})
    torch.manual_seed(3)
    recipe = recipe_for(method, *(["--depth", "2"] if method in DEEP else []), dataset="dtd", classnames=CLASSNAMES)
    model = textrefiner.METHODS[method](clip, CLASSNAMES, recipe).train()
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():  # off their init values: every BatchNorm term and the prompts' effect exercised
        for name, param in model.named_parameters():
            if name.endswith("prompts"):
                param.normal_(0, 0.3, generator=g)
        model.refiner.align.bn.weight.uniform_(0.5, 1.5, generator=g)
        model.refiner.align.bn.bias.uniform_(-0.2, 0.2, generator=g)
    x, y, x_eval = images(4, seed=11), torch.tensor([2, 0, 4, 2]), images(3, seed=12)
    ref = reference_step(method, model, tiny_sd, x, y, x_eval)
    out = model(x, y)
    out["loss"].backward()
    errors = {k: rel_err(out[k], ref[k]) for k in model.loss_keys + ("logits",)}
    for name, param in model.named_parameters():
        if param.requires_grad:
            expected = ref["grads"][name]
            if name.endswith("fc1.bias"):  # BatchNorm subtracts it again: an exactly zero gradient
                assert expected.abs().max() < 1e-10
                expected = ref["grads"][name.replace("bias", "weight")]
                errors[name] = ((param.grad.double() - ref["grads"][name]).abs().max() / expected.abs().max()).item()
            else:
                errors[name] = rel_err(param.grad, expected)
    errors["cache"] = rel_err(model.refiner.cache, ref["cache"])
    errors["eval_logits"] = rel_err(model.eval()(x_eval), ref["eval_logits"])
    print(f"\n{method} + TextRefiner: worst relative error {max(errors.values()):.1e} ({max(errors, key=errors.get)})")
    bad = {k: v for k, v in errors.items() if not v < 1e-4}
    assert not bad, bad
    assert all(ref[k] > 1e-5 for k in model.loss_keys)  # every term exercised

# ----------------------------------------------------------------------------- train.py, eval.py, bench.py


# The hosts' own loss terms and their recipe weights, besides CE + local / 50 + 20 L1.
HOST_TERMS = dict(kgcoop=dict(loss_kg=8.0), promptsrc=dict(loss_text=25.0, loss_image=10.0, loss_kl=1.0))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return str(tmp_path_factory.getbasetemp())


def family_argv(base, out, method, *extra):
    """2 epochs of 4 steps on the synthetic dataset's 3 base classes; PromptSRC's aggregation centred
    between them (--gpa-mean 1.5), so both epochs count."""
    root, weights = synthetic(base)
    return ["--method", method, "--dataset", "caltech101", "--root", root, "--clip", weights, "--subsample", "base",
            "--device", "cpu", "--epochs", "2", "--batch-size", "4", "--lr", "0.01", "--workers", "0",
            "--log-interval", "4", *(["--depth", "2"] if method in DEEP else []),
            *(["--gpa-mean", "1.5"] if method == "promptsrc" else []), "--output-dir", str(out), *extra]


def trained(base, method):
    """The uninterrupted run of `method` + TextRefiner (once per session)."""
    out = os.path.join(base, f"family-{method}")
    if not os.path.exists(os.path.join(out, "results.json")):
        train.main(family_argv(base, out, method))
    return out


def load_run(base, out, name="last.pt"):
    """(checkpoint, its model rebuilt from the run's flags with the checkpoint's state loaded)."""
    ckpt = torch.load(os.path.join(out, name), weights_only=True)
    Method = textrefiner.METHODS[ckpt["args"]["method"]]
    model = Method(clip_model.load_clip(synthetic(base)[1]), ["a", "b", "c"], flags.recipe_of(Method, ckpt["args"]))
    model.load_trainable_state_dict(ckpt["model"])
    return ckpt, model


@pytest.mark.slow
@pytest.mark.parametrize("refiner", [True, False], ids=["textrefiner", "plain"])
@pytest.mark.parametrize("method", FAMILY)
def test_train_and_evaluate_the_new_classes(base, method, refiner, tmp_path):
    out = trained(base, method) if refiner else str(tmp_path / "run")
    if not refiner:
        train.main(family_argv(base, out, method, "--no-refiner", "--epochs", "1", "--warmup-epochs", "0"))
    results = read_results(out)
    epochs = 2 if refiner else 1
    assert (results["method"], results["refiner"], results["selection"], results["epoch"]) == \
        (method, refiner, "last", epochs - 1)
    log = read_log(out)
    assert [r["epoch"] for r in log] == list(range(epochs)) and all("val_acc" not in r for r in log)
    for r in log:
        host = sum(w * r[k] for k, w in HOST_TERMS.get(method, {}).items())
        assert r["loss"] == pytest.approx(r["loss_global"] + r["loss_local"] / 50 + 20 * r["loss_reg"] + host, rel=1e-5)
        assert (r["loss_local"] > 0) == refiner and (r["loss_reg"] > 0) == refiner
    ckpt, model = load_run(base, out)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable <= ckpt["model"].keys() and not any(k.startswith("clip.") for k in ckpt["model"])
    assert any(k.startswith("refiner.") for k in trainable) == refiner
    new = evaluate_cli.main(["--checkpoint", os.path.join(out, "last.pt"), "--subsample", "new", "--workers", "0",
                             "--device", "cpu", "--output-dir", str(tmp_path / "new")])
    assert new["classnames"] == ["class_003", "class_004", "class_005"] and new["num_images"] == 9
    assert (new["method"], new["refiner"], new["selection"]) == (method, refiner, "last")


@pytest.mark.slow
@pytest.mark.parametrize("method", FAMILY)
def test_resume_after_interruption_ends_bitwise_equal(base, method, tmp_path, monkeypatch):
    """Every tensor of last.pt (prompts, BatchNorm statistics, cache; PromptSRC's aggregate) and every
    logged loss equal an uninterrupted run's."""
    reference_run = trained(base, method)
    interrupt_at_epoch(monkeypatch, 1)
    with pytest.raises(Interrupted):
        train.main(family_argv(base, tmp_path, method))
    monkeypatch.undo()
    if method == "promptsrc":  # after epoch 1 of 2, the sum holds w_1 times its parameters
        _, model = load_run(base, tmp_path)
        weight = textrefiner.gpa_weights(1.5, 1.0, 2)[0]
        assert torch.equal(model.gpa_sum, torch.cat([p.flatten() for p in model.trained()]) * weight)
    train.main(family_argv(base, tmp_path, method, "--resume"))
    resumed = torch.load(tmp_path / "last.pt", weights_only=True)
    uninterrupted = torch.load(os.path.join(reference_run, "last.pt"), weights_only=True)
    assert resumed["epoch"] == uninterrupted["epoch"] == 1
    assert_same_tensors(resumed["model"], uninterrupted["model"])
    assert [r["loss"] for r in read_log(tmp_path)] == [r["loss"] for r in read_log(reference_run)]
    assert read_results(tmp_path)["accuracy"] == read_results(reference_run)["accuracy"]
    if method == "promptsrc":  # the model saved and evaluated is the aggregate
        _, model = load_run(base, tmp_path)
        assert torch.equal(model.gpa_sum, torch.cat([p.flatten() for p in model.trained()]))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["cocoop", "maple", "promptsrc"])
def test_torchrun_two_ranks_match_one(base, method, tmp_path):
    """Global batch 4 as 2 ranks x 2 images (gloo): TextRefiner's BatchNorm and cache over the global batch,
    gradients averaged; CoCoOp's per-image class features, MaPLe's coupled prompts, PromptSRC's aggregation."""
    one = trained(base, method)
    torchrun_two_ranks("train.py", family_argv(base, tmp_path, method))
    assert_same_tensors(torch.load(tmp_path / "last.pt", weights_only=True)["model"],
                        torch.load(os.path.join(one, "last.pt"), weights_only=True)["model"], exact=False)
    for a, b in zip(read_log(tmp_path), read_log(one), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


@pytest.mark.parametrize("method", FAMILY)
def test_benchmark_times_the_host_with_and_without_textrefiner(method, capsys):
    title = textrefiner.METHODS[method].title
    bench = ["step", "--method", method, "--clip", "tiny", "--device", "cpu", "--batch-size", "2", "--num-classes",
             "3", "--steps", "1", "--warmup", "1"]
    assert list(benchmarks.main(bench))[:2] == [f"{title}+TextRefiner", title]
    assert list(benchmarks.main([*bench, "--eval"]))[:2] == [f"{title}+TextRefiner", title]
    out = capsys.readouterr().out
    assert f"{title}+TextRefiner step time / {title} step time" in out and "target <= 1.10" in out
    assert f"{title}+TextRefiner images/s / {title} images/s" in out and "target >= 0.95" in out


@pytest.mark.parametrize("method", FAMILY)
def test_report_puts_the_published_numbers_beside_ours(method, tmp_path, capsys):
    Method = textrefiner.METHODS[method]
    for part, accuracy in (("base", 80.0), ("new", 70.0)):
        write_result(tmp_path / "dtd" / "seed1" / part, accuracy, method=method, refiner=True, selection="last")
    tables.main(["report", str(tmp_path)])
    out = capsys.readouterr().out
    assert out.startswith(f"{Method.title} + TextRefiner: base-to-new") and results.PUBLISHED[method]["note"] in out
    (name, numbers), = results.PUBLISHED[method]["base2new"].items()
    assert name == Method.title and " ".join(f"{v:.2f}" for v in numbers) in " ".join(out.split())


@pytest.mark.parametrize("argv, message", [
    (["--method", "kgcoop", "--kg-weight", "-1"], "--kg-weight: must be >= 0, got -1.0"),
    (["--method", "promptsrc", "--gpa-std", "0"], "--gpa-std: must be positive, got 0.0"),
    (["--method", "promptsrc", "--gpa-mean", "nan"], "--gpa-mean: must be a finite number, got nan"),
    (["--method", "ivlp", "--n-ctx-vision", "0"], "--n-ctx-vision: must be positive, got 0"),
    (["--method", "maple", "--kg-weight", "2"], "--kg-weight applies to --method kgcoop, not maple"),
    (["--method", "maple", "--n-ctx", "5"], "--ctx-init 'a photo of a' is 4 tokens but --n-ctx is 5"),
    (["--n-ctx", "2", "--class-token-position", "middle"], "needs --class-token-position end"),
    (["--method", "ivlp", "--depth", "3"], "--depth must be at most 2, the blocks of a tower of the CLIP; got 3"),
])
def test_flag_errors_are_one_line(argv, message, base, tmp_path, capsys):
    root, weights = synthetic(base)
    assert_usage_error(train.main, ["--dataset", "caltech101", "--root", root, "--clip", weights, "--device", "cpu",
                                    "--workers", "0", "--output-dir", str(tmp_path / "out"), *argv], message, capsys)


@pytest.mark.parametrize("method", FAMILY)
def test_losses_and_logits_stay_fp32_under_bf16_autocast(tiny_sd, method):
    """bf16 towers, fp32 master weights, refiner maths, losses and logits (PromptSRC's and KgCoOp's frozen
    references are computed out of autocast)."""
    clip = build_model({k: v.float() for k, v in tiny_sd.items()})
    recipe = recipe_for(method, *(["--depth", "2"] if method in DEEP else []), classnames=CLASSNAMES)
    x, y = images(2, seed=1), torch.tensor([0, 3])
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(textrefiner.METHODS[method](clip, CLASSNAMES, recipe).train())
    reference_out = models[0](x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = models[1](x, y)
    out["loss"].backward()
    for name, value in out.items():
        assert value.dtype == torch.float32, name
        torch.testing.assert_close(value, reference_out[name], rtol=0.1, atol=0.1, msg=name)
    assert all(p.dtype == p.grad.dtype == torch.float32 for p in models[1].parameters() if p.requires_grad)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert models[1].eval()(x).dtype == torch.float32


@pytest.mark.parametrize("mean, std", [(1e200, 1.0), (15.0, 1e-300), (1e308, 1e-10)])
def test_gpa_settings_whose_weights_overflow_are_refused_before_training(mean, std):
    """--gpa-mean 1e200 or --gpa-std 1e-300 trained a whole epoch, then OverflowError (or NaN weights)."""
    clip = build_model(random_state_dict(CONFIGS["tiny"]))
    recipe = textrefiner.METHODS["promptsrc"].recipe(depth=2, gpa_mean=mean, gpa_std=std)
    with pytest.raises(textrefiner.RecipeError) as err:
        textrefiner.METHODS["promptsrc"](clip, ["cat", "dog"], recipe)
    assert flags.recipe_message(err.value).startswith(f"--gpa-mean {mean} and --gpa-std {std}: the aggregation "
                                                      f"weights of epochs 1..20 are not finite numbers")


def test_gpa_overflow_on_the_command_line_is_one_line_before_any_epoch(run, tmp_path, capsys):
    root, weights, _ = run
    argv = train_argv(root, weights, str(tmp_path), "--method", "promptsrc", "--depth", "2", "--gpa-std", "1e-300")
    assert_usage_error(train.main, argv, "--gpa-mean 15.0 and --gpa-std 1e-300: the aggregation weights", capsys)
    assert not os.path.exists(tmp_path / "last.pt")
