"""clip_model: tokenizer against OpenAI's ids, both checkpoint formats, the SDPA forward
against an explicit float64 implementation of the equations written here from the raw
state dict, hyper-parameter inference on shapes only, and the loading errors."""
import hashlib
import json
import math
import os
import types
import warnings
from pathlib import Path

import pytest
import torch

import clip_model as cm
from helpers import ref_encode_image, ref_encode_text, save_torchscript_archive

HERE = Path(__file__).parent
CASES = json.loads((HERE / "tokenizer_cases.json").read_text(encoding="utf-8"))
TINY = cm.CONFIGS["tiny"]


@pytest.fixture(scope="module")
def state_dict():
    return cm.random_state_dict(TINY, seed=0)


@pytest.fixture(scope="module")
def model(state_dict):
    return cm.build_model(state_dict)


def images(batch=3, seed=1):
    R = TINY.image_resolution
    return torch.randn(batch, 3, R, R, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("case", CASES["cases"], ids=lambda c: repr(c["text"])[:40])
def test_tokenizer_matches_openai(case):
    row = cm.tokenize(case["text"])
    expected = [CASES["sot"], *case["ids"], CASES["eot"]]
    assert row.shape == (1, 77) and row.dtype == torch.long
    assert row[0, : len(expected)].tolist() == expected
    assert not row[0, len(expected) :].any()


def test_tokenize_batch_and_context_limit():
    texts = [c["text"] for c in CASES["cases"][:5]]
    assert torch.equal(cm.tokenize(texts), torch.cat([cm.tokenize(t) for t in texts]))
    assert cm.tokenize("x " * 75)[0, 76] == CASES["eot"]  # 75 ids + SOT + EOT fit exactly
    with pytest.raises(ValueError, match="x x x x"):
        cm.tokenize(["fine", "x " * 76])
    assert cm.tokenize("x " * 100, context_length=128).shape == (1, 128)


def test_curly_quotes_are_uncurled_like_ftfy():
    assert torch.equal(cm.tokenize("don\u2019t say \u201cdog\u201d"), cm.tokenize("don't say \"dog\""))


# ----------------------------------------------------------------------------- reference forward


def assert_rel_close(actual, expected, rtol=1e-5):
    assert actual.dtype == torch.float32 and actual.shape == expected.shape
    err = (actual.double() - expected).abs().max() / expected.abs().max()
    assert err <= rtol, f"relative error {err:.2e} > {rtol}"


PROMPTS = ["a photo of a dog.", "a photo of a Boeing 737-800, a type of aircraft.", "x", ""]


def test_image_tower_matches_equations(model, state_dict):
    imgs = images()
    with torch.no_grad():
        glob, tokens, cls_attn = model.encode_image(imgs, return_tokens=True)
        plain = model.encode_image(imgs)
    ref_glob, ref_tokens, ref_attn = ref_encode_image(state_dict, imgs)
    G = TINY.image_resolution // TINY.vision_patch_size
    assert tokens.shape == (3, G * G + 1, TINY.embed_dim) and cls_attn.shape == (3, G * G)
    assert_rel_close(glob, ref_glob)
    assert_rel_close(tokens, ref_tokens)
    assert_rel_close(cls_attn, ref_attn)
    assert_rel_close(plain, ref_glob)
    assert torch.equal(tokens[:, 0], glob)
    assert (cls_attn >= 0).all() and (cls_attn.sum(-1) <= 1).all()
    assert (cls_attn.sum(-1) < 1 - 1e-4).all()  # the CLS->CLS share was dropped, not renormalised
    assert ref_glob.std() > 0.1 and ref_tokens[:, 1:].std(1).min() > 0.01  # features not degenerate


def test_text_tower_matches_equations(model, state_dict):
    ids = cm.tokenize(PROMPTS)
    with torch.no_grad():
        out = model.encode_text(ids)
    assert out.shape == (len(PROMPTS), TINY.embed_dim)
    assert_rel_close(out, ref_encode_text(state_dict, ids))


def test_no_prompts_runs_the_unprompted_blocks_bitwise(model):
    """prompts=None is the plain tower: bitwise what the blocks give run one after another
    (the code path before deep prompts existed), with no prompt work."""
    imgs, ids = images(), cm.tokenize(PROMPTS)
    visual = model.visual
    with torch.no_grad():
        x = visual.conv1(imgs).flatten(2).transpose(1, 2)
        x = torch.cat([visual.class_embedding.expand(3, 1, -1), x], 1) + visual.positional_embedding
        x = visual.ln_pre(x)
        for block in visual.transformer.resblocks[:-1]:
            x, _ = block(x)
        x, cls_attn = visual.transformer.resblocks[-1](x, False, True)
        tokens = visual.ln_post(x) @ visual.proj
        for a, b in zip(model.encode_image(imgs, return_tokens=True, prompts=None), (tokens[:, 0], tokens, cls_attn)):
            assert torch.equal(a, b)
        assert torch.equal(model.encode_image(imgs, prompts=None), visual.ln_post(x[:, 0]) @ visual.proj)
        length = cm.text_length(ids)
        t = model.token_embedding(ids)[:, :length] + model.positional_embedding[:length]
        for block in model.transformer.resblocks:
            t, _ = block(t, True)
        t = model.ln_final(t[torch.arange(len(ids)), ids.argmax(-1)]) @ model.text_projection
        assert torch.equal(model.encode_text(ids), t)
        emb = model.token_embedding(ids)
        assert torch.equal(model.encode_prompts(emb, ids, deep_prompts=None), t)


@pytest.mark.parametrize("depth", [1, 2])
def test_image_tower_with_deep_prompts_matches_equations(model, state_dict, depth):
    """Deep visual prompts (depth, n, W) against the float64 equations, every output and
    the gradient path to the prompts."""
    n = 3
    prompts = (torch.randn(depth, n, TINY.vision_width, generator=torch.Generator().manual_seed(5)) * 0.5)
    imgs = images()
    prompts.requires_grad_(True)
    glob, tokens, cls_attn = model.encode_image(imgs, return_tokens=True, prompts=prompts)
    ref_glob, ref_tokens, ref_attn = ref_encode_image(state_dict, imgs, prompts.detach())
    G = TINY.image_resolution // TINY.vision_patch_size
    assert tokens.shape == (3, G * G + 1, TINY.embed_dim) and cls_attn.shape == (3, G * G)
    assert_rel_close(glob, ref_glob)
    assert_rel_close(tokens, ref_tokens)
    assert_rel_close(cls_attn, ref_attn)
    assert torch.equal(tokens[:, 0], glob)
    with torch.no_grad():
        assert_rel_close(model.encode_image(imgs, prompts=prompts), ref_glob)
        plain = ref_encode_image(state_dict, imgs)
    assert (ref_glob - plain[0]).abs().max() > 1e-3 * plain[0].abs().max()  # the prompts matter
    # the prompt keys took a share of the CLS softmax: patches sum to less than without them
    assert (cls_attn.sum(-1) < 1 - 1e-4).all()
    glob.sum().backward()
    assert prompts.grad.abs().sum(dim=(1, 2)).min() > 0  # every prompt row reaches the output


def test_text_tower_with_deep_prompts_matches_equations(model, state_dict):
    ids = cm.tokenize(["x x x x dog.", "x x x x a boeing 737-800, a type of aircraft."])
    g = torch.Generator().manual_seed(6)
    emb = model.token_embedding(ids).detach().clone()
    emb[:, 1:5] = torch.randn(4, TINY.transformer_width, generator=g) * 0.1  # learned context at the input
    deep = torch.randn(1, 4, TINY.transformer_width, generator=g) * 0.5  # block 1 (of 2)
    with torch.no_grad():
        out = model.encode_prompts(emb, ids, deep_prompts=deep)
        plain = model.encode_prompts(emb, ids)
    assert_rel_close(out, ref_encode_text(state_dict, ids, emb, deep))
    assert_rel_close(plain, ref_encode_text(state_dict, ids, emb))
    assert (out - plain).abs().max() > 1e-3 * plain.abs().max()
    with pytest.raises(ValueError, match="2 block prompts.*2 blocks"):
        model.encode_prompts(emb, ids, deep_prompts=torch.zeros(2, 4, TINY.transformer_width))
    with pytest.raises(ValueError, match="deep prompts must be"):
        model.encode_image(images(), prompts=torch.zeros(3, 4, TINY.vision_width))


def test_text_truncation_equals_full_length(model):
    """encode_prompts runs only up to the longest EOT; the model's own full 77-token pass agrees."""
    ids = cm.tokenize(PROMPTS)
    with torch.no_grad():
        x, _ = model.transformer(model.token_embedding(ids) + model.positional_embedding)  # (C, 77, W)
        full = model.ln_final(x[torch.arange(len(ids)), ids.argmax(-1)]) @ model.text_projection
        torch.testing.assert_close(model.encode_text(ids), full, rtol=1e-6, atol=1e-6)


def test_given_text_length(model):
    """A length computed in advance gives the same features; one that cuts off an EOT is refused."""
    ids = cm.tokenize(PROMPTS)
    length = cm.text_length(ids)
    assert length == int(ids.argmax(-1).max()) + 1
    with torch.no_grad():
        assert torch.equal(model.encode_text(ids, length=length), model.encode_text(ids))
        emb = model.token_embedding(ids)
        assert torch.equal(model.encode_prompts(emb, ids, length=length), model.encode_prompts(emb, ids))
        with pytest.raises(ValueError, match=f"length={length - 1} cuts off an EOT.*>= {length}"):
            model.encode_text(ids, length=length - 1)


def test_text_feature_is_the_eot_row(model):
    ids = cm.tokenize(PROMPTS)
    emb = model.token_embedding(ids).detach().requires_grad_(True)  # (C, 77, W)
    out = model.encode_prompts(emb, ids)
    out.sum().backward()
    eot = ids.argmax(-1)
    positions = torch.arange(77)
    # Gradients reach exactly the positions up to each prompt's EOT (causal mask, EOT row).
    assert torch.equal(emb.grad.abs().sum(-1) > 0, positions[None] <= eot[:, None])
    # Changing what comes after a prompt's EOT (inside the longest prompt's span) changes nothing.
    noisy = ids.clone()
    noisy[0, eot[0] + 1 : eot[1] + 1] = torch.randint(1, 49000, (int(eot[1] - eot[0]),))
    noisy[0, eot[1]] = 0  # keep argmax at the original EOT
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(noisy)[0], model.encode_text(ids)[0], rtol=1e-6, atol=1e-6)
        changed = ids.clone()
        changed[0, 1] = 1000  # before EOT: must matter
        assert not torch.allclose(model.encode_text(changed)[0], model.encode_text(ids)[0], atol=1e-4)


def test_bf16_autocast_forward(model):
    """The CUDA precision policy (bf16 autocast, fp32 parameters), exercised on CPU."""
    imgs, ids = images(), cm.tokenize(PROMPTS)
    with torch.no_grad():
        ref_glob, ref_tokens, ref_attn = model.encode_image(imgs, return_tokens=True)
        ref_text = model.encode_text(ids)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            glob, tokens, cls_attn = model.encode_image(imgs, return_tokens=True)
            text = model.encode_text(ids)
    assert cls_attn.dtype == torch.float32 and (cls_attn.sum(-1) <= 1 + 1e-6).all()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    for low, high in ((glob, ref_glob), (tokens, ref_tokens), (cls_attn, ref_attn), (text, ref_text)):
        torch.testing.assert_close(low.float(), high, rtol=0.1, atol=0.1 * high.abs().max().item())


def test_layer_norm_computes_in_fp32():
    ln = cm.LayerNorm(8)
    x = (torch.randn(4, 8) * 100 + 1000).to(torch.bfloat16)
    y = ln(x)
    assert y.dtype == torch.bfloat16
    expected = torch.nn.functional.layer_norm(x.float(), (8,), ln.weight, ln.bias).to(torch.bfloat16)
    assert torch.equal(y, expected)


# ----------------------------------------------------------------------------- file formats


def test_plain_state_dict_loads_exactly(state_dict, tmp_path):
    path = tmp_path / "tiny_state_dict.pt"
    torch.save(state_dict, path)
    clip = cm.load_clip(str(path))
    assert not clip.training and clip.config == TINY
    loaded = clip.state_dict()
    assert loaded.keys() == state_dict.keys()
    for k, v in loaded.items():
        assert v.dtype == torch.float32 and v.device.type == "cpu" and torch.equal(v, state_dict[k]), k


def test_torchscript_archive_matches_fp16_rounded_weights(state_dict, model, tmp_path):
    path = tmp_path / "tiny_jit.pt"
    save_torchscript_archive(state_dict, path)
    with warnings.catch_warnings():  # TorchScript is deprecated, yet it is OpenAI's format
        warnings.simplefilter("ignore", FutureWarning)
        raw = torch.jit.load(str(path), map_location="cpu").state_dict()
    assert set(raw) == set(state_dict) | {"input_resolution", "context_length", "vocab_size"}
    assert (int(raw["input_resolution"]), int(raw["context_length"]), int(raw["vocab_size"])) == (32, 77, 49408)
    assert all(raw[k].dtype == torch.float16 for k in state_dict)

    clip = cm.load_clip(str(path))
    rounded = cm.build_model({k: v.half() for k, v in state_dict.items()})
    assert not clip.training and all(p.dtype == torch.float32 for p in clip.parameters())
    imgs, ids = images(), cm.tokenize(PROMPTS)
    with torch.no_grad():
        for a, b in zip(clip.encode_image(imgs, return_tokens=True), rounded.encode_image(imgs, return_tokens=True)):
            assert torch.equal(a, b)
        assert torch.equal(clip.encode_text(ids), rounded.encode_text(ids))
        # ... and within fp16 weight rounding of the fp32 model.
        torch.testing.assert_close(clip.encode_text(ids), model.encode_text(ids), rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(clip.encode_image(imgs), model.encode_image(imgs), rtol=2e-2, atol=2e-2)


# ----------------------------------------------------------------------------- config inference

# Written out here, independently of clip_model: (D, resolution, vision layers, vision width,
# patch, text width, text layers) of OpenAI's released ViTs.
OFFICIAL = {
    "ViT-B/32": (512, 224, 12, 768, 32, 512, 12),
    "ViT-B/16": (512, 224, 12, 768, 16, 512, 12),
    "ViT-L/14": (768, 224, 24, 1024, 14, 768, 12),
    "ViT-L/14@336px": (768, 336, 24, 1024, 14, 768, 12),
}


def openai_shapes(D, R, VL, VW, P, TW, TL, context=77, vocab=49408):
    """OpenAI's ViT CLIP state-dict names and shapes."""
    G = R // P
    shapes = {
        "positional_embedding": (context, TW),
        "text_projection": (TW, D),
        "logit_scale": (),
        "visual.class_embedding": (VW,),
        "visual.positional_embedding": (G * G + 1, VW),
        "visual.proj": (VW, D),
        "visual.conv1.weight": (VW, 3, P, P),
        "token_embedding.weight": (vocab, TW),
    }
    for name, w in (("visual.ln_pre", VW), ("visual.ln_post", VW), ("ln_final", TW)):
        shapes.update({f"{name}.weight": (w,), f"{name}.bias": (w,)})
    for prefix, w, layers in (("visual.transformer", VW, VL), ("transformer", TW, TL)):
        for i in range(layers):
            p = f"{prefix}.resblocks.{i}"
            shapes.update({
                f"{p}.attn.in_proj_weight": (3 * w, w), f"{p}.attn.in_proj_bias": (3 * w,),
                f"{p}.attn.out_proj.weight": (w, w), f"{p}.attn.out_proj.bias": (w,),
                f"{p}.ln_1.weight": (w,), f"{p}.ln_1.bias": (w,), f"{p}.ln_2.weight": (w,), f"{p}.ln_2.bias": (w,),
                f"{p}.mlp.c_fc.weight": (4 * w, w), f"{p}.mlp.c_fc.bias": (4 * w,),
                f"{p}.mlp.c_proj.weight": (w, 4 * w), f"{p}.mlp.c_proj.bias": (w,),
            })
    return shapes


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_config_inference_on_shapes_only(name):
    D, R, VL, VW, P, TW, TL = OFFICIAL[name]
    expected = cm.CLIPConfig(D, R, VL, VW, P, 77, 49408, TW, TL)
    shapes = openai_shapes(*OFFICIAL[name])
    meta = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    meta.update(input_resolution=torch.tensor(R), context_length=torch.tensor(77), vocab_size=torch.tensor(49408))
    assert cm.config_from_state_dict(meta) == expected
    assert cm.config_from_state_dict({k: types.SimpleNamespace(shape=s) for k, s in shapes.items()}) == expected
    assert cm.CONFIGS[name] == expected
    # The module tree has exactly OpenAI's names and shapes, and a meta checkpoint builds strictly.
    clip = cm.build_model(meta)
    assert clip.config == expected
    assert {k: tuple(v.shape) for k, v in clip.state_dict().items()} == shapes
    assert all(p.is_meta for p in clip.parameters())


def test_random_state_dict_has_openai_layout():
    sd = cm.random_state_dict(TINY, seed=3)
    assert {k: tuple(v.shape) for k, v in sd.items()} == openai_shapes(64, 32, 2, 128, 8, 128, 2)
    assert all(v.dtype == torch.float32 for v in sd.values())
    assert math.isclose(sd["logit_scale"].item(), math.log(1 / 0.07), rel_tol=1e-6)
    assert torch.equal(sd["visual.proj"], cm.random_state_dict(TINY, seed=3)["visual.proj"])
    assert not torch.equal(sd["visual.proj"], cm.random_state_dict(TINY, seed=4)["visual.proj"])


# ----------------------------------------------------------------------------- download and errors


def make_remote(tmp_path, state_dict, sha=None):
    """A file:// 'server' holding <sha>/tiny.pt; sha defaults to the true checksum."""
    payload = tmp_path / "payload.pt"
    save_torchscript_archive(state_dict, payload)
    data = payload.read_bytes()
    sha = sha or hashlib.sha256(data).hexdigest()
    (tmp_path / "remote" / sha).mkdir(parents=True)
    (tmp_path / "remote" / sha / "tiny.pt").write_bytes(data)
    return (tmp_path / "remote").as_uri() + "/", sha, data


def test_download_checks_sha_and_renames_atomically(state_dict, tmp_path, monkeypatch):
    base, sha, data = make_remote(tmp_path, state_dict)
    root = tmp_path / "cache"
    renames = []
    real_replace = os.replace

    def checked_replace(src, dst):
        # The destination appears only by a rename of the complete temporary file.
        assert not os.path.exists(dst) and Path(src).parent == Path(dst).parent
        assert Path(src).read_bytes() == data
        renames.append(dst)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", checked_replace)
    monkeypatch.setitem(cm.MODELS, "tiny-remote", f"{sha}/tiny.pt")
    monkeypatch.setattr(cm, "MODEL_URL_BASE", base)
    clip = cm.load_clip("tiny-remote", download_root=str(root))
    assert renames == [str(root / "tiny.pt")] and os.listdir(root) == ["tiny.pt"]
    assert (root / "tiny.pt").read_bytes() == data
    assert clip.config == TINY
    cm.load_clip("tiny-remote", download_root=str(root))  # present and valid: no new download
    assert len(renames) == 1


def test_download_with_wrong_checksum_leaves_nothing(state_dict, tmp_path):
    base, sha, _ = make_remote(tmp_path, state_dict, sha="0" * 64)
    root = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="SHA-256"):
        cm.download(base + f"{sha}/tiny.pt", str(root))
    assert os.listdir(root) == []


def test_existing_file_with_wrong_checksum_is_an_error(tmp_path):
    (tmp_path / "ViT-B-16.pt").write_bytes(b"not the released weights")
    with pytest.raises(RuntimeError, match=r"ViT-B-16\.pt exists but its SHA-256 is .*expected 5806e77c"):
        cm.load_clip("ViT-B/16", download_root=str(tmp_path))
    assert (tmp_path / "ViT-B-16.pt").read_bytes() == b"not the released weights"


def test_resnet_checkpoint_is_refused(tmp_path):
    sd = {"visual.layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1), "visual.attnpool.c_proj.weight": torch.zeros(2, 2)}
    with pytest.raises(ValueError, match="ResNet.*ViT"):
        cm.config_from_state_dict(sd)
    torch.save(sd, tmp_path / "RN50.pt")
    with pytest.raises(ValueError, match="ResNet"):
        cm.load_clip(str(tmp_path / "RN50.pt"))


def test_bad_paths_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        cm.load_clip(str(tmp_path / "nope.pt"))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="notes.txt.*TorchScript archive or a torch.save'd state dict"):
        cm.load_clip(str(tmp_path / "notes.txt"))
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="list.pt.*dict of tensors"):
        cm.load_clip(str(tmp_path / "list.pt"))


def test_nonfinite_weights_are_refused_naming_the_file_and_tensor(state_dict, tmp_path):
    # NaN weights give NaN scores, which argmax reads as class 0: a silent chance-level model
    for key, value in (("visual.proj", float("nan")), ("ln_final.bias", float("inf"))):
        broken = {k: v.clone() for k, v in state_dict.items()}
        broken[key].view(-1)[3] = value
        torch.save(broken, tmp_path / "plain.pt")
        save_torchscript_archive(broken, tmp_path / "jit.pt")
        for name in ("plain.pt", "jit.pt"):
            with pytest.raises(ValueError, match=rf"{name}: tensor {key} holds NaN or inf values"):
                cm.load_clip(str(tmp_path / name))
