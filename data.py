"""The 15 CoOp benchmarks: CoOp's on-disk layouts, Dassl-identical few-shot splits, base/new
classes, CLIP transforms, distributed loaders, and synthetic datasets in those layouts.

    from data import load_splits, build_train_loader, build_eval_loader, normalize
    splits = load_splits("caltech101", "~/data", num_shots=16, seed=1, subsample="base")
    loader = build_train_loader(splits["train"], global_batch_size=32, resolution=224, seed=1)
    for epoch in range(10):
        loader.set_epoch(epoch)
        for images, labels in loader:              # uint8 (B, 3, 224, 224), (B,)
            x = normalize(images.to(device))       # float32 CLIP input, normalised on the device

Loader throughput: `python bench.py loader` (bench.py's docstring).

Lay real data out as CoOp's DATASETS.md says; the split files are CoOp's, never invented.
"""
import colorsys
import functools
import io
import json
import math
import os
import pickle
import random
import sys
import tempfile
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

# data.DATASETS, data.XD_TARGETS, data.UserError: what every module uses (catalog.py: no torch)
from catalog import DATASETS, PAPER_DATASETS, XD_TARGETS, UserError  # noqa: F401

DATASETS_MD = "https://github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DASSL_DATUM = ("dassl.data.datasets.base_dataset", "Datum")  # class of the items in CoOp's caches
SUBSAMPLES = ("all", "base", "new")  # classes kept: all, the base half, the new half


class DataError(UserError, ValueError):
    pass


class MissingData(UserError, FileNotFoundError):
    pass


@dataclass(frozen=True)
class Item:
    impath: str
    label: int
    classname: str


def dataset_info(name):
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; expected one of: {', '.join(DATASETS)}")
    return DATASETS[name]


def _missing(what, path):
    return MissingData(f"{what} not found: {path}; download and lay out the data as CoOp's "
                       f"DATASETS.md says: {DATASETS_MD}")

# ----------------------------------------------------------------------------- reading layouts


def _listdir(path):
    # Sorted: os.listdir order is filesystem-specific and would change the few-shot picks.
    if not os.path.isdir(path):
        raise _missing("image folder", path)
    return sorted(f for f in os.listdir(path) if not f.startswith("."))


def _need_file(path, what):
    if not os.path.isfile(path):
        raise _missing(what, path)
    return path


def _read_classnames(folder):
    """classnames.txt lines '<wnid> <class name>' -> {wnid: name}, in file order."""
    path, names = _need_file(os.path.join(folder, "classnames.txt"), "class-name file"), {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            wnid, _, name = line.strip().partition(" ")
            if wnid and not name.strip():
                raise DataError(f"{path}:{n}: {wnid!r} has no class name; expected lines '<wnid> <class name>'")
            if wnid:
                names[wnid] = name.strip()
    if not names:
        raise DataError(f"{path}: no class names (an empty file?); expected lines '<wnid> <class name>'")
    return names


def _read_wnid_folders(image_dir, classnames):
    """Label = index of the folder among the sorted sub-folders present (files such as
    README.txt are ignored); class name looked up in classnames.txt."""
    folders = [f for f in _listdir(image_dir) if os.path.isdir(os.path.join(image_dir, f))]
    items = []
    for label, wnid in enumerate(folders):
        if wnid not in classnames:
            raise DataError(f"folder {os.path.join(image_dir, wnid)} has no line in classnames.txt")
        sub = os.path.join(image_dir, wnid)
        items += [Item(os.path.join(sub, f), label, classnames[wnid]) for f in _listdir(sub)]
    return items


def _read_aircraft(folder, image_dir, split):
    with open(_need_file(os.path.join(folder, "variants.txt"), "variant list")) as f:
        label_of = {name: i for i, name in enumerate(line.strip() for line in f if line.strip())}
    path = _need_file(os.path.join(folder, f"images_variant_{split}.txt"), "split file")
    items = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            image_id, _, variant = line.strip().partition(" ")
            if not image_id:
                continue
            if variant not in label_of:
                raise DataError(f"{path}:{n}: variant {variant!r} is not in variants.txt")
            items.append(Item(os.path.join(image_dir, image_id + ".jpg"), label_of[variant], variant))
    return items


def _read_split_json(path, image_dir):
    """CoOp's split_zhou_*.json -> [train, val, test] lists of Items, its structure checked."""
    with open(_need_file(path, "split file (CoOp publishes it)")) as f:
        try:
            split = json.load(f)
        except ValueError as e:  # JSONDecodeError, or UnicodeDecodeError for a binary file
            raise DataError(f"{path}: not valid JSON ({e}); a file cut short? Download CoOp's split "
                            f"file again ({DATASETS_MD})") from None
    layout = '{"train": [[image path, label, class name], ...], "val": [...], "test": [...]}'
    if not isinstance(split, dict) or not all(isinstance(split.get(k), list) for k in ("train", "val", "test")):
        raise DataError(f"{path}: expected a JSON object {layout}")
    out = []
    for k in ("train", "val", "test"):
        for n, entry in enumerate(split[k]):
            if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str)
                    and type(entry[1]) is int and isinstance(entry[2], str)):
                raise DataError(f"{path}: {k}[{n}] is {json.dumps(entry)[:80]}; expected "
                                f"[image path, integer label, class name] as in {layout}")
        out.append([Item(os.path.join(image_dir, p), y, c) for p, y, c in split[k]])
    return out


def _read_full_splits(info, folder):
    """The whole train, val and test lists of a dataset (before few-shot sampling)."""
    image_dir = os.path.join(folder, info.image_dir)
    if info.layout == "split_json":
        return _read_split_json(os.path.join(folder, info.split_file), image_dir)
    if info.layout == "fgvc_aircraft":
        return [_read_aircraft(folder, image_dir, k) for k in ("train", "val", "test")]
    classnames = _read_classnames(folder)
    if info.layout == "imagenet":
        train = _read_wnid_folders(os.path.join(image_dir, "train"), classnames)
        test = _read_wnid_folders(os.path.join(image_dir, "val"), classnames)
        if {(i.label, i.classname) for i in test} - {(i.label, i.classname) for i in train}:
            raise DataError(f"{image_dir}/val and {image_dir}/train must hold the same class folders")
        return train, test, test  # CoOp: ImageNet's 50k val images are both its val and test split
    if info.layout == "imagenetv2":  # folder i holds label i, named by line i of classnames.txt
        items = []
        for label, name in enumerate(classnames.values()):
            sub = os.path.join(image_dir, str(label))
            items += [Item(os.path.join(sub, f), label, name) for f in _listdir(sub)]
        return [], [], items
    return [], [], _read_wnid_folders(image_dir, classnames)

# ----------------------------------------------------------------------------- few-shot caches


class _Datum:
    """Plain stand-in for Dassl's Datum: the attributes its pickles carry."""

    def __init__(self, impath, label, classname, domain=0):
        self._impath, self._label, self._domain, self._classname = impath, label, domain, classname


class CacheError(UserError, pickle.UnpicklingError):
    pass


class _CacheUnpickler(pickle.Unpickler):
    """Loads CoOp's few-shot caches without Dassl; any class but Datum is refused."""

    def __init__(self, file, path):
        super().__init__(file)
        self.path = path

    def find_class(self, module, name):
        if (module, name) == DASSL_DATUM:
            return _Datum
        raise CacheError(f"{self.path}: refusing to unpickle {module}.{name}; a CoOp "
                                     f"few-shot cache holds only {'.'.join(DASSL_DATUM)} items")


class _DasslPickler(pickle._Pickler):
    """Writes _Datum under Dassl's name so that CoOp reads our caches. The standard
    save_global would import dassl to check the name; here the name is written as is
    (the pure-Python pickler is the one whose save_global can be overridden)."""

    def save_global(self, obj, name=None):
        if obj is not _Datum:
            return super().save_global(obj, name)
        self.save(DASSL_DATUM[0])
        self.save(DASSL_DATUM[1])
        self.write(pickle.STACK_GLOBAL)
        self.memoize(obj)


def _read_cache(path, info, folder, full):
    """-> {split: [Item]} with the writer's absolute paths moved under this root."""
    try:
        with open(path, "rb") as f:
            data = _CacheUnpickler(f, path).load()
        if not (isinstance(data, dict) and "train" in data):
            raise TypeError("expected a dict with a 'train' list")
        extra = set(data) - set(full)
        if extra:  # CoOp's caches hold train and val (ImageNet: train only)
            raise TypeError(f"unexpected key {sorted(map(str, extra))[0]!r}, expected 'train' and 'val'")
        splits = {k: [(d._impath, int(d._label), d._classname) for d in v] for k, v in data.items()}
    except (pickle.UnpicklingError, AttributeError, TypeError, ValueError, EOFError) as e:
        raise CacheError(f"{path}: not a CoOp few-shot cache ({e}); delete it to resample") from None
    key = [info.folder] + (info.image_dir.split("/") if info.image_dir else [])  # path part kept: after it
    out = {}
    for split, stored in splits.items():
        known = {i.impath: i for i in full[split]}
        out[split] = []
        for impath, label, classname in stored:
            parts = impath.replace("\\", "/").split("/")
            at = [i for i in range(len(parts) - len(key)) if parts[i:i + len(key)] == key]
            mapped = os.path.join(folder, info.image_dir, *parts[at[-1] + len(key):]) if at else None
            if mapped not in known:
                raise DataError(f"{path}: image {impath} is not in the {split} split under {folder}; "
                                f"the cache belongs to other data (delete it to resample)")
            # Labels or class names fixed in the split file after the cache was written: the
            # split file is the truth, and the cache is refused rather than silently trained on.
            if (label, classname) != (known[mapped].label, known[mapped].classname):
                raise DataError(f"{path}: image {impath} is label {label} {classname!r} in the cache but "
                                f"{known[mapped].label} {known[mapped].classname!r} in the {split} split; "
                                f"the cache is out of date (delete it to resample)")
            out[split].append(Item(mapped, label, classname))
    return out


def _write_cache(path, splits):
    """Atomic (temporary file + rename), so concurrent ranks never read half a file.
    Protocol 4 so that CoOp on Python >= 3.4 reads it; items keep absolute paths, as CoOp's.
    The cache is optional: a data root that is read-only or full only gets a warning."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=".pkl")
    except OSError as e:
        print(f"warning: cannot write few-shot cache {path}: {e}", file=sys.stderr)
        return
    try:
        with os.fdopen(fd, "wb") as f:
            data = {k: [_Datum(os.path.abspath(i.impath), i.label, i.classname) for i in v]
                    for k, v in splits.items()}
            _DasslPickler(f, protocol=4).dump(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as e:
        os.unlink(tmp)
        print(f"warning: cannot write few-shot cache {path}: {e}; continuing without it", file=sys.stderr)
    except BaseException:
        os.unlink(tmp)
        raise


def fewshot(items, num_shots, rng):
    """Dassl's generate_fewshot_dataset: per label in order of first appearance,
    rng.sample(items, K), or all of them when fewer than K."""
    groups = {}
    for item in items:
        groups.setdefault(item.label, []).append(item)
    return [p for g in groups.values() for p in (rng.sample(g, num_shots) if len(g) >= num_shots else g)]

# ----------------------------------------------------------------------------- splits


def _check_subsample(subsample):
    if subsample not in SUBSAMPLES:
        raise DataError(f"subsample must be 'all', 'base' or 'new', got {subsample!r}")


def subsample_labels(train, subsample):
    """The labels of the base or new classes: the first ceil(n/2) of the sorted labels of the
    train items, or the rest."""
    labels = sorted({i.label for i in train})
    m = math.ceil(len(labels) / 2)
    return labels[:m] if subsample == "base" else labels[m:]


def subsample_classes(splits, subsample):
    """Base = first ceil(n/2) of the sorted labels of the train split, new = the rest;
    every split filtered and relabelled 0..k-1, class names following."""
    _check_subsample(subsample)
    if subsample == "all":
        return splits
    keep = subsample_labels(splits["train"], subsample)
    relabel = {y: k for k, y in enumerate(keep)}
    out = {s: [Item(i.impath, relabel[i.label], i.classname) for i in splits[s] if i.label in relabel]
           for s in ("train", "val", "test")}
    return dict(out, classnames=[splits["classnames"][y] for y in keep])


def _class_names(info, folder, train, val, test):
    """[class name of label 0, 1, ...]: the labels of train (test for a test-only dataset) must
    be 0..C-1, val and test labels among them, and every label has one class name."""
    source = os.path.join(folder, info.split_file) if info.split_file else folder
    names = {}
    for split, items in (("train", train), ("val", val), ("test", test)):
        for item in items:
            if names.setdefault(item.label, item.classname) != item.classname:
                raise DataError(f"{source}: label {item.label} is named {names[item.label]!r} and "
                                f"{item.classname!r} ({split} image {item.impath}); one class name per label")
    labels = sorted({i.label for i in train or test})
    if labels != list(range(len(labels))):
        raise DataError(f"{source}: the {'train' if train else 'test'} labels are not 0..C-1 "
                        f"(found {len(labels)} labels from {labels[0] if labels else None} to "
                        f"{labels[-1] if labels else None})")
    for split, items in (("val", val), ("test", test)):
        for item in items:
            if not 0 <= item.label < len(labels):
                raise DataError(f"{source}: {split} image {item.impath} has label {item.label}, outside the "
                                f"train labels 0..{len(labels) - 1}")
    return [names[y] for y in labels]


def _check_images_exist(splits, dataset):
    """Every image a run will read is there, found in seconds rather than mid-training."""
    for split in ("train", "val", "test"):
        missing = [i.impath for i in splits[split] if not os.path.isfile(i.impath)]
        if missing:
            raise MissingData(f"{dataset}: {len(missing)} image(s) listed in the {split} split are missing, "
                              f"the first: {missing[0]}")


def load_splits(dataset, root, num_shots=16, seed=1, subsample="all"):
    """-> dict(train=[Item], val=[Item], test=[Item], classnames=[str]).
    num_shots <= 0 keeps the whole train/val splits; test-only datasets give train = val = [].
    Few-shot picks equal Dassl's after random.seed(seed): random.Random(seed) is the same
    Mersenne Twister in the same state, and leaves the global generator alone.
    Checked up front (DataError/MissingData): the split files' structure, labels and class
    names, and that every image of the returned splits exists."""
    info = dataset_info(dataset)
    _check_subsample(subsample)
    if info.test_only and subsample != "all":
        raise DataError(f"{dataset} is a test-only dataset; base/new subsampling needs a train split")
    if seed < 0:
        raise DataError(f"seed must be >= 0, got {seed}")
    folder = os.path.join(os.path.expanduser(root), info.folder)
    if not os.path.isdir(folder):
        raise _missing(f"{dataset} folder", folder)
    train, val, test = _read_full_splits(info, folder)
    names = dict(enumerate(_class_names(info, folder, train, val, test)))
    if num_shots > 0 and train:
        cache = os.path.join(folder, "split_fewshot", f"shot_{num_shots}-seed_{seed}.pkl")
        full = {"train": train, "val": val}
        if os.path.isfile(cache):
            picked = _read_cache(cache, info, folder, full)
        else:
            rng = random.Random(seed)
            picked = {"train": fewshot(train, num_shots, rng)}
            if info.layout != "imagenet":  # CoOp samples no ImageNet val: val is the test split
                picked["val"] = fewshot(val, min(num_shots, 4), rng)
            _write_cache(cache, picked)
        train, val = picked["train"], picked.get("val", val)
    splits = subsample_classes(dict(train=train, val=val, test=test, classnames=list(names.values())), subsample)
    if info.layout in ("split_json", "fgvc_aircraft"):  # the other layouts list the files present
        _check_images_exist(splits, dataset)
    return splits

@dataclass
class RunData:
    """What a run trains and evaluates on. Labels of `train` index `classnames`, the classes the
    model is built with; labels of `val` and `test` index `eval_classnames`, the classifier rows
    `rows` (None: every row, and eval_classnames == classnames). select_split: the split
    per-epoch model selection evaluates. all_classnames: every class of the dataset (base, new)."""
    train: list
    classnames: list
    val: list
    test: list
    eval_classnames: list
    all_classnames: list
    rows: list = None
    select_split: str = "val"


def run_splits(dataset, root, num_shots=16, seed=1, subsample="all", transductive=False):
    """-> RunData. Labelled (CoOp and most methods): the few-shot picks of the subsample's classes,
    selection on their val split. Transductive (PromptKD, as released): training on the unlabelled
    few-shot picks of ALL classes (the whole train split with num_shots <= 0; a test-only
    dataset's test images), the classifier over all n classes, the subsample's rows evaluated
    (base: the first ceil(n/2), new: the rest), selection on their test split."""
    every = load_splits(dataset, root, num_shots=num_shots, seed=seed, subsample="all")
    evaluated = subsample_classes(every, subsample)
    if not transductive:
        return RunData(evaluated["train"], evaluated["classnames"], evaluated["val"],
                       evaluated["test"], evaluated["classnames"], every["classnames"])
    train = every["train"] or every["test"]
    rows = None if subsample == "all" else subsample_labels(train, subsample)
    return RunData(train, every["classnames"], evaluated["val"], evaluated["test"],
                   evaluated["classnames"], every["classnames"], rows, select_split="test")

# ----------------------------------------------------------------------------- images, loaders


def build_transform(train, resolution):
    """PIL image -> uint8 tensor (3, R, R): ImageView (Dassl's views, torchvision's arithmetic).
    Batches leave the loader workers as uint8 (4x less shared and pinned memory and host-to-device
    traffic than float32); normalize() turns them into the CLIP input on the device."""
    return ImageView(train, resolution)


class ImageView:
    """The view of a training image (a random resized crop of 8-100% of its area, aspect ratio in
    [3/4, 4/3], then a horizontal flip with probability 1/2) or of an evaluation image (shorter side
    to R, then the central square), bicubic, as torchvision's RandomResizedCrop +
    RandomHorizontalFlip and Resize + CenterCrop compute them on PIL images: the same random draws
    from the global torch generator, in the same order, the same pixels (tested against
    torchvision). Written out because importing torchvision costs every process about 1.3 s (its
    models import torch._dynamo), more than a small run's work."""
    SCALE, RATIO = (0.08, 1.0), (3 / 4, 4 / 3)

    def __init__(self, train, resolution):
        self.train, self.resolution = train, resolution

    def __repr__(self):  # part of the evaluation features' key (features.py): stable across runs
        kind = "random resized crop + flip" if self.train else "resize + center crop"
        return f"ImageView({kind}, {self.resolution} px, bicubic)"

    def __call__(self, image):
        R = self.resolution
        if self.train:
            left, top, w, h = self.random_box(*image.size)
            image = resize(image.crop((left, top, left + w, top + h)), (R, R))
            if torch.rand(1) < 0.5:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        else:
            w, h = image.size
            longer = int(R * max(w, h) / min(w, h))  # rounded down, as torchvision does
            image = resize(image, (R, longer) if w <= h else (longer, R))
            w, h = image.size  # at least R x R: no padding
            left, top = int(round((w - R) / 2.0)), int(round((h - R) / 2.0))
            image = image.crop((left, top, left + R, top + R))
        return _pixels(image).permute(2, 0, 1)  # (3, R, R) uint8

    def random_box(self, width, height):
        """(left, top, w, h) of the training crop: up to 10 draws of area and aspect ratio, then
        the largest central box within the ratio range."""
        log_ratio = torch.log(torch.tensor(self.RATIO))
        for _ in range(10):
            area = width * height * torch.empty(1).uniform_(*self.SCALE).item()
            ratio = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])).item()
            w, h = int(round(math.sqrt(area * ratio))), int(round(math.sqrt(area / ratio)))
            if 0 < w <= width and 0 < h <= height:
                top = torch.randint(0, height - h + 1, size=(1,)).item()
                left = torch.randint(0, width - w + 1, size=(1,)).item()
                return left, top, w, h
        low, high = self.RATIO
        if width / height < low:
            w, h = width, int(round(width / low))
        elif width / height > high:
            w, h = int(round(height * high)), height
        else:
            w, h = width, height
        return (width - w) // 2, (height - h) // 2, w, h


def resize(image, size):
    """PIL image to size (width, height), bicubic; an image of that size is returned as it is."""
    return image if image.size == size else image.resize(size, Image.Resampling.BICUBIC)


def normalize(images):
    """uint8 (B, 3, R, R) loader batch -> float32 CLIP input (B, 3, R, R) on the batch's device.
    The arithmetic of torchvision's ToTensor + Normalize(CLIP_MEAN, CLIP_STD): x / 255, then
    (x - mean) / std, each rounded to float32 in that order, so the values are bitwise the same."""
    mean, std = _mean_std(images.device)
    return images.float().div_(255).sub_(mean).div_(std)


@functools.lru_cache(maxsize=None)
def _mean_std(device):
    """CLIP_MEAN and CLIP_STD as float32 (3, 1, 1) on device, made once per device: made per
    batch, each would be a blocking host-to-device copy, a device synchronisation every step."""
    return (torch.tensor(CLIP_MEAN, device=device).view(3, 1, 1),
            torch.tensor(CLIP_STD, device=device).view(3, 1, 1))


def _to_8_bits(image):
    """A 16-bit greyscale image (modes I;16*, and I as PNG decoders give it) scaled to 8 bits
    as image viewers show it (65535 -> 255); convert("RGB") would clip it to near white."""
    pixels = np.asarray(image).astype(np.float64)
    return Image.fromarray(np.clip(np.round(pixels / 257), 0, 255).astype(np.uint8))  # mode L


def load_image(path, contents=None):
    """The file at path (or its contents, bytes, already read) as an RGB PIL image."""
    try:
        with Image.open(path if contents is None else io.BytesIO(contents)) as image:
            if image.mode == "I" or image.mode.startswith("I;16"):
                image = _to_8_bits(image)
            return image.convert("RGB")
    except FileNotFoundError:
        raise MissingData(f"image listed in the split is missing: {path}") from None
    except OSError as e:
        raise DataError(f"cannot read image {path}: {e}") from None


def _mix(*ints):
    """A 63-bit seed that depends on the given non-negative ints only."""
    return int(np.random.SeedSequence(ints).generate_state(1, np.uint64)[0] >> 1)


def _pixels(image):
    """PIL image -> uint8 tensor (H, W, 3), as Image.fromarray takes it back."""
    return torch.from_numpy(np.array(image))


class DecodedImages:
    """Training images decoded once (a loader pass with `workers`), kept as uint8 in one buffer (a
    spawned loader worker maps one shared-memory segment, not one per image) while they fit in
    max_bytes; image(i) is items[i] as load_image gives it, from the buffer or from its file."""

    def __init__(self, items, max_bytes, workers, seed):
        self.items, self.where, kept, total = items, {}, {}, 0
        if max_bytes > 0:
            images = _ImageSet(items, _pixels)
            one_pass = dict(_loader_kwargs(workers, seed, False), persistent_workers=False)
            for index, (pixels, _) in enumerate(DataLoader(images, batch_size=None, **one_pass)):
                if total + pixels.numel() <= max_bytes:
                    # a copy: a tensor from a loader worker holds a shared-memory file open
                    kept[index], self.where[index] = pixels.clone(), (total, pixels.shape)
                    total += pixels.numel()
        self.buffer = torch.empty(total, dtype=torch.uint8)
        for index, (offset, shape) in self.where.items():
            self.buffer[offset:offset + math.prod(shape)] = kept.pop(index).view(-1)

    def image(self, index):
        if index not in self.where:
            return load_image(self.items[index].impath)
        offset, shape = self.where[index]
        return Image.fromarray(self.buffer[offset:offset + math.prod(shape)].view(shape).numpy())


class _ImageSet(Dataset):
    """Eval: key = index. Train: key = (epoch, index), the image from `decoded` (DecodedImages),
    and the random crop/flip of a sample is drawn from a generator seeded with (seed, epoch,
    index), so it does not depend on which worker or rank decodes it."""

    def __init__(self, items, transform, seed=None, decoded=None):
        self.items, self.transform, self.seed, self.decoded = items, transform, seed, decoded

    def __len__(self):
        return len(self.items)

    def __getitem__(self, key):
        if self.seed is None:
            item = self.items[key]
            return self.transform(load_image(item.impath)), item.label
        epoch, index = key
        item, image = self.items[index], self.decoded.image(index)
        # ImageView draws from the global CPU generator. Seed only that one: fork_rng
        # (devices=[]) restores only it, and torch.manual_seed would also reseed the CUDA
        # generators, for good, of the main process when workers=0.
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(_mix(1, self.seed, epoch, index))
            return self.transform(image), item.label


class _GlobalBatchSampler:
    """Each epoch: a permutation of (seed, epoch) cut into global batches (the last
    incomplete one dropped unless it is the only one); yields this rank's contiguous
    slice of every global batch, as (epoch, index) keys."""

    def __init__(self, num_items, global_batch_size, seed, rank, world_size):
        if global_batch_size % world_size:
            raise ValueError(f"global batch size {global_batch_size} is not divisible by the "
                             f"world size {world_size}")
        if num_items < world_size:
            raise DataError(f"{num_items} training images cannot feed {world_size} ranks: "
                            f"run on at most {num_items} ranks")
        self.n, self.batch, self.seed = num_items, global_batch_size, seed
        self.rank, self.world_size, self.epoch = rank, world_size, 0

    def __len__(self):
        return max(1, self.n // self.batch)

    def __iter__(self):
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(_mix(0, self.seed, self.epoch)))
        size = min(self.batch, self.n)
        for step in range(len(self)):
            batch = order[step * size:(step + 1) * size].tolist()
            lo, hi = self.rank * size // self.world_size, (self.rank + 1) * size // self.world_size
            yield [(self.epoch, i) for i in batch[lo:hi]]


class TrainLoader(DataLoader):
    def set_epoch(self, epoch):
        self.batch_sampler.epoch = epoch


def _loader_kwargs(workers, seed, pin_memory):
    # A private generator: iterating the loader must not consume the global torch RNG.
    return dict(num_workers=workers, pin_memory=pin_memory,
                persistent_workers=workers > 0, generator=torch.Generator().manual_seed(seed))


def build_train_loader(items, global_batch_size, resolution, seed, rank=0, world_size=1, workers=4,
                       pin_memory=False, keep_decoded=0):
    """Yields (images (b, 3, R, R), labels (b,)) with b = global_batch_size / world_size;
    the ranks' slices of a step, concatenated in rank order, are the single-process batch.
    pin_memory: page-locked batches for fast copies to a CUDA device; pass it only when
    training on CUDA (pinning creates a CUDA context, and helps nothing on the CPU).
    keep_decoded: bytes of decoded images kept in memory (DecodedImages; 0: each image decoded
    from its file every epoch); the batches are bitwise the same either way."""
    if not items:
        raise ValueError("no training images")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    sampler = _GlobalBatchSampler(len(items), global_batch_size, seed, rank, world_size)
    decoded = DecodedImages(items, keep_decoded, workers, seed)
    return TrainLoader(_ImageSet(items, build_transform(True, resolution), seed, decoded),
                       batch_sampler=sampler, **_loader_kwargs(workers, seed, pin_memory))


def build_eval_loader(items, batch_size, resolution, rank=0, world_size=1, workers=4,
                      pin_memory=False, decode_on=None):
    """This rank's shard items[rank::world_size], in order: every image once over all ranks.
    pin_memory: as for build_train_loader. decode_on: a device to decode the JPEGs on in batches
    (DecodedOn); None: PIL in the loader workers. loader.preprocessing names the pipeline."""
    shard = items[rank::world_size]
    if decode_on is not None:
        files = DataLoader(_Files(shard), batch_size=batch_size, collate_fn=_file_batch,
                           **_loader_kwargs(workers, 0, pin_memory))
        return DecodedOn(files, resolution, decode_on)
    transform = build_transform(False, resolution)
    loader = DataLoader(_ImageSet(shard, transform), batch_size=batch_size, shuffle=False,
                        **_loader_kwargs(workers, 0, pin_memory))
    loader.preprocessing = f"PIL {transform}"
    return loader


class _Files(_ImageSet):
    """Eval items as ((path, the file's bytes uint8 (N,)), label)."""

    def __init__(self, items):
        super().__init__(items, None)

    def __getitem__(self, index):
        item = self.items[index]
        try:
            with open(item.impath, "rb") as f:
                contents = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)
        except FileNotFoundError:
            raise MissingData(f"image listed in the split is missing: {item.impath}") from None
        return (item.impath, contents), item.label


def _file_batch(batch):
    return [file for file, _ in batch], torch.tensor([label for _, label in batch])


class DecodedOn:
    """An evaluation loader whose JPEGs are decoded on `device` in batches (nvjpeg on CUDA through
    torchvision.io.decode_jpeg), resized (bicubic, antialiased) and centre-cropped there as
    build_transform(False) does with PIL: close to PIL's pixels, not bitwise. A file it cannot
    decode (another format, a JPEG nvjpeg refuses) goes through PIL."""

    def __init__(self, files, resolution, device):
        from torchvision import io  # only here: its import costs a process about 1.3 s
        from torchvision.transforms.v2 import functional
        self.io, self.functional = io, functional
        self.files, self.resolution, self.device = files, resolution, torch.device(device)
        self.dataset, self.batch_size = files.dataset, files.batch_size
        self.preprocessing = f"decode_jpeg on {self.device.type}, resize {resolution} bicubic " \
                             f"antialiased, center crop"

    def __len__(self):
        return len(self.files)

    def __iter__(self):
        for files, labels in self.files:
            yield self.decode(files), labels

    def decode(self, files):
        """[(path, its bytes)] -> uint8 (B, 3, R, R) on the device."""
        R, out = self.resolution, [None] * len(files)
        contents = [c for _, c in files]
        jpegs = [i for i, c in enumerate(contents) if c[:3].tolist() == [0xFF, 0xD8, 0xFF]]
        try:
            decoded = self.io.decode_jpeg([contents[i] for i in jpegs], device=self.device,
                                          mode=self.io.ImageReadMode.RGB)
        except RuntimeError:  # one bad file fails the batch: each through PIL
            decoded = []
        F, bicubic = self.functional, self.functional.InterpolationMode.BICUBIC
        for i, image in zip(jpegs, decoded):  # (3, H, W)
            image = F.resize(image, [R], interpolation=bicubic, antialias=True)
            out[i] = F.center_crop(image, [R, R])
        for i in [i for i, image in enumerate(out) if image is None]:
            image = load_image(files[i][0], contents[i].numpy().tobytes())
            out[i] = build_transform(False, R)(image).to(self.device)
        return torch.stack(out)  # (B, 3, R, R)

# ----------------------------------------------------------------------------- synthetic data


def _natural_pixels(rng, colour, width, height):
    """(height, width, 3) float pixels with a photograph's spectrum, roughly: the class colour,
    structure at a few scales (upsampled noise) and fine grain, so that JPEG sizes (about
    55 KiB at 500x375) and decode times come near those of photos, unlike flat noise or colour."""
    pixels = np.broadcast_to(colour, (height, width, 3)).astype(np.float32)
    for cells, amplitude in ((4, 50.0), (16, 25.0), (64, 15.0), (160, 10.0)):
        coarse = rng.normal(0, amplitude / 4, (max(1, cells * height // width), cells, 3)) + 128
        up = Image.fromarray(coarse.clip(0, 255).astype(np.uint8)).resize((width, height), Image.BICUBIC)
        pixels += 4 * (np.asarray(up, np.float32) - 128)
    return pixels + 6 * rng.standard_normal((height, width, 3), dtype=np.float32)


def write_synthetic_dataset(root, dataset, num_classes=10, images_per_class=8, image_size=32, seed=0,
                            natural=False):
    """Writes a small fake `dataset` in its CoOp layout under root and returns its folder.
    Images are the class's own hue plus noise, so a tiny model can tell classes apart;
    natural=True adds structure at several scales (photo-like JPEG sizes and decode cost: use
    it with image_size=(500, 375), a typical photo's (width, height), to time real pipelines).
    image_size: side of a square, or (width, height).
    Per class: max(1, n // 4) test images, as many val images where the layout has a val
    split, the rest train; test-only layouts put all n in test."""
    info = dataset_info(dataset)
    folder = os.path.join(root, info.folder)
    image_dir = os.path.join(folder, info.image_dir)
    rng = np.random.default_rng(seed)
    width, height = (image_size, image_size) if isinstance(image_size, int) else image_size
    n_test = max(1, images_per_class // 4)
    n_val = 0 if info.layout == "imagenet" or info.test_only else n_test
    if images_per_class - n_test - n_val < 1 and not info.test_only:
        raise ValueError(f"images_per_class={images_per_class} leaves no train images")

    def image(label, rel):
        colour = np.array(colorsys.hsv_to_rgb(label / num_classes, 0.8, 0.9)) * 255
        pixels = _natural_pixels(rng, colour, width, height) if natural else \
            colour + rng.normal(0, 25, (height, width, 3))
        path = os.path.join(image_dir, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=90 if natural else 75)
        return rel

    def split_of(j):
        return "test" if j < n_test else "val" if j < n_test + n_val else "train"

    def write_text(name, lines):
        with open(os.path.join(folder, name), "w") as f:
            f.writelines(line + "\n" for line in lines)

    os.makedirs(folder, exist_ok=True)
    if info.layout == "split_json":
        split = {"train": [], "val": [], "test": []}
        for c in range(num_classes):
            name = f"class_{c:03d}"
            for j in range(images_per_class):
                split[split_of(j)].append([image(c, f"{name}/image_{j:04d}.jpg"), c, name])
        for v in split.values():  # real split files are not grouped by label
            rng.shuffle(v)
        with open(os.path.join(folder, info.split_file), "w") as f:
            json.dump(split, f)
    elif info.layout == "fgvc_aircraft":
        variants = [f"Variant {c}-{100 + c}" for c in range(num_classes)]
        lines = {"train": [], "val": [], "test": []}
        for c, variant in enumerate(variants):
            for j in range(images_per_class):
                image_id = f"{1000000 + c * images_per_class + j}"
                lines[split_of(j)].append(f"{image(c, image_id + '.jpg')[:-4]} {variant}")
        write_text("variants.txt", variants)
        for split, rows in lines.items():
            write_text(f"images_variant_{split}.txt", rows)
    else:
        # imagenet_a/r hold 200 of the 1000 classes: here every other wnid of classnames.txt
        subset = dataset in ("imagenet_a", "imagenet_r")
        wnids = [f"n{7 * c + 1000:08d}" for c in range(num_classes * (2 if subset else 1))]
        write_text("classnames.txt", [f"{w} synthetic class {c}" for c, w in enumerate(wnids)])
        for c, wnid in enumerate(wnids[1::2] if subset else wnids):
            for j in range(images_per_class):
                if info.layout == "imagenet":
                    rel = f"val/{wnid}/ILSVRC2012_val_{c:04d}{j:04d}.JPEG" if j < n_test else \
                          f"train/{wnid}/{wnid}_{j}.JPEG"
                elif info.layout == "imagenetv2":
                    rel = f"{c}/{rng.integers(1 << 40):010x}.jpeg"
                else:
                    rel = f"{wnid}/{j}.JPEG"
                image(c, rel)
        if subset:
            with open(os.path.join(image_dir, "README.txt"), "w") as f:
                f.write("not a class folder\n")
    return folder
