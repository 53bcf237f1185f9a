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

The refiner maths, the losses and the cache are fp32 even under autocast.
"""
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

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
    """Linear -> BatchNorm1d -> ReLU -> Linear, token-wise (SPEC 4 `align`).

    Training uses batch statistics through kernels.feature_align (summed over the process
    group when one is set) and updates bn's running statistics as nn.BatchNorm1d would.
    """

    def __init__(self, dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, dim)
        self.bn = nn.BatchNorm1d(dim)
        self.fc2 = nn.Linear(dim, dim)
        self.process_group = None

    def forward(self, x):  # (N, D) -> (N, D) fp32
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
    """Feature alignment, local cache and aggregation of SPEC 4, for any prompt learner."""

    def __init__(self, embed_dim, cache_size=25, alpha=0.2, momentum=0.8, topk=5):
        super().__init__()
        if cache_size < 1 or topk < 1:
            raise ValueError(f"TextRefiner: cache_size and topk must be >= 1, got {cache_size}, {topk}")
        self.align = FeatureAlign(embed_dim)
        self.extractor = nn.Linear(2 * embed_dim, embed_dim, bias=False)
        # Not a parameter (no gradient), but persistent: every checkpoint carries it.
        self.register_buffer("cache", F.normalize(torch.rand(cache_size, embed_dim), dim=-1))  # (M, D)
        self.alpha, self.momentum, self.topk = alpha, momentum, topk
        self.process_group = None

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
        """(B, T, D) last-block image tokens -> aligned tokens (B, T, D) fp32."""
        b, n, d = tokens.shape
        return self.align(tokens.reshape(b * n, d)).reshape(b, n, d)

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
            self.refiner.process_group = group
            self.refiner.align.process_group = group

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
        refiner = self.refiner
        key = (self.prompt_learner.generation, _tensor_key(ctx), _autocast_key(ctx.device),
               None if refiner is None else
               (_tensor_key(refiner.cache), _tensor_key(refiner.extractor.weight), refiner.alpha))
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
        own = self.trainable_state_dict()
        missing = sorted(own.keys() - state_dict.keys())
        unexpected = sorted(state_dict.keys() - own.keys())
        mismatched = [f"{k}: checkpoint {tuple(state_dict[k].shape)}, model {tuple(own[k].shape)}"
                      for k in sorted(own.keys() & state_dict.keys())
                      if state_dict[k].shape != own[k].shape]
        if missing or unexpected or mismatched:
            raise ValueError("TextRefinerCLIP.load_trainable_state_dict: state dict does not match "
                             f"the model; missing keys {missing}, unexpected keys {unexpected}, "
                             f"shape mismatches {mismatched}")
        with torch.no_grad():
            for name, tensor in own.items():
                tensor.copy_(state_dict[name])  # state_dict() tensors share storage with the model
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
