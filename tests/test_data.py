"""data.py: CoOp layouts, Dassl-identical few-shot picks and caches, base/new, loaders."""
import io
import json
import os
import pickle
import random
import re
import sys
import types

import numpy as np
import pytest
import torch
from torchvision import transforms as T
from PIL import Image

import data
from data import DATASETS, Item, load_splits, write_synthetic_dataset

TEST_ONLY = ("imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r")


def synthetic(tmp_path, dataset, **kw):
    kw = dict(dict(num_classes=4, images_per_class=8, image_size=8), **kw)
    return write_synthetic_dataset(str(tmp_path), dataset, **kw)


def reference_fewshot(items, k):
    """Dassl's generate_fewshot_dataset as its source reads, on the global generator."""
    by_label = {}
    for it in items:
        by_label.setdefault(it[1], []).append(it)
    out = []
    for label in by_label:
        out += random.sample(by_label[label], k) if len(by_label[label]) >= k else by_label[label]
    return out


@pytest.mark.parametrize("dataset", list(DATASETS))
def test_every_layout_loads(tmp_path, dataset):
    folder = synthetic(tmp_path, dataset)
    s = load_splits(dataset, str(tmp_path), num_shots=2, seed=1)
    assert len(s["classnames"]) == 4
    assert {i.label for i in s["test"]} == set(range(4))
    assert all(os.path.isfile(i.impath) and i.impath.startswith(folder) for i in s["test"] + s["train"])
    assert all(s["classnames"][i.label] == i.classname for i in s["train"] + s["val"] + s["test"])
    if dataset in TEST_ONLY:
        assert s["train"] == s["val"] == [] and len(s["test"]) == 32
    else:
        assert len(s["train"]) == 8 and len(s["test"]) == 8
        assert s["val"] == s["test"] if dataset == "imagenet" else len(s["val"]) == 8


def test_imagenet_a_r_use_present_sorted_folders(tmp_path):
    # classnames.txt lists 8 wnids; folders exist for every other one, README.txt ignored
    synthetic(tmp_path, "imagenet_r")
    lines = open(tmp_path / "imagenet-rendition" / "classnames.txt").read().splitlines()
    assert len(lines) == 8 and os.path.isfile(tmp_path / "imagenet-rendition" / "imagenet-r" / "README.txt")
    s = load_splits("imagenet_r", str(tmp_path))
    assert s["classnames"] == [line.partition(" ")[2] for line in lines[1::2]]
    assert [i.label for i in s["test"]] == sorted(i.label for i in s["test"])


@pytest.mark.parametrize("dataset", ["caltech101", "stanford_cars", "fgvc_aircraft", "imagenet"])
@pytest.mark.parametrize("shots,seed", [(4, 1), (4, 3), (8, 2)])
def test_fewshot_picks_equal_dassl(tmp_path, dataset, shots, seed):
    folder = synthetic(tmp_path, dataset, num_classes=5, images_per_class=12)
    info = DATASETS[dataset]
    image_dir = os.path.join(folder, info.image_dir)
    # independent reading of the layout: (path, label) lists in CoOp's order
    if info.layout == "split_json":
        split = json.load(open(os.path.join(folder, info.split_file)))
        train, val = ([(os.path.join(image_dir, p), y) for p, y, _ in split[k]] for k in ("train", "val"))
    elif info.layout == "fgvc_aircraft":
        variants = open(os.path.join(folder, "variants.txt")).read().splitlines()
        train, val = ([(os.path.join(image_dir, ln.split(" ")[0] + ".jpg"), variants.index(ln.split(" ", 1)[1]))
                       for ln in open(os.path.join(folder, f"images_variant_{k}.txt")).read().splitlines()]
                      for k in ("train", "val"))
    else:
        d = os.path.join(image_dir, "train")
        train = [(os.path.join(d, w, f), y) for y, w in enumerate(sorted(os.listdir(d)))
                 for f in sorted(os.listdir(os.path.join(d, w)))]
    random.seed(seed)
    want_train = reference_fewshot(train, shots)
    want_val = None if dataset == "imagenet" else reference_fewshot(val, min(shots, 4))
    state = random.getstate()
    for _ in range(2):  # the second call reads the cache the first one wrote
        s = load_splits(dataset, str(tmp_path), num_shots=shots, seed=seed)
        assert [(i.impath, i.label) for i in s["train"]] == want_train
        if want_val is not None:
            assert [(i.impath, i.label) for i in s["val"]] == want_val
    assert random.getstate() == state  # the global generator is left alone
    assert os.path.isfile(os.path.join(folder, "split_fewshot", f"shot_{shots}-seed_{seed}.pkl"))
    if shots == 8:  # 6 train images per class (ImageNet 9): fewer than K -> all of them
        assert len(s["train"]) == (40 if dataset == "imagenet" else 30)


@pytest.fixture
def fake_dassl(monkeypatch):
    """A stand-in for the dassl package, so pickles name dassl's Datum as CoOp's do."""
    names = ["dassl", "dassl.data", "dassl.data.datasets", "dassl.data.datasets.base_dataset"]
    for n in names:
        monkeypatch.setitem(sys.modules, n, types.ModuleType(n))
    module = sys.modules[names[-1]]

    class Datum:
        def __init__(self, impath, label, classname):
            self._impath, self._label, self._domain, self._classname = impath, label, 0, classname

    Datum.__module__, Datum.__qualname__ = module.__name__, "Datum"
    module.Datum = Datum
    return Datum


def test_coop_cache_is_honoured_and_remapped(tmp_path, fake_dassl):
    folder = synthetic(tmp_path, "caltech101", num_classes=3, images_per_class=12)
    split = json.load(open(os.path.join(folder, "split_zhou_Caltech101.json")))
    elsewhere = "/home/someone/datasets/caltech-101/101_ObjectCategories/"
    # picks no seed would give: the last two listed train images of each class, val the first
    train = [fake_dassl(elsewhere + p, y, c) for p, y, c in split["train"][-6:]]
    val = [fake_dassl(elsewhere + p, y, c) for p, y, c in split["val"][:3]]
    os.makedirs(os.path.join(folder, "split_fewshot"))
    with open(os.path.join(folder, "split_fewshot", "shot_2-seed_1.pkl"), "wb") as f:
        pickle.dump({"train": train, "val": val}, f, protocol=pickle.HIGHEST_PROTOCOL)
    s = load_splits("caltech101", str(tmp_path), num_shots=2, seed=1)
    image_dir = os.path.join(folder, "101_ObjectCategories")
    assert s["train"] == [Item(os.path.join(image_dir, p), y, c) for p, y, c in split["train"][-6:]]
    assert s["val"] == [Item(os.path.join(image_dir, p), y, c) for p, y, c in split["val"][:3]]


def test_our_cache_reads_as_dassl_datum(tmp_path, fake_dassl):
    folder = synthetic(tmp_path, "oxford_pets")
    s = load_splits("oxford_pets", str(tmp_path), num_shots=2, seed=2)
    with open(os.path.join(folder, "split_fewshot", "shot_2-seed_2.pkl"), "rb") as f:
        cached = pickle.load(f)  # plain pickle, as CoOp loads it
    assert all(type(d) is fake_dassl for d in cached["train"] + cached["val"])
    assert [(d._impath, d._label, d._classname) for d in cached["train"]] == \
        [(os.path.abspath(i.impath), i.label, i.classname) for i in s["train"]]


def test_unexpected_class_in_cache_is_refused(tmp_path):
    folder = synthetic(tmp_path, "dtd")
    path = os.path.join(folder, "split_fewshot", "shot_2-seed_1.pkl")
    os.makedirs(os.path.dirname(path))
    with open(path, "wb") as f:
        pickle.dump({"train": [io.BytesIO(b"x")]}, f)
    with pytest.raises(pickle.UnpicklingError, match=r"shot_2-seed_1\.pkl.*refusing.*_io\.BytesIO"):
        load_splits("dtd", str(tmp_path), num_shots=2, seed=1)


@pytest.mark.parametrize("num_classes,base,new", [
    (1000, 500, 500), (37, 19, 18), (101, 51, 50), (397, 199, 198), (47, 24, 23), (100, 50, 50),
    (196, 98, 98), (102, 51, 51), (10, 5, 5)])  # ImageNet, Pets, Food/UCF, SUN, DTD, Caltech/Aircraft, Cars, Flowers, EuroSAT
def test_base_new_class_counts(num_classes, base, new):
    labels = list(range(num_classes))
    random.Random(0).shuffle(labels)  # labels appear in any order; halves follow sorted labels
    items = [Item(f"img{y}_{j}.jpg", y, f"name{y}") for y in labels for j in range(2)]
    splits = dict(train=items, val=items[::2], test=items[1::2], classnames=[f"name{y}" for y in range(num_classes)])
    for subsample, count, first in (("base", base, 0), ("new", new, base)):
        s = data.subsample_classes(splits, subsample)
        assert s["classnames"] == [f"name{y}" for y in range(first, first + count)]
        for split in ("train", "val", "test"):
            assert sorted({i.label for i in s[split]}) == list(range(count))
            assert all(i.classname == f"name{i.label + first}" for i in s[split])
        assert len(s["train"]) == 2 * count


def test_base_new_uses_fewshot_train_labels(tmp_path):
    synthetic(tmp_path, "eurosat", num_classes=5)
    base = load_splits("eurosat", str(tmp_path), num_shots=1, subsample="base")
    new = load_splits("eurosat", str(tmp_path), num_shots=1, subsample="new")
    assert base["classnames"] == ["class_000", "class_001", "class_002"]
    assert new["classnames"] == ["class_003", "class_004"]
    assert [i.label for i in new["test"]] and {i.label for i in new["test"]} == {0, 1}


def test_transforms():
    colour = (200, 30, 90)
    image = Image.new("RGB", (24, 16), colour)
    x = data.build_transform(False, 12)(image)
    assert x.dtype == torch.uint8 and x.shape == (3, 12, 12)
    want = (torch.tensor(colour) / 255 - torch.tensor(data.CLIP_MEAN)) / torch.tensor(data.CLIP_STD)
    x = data.normalize(x[None])[0]
    assert x.dtype == torch.float32 and torch.allclose(x, want[:, None, None].expand_as(x), atol=1e-5)
    assert data.build_transform(True, 10)(image).shape == (3, 10, 10)


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("height, width", [(37, 53), (53, 37), (20, 20), (7, 11), (300, 9), (8, 400)])
def test_uint8_batches_normalised_on_the_device_equal_totensor_normalize_bitwise(train, height, width):
    """The loaders' uint8 output + normalize() gives exactly (bitwise, float32) what the reference
    pipeline, torchvision's transforms (Dassl's) then ToTensor + Normalize, gives, drawing the same
    random numbers: landscape, portrait, already the size, smaller than it (upscaled), and so narrow
    that every random crop is refused (the central fallback)."""
    bicubic = T.InterpolationMode.BICUBIC
    head = [T.RandomResizedCrop(20, scale=(0.08, 1.0), interpolation=bicubic), T.RandomHorizontalFlip()] \
        if train else [T.Resize(20, interpolation=bicubic), T.CenterCrop(20)]
    reference = T.Compose(head + [T.ToTensor(), T.Normalize(data.CLIP_MEAN, data.CLIP_STD)])
    rng = np.random.default_rng(3)
    for seed in range(6):
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        torch.manual_seed(seed)
        want, after = reference(image), torch.rand(1)
        torch.manual_seed(seed)  # the same random crop and flip
        got = data.normalize(data.build_transform(train, 20)(image)[None])[0]
        assert got.dtype == torch.float32 and torch.equal(got, want), seed
        assert torch.equal(torch.rand(1), after), seed  # as many draws
    every_value = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(1, 3, 16, 16)
    want = T.Normalize(data.CLIP_MEAN, data.CLIP_STD)(T.ToTensor()(Image.fromarray(
        every_value[0].permute(1, 2, 0).numpy().copy())))
    assert torch.equal(data.normalize(every_value)[0], want)


def test_normalize_makes_its_constants_once_per_device(monkeypatch):
    """normalize() runs on every training and eval batch: a tensor built from the host there
    is a blocking copy (a device synchronisation per step on CUDA)."""
    batch = torch.randint(256, (2, 3, 4, 4), dtype=torch.uint8)
    want = data.normalize(batch)
    made = []
    real_tensor = torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: made.append(a) or real_tensor(*a, **k))
    assert torch.equal(data.normalize(batch), want) and made == []


def collect(world_size, workers, items, epochs=(0, 1), batch=4):
    """Per epoch and step: the rank slices concatenated in rank order."""
    loaders = [data.build_train_loader(items, batch, 8, seed=5, rank=r, world_size=world_size, workers=workers)
               for r in range(world_size)]
    out = []
    for e in epochs:
        for loader in loaders:
            loader.set_epoch(e)
        for step in zip(*loaders):
            out.append((torch.cat([x for x, _ in step]), torch.cat([y for _, y in step])))
    return out


def test_train_loader_same_samples_for_any_world_size_and_workers(tmp_path):
    synthetic(tmp_path, "food101", num_classes=5, images_per_class=6, image_size=16)
    items = load_splits("food101", str(tmp_path), num_shots=0)["train"]  # 20 images
    items = [Item(i.impath, n, i.classname) for n, i in enumerate(items)][:14]  # label = index
    state = torch.get_rng_state()
    want = collect(1, 0, items)
    assert torch.equal(torch.get_rng_state(), state)  # the global torch generator is left alone
    assert len(want) == 2 * 3  # 14 images, batch 4: 3 steps, the incomplete batch dropped
    for epoch in (want[:3], want[3:]):
        seen = torch.cat([y for _, y in epoch])
        assert len(set(seen.tolist())) == 12
    assert not torch.equal(torch.cat([y for _, y in want[:3]]), torch.cat([y for _, y in want[3:]]))
    for world_size, workers in ((2, 0), (4, 0), (2, 2)):
        got = collect(world_size, workers, items)
        assert len(got) == len(want)
        for (x, y), (wx, wy) in zip(got, want):
            assert torch.equal(y, wy) and torch.equal(x, wx)


def test_train_loader_leaves_cuda_generators_alone(tmp_path, monkeypatch):
    # With workers=0 the per-sample seeding runs in the main process; reseeding the
    # CUDA generators there would clobber the training's CUDA RNG at every sample.
    synthetic(tmp_path, "food101", num_classes=2, images_per_class=4)
    items = load_splits("food101", str(tmp_path), num_shots=0)["train"]
    reseeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", reseeded.append)
    collect(1, 0, items, epochs=(0,))
    assert reseeded == []


def test_loaders_pin_memory_only_when_asked(tmp_path):
    synthetic(tmp_path, "food101", num_classes=2, images_per_class=4)
    items = load_splits("food101", str(tmp_path), num_shots=0)["train"]
    for pin in (False, True):
        kw = dict(pin_memory=True) if pin else {}  # default: no pinning, whatever the host has
        assert data.build_train_loader(items, 2, 8, seed=0, workers=0, **kw).pin_memory == pin
        assert data.build_eval_loader(items, 2, 8, workers=0, **kw).pin_memory == pin


def test_train_loader_small_split_and_bad_sizes(tmp_path):
    synthetic(tmp_path, "food101", num_classes=3, images_per_class=4)
    items = load_splits("food101", str(tmp_path), num_shots=0)["train"][:5]
    (x, y), = collect(1, 0, items, epochs=(0,), batch=8)  # fewer images than a batch: one smaller batch
    assert x.shape == (5, 3, 8, 8)
    with pytest.raises(ValueError, match="not divisible"):
        data.build_train_loader(items, 6, 8, seed=1, world_size=4, workers=0)


def test_eval_sharding_covers_every_image_once(tmp_path):
    synthetic(tmp_path, "ucf101", num_classes=3, images_per_class=16)
    items = load_splits("ucf101", str(tmp_path))["test"]  # 12 images
    items = [Item(i.impath, n, i.classname) for n, i in enumerate(items)][:11]
    full = [b for b in data.build_eval_loader(items, 4, 8, workers=0)]
    seen = []
    for rank in range(3):
        for x, y in data.build_eval_loader(items, 2, 8, rank=rank, world_size=3, workers=0):
            seen += y.tolist()
            for xi, yi in zip(x, y):
                assert torch.equal(xi, full[yi // 4][0][yi % 4])  # deterministic test transform
    assert sorted(seen) == list(range(11))


def test_error_messages(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'cifar10'.*caltech101.*imagenet_r"):
        load_splits("cifar10", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"caltech-101; .*DATASETS\.md"):  # one line
        load_splits("caltech101", str(tmp_path))
    folder = synthetic(tmp_path, "sun397")
    with pytest.raises(ValueError, match="subsample"):
        load_splits("sun397", str(tmp_path), subsample="old")
    os.rename(os.path.join(folder, "split_zhou_SUN397.json"), os.path.join(folder, "x.json"))
    with pytest.raises(FileNotFoundError, match=r"sun397/split_zhou_SUN397\.json; .*DATASETS\.md"):
        load_splits("sun397", str(tmp_path))
    os.rename(os.path.join(folder, "x.json"), os.path.join(folder, "split_zhou_SUN397.json"))
    test = load_splits("sun397", str(tmp_path))["test"]
    os.remove(test[1].impath)
    with open(test[2].impath, "wb") as f:
        f.write(b"not an image")
    for i, err in ((1, FileNotFoundError), (2, data.DataError)):
        loader = data.build_eval_loader(test[i:i + 1], 1, 8, workers=0)
        with pytest.raises(err, match=re.escape(test[i].impath)):
            next(iter(loader))


@pytest.mark.parametrize("content, message", [
    ("", r"imagenetv2/classnames.txt: no class names \(an empty file\?\); expected lines '<wnid> <class name>'"),
    ("n01440764 tench\nn01443537\n", r"classnames.txt:2: 'n01443537' has no class name"),
])
def test_class_name_file_without_names_is_named(tmp_path, content, message):
    # an empty file listed no image folder: "the test split is empty", naming no file
    folder = synthetic(tmp_path, "imagenetv2")
    with open(os.path.join(folder, "classnames.txt"), "w") as f:
        f.write(content)
    with pytest.raises(data.DataError, match=message):
        load_splits("imagenetv2", str(tmp_path))


def test_synthetic_classes_are_distinguishable(tmp_path):
    synthetic(tmp_path, "oxford_flowers", num_classes=6)
    means = {}
    for it in load_splits("oxford_flowers", str(tmp_path), num_shots=0)["train"]:
        means.setdefault(it.label, []).append(np.asarray(Image.open(it.impath), np.float32).mean((0, 1)))
    centres = np.stack([np.mean(v, 0) for _, v in sorted(means.items())])
    spread = max(np.abs(v - centres[y]).max() for y, vs in means.items() for v in vs)
    gap = min(np.abs(centres[a] - centres[b]).max() for a in range(6) for b in range(a))
    assert gap > 2 * spread


# ----------------------------------------------------------------------------- bad data, found up front

def edit_split(folder, change):
    """Rewrite caltech101's split file as change(split dict) returns it."""
    path = os.path.join(folder, "split_zhou_Caltech101.json")
    with open(path) as f:
        split = json.load(f)
    with open(path, "w") as f:
        f.write(change(split) if callable(change) else change)
    return path


@pytest.mark.parametrize("change, message", [
    ('{"train": [["a.jpg", 0, "a"]], "val', r"split_zhou_Caltech101\.json: not valid JSON .*cut short"),
    (lambda s: json.dumps({"train": s["train"], "test": s["test"]}), r"split_zhou_Caltech101\.json: expected a JSON"),
    (lambda s: json.dumps(dict(s, test=[["x.jpg", 1]] + s["test"])), r"test\[0\] is \[\"x\.jpg\", 1\]"),
    (lambda s: json.dumps(dict(s, test=s["test"] + [[s["test"][0][0], 7, "class_007"]])),
     r"test image .* has label 7, outside the train labels 0\.\.2"),
    (lambda s: json.dumps(dict(s, val=s["val"] + [[s["val"][0][0], 1, "other name"]])),
     r"label 1 is named 'class_001' and 'other name'"),
])
def test_bad_split_files_are_named_at_load(tmp_path, change, message):
    folder = synthetic(tmp_path, "caltech101", num_classes=3)
    edit_split(folder, change)
    with pytest.raises(data.DataError, match=message):
        load_splits("caltech101", str(tmp_path), num_shots=2)


def test_missing_listed_image_is_found_at_load(tmp_path):
    synthetic(tmp_path, "caltech101", num_classes=3)
    test = load_splits("caltech101", str(tmp_path), num_shots=2)["test"]
    os.remove(test[-1].impath)
    with pytest.raises(data.MissingData, match=r"1 image\(s\) listed in the test split are missing.*" +
                       re.escape(test[-1].impath)):
        load_splits("caltech101", str(tmp_path), num_shots=2)


def write_cache(path, content):
    with open(path, "wb") as f:
        data._DasslPickler(f, protocol=4).dump(content)


def test_cache_out_of_date_or_with_an_extra_key_is_refused(tmp_path):
    folder = synthetic(tmp_path, "caltech101", num_classes=3)
    picked = load_splits("caltech101", str(tmp_path), num_shots=2)  # writes the cache
    path = os.path.join(folder, "split_fewshot", "shot_2-seed_1.pkl")
    as_datum = [data._Datum(i.impath, i.label, i.classname) for i in picked["train"]]
    # the split file fixed after the cache was written: the cache's old label is refused
    stale = [data._Datum(d._impath, (d._label + 1) % 3, d._classname) if j == 0 else d for j, d in enumerate(as_datum)]
    write_cache(path, {"train": stale, "val": []})
    with pytest.raises(data.DataError, match=r"shot_2-seed_1\.pkl: image .* in the cache but .*out of date"):
        load_splits("caltech101", str(tmp_path), num_shots=2)
    write_cache(path, {"train": as_datum, "val": [], "test": []})
    with pytest.raises(data.CacheError, match=r"unexpected key 'test'.*delete it"):
        load_splits("caltech101", str(tmp_path), num_shots=2)


def test_full_data_disk_while_writing_the_cache_only_warns(tmp_path, monkeypatch, capsys):
    folder = synthetic(tmp_path, "caltech101", num_classes=3)

    def disk_full(self, obj):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(data._DasslPickler, "dump", disk_full)
    splits = load_splits("caltech101", str(tmp_path), num_shots=2)
    assert len(splits["train"]) == 6
    assert "warning: cannot write few-shot cache" in capsys.readouterr().err
    assert os.listdir(os.path.join(folder, "split_fewshot")) == []  # no partial file left


def test_16_bit_png_is_scaled_to_8_bits(tmp_path):
    levels = (np.arange(256, dtype=np.uint16) * 257).reshape(16, 16)  # 0, 257, ..., 65535
    path = str(tmp_path / "deep.png")
    Image.fromarray(levels).save(path)  # uint16 -> mode I;16
    with Image.open(path) as image:
        assert image.mode in ("I;16", "I")  # what the decoder gives for 16-bit greyscale
    rgb = np.asarray(data.load_image(path))
    assert rgb.shape == (16, 16, 3) and (rgb[..., 0] == rgb[..., 2]).all()
    assert (rgb[..., 0] == np.arange(256).reshape(16, 16)).all()  # all 256 levels, as a viewer shows them


def test_synthetic_natural_images_are_photo_sized(tmp_path):
    synthetic(tmp_path, "dtd", num_classes=2, images_per_class=4, image_size=(500, 375), natural=True)
    items = load_splits("dtd", str(tmp_path), num_shots=0)["train"]
    for it in items:
        with Image.open(it.impath) as image:
            assert image.size == (500, 375) and image.format == "JPEG"
        assert 20_000 < os.path.getsize(it.impath) < 200_000  # a photo-sized JPEG (flat colour: ~3 KB)


def test_fewer_training_images_than_ranks_is_a_data_error(tmp_path):
    synthetic(tmp_path, "caltech101", num_classes=3)
    items = load_splits("caltech101", str(tmp_path), num_shots=2)["train"][:1]
    with pytest.raises(data.DataError, match="1 training images cannot feed 2 ranks: run on at most 1 ranks"):
        data.build_train_loader(items, 2, 32, seed=1, rank=0, world_size=2, workers=0)
