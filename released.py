"""The authors' file formats, read tensors-only: their Dassl run folders, PromptKD's teacher files.

Nothing in this module runs code from a file: Dassl checkpoints pickle whole objects (their
scheduler entry holds an SGD optimiser), so they are unpickled by a restricted unpickler that
builds tensors and plain containers and replaces every other object by an inert stand-in.

    state, info = released.load_authors_run("their_output/.../seed1")  # -> our state-dict names
    ctx, text_prompts, visual_prompts, teacher_clip = released.read_teacher(clip, path, classnames)
    # a teacher file for the tests and the demo
    released.write_teacher_checkpoint("t.pth.tar", clip_state_dict, classnames, depth=3)

**Dassl checkpoint file**: {'state_dict', 'epoch', 'optimizer', 'scheduler', 'val_result'}; files
`model.pth.tar-<epoch>` (epoch counted from 1) and, with best-val selection, `model-best.pth.tar`.

**CoOp + TextRefiner run folder**: `prompt_learner/` and `Memory/`. The prompt learner's state dict
holds `prompt_learner.ctx` (n_ctx, W), the prompt buffers of the training classes (ignored: prompts
are rebuilt for the classes evaluated), the frozen CLIP as `image_encoder.*` / `text_encoder.*` /
`logit_scale` (checked against --clip), and the alignment `mid_image_trans.conv1.{0,1,3}`: 1x1
Conv2d, BatchNorm2d, ReLU, 1x1 Conv2d run on (N, D, 1, 1), the same function as our Linear ->
BatchNorm1d -> ReLU -> Linear over N rows. Memory's state dict is {'extractor.weight': (D, 2D)};
the cache is no buffer there but the file's own top-level entry 'memory_item' (M, D). With the
released fp16 default, convolutions, extractor, cache and ctx are fp16 and BatchNorm fp32.

**PromptKD + TextRefiner run folder**: `VLPromptLearner/` and `Memory/`. The student's image tower
as `image_encoder.*` with its deep visual prompts `image_encoder.VPT` (n, W) and
`image_encoder.transformer.resblocks.{1..depth-1}.VPT_shallow` (fp32), the global projector
`VPT_image_trans.conv1.{0,1,3}` (our image_proj) and the alignment `mid_image_trans.conv1.{0,1,3}`.

**PromptKD teacher file** (a PromptSRC ViT-L/14 run): `prompt_learner.ctx` (4, 768) fp16, the deep
text prompts `text_encoder.transformer.resblocks.{1..8}.VPT_shallow` (4, 768), the visual ones
`image_encoder.VPT` and `image_encoder.transformer.resblocks.{1..8}.VPT_shallow` (4, 1024), the
CLIP weights under `image_encoder.*`, `text_encoder.*`, `logit_scale` (PromptSRC's Gaussian weight
averaging means they need not equal OpenAI's; token_embedding is absent), the class prompts
`prompt_learner.token_prefix` / `token_suffix` (token embeddings of "X X X X {name}." around the
context: one row per trained class), and a frozen zero-shot copy `prompt_learner.ZS_image_encoder.*`
(ignored). Layout of PromptKD's released teachers: `<Name>/VLPromptLearner/model-best.pth.tar` per
dataset (base classes), `ImageNet-xd/VLPromptLearner_large/model.pth.tar-20` for cross-dataset.

**What the released PromptKD + TextRefiner code does differently**: it does not run as shipped
(trainer registered as `TextRefiner` while its data and teacher code test for `PromptKD`; a config
path and a module that do not exist; hard-coded paths, widths and hyper-parameters). It is fp16
only, CUDA and one GPU only. Its teacher loader accepts any file (`strict=False`: missing prompts
stay random; the cross-dataset teacher's depth is assumed 9); ours infers depth and token count
from the keys and refuses an inconsistent file. It recomputes the teacher's class text for every
batch (here: once per class set, the same numbers). Its cache is not restored on a Dassl resume;
ours is part of every checkpoint. Its scripts pass lambda = 1000 for every dataset although their
comment says 200 for FGVC Aircraft, Flowers and DTD; the comment's values are our default.
"""
import math
import os
import pickle
import re
import types

import torch
import torch.nn as nn

import clip_model
from clip_model import tokenize
from data import DataError, MissingData, UserError

# ------------------------------------------------------------------------ Dassl files, tensors only


class _NotLoaded:
    """Stands in for a pickled object of any class other than tensors and plain containers: the
    pickle's description of it is recorded, nothing of its class is imported or run."""
    origin = "?"

    def __new__(cls, *args, **kwargs):
        self = object.__new__(cls)
        self.args, self.state, self.items = args, None, {}
        return self

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def __setitem__(self, key, value):  # dict subclasses (defaultdict) unpickle item by item
        self.items[key] = value

    def append(self, value):  # list subclasses
        self.items[len(self.items)] = value

    def extend(self, values):
        for v in values:
            self.append(v)

    def __repr__(self):
        return f"<not loaded: {self.origin}>"


# Globals a file may resolve for real (torch.load resolves storages itself);
# anything else is _NotLoaded.
_TENSOR_GLOBALS = {("collections", "OrderedDict"), ("torch", "Size"),
                   ("torch._utils", "_rebuild_tensor"), ("torch._utils", "_rebuild_tensor_v2"),
                   ("torch._utils", "_rebuild_parameter"),
                   ("torch._utils", "_rebuild_parameter_with_state")}


class _TensorsOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _TENSOR_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        return type(name, (_NotLoaded,), {"origin": f"{module}.{name}"})


_tensors_only_pickle = types.ModuleType("tensors_only_pickle")
_tensors_only_pickle.Unpickler = _TensorsOnlyUnpickler
_tensors_only_pickle.load = lambda f, **kwargs: _TensorsOnlyUnpickler(f, **kwargs).load()


def read_dassl_file(path, allow_pickle=False):
    """A Dassl checkpoint file on the CPU; tensors and containers only unless allow_pickle."""
    if allow_pickle:
        return torch.load(path, map_location="cpu", weights_only=False)
    return torch.load(path, map_location="cpu", weights_only=False,
                      pickle_module=_tensors_only_pickle)


def read_dassl_checkpoint(path, allow_pickle=False, name=None):
    """read_dassl_file, checked to be a dict with a 'state_dict' dict; errors (DataError, a
    ValueError) name the file (as `name`, default its path)."""
    name = name or path
    try:
        content = read_dassl_file(path, allow_pickle)
    except Exception as e:  # not a torch file, cut short, a legacy tar with crafted entries, ...
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise DataError(f"{name}: unreadable ({reason}); a file cut short?") from None
    if not isinstance(content, dict) or not isinstance(content.get("state_dict"), dict):
        raise DataError(f"{name}: not a Dassl checkpoint (no 'state_dict' entry)")
    return content

# --------------------------------------------------------------------------- PromptKD teacher files


# OpenAI's convert_weights stores matrices, their biases, conv1 and the projections in fp16.
_FP16_SUFFIXES = ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias",
                  "c_fc.weight", "c_fc.bias", "c_proj.weight", "c_proj.bias", "conv1.weight",
                  "proj", "text_projection")
_VPT_SHALLOW = re.compile(r"transformer\.resblocks\.(\d+)\.VPT_shallow")


def released_dtype(key, tensor):
    """The dtype the released files store an OpenAI-named CLIP tensor in."""
    return tensor.half() if key.endswith(_FP16_SUFFIXES) else tensor.float()


def class_prompt_rows(token_embedding, classnames, n_ctx, context_length=77):
    """Token embeddings of "X ... X {name}." (n_ctx X's): (prefix (C, 1, W),
    suffix (C, L - 1 - n_ctx, W)), the rows PromptSRC stores around the context of each class
    prompt."""
    context = " ".join(["X"] * n_ctx)
    prompts = [context + f" {name.replace('_', ' ')}." for name in classnames]
    ids = tokenize(prompts, context_length)
    embedded = token_embedding[ids]  # (C, L, W)
    return embedded[:, :1], embedded[:, 1 + n_ctx:]


def write_teacher_checkpoint(path, clip_state_dict, classnames, depth=9, n_ctx=4, seed=0,
                             prompt_std=0.02, zero_shot_state_dict=None):
    """Write a PromptSRC teacher file laid out as PromptKD's released ones (tests and the demo).

    clip_state_dict: the teacher CLIP's OpenAI-named weights, stored as image_encoder.* /
    text_encoder.* / logit_scale in OpenAI's dtypes, without token_embedding. classnames: the
    classes it was trained on (token_prefix / token_suffix rows). depth, n_ctx: deep prompts in
    both towers, N(0, prompt_std^2), seeded. zero_shot_state_dict: PromptSRC's frozen zero-shot
    copy (default clip_state_dict). The scheduler entry pickles a scheduler holding an SGD
    optimiser, as Dassl does. Returns the written 'state_dict'."""
    config = clip_model.config_from_state_dict(clip_state_dict)
    deepest = min(config.vision_layers, config.transformer_layers)
    if not 1 <= depth <= deepest or n_ctx < 1:
        raise ValueError(f"write_teacher_checkpoint: depth must be in 1..{deepest} and n_ctx >= 1, "
                         f"got depth={depth}, n_ctx={n_ctx}")
    g = torch.Generator().manual_seed(seed)

    def prompt(width):
        return torch.randn(n_ctx, width, generator=g) * prompt_std

    sd = {k: v.detach().cpu() for k, v in clip_state_dict.items()
          if k not in clip_model.JIT_EXTRA_KEYS}
    zero_shot = sd if zero_shot_state_dict is None else zero_shot_state_dict
    prefix, suffix = class_prompt_rows(sd["token_embedding.weight"], classnames, n_ctx,
                                       config.context_length)
    state = {"logit_scale": sd["logit_scale"].float(),
             "prompt_learner.ctx": prompt(config.transformer_width).half(),
             "prompt_learner.token_prefix": prefix.half(),
             "prompt_learner.token_suffix": suffix.half()}
    for key, value in zero_shot.items():
        if key.startswith("visual."):
            zs_key = "prompt_learner.ZS_image_encoder." + key[7:]
            state[zs_key] = released_dtype(key, value.detach().cpu())
    state["image_encoder.VPT"] = prompt(config.vision_width)
    for i in range(1, depth):
        block = f"transformer.resblocks.{i}.VPT_shallow"
        state[f"image_encoder.{block}"] = prompt(config.vision_width)
        state[f"text_encoder.{block}"] = prompt(config.transformer_width)
    for key, value in sd.items():
        if key.startswith("visual."):
            state["image_encoder." + key[7:]] = released_dtype(key, value)
        elif key not in ("logit_scale", "token_embedding.weight"):
            state["text_encoder." + key] = released_dtype(key, value)
    trained = [state[k] for k in state if "VPT" in k or k == "prompt_learner.ctx"]
    params = [nn.Parameter(t.float().clone()) for t in trained]
    optimizer = torch.optim.SGD(params, lr=0.005, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=20)
    checkpoint = dict(state_dict=state, epoch=20, optimizer=optimizer.state_dict(),
                      scheduler=dict(successor=scheduler, last_epoch=20), val_result=None)
    torch.save(checkpoint, f"{path}.tmp")
    os.replace(f"{path}.tmp", path)
    return state


def read_teacher(clip, path, classnames, num_trained_classes=None, trained_classnames=None):
    """A PromptKD teacher file on `clip` (the CLIP it was trained from: it supplies the architecture
    and token_embedding) -> (teacher CLIP with every weight the file holds, ctx (n, W_text),
    text_prompts (depth_text - 1, n, W_text), visual_prompts (depth_vision, n, W_vision)), fp32 on
    clip's device; clip itself is left as it is.

    The classes the teacher was trained on, in its label order: trained_classnames if given (their
    prompt rows are compared with the file's token_suffix, so another dataset's teacher with as many
    classes is refused too), else num_trained_classes (a count whose names are unknown here:
    ImageNet-xd's 1000), else the first ceil(n/2) of classnames or all n. ValueError on a bad file;
    TeacherCLIPMismatch, a ValueError, when clip is not the CLIP the file was trained from."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"teacher file {path}: no such file")
    content = read_dassl_checkpoint(path, name=f"teacher file {path}")
    weights, ctx, text, visual, unknown = {}, None, {}, {}, []
    for key, value in content["state_dict"].items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"teacher file {path}: {key} is a {type(value).__name__}, "
                             f"expected a tensor")
        tower, _, rest = key.partition(".")
        deep = _VPT_SHALLOW.fullmatch(rest)
        if key == "logit_scale":
            weights[key] = value
        elif key == "prompt_learner.ctx":
            ctx = value
        elif tower == "prompt_learner":
            # token_prefix/suffix: rebuilt for our classes; ZS_image_encoder: not the teacher's
            pass
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
        raise ValueError(
            f"teacher file {path}: unexpected keys {unknown[:5]}; a PromptSRC teacher holds "
            f"logit_scale, prompt_learner.*, image_encoder.* and text_encoder.* only")
    clip_model.check_finite(content["state_dict"], f"teacher file {path}")
    trained_names = _check_class_count(path, content["state_dict"], classnames, num_trained_classes,
                                       trained_classnames)
    own = clip.state_dict()
    for key, value in weights.items():
        if key not in own or own[key].shape != value.shape:
            found = "it has no such weight" if key not in own else f"it has {tuple(own[key].shape)}"
            raise TeacherCLIPMismatch(
                f"is not the CLIP teacher file {path} was trained from: the file's {key} is "
                f"{tuple(value.shape)}, {found}; pass that CLIP (ViT-L/14 for PromptKD's "
                f"released teachers)")
    _check_token_embedding(path, content["state_dict"]["prompt_learner.token_prefix"], clip)
    config = clip.config
    ctx, text_prompts = _stack_prompts(
        path, ctx, text, "text_encoder", "prompt_learner.ctx",
        config.transformer_width, config.transformer_layers)
    vpt, visual_deep = _stack_prompts(
        path, visual.pop(0, None), visual, "image_encoder", "image_encoder.VPT",
        config.vision_width, config.vision_layers)
    visual_prompts = torch.cat([vpt[None], visual_deep])  # (depth, n, W): row 0 at the input
    suffix = content["state_dict"].get("prompt_learner.token_suffix")
    if suffix is not None and trained_names is not None:
        _check_trained_classes(path, suffix, clip, ctx.shape[0], trained_names)
    device = clip.logit_scale.device
    teacher_clip = clip_model.build_model({**own, **{k: v.to(device) for k, v in weights.items()}})
    return ctx.to(device), text_prompts.to(device), visual_prompts.to(device), teacher_clip


def _check_class_count(path, state_dict, classnames, num_trained_classes, trained_classnames):
    """The file's class count (token_prefix rows) against the one expected -> the names of the
    classes it was trained on, in its row order, or None where only their count is known."""
    if num_trained_classes is not None and trained_classnames is not None:
        raise ValueError("read_teacher: pass num_trained_classes or trained_classnames, not both")
    prefix = state_dict.get("prompt_learner.token_prefix")
    if prefix is None:
        raise ValueError(f"teacher file {path}: no prompt_learner.token_prefix, so the classes it "
                         f"was trained on are unknown; not a PromptSRC teacher file?")
    trained, n = prefix.shape[0], len(classnames)
    if trained_classnames is not None:
        expected = {len(trained_classnames)}
    elif num_trained_classes is not None:
        expected = {num_trained_classes}
    else:
        expected = {math.ceil(n / 2), n}
    if trained not in expected:
        wanted = " or ".join(str(c) for c in sorted(expected))
        raise ValueError(
            f"teacher file {path}: trained on {trained} classes (prompt_learner.token_prefix "
            f"rows), expected {wanted} for these {n} classes; another dataset's teacher?")
    if trained_classnames is not None:
        return list(trained_classnames)
    return None if num_trained_classes is not None else list(classnames[:trained])


class TeacherCLIPMismatch(ValueError):
    """The CLIP given to read_teacher is not the one the file was trained from; the message
    continues a sentence that names it (the caller's flag and value)."""


def _check_token_embedding(path, prefix, clip):
    """The file's token_prefix rows are, for every class alike, the start-of-text token's
    embedding in the teacher's CLIP, the one part of it the file does not store: another CLIP of
    the same shapes gives another row (and would make every class prompt look like another
    dataset's)."""
    sot = clip.token_embedding.weight[tokenize("")[0, 0]].detach().float()  # (W,)
    rows = prefix.reshape(prefix.shape[0], -1).to(sot.device).float()  # (C, W)
    if rows.shape[1] != sot.shape[0]:
        raise ValueError(f"teacher file {path}: prompt_learner.token_prefix rows are "
                         f"{rows.shape[1]} wide, the CLIP's text width is {sot.shape[0]}")
    # the same fp16 tolerance as the class prompts' rows (_check_trained_classes)
    if ((rows - sot).norm(dim=-1) > 1e-2 * sot.norm()).any():
        raise TeacherCLIPMismatch(
            f"is not the CLIP teacher file {path} was trained from: its start-of-text token "
            f"embedding differs from the file's (prompt_learner.token_prefix); pass that CLIP "
            f"(ViT-L/14 for PromptKD's released teachers)")


def _check_trained_classes(path, suffix, clip, n_ctx, names):
    """The file's token_suffix rows against the same rows built from `names` with clip's
    token_embedding."""
    with torch.no_grad():
        _, expected = class_prompt_rows(clip.token_embedding.weight, names, n_ctx,
                                        clip.config.context_length)
    expected = expected.float()  # (m, L - 1 - n_ctx, W)
    if tuple(suffix.shape) != tuple(expected.shape):
        raise ValueError(
            f"teacher file {path}: prompt_learner.token_suffix has shape {tuple(suffix.shape)}, "
            f"expected {tuple(expected.shape)} (a row per trained class, the prompt positions "
            f"after SOT and the {n_ctx} context tokens, the CLIP's text width)")
    # fp16 storage and PromptSRC's fp16 weight averaging move a row by <= 1e-2 relative
    # (20 roundings of 2^-11); another class name puts another token_embedding row somewhere,
    # O(1) off.
    error = (suffix.to(expected.device).float() - expected).norm(dim=-1)  # (m, L - 1 - n_ctx)
    wrong = (error > 1e-2 * expected.norm(dim=-1)).any(dim=1)  # (m,)
    if wrong.any():
        first = int(wrong.nonzero()[0])
        raise ValueError(
            f"teacher file {path}: trained on other classes: {int(wrong.sum())} of its "
            f"{len(names)} class prompts (prompt_learner.token_suffix rows) differ from ours, "
            f"the first at row {first} (our {names[first]!r}); another dataset's teacher, or "
            f"another class order? Pass the dataset's own teacher")


def _stack_prompts(path, first, deep, tower, first_key, width, layers):
    """-> (first (n, width), deep prompts (k, n, width) of blocks 1..k), checked: blocks 1..k all
    present, k < layers, every tensor (n, width)."""
    if first is None:
        raise ValueError(
            f"teacher file {path}: no {first_key}: not a PromptSRC / IVLP teacher file")
    k = max(deep, default=0)
    absent = [i for i in range(1, k + 1) if i not in deep]
    if absent:
        raise ValueError(
            f"teacher file {path}: {tower}.transformer.resblocks.{absent[0]}.VPT_shallow is "
            f"missing, yet block {k} has one: the deep prompts must cover blocks 1..{k}")
    if k >= layers:
        raise ValueError(f"teacher file {path}: {tower} has VPT_shallow up to block {k}, but the "
                         f"CLIP given has {layers} blocks")
    prompts = [(first_key, first)]
    for i in range(1, k + 1):
        prompts.append((f"{tower}.transformer.resblocks.{i}.VPT_shallow", deep[i]))
    for key, value in prompts:
        if value.dim() != 2 or tuple(value.shape) != (first.shape[0], width):
            raise ValueError(f"teacher file {path}: {key} has shape {tuple(value.shape)}, expected "
                             f"({first.shape[0]}, {width}) like {first_key} and the CLIP's width")
    if k:
        stacked = torch.stack([deep[i].float() for i in range(1, k + 1)])
    else:
        stacked = first.new_zeros(0, *first.shape)
    return first.float(), stacked.float()


# PromptKD's released teachers: <teachers>/<Name>/VLPromptLearner/model-best.pth.tar, Name = the
# dataset's Dassl name; PromptKD's README also spells two folders differently.
TEACHER_FOLDERS = {"caltech101": ("Caltech101",), "dtd": ("DescribableTextures",),
                   "eurosat": ("EuroSAT",), "fgvc_aircraft": ("FGVCAircraft", "FGVCaircraft"),
                   "food101": ("Food101",), "imagenet": ("ImageNet",),
                   "oxford_flowers": ("OxfordFlowers",), "oxford_pets": ("OxfordPets",),
                   "stanford_cars": ("StanfordCars", "StandfordCars"), "sun397": ("SUN397",),
                   "ucf101": ("UCF101",)}
IMAGENET_CLASSES = 1000
BASE2NEW_TEACHER = os.path.join("VLPromptLearner", "model-best.pth.tar")
CROSS_DATASET_TEACHER = os.path.join("ImageNet-xd", "VLPromptLearner_large", "model.pth.tar-20")


def teacher_file(path, dataset, subsample):
    """--teacher: a file as given, or a folder of PromptKD's released teachers, in which
    base/new runs take the dataset's base-class teacher and all-class (cross-dataset) runs the
    ImageNet one."""
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise UserError(f"--teacher {path!r}: no such file or folder; expected a PromptKD teacher "
                        f"file or the folder of PromptKD's released teachers")
    if subsample == "all":
        expected = [os.path.join(path, CROSS_DATASET_TEACHER)]
    elif dataset in TEACHER_FOLDERS:
        expected = [os.path.join(path, name, BASE2NEW_TEACHER) for name in TEACHER_FOLDERS[dataset]]
    else:
        raise UserError(f"--teacher {path}: PromptKD released no base-class teacher for {dataset}; "
                        f"pass a teacher file")
    found = [f for f in expected if os.path.isfile(f)]
    if not found:
        candidates = " or ".join(expected)
        raise MissingData(f"--teacher {path}: no teacher for {dataset} ({subsample} classes): "
                          f"expected {candidates} (PromptKD's released teachers, laid out as in "
                          f"its teacher_model/)")
    return found[0]

# ------------------------------------------------------------------------- the authors' run folders


# mid_image_trans.conv1 / VPT_image_trans.conv1 = Sequential(Conv2d 1x1, BatchNorm2d, ReLU,
# Conv2d 1x1) -> our FeatureAlign names. On 1x1 inputs BatchNorm2d normalises over the same N rows
# as BatchNorm1d.
AUTHORS_ALIGN = {"0.weight": "fc1.weight", "0.bias": "fc1.bias",
                 "1.weight": "bn.weight", "1.bias": "bn.bias",
                 "1.running_mean": "bn.running_mean", "1.running_var": "bn.running_var",
                 "1.num_batches_tracked": "bn.num_batches_tracked",
                 "3.weight": "fc2.weight", "3.bias": "fc2.bias"}
AUTHORS_CONV_WEIGHTS = ("0.weight", "3.weight")
# Dassl registers two models per run: the prompt learner (named per method) and Memory.
AUTHORS_LEARNER = {"coop": "prompt_learner", "promptkd": "VLPromptLearner"}


def authors_method(folder):
    """Which released trainer wrote the run folder, from its sub-folders; None if neither."""
    found = [m for m, part in AUTHORS_LEARNER.items() if os.path.isdir(os.path.join(folder, part))]
    return found[0] if len(found) == 1 else None


def _check_keys(state, needed, path, what):
    absent = [k for k in needed if k not in state]
    if absent:
        raise DataError(f"{path}: missing {absent}; is this {what}?")
    for k in needed:
        if not isinstance(state[k], torch.Tensor):
            raise DataError(f"{path}: {k} is a {type(state[k]).__name__}, expected a tensor")


def _projector(learner, theirs, ours, path):
    """{ours.fc1/bn/fc2...: tensor} from the released two-layer projector theirs.conv1.{0,1,3}."""
    out = {}
    for their_key, our_key in AUTHORS_ALIGN.items():
        tensor = learner[f"{theirs}.conv1.{their_key}"]
        if their_key in AUTHORS_CONV_WEIGHTS:
            if tensor.dim() != 4 or tuple(tensor.shape[2:]) != (1, 1):
                raise DataError(f"{path}: {theirs}.conv1.{their_key} should be a 1x1 convolution "
                                f"weight (out, in, 1, 1), found {tuple(tensor.shape)}")
            tensor = tensor.reshape(tensor.shape[0], tensor.shape[1])  # Conv2d 1x1 -> Linear
        out[f"{ours}.{our_key}"] = tensor
    return out


def _projector_keys(theirs):
    return [f"{theirs}.conv1.{k}" for k in AUTHORS_ALIGN]


def _coop_learner_state(learner, path):
    needed = ["prompt_learner.ctx"] + _projector_keys("mid_image_trans")
    _check_keys(learner, needed, path, "a CoOp + TextRefiner run")
    ctx = learner["prompt_learner.ctx"]
    if ctx.dim() != 2:
        raise DataError(f"{path}: class-specific contexts (CSC) are not supported")
    n_ctx = ctx.shape[0]
    # The released scripts start from "a photo of a"; the phrase only fixes the token positions,
    # whose embeddings the loaded ctx replaces.
    flags = dict(n_ctx=n_ctx, ctx_init="a photo of a" if n_ctx == 4 else "")
    align = _projector(learner, "mid_image_trans", "refiner.align", path)
    return dict({"prompt_learner.ctx": ctx}, **align), flags


def _promptkd_learner_state(learner, path):
    needed = (["image_encoder.VPT"] + _projector_keys("VPT_image_trans")
              + _projector_keys("mid_image_trans"))
    _check_keys(learner, needed, path, "a PromptKD + TextRefiner run")
    block_prefix = "image_encoder.transformer.resblocks."
    shallow = sorted(int(k.split(".")[3]) for k in learner
                     if k.startswith(block_prefix) and k.endswith(".VPT_shallow"))
    depth = len(shallow) + 1
    if shallow != list(range(1, depth)):
        raise DataError(f"{path}: deep visual prompts in blocks {shallow}; expected blocks "
                        f"1..{depth - 1}")
    prompts = [learner["image_encoder.VPT"]]
    prompts += [learner[f"{block_prefix}{i}.VPT_shallow"] for i in shallow]
    if len({tuple(p.shape) for p in prompts}) != 1 or prompts[0].dim() != 2:
        shapes = [tuple(p.shape) for p in prompts]
        raise DataError(f"{path}: the visual prompts differ in shape ({shapes})")
    state = {"visual_prompts": torch.stack(prompts)}  # (depth, n_ctx, W)
    state.update(_projector(learner, "VPT_image_trans", "image_proj", path))
    state.update(_projector(learner, "mid_image_trans", "refiner.align", path))
    return state, dict(depth=depth, n_ctx_vision=prompts[0].shape[0])


_LEARNER_STATE = {"coop": _coop_learner_state, "promptkd": _promptkd_learner_state}


def load_authors_run(folder, epoch=None, allow_pickle=False):
    """(state dict under our names, run info) from an output folder of the released code.

    Every tensor is returned in fp32 (num_batches_tracked as is). info: method, epoch, val_result,
    precision (fp16 or fp32, as stored), clip (the official name of the stored image tower's shape,
    or None), clip_weights (the stored CLIP, OpenAI names), flags (the run's shape flags)."""
    method = authors_method(folder)
    if method is None:
        raise MissingData(f"authors' checkpoint folder {folder!r}: expected prompt_learner/ and "
                          f"Memory/ (CoOp + TextRefiner) or VLPromptLearner/ and Memory/ "
                          f"(PromptKD + TextRefiner)")
    name = f"model.pth.tar-{epoch}" if epoch is not None else "model-best.pth.tar"
    paths = {part: os.path.join(folder, part, name) for part in (AUTHORS_LEARNER[method], "Memory")}
    missing = [p for p in paths.values() if not os.path.isfile(p)]
    if missing:
        raise MissingData(f"authors' checkpoint folder {folder!r}: expected {missing} "
                          f"(choose the file with --epoch N for model.pth.tar-N)")
    files = {part: read_dassl_checkpoint(path, allow_pickle) for part, path in paths.items()}
    learner_file = files[AUTHORS_LEARNER[method]]
    learner, memory = learner_file["state_dict"], files["Memory"]
    memory_path = paths["Memory"]
    if "extractor.weight" not in memory["state_dict"]:
        raise DataError(f"{memory_path}: no 'extractor.weight' in its state_dict")
    if "memory_item" not in memory:
        raise DataError(f"{memory_path}: no 'memory_item' (the cache) in the file")
    extractor, cache = memory["state_dict"]["extractor.weight"], memory["memory_item"]
    for key, value in (("state_dict.extractor.weight", extractor), ("memory_item", cache)):
        if not isinstance(value, torch.Tensor):
            raise DataError(f"{memory_path}: {key} is a {type(value).__name__}, expected a tensor")
    for part, path in paths.items():
        clip_model.check_finite(files[part]["state_dict"], path, DataError)
    clip_model.check_finite({"memory_item": cache}, memory_path, DataError)
    if cache.dim() != 2:
        raise DataError(f"{memory_path}: memory_item has shape {tuple(cache.shape)}, "
                        f"expected (cache size, D)")
    state, flags = _LEARNER_STATE[method](learner, paths[AUTHORS_LEARNER[method]])
    state.update({"refiner.extractor.weight": extractor, "refiner.cache": cache})
    conv = learner["mid_image_trans.conv1.0.weight"]
    state = {k: v.detach() if k.endswith("num_batches_tracked") else v.detach().float()
             for k, v in state.items()}
    flags["cache_size"] = state["refiner.cache"].shape[0]
    precision = "fp16" if conv.dtype == torch.float16 else "fp32"
    info = dict(method=method, epoch=learner_file.get("epoch"),
                val_result=learner_file.get("val_result"), precision=precision,
                clip=authors_clip_name(learner), clip_weights=authors_clip_weights(learner),
                flags=flags)
    return state, info


def authors_clip_name(learner):
    """The official CLIP whose image tower has the stored tower's width, patch and resolution,
    else None."""
    conv = learner.get("image_encoder.conv1.weight")
    pos = learner.get("image_encoder.positional_embedding")
    if conv is None or pos is None:
        return None
    width, patch, grid = conv.shape[0], conv.shape[-1], round((pos.shape[0] - 1) ** 0.5)
    for name in clip_model.MODELS:
        config = clip_model.CONFIGS[name]
        official = (config.vision_width, config.vision_patch_size, config.image_resolution)
        if official == (width, patch, patch * grid):
            return name
    return None


def authors_clip_weights(learner):
    """{OpenAI name: tensor} of the frozen CLIP a run stored (image_encoder.* = visual.*,
    text_encoder.* = the text tower's names; the visual prompts are not CLIP's)."""
    renames = (("image_encoder.", "visual."), ("text_encoder.", ""))
    return {ours + k[len(theirs):]: v for k, v in learner.items() for theirs, ours in renames
            if k.startswith(theirs) and isinstance(v, torch.Tensor) and "VPT" not in k}


def check_authors_clip(clip, weights, clip_name, folder):
    """Refuse a --clip whose weights are not the ones the run stored (compared in the stored dtype:
    their fp16 copy of OpenAI's fp16 weights equals ours cast back)."""
    ours = clip.state_dict()
    for key, theirs in weights.items():
        same = (key in ours and ours[key].shape == theirs.shape
                and torch.equal(ours[key].to(theirs.dtype), theirs))
        if not same:
            raise UserError(
                f"--clip {clip_name}: its weights differ from the CLIP stored in {folder} "
                f"(first: {key}); pass the CLIP that run was trained with as --clip")
