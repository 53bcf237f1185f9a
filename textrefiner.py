"""TextRefiner (AAAI 2025, "TextRefiner: Internal Visual Feature as Efficient Refiner for
Vision-Language Models Prompt Tuning", arXiv 2412.08176): a refiner any CLIP prompt learner plugs in.

The method. t = the L2-normalised class text features (C, D) of a prompt learner; a cache of M = 25
unit vectors (M, D); from ONE pass of the frozen image tower, the last block's tokens (B, T, D) (CLS
and patches, after ln_post @ proj) and the CLS query's head-averaged attention over the patches.

    refined = t + alpha * extractor([t, softmax(t cache^T) cache])   alpha 0.2, extractor Linear(2D, D, no bias)
    logits  = exp(logit_scale) * normalise(image feature) refined^T   (refined is not re-normalised)
    X       = align(tokens): Linear -> BatchNorm (statistics of all B*T tokens) -> ReLU -> Linear, token-wise
    local   = X at the CLS token, at the 5 patches of highest CLS attention, and the mean of X   (B, 7, D)
    loss    = CE(logits, y) + CE(exp(logit_scale) local t^T, y) / 50 + 20 * mean |normalise(refined) - t|
    cache   : after the step's forward, no gradient, fp32: each normalised aligned token x_n goes to its
              most similar slot a_n with weight exp(S[n, a_n] - max_n' S[n', a_n]), S = X^ cache^T; a slot
              that received tokens becomes 0.8 slot + 0.2 (weighted sum of its tokens); all rows renormalised.

At test time nothing is aligned or updated: `refined` depends on no image, so it is computed once per
evaluation. Trainable: align and extractor (1,050,624 values at D = 512); the cache is saved state.

Reading order: FeatureAlign and TextRefiner (the method, with `train_terms`, the refiner's share of a
training step); Recipe and PromptCLIP (what train.py, eval.py and bench.py need from any prompt
learner); then the hosts: CoOp + TextRefiner (TextRefinerCLIP), zero-shot CLIP, PromptKD +
TextRefiner (PromptKDCLIP with its PromptSRC teacher), and the prompt-learning family with
TextRefiner: CoCoOp, KgCoOp, IVLP, MaPLe, PromptSRC (each the official method with refiner=False);
METHODS maps --method names to them.

    import clip_model, textrefiner
    model = textrefiner.TextRefinerCLIP(clip_model.load_clip("ViT-B/16"), classnames)   # paper defaults
    model.train(); out = model(images, labels); out["loss"].backward()   # also updates the cache
    model.eval();  logits = model(images)                                # class features once
    model.set_classnames(new_classnames)                                 # base -> new
    torch.save(model.trainable_state_dict(), "ckpt.pt")                  # no CLIP weights

In your own prompt learner (t may also be per image, (B, C, D)):

    refiner = textrefiner.TextRefiner(embed_dim)
    glob, tokens, cls_attn = clip.encode_image(x, return_tokens=True)
    refined, local_logits, loss_reg = refiner.train_terms(t, tokens, cls_attn, scale)  # + cache update
    logits = scale * F.normalize(glob, dim=-1) @ refined.t()                 # at test: refiner.refine(t)
    loss = (F.cross_entropy(logits, y) + F.cross_entropy(local_logits.flatten(0, 1),
            y.repeat_interleave(local_logits.shape[1])) / 50 + 20 * loss_reg)

The refiner maths, the losses and the cache are fp32 even under autocast.
"""
import copy
import dataclasses
import math
import types
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import clip_model
import data
import released
from clip_model import text_length, tokenize
from data import UserError
from kernels import cache_update, feature_align


def fp32(tensor):
    """Context in which autocast is off on the tensor's device (refiner maths stays fp32)."""
    return torch.autocast(tensor.device.type, enabled=False)


def scaled_cosine_logits(logit_scale, image_features, class_features):
    """logit_scale.exp() * normalise(image_features) @ class_features^T: (B, D), (C, D) -> (B, C)
    fp32. class_features are used as given (normalised, or refined)."""
    with fp32(image_features):
        img = F.normalize(image_features.float(), dim=-1)
        return logit_scale.exp().float() * img @ class_features.t()

# ----------------------------------------------------------------------------- the method


class FeatureAlign(nn.Module):
    """Linear(dim, out_dim) -> BatchNorm1d(out_dim) -> ReLU -> Linear(out_dim, out_dim), row-wise
    (out_dim defaults to dim; PromptKD's align and image_proj widen 512 -> 768).

    Training uses batch statistics through kernels.feature_align (summed over the process group
    when one is set: SyncBatchNorm) and updates bn's running statistics as nn.BatchNorm1d does."""

    def __init__(self, dim, out_dim=None):
        super().__init__()
        out_dim = dim if out_dim is None else out_dim
        self.fc1 = nn.Linear(dim, out_dim)
        self.bn = nn.BatchNorm1d(out_dim)
        self.fc2 = nn.Linear(out_dim, out_dim)
        self.process_group = None

    def forward(self, x):  # (N, dim) -> (N, out_dim) fp32
        with fp32(x):
            x = x.float()
            if not self.training:
                return self.fc2(F.relu(self.bn(self.fc1(x))))  # bn in eval: running statistics
            y, mean, var = feature_align(x, self.fc1.weight, self.fc1.bias, self.bn.weight, self.bn.bias,
                                         self.fc2.weight, self.fc2.bias, eps=self.bn.eps,
                                         process_group=self.process_group)
            self._update_running_stats(mean.detach(), var.detach(), x.shape[0])
        return y

    @torch.no_grad()
    def _update_running_stats(self, mean, var, rows):
        """As nn.BatchNorm1d, except that a batch whose statistics are not finite (an fp16 overflow,
        a step the gradient scaler skips) leaves them as they were instead of poisoning them for
        good. mean/var are the group's, so every rank decides alike, on the device (no sync)."""
        if self.process_group is None:
            if rows < 2:
                raise ValueError(f"FeatureAlign: batch statistics need at least 2 tokens, got {rows}")
            n = float(rows)
        else:  # the global token count, summed on the device
            n = torch.full((), float(rows), device=mean.device)
            dist.all_reduce(n, op=dist.ReduceOp.SUM, group=self.process_group)
        finite = torch.isfinite(mean).all() & torch.isfinite(var).all()  # () bool
        momentum = self.bn.momentum
        running_mean, running_var = self.bn.running_mean, self.bn.running_var
        running_mean.copy_(torch.where(finite, (1 - momentum) * running_mean + momentum * mean, running_mean))
        unbiased = var * n / (n - 1)  # as BatchNorm1d
        running_var.copy_(torch.where(finite, (1 - momentum) * running_var + momentum * unbiased, running_var))
        self.bn.num_batches_tracked.add_(finite.long())


class TextRefiner(nn.Module):
    """Feature alignment, local cache and aggregation, for any prompt learner.

    embed_dim: the width of the text features refined (and of the cache); token_dim: the width of
    the image tokens aligned to it (default embed_dim; PromptKD: 512-d tokens, 768-d teacher text)."""

    def __init__(self, embed_dim, cache_size=25, alpha=0.2, momentum=0.8, topk=5, token_dim=None):
        super().__init__()
        if cache_size < 1 or topk < 1:
            raise ValueError(f"TextRefiner: cache_size and topk must be >= 1, got {cache_size}, {topk}")
        self.align = FeatureAlign(embed_dim if token_dim is None else token_dim, embed_dim)
        self.extractor = nn.Linear(2 * embed_dim, embed_dim, bias=False)
        # Not a parameter (no gradient), but persistent: every checkpoint carries it.
        self.register_buffer("cache", F.normalize(torch.rand(cache_size, embed_dim), dim=-1))  # (M, D)
        self.alpha, self.momentum, self.topk = alpha, momentum, topk
        self.process_group = None

    def set_process_group(self, group):
        """DDP: the alignment's BatchNorm statistics over `group` and the cache updates combined
        over it, so every rank computes what one process would on the global batch."""
        self.process_group = self.align.process_group = group

    def refine(self, text_features):
        """(..., D) class text features -> alpha * extractor([t, softmax(t cache^T) cache]) + t,
        t = normalise(text_features), row by row. Not re-normalised."""
        with fp32(text_features):
            t = F.normalize(text_features.float(), dim=-1)  # (..., D)
            # snapshot: the in-place cache update later in this step must not touch what autograd saved
            cache = self.cache.clone()  # (M, D)
            read = torch.softmax(t @ cache.t(), dim=-1) @ cache  # (..., D)
            return self.alpha * self.extractor(torch.cat([t, read], dim=-1)) + t

    def align_tokens(self, tokens):
        """(B, T, token_dim) last-block image tokens -> aligned tokens (B, T, D) fp32."""
        b, n, d = tokens.shape
        return self.align(tokens.reshape(b * n, d)).reshape(b, n, -1)

    def semantic_tokens(self, aligned, cls_attn):
        """CLS + the top-k patches by CLS attention + the mean of all tokens: (B, k+2, D)."""
        b, n, d = aligned.shape
        if cls_attn.shape != (b, n - 1):
            raise ValueError(f"TextRefiner.semantic_tokens: cls_attn must be ({b}, {n - 1}) for "
                             f"tokens {tuple(aligned.shape)}, got {tuple(cls_attn.shape)}")
        if self.topk > n - 1:
            raise ValueError(f"TextRefiner: topk={self.topk} exceeds the {n - 1} patch tokens")
        patches = cls_attn.float().topk(self.topk, dim=-1).indices + 1  # (B, k); +1 skips the CLS slot
        index = torch.cat([patches.new_zeros(b, 1), patches], dim=1)  # (B, k+1)
        picked = aligned.gather(1, index[:, :, None].expand(-1, -1, d))  # (B, k+1, D)
        return torch.cat([picked, aligned.mean(dim=1, keepdim=True)], dim=1)  # (B, k+2, D)

    @torch.no_grad()
    def update_cache(self, aligned_tokens):
        """Momentum update of the cache from this step's aligned tokens (B, T, D), combined over the
        process group when one is set (every rank holds the same cache). A batch with a non-finite
        token anywhere in the group leaves the cache unchanged."""
        tokens = aligned_tokens.detach().reshape(-1, aligned_tokens.shape[-1])  # (N, D)
        self.cache.copy_(cache_update(tokens, self.cache, momentum=self.momentum, process_group=self.process_group))

    def train_terms(self, t, tokens, cls_attn, scale):
        """The refiner's share of a training step, for any prompt learner.

        t: normalised class text features (C, D), or per image (B, C, D); tokens (B, T, token_dim)
        and cls_attn (B, T - 1) from clip.encode_image(x, return_tokens=True) (prompt tokens left
        out); scale = exp(logit_scale). -> (refined classifier like t, local logits (B, k+2, C) of the
        local tokens against the UNREFINED t, the L1 regulariser). Reads the cache, then updates it
        from this batch's aligned tokens."""
        with fp32(t):
            refined = self.refine(t)  # reads the cache before this step's update
            aligned = self.align_tokens(tokens)  # (B, T, D)
            local = self.semantic_tokens(aligned, cls_attn)  # (B, k+2, D)
            local_logits = scale * local @ t.float().transpose(-1, -2)  # (B, k+2, C)
            loss_reg = F.l1_loss(F.normalize(refined, dim=-1), t.float())
        self.update_cache(aligned)
        return refined, local_logits, loss_reg

# ----------------------------------------------------------------------------- the prompt-learner interface


# Ranges of recipe fields that train.RULES does not know: (test, what the value must be); NaN fails every test.
POSITIVE = (lambda v: v > 0 and math.isfinite(v), "positive")
NON_NEGATIVE = (lambda v: v >= 0 and math.isfinite(v), ">= 0")
FINITE = (math.isfinite, "a finite number")


@dataclass
class Recipe:
    """A method's hyper-parameters. train.py turns every field of every registered recipe into a
    flag --field-name; a flag left unset takes the --method's default; a resumed run must repeat
    them. A method's recipe subclasses this one, overrides defaults and adds its own fields."""
    epochs: int = 10
    batch_size: int = 32  # global, split across the ranks
    lr: float = 0.002
    momentum: float = 0.9
    weight_decay: float = 5e-4  # on every trainable tensor
    warmup_epochs: int = 1  # at warmup_lr, then cosine from lr, stepped once per epoch
    warmup_lr: float = 1e-5
    selection: str = "best"  # best: the epoch of best accuracy on the selection split is tested; last
    # Fields that name weights the model is built from besides --clip: recorded with their SHA-256
    # when they are files, and eval.py takes them as flags (default: the run's).
    inputs: ClassVar[tuple] = ()
    xd: ClassVar[dict] = {}  # the cross-dataset protocol's values (train.py --xd), where they differ
    ranges: ClassVar[dict] = {}  # {field: (test, what it must be)} for fields train.RULES does not know

    def for_dataset(self, dataset):
        """Defaults that depend on the dataset (fields still None); this recipe otherwise."""
        return self


def _state_key(module):
    """A key that changes whenever a tensor the module holds outside its frozen CLIPs changes (an
    in-place write bumps _version; set_classnames and .to() make new tensors), or a refiner's alpha."""
    key, skipped = [], ()
    for name, sub in module.named_modules():  # parents before their children
        if isinstance(sub, clip_model.CLIP):
            skipped += (name + ".",)
        if isinstance(sub, clip_model.CLIP) or name.startswith(skipped):
            continue
        for t in [*sub.parameters(recurse=False), *sub.buffers(recurse=False)]:
            key.append((id(t), t._version, t.data_ptr(), t.device, t.dtype))
        if isinstance(sub, TextRefiner):
            key.append(sub.alpha)
    return tuple(key)


def _autocast_key(device):
    return torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type)


class PromptCLIP(nn.Module):
    """What train.py, eval.py and bench.py need from a prompt learner on a frozen CLIP.

    A subclass sets `recipe` (its Recipe dataclass) and writes build, train_forward and
    class_features; image_features and logits have defaults for a frozen image tower. Evaluation
    computes class_features() once and reuses it until a tensor of the model (outside its frozen
    CLIPs) or the autocast setting changes."""
    recipe = Recipe
    loss_keys = ("loss",)  # train_forward's entries that train.py logs, "loss" first
    frozen_image_features = True  # image_features() reads no trained tensor: eval may reuse them
    transductive = False  # trains on the unlabelled images of every class; selection on the test split
    frozen = ("clip",)  # submodules kept frozen and in eval mode, outside trainable_state_dict
    title = None  # the report's name of the method (None: the class name)
    # The report's published numbers: note, base2new {row: (base, new, HM)}, and optionally
    # base2new_datasets (column tag, {dataset: (base, new, HM)}), xd (tag, {dataset: accuracy}), xd_note.
    published = {}

    def __init__(self, clip):
        super().__init__()
        self.clip = clip.requires_grad_(False).eval()
        self._classifier = None  # (key, class features) of the last evaluation

    @classmethod
    def build(cls, clip, classnames, args):
        """The model for the run's flags (recipe fields included) on `clip`."""
        raise NotImplementedError

    @classmethod
    def prepare(cls, args, classnames):
        """Checks and resolves the run's flags before any weights load, given every class name the
        run will meet (base and new): UserError for what cannot work. Default: nothing."""

    @classmethod
    def check_clip(cls, clip, args):
        """The run's flags against --clip once it has loaded, before any training: UserError naming the
        flag. Default: TextRefiner's --topk within the image tower's patch tokens. -> clip."""
        patches = (clip.config.image_resolution // clip.config.vision_patch_size) ** 2
        if not getattr(args, "no_refiner", True) and getattr(args, "topk", 0) > patches:
            raise UserError(f"--topk {args.topk}: the image tower of --clip has {patches} patch tokens; pass at most "
                            f"{patches}")
        return clip

    @classmethod
    def benchmark_models(cls, clip, classnames, args):
        """{name: model} that bench.py times on random weights, interleaved: the method with
        TextRefiner, then without (the targets compare these two); any further model is compared
        with the first. Default: build() with and without the refiner."""
        title = cls.title or cls.__name__
        return {f"{title}+TextRefiner": cls.build(clip, classnames, types.SimpleNamespace(**{**vars(args), "no_refiner": False})),
                title: cls.build(clip, classnames, types.SimpleNamespace(**{**vars(args), "no_refiner": True}))}

    def train_forward(self, images, labels):
        """-> dict with "loss", the other loss_keys and "logits" (B, C)."""
        raise NotImplementedError

    def image_features(self, images):
        """(B, 3, R, R) -> (B, D), not normalised: by default the frozen tower's global feature."""
        return self.clip.encode_image(images)

    def class_features(self):
        """(C, D) what the eval logits compare against (normalised or refined)."""
        raise NotImplementedError

    def logits(self, image_features):
        """Eval logits (B, C): exp(logit_scale) * normalise(image_features) @ class_features()^T, the
        class features computed once per evaluation (recomputed when the model's state changes)."""
        key = (_state_key(self), _autocast_key(image_features.device))
        if self._classifier is None or self._classifier[0] != key:
            with torch.no_grad():
                self._classifier = (key, self.class_features())
        return scaled_cosine_logits(self.clip.logit_scale, image_features, self._classifier[1])

    def forward(self, images, labels=None):
        if self.training:
            return self.train_forward(images, labels)
        return self.logits(self.image_features(images))

    def set_classnames(self, classnames):
        """Subclasses rebuild their class prompts for `classnames`, then call this."""
        self._classifier = None

    def epoch_end(self, epoch, epochs):
        """Called by the training loop after the steps of epoch `epoch` (0-based) of `epochs`, before
        validation and the checkpoint: state it changes is saved with that epoch. Default: nothing."""

    def set_process_group(self, group):
        """DDP: every BatchNorm statistic and cache update of the model over `group`."""
        for module in self.modules():
            if isinstance(module, (FeatureAlign, TextRefiner)):
                module.process_group = group

    def train(self, mode=True):
        super().train(mode)
        for name in self.frozen:
            getattr(self, name).eval()
        return self

    def trainable_state_dict(self):
        """Every state-dict entry outside the frozen submodules: the checkpoint's model."""
        return {k: v for k, v in self.state_dict().items() if k.split(".")[0] not in self.frozen}

    def load_trainable_state_dict(self, state_dict):
        """Strict: the names and shapes of trainable_state_dict()."""
        own, name = self.trainable_state_dict(), type(self).__name__
        missing, unexpected = sorted(own.keys() - state_dict.keys()), sorted(state_dict.keys() - own.keys())
        hosts = [{k.split(".")[0] for k in keys} - {"refiner"} for keys in (own, state_dict)]
        if all(hosts) and hosts[0].isdisjoint(hosts[1]):  # not even the prompt learner's names
            raise ValueError(f"{name}.load_trainable_state_dict: not a {name} checkpoint: its {', '.join(unexpected[:3])}, "
                             f"... are not the model's ({', '.join(sorted(own)[:3])}, ...): another method's?")
        mismatched = [f"{k}: checkpoint {tuple(state_dict[k].shape)}, model {tuple(own[k].shape)}"
                      for k in sorted(own.keys() & state_dict.keys()) if state_dict[k].shape != own[k].shape]
        if missing or unexpected or mismatched:
            raise ValueError(f"{name}.load_trainable_state_dict: state dict does not match the "
                             f"model; missing keys {missing}, unexpected keys {unexpected}, shape mismatches "
                             f"{mismatched}")
        with torch.no_grad():
            for name, tensor in own.items():
                tensor.copy_(state_dict[name])

# ----------------------------------------------------------------------------- CoOp + TextRefiner


@dataclass
class RefinerRecipe(Recipe):
    """TextRefiner's hyper-parameters, shared by its hosts."""
    cache_size: int = 25
    alpha: float = 0.2
    cache_momentum: float = 0.8
    topk: int = 5


def refiner_from(args, embed_dim, token_dim=None):
    """The run's TextRefiner, or None with --no-refiner."""
    if args.no_refiner:
        return None
    return TextRefiner(embed_dim, args.cache_size, args.alpha, args.cache_momentum, args.topk, token_dim=token_dim)


CLASS_TOKEN_POSITIONS = ("end", "middle", "front")


class PromptLearner(nn.Module):
    """CoOp's context vectors shared by all classes: "[SOT] ctx_1..ctx_n {class name}. [EOT]".

    ctx_init: a phrase whose first n_ctx token embeddings initialise the context; tokens past n_ctx
    stay fixed words before the class name (MaPLe's n_ctx 2: "a photo" trained, "of a" fixed; class
    name at the end only); "" -> N(0, 0.02^2) vectors with the text prefix "X X ... X".
    class_token_position: where the class name goes (CoOp's end, middle or front). text_length: the
    positions the text encoder must run for these prompts, computed once per class set from the CPU ids."""

    def __init__(self, clip, classnames, n_ctx=4, ctx_init="a photo of a", class_token_position="end"):
        super().__init__()
        if class_token_position not in CLASS_TOKEN_POSITIONS:
            raise ValueError(f"PromptLearner: class_token_position must be one of "
                             f"{CLASS_TOKEN_POSITIONS}, got {class_token_position!r}")
        # A reference, not a submodule: CLIP's frozen table stays out of this state dict.
        object.__setattr__(self, "token_embedding", clip.token_embedding)
        self.context_length = clip.config.context_length
        if ctx_init:
            ctx_init = ctx_init.replace("_", " ")
            ids = tokenize(ctx_init, self.context_length)  # (1, 77)
            init_len = int(ids.argmax(dim=-1)) - 1  # tokens between SOT and EOT
            if not 1 <= n_ctx <= init_len or (n_ctx < init_len and class_token_position != "end"):
                raise ValueError(f"PromptLearner: ctx_init {ctx_init!r} is {init_len} tokens but "
                                 f"n_ctx={n_ctx}; pass n_ctx={init_len} (or fewer, class token at the end) "
                                 f"or ctx_init=''")
            with torch.no_grad():
                ctx = self.token_embedding(ids.to(self.token_embedding.weight.device))[0, 1:1 + n_ctx]
            self.prompt_prefix = ctx_init
        else:
            if n_ctx < 1:
                raise ValueError(f"PromptLearner: n_ctx must be >= 1, got {n_ctx}")
            ctx = torch.empty(n_ctx, self.token_embedding.weight.shape[1]).normal_(std=0.02)
            self.prompt_prefix = " ".join(["X"] * n_ctx)
        self.n_ctx = n_ctx
        self.class_token_position = class_token_position
        self.ctx = nn.Parameter(ctx.detach().clone().float())  # (n_ctx, W)
        self.set_classnames(classnames)

    def set_classnames(self, classnames):
        if len(classnames) == 0:
            raise ValueError("PromptLearner.set_classnames: need at least one class name")
        names = [name.replace("_", " ") for name in classnames]
        ids = tokenize([f"{self.prompt_prefix} {name}." for name in names], self.context_length)  # (C, 77)
        self.text_length = text_length(ids)  # the EOT positions are the same in every layout
        with torch.no_grad():
            embedded = self.token_embedding(ids.to(self.token_embedding.weight.device))  # (C, 77, W)
        embedded = embedded.to(self.ctx.device)
        # Non-persistent: rebuilt from the class names, never part of a checkpoint.
        self.register_buffer("token_ids", ids.to(self.ctx.device), persistent=False)
        self.register_buffer("token_prefix", embedded[:, :1].clone(), persistent=False)  # SOT
        self.register_buffer("token_suffix", embedded[:, 1 + self.n_ctx:].clone(), persistent=False)
        self.register_buffer("order", self._order(tokenize(names, self.context_length)), persistent=False)

    def _order(self, name_ids):
        """(C, 77) gather index from the "end" layout (SOT, ctx, name, rest) to the chosen one."""
        if self.class_token_position == "end":
            return None
        n, half = self.n_ctx, self.n_ctx // 2
        rows = []
        for name_len in (name_ids.argmax(dim=-1) - 1).tolist():
            ctx_pos = list(range(1, 1 + n))
            name_pos = list(range(1 + n, 1 + n + name_len))
            rest = list(range(1 + n + name_len, self.context_length))
            if self.class_token_position == "front":
                rows.append([0] + name_pos + ctx_pos + rest)
            else:  # middle
                rows.append([0] + ctx_pos[:half] + name_pos + ctx_pos[half:] + rest)
        return torch.tensor(rows, device=self.ctx.device)

    def forward(self):
        """-> (prompt embeddings (C, 77, W) without positional embedding, token ids (C, 77))."""
        num_classes = self.token_prefix.shape[0]
        ctx = self.ctx.to(self.token_prefix.dtype).unsqueeze(0).expand(num_classes, -1, -1)  # (C, n_ctx, W)
        prompts = torch.cat([self.token_prefix, ctx, self.token_suffix], dim=1)  # (C, 77, W)
        if self.order is not None:
            prompts = prompts.gather(1, self.order[:, :, None].expand_as(prompts))
        return prompts, self.token_ids


def longest_prompt(prompt, classnames):
    """(class name, token count with SOT and EOT) of the longest prompt(name) over classnames, "_" read as " "."""
    def length(name):
        return clip_model.token_count(prompt(name.replace("_", " "))) + 2
    longest = max(classnames, key=length)
    return longest, length(longest)


def prompt_text_features(clip, prompt_learner, deep_prompts=None):
    """Normalised class features (C, D) fp32 of a PromptLearner's class prompts, with deep text prompts
    (depth - 1, n_ctx, W) when given; with the graph to the prompts when grad is on."""
    prompts, ids = prompt_learner()
    # a length known in advance: finding it on the device ids would sync every step
    text = clip.encode_prompts(prompts, ids, length=prompt_learner.text_length, deep_prompts=deep_prompts)  # (C, D)
    with fp32(text):
        return F.normalize(text.float(), dim=-1)


def check_prompts(classnames, n_ctx, ctx_init, context_length=77, class_token_position="end"):
    """UserError naming the flag when a class prompt "<context> <class name>." cannot be built:
    --ctx-init of fewer tokens than --n-ctx (more: the rest stay fixed words, class token at the end
    only), or a prompt over CLIP's 77 tokens."""
    tokens = clip_model.token_count
    prefix = ctx_init.replace("_", " ") if ctx_init else " ".join(["X"] * n_ctx)
    if ctx_init and tokens(prefix) < n_ctx:
        raise UserError(f"--ctx-init {ctx_init!r} is {tokens(prefix)} tokens but --n-ctx is {n_ctx}: "
                        f"make them agree, or pass --ctx-init \"\" for random context")
    if ctx_init and tokens(prefix) > n_ctx and class_token_position != "end":
        raise UserError(f"--n-ctx {n_ctx} trains the first {n_ctx} of the {tokens(prefix)} tokens of --ctx-init "
                        f"{ctx_init!r}, which needs --class-token-position end")
    longest, length = longest_prompt(lambda name: f"{prefix} {name}.", classnames)
    if length > context_length:
        raise UserError(f"--n-ctx {n_ctx}: the prompt of class {longest!r} is {length} tokens, over CLIP's "
                        f"{context_length}; lower --n-ctx")


@dataclass
class ContextRecipe(RefinerRecipe):
    """A host with CoOp's text context, trained with labels: TextRefiner's terms weighted as on CoOp."""
    n_ctx: int = 4  # text context tokens
    ctx_init: str = "a photo of a"  # "" for random context vectors
    semantic_weight: float = 0.02  # the local CE, 1/50
    reg_weight: float = 20.0  # the L1 regulariser


@dataclass
class CoOpRecipe(ContextRecipe):
    """CoOp + TextRefiner, the paper's scripts: ViT-B/16, 16 shots, best-val model."""
    class_token_position: str = "end"
    xd: ClassVar[dict] = dict(selection="last")  # trained on ImageNet, the targets tested with the last epoch


def image_pass(model, images, prompts=None):
    """The model's image tower: (global feature (B, D), tokens (B, T, D), cls_attn (B, T - 1)), the last
    two only when the model has a refiner (else None). Unprompted, nothing in the tower trains: no graph."""
    with torch.no_grad() if prompts is None else nullcontext():
        if model.refiner is None:
            return model.clip.encode_image(images, prompts=prompts), None, None
        return model.clip.encode_image(images, return_tokens=True, prompts=prompts)


def class_logits(scale, image, classes):
    """scale * image @ classes^T: normalised images (B, D) against classes (C, D), or each image against
    its own classes (B, C, D) -> (B, C)."""
    if classes.dim() == 2:
        return scale * image @ classes.t()
    return scale * torch.einsum("bd,bcd->bc", image, classes)


def refined_ce(model, t, image, labels, tokens, cls_attn):
    """A training step's terms for a host classified with cross-entropy: t the normalised class features
    (C, D), or per image (B, C, D); image the global features (B, D); with model.refiner the logits
    use the refined classifier and TextRefiner's local CE and L1 are added with model.semantic_weight
    and model.reg_weight (updates the cache). -> loss, loss_global, loss_local, loss_reg, logits (B, C)."""
    if labels is None:
        raise ValueError(f"{type(model).__name__}.forward: labels are required in training mode")
    with fp32(t):
        image = F.normalize(image.float(), dim=-1)  # (B, D)
        scale = model.clip.logit_scale.exp().float()
        if model.refiner is None:
            logits = class_logits(scale, image, t)  # (B, C)
            loss = F.cross_entropy(logits, labels)
            zero = loss.new_zeros(())
            return dict(loss=loss, loss_global=loss, loss_local=zero, loss_reg=zero, logits=logits)
        refined, local_logits, loss_reg = model.refiner.train_terms(t, tokens, cls_attn, scale)
        logits = class_logits(scale, image, refined)  # (B, C)
        loss_global = F.cross_entropy(logits, labels)
        loss_local = F.cross_entropy(local_logits.flatten(0, 1), labels.repeat_interleave(local_logits.shape[1]))
        loss = loss_global + model.semantic_weight * loss_local + model.reg_weight * loss_reg
    return dict(loss=loss, loss_global=loss_global, loss_local=loss_local, loss_reg=loss_reg, logits=logits)


class ContextCLIP(PromptCLIP):
    """What CoOp, CoCoOp, IVLP, MaPLe and PromptSRC share: CoOp's text context (PromptLearner: "a photo of a
    {name}.", its first n_ctx tokens trained), a refiner (True: TextRefiner's defaults, a TextRefiner,
    or False: the host alone) and TextRefiner's weights on a host trained with cross-entropy."""
    loss_keys = ("loss", "loss_global", "loss_local", "loss_reg")

    def __init__(self, clip, classnames, n_ctx=4, ctx_init="a photo of a", refiner=True, semantic_weight=1 / 50,
                 reg_weight=20.0, class_token_position="end"):
        super().__init__(clip)
        self.prompt_learner = PromptLearner(clip, classnames, n_ctx, ctx_init, class_token_position)
        self.refiner = TextRefiner(clip.config.embed_dim) if refiner is True else refiner or None
        self.semantic_weight, self.reg_weight = semantic_weight, reg_weight

    @classmethod
    def build(cls, clip, classnames, args):
        return cls(clip, classnames, **cls.options(clip, args))

    @classmethod
    def options(cls, clip, args):
        """The constructor's keyword arguments for the run's flags on `clip`."""
        return dict(n_ctx=args.n_ctx, ctx_init=args.ctx_init, refiner=refiner_from(args, clip.config.embed_dim),
                    semantic_weight=args.semantic_weight, reg_weight=args.reg_weight)

    @classmethod
    def prepare(cls, args, classnames):
        check_prompts(classnames, args.n_ctx, args.ctx_init)

    def set_classnames(self, classnames):
        self.prompt_learner.set_classnames(classnames)
        super().set_classnames(classnames)


class TextRefinerCLIP(ContextCLIP):
    """Frozen CLIP + CoOp prompt learner + TextRefiner; refiner=False is plain CoOp.

    Evaluation uses only the image tower's global feature, and nothing trained reaches it
    (frozen_image_features), so an evaluation loop may compute image_features once per image."""
    recipe = CoOpRecipe
    title = "CoOp"
    published = dict(note="Published 11-dataset averages (ViT-B/16, 16 shots, seeds 1-3):",
                     base2new={"CoOp": (82.69, 63.22, 71.66), "CoOp+TextRefiner": (79.74, 74.32, 76.94)})

    def __init__(self, clip, classnames, n_ctx=4, ctx_init="a photo of a", cache_size=25, alpha=0.2, momentum=0.8,
                 topk=5, semantic_weight=1 / 50, reg_weight=20.0, refiner=True, class_token_position="end"):
        super().__init__(clip, classnames, n_ctx, ctx_init, False, semantic_weight, reg_weight, class_token_position)
        # after the prompt learner: a random context (ctx_init "") is drawn before the refiner's weights
        self.refiner = TextRefiner(clip.config.embed_dim, cache_size, alpha, momentum, topk) if refiner else None

    @classmethod
    def options(cls, clip, args):
        return dict(n_ctx=args.n_ctx, ctx_init=args.ctx_init, cache_size=args.cache_size, alpha=args.alpha,
                    momentum=args.cache_momentum, topk=args.topk, semantic_weight=args.semantic_weight,
                    reg_weight=args.reg_weight, refiner=not args.no_refiner,
                    class_token_position=args.class_token_position)

    @classmethod
    def prepare(cls, args, classnames):
        check_prompts(classnames, args.n_ctx, args.ctx_init, class_token_position=args.class_token_position)

    @classmethod
    def benchmark_models(cls, clip, classnames, args):
        """CoOp with and without TextRefiner, and zero-shot CLIP (the same evaluation cost as CoOp)."""
        return {**super().benchmark_models(clip, classnames, args), "zero-shot CLIP": ZeroShotCLIP(clip, classnames)}

    def text_features(self):
        """Normalised class text features (C, D) fp32, with the graph to ctx when grad is on."""
        return prompt_text_features(self.clip, self.prompt_learner)

    def class_features(self):
        t = self.text_features()
        return t if self.refiner is None else self.refiner.refine(t)

    def train_forward(self, images, labels):
        image, tokens, cls_attn = image_pass(self, images)
        return refined_ce(self, self.text_features(), image, labels, tokens, cls_attn)


class ZeroShotCLIP(PromptCLIP):
    """CLIP zero-shot classifier with CoOp's hand-crafted prompt for `dataset`."""

    def __init__(self, clip, classnames, dataset=None):
        super().__init__(clip)
        if dataset is not None and dataset not in data.DATASETS:
            raise ValueError(f"ZeroShotCLIP: unknown dataset {dataset!r}; expected one of "
                             f"{sorted(data.DATASETS)} or None")
        self.template = data.DATASETS[dataset].template if dataset else "a photo of a {}."
        self.set_classnames(classnames)

    @classmethod
    def prepare(cls, args, classnames):
        """The prompts of `classnames` fit CLIP's 77 tokens (eval.py --zeroshot, before CLIP loads)."""
        template = data.DATASETS[args.dataset].template
        longest, length = longest_prompt(template.format, classnames)
        if length > 77:
            raise UserError(f"--zeroshot: the prompt {template!r} of class {longest!r} (--dataset {args.dataset}) is "
                            f"{length} tokens, over CLIP's 77")

    def forward(self, images, labels=None):
        return self.logits(self.image_features(images))  # nothing to train: logits in either mode

    def set_classnames(self, classnames):
        if len(classnames) == 0:
            raise ValueError("ZeroShotCLIP.set_classnames: need at least one class name")
        prompts = [self.template.format(name.replace("_", " ")) for name in classnames]
        ids = tokenize(prompts, self.clip.config.context_length)  # (C, 77)
        self.text_length = text_length(ids)  # from the CPU ids: no device sync
        self.register_buffer("token_ids", ids.to(self.clip.logit_scale.device), persistent=False)
        super().set_classnames(classnames)

    def class_features(self):
        text = self.clip.encode_text(self.token_ids, length=self.text_length)  # (C, D)
        with fp32(text):
            return F.normalize(text.float(), dim=-1)

# ----------------------------------------------------------------------------- PromptKD + TextRefiner


class PromptSRCTeacher(nn.Module):
    """PromptKD's frozen teacher: a CLIP (ViT-L/14) with PromptSRC / IVLP deep prompts in both
    towers. forward(images) -> exp(logit_scale) * normalise(v_T) t_T^T (B, n); the class features
    t_T are computed once per class set, not per batch. Build it with from_checkpoint."""

    def __init__(self, clip, ctx, text_prompts, visual_prompts, classnames):
        """clip: the teacher CLIP with the file's weights; ctx (n, W_text) the text context at the
        input; text_prompts (depth_text - 1, n, W_text) for text blocks 1..; visual_prompts
        (depth_vision, n_vision, W_vision) as CLIP.encode_image takes them."""
        super().__init__()
        self.clip = clip.requires_grad_(False).eval()
        n_ctx = ctx.shape[0]
        # "X X X X {name}.": only the token layout matters, the loaded ctx replaces positions 1..n
        self.prompt_learner = PromptLearner(clip, classnames, n_ctx=n_ctx, ctx_init=" ".join(["X"] * n_ctx))
        self.prompt_learner.ctx.requires_grad_(False).copy_(ctx)
        self.register_buffer("text_prompts", text_prompts.float().clone())
        self.register_buffer("visual_prompts", visual_prompts.float().clone())
        self._class_features = None  # (key, features)

    @classmethod
    def from_checkpoint(cls, clip, path, classnames, num_trained_classes=None, *, trained_classnames=None):
        """The teacher of one of PromptKD's released files (read tensors-only; released.read_teacher
        says which keys and which checks). clip: the CLIP the teacher was trained from (ViT-L/14),
        left as it is. The classes it was trained on: trained_classnames, else num_trained_classes
        (a count), else the first ceil(n/2) of classnames or all n."""
        ctx, text_prompts, visual_prompts, teacher_clip = released.read_teacher(
            clip, path, classnames, num_trained_classes, trained_classnames)
        return cls(teacher_clip, ctx, text_prompts, visual_prompts, classnames)

    def train(self, mode=True):
        return super().train(False)  # frozen: always in eval mode

    def set_classnames(self, classnames):
        self.prompt_learner.set_classnames(classnames)
        self._class_features = None

    @torch.no_grad()
    def class_features(self):
        """Normalised teacher text features t_T (n, D_T) fp32, once per class set."""
        key = (_state_key(self), _autocast_key(self.text_prompts.device))
        if self._class_features is None or self._class_features[0] != key:
            deep = self.text_prompts if len(self.text_prompts) else None
            self._class_features = (key, prompt_text_features(self.clip, self.prompt_learner, deep))
        return self._class_features[1]

    @torch.no_grad()
    def forward(self, images):
        """(B, 3, R, R) -> teacher logits z_T (B, n) fp32."""
        image_features = self.clip.encode_image(images, prompts=self.visual_prompts)  # (B, D_T)
        return scaled_cosine_logits(self.clip.logit_scale, image_features, self.class_features())


def kl_per_element(student_logits, teacher_probs, temperature):
    """PromptKD's distillation loss: T^2 * KL(p_T || softmax(z_S / T)) summed over every element
    and divided by their count (not batchmean). fp32."""
    log_student = F.log_softmax(student_logits / temperature, dim=-1)
    kl = F.kl_div(log_student, teacher_probs, reduction="sum")  # xlogy: p_T = 0 terms are 0
    return temperature**2 * kl / student_logits.numel()


# PromptKD's per-dataset distillation weight (a comment in its scripts); 1000 for the others.
KD_WEIGHTS = {"fgvc_aircraft": 200.0, "oxford_flowers": 200.0, "dtd": 200.0}


@dataclass
class PromptKDRecipe(RefinerRecipe):
    """PromptKD + TextRefiner: ViT-B/16 student, PromptSRC ViT-L/14 teacher, unlabelled images."""
    epochs: int = 20
    batch_size: int = 8
    lr: float = 0.005
    n_ctx_vision: int = 4  # visual prompt tokens per block
    depth: int = 9  # blocks with visual prompts; PromptKD's cross-dataset student uses 3
    kd_weight: float = None  # lambda, per dataset: KD_WEIGHTS
    temperature: float = 1.0
    teacher: str = dataclasses.field(default=None, metadata=dict(
        required="a PromptKD teacher file, or the folder of PromptKD's released teachers"))
    teacher_clip: str = "ViT-L/14"  # the CLIP the teacher was trained from (its token embedding)
    inputs: ClassVar[tuple] = ("teacher", "teacher_clip")
    ranges: ClassVar[dict] = dict(n_ctx_vision=POSITIVE)
    xd: ClassVar[dict] = dict(depth=3)  # a student per target, on its unlabelled train split

    def for_dataset(self, dataset):
        if self.kd_weight is not None:
            return self
        return dataclasses.replace(self, kd_weight=KD_WEIGHTS.get(dataset, 1000.0))


class PromptKDCLIP(PromptCLIP):
    """PromptKD (CVPR 2024) student with TextRefiner: a frozen CLIP image tower (ViT-B/16) with
    trainable deep visual prompts, image_proj (D_S -> D_T) and a TextRefiner whose classifier is the
    frozen teacher's class text, refined; distilled from the teacher's logits without labels:

        z_S = exp(logit_scale) normalise(image_proj(prompted global feature)) refined^T
        loss = lambda (KL(p_T || p_S) + KL over the local rows / 100 + L1 regulariser / 50)

    (KL summed and divided by its element count). refiner=False is plain PromptKD (lambda KL).
    The student's text tower is unused; trained on the unlabelled images of every class."""
    recipe = PromptKDRecipe
    loss_keys = ("loss", "loss_kd", "loss_local", "loss_reg")
    frozen_image_features = False  # trainable visual prompts and image_proj
    transductive = True
    frozen = ("clip", "teacher")
    title = "PromptKD"
    published = dict(
        note="Published 11-dataset averages (ViT-B/16 student, seeds 1-3; PromptKD+TextRefiner: the TextRefiner "
             "paper, 16 unlabelled shots; PromptKD and the PK columns: PromptKD's README, the full unlabelled train "
             "set):",
        base2new={"PromptKD+TextRefiner": (85.22, 79.64, 82.33), "PromptKD": (86.96, 80.73, 83.73)},
        base2new_datasets=("PK", {  # PromptKD's README: base, new, HM
            "imagenet": (80.83, 74.66, 77.62), "caltech101": (98.91, 96.65, 97.77), "oxford_pets": (96.30, 98.01, 97.15),
            "stanford_cars": (82.80, 83.37, 83.13), "oxford_flowers": (99.42, 82.62, 90.24),
            "food101": (92.43, 93.68, 93.05), "fgvc_aircraft": (49.12, 41.81, 45.17), "sun397": (83.69, 81.54, 82.60),
            "dtd": (85.84, 71.37, 77.94), "eurosat": (97.54, 82.08, 89.14), "ucf101": (89.71, 82.27, 86.10)}),
        xd=("PromptKD", {"caltech101": 93.61, "oxford_pets": 91.59, "stanford_cars": 73.93, "oxford_flowers": 75.33,
                         "food101": 88.84, "fgvc_aircraft": 26.24, "sun397": 68.57, "dtd": 55.08, "eurosat": 63.74,
                         "ucf101": 76.39}),
        xd_note="PromptKD: its published transductive cross-dataset accuracy (PromptKD README; full unlabelled target "
                "train sets)")

    def __init__(self, clip, teacher, classnames, depth=9, n_ctx=4, kd_weight=1000.0, temperature=1.0,
                 cache_size=25, alpha=0.2, momentum=0.8, topk=5, refiner=True):
        super().__init__(clip)
        config = clip.config
        if not 1 <= depth <= config.vision_layers or n_ctx < 1:
            raise ValueError(f"PromptKDCLIP: depth must be in 1..{config.vision_layers} and n_ctx >= 1, "
                             f"got depth={depth}, n_ctx={n_ctx}")
        if temperature <= 0:
            raise ValueError(f"PromptKDCLIP: temperature must be > 0, got {temperature}")
        self.teacher = teacher.requires_grad_(False).eval()
        self.teacher.set_classnames(classnames)
        teacher_dim = teacher.clip.config.embed_dim
        self.visual_prompts = nn.Parameter(torch.empty(depth, n_ctx, config.vision_width).normal_(std=0.02))
        self.image_proj = FeatureAlign(config.embed_dim, teacher_dim)
        self.refiner = (TextRefiner(teacher_dim, cache_size, alpha, momentum, topk, token_dim=config.embed_dim)
                        if refiner else None)
        self.kd_weight, self.temperature = kd_weight, temperature

    @classmethod
    def prepare(cls, args, classnames):
        args.teacher = released.teacher_file(args.teacher, args.dataset, args.subsample)

    @classmethod
    def check_clip(cls, clip, args):
        layers = clip.config.vision_layers
        if args.depth > layers:
            raise UserError(f"--depth {args.depth}: the image tower of --clip has {layers} blocks; pass at most {layers}")
        return super().check_clip(clip, args)

    @classmethod
    def build(cls, clip, classnames, args):
        """The student on --clip and the frozen teacher read from --teacher (a file: prepare ran) on
        --teacher-clip. base/new runs distil from the dataset's base-class teacher (its class prompts
        are checked against these names); all-class runs are PromptKD's cross-dataset protocol,
        whose teacher learnt ImageNet's 1000 classes (names not at hand: their count is checked)."""
        try:
            teacher_clip = clip_model.load_clip(args.teacher_clip)
        except (OSError, ValueError, RuntimeError) as e:
            raise UserError(f"--teacher-clip {args.teacher_clip}: {e}") from None
        if args.subsample == "all":
            trained_on = dict(num_trained_classes=released.IMAGENET_CLASSES)
        else:
            trained_on = dict(trained_classnames=classnames[:math.ceil(len(classnames) / 2)])
        try:
            teacher = PromptSRCTeacher.from_checkpoint(teacher_clip, args.teacher, classnames, **trained_on)
        except released.TeacherCLIPMismatch as e:
            raise UserError(f"--teacher-clip {args.teacher_clip} {e}") from None
        except (ValueError, KeyError, OSError) as e:
            raise UserError(f"--teacher {args.teacher}: {e}") from None
        return cls(clip, teacher, classnames, depth=args.depth, n_ctx=args.n_ctx_vision, kd_weight=args.kd_weight,
                   temperature=args.temperature, cache_size=args.cache_size, alpha=args.alpha,
                   momentum=args.cache_momentum, topk=args.topk, refiner=not args.no_refiner)

    @classmethod
    def benchmark_models(cls, clip, classnames, args):
        """Students of a random teacher CLIP of the --teacher-clip size with the released prompts (4
        tokens, depth 9): with and without TextRefiner, and one paying the released trainer's cost,
        the teacher's class text recomputed for every batch."""
        config = clip_model.CONFIGS[args.teacher_clip]
        teacher_clip = clip_model.build_model(clip_model.random_state_dict(config, seed=1))
        depth, g = min(9, config.vision_layers, config.transformer_layers), torch.Generator().manual_seed(0)
        prompts = [torch.randn(shape, generator=g) * 0.02 for shape in
                   ((4, config.transformer_width), (depth - 1, 4, config.transformer_width), (depth, 4, config.vision_width))]

        def student(refiner):  # a teacher each: the per-batch variant must not clear the others' memo
            teacher = PromptSRCTeacher(teacher_clip, *prompts, classnames)
            return cls(clip, teacher, classnames, depth=min(args.depth, clip.config.vision_layers),
                       n_ctx=args.n_ctx_vision, kd_weight=args.kd_weight, refiner=refiner)
        return {"PromptKD+TextRefiner": student(True), "PromptKD": student(False),
                "PromptKD+TR (released)": TeacherTextPerBatch(student(True))}

    def set_classnames(self, classnames):
        """The teacher's class features for these classes (base -> new, another dataset)."""
        self.teacher.set_classnames(classnames)
        super().set_classnames(classnames)

    def train_forward(self, images, labels=None):
        """-> loss, loss_kd, loss_local, loss_reg (unweighted terms; 0 for the last two without
        refiner), logits z_S (B, n); updates the cache. labels are ignored (unlabelled images)."""
        teacher_logits = self.teacher(images)  # (B, n) no grad
        t = self.teacher.class_features()  # (n, D_T), normalised
        if self.refiner is None:
            glob = self.clip.encode_image(images, prompts=self.visual_prompts)  # (B, D_S)
        else:
            glob, tokens, cls_attn = self.clip.encode_image(images, return_tokens=True, prompts=self.visual_prompts)
        with fp32(t):
            g = F.normalize(self.image_proj(glob.float()), dim=-1)  # (B, D_T)
            scale = self.clip.logit_scale.exp().float()
            teacher_probs = F.softmax(teacher_logits.float() / self.temperature, dim=-1)  # (B, n)
            if self.refiner is None:
                logits = scale * g @ t.t()  # (B, n)
                loss_kd = kl_per_element(logits, teacher_probs, self.temperature)
                zero = loss_kd.new_zeros(())
                return dict(loss=self.kd_weight * loss_kd, loss_kd=loss_kd, loss_local=zero, loss_reg=zero,
                            logits=logits)
            refined, local_logits, loss_reg = self.refiner.train_terms(t, tokens, cls_attn, scale)
            logits = scale * g @ refined.t()  # (B, n)
            loss_kd = kl_per_element(logits, teacher_probs, self.temperature)
            loss_local = kl_per_element(local_logits.flatten(0, 1),
                                        teacher_probs.repeat_interleave(local_logits.shape[1], dim=0), self.temperature)
            loss = self.kd_weight * (loss_kd + loss_local / 100 + loss_reg / 50)
        return dict(loss=loss, loss_kd=loss_kd, loss_local=loss_local, loss_reg=loss_reg, logits=logits)

    def image_features(self, images):
        """image_proj(prompted global feature) (B, D_T), not normalised; BN running statistics in eval."""
        glob = self.clip.encode_image(images, prompts=self.visual_prompts)  # (B, D_S)
        return self.image_proj(glob.float())

    def class_features(self):
        t = self.teacher.class_features()
        return t if self.refiner is None else self.refiner.refine(t)


class TeacherTextPerBatch(nn.Module):
    """Benchmarks only: a PromptKDCLIP paying the released trainer's cost, the teacher's class text
    features recomputed for every batch where the model computes them once per class set."""

    def __init__(self, model):
        super().__init__()
        self.model, self.loss_keys, self.frozen_image_features = model, model.loss_keys, False

    def forward(self, *inputs):
        self.model.teacher._class_features = self.model._classifier = None  # the memos, forgotten
        return self.model(*inputs)


# ----------------------------------------------------------------------------- the prompt-learning family
# CoCoOp, KgCoOp, IVLP, MaPLe and PromptSRC as TextRefiner hosts (refiner=False: the official method).
# Their logits and classification losses use the refined classifier, a host's own text regulariser acts
# on its unrefined features, and TextRefiner's terms are as on CoOp. The recipes are the official
# base2new configs, evaluated at the last epoch as the hosts' papers do.

# Prompts per text-tower call where a host encodes many (CoCoOp's per-image classes, PromptSRC's templates):
# enough rows to keep a GPU busy, few enough to bound the activations' memory.
TEXT_ROWS = 1024


class TemplateFeatures(nn.Module):
    """A frozen CLIP's hand-crafted class features: normalise(mean over the templates of the unnormalised
    text features of "template with {} = class name") (C, D) fp32, out of autocast. Computed on first
    use and kept until the class set changes (only training reads them); not part of a checkpoint."""

    def __init__(self, templates, classnames):
        super().__init__()
        self.templates = tuple(templates)
        self.register_buffer("features", torch.empty(0), persistent=False)  # (C, D) once computed
        self.set_classnames(classnames)

    def set_classnames(self, classnames):
        self.classnames = [name.replace("_", " ") for name in classnames]
        self.features = self.features.new_empty(0)

    @torch.no_grad()
    def forward(self, clip):
        if not self.features.numel():
            device = clip.logit_scale.device
            prompts = [template.replace("{}", name) for template in self.templates for name in self.classnames]
            ids = tokenize(prompts, clip.config.context_length)  # (templates C, 77)
            with torch.autocast(device.type, enabled=False):
                text = torch.cat([clip.encode_text(rows.to(device), length=text_length(rows))
                                  for rows in ids.split(TEXT_ROWS)])  # (templates C, D)
            self.features = F.normalize(text.unflatten(0, (len(self.templates), -1)).mean(0), dim=-1)  # (C, D)
        return self.features


# ----------------------------------------------------------------------------- CoCoOp + TextRefiner


@dataclass
class CoCoOpRecipe(ContextRecipe):
    """CoCoOp's base2new config (ViT-B/16, 16 shots): batch 1, its text tower runs once per image."""
    epochs: int = 10
    batch_size: int = 1
    lr: float = 0.002
    selection: str = "last"


class CoCoOpCLIP(ContextCLIP):
    """CoCoOp (CVPR 2022) with TextRefiner. A meta-net of the image's normalised global feature x,
    pi(x) = linear2(relu(linear1(x))) (D -> D/16 -> W), shifts every context vector, so the class
    features are per image (B, C, D): TextRefiner refines every row, image i's local tokens are
    classified against image i's unrefined features, and the cache is written at every step. At test
    time the class features (and their refinement) are computed for every image, not once per
    evaluation: see logits. refiner=False is CoCoOp."""
    recipe = CoCoOpRecipe
    title = "CoCoOp"
    published = dict(note="Published 11-dataset averages (ViT-B/16, 16 shots, seeds 1-3; the CoCoOp paper); no "
                          "result of CoCoOp with TextRefiner was published:",
                     base2new={"CoCoOp": (80.47, 71.69, 75.83)})

    def __init__(self, clip, classnames, **options):
        super().__init__(clip, classnames, **options)
        dim, width = clip.config.embed_dim, clip.config.transformer_width
        self.meta_net = nn.Sequential(OrderedDict(linear1=nn.Linear(dim, dim // 16), relu=nn.ReLU(),
                                                  linear2=nn.Linear(dim // 16, width)))

    def text_features(self, image):
        """Normalised class features per image (B, C, D) fp32 for normalised image features (B, D), with the
        graph to ctx and the meta-net when grad is on."""
        prompts, ids = self.prompt_learner()  # (C, 77, W), (C, 77)
        length, n = self.prompt_learner.text_length, self.prompt_learner.n_ctx
        prompts = prompts[:, :length]  # the positions the EOT rows see (causal mask)
        shift = self.meta_net(image)  # (B, W)
        text = []
        for s in shift.split(max(1, TEXT_ROWS // len(ids))):  # (k, W): images whose prompts share a pass
            k = len(s)
            shifted = torch.cat([prompts[None, :, :1].expand(k, -1, -1, -1),  # SOT
                                 prompts[None, :, 1:1 + n] + s[:, None, None],  # the context, shifted
                                 prompts[None, :, 1 + n:].expand(k, -1, -1, -1)], dim=2)  # (k, C, L, W)
            out = self.clip.encode_prompts(shifted.flatten(0, 1), ids.repeat(k, 1), length=length)  # (k C, D)
            text.append(out.unflatten(0, (k, -1)))  # (k, C, D)
        text = torch.cat(text)  # (B, C, D)
        with fp32(text):
            return F.normalize(text.float(), dim=-1)

    def class_features(self, image):
        """What each image's logits compare against: its class features (B, C, D), refined row by row."""
        t = self.text_features(image)
        return t if self.refiner is None else self.refiner.refine(t)

    def logits(self, image_features):
        """Eval logits (B, C), each image against its own class features, computed for every batch: they
        depend on the image, so nothing carries over from one batch to the next."""
        image = F.normalize(image_features.float(), dim=-1)  # (B, D)
        classes = self.class_features(image)  # (B, C, D)
        with fp32(classes):
            return class_logits(self.clip.logit_scale.exp().float(), image, classes)

    def train_forward(self, images, labels):
        image, tokens, cls_attn = image_pass(self, images)
        t = self.text_features(F.normalize(image.float(), dim=-1))  # (B, C, D)
        return refined_ce(self, t, image, labels, tokens, cls_attn)

# ----------------------------------------------------------------------------- KgCoOp + TextRefiner


# KgCoOp's hand-crafted prompt of a dataset: CoOp's (data.DATASETS), except for DTD.
KGCOOP_TEMPLATES = {"dtd": "a photo of a {}, a type of texture."}


@dataclass
class KgCoOpRecipe(CoOpRecipe):
    """KgCoOp's base2new config (ViT-B/16, 16 shots)."""
    epochs: int = 100
    batch_size: int = 128
    lr: float = 0.002
    selection: str = "last"
    kg_weight: float = 8.0  # of 1 - mean cosine to the hand-crafted class features
    ranges: ClassVar[dict] = dict(kg_weight=NON_NEGATIVE)


class KgCoOpCLIP(TextRefinerCLIP):
    """KgCoOp (CVPR 2023) with TextRefiner: CoOp plus kg_weight * (1 - mean cosine) between the learnt,
    unrefined class features and the frozen CLIP's on the dataset's hand-crafted prompt (KGCOOP_TEMPLATES),
    encoded once per class set. refiner=False is KgCoOp."""
    recipe = KgCoOpRecipe
    loss_keys = TextRefinerCLIP.loss_keys + ("loss_kg",)
    title = "KgCoOp"
    published = dict(note="Published 11-dataset averages (ViT-B/16, 16 shots, seeds 1-3; KgCoOp's README); no "
                          "result of KgCoOp with TextRefiner was published:",
                     base2new={"KgCoOp": (80.73, 73.60, 77.00)})

    def __init__(self, clip, classnames, kg_weight=8.0, template="a photo of a {}.", **coop):
        super().__init__(clip, classnames, **coop)
        self.kg_weight = kg_weight
        self.handcrafted = TemplateFeatures([template], classnames)

    @classmethod
    def options(cls, clip, args):
        template = KGCOOP_TEMPLATES.get(args.dataset) or (data.DATASETS[args.dataset].template if args.dataset
                                                          else "a photo of a {}.")
        return dict(super().options(clip, args), kg_weight=args.kg_weight, template=template)

    def set_classnames(self, classnames):
        self.handcrafted.set_classnames(classnames)
        super().set_classnames(classnames)

    def train_forward(self, images, labels):
        image, tokens, cls_attn = image_pass(self, images)
        t = self.text_features()  # (C, D)
        out = refined_ce(self, t, image, labels, tokens, cls_attn)
        with fp32(t):
            loss_kg = 1 - F.cosine_similarity(t, self.handcrafted(self.clip), dim=-1, eps=1e-7).mean()
        return dict(out, loss=out["loss"] + self.kg_weight * loss_kg, loss_kg=loss_kg)

# ----------------------------------------------------------------------------- IVLP, MaPLe: prompts in both towers


@dataclass
class IVLPRecipe(ContextRecipe):
    """IVLP's base2new config of PromptSRC's repository (ViT-B/16, 16 shots): 4 + 4 prompt tokens, depth 9."""
    epochs: int = 20
    batch_size: int = 4
    lr: float = 0.0025
    selection: str = "last"
    depth: int = 9  # blocks with prompts, in each tower
    n_ctx_vision: int = 4  # visual prompt tokens per block
    ranges: ClassVar[dict] = dict(n_ctx_vision=POSITIVE)


class DeepPromptCLIP(ContextCLIP):
    """Prompts in both towers (IVLP, MaPLe, PromptSRC). Text: the context at the input and text_prompts
    (depth - 1, n_ctx, W) at the context positions before text blocks 1..depth-1. Image: vision_prompts()
    (depth, n, W_vision), row 0 appended after the image tokens and row i in their place before vision
    block i. TextRefiner's tokens and attention leave the prompt tokens out (clip_model's hooks)."""
    frozen_image_features = False  # the image tower is prompted

    def __init__(self, clip, classnames, depth=9, **options):
        super().__init__(clip, classnames, **options)
        layers = min(clip.config.vision_layers, clip.config.transformer_layers)
        if not 1 <= depth <= layers:
            raise ValueError(f"{type(self).__name__}: depth must be in 1..{layers}, got {depth}")
        deep = torch.empty(depth - 1, *self.prompt_learner.ctx.shape).normal_(std=0.02)  # (depth - 1, n_ctx, W)
        # none at depth 1: a parameter that no step uses would stall DDP's gradient reduction
        self.register_parameter("text_prompts", nn.Parameter(deep) if depth > 1 else None)

    @classmethod
    def options(cls, clip, args):
        layers = min(clip.config.vision_layers, clip.config.transformer_layers)
        if args.depth > layers:
            raise UserError(f"--depth {args.depth}: the CLIP has {layers} blocks in a tower")
        return dict(super().options(clip, args), depth=args.depth)

    @classmethod
    def benchmark_models(cls, clip, classnames, args):
        """PromptCLIP's, the recipe's depth capped at the CLIP's blocks (the tiny benchmark CLIPs)."""
        depth = min(args.depth, clip.config.vision_layers, clip.config.transformer_layers)
        return super().benchmark_models(clip, classnames, types.SimpleNamespace(**{**vars(args), "depth": depth}))

    def vision_prompts(self):
        """The image tower's prompts (depth, n, W_vision)."""
        raise NotImplementedError

    def text_features(self):
        """Normalised class features (C, D) fp32, with the graph to the text prompts when grad is on."""
        return prompt_text_features(self.clip, self.prompt_learner, self.text_prompts)

    def class_features(self):
        t = self.text_features()
        return t if self.refiner is None else self.refiner.refine(t)

    def image_features(self, images):
        return self.clip.encode_image(images, prompts=self.vision_prompts())  # (B, D)

    def train_forward(self, images, labels):
        image, tokens, cls_attn = image_pass(self, images, self.vision_prompts())
        return refined_ce(self, self.text_features(), image, labels, tokens, cls_attn)


class IVLPCLIP(DeepPromptCLIP):
    """Independent vision-language prompting (the baseline of MaPLe and PromptSRC) with TextRefiner: the
    image tower's prompts are visual_prompts (depth, n_ctx_vision, W_vision), N(0, 0.02^2), independent of
    the text ones. refiner=False is IVLP."""
    recipe = IVLPRecipe
    title = "IVLP"
    published = dict(note="Published 11-dataset averages (ViT-B/16, 16 shots, seeds 1-3; IVLP 4 + 4, depth 9, 20 "
                          "epochs, in PromptSRC's README); no result of IVLP with TextRefiner was published:",
                     base2new={"IVLP": (84.21, 71.79, 77.51)})

    def __init__(self, clip, classnames, depth=9, n_ctx_vision=4, **options):
        super().__init__(clip, classnames, depth=depth, **options)
        if n_ctx_vision < 1:
            raise ValueError(f"{type(self).__name__}: n_ctx_vision must be >= 1, got {n_ctx_vision}")
        shape = (depth, n_ctx_vision, clip.config.vision_width)
        self.visual_prompts = nn.Parameter(torch.empty(shape).normal_(std=0.02))

    @classmethod
    def options(cls, clip, args):
        return dict(super().options(clip, args), n_ctx_vision=args.n_ctx_vision)

    def vision_prompts(self):
        return self.visual_prompts


@dataclass
class MaPLeRecipe(ContextRecipe):
    """MaPLe's base2new config (ViT-B/16, 16 shots): 2 context tokens ("a photo" of "a photo of a"), depth 9."""
    n_ctx: int = 2
    epochs: int = 5
    batch_size: int = 4
    lr: float = 0.0035
    selection: str = "last"
    depth: int = 9  # blocks with prompts, in each tower
    xd: ClassVar[dict] = dict(lr=0.0026, epochs=2, depth=3)


class MaPLeCLIP(DeepPromptCLIP):
    """MaPLe (CVPR 2023) with TextRefiner: coupled prompts. The image tower's prompts are linear maps
    (W -> W_vision) of the text ones: row 0 = proj(ctx), row i = projections[i - 1](text_prompts[i - 1]),
    so the image tower's gradient reaches the text prompts. refiner=False is MaPLe."""
    recipe = MaPLeRecipe
    title = "MaPLe"
    published = dict(note="Published 11-dataset averages (ViT-B/16, 16 shots, seeds 1-3; MaPLe's README); no "
                          "11-dataset result of MaPLe with TextRefiner was published:",
                     base2new={"MaPLe": (82.28, 75.14, 78.55)})

    def __init__(self, clip, classnames, depth=9, n_ctx=2, **options):
        super().__init__(clip, classnames, depth=depth, n_ctx=n_ctx, **options)
        width, vision_width = clip.config.transformer_width, clip.config.vision_width
        self.proj = nn.Linear(width, vision_width)
        deep = nn.Linear(width, vision_width)  # one initialisation, copied: the projections start identical
        self.projections = nn.ModuleList(copy.deepcopy(deep) for _ in range(depth - 1))

    def vision_prompts(self):
        deep = [] if self.text_prompts is None else [p(t) for p, t in zip(self.projections, self.text_prompts)]
        return torch.stack([self.proj(self.prompt_learner.ctx), *deep])  # (depth, n_ctx, W_vision)

# ----------------------------------------------------------------------------- PromptSRC + TextRefiner


# PromptSRC's text targets: 60 of OpenAI's published CLIP ImageNet prompt templates, in PromptSRC's order.
PROMPTSRC_TEMPLATES = (
    "a photo of a {}.", "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.",
    "a photo of the hard to see {}.", "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.",
    "a bad photo of the {}.", "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.",
    "a photo of a hard to see {}.", "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.",
    "a dark photo of the {}.", "a drawing of a {}.", "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.", "a painting of a {}.",
    "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.", "a cropped photo of a {}.",
    "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.", "a blurry photo of the {}.",
    "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.", "a {} in a video game.",
    "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.", "the origami {}.",
    "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.", "a origami {}.",
    "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.", "a photo of the clean {}.",
    "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.", "a photo of a weird {}.",
    "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.", "a sketch of the {}.", "a embroidered {}.",
    "a pixelated photo of a {}.", "itap of the {}.")


def gpa_weights(mean, std, epochs):
    """PromptSRC's weights of epochs 1..epochs: the Gaussian N(e; mean, std^2) normalised to sum 1
    (float64; computed as a softmax of the exponents, so that no choice underflows to a zero sum)."""
    exponents = [-0.5 * ((e - mean) / std) ** 2 for e in range(1, epochs + 1)]
    w = [math.exp(x - max(exponents)) for x in exponents]
    return [x / sum(w) for x in w]


@dataclass
class PromptSRCRecipe(IVLPRecipe):
    """PromptSRC's base2new config (ViT-B/16, 16 shots): IVLP 4 + 4, depth 9, and its regularisers."""
    text_weight: float = 25.0  # L1 of the text features to the frozen CLIP's
    image_weight: float = 10.0  # L1 of the image features to the frozen CLIP's
    gpa_mean: float = 15.0  # Gaussian prompt aggregation over epochs 1..epochs
    gpa_std: float = 1.0
    xd: ClassVar[dict] = dict(depth=3, gpa_mean=6.0, gpa_std=10.0)
    ranges: ClassVar[dict] = dict(IVLPRecipe.ranges, text_weight=NON_NEGATIVE, image_weight=NON_NEGATIVE,
                                  gpa_mean=FINITE, gpa_std=POSITIVE)


class PromptSRCCLIP(IVLPCLIP):
    """PromptSRC (ICCV 2023) with TextRefiner: IVLP regulated by the frozen CLIP it prompts (no copy):

        loss = CE(logits) + text_weight L1(t, t_zs) + image_weight L1(f, f_zs) + KL(p_zs || p) (+ TextRefiner's)

    t: the unrefined prompted class features; t_zs: the frozen text tower's mean over PROMPTSRC_TEMPLATES,
    normalised; f, f_zs: the prompted and unprompted normalised image features; p = softmax(logits), logits
    of the refined classifier; p_zs of exp(logit_scale) f_zs t_zs^T; KL summed and divided by B * C.
    Gaussian prompt aggregation: after epoch e the buffer gpa_sum adds gpa_weights(e) times the trainable
    parameters (prompts and TextRefiner's weights; buffers stay the last epoch's), and after the last
    epoch the parameters become gpa_sum, the model evaluated. refiner=False is PromptSRC."""
    recipe = PromptSRCRecipe
    loss_keys = ("loss", "loss_global", "loss_text", "loss_image", "loss_kl", "loss_local", "loss_reg")
    title = "PromptSRC"
    published = dict(note="Published 11-dataset averages (ViT-B/16, 16 shots, seeds 1-3; PromptSRC's README); no "
                          "result of PromptSRC with TextRefiner was published:",
                     base2new={"PromptSRC": (84.26, 76.10, 79.97)})

    def __init__(self, clip, classnames, text_weight=25.0, image_weight=10.0, gpa_mean=15.0, gpa_std=1.0,
                 **options):
        super().__init__(clip, classnames, **options)
        if not gpa_std > 0:
            raise ValueError(f"PromptSRCCLIP: gpa_std must be > 0, got {gpa_std}")
        self.text_weight, self.image_weight, self.gpa_mean, self.gpa_std = text_weight, image_weight, gpa_mean, gpa_std
        self.zs_text = TemplateFeatures(PROMPTSRC_TEMPLATES, classnames)
        # a buffer: every checkpoint holds the running sum, so --resume continues it exactly
        self.register_buffer("gpa_sum", torch.zeros(sum(p.numel() for p in self.trained())))

    @classmethod
    def options(cls, clip, args):
        return dict(super().options(clip, args), text_weight=args.text_weight, image_weight=args.image_weight,
                    gpa_mean=args.gpa_mean, gpa_std=args.gpa_std)

    def trained(self):
        """The trainable parameters, in a fixed order: what the aggregation averages."""
        return [p for p in self.parameters() if p.requires_grad]

    def set_classnames(self, classnames):
        self.zs_text.set_classnames(classnames)
        super().set_classnames(classnames)

    def train_forward(self, images, labels):
        image, tokens, cls_attn = image_pass(self, images, self.vision_prompts())
        t = self.text_features()  # (C, D)
        out = refined_ce(self, t, image, labels, tokens, cls_attn)
        with torch.no_grad():
            zs_image = self.clip.encode_image(images)  # (B, D) the frozen tower, unprompted
        zs_text = self.zs_text(self.clip)  # (C, D)
        with fp32(t):
            zs_image = F.normalize(zs_image.float(), dim=-1)
            zs_logits = self.clip.logit_scale.exp().float() * zs_image @ zs_text.t()  # (B, C)
            loss_text = F.l1_loss(t, zs_text)
            loss_image = F.l1_loss(F.normalize(image.float(), dim=-1), zs_image)
            logits = out["logits"]
            loss_kl = F.kl_div(F.log_softmax(logits, dim=-1), F.log_softmax(zs_logits, dim=-1), reduction="sum",
                               log_target=True) / logits.numel()
            loss = out["loss"] + self.text_weight * loss_text + self.image_weight * loss_image + loss_kl
        return dict(out, loss=loss, loss_text=loss_text, loss_image=loss_image, loss_kl=loss_kl)

    @torch.no_grad()
    def epoch_end(self, epoch, epochs):
        params = self.trained()
        weight = gpa_weights(self.gpa_mean, self.gpa_std, epochs)[epoch]
        self.gpa_sum.add_(torch.cat([p.flatten() for p in params]) * weight)  # as released: w * theta, then the sum
        if epoch == epochs - 1:  # the aggregate becomes the model
            for p, value in zip(params, self.gpa_sum.split([p.numel() for p in params])):
                p.copy_(value.view_as(p))


METHODS = {"coop": TextRefinerCLIP, "promptkd": PromptKDCLIP, "cocoop": CoCoOpCLIP, "kgcoop": KgCoOpCLIP,
           "ivlp": IVLPCLIP, "maple": MaPLeCLIP, "promptsrc": PromptSRCCLIP}
