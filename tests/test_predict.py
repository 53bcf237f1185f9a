"""predict.py: eval.py's accuracy image by image, the exported head on plain CLIP, the refusal of
hosts no head can stand for, the cache atlas against a float64 recomputation, bad input."""
import json
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T

import clip_model
import data
import eval as evaluate_cli  # "eval" would shadow the builtin
import flags
import hosts
import predict
import textrefiner
import train
from helpers import assert_usage_error, read_results, ref_encode_image, ref_projection, train_argv

CPU = ["--device", "cpu", "--workers", "0"]


def test_json_top1_is_evals_accuracy_on_the_base_and_on_all_classes(run, capsys):
    root, weights, out = run
    best = os.path.join(out, "best.pt")
    trained = read_results(out)
    assert torch.load(best, weights_only=True)["classnames"] == trained["classnames"]  # recorded
    every = evaluate_cli.main(["--checkpoint", best, "--subsample", "all", *CPU])
    capsys.readouterr()  # its accuracy line
    assert 0 < every["accuracy"] < 100  # some predictions wrong: which ones shows in macro-F1
    for subsample, expected, names in (("base", trained, None), ("all", every, every["classnames"])):
        items = data.load_splits("caltech101", root, subsample=subsample)["test"]
        given = ["--classnames", ",".join(names)] if names else []  # base: the checkpoint's own
        predict.main([*[item.impath for item in items], "--checkpoint", best, "--json", *given, *CPU])
        lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert [line["image"] for line in lines] == [item.impath for item in items]
        assert all(len(line["top"]) == min(5, len(expected["classnames"])) for line in lines)
        confusion = torch.zeros(len(expected["classnames"]), len(expected["classnames"]), dtype=torch.long)
        for line, item in zip(lines, items):
            probabilities = [p for _, p in line["top"]]
            assert probabilities == sorted(probabilities, reverse=True)
            true, guess = (expected["classnames"].index(n) for n in (item.classname, line["top"][0][0]))
            confusion[true, guess] += 1
        mine = train.metrics(confusion, expected["classnames"])
        for key in ("accuracy", "macro_f1", "per_class_accuracy", "num_images"):
            assert mine[key] == expected[key], (subsample, key)


def plain_clip_probabilities(head, paths):
    """The README's deployment: CLIP's own preprocessing and image tower, the head's tensors."""
    clip = clip_model.load_clip(head["clip"])
    size = clip.config.image_resolution
    preprocess = T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
                            T.CenterCrop(size), T.ToTensor(), T.Normalize(data.CLIP_MEAN, data.CLIP_STD)])
    images = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in paths])
    with torch.no_grad():
        features = F.normalize(clip.encode_image(images), dim=-1)
    return (head["logit_scale"] * features @ head["weight"].T).softmax(dim=-1)


def test_exported_head_on_plain_clip_gives_predicts_probabilities(run, tmp_path):
    root, weights, out = run
    path = str(tmp_path / "head.pt")
    predict.main(["--export-head", path, "--checkpoint", os.path.join(out, "best.pt"), *CPU])
    head = torch.load(path, weights_only=True)
    assert sorted(head) == ["classnames", "clip", "clip_sha256", "logit_scale", "weight"]
    assert head["classnames"] == ["class_000", "class_001", "class_002"] and isinstance(head["logit_scale"], float)
    assert head["weight"].dtype == torch.float32 and head["weight"].shape == (3, 64)
    assert head["clip_sha256"] == clip_model.sha256(weights)
    paths = [item.impath for item in data.load_splits("caltech101", root, subsample="all")["test"][::3]]
    for i, size in enumerate(((48, 36), (30, 45))):  # not square: the resize and the crop count
        paths.append(str(tmp_path / f"{i}.png"))
        Image.open(paths[i]).resize(size, Image.BILINEAR).save(paths[-1])
    model = textrefiner.load(os.path.join(out, "best.pt"), device="cpu", precision="fp32")  # the Python API
    with pytest.raises(TypeError, match="load: unknown options colour"):  # predict.load's options, checked
        textrefiner.load(os.path.join(out, "best.pt"), device="cpu", colour=1)
    predicted = torch.tensor([[p for _, p in sorted(top, key=lambda t: head["classnames"].index(t[0]))]
                              for top in model.predict(paths, topk=3)])
    torch.testing.assert_close(plain_clip_probabilities(head, paths), predicted, rtol=0, atol=1e-4)
    # TextRefiner's rows are the refined features, not re-normalised: their norms are in the logits
    assert (head["weight"].norm(dim=-1) - 1).abs().max() > 1e-4

    names = ["tabby cat", "dog"]  # zero-shot CLIP: the hand-made prompt's text features
    predict.main(["--export-head", path, "--zeroshot", "--clip", weights, "--classnames", ",".join(names), *CPU])
    head, clip = torch.load(path, weights_only=True), clip_model.load_clip(weights)
    with torch.no_grad():
        text = clip.encode_text(clip_model.tokenize([f"a photo of a {name}." for name in names]))
    torch.testing.assert_close(head["weight"], F.normalize(text, dim=-1), rtol=0, atol=1e-5)
    assert head["clip"] == weights and head["logit_scale"] == pytest.approx(clip.logit_scale.exp().item())


def test_a_maple_checkpoint_is_refused_in_one_line(run, tmp_path, capsys):
    root, weights, out = run
    args = train.parse_args(["--method", "maple", "--depth", "2", *train_argv(root, weights, str(tmp_path / "m"))])
    names = ["class_000", "class_001", "class_002"]
    recipe = flags.prepare_recipe(hosts.MaPLeCLIP, args, names)
    model = flags.build_model(hosts.MaPLeCLIP, clip_model.load_clip(weights), names, recipe)
    checkpoint = str(tmp_path / "maple.pt")
    torch.save(dict(model=model.trainable_state_dict(), args=vars(args), epoch=0, selection="last",
                    classnames=names), checkpoint)
    head = str(tmp_path / "head.pt")
    assert_usage_error(predict.main, ["--export-head", head, "--checkpoint", checkpoint, *CPU],
                       "MaPLeCLIP's image features are not the plain CLIP image tower's", capsys)
    assert not os.path.exists(head)
    assert_usage_error(predict.main, ["--atlas", str(tmp_path / "a.png"), "--checkpoint", checkpoint, *CPU],
                       "--atlas: MaPLeCLIP's refiner aligned the tokens of its own (prompted) image tower",
                       capsys)


def test_which_models_a_head_can_stand_for():
    clip = clip_model.build_model(clip_model.random_state_dict(clip_model.CONFIGS["tiny"]))
    names = ["a", "b"]
    for Method in (hosts.CoCoOpCLIP, hosts.IVLPCLIP, hosts.MaPLeCLIP, hosts.PromptSRCCLIP,
                   textrefiner.TextRefinerCLIP, hosts.KgCoOpCLIP, textrefiner.ZeroShotCLIP):
        recipe = Method.recipe(depth=2) if "depth" in flags.recipe_field_names(Method) else Method.recipe()
        why = predict.unexportable(Method(clip, names, recipe.for_run(None, "all", names)))
        if Method is hosts.CoCoOpCLIP:
            assert "CoCoOpCLIP's class features depend on each image" in why
        elif issubclass(Method, hosts.DeepPromptCLIP):
            assert "image tower is prompted or trained" in why, Method
        else:
            assert why is None, Method


def test_atlas_lists_every_slot_best_first_with_the_aligned_tokens_cosines(run, tmp_path, capsys):
    root, weights, out = run
    best, png = os.path.join(out, "best.pt"), str(tmp_path / "atlas.png")
    predict.main(["--atlas", png, "--checkpoint", best, "--images", "4", "--patches", "3", *CPU])
    assert "25 cache slots" in capsys.readouterr().out
    with Image.open(png) as picture:
        assert picture.format == "PNG" and picture.height >= 25 * 96
    with open(str(tmp_path / "atlas.json")) as f:
        slots = json.load(f)["slots"]
    assert len(slots) == 25 and all(len(slot) == 3 for slot in slots)
    # float64: the tower, the alignment with the running statistics, cosines with the cache
    items = data.load_splits("caltech101", root, subsample="base")["test"]
    items = [items[i * len(items) // 4] for i in range(4)]  # evenly spaced along the split
    state = {k: v.double() for k, v in torch.load(best, weights_only=True)["model"].items()}
    transform = data.build_transform(False, 32)
    images = data.normalize(torch.stack([transform(data.load_image(item.impath)) for item in items]))
    _, tokens, _ = ref_encode_image(torch.load(weights, weights_only=True), images)  # (4, 17, 64)
    running = state["refiner.align.bn.running_mean"], state["refiner.align.bn.running_var"]
    aligned, _, _ = ref_projection(tokens.reshape(-1, 64), state, "refiner.align", running)
    cosines = F.normalize(aligned.reshape(4, 17, 64)[:, 1:], dim=-1) @ state["refiner.cache"].t()  # (4, 16, 25)
    where = [item.impath for item in items]
    for m in (0, 7, 24):
        listed = [(where.index(e["image"]), e["patch"][0] * 4 + e["patch"][1]) for e in slots[m]]
        scores = [e["score"] for e in slots[m]]
        assert scores == sorted(scores, reverse=True)
        torch.testing.assert_close(torch.tensor(scores, dtype=torch.float64),
                                   torch.stack([cosines[i, j, m] for i, j in listed]), rtol=0, atol=1e-5)
        expected = cosines[:, :, m].flatten().topk(3).values
        torch.testing.assert_close(torch.tensor(scores, dtype=torch.float64), expected, rtol=0, atol=1e-5)


def test_bad_input_is_one_line_and_a_bad_file_leaves_the_rest_predicted(run, tmp_path, capsys):
    root, weights, out = run
    best = os.path.join(out, "best.pt")
    ckpt = ["--checkpoint", best, *CPU]
    assert_usage_error(predict.main, [str(tmp_path / "nope.jpg"), *ckpt],
                       f"no such image or folder: {tmp_path / 'nope.jpg'}", capsys)
    empty = tmp_path / "names.txt"
    empty.write_text("\n \n")
    for given in (" , ", str(empty)):
        assert_usage_error(predict.main, [root, *ckpt, "--classnames", given], "no class names", capsys)
    other = str(tmp_path / "other-clip.pt")
    torch.save(clip_model.random_state_dict(clip_model.CONFIGS["tiny"], seed=5), other)
    assert_usage_error(predict.main, [root, *ckpt, "--clip", other],
                       f"--clip {other}: not the CLIP {best} was trained with", capsys)

    folder = tmp_path / "photos"
    folder.mkdir()
    items = data.load_splits("caltech101", root, subsample="base")["test"][:2]
    for i, item in enumerate(items):
        shutil.copy(item.impath, folder / f"{i}.jpg")
    (folder / "broken.jpg").write_bytes(open(items[0].impath, "rb").read()[:200])  # cut short
    (folder / "notes.txt").write_text("not an image")  # no image extension: not read
    with pytest.raises(SystemExit) as exit:
        predict.main([str(folder), *ckpt, "--topk", "2"])
    captured = capsys.readouterr()
    assert exit.value.code == 2
    assert captured.err.count("\n") == 1 and str(folder / "broken.jpg") in captured.err, captured.err
    lines = captured.out.splitlines()
    assert [line.split("  ")[0] for line in lines] == [str(folder / "0.jpg"), str(folder / "1.jpg")]
    assert all(len(line.split("  ")) == 3 for line in lines)  # path, then the top 2 and probabilities
    with pytest.raises(data.UserError, match="broken.jpg"):
        textrefiner.load(best, device="cpu").predict([str(folder / "0.jpg"), str(folder / "broken.jpg")])
