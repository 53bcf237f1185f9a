"""textrefiner.py's CoOp prompts and TextRefiner: hand-computed small cases, and one training
step plus evaluation on a tiny random CLIP against an independent float64 implementation of the
equations of textrefiner.py's docstring."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from clip_model import CONFIGS, build_model, random_state_dict, tokenize
from textrefiner import CoOpRecipe, PromptLearner, TextRefiner, TextRefinerCLIP, ZeroShotCLIP, ZeroShotRecipe
from helpers import rel_err, save_half_batch_step, spec_cache_update, spec_semantic_tokens

CLASSNAMES = ["cat", "golden_retriever", "sports car", "tabby_cat", "airliner"]
STATE_KEYS = {
    "prompt_learner.ctx",
    "refiner.align.fc1.weight", "refiner.align.fc1.bias",
    "refiner.align.bn.weight", "refiner.align.bn.bias", "refiner.align.bn.running_mean",
    "refiner.align.bn.running_var", "refiner.align.bn.num_batches_tracked",
    "refiner.align.fc2.weight", "refiner.align.fc2.bias",
    "refiner.extractor.weight", "refiner.cache",
}


@pytest.fixture(scope="module")
def clip():
    return build_model(random_state_dict(CONFIGS["tiny"], seed=0))


def make_model(clip, seed=0, classnames=CLASSNAMES, **kwargs):
    torch.manual_seed(seed)
    return TextRefinerCLIP(clip, classnames, CoOpRecipe(**kwargs))


def prompt_learner(clip, classnames, **kwargs):
    learner = PromptLearner(clip, **kwargs)
    learner.set_classnames(classnames)
    return learner


def images(batch, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 32, 32, generator=g)


def grad_err(actual, expected, name):
    """rel_err of a gradient; fc1's bias has an exactly-zero gradient (BatchNorm subtracts it
    again), so its error is measured against the scale of fc1's weight gradient."""
    if name != "refiner.align.fc1.bias":
        return rel_err(actual[name], expected[name])
    scale = expected["refiner.align.fc1.weight"].double().abs().max()
    return ((actual[name].double() - expected[name].double()).abs().max() / scale).item()


# ----------------------------------------------------------------------------- prompt learner

def test_prompt_embeddings_equal_the_tokenised_sentence_at_init(clip):
    # ctx starts as the embeddings of "a photo of a", so every class layout at init is the
    # embedding of a plain sentence whose words sit in that layout
    sentences = {"end": "a photo of a golden retriever.", "front": "golden retriever a photo of a.",
                 "middle": "a photo golden retriever of a."}
    for position, sentence in sentences.items():
        learner = prompt_learner(clip, ["golden_retriever"], class_token_position=position)
        prompts, ids = learner()
        expected_ids = tokenize(sentence)
        assert torch.equal(ids, tokenize("a photo of a golden retriever."))
        assert torch.equal(prompts, clip.token_embedding(expected_ids).detach()), position
    assert torch.equal(learner.ctx.detach(), clip.token_embedding(tokenize("a photo of a"))[0, 1:5].detach())


def test_prompt_learner_random_init_and_bad_arguments(clip):
    torch.manual_seed(0)
    learner = prompt_learner(clip, ["cat"], n_ctx=16, ctx_init="")
    assert learner.ctx.shape == (16, 128)
    assert 0.015 < learner.ctx.std().item() < 0.025
    assert torch.equal(learner.token_ids, tokenize(" ".join(["X"] * 16) + " cat."))
    assert learner.state_dict().keys() == {"ctx"}  # prefix/suffix/ids are rebuilt, not saved
    with pytest.raises(ValueError, match="n_ctx is 16"):
        PromptLearner(clip, n_ctx=16, ctx_init="a photo of a")
    with pytest.raises(ValueError, match="class_token_position"):
        PromptLearner(clip, class_token_position="back")


# ------------------------------------------------------------------------ hand-computed cases

def test_refine_with_a_two_row_cache():
    refiner = TextRefiner(embed_dim=2, cache_size=2, alpha=0.5)
    with torch.no_grad():
        refiner.cache.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        refiner.extractor.weight.copy_(torch.tensor([[1.0, 0.0, 0.0, 2.0], [0.0, -1.0, 3.0, 0.0]]))
    refined = refiner.refine(torch.tensor([[3.0, 4.0]]))  # normalised inside: t = (0.6, 0.8)
    # s = (0.6, 0.8); softmax -> a; f = a @ I = a
    a0 = 1 / (1 + math.exp(0.2))
    a1 = 1 - a0
    e = (0.6 + 2 * a1, -0.8 + 3 * a0)  # extractor([t, f])
    expected = torch.tensor([[0.5 * e[0] + 0.6, 0.5 * e[1] + 0.8]])  # not re-normalised
    torch.testing.assert_close(refined, expected, rtol=1e-6, atol=1e-6)


def test_cache_update_hand_case():
    refiner = TextRefiner(embed_dim=3, cache_size=3, momentum=0.8)
    with torch.no_grad():
        refiner.cache.copy_(torch.eye(3))
    a = torch.tensor([0.75, 0.66, 0.0])  # -> slot 0; its slot-1 score is the column max of slot 1
    c = torch.tensor([0.5, 0.55, 0.5])  # -> slot 1, with a lower slot-1 score than a's
    d = torch.tensor([2.0, 0.0, 0.0])  # -> slot 0 with score 1: the column max of slot 0
    a_hat, c_hat, d_hat = (v / v.norm() for v in (a, c, d))
    refiner.update_cache(torch.stack([a, c, d])[None])  # (B=1, T=3, D=3), not normalised
    row0 = 0.8 * torch.tensor([1.0, 0, 0]) + 0.2 * (math.exp(a_hat[0] - 1.0) * a_hat + 1.0 * d_hat)
    row1 = 0.8 * torch.tensor([0, 1.0, 0]) + 0.2 * math.exp(c_hat[1] - a_hat[1]) * c_hat
    expected = torch.stack([row0 / row0.norm(), row1 / row1.norm(), torch.tensor([0, 0, 1.0])])
    torch.testing.assert_close(refiner.cache, expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(refiner.cache[2], torch.tensor([0, 0, 1.0]))  # no token assigned: unchanged
    torch.testing.assert_close(refiner.cache.norm(dim=1), torch.ones(3))


def test_a_nonfinite_token_updates_neither_cache_nor_running_stats():
    """Under fp16 an overflowing token makes the loss non-finite and the gradient scaler skips
    the step; the refiner's buffers must skip it too, not keep a NaN row or NaN BN statistics."""
    refiner = TextRefiner(embed_dim=8, cache_size=4).train()
    tokens = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(3))  # (B, T, D)
    refiner.align_tokens(tokens)
    refiner.update_cache(tokens)
    bn = refiner.align.bn
    assert bn.num_batches_tracked == 1 and (bn.running_mean != 0).any()  # a finite batch counts
    before = {k: v.clone() for k, v in refiner.state_dict().items()}
    for bad in (float("nan"), float("inf")):
        poisoned = tokens.clone()
        poisoned[1, 2, 3] = bad
        refiner.align_tokens(poisoned)
        refiner.update_cache(poisoned)
        for k, v in refiner.state_dict().items():
            assert torch.equal(v, before[k]), (bad, k)


def test_semantic_tokens_are_cls_topk_and_mean():
    refiner = TextRefiner(embed_dim=3, topk=5)
    aligned = torch.randn(2, 10, 3)
    cls_attn = torch.tensor([[9.0, 1, 8, 2, 7, 3, 6, 4, 5], [1.0, 2, 3, 4, 5, 6, 7, 8, 9]])
    local = refiner.semantic_tokens(aligned, cls_attn)
    assert local.shape == (2, 7, 3)
    top = [[0, 2, 4, 6, 8], [8, 7, 6, 5, 4]]  # patch indices by descending attention
    for b in range(2):
        expected = [aligned[b, 0]] + [aligned[b, i + 1] for i in top[b]] + [aligned[b].mean(0)]
        torch.testing.assert_close(local[b], torch.stack(expected))


def test_regularisation_and_global_logits_use_unnormalised_refined(clip):
    model = make_model(clip).train()
    dim = clip.config.embed_dim
    with torch.no_grad():  # refined = t + alpha * (-20 t) = -3 t
        model.refiner.extractor.weight.copy_(torch.cat([-20 * torch.eye(dim), torch.zeros(dim, dim)], 1))
    x, y = images(3), torch.tensor([0, 4, 2])
    out = model(x, y)
    with torch.no_grad():
        t = model.text_features()
        img = F.normalize(clip.encode_image(x), dim=-1)
    scale = clip.logit_scale.exp()
    # normalise(-3t) = -t, so L1 = mean |-t - t| = 2 mean |t| (6 mean |t| if not normalised)
    torch.testing.assert_close(out["loss_reg"], 2 * t.abs().mean())
    torch.testing.assert_close(out["logits"], -3 * scale * img @ t.t())
    torch.testing.assert_close(out["loss_global"], F.cross_entropy(out["logits"], y))
    total = out["loss_global"] + out["loss_local"] / 50 + 20 * out["loss_reg"]
    torch.testing.assert_close(out["loss"], total)


# ------------------------------------------------------------------------- model behaviour

def test_gradients_reach_only_ctx_align_and_extractor(clip):
    model = make_model(clip).train()
    model(images(4), torch.tensor([0, 1, 2, 3]))["loss"].backward()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"prompt_learner.ctx", "refiner.align.fc1.weight", "refiner.align.fc1.bias",
                         "refiner.align.bn.weight", "refiner.align.bn.bias", "refiner.align.fc2.weight",
                         "refiner.align.fc2.bias", "refiner.extractor.weight"}
    for name, p in model.named_parameters():
        if name in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    assert not clip.training and not model.refiner.cache.requires_grad


def test_eval_leaves_cache_and_bn_statistics_untouched(clip):
    model = make_model(clip).eval()
    before = {k: v.clone() for k, v in model.trainable_state_dict().items()}
    model(images(2))
    for name, value in model.trainable_state_dict().items():
        assert torch.equal(value, before[name]), name


def test_training_step_updates_cache_and_bn_statistics(clip):
    model = make_model(clip).train()
    cache = model.refiner.cache.clone()
    model(images(2), torch.tensor([0, 1]))
    assert not torch.equal(model.refiner.cache, cache)
    assert model.refiner.align.bn.num_batches_tracked.item() == 1


def test_eval_features_are_reused_and_invalidated(clip, monkeypatch):
    model = make_model(clip).eval()
    calls = []
    encode = clip.encode_prompts
    monkeypatch.setattr(clip, "encode_prompts", lambda *a, **k: calls.append(k) or encode(*a, **k))
    x = images(3)

    def fresh_logits():  # an independent model with the same state: no cached features
        other = make_model(clip, seed=5, classnames=model_names[0]).eval()
        other.load_trainable_state_dict(model.trainable_state_dict())
        other.refiner.alpha = model.refiner.alpha  # a hyper-parameter, not in the state dict
        return other(x)

    model_names = [CLASSNAMES]
    first = model(x)
    model(x)
    assert len(calls) == 1  # computed once for both batches
    # the encoder length comes precomputed from the CPU ids (finding it on CUDA ids syncs)
    want_length = int(tokenize([f"a photo of a {n.replace('_', ' ')}." for n in CLASSNAMES]).argmax(-1).max()) + 1
    assert calls[0] == {"length": want_length, "deep_prompts": None}
    def change_ctx():
        with torch.no_grad():
            model.prompt_learner.ctx.add_(0.5)  # in place, as an optimizer step would

    def change_cache():
        with torch.no_grad():
            model.refiner.cache.copy_(F.normalize(model.refiner.cache + torch.randn(25, 64), dim=-1))

    def change_extractor():
        with torch.no_grad():
            model.refiner.extractor.weight.mul_(-1.5)

    def change_alpha():
        model.refiner.alpha = 0.7

    changes = {"ctx": change_ctx, "cache": change_cache, "extractor": change_extractor, "alpha": change_alpha}
    previous = first
    for what, change in changes.items():
        change()
        logits = model(x)
        assert not torch.allclose(logits, previous), f"stale class features after changing the {what}"
        torch.testing.assert_close(logits, fresh_logits())
        previous = logits
    model_names[0] = ["airliner", "cat"]
    model.set_classnames(model_names[0])
    logits = model(x)
    assert logits.shape == (3, 2)
    torch.testing.assert_close(logits, fresh_logits())
    torch.testing.assert_close(logits, previous[:, [4, 0]])  # same classes, new order


def test_refiner_maths_stays_fp32_under_autocast(clip):
    x, y = images(2), torch.tensor([0, 3])
    reference = make_model(clip).train()(x, y)
    model = make_model(clip).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, y)
    for name, value in out.items():
        assert value.dtype == torch.float32, name
        torch.testing.assert_close(value, reference[name], rtol=0.1, atol=0.1)  # bf16 towers only
    assert model.refiner.cache.dtype == model.refiner.align.bn.running_var.dtype == torch.float32
    model.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(x)
    exact = model(x)  # autocast state is part of the eval-feature key: recomputed in fp32
    other = make_model(clip, seed=9).eval()
    other.load_trainable_state_dict(model.trainable_state_dict())
    torch.testing.assert_close(exact, other(x))
    assert low.dtype == exact.dtype == torch.float32 and not torch.equal(low, exact)


def test_set_classnames_changes_classes_and_logits(clip):
    model = make_model(clip).train()
    out = model(images(2), torch.tensor([0, 4]))
    assert out["logits"].shape == (2, 5)
    model.set_classnames(["tabby_cat", "cat"])
    out = model(images(2), torch.tensor([1, 0]))
    assert out["logits"].shape == (2, 2)
    model.eval()
    logits = model(images(2))
    model.set_classnames(CLASSNAMES)
    torch.testing.assert_close(logits, model(images(2))[:, [3, 0]])


def test_state_dict_round_trip_under_spec_names(clip):
    model = make_model(clip, seed=0).train()
    model(images(2), torch.tensor([0, 1]))  # move cache and running stats off their init
    state = model.trainable_state_dict()
    assert state.keys() == STATE_KEYS
    other = make_model(clip, seed=7).eval()
    model.eval()
    assert not torch.allclose(other(images(2)), model(images(2)))
    other.load_trainable_state_dict(copy.deepcopy(state))
    for name, value in other.trainable_state_dict().items():
        assert torch.equal(value, state[name]), name
    torch.testing.assert_close(other(images(2)), model(images(2)))

    with pytest.raises(ValueError, match="missing keys \\['refiner.cache'\\]"):
        other.load_trainable_state_dict({k: v for k, v in state.items() if k != "refiner.cache"})
    with pytest.raises(ValueError, match="unexpected keys \\['clip.logit_scale'\\]"):
        other.load_trainable_state_dict({**state, "clip.logit_scale": torch.tensor(1.0)})
    with pytest.raises(ValueError, match="refiner.cache: checkpoint \\(10, 64\\), model \\(25, 64\\)"):
        other.load_trainable_state_dict({**state, "refiner.cache": torch.zeros(10, 64)})


def test_refiner_false_is_plain_coop(clip):
    model = make_model(clip, refiner=False).train()
    assert model.trainable_state_dict().keys() == {"prompt_learner.ctx"}
    x, y = images(3), torch.tensor([1, 2, 0])
    out = model(x, y)
    sentences = [f"a photo of a {name.replace('_', ' ')}." for name in CLASSNAMES]
    with torch.no_grad():
        t = F.normalize(clip.encode_text(tokenize(sentences)), dim=-1)
        logits = clip.logit_scale.exp() * F.normalize(clip.encode_image(x), dim=-1) @ t.t()
    torch.testing.assert_close(out["logits"], logits)  # ctx still equals "a photo of a"
    torch.testing.assert_close(out["loss"], F.cross_entropy(logits, y))
    assert out["loss_local"].item() == 0 and out["loss_reg"].item() == 0
    out["loss"].backward()
    assert model.prompt_learner.ctx.grad.abs().sum() > 0
    torch.testing.assert_close(model.eval()(x), logits)


def test_zero_shot_uses_coop_templates(clip):
    names = ["apple_pie", "ramen"]
    model = ZeroShotCLIP(clip, names, ZeroShotRecipe().for_run("food101", "all", names))
    assert model.text_length == int(model.token_ids.argmax(-1).max()) + 1  # passed to encode_text
    x = images(2)
    with torch.no_grad():
        text = F.normalize(clip.encode_text(tokenize(["a photo of apple pie, a type of food.",
                                                      "a photo of ramen, a type of food."])), dim=-1)
        expected = clip.logit_scale.exp() * F.normalize(clip.encode_image(x), dim=-1) @ text.t()
    torch.testing.assert_close(model(x), expected)
    model.set_classnames(["ramen"])
    torch.testing.assert_close(model(x), expected[:, 1:])
    with pytest.raises(ValueError, match="unknown dataset 'food-101'"):
        ZeroShotRecipe().for_run("food-101", "all", ["ramen"])


# ------------------------------------------------------- float64 reference of the equations


def reference_step(clip64, model, classnames, x, y, x_eval):
    """TextRefiner on CoOp from the equations, in float64, on copies of the model's raw weights: returns
    the loss terms, logits, gradients of every trainable tensor, the updated cache, BN
    running statistics and the eval logits with the updated cache."""
    raw = {k: v.detach().double().clone() for k, v in model.trainable_state_dict().items()}
    names = ["prompt_learner.ctx", "refiner.align.fc1.weight", "refiner.align.fc1.bias",
             "refiner.align.bn.weight", "refiner.align.bn.bias", "refiner.align.fc2.weight",
             "refiner.align.fc2.bias", "refiner.extractor.weight"]
    params = {k: raw[k].requires_grad_() for k in names}
    cache, alpha, eps = raw["refiner.cache"], 0.2, 1e-5
    scale = clip64.logit_scale.exp()

    def class_features(ctx, cache):
        ids = tokenize([f"a photo of a {name.replace('_', ' ')}." for name in classnames])  # (C, 77)
        embedded = clip64.token_embedding(ids).detach()  # (C, 77, W)
        prompts = torch.cat([embedded[:, :1], ctx.expand(len(classnames), -1, -1), embedded[:, 5:]], 1)
        text = clip64.encode_prompts(prompts, ids)
        t = text / text.norm(dim=-1, keepdim=True)
        s = t @ cache.t()  # (C, M)
        a = torch.exp(s - s.max(1, keepdim=True).values)
        a = a / a.sum(1, keepdim=True)
        f = a @ cache
        refined = alpha * torch.cat([t, f], 1) @ params["refiner.extractor.weight"].t() + t
        return t, refined

    def cross_entropy(logits, labels):
        return (torch.logsumexp(logits, 1) - logits[torch.arange(len(labels)), labels]).mean()

    with torch.no_grad():
        glob, tokens, cls_attn = clip64.encode_image(x.double(), return_tokens=True)
    b, n_tok, d = tokens.shape
    t, refined = class_features(params["prompt_learner.ctx"][None], cache)
    img = glob / glob.norm(dim=-1, keepdim=True)
    logits = scale * img @ refined.t()

    p = {name.split(".", 1)[1]: value for name, value in params.items()}  # short names
    h = tokens.reshape(b * n_tok, d) @ p["align.fc1.weight"].t() + p["align.fc1.bias"]
    mean = h.mean(0)
    var = ((h - mean) ** 2).mean(0)
    z = torch.relu((h - mean) / torch.sqrt(var + eps) * p["align.bn.weight"] + p["align.bn.bias"])
    aligned = (z @ p["align.fc2.weight"].t() + p["align.fc2.bias"]).reshape(b, n_tok, d)

    local = spec_semantic_tokens(aligned, cls_attn)  # (B, 7, D)
    local_logits = scale * local.reshape(b * 7, d) @ t.t()
    loss_global = cross_entropy(logits, y)
    loss_local = sum(cross_entropy(local_logits[i * 7:(i + 1) * 7], y[i].repeat(7)) for i in range(b)) / b
    loss_reg = (refined / refined.norm(dim=-1, keepdim=True) - t).abs().mean()
    loss = loss_global + loss_local / 50 + 20 * loss_reg
    grads = dict(zip(names, torch.autograd.grad(loss, list(params.values()))))

    new_cache = spec_cache_update(cache, aligned)
    count = b * n_tok
    running_mean = 0.9 * raw["refiner.align.bn.running_mean"] + 0.1 * mean.detach()
    running_var = 0.9 * raw["refiner.align.bn.running_var"] + 0.1 * var.detach() * count / (count - 1)

    with torch.no_grad():
        _, refined_eval = class_features(params["prompt_learner.ctx"][None], new_cache)
        img_eval = clip64.encode_image(x_eval.double())
        eval_logits = scale * img_eval / img_eval.norm(dim=-1, keepdim=True) @ refined_eval.t()
    return dict(loss=loss, loss_global=loss_global, loss_local=loss_local, loss_reg=loss_reg, logits=logits,
                grads=grads, cache=new_cache, running_mean=running_mean, running_var=running_var,
                eval_logits=eval_logits)


def test_training_step_and_eval_match_float64_reference(clip):
    model = make_model(clip, seed=3).train()
    with torch.no_grad():  # off their init values, so every BN term is exercised
        model.refiner.align.bn.weight.uniform_(0.5, 1.5)
        model.refiner.align.bn.bias.uniform_(-0.2, 0.2)
        model.refiner.align.bn.running_var.uniform_(0.5, 1.5)
    clip64 = copy.deepcopy(clip).double()
    x, y, x_eval = images(4, seed=11), torch.tensor([2, 0, 4, 2]), images(3, seed=12)
    ref = reference_step(clip64, model, CLASSNAMES, x, y, x_eval)

    out = model(x, y)
    out["loss"].backward()
    for name in ("loss", "loss_global", "loss_local", "loss_reg", "logits"):
        assert rel_err(out[name], ref[name]) < 1e-4, name
    grads = {name: p.grad for name, p in model.named_parameters()}
    for name in ref["grads"]:
        assert grad_err(grads, ref["grads"], name) < 1e-4, name
    assert ref["grads"]["refiner.align.fc1.bias"].abs().max() < 1e-12  # BatchNorm removes it
    bn = model.refiner.align.bn
    assert rel_err(model.refiner.cache, ref["cache"]) < 1e-4
    assert rel_err(bn.running_mean, ref["running_mean"]) < 1e-4
    assert rel_err(bn.running_var, ref["running_var"]) < 1e-4
    assert bn.num_batches_tracked.item() == 1
    assert rel_err(model.eval()(x_eval), ref["eval_logits"]) < 1e-4


# ------------------------------------------------------------------------------ two ranks

def _two_rank_step(rank, init_file, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    clip = build_model(random_state_dict(CONFIGS["tiny"], seed=0))
    model = make_model(clip, seed=3).train()
    model.set_process_group(dist.group.WORLD)
    save_half_batch_step(model, rank, out_dir, images(4, seed=11), torch.tensor([2, 0, 4, 2]))
    dist.destroy_process_group()


def test_two_ranks_match_one_process_on_the_global_batch(clip, tmp_path):
    torch.multiprocessing.spawn(_two_rank_step, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    model = make_model(clip, seed=3).train()
    out = model(images(4, seed=11), torch.tensor([2, 0, 4, 2]))
    out["loss"].backward()
    torch.testing.assert_close((ranks[0]["loss"] + ranks[1]["loss"]) / 2, out["loss"].detach())
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    for name in grads:
        assert grad_err(ranks[0]["grads"], grads, name) < 1e-4, name
    for name, value in model.trainable_state_dict().items():  # cache and BN statistics
        assert torch.equal(ranks[0]["state"][name], ranks[1]["state"][name]), name
        torch.testing.assert_close(ranks[0]["state"][name], value, rtol=1e-5, atol=1e-6,
                                   msg=lambda message: f"{name}: {message}")
