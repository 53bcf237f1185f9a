"""TextRefiner (AAAI 2025) on top of CoOp: a frozen CLIP, learned prompt context, and a
refiner that injects a cache of local visual concepts into the class text features.
The maths is SPEC.md section 4; the API is section 10.

    import clip_model, textrefiner
    clip = clip_model.load_clip("ViT-B/16")
    model = textrefiner.TextRefinerCLIP(clip, classnames)      # paper defaults
    model.train(); out = model(images, labels); out["loss"].backward()   # also updates the cache
    model.eval();  logits = model(images)                       # class features computed once
    model.set_classnames(new_classnames)                        # base -> new
    torch.save(model.trainable_state_dict(), "ckpt.pt")         # no CLIP weights

TextRefiner plugs into any prompt learner that yields class text features; it needs the
image tower's last-block tokens and CLS attention row (clip.encode_image(x, return_tokens=True)):

    refiner = textrefiner.TextRefiner(embed_dim)
    t = F.normalize(my_prompt_learner_text_features, dim=-1)  # (C, D)
    refined = refiner.refine(t)                                # (C, D), not re-normalised
    logits = scale * F.normalize(img, dim=-1) @ refined.t()    # (B, C)
    if training:
        aligned = refiner.align_tokens(tokens)                 # (B, T, D)
        local = refiner.semantic_tokens(aligned, cls_attn)     # (B, k+2, D)
        local_logits = scale * local.flatten(0, 1) @ t.t()     # (B*(k+2), C)
        loss = (F.cross_entropy(logits, y)
                + F.cross_entropy(local_logits, y.repeat_interleave(local.shape[1])) / 50
                + 20 * F.l1_loss(F.normalize(refined, dim=-1), t))
        refiner.update_cache(aligned.detach())                 # after the forward that read it

PromptKD + TextRefiner (SPEC 11): a frozen PromptSRC teacher (ViT-L/14 with deep prompts, read
from PromptKD's released teacher files) distils into a ViT-B/16 student with deep visual
prompts, whose classifier is the teacher's class text refined by TextRefiner:

    teacher = textrefiner.PromptSRCTeacher.from_checkpoint(
        clip_model.load_clip("ViT-L/14"), "teachers/DescribableTextures/VLPromptLearner/model-best.pth.tar",
        classnames)                                              # class features computed once
    model = textrefiner.PromptKDCLIP(clip_model.load_clip("ViT-B/16"), teacher, classnames,
                                     kd_weight=200.0)            # refiner=False: plain PromptKD
    model.train(); out = model(images); out["loss"].backward()   # no labels; updates the cache
    model.eval();  logits = model(images)
    # a tiny teacher file in the released layout (tests, demo):
    textrefiner.write_teacher_checkpoint("teacher.pth.tar", clip_model.random_state_dict(
        clip_model.CONFIGS["tiny-teacher"]), base_classnames, depth=3)

PromptKDCLIP offers TextRefinerCLIP's training-loop interface: forward(images, labels) -> dict
with "loss" and the other entries of loss_keys (labels ignored), eval forward -> logits,
set_classnames, set_process_group, trainable_state_dict / load_trainable_state_dict; its eval
forward is logits(image_features(images)), and frozen_image_features = False says that its
image features change with training (trainable visual prompts), so they are never reused.

The refiner maths, the losses and the cache are fp32 even under autocast.
"""
import math
import os
import re

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import clip_model
from clip_model import text_length, tokenize
from kernels import cache_update, feature_align

CLASS_TOKEN_POSITIONS = ("end", "middle", "front")

# CoOp's hand-crafted zero-shot prompt per dataset (names of SPEC section 6).
ZERO_SHOT_TEMPLATES = {
    "caltech101": "a photo of a {}.",
    "oxford_pets": "a photo of a {}, a type of pet.",
    "stanford_cars": "a photo of a {}.",
    "oxford_flowers": "a photo of a {}, a type of flower.",
    "food101": "a photo of {}, a type of food.",
    "fgvc_aircraft": "a photo of a {}, a type of aircraft.",
    "sun397": "a photo of a {}.",
    "dtd": "{} texture.",
    "eurosat": "a centered satellite photo of {}.",
    "ucf101": "a photo of a person doing {}.",
    "imagenet": "a photo of a {}.",
    "imagenetv2": "a photo of a {}.",
    "imagenet_sketch": "a photo of a {}.",
    "imagenet_a": "a photo of a {}.",
    "imagenet_r": "a photo of a {}.",
}
DEFAULT_TEMPLATE = "a photo of a {}."


def _fp32(tensor):
    """Context in which autocast is off on the tensor's device (refiner maths stays fp32)."""
    return torch.autocast(tensor.device.type, enabled=False)


def _tensor_key(tensor):
    # _version counts in-place writes (optimizer steps, copy_); id/data_ptr catch replacement
    return (id(tensor), tensor._version, tensor.data_ptr(), tensor.device, tensor.dtype)


def _autocast_key(device):
    return (torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type))


def _scaled_cosine_logits(logit_scale, image_features, class_features):
    """logit_scale.exp() * normalise(image_features) @ class_features^T: (B, D), (C, D) ->
    (B, C) fp32. class_features are used as given (normalised, or refined)."""
    with _fp32(image_features):
        img = F.normalize(image_features.float(), dim=-1)
        return logit_scale.exp().float() * img @ class_features.t()


class _Memo:
    """One value computed from module state, recomputed whenever the state's key changes."""

    def __init__(self):
        self.clear()

    def clear(self):
        self.key, self.value = None, None

    def get(self, key, compute):
        if self.value is None or self.key != key:
            self.value = compute()
            self.key = key
        return self.value


# The key only one method's checkpoints hold -> the method, for a clear error on a mix-up.
METHOD_MARKERS = {"prompt_learner.ctx": "CoOp / CoOp + TextRefiner (TextRefinerCLIP)",
                  "visual_prompts": "PromptKD / PromptKD + TextRefiner (PromptKDCLIP)"}


def _load_trainable(model, state_dict):
    """Copy state_dict into model.trainable_state_dict()'s tensors (they share storage with
    the model) after checking that keys and shapes match exactly."""
    where = f"{type(model).__name__}.load_trainable_state_dict"
    own = model.trainable_state_dict()
    for marker, method in METHOD_MARKERS.items():
        if marker in state_dict and marker not in own:
            mine = next(m for k, m in METHOD_MARKERS.items() if k in own)
            raise ValueError(f"{where}: this is a checkpoint of {method} (it holds {marker!r}); "
                             f"the model is {mine}: evaluate it with that method")
    missing = sorted(own.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - own.keys())
    mismatched = [f"{k}: checkpoint {tuple(state_dict[k].shape)}, model {tuple(own[k].shape)}"
                  for k in sorted(own.keys() & state_dict.keys())
                  if state_dict[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        raise ValueError(f"{where}: state dict does not match the model; missing keys {missing}, "
                         f"unexpected keys {unexpected}, shape mismatches {mismatched}")
    with torch.no_grad():
        for name, tensor in own.items():
            tensor.copy_(state_dict[name])


class PromptLearner(nn.Module):
    """CoOp context vectors shared by all classes (SPEC 3).

    ctx_init: a phrase whose token embeddings initialise the context; its token count must
    equal n_ctx. "" -> N(0, 0.02^2) vectors with the text prefix "X X ... X".
    text_length: the positions the text encoder must run for the current prompts
    (clip_model.text_length), computed once per class set from the CPU ids.
    """

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
            if init_len != n_ctx:
                raise ValueError(f"PromptLearner: ctx_init {ctx_init!r} is {init_len} tokens but "
                                 f"n_ctx={n_ctx}; pass n_ctx={init_len} or ctx_init=''")
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
        self.generation = 0  # bumped by set_classnames; part of the eval-feature key
        self.set_classnames(classnames)

    def set_classnames(self, classnames):
        if len(classnames) == 0:
            raise ValueError("PromptLearner.set_classnames: need at least one class name")
        names = [name.replace("_", " ") for name in classnames]
        ids = tokenize([f"{self.prompt_prefix} {name}." for name in names], self.context_length)  # (C, 77)
        # the EOT positions are the same in every class_token_position layout
        self.text_length = text_length(ids)
        with torch.no_grad():
            embedded = self.token_embedding(ids.to(self.token_embedding.weight.device))  # (C, 77, W)
        embedded = embedded.to(self.ctx.device)
        # Non-persistent: rebuilt from the class names, never part of a checkpoint.
        self.register_buffer("token_ids", ids.to(self.ctx.device), persistent=False)
        self.register_buffer("token_prefix", embedded[:, :1].clone(), persistent=False)  # SOT
        self.register_buffer("token_suffix", embedded[:, 1 + self.n_ctx:].clone(), persistent=False)
        self.register_buffer("order", self._order(tokenize(names, self.context_length)), persistent=False)
        self.generation += 1

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


class FeatureAlign(nn.Module):
    """Linear(dim, out_dim) -> BatchNorm1d(out_dim) -> ReLU -> Linear(out_dim, out_dim), row-wise
    (SPEC 4 `align`; out_dim defaults to dim. PromptKD's `align` and `image_proj` widen 512 -> 768).

    Training uses batch statistics through kernels.feature_align (summed over the process
    group when one is set) and updates bn's running statistics as nn.BatchNorm1d would.
    """

    def __init__(self, dim, out_dim=None):
        super().__init__()
        out_dim = dim if out_dim is None else out_dim
        self.fc1 = nn.Linear(dim, out_dim)
        self.bn = nn.BatchNorm1d(out_dim)
        self.fc2 = nn.Linear(out_dim, out_dim)
        self.process_group = None

    def forward(self, x):  # (N, dim) -> (N, out_dim) fp32
        with _fp32(x):
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
        """As nn.BatchNorm1d, except that a batch whose statistics are not finite (a NaN or inf
        token, e.g. an fp16 overflow: a step the gradient scaler skips) leaves the running
        statistics untouched instead of poisoning them for good. mean/var are the group's,
        so every rank decides alike; on the device, without a host sync."""
        if self.process_group is None:
            if rows < 2:
                raise ValueError(f"FeatureAlign: batch statistics need at least 2 tokens, got {rows}")
            n = float(rows)
        else:  # the global token count, filled on the device: no blocking host copy, no sync
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
    """Feature alignment, local cache and aggregation of SPEC 4, for any prompt learner.

    embed_dim: the width of the text features refined (and of the cache); token_dim: the
    width of the image tokens aligned to it (default embed_dim; PromptKD: 512 tokens, 768 text).
    """

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
        """DDP: the alignment's BatchNorm statistics over `group` and the cache updates
        combined over it, so every rank computes what one process would on the global batch."""
        self.process_group = self.align.process_group = group

    def refine(self, text_features):
        """(C, D) class text features -> alpha * extractor([t, softmax(t cache^T) cache]) + t,
        t = normalise(text_features). Not re-normalised."""
        with _fp32(text_features):
            t = F.normalize(text_features.float(), dim=-1)  # (C, D)
            # snapshot: the in-place cache update later in this step must not touch what autograd saved
            cache = self.cache.clone()  # (M, D)
            read = torch.softmax(t @ cache.t(), dim=-1) @ cache  # (C, D)
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

    def state_key(self):
        """A key that changes whenever refine() may give another result for the same input:
        a cache update, an optimiser step on the extractor, a load or move, another alpha.
        For memos of refined class features."""
        return _tensor_key(self.cache), _tensor_key(self.extractor.weight), self.alpha

    @torch.no_grad()
    def update_cache(self, aligned_tokens):
        """Momentum update of the cache from this step's aligned tokens (B, T, D) (SPEC 4),
        combined over the process group when one is set, so every rank holds the same cache.
        A batch with a non-finite token anywhere in the group leaves the cache unchanged."""
        tokens = aligned_tokens.detach().reshape(-1, aligned_tokens.shape[-1])  # (N, D)
        self.cache.copy_(cache_update(tokens, self.cache, momentum=self.momentum, process_group=self.process_group))


class TextRefinerCLIP(nn.Module):
    """Frozen CLIP + CoOp prompt learner + TextRefiner; refiner=False is plain CoOp.

    Evaluation uses only the image tower's global feature, and nothing trained reaches it
    (frozen_image_features), so an evaluation loop may compute image_features once per image
    and reuse them with logits() at every later evaluation (train.FeatureCache does that)."""

    # eval logits = logits(image_features(images)), image_features independent of any
    # trained tensor; a prompt learner with trainable visual prompts must say False
    frozen_image_features = True

    loss_keys = ("loss", "loss_global", "loss_local", "loss_reg")  # the forward's loss entries (train.py logs)

    def __init__(self, clip, classnames, n_ctx=4, ctx_init="a photo of a", cache_size=25,
                 alpha=0.2, momentum=0.8, topk=5, semantic_weight=1 / 50, reg_weight=20.0,
                 refiner=True, class_token_position="end"):
        super().__init__()
        self.clip = clip.requires_grad_(False).eval()
        self.prompt_learner = PromptLearner(clip, classnames, n_ctx, ctx_init, class_token_position)
        self.refiner = (TextRefiner(clip.config.embed_dim, cache_size, alpha, momentum, topk)
                        if refiner else None)
        self.semantic_weight, self.reg_weight = semantic_weight, reg_weight
        self._class_features = _Memo()

    def train(self, mode=True):
        super().train(mode)
        self.clip.eval()  # frozen: no dropout-like behaviour, whatever the wrapper's mode
        self._class_features.clear()
        return self

    def set_classnames(self, classnames):
        self.prompt_learner.set_classnames(classnames)
        self._class_features.clear()

    def set_process_group(self, group):
        """DDP: reduce alignment BatchNorm statistics and combine cache updates over `group`."""
        if self.refiner is not None:
            self.refiner.set_process_group(group)

    def text_features(self):
        """Normalised class text features (C, D) fp32, with the graph to ctx when grad is on."""
        prompts, ids = self.prompt_learner()
        # (C, D); a length known in advance: finding it on the device ids would sync every step
        text = self.clip.encode_prompts(prompts, ids, length=self.prompt_learner.text_length)
        with _fp32(text):
            return F.normalize(text.float(), dim=-1)

    def forward(self, images, labels=None):
        if not self.training:
            return self._eval_logits(images)
        if labels is None:
            raise ValueError("TextRefinerCLIP.forward: labels are required in training mode")
        with torch.no_grad():  # nothing in the image tower is trained
            if self.refiner is None:
                img = self.clip.encode_image(images)  # (B, D)
            else:
                img, tokens, cls_attn = self.clip.encode_image(images, return_tokens=True)
        t = self.text_features()  # (C, D)
        with _fp32(t):
            img = F.normalize(img.float(), dim=-1)  # (B, D)
            scale = self.clip.logit_scale.exp().float()
            if self.refiner is None:
                logits = scale * img @ t.t()  # (B, C)
                loss = F.cross_entropy(logits, labels)
                zero = loss.new_zeros(())
                return dict(loss=loss, loss_global=loss, loss_local=zero, loss_reg=zero, logits=logits)
            refined = self.refiner.refine(t)  # (C, D), reads the cache before this step's update
            logits = scale * img @ refined.t()  # (B, C)
            aligned = self.refiner.align_tokens(tokens)  # (B, T, D)
            local = self.refiner.semantic_tokens(aligned, cls_attn)  # (B, k+2, D)
            local_logits = scale * local.flatten(0, 1) @ t.t()  # (B*(k+2), C)
            loss_global = F.cross_entropy(logits, labels)
            loss_local = F.cross_entropy(local_logits, labels.repeat_interleave(local.shape[1]))
            loss_reg = F.l1_loss(F.normalize(refined, dim=-1), t)
            loss = loss_global + self.semantic_weight * loss_local + self.reg_weight * loss_reg
        self.refiner.update_cache(aligned)
        return dict(loss=loss, loss_global=loss_global, loss_local=loss_local, loss_reg=loss_reg,
                    logits=logits)

    def _eval_logits(self, images):
        return self.logits(self.image_features(images))

    def image_features(self, images):
        """(B, 3, R, R) -> the frozen image tower's global features (B, D), not normalised."""
        return self.clip.encode_image(images)

    def logits(self, image_features):
        """Eval logits (B, C) from image_features(images) (B, D); class features computed once."""
        ctx = self.prompt_learner.ctx
        key = (self.prompt_learner.generation, _tensor_key(ctx), _autocast_key(ctx.device),
               None if self.refiner is None else self.refiner.state_key())
        features = self._class_features.get(key, self._compute_class_features)  # (C, D)
        return _scaled_cosine_logits(self.clip.logit_scale, image_features, features)

    @torch.no_grad()
    def _compute_class_features(self):
        t = self.text_features()
        return t if self.refiner is None else self.refiner.refine(t)

    def trainable_state_dict(self):
        """The trained tensors and state under the SPEC 10 names (no CLIP weights)."""
        state = self.prompt_learner.state_dict(prefix="prompt_learner.")
        if self.refiner is not None:
            state.update(self.refiner.state_dict(prefix="refiner."))
        return state

    def load_trainable_state_dict(self, state_dict):
        _load_trainable(self, state_dict)
        self._class_features.clear()


class ZeroShotCLIP(nn.Module):
    """CLIP zero-shot classifier with CoOp's hand-crafted prompt for `dataset`."""

    frozen_image_features = True  # as TextRefinerCLIP: forward = logits(image_features(images))

    def __init__(self, clip, classnames, dataset=None):
        super().__init__()
        if dataset is not None and dataset not in ZERO_SHOT_TEMPLATES:
            raise ValueError(f"ZeroShotCLIP: unknown dataset {dataset!r}; expected one of "
                             f"{sorted(ZERO_SHOT_TEMPLATES)} or None")
        self.template = ZERO_SHOT_TEMPLATES.get(dataset, DEFAULT_TEMPLATE)
        self.clip = clip.requires_grad_(False).eval()
        self._class_features = _Memo()
        self.set_classnames(classnames)

    def train(self, mode=True):
        super().train(mode)
        self.clip.eval()
        return self

    def set_classnames(self, classnames):
        if len(classnames) == 0:
            raise ValueError("ZeroShotCLIP.set_classnames: need at least one class name")
        prompts = [self.template.format(name.replace("_", " ")) for name in classnames]
        device = self.clip.logit_scale.device
        ids = tokenize(prompts, self.clip.config.context_length)  # (C, 77)
        self.text_length = text_length(ids)  # from the CPU ids: no device sync
        self.register_buffer("token_ids", ids.to(device), persistent=False)
        self._class_features.clear()

    def forward(self, images):
        return self.logits(self.image_features(images))

    def image_features(self, images):
        """(B, 3, R, R) -> global image features (B, D), not normalised."""
        return self.clip.encode_image(images)

    def logits(self, image_features):
        """(B, D) -> (B, C); class features computed once per class set and autocast setting."""
        key = (_tensor_key(self.token_ids), _autocast_key(image_features.device))
        features = self._class_features.get(key, self._compute_class_features)  # (C, D)
        return _scaled_cosine_logits(self.clip.logit_scale, image_features, features)

    @torch.no_grad()
    def _compute_class_features(self):
        text = self.clip.encode_text(self.token_ids, length=self.text_length)  # (C, D)
        with _fp32(text):
            return F.normalize(text.float(), dim=-1)


# ------------------------------------------------------------- PromptKD + TextRefiner (SPEC 11)

# Tensors OpenAI's convert_weights stores in fp16 (matrices and their biases, conv1, the
# projections); LayerNorms, embeddings and logit_scale stay fp32. Used to write teacher files
# with the released dtypes.
_FP16_SUFFIXES = ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias", "c_fc.weight",
                  "c_fc.bias", "c_proj.weight", "c_proj.bias", "conv1.weight", "proj", "text_projection")
_VPT_SHALLOW = re.compile(r"transformer\.resblocks\.(\d+)\.VPT_shallow")


def _released_dtype(key, tensor):
    return tensor.half() if key.endswith(_FP16_SUFFIXES) else tensor.float()


def write_teacher_checkpoint(path, clip_state_dict, classnames, depth=9, n_ctx=4, seed=0, prompt_std=0.02,
                             zero_shot_state_dict=None):
    """Write a PromptSRC teacher file laid out as PromptKD's released ones (SPEC 11.1,
    promptkd_released.md B4), for tests and the PromptKD demo: Dassl's
    {'state_dict', 'epoch', 'optimizer', 'scheduler', 'val_result'}, where 'scheduler' pickles
    a scheduler object holding an SGD optimiser, as Dassl does (read_dassl_file must not run it).

    clip_state_dict: OpenAI-named weights of the teacher's CLIP (the file stores them as
    image_encoder.* / text_encoder.* / logit_scale in OpenAI's fp16/fp32 dtypes, without
    token_embedding, as PromptSRC does). classnames: the classes it was trained on (the
    prompt_learner.token_prefix / token_suffix rows, built with clip_state_dict's
    token_embedding). depth, n_ctx: deep prompts in both towers, N(0, prompt_std^2), seeded:
    prompt_learner.ctx (n_ctx, text width) fp16, text_encoder / image_encoder
    transformer.resblocks.{1..depth-1}.VPT_shallow and image_encoder.VPT fp32.
    zero_shot_state_dict: the CLIP PromptSRC keeps frozen as prompt_learner.ZS_image_encoder
    (default clip_state_dict). Returns the written 'state_dict'.
    """
    config = clip_model.config_from_state_dict(clip_state_dict)
    if not 1 <= depth <= min(config.vision_layers, config.transformer_layers) or n_ctx < 1:
        raise ValueError(f"write_teacher_checkpoint: depth must be in 1..{min(config.vision_layers, config.transformer_layers)} "
                         f"and n_ctx >= 1, got depth={depth}, n_ctx={n_ctx}")
    g = torch.Generator().manual_seed(seed)

    def prompt(width):
        return torch.randn(n_ctx, width, generator=g) * prompt_std

    sd = {k: v.detach().cpu() for k, v in clip_state_dict.items() if k not in clip_model.JIT_EXTRA_KEYS}
    zero_shot = sd if zero_shot_state_dict is None else zero_shot_state_dict
    names = [name.replace("_", " ") for name in classnames]
    ids = tokenize([" ".join(["X"] * n_ctx) + f" {name}." for name in names], config.context_length)
    embedded = sd["token_embedding.weight"][ids]  # (m, 77, W)
    state = {"logit_scale": sd["logit_scale"].float(),
             "prompt_learner.ctx": prompt(config.transformer_width).half(),
             "prompt_learner.token_prefix": embedded[:, :1].half(),
             "prompt_learner.token_suffix": embedded[:, 1 + n_ctx:].half()}
    for key, value in zero_shot.items():
        if key.startswith("visual."):
            state["prompt_learner.ZS_image_encoder." + key[7:]] = _released_dtype(key, value.detach().cpu())
    state["image_encoder.VPT"] = prompt(config.vision_width)
    for i in range(1, depth):
        state[f"image_encoder.transformer.resblocks.{i}.VPT_shallow"] = prompt(config.vision_width)
        state[f"text_encoder.transformer.resblocks.{i}.VPT_shallow"] = prompt(config.transformer_width)
    for key, value in sd.items():
        if key.startswith("visual."):
            state["image_encoder." + key[7:]] = _released_dtype(key, value)
        elif key not in ("logit_scale", "token_embedding.weight"):
            state["text_encoder." + key] = _released_dtype(key, value)
    trained = [state[k] for k in state if "VPT" in k or k == "prompt_learner.ctx"]
    optimizer = torch.optim.SGD([nn.Parameter(t.float().clone()) for t in trained], lr=0.005, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=20)
    checkpoint = dict(state_dict=state, epoch=20, optimizer=optimizer.state_dict(),
                      scheduler=dict(successor=scheduler, last_epoch=20), val_result=None)
    tmp = f"{path}.tmp"
    torch.save(checkpoint, tmp)
    os.replace(tmp, path)
    return state


class PromptSRCTeacher(nn.Module):
    """PromptKD's frozen teacher (SPEC 11.1): a CLIP (ViT-L/14) with PromptSRC / IVLP deep
    prompts in both towers. logits(images) -> exp(logit_scale) * normalise(v_T) t_T^T (B, n);
    the class features t_T are computed once per class set (and autocast setting), not per
    batch. Nothing in it trains; it stays in eval mode. Build it with from_checkpoint.
    """

    def __init__(self, clip, ctx, text_prompts, visual_prompts, classnames, path=None):
        """clip: the teacher CLIP with the file's weights; ctx (n, W_text) the text context
        at the input; text_prompts (depth_text - 1, n, W_text) for text blocks 1..;
        visual_prompts (depth_vision, n_vision, W_vision) as CLIP.encode_image takes them."""
        super().__init__()
        self.clip = clip.requires_grad_(False).eval()
        n_ctx = ctx.shape[0]
        # "X X X X {name}.": only the token layout matters, the loaded ctx replaces positions 1..n
        self.prompt_learner = PromptLearner(clip, classnames, n_ctx=n_ctx, ctx_init=" ".join(["X"] * n_ctx))
        self.prompt_learner.ctx.requires_grad_(False).copy_(ctx)
        self.register_buffer("text_prompts", text_prompts.float().clone())
        self.register_buffer("visual_prompts", visual_prompts.float().clone())
        self.path = path
        self._class_features = _Memo()

    @classmethod
    def from_checkpoint(cls, clip, path, classnames, num_trained_classes=None, *, trained_classnames=None):
        """The teacher of one of PromptKD's released files (or write_teacher_checkpoint's).

        clip: the CLIP the teacher was trained from (OpenAI ViT-L/14): it supplies the
        architecture and token_embedding, which the file does not hold; every CLIP weight the
        file holds replaces clip's (PromptSRC's weight averaging may have changed them), in a
        new model: clip itself is left as it is. The file is read tensors-only
        (clip_model.read_dassl_file: no code from it runs). Keys (SPEC 11.1):
        prompt_learner.ctx, text_encoder.* and image_encoder.* (CLIP weights, and the deep
        prompts image_encoder.VPT and {text,image}_encoder.transformer.resblocks.{i}.VPT_shallow,
        whose count and shape give each tower's depth and token count), logit_scale;
        prompt_learner.token_prefix / token_suffix are rebuilt from classnames, and
        prompt_learner.ZS_image_encoder.* (PromptSRC's frozen zero-shot copy) is ignored.

        The file's own prefix / suffix rows say which classes the teacher was trained on: one
        row per class (token_prefix's row count, checked against the count expected), and
        token_suffix holds token_embedding of "a photo of a {name}." after the 4 context
        tokens, i.e. of "{name}.", EOT and padding (promptkd_released.md B2). When the names
        of the trained classes are known, those rows are checked against the prompts of these
        names with clip's token_embedding, so a teacher of another dataset (or another class
        order) with the same class count is refused too. A file without token_suffix is
        checked by its class count only.

        Which classes the teacher must have been trained on, in its label order:
        trained_classnames, if given (base2new: the dataset's first ceil(n/2) classes);
        else num_trained_classes, a count whose names are unknown here (cross-dataset:
        1000 for ImageNet-xd), so the rows are not compared; else (default) the first
        ceil(n/2) of the n classnames (base2new) or all n. Pass at most one of the two.
        """
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"teacher file {path}: no such file")
        try:
            content = clip_model.read_dassl_file(path)
        except Exception as e:  # not a torch file, cut short, ...
            raise ValueError(f"teacher file {path}: unreadable ({str(e).splitlines()[0][:200]})") from None
        if not isinstance(content, dict) or not isinstance(content.get("state_dict"), dict):
            raise ValueError(f"teacher file {path}: not a Dassl checkpoint (no 'state_dict' entry)")
        weights, ctx, text, visual, unknown = {}, None, {}, {}, []
        for key, value in content["state_dict"].items():
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"teacher file {path}: {key} is a {type(value).__name__}, expected a tensor")
            tower, _, rest = key.partition(".")
            deep = _VPT_SHALLOW.fullmatch(rest)
            if key == "logit_scale":
                weights[key] = value
            elif key == "prompt_learner.ctx":
                ctx = value
            elif tower == "prompt_learner":
                pass  # token_prefix/suffix: rebuilt; ZS_image_encoder: not part of the teacher
            elif tower == "image_encoder" and rest == "VPT":
                visual[0] = value
            elif tower in ("image_encoder", "text_encoder") and deep:
                (visual if tower == "image_encoder" else text)[int(deep.group(1))] = value
            elif tower == "image_encoder":
                weights["visual." + rest] = value
            elif tower == "text_encoder":
                weights[rest] = value
            else:
                unknown.append(key)
        if unknown:
            raise ValueError(f"teacher file {path}: unexpected keys {unknown[:5]}; a PromptSRC teacher holds "
                             f"logit_scale, prompt_learner.*, image_encoder.* and text_encoder.* only")
        trained_names = cls._check_class_count(path, content["state_dict"], classnames, num_trained_classes,
                                               trained_classnames)

        own = clip.state_dict()
        for key, value in weights.items():
            if key not in own or own[key].shape != value.shape:
                found = "no such CLIP weight" if key not in own else f"CLIP has {tuple(own[key].shape)}"
                raise ValueError(f"teacher file {path}: {key} {tuple(value.shape)} does not fit the CLIP given "
                                 f"({found}); pass the CLIP the teacher was trained from (ViT-L/14)")
        config = clip.config
        ctx, text_prompts = cls._stack_prompts(path, ctx, text, "text_encoder", "prompt_learner.ctx",
                                               config.transformer_width, config.transformer_layers)
        vpt, visual_deep = cls._stack_prompts(path, visual.pop(0, None), visual, "image_encoder",
                                              "image_encoder.VPT", config.vision_width, config.vision_layers)
        visual_prompts = torch.cat([vpt[None], visual_deep])  # (depth, n, W): row 0 at the input
        suffix = content["state_dict"].get("prompt_learner.token_suffix")
        if suffix is not None and trained_names is not None:
            cls._check_trained_classes(path, suffix, clip, ctx.shape[0], trained_names)
        device = clip.logit_scale.device
        teacher_clip = clip_model.build_model({**own, **{k: v.to(device) for k, v in weights.items()}})
        return cls(teacher_clip, ctx.to(device), text_prompts.to(device), visual_prompts.to(device),
                   classnames, path=path)

    @staticmethod
    def _check_class_count(path, state_dict, classnames, num_trained_classes, trained_classnames):
        """The file's class count (token_prefix rows) against the one expected (from_checkpoint)
        -> the names of the classes the teacher was trained on, in its row order, or None where
        only their count is known (num_trained_classes)."""
        if num_trained_classes is not None and trained_classnames is not None:
            raise ValueError("PromptSRCTeacher.from_checkpoint: pass num_trained_classes or trained_classnames, "
                             "not both")
        prefix = state_dict.get("prompt_learner.token_prefix")
        if prefix is None:
            raise ValueError(f"teacher file {path}: no prompt_learner.token_prefix, so the classes it was "
                             f"trained on are unknown; not a PromptSRC teacher file?")
        trained, n = prefix.shape[0], len(classnames)
        if trained_classnames is not None:
            expected = {len(trained_classnames)}
        elif num_trained_classes is not None:
            expected = {num_trained_classes}
        else:
            expected = {math.ceil(n / 2), n}
        if trained not in expected:
            wanted = " or ".join(str(c) for c in sorted(expected))
            raise ValueError(f"teacher file {path}: trained on {trained} classes (prompt_learner.token_prefix "
                             f"rows), expected {wanted} for these {n} classes; another dataset's teacher?")
        if trained_classnames is not None:
            return list(trained_classnames)
        return None if num_trained_classes is not None else list(classnames[:trained])

    @staticmethod
    def _check_trained_classes(path, suffix, clip, n_ctx, names):
        """The file's prompt_learner.token_suffix (m, L - 1 - n_ctx, W) against the same rows
        built, as PromptSRC built them, from `names` (the m classes the teacher must have been
        trained on) with clip's token_embedding, which the file does not hold."""
        # The prompt learner the teacher itself uses: its context words only fill positions 1..n_ctx.
        learner = PromptLearner(clip, names, n_ctx=n_ctx, ctx_init=" ".join(["X"] * n_ctx))
        expected = learner.token_suffix.float()  # (m, L - 1 - n_ctx, W)
        if tuple(suffix.shape) != tuple(expected.shape):
            raise ValueError(f"teacher file {path}: prompt_learner.token_suffix has shape {tuple(suffix.shape)}, "
                             f"expected {tuple(expected.shape)} (a row per trained class, the prompt positions "
                             f"after SOT and the {n_ctx} context tokens, the CLIP's text width)")
        # Relative L2 error of each token vector, 1e-2 at most. The buffer x is fp16 (ViT-L-14.pt's
        # token_embedding is), but PromptSRC's Gaussian weight averaging saves the whole state dict
        # as the fp16 sum over its 20 epochs of round16(w_i x), sum w_i = 1, w_i > 0: the products
        # round by <= 2^-11 w_i |x| (together 2^-11 |x|) and each of the 19 additions by <= 2^-11 |x|
        # (every partial sum is <= |x|), so <= 20 * 2^-11 = 0.98e-2 relative per element in the
        # worst case (fp16 subnormals: 2^-25 absolute, nothing against a vector's norm), and
        # per vector; ~1e-3 typically, as the roundings cancel. Another class name puts other
        # token ids at some position, i.e. another row of token_embedding, off by O(1) there.
        error = (suffix.to(expected.device).float() - expected).norm(dim=-1)  # (m, L - 1 - n_ctx)
        wrong = (error > 1e-2 * expected.norm(dim=-1)).any(dim=1)  # (m,)
        if wrong.any():
            first = int(wrong.nonzero()[0])
            raise ValueError(f"teacher file {path}: trained on other classes: {int(wrong.sum())} of its "
                             f"{len(names)} class prompts (prompt_learner.token_suffix rows) differ from ours, "
                             f"the first at row {first} (our {names[first]!r}); another dataset's teacher, or "
                             f"another class order? Pass the dataset's own teacher")

    @staticmethod
    def _stack_prompts(path, first, deep, tower, first_key, width, layers):
        """-> (first (n, width), deep prompts (k, n, width) of blocks 1..k), checked: blocks
        1..k all present, k < layers, every tensor (n, width)."""
        if first is None:
            raise ValueError(f"teacher file {path}: no {first_key}: not a PromptSRC / IVLP teacher file")
        k = max(deep, default=0)
        absent = [i for i in range(1, k + 1) if i not in deep]
        if absent:
            raise ValueError(f"teacher file {path}: {tower}.transformer.resblocks.{absent[0]}.VPT_shallow is "
                             f"missing, yet block {k} has one: the deep prompts must cover blocks 1..{k}")
        if k >= layers:
            raise ValueError(f"teacher file {path}: {tower} has VPT_shallow up to block {k}, but the CLIP "
                             f"given has {layers} blocks")
        for key, value in [(first_key, first)] + [(f"{tower}.transformer.resblocks.{i}.VPT_shallow", deep[i])
                                                   for i in range(1, k + 1)]:
            if value.dim() != 2 or tuple(value.shape) != (first.shape[0], width):
                raise ValueError(f"teacher file {path}: {key} has shape {tuple(value.shape)}, expected "
                                 f"({first.shape[0]}, {width}) like {first_key} and the CLIP's width")
        stacked = torch.stack([deep[i].float() for i in range(1, k + 1)]) if k else first.new_zeros(0, *first.shape)
        return first.float(), stacked.float()

    @property
    def depth(self):
        """(text depth, vision depth): 1 + the blocks with deep prompts."""
        return 1 + self.text_prompts.shape[0], self.visual_prompts.shape[0]

    def train(self, mode=True):
        return super().train(False)  # frozen: always in eval mode

    def set_classnames(self, classnames):
        self.prompt_learner.set_classnames(classnames)
        self._class_features.clear()

    def class_features_key(self):
        """What class_features() depends on: the class set, the autocast setting, and the
        prompts' tensor (so a move to another device or dtype is not served stale features)."""
        return (self.prompt_learner.generation, _tensor_key(self.text_prompts),
                _autocast_key(self.text_prompts.device))

    def class_features(self):
        """Normalised teacher text features t_T (n, D_T) fp32, once per class set."""
        return self._class_features.get(self.class_features_key(), self._compute_class_features)

    @torch.no_grad()
    def _compute_class_features(self):
        prompts, ids = self.prompt_learner()
        text = self.clip.encode_prompts(prompts, ids, length=self.prompt_learner.text_length,
                                        deep_prompts=self.text_prompts if len(self.text_prompts) else None)
        with _fp32(text):
            return F.normalize(text.float(), dim=-1)

    @torch.no_grad()
    def forward(self, images):
        """(B, 3, R, R) -> teacher logits z_T (B, n) fp32."""
        image_features = self.clip.encode_image(images, prompts=self.visual_prompts)  # (B, D_T)
        return _scaled_cosine_logits(self.clip.logit_scale, image_features, self.class_features())


def _kl_per_element(student_logits, teacher_probs, temperature):
    """PromptKD's distillation loss: T^2 * KL(p_T || softmax(z_S / T)) summed over every
    element and divided by their count (not batchmean). fp32."""
    log_student = F.log_softmax(student_logits / temperature, dim=-1)
    kl = F.kl_div(log_student, teacher_probs, reduction="sum")  # xlogy: p_T = 0 terms are 0
    return temperature**2 * kl / student_logits.numel()


class PromptKDCLIP(nn.Module):
    """PromptKD (CVPR 2024) student with TextRefiner (SPEC 11): a frozen CLIP image tower
    (ViT-B/16) with trainable deep visual prompts, image_proj (D_S -> D_T) and a TextRefiner
    whose classifier is the frozen teacher's class text, refined; distilled from the teacher's
    logits without labels. refiner=False is plain PromptKD. The student's text tower is unused.
    """

    # Trainable visual prompts and image_proj: image features change with every step, so an
    # evaluation loop must not reuse them across evaluations (TextRefinerCLIP says True).
    frozen_image_features = False
    loss_keys = ("loss", "loss_kd", "loss_local", "loss_reg")

    def __init__(self, clip, teacher, classnames, depth=9, n_ctx=4, kd_weight=1000.0, temperature=1.0,
                 cache_size=25, alpha=0.2, momentum=0.8, topk=5, refiner=True):
        super().__init__()
        config = clip.config
        if not 1 <= depth <= config.vision_layers or n_ctx < 1:
            raise ValueError(f"PromptKDCLIP: depth must be in 1..{config.vision_layers} and n_ctx >= 1, "
                             f"got depth={depth}, n_ctx={n_ctx}")
        if temperature <= 0:
            raise ValueError(f"PromptKDCLIP: temperature must be > 0, got {temperature}")
        self.clip = clip.requires_grad_(False).eval()
        self.teacher = teacher.requires_grad_(False).eval()
        self.teacher.set_classnames(classnames)
        teacher_dim = teacher.clip.config.embed_dim
        self.visual_prompts = nn.Parameter(torch.empty(depth, n_ctx, config.vision_width).normal_(std=0.02))
        self.image_proj = FeatureAlign(config.embed_dim, teacher_dim)
        self.refiner = (TextRefiner(teacher_dim, cache_size, alpha, momentum, topk, token_dim=config.embed_dim)
                        if refiner else None)
        self.kd_weight, self.temperature = kd_weight, temperature
        self._class_features = _Memo()

    def train(self, mode=True):
        super().train(mode)
        self.clip.eval()
        self.teacher.eval()
        self._class_features.clear()
        return self

    def set_classnames(self, classnames):
        """The teacher's class features for these classes (base -> new, another dataset)."""
        self.teacher.set_classnames(classnames)
        self._class_features.clear()

    def set_process_group(self, group):
        """DDP: both BatchNorms' statistics over `group` (SyncBatchNorm semantics), the cache
        updates combined over it."""
        self.image_proj.process_group = group
        if self.refiner is not None:
            self.refiner.set_process_group(group)

    def forward(self, images, labels=None):
        """Training: dict of loss, loss_kd, loss_local, loss_reg (unweighted terms; 0 for the
        last two without refiner), logits z_S (B, n); updates the cache. labels are ignored
        (PromptKD distils unlabelled images). Eval: logits (B, n)."""
        if not self.training:
            return self.logits(self.image_features(images))
        teacher_logits = self.teacher(images)  # (B, n) no grad
        t = self.teacher.class_features()  # (n, D_T), normalised
        if self.refiner is None:
            glob = self.clip.encode_image(images, prompts=self.visual_prompts)  # (B, D_S)
        else:
            glob, tokens, cls_attn = self.clip.encode_image(images, return_tokens=True, prompts=self.visual_prompts)
        with _fp32(t):
            g = F.normalize(self.image_proj(glob.float()), dim=-1)  # (B, D_T)
            scale = self.clip.logit_scale.exp().float()
            teacher_probs = F.softmax(teacher_logits.float() / self.temperature, dim=-1)  # (B, n)
            if self.refiner is None:
                logits = scale * g @ t.t()  # (B, n)
                loss_kd = _kl_per_element(logits, teacher_probs, self.temperature)
                zero = loss_kd.new_zeros(())
                return dict(loss=self.kd_weight * loss_kd, loss_kd=loss_kd, loss_local=zero, loss_reg=zero,
                            logits=logits)
            refined = self.refiner.refine(t)  # (n, D_T), reads the cache before this step's update
            logits = scale * g @ refined.t()  # (B, n)
            aligned = self.refiner.align_tokens(tokens)  # (B, T, D_T)
            local = self.refiner.semantic_tokens(aligned, cls_attn)  # (B, k+2, D_T)
            local_logits = scale * local.flatten(0, 1) @ t.t()  # (B*(k+2), n)
            loss_kd = _kl_per_element(logits, teacher_probs, self.temperature)
            loss_local = _kl_per_element(local_logits, teacher_probs.repeat_interleave(local.shape[1], dim=0),
                                         self.temperature)
            loss_reg = F.l1_loss(F.normalize(refined, dim=-1), t)
            loss = self.kd_weight * (loss_kd + loss_local / 100 + loss_reg / 50)
        self.refiner.update_cache(aligned)
        return dict(loss=loss, loss_kd=loss_kd, loss_local=loss_local, loss_reg=loss_reg, logits=logits)

    def image_features(self, images):
        """(B, 3, R, R) -> image_proj(prompted global feature) (B, D_T), not normalised; BN
        with running statistics in eval mode."""
        glob = self.clip.encode_image(images, prompts=self.visual_prompts)  # (B, D_S)
        return self.image_proj(glob.float())

    def logits(self, image_features):
        """Eval logits (B, n) from image_features(images): the refined teacher classifier,
        computed once per class set and trained state."""
        key = (self.teacher.class_features_key(), None if self.refiner is None else self.refiner.state_key())
        features = self._class_features.get(key, self._compute_class_features)  # (n, D_T)
        return _scaled_cosine_logits(self.clip.logit_scale, image_features, features)

    @torch.no_grad()
    def _compute_class_features(self):
        t = self.teacher.class_features()
        return t if self.refiner is None else self.refiner.refine(t)

    def trainable_state_dict(self):
        """SPEC 11.5 names: visual_prompts, image_proj.{fc1,bn,fc2}.*, refiner.* (no CLIP or
        teacher weights)."""
        state = {"visual_prompts": self.visual_prompts.detach()}
        state.update(self.image_proj.state_dict(prefix="image_proj."))
        if self.refiner is not None:
            state.update(self.refiner.state_dict(prefix="refiner."))
        return state

    def load_trainable_state_dict(self, state_dict):
        _load_trainable(self, state_dict)
        self._class_features.clear()
