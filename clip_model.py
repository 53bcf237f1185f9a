"""CLIP (ViT image tower + causal text tower) in plain PyTorch, OpenAI weight loading and
OpenAI's byte-level BPE tokenizer, as TextRefiner needs them.

Parameter names are exactly OpenAI's, so a released checkpoint loads with strict=True and
every hyper-parameter is inferred from the state dict's names and shapes. One image
forward pass gives the global feature, all last-block tokens after ln_post @ proj, and
the last block's head-averaged CLS->patch attention row; every block runs
F.scaled_dot_product_attention and only the last one computes anything extra.

    import torch
    from clip_model import load_clip, tokenize

    clip = load_clip("ViT-B/16")            # ~/.cache/clip/ViT-B-16.pt, downloaded if absent
    clip = load_clip("/path/to/ViT-B-16.pt")  # OpenAI TorchScript archive or plain state dict
    images = torch.randn(2, 3, 224, 224)    # already CLIP-normalised
    image_features = clip.encode_image(images)                       # (2, 512)
    glob, tokens, cls_attn = clip.encode_image(images, return_tokens=True)
    # glob (2, 512), tokens (2, 197, 512) with tokens[:, 0] == glob, cls_attn (2, 196)
    text_features = clip.encode_text(tokenize(["a photo of a dog.", "a photo of a cat."]))

Tiny random weights for tests, benchmarks and `make demo`:

    from clip_model import CONFIGS, build_model, random_state_dict
    clip = build_model(random_state_dict(CONFIGS["tiny"], seed=0))
"""
import contextlib
import functools
import gzip
import hashlib
import html
import math
import os
import re
import sys
import tempfile
import unicodedata
import urllib.request
import warnings
import zipfile
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class CLIPConfig:
    embed_dim: int  # D
    image_resolution: int  # = patch * grid
    vision_layers: int
    vision_width: int
    vision_patch_size: int
    context_length: int
    vocab_size: int
    transformer_width: int  # W
    transformer_layers: int
    # heads = width // 64 in both towers


CONFIGS = {
    "ViT-B/32": CLIPConfig(512, 224, 12, 768, 32, 77, 49408, 512, 12),
    "ViT-B/16": CLIPConfig(512, 224, 12, 768, 16, 77, 49408, 512, 12),
    "ViT-L/14": CLIPConfig(768, 224, 24, 1024, 14, 77, 49408, 768, 12),
    "ViT-L/14@336px": CLIPConfig(768, 336, 24, 1024, 14, 77, 49408, 768, 12),
    # Random-weight model for tests and the demo: grid 4 (T = 17), 2 heads per tower.
    "tiny": CLIPConfig(64, 32, 2, 128, 8, 77, 49408, 128, 2),
    # A wider one standing in for ViT-L/14 as PromptKD's teacher (tests, the PromptKD demo):
    # same resolution as "tiny", embedding 96 vs 64 as ViT-L/14's 768 vs ViT-B/16's 512.
    "tiny-teacher": CLIPConfig(96, 32, 3, 192, 16, 77, 49408, 192, 3),
}

# "<sha256>/<file>" under MODEL_URL_BASE; the checksum in the URL is what the file must hash to.
MODELS = {
    "ViT-B/32": "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt",
    "ViT-B/16": "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt",
    "ViT-L/14": "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt",
    "ViT-L/14@336px": "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02/ViT-L-14-336px.pt",
}
MODEL_URL_BASE = "https://openaipublic.azureedge.net/clip/models/"
# Entries of OpenAI's TorchScript state dicts that are not parameters.
JIT_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")


# ----------------------------------------------------------------------------- model


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the activation dtype (bf16/fp16 autocast)."""

    def forward(self, x):
        weight, bias = self.weight.float(), self.bias.float()
        y = F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)
        return y.to(x.dtype)


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    """Multi-head self-attention with nn.MultiheadAttention's parameter names, run by SDPA."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x, causal=False, return_cls_attn=False):
        B, L, W = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # (B, L, 3W)
        hd = W // self.heads
        q, k, v = qkv.view(B, L, 3, self.heads, hd).permute(2, 0, 3, 1, 4)  # (B, H, L, hd) each
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # (B, H, L, hd)
        out = self.out_proj(out.transpose(1, 2).reshape(B, L, W))  # (B, L, W)
        if not return_cls_attn:
            return out, None
        # The one probability row TextRefiner needs (CLS query), recomputed on its own so
        # SDPA stays fused: softmax over all L keys in fp32, mean over heads, CLS column dropped.
        logits = q[:, :, :1] @ k.transpose(-2, -1) * k.shape[-1] ** -0.5  # (B, H, 1, L)
        probs = logits.float().softmax(dim=-1).mean(dim=1)  # (B, 1, L)
        return out, probs[:, 0, 1:]  # (B, L - 1)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.attn = Attention(width, heads)
        self.ln_1 = LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(c_fc=nn.Linear(width, 4 * width), gelu=QuickGELU(), c_proj=nn.Linear(4 * width, width))
        )
        self.ln_2 = LayerNorm(width)

    def forward(self, x, causal=False, return_cls_attn=False):
        a, cls_attn = self.attn(self.ln_1(x), causal, return_cls_attn)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, cls_attn


class Transformer(nn.Module):
    def __init__(self, width, layers, heads, causal):
        super().__init__()
        self.causal = causal
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads) for _ in range(layers)])

    def forward(self, x, return_cls_attn=False, block_prompts=None, prompt_start=1):
        """x (B, L, W) -> (B, L, W), and the last block's CLS attention row when asked.

        block_prompts (K, n, W), deep prompts (IVLP / VPT-deep): before block i (1 <= i <= K)
        the n tokens at positions prompt_start .. prompt_start + n - 1 are replaced by
        block_prompts[i - 1] (no positional embedding); the other blocks run on what the
        previous block wrote there.
        """
        if block_prompts is None:
            for block in self.resblocks[:-1]:
                x, _ = block(x, self.causal)
            return self.resblocks[-1](x, self.causal, return_cls_attn)
        k, n, _ = block_prompts.shape
        if k >= len(self.resblocks) or prompt_start < 0 or prompt_start + n > x.shape[1]:
            raise ValueError(f"Transformer: {k} block prompts of {n} tokens at position "
                             f"{prompt_start} do not fit {len(self.resblocks)} blocks of "
                             f"{x.shape[1]} tokens")
        last = len(self.resblocks) - 1
        for i, block in enumerate(self.resblocks):
            if 1 <= i <= k:
                prompts = block_prompts[i - 1].to(x.dtype).expand(x.shape[0], -1, -1)  # (B, n, W)
                x = torch.cat([x[:, :prompt_start], prompts, x[:, prompt_start + n:]], dim=1)
            x, cls_attn = block(x, self.causal, return_cls_attn and i == last)
        return x, cls_attn


class VisionTransformer(nn.Module):
    def __init__(self, resolution, patch_size, width, layers, output_dim):
        super().__init__()
        grid = resolution // patch_size
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(width))
        self.positional_embedding = nn.Parameter(torch.empty(grid * grid + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, width // 64, causal=False)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(torch.empty(width, output_dim))

    def forward(self, images, return_tokens=False, prompts=None):
        x = self.conv1(images.to(self.conv1.weight.dtype))  # (B, W, G, G)
        x = x.flatten(2).transpose(1, 2)  # (B, G*G, W)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (B, 1, W)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding  # (B, T, W)
        if prompts is None:
            x, cls_attn = self.transformer(self.ln_pre(x), return_cls_attn=return_tokens)
        else:
            x, cls_attn = self._prompted_blocks(x, prompts, return_tokens)
        if not return_tokens:
            return self.ln_post(x[:, 0]) @ self.proj  # (B, D)
        tokens = self.ln_post(x) @ self.proj  # (B, T, D)
        return tokens[:, 0], tokens, cls_attn

    def _prompted_blocks(self, x, prompts, return_cls_attn):
        """Deep visual prompts (depth, n, W): prompts[0] appended after the T image tokens
        (no positional embedding), prompts[i] replacing the last n tokens before block i.
        -> the last block's T image tokens (prompt tokens dropped) (B, T, W), and its CLS
        attention over the patches (B, T - 1): the softmax ran over all T + n keys; the
        prompt columns are dropped like the CLS one, without renormalisation."""
        depth, n, width = prompts.shape
        if depth < 1 or n < 1 or width != x.shape[-1] or depth > len(self.transformer.resblocks):
            raise ValueError(f"VisionTransformer: deep prompts must be (depth <= "
                             f"{len(self.transformer.resblocks)}, n >= 1, {x.shape[-1]}), got "
                             f"{tuple(prompts.shape)}")
        b, t, _ = x.shape
        x = torch.cat([x, prompts[0].to(x.dtype).expand(b, -1, -1)], dim=1)  # (B, T + n, W)
        x, cls_attn = self.transformer(
            self.ln_pre(x), return_cls_attn, block_prompts=prompts[1:], prompt_start=t
        )
        return x[:, :t], None if cls_attn is None else cls_attn[:, :t - 1]


class CLIP(nn.Module):
    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.config = config
        c = config
        self.visual = VisionTransformer(
            resolution=c.image_resolution,
            patch_size=c.vision_patch_size,
            width=c.vision_width,
            layers=c.vision_layers,
            output_dim=c.embed_dim,
        )
        self.transformer = Transformer(
            width=c.transformer_width,
            layers=c.transformer_layers,
            heads=c.transformer_width // 64,
            causal=True,
        )
        self.token_embedding = nn.Embedding(c.vocab_size, c.transformer_width)
        self.positional_embedding = nn.Parameter(torch.empty(c.context_length, c.transformer_width))
        self.ln_final = LayerNorm(c.transformer_width)
        self.text_projection = nn.Parameter(torch.empty(c.transformer_width, c.embed_dim))
        self.logit_scale = nn.Parameter(torch.empty(()))

    def encode_image(self, images, return_tokens=False, prompts=None):
        """images (B, 3, R, R) -> (B, D); or (global (B, D), tokens (B, T, D), cls_attn (B, G*G)).

        prompts (depth, n, vision width): deep visual prompts (IVLP / VPT-deep / PromptKD's
        student): prompts[0] is appended after the T image tokens without positional embedding
        and prompts[i] replaces the last n tokens before block i (1 <= i < depth). The outputs
        keep their shapes: the prompt tokens are dropped, and cls_attn is the CLS query's
        head-averaged softmax over all T + n keys at the patch columns (not renormalised).
        """
        return self.visual(images, return_tokens, prompts)

    def encode_prompts(self, prompt_embeddings, token_ids, length=None, deep_prompts=None):
        """prompt_embeddings (C, 77, W) without positional embedding, token_ids (C, 77) -> (C, D).

        deep_prompts (depth - 1, n, W): deep text prompts (IVLP / PromptSRC) replacing
        positions 1..n (the context the prompt embeddings carry at the input) before blocks
        1..depth-1.

        The row at each prompt's EOT (argmax id) only sees positions up to it (causal mask),
        so the class set runs truncated to its first `length` positions (same output, several
        times less work than all 77), by
        default text_length(token_ids). Callers that encode the same ids at every step pass
        that length, computed once: on CUDA ids computing it is a device-to-host sync. A
        given length is checked against CPU ids only, for the same reason.
        """
        if length is None:
            length = text_length(token_ids)
        elif token_ids.device.type == "cpu" and length < text_length(token_ids):
            raise ValueError(f"encode_prompts: length={length} cuts off an EOT token; these "
                             f"ids need length >= {text_length(token_ids)}")
        eot = token_ids.argmax(dim=-1)  # (C,)
        x = prompt_embeddings[:, :length] + self.positional_embedding[:length]  # (C, L, W)
        x, _ = self.transformer(x, block_prompts=deep_prompts, prompt_start=1)
        x = self.ln_final(x[torch.arange(x.shape[0], device=x.device), eot])  # (C, W)
        return x @ self.text_projection  # (C, D)

    def encode_text(self, token_ids, length=None):
        """token_ids (C, 77) from tokenize() -> (C, D); length as for encode_prompts."""
        return self.encode_prompts(self.token_embedding(token_ids), token_ids, length=length)


def text_length(token_ids):
    """The positions a text encoder must run for these (C, 77) ids: the last EOT (argmax
    id) position + 1. A host sync when the ids are on a GPU: compute it on CPU ids."""
    return int(token_ids.argmax(dim=-1).max()) + 1


# ----------------------------------------------------------------------------- state dicts


def _shape(state_dict, key):
    if key not in state_dict:
        raise ValueError(f"not a CLIP ViT state dict: key {key!r} is missing")
    return tuple(state_dict[key].shape)


def config_from_state_dict(state_dict) -> CLIPConfig:
    """Hyper-parameters from names and shapes only (values are never read: meta tensors work)."""
    keys = list(state_dict)
    if any(k.startswith("visual.layer1.") for k in keys):
        raise ValueError(
            "this is a ResNet CLIP checkpoint (visual.layer1...); TextRefiner needs the local "
            "(patch) tokens of a ViT image tower: use ViT-B/32, ViT-B/16, ViT-L/14 or "
            "ViT-L/14@336px"
        )
    conv = _shape(state_dict, "visual.conv1.weight")  # (width, 3, patch, patch)
    grid = round(math.sqrt(_shape(state_dict, "visual.positional_embedding")[0] - 1))
    vision_blocks = [k for k in keys if k.startswith("visual.transformer.resblocks.")]
    return CLIPConfig(
        embed_dim=_shape(state_dict, "text_projection")[1],
        image_resolution=conv[-1] * grid,
        vision_layers=sum(k.endswith(".attn.in_proj_weight") for k in vision_blocks),
        vision_width=conv[0],
        vision_patch_size=conv[-1],
        context_length=_shape(state_dict, "positional_embedding")[0],
        vocab_size=_shape(state_dict, "token_embedding.weight")[0],
        transformer_width=_shape(state_dict, "ln_final.weight")[0],
        transformer_layers=len({k.split(".")[2] for k in keys if k.startswith("transformer.resblocks.")}),
    )


def build_model(state_dict) -> CLIP:
    """CLIP with fp32 parameters in eval mode, from an OpenAI-named state dict (strict).

    The tensors become the parameters (assign=True): fp32 ones are used in place, not copied.
    """
    state_dict = {k: v for k, v in state_dict.items() if k not in JIT_EXTRA_KEYS}
    config = config_from_state_dict(state_dict)
    with torch.device("meta"):
        model = CLIP(config)
    model.load_state_dict({k: v.detach().to(torch.float32) for k, v in state_dict.items()}, strict=True, assign=True)
    return model.eval()


def random_state_dict(config: CLIPConfig, seed: int = 0) -> dict:
    """Random fp32 CLIP weights with OpenAI's names and shapes and OpenAI-like scales.

    Biases and LayerNorm affines are small random values rather than 0/1 so that a test
    comparing against an independent implementation also checks how they are used.
    """
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in CLIP(config).state_dict().items()}
    g = torch.Generator().manual_seed(seed)

    def std(key):
        tower_width = config.vision_width if key.startswith("visual.") else config.transformer_width
        layers = config.vision_layers if key.startswith("visual.") else config.transformer_layers
        if key.endswith("bias") or "ln_" in key or key == "token_embedding.weight":
            return 0.02
        if key == "positional_embedding":
            return 0.01
        if key.endswith(("attn.out_proj.weight", "mlp.c_proj.weight")):
            return tower_width**-0.5 * (2 * layers) ** -0.5
        if key.endswith("mlp.c_fc.weight"):
            return (2 * tower_width) ** -0.5
        # in_proj, conv1, class/positional embedding, proj, text_projection
        return tower_width**-0.5

    state_dict = {}
    for key, shape in shapes.items():
        if key == "logit_scale":
            state_dict[key] = torch.tensor(math.log(1 / 0.07))
            continue
        value = torch.randn(shape, generator=g) * std(key)
        if key.endswith(".weight") and "ln_" in key:
            value += 1.0  # LayerNorm gains around 1
        state_dict[key] = value
    return state_dict


# ----------------------------------------------------------------------------- loading


def sha256(path):
    """The file's SHA-256, hex."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def weights_sha256(name_or_path):
    """The SHA-256 of CLIP weights: an official name's from its URL (download checks the file
    against it), a file's from its bytes; None for anything else."""
    if name_or_path in MODELS:
        return MODELS[name_or_path].split("/")[0]
    return sha256(name_or_path) if os.path.isfile(name_or_path) else None


def download(url, download_root=None) -> str:
    """Fetch <...>/<sha256>/<file> into <download_root or ~/.cache/clip>/<file>; return its path.

    The file's SHA-256 must equal the one in the URL. A present file is checked, never
    silently trusted; a new one is written to a temporary file and renamed when it checks out.
    """
    sha, filename = url.rstrip("/").split("/")[-2:]
    root = os.path.expanduser(download_root or os.path.join("~", ".cache", "clip"))
    path = os.path.join(root, filename)
    if os.path.exists(path):
        found = sha256(path)
        if found != sha:
            raise RuntimeError(
                f"{path} exists but its SHA-256 is {found}, expected {sha} (from {url}); "
                "delete it to download it again"
            )
        return path
    os.makedirs(root, exist_ok=True)
    try:
        response = urllib.request.urlopen(url)
    except OSError as e:  # URLError is an OSError: no network, DNS, proxy, HTTP error
        reason = getattr(e, "reason", e)
        raise RuntimeError(
            f"cannot download {url} ({reason}); without internet access copy the file to {path}, "
            f"or pass the path of a local weights file instead of the name"
        ) from None
    fd, tmp = tempfile.mkstemp(dir=root, prefix=filename + ".", suffix=".part")
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as f, response:
            total, done = int(response.headers.get("Content-Length") or 0), 0
            while chunk := response.read(1 << 20):
                f.write(chunk)
                h.update(chunk)
                done += len(chunk)
                sys.stderr.write(f"\rdownloading {url}: {done / 2**20:.1f} / {total / 2**20:.1f} MiB")
            sys.stderr.write("\n")
        if h.hexdigest() != sha:
            raise RuntimeError(
                f"downloaded {url} has SHA-256 {h.hexdigest()}, expected {sha}; not saved"
            )
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def read_state_dict(path) -> dict:
    """An OpenAI TorchScript archive's or a torch.save'd state dict's tensors, on CPU."""
    expected = "an OpenAI CLIP TorchScript archive or a torch.save'd state dict (zip format)"
    if not os.path.isfile(path):
        names = ", ".join(MODELS)
        raise FileNotFoundError(
            f"{path}: no such file; expected an official model name ({names}) or {expected}"
        )
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: not a zip archive; expected {expected}")
    with zipfile.ZipFile(path) as z:
        is_torchscript = any(n.endswith("/constants.pkl") or "/code/" in n for n in z.namelist())
    try:
        if is_torchscript:
            with warnings.catch_warnings():  # OpenAI's released files are TorchScript
                warnings.simplefilter("ignore", FutureWarning)
                state_dict = torch.jit.load(path, map_location="cpu").state_dict()
        else:
            state_dict = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise ValueError(f"{path}: could not be read as {expected}: {e}") from e
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(f"{path}: holds a {type(state_dict).__name__}, expected a dict of tensors ({expected})")
    check_finite(state_dict, path)
    return state_dict


_kept = None  # {(path, size, mtime): CLIP} inside keep_loaded()


@contextlib.contextmanager
def keep_loaded():
    """Inside the block load_clip returns the model it loaded before for the same unchanged file (on
    whatever device it was moved to): tables.py's workers read each CLIP once, not once per job.
    Frozen models are shared this way; nothing may change their weights."""
    global _kept
    _kept = {}
    try:
        yield
    finally:
        _kept = None


def check_finite(tensors, source, error=ValueError):
    """error naming `source` and the first floating tensor of {name: tensor} holding NaN or inf:
    such weights turn every score into NaN, which argmax reads as class 0, and training fails an
    epoch later."""
    for name, value in tensors.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise error(f"{source}: tensor {name} holds NaN or inf values (a damaged file, or the "
                        f"weights of a run that diverged); use another file")


def load_clip(name_or_path, download_root=None) -> CLIP:
    """An official name (downloaded to download_root, default ~/.cache/clip) or a file path
    -> CLIP with fp32 parameters, eval mode, on CPU (or where keep_loaded's copy is)."""
    if name_or_path in MODELS:
        path = download(MODEL_URL_BASE + MODELS[name_or_path], download_root)
    else:
        path = os.fspath(name_or_path)
    if _kept is None:
        return build_model(read_state_dict(path))
    stat = os.stat(path)
    key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _kept:
        _kept[key] = build_model(read_state_dict(path))
    return _kept[key]


# ----------------------------------------------------------------------------- tokenizer

SOT, EOT = "<|startoftext|>", "<|endoftext|>"
_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
# ftfy's uncurl_quotes: U+2018-U+201B -> ', U+201C-U+201F -> "
_UNCURL = str.maketrans(
    dict.fromkeys("\u2018\u2019\u201a\u201b", "'") | dict.fromkeys("\u201c\u201d\u201e\u201f", '"')
)
VOCAB_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bpe_simple_vocab_16e6.txt.gz")


def _bytes_to_unicode():
    """Byte -> printable character, a bijection: printable Latin-1 bytes map to themselves,
    the rest to code points from 256 up, so BPE strings never hold whitespace/control chars."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = (b for b in range(256) if b not in keep)
    mapping = {b: chr(b) for b in keep}
    mapping.update({b: chr(256 + i) for i, b in enumerate(extra)})
    return mapping


def _category(ch):
    return unicodedata.category(ch)[0]  # "L" letter, "N" number, ...


def pre_tokenize(text):
    """OpenAI's pattern, written out: special tokens | 's 't 're 've 'm 'll 'd | letter runs |
    single digits | runs of other non-space characters (tried in that order at each position)."""
    pieces, i, n = [], 0, len(text)
    while i < n:
        ch = text[i]
        if ch.isspace():
            i += 1
            continue
        special = next((s for s in (SOT, EOT) if text.startswith(s, i)), None)
        contraction = next((c for c in _CONTRACTIONS if text.startswith(c, i)), None)
        if special or contraction:
            j = i + len(special or contraction)
        elif _category(ch) == "N":
            j = i + 1
        else:
            kind = _category(ch) == "L"  # a letter run, or a run of neither letters nor digits
            j = i + 1
            while j < n and not text[j].isspace() and _category(text[j]) != "N" and (_category(text[j]) == "L") == kind:
                j += 1
        pieces.append(text[i:j])
        i = j
    return pieces


class _Tokenizer:
    def __init__(self, vocab_path=VOCAB_PATH):
        with gzip.open(vocab_path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        # Line 0 is a version header; the vocabulary uses the first 49152 - 256 - 2 merges.
        merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
        self.byte_encoder = _bytes_to_unicode()
        symbols = list(self.byte_encoder.values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [SOT, EOT]
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.ranks = {pair: i for i, pair in enumerate(merges)}
        self.cache = {SOT: (SOT,), EOT: (EOT,)}

    def bpe(self, word):
        """A pre-token (byte-mapped) -> its BPE symbols: repeatedly merge the lowest-ranked pair."""
        if word in self.cache:
            return self.cache[word]
        symbols = (*word[:-1], word[-1] + "</w>")
        while len(symbols) > 1:
            pairs = set(zip(symbols, symbols[1:]))
            best = min(pairs, key=lambda p: self.ranks.get(p, math.inf))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = tuple(merged)
        self.cache[word] = symbols
        return symbols

    def encode(self, text):
        # OpenAI cleans with ftfy.fix_text first. We do its NFC normalisation and quote
        # uncurling (what ordinary prompts and class names meet), not its mojibake repair.
        text = unicodedata.normalize("NFC", text).translate(_UNCURL)
        text = html.unescape(html.unescape(text)).strip()
        text = re.sub(r"\s+", " ", text).strip().lower()
        ids = []
        for piece in pre_tokenize(text):
            word = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[s] for s in self.bpe(word))
        return ids


@functools.cache
def _tokenizer():
    return _Tokenizer()


def token_count(text) -> int:
    """BPE tokens of text, without SOT and EOT."""
    return len(_tokenizer().encode(text))


def tokenize(texts, context_length=77) -> torch.LongTensor:
    """str or list of str -> (N, context_length) ids: [SOT] ids [EOT], zero-padded."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    tok = _tokenizer()
    out = torch.zeros(len(texts), context_length, dtype=torch.long)
    for row, text in enumerate(texts):
        ids = [tok.encoder[SOT], *tok.encode(text), tok.encoder[EOT]]
        if len(ids) > context_length:
            raise ValueError(
                f"text {text!r} is {len(ids)} tokens with SOT/EOT, over the context length "
                f"{context_length}"
            )
        out[row, : len(ids)] = torch.tensor(ids)
    return out
