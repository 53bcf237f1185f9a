"""TextRefiner (AAAI 2025, "TextRefiner: Internal Visual Feature as Efficient Refiner for
Vision-Language Models Prompt Tuning", arXiv 2412.08176): a refiner any CLIP prompt learner
plugs in.

The method. t = the L2-normalised class text features (C, D) of a prompt learner; a cache of
M = 25 unit vectors (M, D); from ONE pass of the frozen image tower, the last block's tokens
(B, T, D) (CLS and patches, after ln_post @ proj) and the CLS query's head-averaged attention
over the patches.

    refined = t + alpha * extractor([t, softmax(t cache^T) cache])
              (alpha 0.2, extractor Linear(2D, D, no bias); refined is not re-normalised)
    logits  = exp(logit_scale) * normalise(image feature) refined^T
    X       = align(tokens): Linear -> BatchNorm (over all B*T tokens) -> ReLU -> Linear
    local   = X at the CLS token, at the 5 patches of highest CLS attention, and mean(X)  (B, 7, D)
    loss    = CE(logits, y) + CE(exp(logit_scale) local t^T, y) / 50
              + 20 * mean |normalise(refined) - t|
    cache   : after the step's forward, no gradient, fp32: each normalised aligned token x_n
              goes to its most similar slot a_n with weight exp(S[n, a_n] - max_n' S[n', a_n]),
              S = X^ cache^T; a slot that received tokens becomes 0.8 slot + 0.2 (weighted sum
              of its tokens); all rows renormalised.

At test time nothing is aligned or updated: `refined` depends on no image, so it is computed
once per evaluation. Trainable: align and extractor (1,050,624 values at D = 512); the cache is
saved state. The refiner maths, the losses and the cache are fp32 even under autocast.

Reading order: FeatureAlign and TextRefiner (the method; `train_terms` is the refiner's share of
a training step); Recipe and PromptCLIP (what train.py, eval.py and bench.py need from any
prompt learner: a host is one PromptCLIP class built from one Recipe dataclass); then the worked
example, CoOp + TextRefiner (TextRefinerCLIP), and zero-shot CLIP. hosts.py holds the other
hosts (PromptKD, CoCoOp, KgCoOp, IVLP, MaPLe, PromptSRC); METHODS names them all for --method.

    import clip_model, textrefiner
    model = textrefiner.TextRefinerCLIP(clip_model.load_clip("ViT-B/16"), classnames)
    model.train(); out = model(images, labels); out["loss"].backward()   # updates the cache
    model.eval();  logits = model(images)                                # class features once
    model.set_classnames(new_classnames)                                 # base -> new
    torch.save(model.trainable_state_dict(), "ckpt.pt")                  # no CLIP weights

In your own prompt learner (with a RefinerRecipe it has self.refiner; t may be (B, C, D)):

    image, tokens, cls_attn = textrefiner.image_pass(self, images)  # one pass of the frozen tower
    out = textrefiner.refined_ce(self, t, image, labels, tokens, cls_attn)  # the loss above
"""
import dataclasses
import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import clip_model
import data
from clip_model import text_length, tokenize
from kernels import cache_update, feature_align


def fp32(tensor):
    """Context in which autocast is off on the tensor's device (refiner maths stays fp32)."""
    return torch.autocast(tensor.device.type, enabled=False)


def scaled_cosine_logits(logit_scale, image_features, class_features):
    """logit_scale.exp() * normalise(image_features) @ class_features^T: (B, D), (C, D) -> (B, C)
    fp32. class_features are used as given (normalised, or refined)."""
    with fp32(image_features):
        image = F.normalize(image_features.float(), dim=-1)
        return logit_scale.exp().float() * image @ class_features.t()

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
            y, mean, var = feature_align(
                x, self.fc1.weight, self.fc1.bias, self.bn.weight, self.bn.bias, self.fc2.weight,
                self.fc2.bias, eps=self.bn.eps, process_group=self.process_group)
            self._update_running_stats(mean.detach(), var.detach(), x.shape[0])
        return y

    @torch.no_grad()
    def _update_running_stats(self, mean, var, rows):
        """As nn.BatchNorm1d, except that a batch whose statistics are not finite (an fp16 overflow,
        a step the gradient scaler skips) leaves them as they were instead of poisoning them for
        good. mean/var are the group's, so every rank decides alike, on the device (no sync)."""
        if self.process_group is None:
            if rows < 2:
                raise ValueError(f"FeatureAlign: batch statistics need 2 tokens or more, got {rows}")
            n = float(rows)
        else:  # the global token count, summed on the device
            n = torch.full((), float(rows), device=mean.device)
            dist.all_reduce(n, op=dist.ReduceOp.SUM, group=self.process_group)
        finite = torch.isfinite(mean).all() & torch.isfinite(var).all()  # () bool
        momentum, unbiased = self.bn.momentum, var * n / (n - 1)  # unbiased: as BatchNorm1d
        for running, batch in ((self.bn.running_mean, mean), (self.bn.running_var, unbiased)):
            running.copy_(torch.where(finite, (1 - momentum) * running + momentum * batch, running))
        self.bn.num_batches_tracked.add_(finite.long())


class TextRefiner(nn.Module):
    """Feature alignment, local cache and aggregation, for any prompt learner.

    embed_dim: the width of the text features refined (and of the cache); token_dim: the width
    of the image tokens aligned to it (default embed_dim; PromptKD: 512-d tokens, 768-d teacher
    text)."""

    def __init__(self, embed_dim, cache_size=25, alpha=0.2, momentum=0.8, topk=5, token_dim=None):
        super().__init__()
        if cache_size < 1 or topk < 1:
            raise ValueError(f"TextRefiner: cache_size and topk must be >= 1, got {cache_size}, "
                             f"{topk}")
        self.align = FeatureAlign(embed_dim if token_dim is None else token_dim, embed_dim)
        self.extractor = nn.Linear(2 * embed_dim, embed_dim, bias=False)
        # Not a parameter (no gradient), but persistent: every checkpoint carries it.
        cache = F.normalize(torch.rand(cache_size, embed_dim), dim=-1)  # (M, D)
        self.register_buffer("cache", cache)
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
            # a snapshot: this step's in-place cache update must not touch what autograd saved
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
        # (B, k); +1 skips the CLS slot
        patches = cls_attn.float().topk(self.topk, dim=-1).indices + 1
        index = torch.cat([patches.new_zeros(b, 1), patches], dim=1)  # (B, k+1)
        picked = aligned.gather(1, index[:, :, None].expand(-1, -1, d))  # (B, k+1, D)
        return torch.cat([picked, aligned.mean(dim=1, keepdim=True)], dim=1)  # (B, k+2, D)

    @torch.no_grad()
    def update_cache(self, aligned_tokens):
        """Momentum update of the cache from this step's aligned tokens (B, T, D), combined over
        the process group when one is set (every rank holds the same cache). A batch with a
        non-finite token anywhere in the group leaves the cache unchanged."""
        tokens = aligned_tokens.detach().reshape(-1, aligned_tokens.shape[-1])  # (N, D)
        self.cache.copy_(cache_update(tokens, self.cache, self.momentum, process_group=self.process_group))

    def train_terms(self, t, tokens, cls_attn, scale):
        """The refiner's share of a training step, for any prompt learner.

        t: normalised class text features (C, D), or per image (B, C, D); tokens
        (B, T, token_dim) and cls_attn (B, T - 1) from clip.encode_image(x, return_tokens=True)
        (prompt tokens left out); scale = exp(logit_scale). -> (refined classifier like t, local
        logits (B, k+2, C) of the local tokens against the UNREFINED t, the L1 regulariser).
        Reads the cache, then updates it from this batch's aligned tokens."""
        with fp32(t):
            refined = self.refine(t)  # reads the cache before this step's update
            aligned = self.align_tokens(tokens)  # (B, T, D)
            local = self.semantic_tokens(aligned, cls_attn)  # (B, k+2, D)
            local_logits = scale * local @ t.float().transpose(-1, -2)  # (B, k+2, C)
            loss_reg = F.l1_loss(F.normalize(refined, dim=-1), t.float())
        self.update_cache(aligned)
        return refined, local_logits, loss_reg

# ------------------------------------------------------------------ the prompt-learner interface


@dataclass(frozen=True)
class Range:
    """The numbers a setting allows: ok(value), and the words an error uses ("positive"). NaN
    fails every range."""
    ok: Callable
    text: str


POSITIVE = Range(lambda v: v > 0 and math.isfinite(v), "positive")
NON_NEGATIVE = Range(lambda v: v >= 0 and math.isfinite(v), ">= 0")
UNIT = Range(lambda v: 0 <= v <= 1, "in [0, 1]")
BELOW_ONE = Range(lambda v: 0 <= v < 1, "in [0, 1)")
FINITE = Range(math.isfinite, "a finite number")


class RecipeError(ValueError):
    """A recipe value a model cannot take. `field` names it; the command lines name its flag."""

    def __init__(self, field, problem):
        super().__init__(f"{field} {problem}")
        self.field, self.problem = field, problem


def setting(default, allowed=None, required=None, textrefiner=False):
    """A recipe field: its default; allowed, a Range or a tuple of choices; required, what to pass
    when it is None and a run needs it; textrefiner marks TextRefiner's own settings."""
    return dataclasses.field(default=default, metadata=dict(allowed=allowed, required=required,
                                                            textrefiner=textrefiner))


def rules(recipe):
    """{field: the metadata setting() declared for it}: the nearest class in the recipe's MRO that
    declared the field with setting() decides, so that a plain redeclaration in a subclass
    (epochs: int = 20) changes the default and keeps the parent's range."""
    recipe = recipe if isinstance(recipe, type) else type(recipe)
    found = {}
    for cls in reversed(recipe.__mro__):
        for name, field in getattr(cls, "__dataclass_fields__", {}).items():
            if field.metadata or name not in found:
                found[name] = field.metadata
    return found


@dataclass
class Recipe:
    """A method's hyper-parameters: train.py makes a flag --field-name of every field of the
    --method's recipe (unset: the default here). A method's recipe subclasses this one, overrides
    defaults and adds its own fields; a resumed run must repeat them."""
    epochs: int = setting(10, POSITIVE)
    batch_size: int = setting(32, POSITIVE)  # global, split across the ranks
    optimizer: str = setting("sgd", ("sgd", "adamw"))
    lr: float = setting(0.002, POSITIVE)
    momentum: float = setting(0.9, BELOW_ONE)  # SGD's
    weight_decay: float = setting(5e-4, NON_NEGATIVE)  # on every trainable tensor
    warmup_epochs: int = setting(1, NON_NEGATIVE)  # at warmup_lr, then cosine from lr, per epoch
    warmup_lr: float = setting(1e-5, NON_NEGATIVE)
    selection: str = setting("best", ("best", "last"))  # tested: the best val epoch, or the last
    # Fields naming weights the model is built from besides --clip: recorded with their SHA-256 when
    # they are files, and eval.py takes them as flags (default: the run's).
    weight_files: ClassVar[tuple] = ()
    xd: ClassVar[dict] = {}  # the cross-dataset protocol's values (train.py --xd) that differ

    @classmethod
    def few_shot(cls, shots, dataset):  # the few-shot protocol's values that differ (--few-shot)
        return {}

    def __post_init__(self):
        for name, rule in rules(self).items():  # None: a value filled in later (for_run, a flag)
            value, allowed = getattr(self, name), rule.get("allowed")
            if isinstance(allowed, Range) and value is not None and not allowed.ok(value):
                raise RecipeError(name, f"must be {allowed.text}, got {value}")
            if isinstance(allowed, tuple) and value is not None and value not in allowed:
                raise RecipeError(name, f"must be one of {', '.join(map(str, allowed))}, got {value!r}")
        if not self.warmup_epochs < self.epochs:
            raise RecipeError("warmup_epochs", f"must be in [0, epochs), got {self.warmup_epochs}: pass "
                                               f"warmup_epochs 0 to train {self.epochs} epoch(s) without warm-up")

    def for_run(self, dataset, subsample, classnames):
        """This recipe for one run, before any weights load: values that depend on the dataset
        (fields still None), files resolved, checks against every class name the run meets (base
        and new). dataset None: no dataset in particular (benchmarks). Default: this recipe."""
        return self


@dataclass
class RefinerRecipe(Recipe):
    """TextRefiner's settings, in the recipe of every host it plugs into. A host's recipe may not
    redeclare them unless it says so with setting(..., textrefiner=True)."""
    refiner: bool = setting(True, textrefiner=True)  # False: the host alone
    cache_size: int = setting(25, POSITIVE, textrefiner=True)  # M slots
    alpha: float = setting(0.2, UNIT, textrefiner=True)  # the refinement's weight
    cache_momentum: float = setting(0.8, UNIT, textrefiner=True)
    topk: int = setting(5, POSITIVE, textrefiner=True)  # the patches of highest CLS attention
    semantic_weight: float = setting(0.02, NON_NEGATIVE, textrefiner=True)  # local loss, 1/50
    reg_weight: float = setting(20.0, NON_NEGATIVE, textrefiner=True)  # the L1 regulariser


REFINER_FIELDS = tuple(f.name for f in dataclasses.fields(RefinerRecipe)
                       if f.metadata["textrefiner"])


def build_refiner(recipe, width, clip):
    """The recipe's TextRefiner refining class features of `width` from the image tokens of `clip`,
    or None (a recipe without TextRefiner, or refiner False)."""
    if not getattr(recipe, "refiner", False):
        return None
    patches = (clip.config.image_resolution // clip.config.vision_patch_size) ** 2
    if recipe.topk > patches:
        raise RecipeError("topk", f"must be at most {patches}, the patch tokens of the CLIP's image "
                                  f"tower; got {recipe.topk}")
    return TextRefiner(width, recipe.cache_size, recipe.alpha, recipe.cache_momentum, recipe.topk,
                       token_dim=clip.config.embed_dim)


def reuses_image_features(model):
    """Whether evaluation may store a model's image features and serve them again: only when they
    come from the frozen tower, i.e. PromptCLIP's own image_features and forward, unless the model
    or a class declares frozen_image_features. The model, then the nearest class in its MRO that
    declares the flag or defines either method, decides."""
    if "frozen_image_features" in vars(model):
        return vars(model)["frozen_image_features"]
    for cls in type(model).__mro__:
        if "frozen_image_features" in vars(cls):
            return vars(cls)["frozen_image_features"]
        if "image_features" in vars(cls) or "forward" in vars(cls):
            return cls is PromptCLIP
    return False


class PromptCLIP(nn.Module):
    """What train.py, eval.py and bench.py need from a prompt learner on a frozen CLIP.

    A subclass sets `recipe` (its Recipe dataclass) and writes build (its own modules, from the
    recipe), text_features and train_forward. Construction builds the host, then, for a recipe
    with TextRefiner's settings, self.refiner (after the host's tensors, so the host starts from
    the same values with and without it), then calls set_classnames once."""
    recipe = Recipe
    loss_keys = ("loss",)  # train_forward's entries that train.py logs, "loss" first
    transductive = False  # trains on the unlabelled images of every class; selects on the test split
    frozen = ("clip",)  # submodules kept frozen and in eval mode, outside trainable_state_dict
    title = None  # the report's name of the method (None: the class name)

    def __init__(self, clip, classnames, recipe=None, **parts):
        """parts: modules a host takes ready-made instead of building them (PromptKD's teacher)."""
        super().__init__()
        if len(classnames) == 0:
            raise ValueError(f"{type(self).__name__}: need at least one class name")
        recipe = self.recipe() if recipe is None else recipe
        self.clip = clip.requires_grad_(False).eval()
        self.refiner, self._classifier = None, None
        self.build(clip, classnames, recipe, **parts)
        self.refiner = build_refiner(recipe, self.text_width(), clip)
        if self.refiner is not None:
            self.semantic_weight, self.reg_weight = recipe.semantic_weight, recipe.reg_weight
        self.set_classnames(classnames)

    def build(self, clip, classnames, recipe):
        """The host's own modules for `recipe` (RecipeError for a value this CLIP cannot take); what
        depends on the classes belongs in set_classnames, which construction calls next."""

    def text_width(self):
        """The width of the class features (what TextRefiner refines): CLIP's joint embedding."""
        return self.clip.config.embed_dim

    def train_forward(self, images, labels):
        """-> dict with "loss", the other loss_keys and "logits" (B, C)."""
        raise NotImplementedError

    def image_features(self, images):
        """(B, 3, R, R) -> (B, D), not normalised: by default the frozen tower's global feature."""
        return self.clip.encode_image(images)

    def text_features(self):
        """The normalised class features (C, D) fp32 of the current classes."""
        raise NotImplementedError

    def class_features(self):
        """(C, D) what the eval logits compare against: the text features, refined if a refiner."""
        t = self.text_features()
        return t if self.refiner is None else self.refiner.refine(t)

    def classifier_key(self, device):
        """What class_features() reads besides the class names: every tensor outside the frozen
        CLIPs (an in-place write bumps _version; .to() and loading make new storage), the
        refiner's alpha, the autocast setting."""
        clips = tuple(name + "." for name, m in self.named_modules() if isinstance(m, clip_model.CLIP))
        named = [*self.named_parameters(), *self.named_buffers()]
        tensors = [(t._version, t.data_ptr(), t.dtype) for name, t in named if not name.startswith(clips)]
        alpha = None if self.refiner is None else self.refiner.alpha
        autocast = torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type)
        return tensors, alpha, autocast

    def logits(self, image_features):
        """Eval logits (B, C): exp(logit_scale) * normalise(image_features) @ class_features()^T,
        the class features computed once per evaluation (again when classifier_key changes)."""
        key = self.classifier_key(image_features.device)
        if self._classifier is None or self._classifier[0] != key:
            with torch.no_grad():
                self._classifier = (key, self.class_features())
        return scaled_cosine_logits(self.clip.logit_scale, image_features, self._classifier[1])

    def forward(self, images, labels=None):
        if self.training:
            return self.train_forward(images, labels)
        return self.logits(self.image_features(images))

    def set_classnames(self, classnames):
        """Subclasses rebuild what depends on the classes, then call this."""
        self.forget_classifier()

    def forget_classifier(self):
        """The next evaluation batch computes class_features() again."""
        self._classifier = None

    def epoch_end(self, epoch, epochs):
        """Called by the training loop after the steps of epoch `epoch` (0-based) of `epochs`,
        before validation and the checkpoint: state it changes is saved with that epoch."""

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
        missing = sorted(own.keys() - state_dict.keys())
        unexpected = sorted(state_dict.keys() - own.keys())
        hosts = [{k.split(".")[0] for k in keys} - {"refiner"} for keys in (own, state_dict)]
        if all(hosts) and hosts[0].isdisjoint(hosts[1]):  # not even the prompt learner's names
            raise ValueError(f"{name}.load_trainable_state_dict: not a {name} checkpoint: its "
                             f"{', '.join(unexpected[:3])}, ... are not the model's "
                             f"({', '.join(sorted(own)[:3])}, ...): another method's?")
        mismatched = [f"{k}: checkpoint {tuple(state_dict[k].shape)}, model {tuple(own[k].shape)}"
                      for k in sorted(own.keys() & state_dict.keys())
                      if state_dict[k].shape != own[k].shape]
        if missing or unexpected or mismatched:
            raise ValueError(f"{name}.load_trainable_state_dict: state dict does not match the "
                             f"model; missing keys {missing}, unexpected keys {unexpected}, shape "
                             f"mismatches {mismatched}")
        with torch.no_grad():
            for key, tensor in own.items():
                tensor.copy_(state_dict[key])

    @classmethod
    def benchmark_models(cls, clip, classnames, recipe):
        """{name: model} that bench.py times, interleaved: the method with TextRefiner, then without
        (the targets compare these two); any further model is compared with the first."""
        title = cls.title or cls.__name__
        if not isinstance(recipe, RefinerRecipe):
            return {title: cls(clip, classnames, recipe)}
        return {f"{title}+TextRefiner": cls(clip, classnames, dataclasses.replace(recipe, refiner=True)),
                title: cls(clip, classnames, dataclasses.replace(recipe, refiner=False))}


# --------------------------------------------------------- CoOp + TextRefiner, the worked example


CLASS_TOKEN_POSITIONS = ("end", "middle", "front")


class PromptLearner(nn.Module):
    """CoOp's context vectors shared by all classes: "[SOT] ctx_1..ctx_n {class name}. [EOT]".

    ctx_init: a phrase whose first n_ctx token embeddings initialise the context; tokens past n_ctx
    stay fixed words before the class name (MaPLe's n_ctx 2: "a photo" trained, "of a" fixed; class
    name at the end only); "" -> N(0, 0.02^2) vectors with the text prefix "X X ... X".
    class_token_position: where the class name goes (CoOp's end, middle or front). set_classnames
    builds the class prompts; text_length is the positions the text encoder must run for them,
    computed once per class set from the CPU ids."""

    def __init__(self, clip, n_ctx=4, ctx_init="a photo of a", class_token_position="end"):
        super().__init__()
        if class_token_position not in CLASS_TOKEN_POSITIONS:
            raise RecipeError("class_token_position", f"must be one of {', '.join(CLASS_TOKEN_POSITIONS)}"
                                                      f", got {class_token_position!r}")
        # A reference, not a submodule: CLIP's frozen table stays out of this state dict.
        object.__setattr__(self, "token_embedding", clip.token_embedding)
        self.context_length = clip.config.context_length
        if ctx_init:
            ctx_init = ctx_init.replace("_", " ")
            check_context(ctx_init, n_ctx, class_token_position)
            ids = tokenize(ctx_init, self.context_length)  # (1, 77)
            with torch.no_grad():
                ctx = self.token_embedding(ids.to(self.token_embedding.weight.device))[0, 1:1 + n_ctx]
            self.prompt_prefix = ctx_init
        else:
            if n_ctx < 1:
                raise RecipeError("n_ctx", f"must be positive, got {n_ctx}")
            ctx = torch.empty(n_ctx, self.token_embedding.weight.shape[1]).normal_(std=0.02)
            self.prompt_prefix = " ".join(["X"] * n_ctx)
        self.n_ctx = n_ctx
        self.class_token_position = class_token_position
        self.ctx = nn.Parameter(ctx.detach().clone().float())  # (n_ctx, W)

    def set_classnames(self, classnames):
        if len(classnames) == 0:
            raise ValueError("PromptLearner.set_classnames: need at least one class name")
        names = [name.replace("_", " ") for name in classnames]
        prompts = [f"{self.prompt_prefix} {name}." for name in names]
        ids = tokenize(prompts, self.context_length)  # (C, 77)
        self.text_length = text_length(ids)  # the EOT positions are the same in every layout
        with torch.no_grad():
            embedded = self.token_embedding(ids.to(self.token_embedding.weight.device))  # (C, 77, W)
        embedded = embedded.to(self.ctx.device)
        # Non-persistent: rebuilt from the class names, never part of a checkpoint.
        self.register_buffer("token_ids", ids.to(self.ctx.device), persistent=False)
        self.register_buffer("token_prefix", embedded[:, :1].clone(), persistent=False)  # SOT
        self.register_buffer("token_suffix", embedded[:, 1 + self.n_ctx:].clone(), persistent=False)
        order = self._order(tokenize(names, self.context_length))
        self.register_buffer("order", order, persistent=False)

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
        ctx = self.ctx.to(self.token_prefix.dtype).expand(num_classes, -1, -1)  # (C, n_ctx, W)
        prompts = torch.cat([self.token_prefix, ctx, self.token_suffix], dim=1)  # (C, 77, W)
        if self.order is not None:
            prompts = prompts.gather(1, self.order[:, :, None].expand_as(prompts))
        return prompts, self.token_ids


def check_context(ctx_init, n_ctx, class_token_position="end"):
    """RecipeError unless ctx_init has at least n_ctx tokens (more: the rest stay fixed words, which
    needs the class token at the end)."""
    tokens = clip_model.token_count(ctx_init.replace("_", " "))
    if tokens < n_ctx:
        raise RecipeError("ctx_init", f"{ctx_init!r} is {tokens} tokens but n_ctx is {n_ctx}: make "
                                      f"them agree, or pass ctx_init \"\" for random context")
    if tokens > n_ctx and class_token_position != "end":
        raise RecipeError("n_ctx", f"{n_ctx} trains the first {n_ctx} of the {tokens} tokens of "
                                   f"ctx_init {ctx_init!r}, which needs class_token_position end")


def check_prompt_lengths(prompt, classnames, field, value, advice="", context_length=77):
    """RecipeError naming `field` when prompt(class name) is over CLIP's context for a class."""
    def length(name):
        return clip_model.token_count(prompt(name.replace("_", " "))) + 2  # with SOT and EOT
    longest = max(classnames, key=length)
    if length(longest) > context_length:
        raise RecipeError(field, f"{value}: the prompt of class {longest!r} is {length(longest)} "
                                 f"tokens, over CLIP's {context_length}{advice}")


def prompt_text_features(clip, prompt_learner, deep_prompts=None):
    """Normalised class features (C, D) fp32 of a PromptLearner's class prompts, with deep text
    prompts (depth - 1, n_ctx, W) when given; with the graph to the prompts when grad is on."""
    prompts, ids = prompt_learner()
    # a length known in advance: finding it on the device ids would sync every step
    length = prompt_learner.text_length
    text = clip.encode_prompts(prompts, ids, length=length, deep_prompts=deep_prompts)  # (C, D)
    with fp32(text):
        return F.normalize(text.float(), dim=-1)


def image_pass(model, images, prompts=None):
    """The model's image tower: (global feature (B, D), tokens (B, T, D), cls_attn (B, T - 1)),
    the last two only when the model has a refiner (else None). Unprompted, nothing in the tower
    trains: no graph."""
    with torch.no_grad() if prompts is None else nullcontext():
        if model.refiner is None:
            return model.clip.encode_image(images, prompts=prompts), None, None
        return model.clip.encode_image(images, return_tokens=True, prompts=prompts)


def class_logits(scale, image, classes):
    """scale * image @ classes^T: normalised images (B, D) against classes (C, D), or each image
    against its own classes (B, C, D) -> (B, C)."""
    if classes.dim() == 2:
        return scale * image @ classes.t()
    return scale * torch.einsum("bd,bcd->bc", image, classes)


def refined_ce(model, t, image, labels, tokens, cls_attn):
    """A training step's terms for a host classified with cross-entropy: t the normalised class
    features (C, D), or per image (B, C, D); image the global features (B, D); with model.refiner
    the logits use the refined classifier and TextRefiner's local CE and L1 are added with
    model.semantic_weight and model.reg_weight (updates the cache).
    -> loss, loss_global, loss_local, loss_reg, logits (B, C)."""
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
        rows = local_logits.shape[1]  # k + 2 local tokens per image, each labelled as its image
        loss_local = F.cross_entropy(local_logits.flatten(0, 1), labels.repeat_interleave(rows))
        loss = loss_global + model.semantic_weight * loss_local + model.reg_weight * loss_reg
    return dict(loss=loss, loss_global=loss_global, loss_local=loss_local, loss_reg=loss_reg,
                logits=logits)


@dataclass
class ContextRecipe(RefinerRecipe):
    """A host with CoOp's text context, trained with labels."""
    n_ctx: int = setting(4, POSITIVE)  # text context tokens
    ctx_init: str = "a photo of a"  # "" for random context vectors

    def for_run(self, dataset, subsample, classnames):
        """Every class prompt "<context> <class name>." fits CLIP's 77 tokens."""
        if self.ctx_init:
            check_context(self.ctx_init, self.n_ctx, getattr(self, "class_token_position", "end"))
        prefix = self.ctx_init.replace("_", " ") if self.ctx_init else " ".join(["X"] * self.n_ctx)
        check_prompt_lengths(lambda name: f"{prefix} {name}.", classnames, "n_ctx", self.n_ctx,
                             "; lower it")
        return self


@dataclass
class CoOpRecipe(ContextRecipe):
    """CoOp + TextRefiner, the paper's scripts: ViT-B/16, 16 shots, best-val model."""
    class_token_position: str = setting("end", CLASS_TOKEN_POSITIONS)
    xd: ClassVar[dict] = dict(selection="last")  # cross-dataset: the targets test the last epoch

    @classmethod
    def few_shot(cls, shots, dataset):
        """CoOp's few-shot scripts: 16 random context vectors, the last epoch, epochs by shots."""
        epochs = 200 if shots > 4 else 100
        if shots <= 1 or dataset == "imagenet":
            epochs = 50
        return dict(n_ctx=16, ctx_init="", selection="last", epochs=epochs)


class ContextCLIP(PromptCLIP):
    """What CoOp, CoCoOp, IVLP, MaPLe and PromptSRC share: CoOp's text context (PromptLearner:
    "a photo of a {name}.", its first n_ctx tokens trained) on a host trained with cross-entropy."""
    recipe = ContextRecipe
    loss_keys = ("loss", "loss_global", "loss_local", "loss_reg")

    def build(self, clip, classnames, recipe):
        position = getattr(recipe, "class_token_position", "end")  # CoOp's setting; the others: end
        self.prompt_learner = PromptLearner(clip, recipe.n_ctx, recipe.ctx_init, position)

    def set_classnames(self, classnames):
        self.prompt_learner.set_classnames(classnames)
        super().set_classnames(classnames)


class TextRefinerCLIP(ContextCLIP):
    """Frozen CLIP + CoOp prompt learner + TextRefiner; refiner=False is plain CoOp."""
    recipe = CoOpRecipe
    title = "CoOp"

    def text_features(self):
        """Normalised class text features (C, D) fp32, with the graph to ctx when grad is on."""
        return prompt_text_features(self.clip, self.prompt_learner)

    def train_forward(self, images, labels):
        image, tokens, cls_attn = image_pass(self, images)
        return refined_ce(self, self.text_features(), image, labels, tokens, cls_attn)

    @classmethod
    def benchmark_models(cls, clip, classnames, recipe):
        """CoOp with and without TextRefiner, and zero-shot CLIP (CoOp's evaluation cost)."""
        models = super().benchmark_models(clip, classnames, recipe)
        return dict(models, **{"zero-shot CLIP": ZeroShotCLIP(clip, classnames)})


@dataclass
class ZeroShotRecipe(Recipe):
    """Zero-shot CLIP: a hand-crafted prompt, by default CoOp's for the dataset."""
    template: str = None  # "a photo of a {}." where the dataset has none

    def for_run(self, dataset, subsample, classnames):
        recipe = self
        if self.template is None:  # dataset_info: the ValueError naming an unknown dataset
            template = data.dataset_info(dataset).template if dataset else "a photo of a {}."
            recipe = dataclasses.replace(self, template=template)
        check_prompt_lengths(recipe.template.format, classnames, "template", repr(recipe.template))
        return recipe


class ZeroShotCLIP(PromptCLIP):
    """CLIP's zero-shot classifier: the frozen text tower on a template's class prompts."""
    recipe = ZeroShotRecipe
    frozen_image_features = True  # forward is evaluation only, through the frozen tower

    def build(self, clip, classnames, recipe):
        self.template = recipe.template or "a photo of a {}."

    def forward(self, images, labels=None):
        return self.logits(self.image_features(images))  # nothing to train: logits in either mode

    def set_classnames(self, classnames):
        prompts = [self.template.format(name.replace("_", " ")) for name in classnames]
        ids = tokenize(prompts, self.clip.config.context_length)  # (C, 77)
        self.text_length = text_length(ids)  # from the CPU ids: no device sync
        self.register_buffer("token_ids", ids.to(self.clip.logit_scale.device), persistent=False)
        super().set_classnames(classnames)

    def text_features(self):
        text = self.clip.encode_text(self.token_ids, length=self.text_length)  # (C, D)
        with fp32(text):
            return F.normalize(text.float(), dim=-1)


# --method names (hosts.py adds the other hosts; a method of your own: --method FILE.py:CLASS).
METHODS = {"coop": TextRefinerCLIP}

import hosts  # noqa: E402  (after METHODS: hosts.py registers its classes in it)


def load(checkpoint, classnames=None, clip=None, device=None, **options):
    """A trained checkpoint ready for inference (.predict(images, topk)): predict.load."""
    import predict  # not at the top: predict.py imports eval.py and train.py, which import this
    return predict.load(checkpoint, classnames, clip, device, **options)


def __getattr__(name):
    """textrefiner.PromptKDCLIP and the other hosts of hosts.py."""
    try:
        return getattr(hosts, name)
    except AttributeError:
        raise AttributeError(f"module 'textrefiner' has no attribute {name!r}") from None
