"""The prompt learners TextRefiner plugs into besides CoOp (textrefiner.py holds CoOp, the worked
example): PromptKD, the paper's best system, and the prompt-learning family CoCoOp, KgCoOp, IVLP,
MaPLe and PromptSRC. Each is one PromptCLIP class and one Recipe dataclass, the official method with
refiner=False; importing this file registers them in textrefiner.METHODS (`--method promptkd`, ...).

In the family, the logits and classification losses use the refined classifier, a host's own text
regulariser acts on its unrefined features, and TextRefiner's terms are as on CoOp. The recipes are
the official base2new configs, evaluated at the last epoch as the hosts' papers do.

    import clip_model, hosts
    clip = clip_model.load_clip("ViT-B/16")
    model = hosts.MaPLeCLIP(clip, classnames)  # MaPLe + TextRefiner
    plain = hosts.MaPLeCLIP(clip, classnames, hosts.MaPLeRecipe(refiner=False))  # MaPLe alone
"""
import copy
import dataclasses
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

import clip_model
import data
import released
import textrefiner
from clip_model import text_length, tokenize
from textrefiner import (FINITE, NON_NEGATIVE, POSITIVE, ContextCLIP, ContextRecipe, CoOpRecipe,
                         FeatureAlign, PromptCLIP, PromptLearner, RecipeError, RefinerRecipe,
                         TextRefinerCLIP, class_logits, fp32, image_pass, prompt_text_features,
                         refined_ce, scaled_cosine_logits, setting)

# --------------------------------------------------------------------------- PromptKD + TextRefiner


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
        self.prompt_learner = PromptLearner(clip, n_ctx=n_ctx, ctx_init=" ".join(["X"] * n_ctx))
        self.prompt_learner.ctx.requires_grad_(False).copy_(ctx)
        self.register_buffer("text_prompts", text_prompts.float().clone())
        self.register_buffer("visual_prompts", visual_prompts.float().clone())
        self.set_classnames(classnames)

    @classmethod
    def from_checkpoint(cls, clip, path, classnames, num_trained_classes=None, *,
                        trained_classnames=None):
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
        self.forget_class_features()

    def forget_class_features(self):
        """The next call computes the class features again (benchmarks of the per-batch cost)."""
        self._class_features = None  # (device, dtype and autocast state, features)

    @torch.no_grad()
    def class_features(self):
        """Normalised teacher text features t_T (n, D_T) fp32, once per class set, device, dtype
        and autocast."""
        device = self.text_prompts.device
        key = (device, self.text_prompts.dtype, torch.is_autocast_enabled(device.type),
               torch.get_autocast_dtype(device.type))
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


# PromptKD's per-dataset distillation weight (a comment in its scripts);
# DEFAULT_KD_WEIGHT for the others.
KD_WEIGHTS = {"fgvc_aircraft": 200.0, "oxford_flowers": 200.0, "dtd": 200.0}
DEFAULT_KD_WEIGHT = 1000.0


@dataclass
class PromptKDRecipe(RefinerRecipe):
    """PromptKD + TextRefiner: ViT-B/16 student, PromptSRC ViT-L/14 teacher, unlabelled images."""
    epochs: int = 20
    batch_size: int = 8
    lr: float = 0.005
    n_ctx_vision: int = setting(4, POSITIVE)  # visual prompt tokens per block
    # blocks with visual prompts; PromptKD's cross-dataset student uses 3
    depth: int = setting(9, POSITIVE)
    kd_weight: float = setting(None, NON_NEGATIVE)  # lambda; None: per dataset, KD_WEIGHTS
    temperature: float = setting(1.0, POSITIVE)
    # the local rows' KL: lambda / 100
    semantic_weight: float = setting(0.01, NON_NEGATIVE, textrefiner=True)
    # the L1 regulariser: lambda / 50
    reg_weight: float = setting(0.02, NON_NEGATIVE, textrefiner=True)
    teacher: str = setting(
        None, required="a PromptKD teacher file, or the folder of PromptKD's released teachers")
    teacher_clip: str = "ViT-L/14"  # the CLIP the teacher was trained from (its token embedding)
    # The classes the teacher learnt: base, the first half of the run's; imagenet, ImageNet's 1000
    # (the cross-dataset teacher). None: imagenet for an all-class run, else base.
    teacher_classes: str = setting(None, ("base", "imagenet"))
    weight_files: ClassVar[tuple] = ("teacher", "teacher_clip")
    xd: ClassVar[dict] = dict(depth=3)  # a student per target, on its unlabelled train split

    def for_run(self, dataset, subsample, classnames):
        """lambda for the dataset; a folder of released teachers -> the run's teacher file."""
        kd_weight = self.kd_weight
        if kd_weight is None:
            kd_weight = KD_WEIGHTS.get(dataset, DEFAULT_KD_WEIGHT)
        teacher_classes = self.teacher_classes or ("imagenet" if subsample == "all" else "base")
        teacher = self.teacher and released.teacher_file(self.teacher, dataset, subsample)
        return dataclasses.replace(self, kd_weight=kd_weight, teacher_classes=teacher_classes,
                                   teacher=teacher)


def load_teacher(recipe, classnames):
    """The frozen teacher of recipe.teacher (a file) on recipe.teacher_clip, checked against the
    classes it learnt: the first half of `classnames` (base), or ImageNet's count (names not
    at hand)."""
    try:
        teacher_clip = clip_model.load_clip(recipe.teacher_clip)
    except (OSError, ValueError, RuntimeError) as e:
        raise RecipeError("teacher_clip", f"{recipe.teacher_clip}: {e}") from None
    if recipe.teacher_classes == "imagenet":
        trained_on = dict(num_trained_classes=released.IMAGENET_CLASSES)
    else:
        trained_on = dict(trained_classnames=classnames[:math.ceil(len(classnames) / 2)])
    try:
        return PromptSRCTeacher.from_checkpoint(
            teacher_clip, recipe.teacher, classnames, **trained_on)
    except released.TeacherCLIPMismatch as e:
        raise RecipeError("teacher_clip", f"{recipe.teacher_clip} {e}") from None
    except (ValueError, KeyError, OSError) as e:
        raise RecipeError("teacher", f"{recipe.teacher}: {e}") from None


class PromptKDCLIP(PromptCLIP):
    """PromptKD (CVPR 2024) student with TextRefiner: a frozen CLIP image tower (ViT-B/16) with
    trainable deep visual prompts, image_proj (D_S -> D_T) and a TextRefiner whose classifier is the
    frozen teacher's class text, refined; distilled from the teacher's logits without labels:

        z_S = exp(logit_scale) normalise(image_proj(prompted global feature)) refined^T
        loss = lambda (KL(p_T || p_S) + semantic_weight KL over the local rows
                       + reg_weight L1 regulariser)

    (KL summed and divided by its element count; the weights 1/100 and 1/50). refiner=False is
    plain PromptKD (lambda KL). The student's text tower is unused; trained on the unlabelled
    images of every class. teacher: a PromptSRCTeacher, else read from recipe.teacher on
    recipe.teacher_clip."""
    recipe = PromptKDRecipe
    loss_keys = ("loss", "loss_kd", "loss_local", "loss_reg")
    frozen_image_features = False  # trainable visual prompts and image_proj
    transductive = True
    frozen = ("clip", "teacher")
    title = "PromptKD"

    def build(self, clip, classnames, recipe, teacher=None):
        config = clip.config
        if recipe.depth > config.vision_layers:
            raise RecipeError("depth", f"must be at most {config.vision_layers}, the blocks of the "
                                       f"CLIP's image tower; got {recipe.depth}")
        teacher = load_teacher(recipe, classnames) if teacher is None else teacher
        self.teacher = teacher.requires_grad_(False).eval()
        shape = (recipe.depth, recipe.n_ctx_vision, config.vision_width)
        self.visual_prompts = nn.Parameter(torch.empty(shape).normal_(std=0.02))
        self.image_proj = FeatureAlign(config.embed_dim, self.text_width())
        self.kd_weight = DEFAULT_KD_WEIGHT if recipe.kd_weight is None else recipe.kd_weight
        self.temperature = recipe.temperature

    def text_width(self):
        return self.teacher.clip.config.embed_dim  # the refiner refines the teacher's class text

    @classmethod
    def benchmark_models(cls, clip, classnames, recipe):
        """Students of a random teacher CLIP of the teacher_clip size with the released prompts (4
        tokens, depth 9): with and without TextRefiner, and one paying the released trainer's cost,
        the teacher's class text recomputed for every batch."""
        config = clip_model.CONFIGS[recipe.teacher_clip]
        teacher_clip = clip_model.build_model(clip_model.random_state_dict(config, seed=1))
        depth = min(9, config.vision_layers, config.transformer_layers)
        generator = torch.Generator().manual_seed(0)
        shapes = ((4, config.transformer_width), (depth - 1, 4, config.transformer_width),
                  (depth, 4, config.vision_width))
        prompts = [torch.randn(shape, generator=generator) * 0.02 for shape in shapes]
        recipe = dataclasses.replace(recipe, depth=min(recipe.depth, clip.config.vision_layers))

        # a teacher each: the per-batch variant must not clear the others' memo
        def student(refiner):
            teacher = PromptSRCTeacher(teacher_clip, *prompts, classnames)
            student_recipe = dataclasses.replace(recipe, refiner=refiner)
            return cls(clip, classnames, student_recipe, teacher=teacher)
        return {"PromptKD+TextRefiner": student(True), "PromptKD": student(False),
                "PromptKD+TR (released)": TeacherTextPerBatch(student(True))}

    def set_classnames(self, classnames):
        """The teacher's class features for these classes (base -> new, another dataset)."""
        self.teacher.set_classnames(classnames)
        super().set_classnames(classnames)

    def text_features(self):
        return self.teacher.class_features()

    def train_forward(self, images, labels=None):
        """-> loss, loss_kd, loss_local, loss_reg (unweighted terms; 0 for the last two without
        refiner), logits z_S (B, n); updates the cache. labels are ignored (unlabelled images)."""
        teacher_logits = self.teacher(images)  # (B, n) no grad
        t = self.teacher.class_features()  # (n, D_T), normalised
        if self.refiner is None:
            student = self.clip.encode_image(images, prompts=self.visual_prompts)  # (B, D_S)
        else:
            student, tokens, cls_attn = self.clip.encode_image(images, return_tokens=True,
                                                               prompts=self.visual_prompts)
        with fp32(t):
            image = F.normalize(self.image_proj(student.float()), dim=-1)  # (B, D_T)
            scale = self.clip.logit_scale.exp().float()
            teacher_probs = F.softmax(teacher_logits.float() / self.temperature, dim=-1)  # (B, n)
            if self.refiner is None:
                logits = scale * image @ t.t()  # (B, n)
                loss_kd = kl_per_element(logits, teacher_probs, self.temperature)
                zero = loss_kd.new_zeros(())
                return dict(loss=self.kd_weight * loss_kd, loss_kd=loss_kd, loss_local=zero,
                            loss_reg=zero, logits=logits)
            refined, local_logits, loss_reg = self.refiner.train_terms(t, tokens, cls_attn, scale)
            logits = scale * image @ refined.t()  # (B, n)
            loss_kd = kl_per_element(logits, teacher_probs, self.temperature)
            rows = local_logits.shape[1]
            local_targets = teacher_probs.repeat_interleave(rows, dim=0)  # (B rows, n)
            loss_local = kl_per_element(local_logits.flatten(0, 1), local_targets, self.temperature)
            terms = loss_kd + self.semantic_weight * loss_local + self.reg_weight * loss_reg
            loss = self.kd_weight * terms
        return dict(loss=loss, loss_kd=loss_kd, loss_local=loss_local, loss_reg=loss_reg,
                    logits=logits)

    def image_features(self, images):
        """image_proj(prompted global feature) (B, D_T), not normalised; BN running
        statistics in eval."""
        student = self.clip.encode_image(images, prompts=self.visual_prompts)  # (B, D_S)
        return self.image_proj(student.float())


class TeacherTextPerBatch(nn.Module):
    """Benchmarks only: a PromptKDCLIP paying the released trainer's cost, the teacher's class text
    features recomputed for every batch where the model computes them once per class set."""
    frozen_image_features = False

    def __init__(self, model):
        super().__init__()
        self.model, self.loss_keys = model, model.loss_keys

    def forward(self, *inputs):
        self.model.teacher.forget_class_features()
        self.model.forget_classifier()
        return self.model(*inputs)

# ----------------------------------------------------------------------- the prompt-learning family


# Prompts per text-tower call where a host encodes many (CoCoOp's per-image classes, PromptSRC's
# templates): enough rows to keep a GPU busy, few enough to bound the activations' memory.
TEXT_ROWS = 1024


class TemplateFeatures(nn.Module):
    """A frozen CLIP's hand-crafted class features: normalise(mean over the templates of the
    unnormalised text features of "template with {} = class name") (C, D) fp32, out of autocast.
    Computed on first use and kept until the class set changes (only training reads them); not part
    of a checkpoint."""

    def __init__(self, templates):
        super().__init__()
        self.templates = tuple(templates)
        self.register_buffer("features", torch.empty(0), persistent=False)  # (C, D) once computed
        self.classnames = []

    def set_classnames(self, classnames):
        self.classnames = [name.replace("_", " ") for name in classnames]
        self.features = self.features.new_empty(0)

    @torch.no_grad()
    def forward(self, clip):
        if not self.features.numel():
            device = clip.logit_scale.device
            prompts = [template.replace("{}", name)
                       for template in self.templates for name in self.classnames]
            ids = tokenize(prompts, clip.config.context_length)  # (templates C, 77)
            with torch.autocast(device.type, enabled=False):
                text = torch.cat([clip.encode_text(rows.to(device), length=text_length(rows))
                                  for rows in ids.split(TEXT_ROWS)])  # (templates C, D)
            per_template = text.unflatten(0, (len(self.templates), -1))  # (templates, C, D)
            self.features = F.normalize(per_template.mean(0), dim=-1)  # (C, D)
        return self.features

# ----------------------------------------------------------------------------- CoCoOp + TextRefiner


@dataclass
class CoCoOpRecipe(ContextRecipe):
    """CoCoOp's base2new config (ViT-B/16, 16 shots): batch 1, its text tower runs
    once per image."""
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

    def build(self, clip, classnames, recipe):
        super().build(clip, classnames, recipe)
        dim, width = clip.config.embed_dim, clip.config.transformer_width
        self.meta_net = nn.Sequential(OrderedDict(linear1=nn.Linear(dim, dim // 16), relu=nn.ReLU(),
                                                  linear2=nn.Linear(dim // 16, width)))

    def text_features(self, image):
        """Normalised class features per image (B, C, D) fp32 for normalised image features (B, D),
        with the graph to ctx and the meta-net when grad is on."""
        prompts, ids = self.prompt_learner()  # (C, 77, W), (C, 77)
        length, n = self.prompt_learner.text_length, self.prompt_learner.n_ctx
        prompts = prompts[:, :length]  # the positions the EOT rows see (causal mask)
        shift = self.meta_net(image)  # (B, W)
        text = []
        images_per_pass = max(1, TEXT_ROWS // len(ids))
        for s in shift.split(images_per_pass):  # (k, W): images whose prompts share a pass
            k = len(s)
            prefix = prompts[None, :, :1].expand(k, -1, -1, -1)  # SOT
            context = prompts[None, :, 1:1 + n] + s[:, None, None]  # the context, shifted
            suffix = prompts[None, :, 1 + n:].expand(k, -1, -1, -1)
            shifted = torch.cat([prefix, context, suffix], dim=2)  # (k, C, L, W)
            rows = shifted.flatten(0, 1)  # (k C, L, W)
            out = self.clip.encode_prompts(rows, ids.repeat(k, 1), length=length)  # (k C, D)
            text.append(out.unflatten(0, (k, -1)))  # (k, C, D)
        text = torch.cat(text)  # (B, C, D)
        with fp32(text):
            return F.normalize(text.float(), dim=-1)

    def class_features(self, image):
        """What each image's logits compare against: its class features (B, C, D),
        refined row by row."""
        t = self.text_features(image)
        return t if self.refiner is None else self.refiner.refine(t)

    def logits(self, image_features):
        """Eval logits (B, C), each image against its own class features, computed for every batch:
        they depend on the image, so nothing carries over from one batch to the next."""
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
    # the weight of 1 - mean cosine to the hand-crafted class features
    kg_weight: float = setting(8.0, NON_NEGATIVE)
    template: str = None  # the hand-crafted prompt; None: KgCoOp's for the dataset

    @classmethod
    def few_shot(cls, shots, dataset):
        """KgCoOp's few-shot script trains with its base-to-new config (not CoOp's)."""
        return {}

    def for_run(self, dataset, subsample, classnames):
        recipe = super().for_run(dataset, subsample, classnames)
        if self.template is None:
            template = KGCOOP_TEMPLATES.get(dataset)
            if not template and dataset:
                template = data.dataset_info(dataset).template
            recipe = dataclasses.replace(recipe, template=template or "a photo of a {}.")
        return recipe


class KgCoOpCLIP(TextRefinerCLIP):
    """KgCoOp (CVPR 2023) with TextRefiner: CoOp plus kg_weight * (1 - mean cosine) between the
    learnt, unrefined class features and the frozen CLIP's on the dataset's hand-crafted prompt
    (KGCOOP_TEMPLATES), encoded once per class set. refiner=False is KgCoOp."""
    recipe = KgCoOpRecipe
    loss_keys = TextRefinerCLIP.loss_keys + ("loss_kg",)
    title = "KgCoOp"

    def build(self, clip, classnames, recipe):
        super().build(clip, classnames, recipe)
        self.kg_weight = recipe.kg_weight
        self.handcrafted = TemplateFeatures([recipe.template or "a photo of a {}."])

    def set_classnames(self, classnames):
        self.handcrafted.set_classnames(classnames)
        super().set_classnames(classnames)

    def train_forward(self, images, labels):
        image, tokens, cls_attn = image_pass(self, images)
        t = self.text_features()  # (C, D)
        out = refined_ce(self, t, image, labels, tokens, cls_attn)
        with fp32(t):
            handcrafted = self.handcrafted(self.clip)  # (C, D)
            loss_kg = 1 - F.cosine_similarity(t, handcrafted, dim=-1, eps=1e-7).mean()
        return dict(out, loss=out["loss"] + self.kg_weight * loss_kg, loss_kg=loss_kg)

# -------------------------------------------------------------- IVLP, MaPLe: prompts in both towers


@dataclass
class IVLPRecipe(ContextRecipe):
    """IVLP's base2new config of PromptSRC's repository (ViT-B/16, 16 shots): 4 + 4
    prompt tokens, depth 9."""
    epochs: int = 20
    batch_size: int = 4
    lr: float = 0.0025
    selection: str = "last"
    depth: int = setting(9, POSITIVE)  # blocks with prompts, in each tower
    n_ctx_vision: int = setting(4, POSITIVE)  # visual prompt tokens per block


class DeepPromptCLIP(ContextCLIP):
    """Prompts in both towers (IVLP, MaPLe, PromptSRC). Text: the context at the input and
    text_prompts (depth - 1, n_ctx, W) at the context positions before text blocks 1..depth-1.
    Image: vision_prompts() (depth, n, W_vision), row 0 appended after the image tokens and row i in
    their place before vision block i. TextRefiner's tokens and attention leave the prompt tokens
    out (clip_model's hooks)."""
    frozen_image_features = False  # the image tower is prompted

    def build(self, clip, classnames, recipe):
        super().build(clip, classnames, recipe)
        layers = min(clip.config.vision_layers, clip.config.transformer_layers)
        if recipe.depth > layers:
            raise RecipeError("depth", f"must be at most {layers}, the blocks of a tower of the "
                                       f"CLIP; got {recipe.depth}")
        shape = (recipe.depth - 1, *self.prompt_learner.ctx.shape)  # (depth - 1, n_ctx, W)
        deep = torch.empty(shape).normal_(std=0.02)
        # none at depth 1: a parameter that no step uses would stall DDP's gradient reduction
        self.register_parameter("text_prompts", nn.Parameter(deep) if recipe.depth > 1 else None)

    @classmethod
    def benchmark_models(cls, clip, classnames, recipe):
        """PromptCLIP's, the recipe's depth capped at the CLIP's blocks (the tiny
        benchmark CLIPs)."""
        depth = min(recipe.depth, clip.config.vision_layers, clip.config.transformer_layers)
        return super().benchmark_models(clip, classnames, dataclasses.replace(recipe, depth=depth))

    def vision_prompts(self):
        """The image tower's prompts (depth, n, W_vision)."""
        raise NotImplementedError

    def text_features(self):
        """Normalised class features (C, D) fp32, with the graph to the text prompts
        when grad is on."""
        return prompt_text_features(self.clip, self.prompt_learner, self.text_prompts)

    def image_features(self, images):
        return self.clip.encode_image(images, prompts=self.vision_prompts())  # (B, D)

    def train_forward(self, images, labels):
        image, tokens, cls_attn = image_pass(self, images, self.vision_prompts())
        return refined_ce(self, self.text_features(), image, labels, tokens, cls_attn)


class IVLPCLIP(DeepPromptCLIP):
    """Independent vision-language prompting (the baseline of MaPLe and PromptSRC) with
    TextRefiner: the image tower's prompts are visual_prompts (depth, n_ctx_vision, W_vision),
    N(0, 0.02^2), independent of the text ones. refiner=False is IVLP."""
    recipe = IVLPRecipe
    title = "IVLP"

    def build(self, clip, classnames, recipe):
        super().build(clip, classnames, recipe)
        shape = (recipe.depth, recipe.n_ctx_vision, clip.config.vision_width)
        self.visual_prompts = nn.Parameter(torch.empty(shape).normal_(std=0.02))

    def vision_prompts(self):
        return self.visual_prompts


@dataclass
class MaPLeRecipe(ContextRecipe):
    """MaPLe's base2new config (ViT-B/16, 16 shots): 2 context tokens ("a photo" of
    "a photo of a"), depth 9."""
    n_ctx: int = 2
    epochs: int = 5
    batch_size: int = 4
    lr: float = 0.0035
    selection: str = "last"
    depth: int = setting(9, POSITIVE)  # blocks with prompts, in each tower
    xd: ClassVar[dict] = dict(lr=0.0026, epochs=2, depth=3)


class MaPLeCLIP(DeepPromptCLIP):
    """MaPLe (CVPR 2023) with TextRefiner: coupled prompts. The image tower's prompts are linear
    maps (W -> W_vision) of the text ones, so the image tower's gradient reaches the text prompts:
    row 0 = proj(ctx), row i = projections[i - 1](text_prompts[i - 1]). refiner=False is MaPLe."""
    recipe = MaPLeRecipe
    title = "MaPLe"

    def build(self, clip, classnames, recipe):
        super().build(clip, classnames, recipe)
        width, vision_width = clip.config.transformer_width, clip.config.vision_width
        self.proj = nn.Linear(width, vision_width)
        # one initialisation, copied: the projections start identical
        deep = nn.Linear(width, vision_width)
        self.projections = nn.ModuleList(copy.deepcopy(deep) for _ in range(recipe.depth - 1))

    def vision_prompts(self):
        deep = []
        if self.text_prompts is not None:
            deep = [p(t) for p, t in zip(self.projections, self.text_prompts)]
        return torch.stack([self.proj(self.prompt_learner.ctx), *deep])  # (depth, n_ctx, W_vision)

# -------------------------------------------------------------------------- PromptSRC + TextRefiner


# PromptSRC's text targets: 60 of OpenAI's published CLIP ImageNet prompt templates,
# in PromptSRC's order.
PROMPTSRC_TEMPLATES = (
    "a photo of a {}.", "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.",
    "a photo of the hard to see {}.", "a low resolution photo of the {}.",
    "a rendering of a {}.", "graffiti of a {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.",
    "a photo of a hard to see {}.", "a bright photo of a {}.", "a photo of a clean {}.",
    "a photo of a dirty {}.", "a dark photo of the {}.", "a drawing of a {}.",
    "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.",
    "a painting of a {}.", "a pixelated photo of the {}.", "a sculpture of the {}.",
    "a bright photo of the {}.", "a cropped photo of a {}.", "a plastic {}.",
    "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.", "a blurry photo of the {}.",
    "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.",
    "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.",
    "a close-up photo of the {}.", "the origami {}.", "the {} in a video game.",
    "a sketch of a {}.", "a doodle of the {}.", "a origami {}.",
    "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.",
    "a photo of a nice {}.", "a photo of a weird {}.", "a blurry photo of a {}.",
    "a cartoon {}.", "art of a {}.", "a sketch of the {}.", "a embroidered {}.",
    "a pixelated photo of a {}.", "itap of the {}.")


def gpa_weights(mean, std, epochs):
    """PromptSRC's weights of epochs 1..epochs: the Gaussian N(e; mean, std^2) normalised to
    sum 1 (float64; computed as a softmax of the exponents, so that no choice underflows to a
    zero sum)."""
    exponents = [-0.5 * ((e - mean) / std) ** 2 for e in range(1, epochs + 1)]
    w = [math.exp(x - max(exponents)) for x in exponents]
    return [x / sum(w) for x in w]


# The datasets of PromptSRC's few-shot config whose aggregation Gaussian is sharp (mean 45, std 5).
GPA_SHARP_DATASETS = ("stanford_cars", "oxford_flowers", "fgvc_aircraft", "dtd", "eurosat")


@dataclass
class PromptSRCRecipe(IVLPRecipe):
    """PromptSRC's base2new config (ViT-B/16, 16 shots): IVLP 4 + 4, depth 9, and
    its regularisers."""
    # the weights of the L1 distances of the text and of the image features to the frozen CLIP's
    text_weight: float = setting(25.0, NON_NEGATIVE)
    image_weight: float = setting(10.0, NON_NEGATIVE)
    gpa_mean: float = setting(15.0, FINITE)  # Gaussian prompt aggregation over epochs 1..epochs
    gpa_std: float = setting(1.0, POSITIVE)
    xd: ClassVar[dict] = dict(depth=3, gpa_mean=6.0, gpa_std=10.0)

    @classmethod
    def few_shot(cls, shots, dataset):
        """PromptSRC's few-shot config: 50 epochs at any number of shots, the aggregation's Gaussian
        per dataset (mean 45, std 5 on its fine-grained ones; mean 30, std 30 elsewhere)."""
        if dataset in GPA_SHARP_DATASETS:
            return dict(epochs=50, gpa_mean=45.0, gpa_std=5.0)
        return dict(epochs=50, gpa_mean=30.0, gpa_std=30.0)


class PromptSRCCLIP(IVLPCLIP):
    """PromptSRC (ICCV 2023) with TextRefiner: IVLP regulated by the frozen CLIP it prompts
    (no copy):

        loss = CE(logits) + text_weight L1(t, t_zs) + image_weight L1(f, f_zs) + KL(p_zs || p)
               (+ TextRefiner's)

    t: the unrefined prompted class features; t_zs: the frozen text tower's mean over
    PROMPTSRC_TEMPLATES, normalised; f, f_zs: the prompted and unprompted normalised image
    features; p = softmax(logits), logits of the refined classifier; p_zs of
    exp(logit_scale) f_zs t_zs^T; KL summed and divided by B * C. Gaussian prompt aggregation:
    after epoch e the buffer gpa_sum adds gpa_weights(e) times the trainable parameters (prompts
    and TextRefiner's weights; buffers stay the last epoch's), and after the last epoch the
    parameters become gpa_sum, the model evaluated. refiner=False is PromptSRC."""
    recipe = PromptSRCRecipe
    loss_keys = ("loss", "loss_global", "loss_text", "loss_image", "loss_kl", "loss_local",
                 "loss_reg")
    title = "PromptSRC"

    def __init__(self, clip, classnames, recipe=None):
        super().__init__(clip, classnames, recipe)
        # after the refiner, which it averages too; a buffer: every checkpoint holds the running
        # sum, so --resume continues it exactly
        self.register_buffer("gpa_sum", torch.zeros(sum(p.numel() for p in self.trained())))

    def build(self, clip, classnames, recipe):
        super().build(clip, classnames, recipe)
        self.text_weight, self.image_weight = recipe.text_weight, recipe.image_weight
        self.gpa_mean, self.gpa_std = recipe.gpa_mean, recipe.gpa_std
        try:  # before training, not at the end of its first epoch
            weights = gpa_weights(recipe.gpa_mean, recipe.gpa_std, recipe.epochs)
        except OverflowError:
            weights = [math.nan]
        if not (all(map(math.isfinite, weights)) and sum(weights) > 0):
            raise RecipeError("gpa_mean", f"{recipe.gpa_mean} and gpa_std {recipe.gpa_std}: the "
                                          f"aggregation weights of epochs 1..{recipe.epochs} are "
                                          f"not finite numbers of a positive sum; choose a mean "
                                          f"and a std nearer the epochs' scale")
        self.zs_text = TemplateFeatures(PROMPTSRC_TEMPLATES)

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
            log_p = F.log_softmax(logits, dim=-1)  # (B, C)
            log_p_zs = F.log_softmax(zs_logits, dim=-1)  # (B, C)
            kl_sum = F.kl_div(log_p, log_p_zs, reduction="sum", log_target=True)
            loss_kl = kl_sum / logits.numel()
            loss = (out["loss"] + self.text_weight * loss_text + self.image_weight * loss_image
                    + loss_kl)
        return dict(out, loss=loss, loss_text=loss_text, loss_image=loss_image, loss_kl=loss_kl)

    @torch.no_grad()
    def epoch_end(self, epoch, epochs):
        params = self.trained()
        weight = gpa_weights(self.gpa_mean, self.gpa_std, epochs)[epoch]
        # as released: w * theta, then the sum
        self.gpa_sum.add_(torch.cat([p.flatten() for p in params]) * weight)
        if epoch == epochs - 1:  # the aggregate becomes the model
            for p, value in zip(params, self.gpa_sum.split([p.numel() for p in params])):
                p.copy_(value.view_as(p))


textrefiner.METHODS.update(promptkd=PromptKDCLIP, cocoop=CoCoOpCLIP, kgcoop=KgCoOpCLIP,
                           ivlp=IVLPCLIP, maple=MaPLeCLIP, promptsrc=PromptSRCCLIP)
