"""What makes a table read each image as few times as the protocol allows, each bitwise the uncached
computation: the frozen tower's evaluation features kept (features.FeatureCache: a run's, a table
worker's, on disk, whole or recomputed), the training images decoded once (data.DecodedImages), and
the evaluation JPEGs decoded in batches (data.DecodedOn: decode_jpeg on the CPU here, on CUDA in the
gpu test). Image files opened are counted by the interpreter's audit events (helpers.image_opens)."""
import collections
import io
import os

import pytest
import torch

import clip_model
import data
import features
import train
from helpers import EPOCHS, assert_usage_error, counting, image_opens, train_argv
from textrefiner import TextRefinerCLIP

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def base(run):
    """(data root, weights, base splits, a CoOp + TextRefiner model of the tiny CLIP)."""
    root, weights, _ = run
    splits = data.load_splits("caltech101", root, subsample="base")
    return root, weights, splits, TextRefinerCLIP(clip_model.load_clip(weights), splits["classnames"])


def test_a_feature_store_serves_later_tables_whole_or_recomputes(base, tmp_path, monkeypatch, capsys):
    """A second cache on the same folder (a later table) serves the features without opening an
    image or running the tower; a damaged entry, or one of a changed image file, is recomputed
    (never served) with the same results; the folder keeps within its bound."""
    _, _, splits, model = base
    loader = data.build_eval_loader(splits["test"], 4, 32, workers=0)
    classnames, files = splits["classnames"], {os.path.abspath(i.impath) for i in splits["test"]}
    tower, logits = collections.Counter(), []  # tower["passes"]: batches through the image tower
    monkeypatch.setattr(TextRefinerCLIP, "image_features",
                        counting(tower, "passes", TextRefinerCLIP.image_features))
    monkeypatch.setattr(TextRefinerCLIP, "frozen_image_features", True, raising=False)  # still so
    real_step = train.eval_step

    def recorded_step(*args, **kwargs):
        out = real_step(*args, **kwargs)
        logits.append(out[0])
        return out
    monkeypatch.setattr(train, "eval_step", recorded_step)

    def evaluate(cache):
        tower.clear()
        logits.clear()
        with image_opens(str(tmp_path / f"opens-{len(os.listdir(tmp_path))}")) as opened:
            result = train.evaluate(model, loader, classnames, CPU, "fp32", cache)
        return result, tower["passes"], [*logits], opened()

    reference, passes, reference_logits, _ = evaluate(None)  # no cache: the tower every time
    assert passes == len(loader)
    store = tmp_path / "store"
    first = evaluate(features.FeatureCache(str(store)))
    assert first[0] == reference and first[1] == len(loader) and first[3] == dict.fromkeys(files, 1)
    entry = next(store.iterdir())
    capsys.readouterr()
    later = evaluate(features.FeatureCache(str(store)))  # a later table: nothing decoded or encoded
    assert later[0] == reference and later[1] == 0 and later[3] == {}
    assert f"evaluation features read from the feature store: {entry}" in capsys.readouterr().out
    assert all(torch.equal(a, b) for a, b in zip(later[2], reference_logits))
    blob, head = entry.read_bytes(), len(features.header(entry.stem, b""))
    altered = io.BytesIO()  # a loadable payload, not the one stored
    torch.save([f + 1 for f in torch.load(io.BytesIO(blob[head:]), weights_only=True)], altered)
    for damage in (blob[:head] + altered.getvalue(), blob[:len(blob) // 2]):
        entry.write_bytes(damage)
        damaged = evaluate(features.FeatureCache(str(store)))
        assert damaged[0] == reference and damaged[1] == len(loader)
        assert "is damaged; recomputing it" in capsys.readouterr().err
        assert evaluate(features.FeatureCache(str(store)))[1] == 0  # rewritten whole
    size = entry.stat().st_size
    image = splits["test"][0].impath
    os.utime(image, ns=(os.stat(image).st_atime_ns, os.stat(image).st_mtime_ns + 1))  # changed
    changed = evaluate(features.FeatureCache(str(store), max_bytes=size * 3 // 2))
    assert changed[0] == reference and changed[1] == len(loader)
    assert len(list(store.iterdir())) == 1 and not entry.exists()  # the bound: one entry, the new


def test_one_cache_with_a_run_or_a_worker_lifetime():
    """A run's own cache, or inside kept() the worker's; --no-feature-cache: none."""
    assert isinstance(features.for_run(), features.FeatureCache) and features.for_run(True) is None
    worker = features.FeatureCache()
    with features.kept(worker):
        assert features.for_run() is worker and features.for_run(True) is None
    assert features.for_run() is not worker


def test_training_images_decoded_once_give_the_batches_of_decoding_every_epoch(base, tmp_path):
    """Kept decoded (loader workers or not), past a bound or not: every batch of every epoch is
    bitwise that of decoding each image every epoch, the global RNG untouched; each image kept is
    opened once, one past the bound each time it is drawn."""
    items = base[2]["train"]
    files = [os.path.abspath(i.impath) for i in items]

    def epochs(keep, workers):
        state = torch.get_rng_state()
        with image_opens(str(tmp_path / f"{keep}-{workers}")) as opened:
            loader = data.build_train_loader(items, 4, 24, seed=3, workers=workers, keep_decoded=keep)
            assert torch.equal(torch.get_rng_state(), state)
            batches = []
            for epoch in range(EPOCHS):
                loader.set_epoch(epoch)
                batches += [b for batch in loader for b in batch]
        return batches, opened()

    every_epoch, drawn = epochs(0, 0)
    assert sum(drawn.values()) == EPOCHS * (len(items) // 4 * 4)  # the incomplete batch dropped
    kept, opens = epochs(2**30, 2)
    assert opens == dict.fromkeys(files, 1)
    half = len(items) // 2
    bounded, opens = epochs(32 * 32 * 3 * half, 0)  # room for the first half (32 x 32 images)
    assert opens == {f: 1 + (drawn[f] if i >= half else 0) for i, f in enumerate(files)}
    for other in (kept, bounded):
        assert len(other) == len(every_epoch)
        assert all(torch.equal(a, b) for a, b in zip(other, every_epoch))


def test_batched_decode_jpeg_preprocesses_close_to_pil_and_hands_other_files_to_pil(base, tmp_path):
    """decode_jpeg in one batch, resized and cropped as tensors, gives PIL's pixels within a
    rounding; a PNG in the batch goes through PIL itself (bitwise)."""
    items = base[2]["test"]
    png = tmp_path / "image.png"
    data.load_image(items[0].impath).save(png)
    items = [*items, data.Item(str(png), 0, items[0].classname)]
    pil, labels = next(iter(data.build_eval_loader(items, len(items), 24, workers=0)))
    loader = data.build_eval_loader(items, len(items), 24, workers=0, decode_on="cpu")
    decoded, decoded_labels = next(iter(loader))
    assert decoded.dtype == torch.uint8 and decoded.shape == pil.shape == (len(items), 3, 24, 24)
    assert torch.equal(labels, decoded_labels) and torch.equal(decoded[-1], pil[-1])
    difference = (decoded.float() - pil.float()).abs()
    assert difference.mean() < 1.0 and difference.max() <= 8, (difference.mean(), difference.max())
    assert loader.preprocessing != data.build_eval_loader(items, 4, 24, workers=0).preprocessing


def test_eval_decode_cuda_needs_a_cuda_device(run, tmp_path, capsys):
    root, weights, _ = run
    argv = train_argv(root, weights, str(tmp_path / "out"), "--eval-decode", "cuda")
    assert_usage_error(train.main, argv, "--eval-decode cuda: this run computes on cpu; decoding on "
                                         "the GPU needs a CUDA --device", capsys)


@pytest.mark.gpu
def test_cuda_decode_is_the_cpu_decode_within_a_rounding_and_runs_a_training(base, run, tmp_path):
    items = base[2]["test"]
    cpu, _ = next(iter(data.build_eval_loader(items, len(items), 24, workers=0, decode_on="cpu")))
    cuda, _ = next(iter(data.build_eval_loader(items, len(items), 24, workers=2, decode_on="cuda")))
    assert cuda.device.type == "cuda" and (cuda.cpu().float() - cpu.float()).abs().max() <= 2
    root, weights, _ = run
    argv = train_argv(root, weights, str(tmp_path / "out"), "--eval-decode", "cuda")
    argv[argv.index("cpu")] = "cuda"
    results = train.main(argv)
    assert results["num_images"] == len(items) and results["args"]["eval_decode"] == "cuda"
