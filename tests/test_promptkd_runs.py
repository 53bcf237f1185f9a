"""PromptKD + TextRefiner through train.py / eval.py / make, on the synthetic
caltech101 of test_train.py, a tiny student CLIP and a tiny-teacher CLIP of another width, with
teacher files written in PromptKD's released format and folder layout (CPU)."""
import dataclasses
import os
import subprocess
import sys
from collections import OrderedDict

import pytest
import torch

import bench as benchmarks
import clip_model
import data
import eval as evaluate_cli
import released
import report
import results
import tables
import textrefiner
import flags
import train
from helpers import (
    EPOCHS, PK_DEPTH, REPO, TEACHER_FILE, assert_close_to_scale, assert_same_tensors, assert_usage_error,
    interrupt_at_epoch, Interrupted, pk_argv, read_log, read_results, RunsCode, synthetic, teacher_setup,
    torchrun_two_ranks, trained_run_dir, write_dassl_run, write_result)


def test_recipe_rows_fill_flags_left_at_none_and_explicit_flags_win():
    def resolved(*argv):
        spec = flags.method_spec(list(argv))
        Method = flags.load_method(spec)
        p = train.get_parser(spec)
        args = p.parse_args(list(argv))
        recipe = flags.fill_recipe(p, args, Method, require=False)
        vars(args).update(dataclasses.asdict(recipe.for_run(args.dataset, "base", ["cat", "dog"])))
        return args

    pk = resolved("--method", "promptkd", "--dataset", "caltech101")
    assert (pk.epochs, pk.batch_size, pk.lr, pk.momentum, pk.weight_decay, pk.warmup_epochs, pk.warmup_lr) == \
        (20, 8, 0.005, 0.9, 5e-4, 1, 1e-5)  # PromptKD's recipe
    assert (pk.depth, pk.n_ctx_vision, pk.kd_weight, pk.temperature, pk.teacher_clip) == (9, 4, 1000.0, 1.0, "ViT-L/14")
    assert (pk.cache_size, pk.alpha, pk.cache_momentum, pk.topk) == (25, 0.2, 0.8, 5)
    assert not hasattr(pk, "n_ctx") and not hasattr(pk, "ctx_init")  # CoOp's flags are not PromptKD's
    assert (pk.semantic_weight, pk.reg_weight) == (0.01, 0.02)  # TextRefiner's terms: lambda / 100, lambda / 50
    for dataset in ("fgvc_aircraft", "oxford_flowers", "dtd"):  # PromptKD's per-dataset weight
        assert resolved("--method", "promptkd", "--dataset", dataset).kd_weight == 200.0
    assert resolved("--method", "promptkd", "--dataset", "dtd", "--kd-weight", "7", "--epochs", "2").kd_weight == 7.0
    coop = resolved("--dataset", "dtd")
    assert (coop.method, coop.epochs, coop.batch_size, coop.lr, coop.ctx_init, coop.semantic_weight,
            coop.reg_weight) == ("coop", 10, 32, 0.002, "a photo of a", 0.02, 20.0)  # the paper's CoOp recipe
    assert not hasattr(coop, "kd_weight") and not hasattr(coop, "depth")
    assert resolved("--ctx-init", "", "--lr", "0.1").ctx_init == "" and resolved("--lr", "0.1").lr == 0.1


@pytest.mark.parametrize("argv, message", [
    (["--method", "promptkd", "--n-ctx", "4"], "--n-ctx applies to --method coop or cocoop or kgcoop or ivlp or maple or promptsrc, not promptkd"),
    (["--kd-weight", "200"], "--kd-weight applies to --method promptkd, not coop"),
    (["--teacher", "teachers"], "--teacher applies to --method promptkd, not coop"),
    (["--method", "promptkd"], "--method promptkd needs --teacher"),
    (["--method", "promptkd", "--teacher", "/no/teachers"], "--teacher '/no/teachers': no such file or folder"),
    (["--method", "promptkd", "--teacher", "x", "--kd-weight", "-1"], "--kd-weight: must be >= 0"),
    (["--method", "promptkd", "--teacher", "x", "--temperature", "0"], "--temperature: must be positive"),
    (["--method", "promptkd", "--teacher", "x", "--depth", "0"], "--depth: must be positive"),
])
def test_method_flag_errors(argv, message, tmp_path, monkeypatch, capsys):
    os.makedirs(tmp_path / "x")
    monkeypatch.chdir(tmp_path)  # "x" and "teachers" are relative
    assert_usage_error(train.main, ["--dataset", "caltech101", "--root", str(tmp_path), "--output-dir",
                                    str(tmp_path / "out"), *argv], message, capsys)


def test_teacher_folder_layout_and_alternative_spellings(tmp_path):
    for name in ("StandfordCars", "FGVCAircraft", "DescribableTextures"):
        folder = tmp_path / name / "VLPromptLearner"
        os.makedirs(folder)
        (folder / "model-best.pth.tar").write_bytes(b"")
    os.makedirs(tmp_path / "ImageNet-xd" / "VLPromptLearner_large")
    (tmp_path / "ImageNet-xd" / "VLPromptLearner_large" / "model.pth.tar-20").write_bytes(b"")
    t = str(tmp_path)
    assert released.teacher_file(t, "stanford_cars", "base") == f"{t}/StandfordCars/VLPromptLearner/model-best.pth.tar"
    assert released.teacher_file(t, "fgvc_aircraft", "new") == f"{t}/FGVCAircraft/VLPromptLearner/model-best.pth.tar"
    assert released.teacher_file(t, "dtd", "all") == f"{t}/ImageNet-xd/VLPromptLearner_large/model.pth.tar-20"
    file = f"{t}/DescribableTextures/VLPromptLearner/model-best.pth.tar"
    assert released.teacher_file(file, "eurosat", "base") == file  # a file is used as given
    with pytest.raises(data.MissingData, match=f"expected {t}/EuroSAT/VLPromptLearner/model-best.pth.tar"):
        released.teacher_file(t, "eurosat", "base")
    with pytest.raises(data.MissingData, match=f"{t}/OxfordPets/VLPromptLearner/model-best.pth.tar"):
        released.teacher_file(t, "oxford_pets", "base")
    with pytest.raises(data.UserError, match="no base-class teacher for imagenet_a"):
        released.teacher_file(t, "imagenet_a", "base")


def test_promptkd_base2new_run(pk_run):
    """Student on the unlabelled shots of ALL 6 classes; per-epoch base-class test accuracy picks
    the epoch (as released); Base = that accuracy; the loss is lambda(kd + local/100 + reg/50)."""
    base, out = pk_run
    log = read_log(out)
    assert [r["epoch"] for r in log] == list(range(EPOCHS))
    assert [r["lr"] for r in log] == pytest.approx([1e-5, 0.005, 0.00375], rel=1e-9)  # 0.005(1+cos(pi/3))/2
    for r in log:
        assert {"loss_kd", "loss_local", "loss_reg", "val_acc"} <= r.keys() and "loss_global" not in r
        assert r["loss"] == pytest.approx(1000 * (r["loss_kd"] + r["loss_local"] / 100 + r["loss_reg"] / 50),
                                          rel=1e-5)  # caltech101: lambda 1000
    results = read_results(out)
    assert (results["method"], results["selection"], results["subsample"]) == ("promptkd", "best-test", "base")
    assert (results["train_classes"], results["train_images"], results["num_classes"]) == (6, 36, 3)
    assert results["classnames"] == ["class_000", "class_001", "class_002"] and results["num_images"] == 9
    best_epoch = max(range(EPOCHS), key=lambda e: (log[e]["val_acc"], -e))
    assert results["epoch"] == best_epoch and results["accuracy"] == log[best_epoch]["val_acc"]
    teacher = os.path.join(base, "teachers", TEACHER_FILE)
    assert results["teacher"] == teacher and results["teacher_sha256"] == clip_model.sha256(teacher)
    last = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    assert last["args"]["teacher_sha256"] == results["teacher_sha256"] and last["args"]["kd_weight"] == 1000.0
    assert last["model"]["visual_prompts"].shape == (PK_DEPTH, 4, 128)
    assert {k.split(".")[0] for k in last["model"]} == {"visual_prompts", "image_proj", "refiner"}


def test_new_classes_are_the_same_checkpoints_rows(pk_run, tmp_path):
    """eval.py --subsample new: the all-class classifier's new rows; equal to a student built for
    the new class names alone (refinement is row-wise)."""
    base, out = pk_run
    new = evaluate_cli.main(["--checkpoint", os.path.join(out, "best.pt"), "--subsample", "new", "--workers", "0",
                             "--device", "cpu", "--output-dir", str(tmp_path)])
    assert new["classnames"] == ["class_003", "class_004", "class_005"] and new["num_images"] == 9
    assert (new["method"], new["selection"]) == ("promptkd", "best-test")
    root, student = synthetic(base)
    teacher_clip, teachers = teacher_setup(base)
    splits = data.load_splits("caltech101", root, subsample="new")
    base_names = data.load_splits("caltech101", root, subsample="base")["classnames"]
    teacher = textrefiner.PromptSRCTeacher.from_checkpoint(clip_model.load_clip(teacher_clip),
                                                           os.path.join(teachers, TEACHER_FILE),
                                                           splits["classnames"], trained_classnames=base_names)
    model = textrefiner.PromptKDCLIP(clip_model.load_clip(student), splits["classnames"],
                                     textrefiner.PromptKDRecipe(depth=PK_DEPTH), teacher=teacher)
    model.load_trainable_state_dict(torch.load(os.path.join(out, "best.pt"), weights_only=True)["model"])
    loader = data.build_eval_loader(splits["test"], 4, 32, workers=0)
    alone = train.evaluate(model, loader, splits["classnames"], torch.device("cpu"), "fp32")
    assert alone["per_class_accuracy"] == new["per_class_accuracy"] and alone["accuracy"] == new["accuracy"]


def test_selection_last(pk_run, tmp_path):
    base, out = pk_run
    train.main(pk_argv(base, tmp_path, "--selection", "last", "--epochs", "2"))
    results = read_results(tmp_path)
    assert results["selection"] == "last" and results["epoch"] == 1 and not (tmp_path / "best.pt").exists()
    assert all("val_acc" not in r for r in read_log(tmp_path))


def test_resume_after_interruption_ends_bitwise_equal(pk_run, tmp_path, monkeypatch):
    base, out = pk_run
    interrupt_at_epoch(monkeypatch, 2)
    with pytest.raises(Interrupted):
        train.main(pk_argv(base, tmp_path))
    monkeypatch.undo()
    train.main(pk_argv(base, tmp_path, "--resume"))
    for name in ("last.pt", "best.pt"):
        resumed = torch.load(tmp_path / name, weights_only=True)
        reference = torch.load(os.path.join(out, name), weights_only=True)
        assert resumed["epoch"] == reference["epoch"] and resumed["best"] == reference["best"]
        assert_same_tensors(resumed["model"], reference["model"])  # prompts, both BatchNorms, cache: bitwise
    assert [r["loss"] for r in read_log(tmp_path)] == [r["loss"] for r in read_log(out)]
    assert read_results(tmp_path)["accuracy"] == read_results(out)["accuracy"]


def test_torchrun_two_ranks_match_one(pk_run, tmp_path):
    """Global batch 4 as 2 ranks x 2 images (gloo): image_proj's and align's BatchNorm statistics
    over the global batch, the cache update from every rank's tokens, gradients averaged. At a
    small lr: at lambda 1000 and lr 0.005, float32 summation-order differences grow over the steps
    until a token's cache slot (an argmax) flips, which then differs by O(1) in that slot."""
    base, _ = pk_run
    flags = ["--epochs", "2", "--lr", "1e-4"]
    train.main(pk_argv(base, tmp_path / "one", *flags))
    torchrun_two_ranks("train.py", pk_argv(base, tmp_path / "two", *flags))
    one = torch.load(tmp_path / "one" / "last.pt", weights_only=True)["model"]
    two = torch.load(tmp_path / "two" / "last.pt", weights_only=True)["model"]
    # 18 steps at lambda 1000: the worst drift seen is 1.3e-4 of a tensor's scale; a real mismatch
    # (statistics of half the batch, a rank's own cache) is O(1e-1)
    assert_close_to_scale(two, one, rel=1e-3)
    for a, b in zip(read_log(tmp_path / "two"), read_log(tmp_path / "one")):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["val_acc"] == b["val_acc"]


def test_eval_refuses_another_teacher_and_the_other_method(pk_run, tmp_path, capsys):
    base, out = pk_run
    best = os.path.join(out, "best.pt")
    other = os.path.join(base, "other-teacher.pth.tar")
    if not os.path.exists(other):
        names = ["class_000", "class_001", "class_002"]
        released.write_teacher_checkpoint(other, torch.load(teacher_setup(base)[0], weights_only=True), names,
                                             depth=PK_DEPTH, seed=5)
    common = ["--checkpoint", best, "--workers", "0", "--device", "cpu", "--subsample", "new"]
    assert_usage_error(evaluate_cli.main, [*common, "--teacher", other],
                       f"--teacher {other}: not the teacher {best} was trained with", capsys)
    allowed = evaluate_cli.main([*common, "--teacher", other, "--allow-other-teacher"])
    assert allowed["teacher_sha256"] == clip_model.sha256(other)
    assert_usage_error(evaluate_cli.main, [*common, "--method", "coop"],
                       f"--method coop: {best} is a --method promptkd checkpoint", capsys)
    # a CoOp checkpoint on the PromptKD path
    coop = os.path.join(trained_run_dir(base), "best.pt")
    assert_usage_error(evaluate_cli.main, ["--checkpoint", coop, "--workers", "0", "--teacher", other],
                       f"--teacher: {coop} is a --method coop checkpoint, which has no teacher", capsys)
    assert_usage_error(evaluate_cli.main, ["--checkpoint", coop, "--workers", "0", "--method", "promptkd"],
                       f"--method promptkd: {coop} is a --method coop checkpoint", capsys)


def test_resume_with_the_other_method_is_refused(pk_run, tmp_path, capsys):
    base, out = pk_run
    coop = trained_run_dir(base)
    (tmp_path / "last.pt").write_bytes(open(os.path.join(coop, "last.pt"), "rb").read())
    assert_usage_error(train.main, pk_argv(base, tmp_path, "--resume"),
                       f"--resume: {tmp_path}/last.pt is a --method coop run, this command trains --method promptkd",
                       capsys)


def test_teacher_of_another_class_count_is_one_line(pk_run, tmp_path, capsys):
    base, _ = pk_run
    argv = pk_argv(base, tmp_path / "out")
    argv[argv.index("--teacher") + 1] = os.path.join(base, "four-classes.pth.tar")
    assert_usage_error(train.main, argv, "trained on 4 classes (prompt_learner.token_prefix rows), expected 3", capsys)
    assert not (tmp_path / "out" / "last.pt").exists()


def test_teacher_of_another_dataset_with_as_many_classes_is_one_line(pk_run, tmp_path, capsys):
    """A base-class teacher of another dataset (3 classes too): refused by train.py before any
    training, and by eval.py even with --allow-other-teacher, naming the file and the first row."""
    base, out = pk_run
    other = str(tmp_path / "dtd-teacher.pth.tar")
    released.write_teacher_checkpoint(other, torch.load(teacher_setup(base)[0], weights_only=True),
                                         ["banded", "blotchy", "braided"], depth=PK_DEPTH)
    argv = pk_argv(base, tmp_path / "out")
    argv[argv.index("--teacher") + 1] = other
    message = (f"--teacher {other}: teacher file {other}: trained on other classes: 3 of its 3 class prompts "
               f"(prompt_learner.token_suffix rows) differ from ours, the first at row 0 (our 'class_000'); another "
               f"dataset's teacher, or another class order? Pass the dataset's own teacher")
    assert_usage_error(train.main, argv, message, capsys)
    assert not os.path.exists(tmp_path / "out" / "last.pt")
    assert_usage_error(evaluate_cli.main, ["--checkpoint", os.path.join(out, "best.pt"), "--workers", "0", "--device",
                                           "cpu", "--subsample", "new", "--teacher", other, "--allow-other-teacher"],
                       message, capsys)


# ----------------------------------------------------------------------------- the authors' run folders

def write_promptkd_authors_folder(folder, state, student_weights, epoch, best_epoch=None, extra=None):
    """An output folder of the released PromptKD + TextRefiner trainer (released.py's docstring):
    VLPromptLearner/ and Memory/, model.pth.tar-<epoch> (and model-best.pth.tar) plus Dassl's
    'checkpoint' pointer, each file {'state_dict', 'epoch', 'optimizer', 'scheduler', 'val_result'}.
    VLPromptLearner's state_dict in the released key order: logit_scale, image_encoder.VPT, the
    student's image tower (OpenAI dtypes) with resblocks.{1..depth-1}.VPT_shallow first in their
    blocks, VPT_image_trans.conv1.{0,1,3} and mid_image_trans.conv1.{0,1,3} (1x1 Conv2d fp16,
    BatchNorm2d fp32); Memory's is {'extractor.weight' fp16}, with the fp16 cache as the file's
    'memory_item' (requires_grad, as saved). Prompts stay fp32."""
    clip = torch.load(student_weights, weights_only=True)
    prompts = state["visual_prompts"]
    learner = OrderedDict(logit_scale=clip["logit_scale"].float())
    learner["image_encoder.VPT"] = prompts[0].clone()
    for key, value in clip.items():
        if not key.startswith("visual."):
            continue
        block = key.split(".")
        if key.startswith("visual.transformer.resblocks.") and block[4] == "attn" and block[5] == "in_proj_weight":
            i = int(block[3])
            if 1 <= i < prompts.shape[0]:
                learner[f"image_encoder.transformer.resblocks.{i}.VPT_shallow"] = prompts[i].clone()
        learner["image_encoder." + key[len("visual."):]] = released.released_dtype(key, value)
    for theirs, ours in (("VPT_image_trans", "image_proj"), ("mid_image_trans", "refiner.align")):
        for their_key, our_key in released.AUTHORS_ALIGN.items():
            t = state[f"{ours}.{our_key}"]
            if their_key in released.AUTHORS_CONV_WEIGHTS:
                t = t[:, :, None, None]
            learner[f"{theirs}.conv1.{their_key}"] = t.half() if their_key[0] in "03" else t
    memory = OrderedDict([("extractor.weight", state["refiner.extractor.weight"].half())])
    params = [torch.nn.Parameter(t.float().clone()) for t in (learner["image_encoder.VPT"], memory["extractor.weight"])]
    optim = torch.optim.SGD(params, lr=0.005, momentum=0.9, weight_decay=5e-4)
    sched = {"successor": torch.optim.lr_scheduler.CosineAnnealingLR(optim, 20.0), "warmup_epoch": 1,
             "cons_lr": 1e-5, "last_epoch": epoch}
    cache = state["refiner.cache"].half().requires_grad_() * 1
    write_dassl_run(folder, {"VLPromptLearner": learner, "Memory": memory}, cache, optim, sched, epoch, best_epoch,
                    extra)


def released_rounding(state):
    """What the released dtypes do to our fp32 trainables: convs, extractor and cache fp16."""
    fp16 = ("image_proj.fc", "refiner.align.fc", "refiner.extractor", "refiner.cache")
    return {k: v.half().float() if k.startswith(fp16) else v for k, v in state.items()}


def test_authors_promptkd_folder_maps_and_evaluates_as_ours(pk_run, tmp_path):
    base, out = pk_run
    root, student = synthetic(base)
    teacher_clip, teachers = teacher_setup(base)
    ckpt = torch.load(os.path.join(out, "best.pt"), weights_only=True)
    state = ckpt["model"]
    marker = tmp_path / "code-ran"
    write_promptkd_authors_folder(tmp_path / "theirs", state, student, epoch=3, best_epoch=2,
                                  extra={"unexpected": RunsCode(str(marker))})
    mapped, info = released.load_authors_run(str(tmp_path / "theirs"))
    assert not marker.exists()  # read tensors-only: no code from the file ran
    assert_same_tensors(mapped, released_rounding(state))
    assert (info["method"], info["epoch"], info["val_result"], info["precision"]) == ("promptkd", 2, 61.25, "fp16")
    assert info["flags"] == {"depth": PK_DEPTH, "n_ctx_vision": 4, "cache_size": 25}
    assert not any("VPT" in k for k in info["clip_weights"])
    torch.save(dict(ckpt, model=released_rounding(state)), tmp_path / "ours.pt")
    common = ["--workers", "0", "--device", "cpu", "--subsample", "new"]
    theirs = evaluate_cli.main(["--checkpoint", str(tmp_path / "theirs"), "--dataset", "caltech101", "--root", root,
                                "--clip", student, "--teacher", teachers, "--teacher-clip", teacher_clip, *common])
    ours = evaluate_cli.main(["--checkpoint", str(tmp_path / "ours.pt"), *common])
    assert theirs["per_class_accuracy"] == ours["per_class_accuracy"] and theirs["method"] == "promptkd"


def test_authors_promptkd_folder_errors(pk_run, tmp_path, capsys):
    base, out = pk_run
    root, student = synthetic(base)
    state = torch.load(os.path.join(out, "best.pt"), weights_only=True)["model"]
    write_promptkd_authors_folder(tmp_path / "theirs", state, student, epoch=3)
    common = ["--checkpoint", str(tmp_path / "theirs"), "--epoch", "3", "--dataset", "caltech101", "--root", root,
              "--clip", student, "--workers", "0", "--subsample", "new"]
    assert_usage_error(evaluate_cli.main, common, "--teacher is required", capsys)
    path = tmp_path / "theirs" / "VLPromptLearner" / "model.pth.tar-3"
    content = torch.load(path, weights_only=False)
    del content["state_dict"]["image_encoder.transformer.resblocks.1.VPT_shallow"]
    content["state_dict"]["image_encoder.transformer.resblocks.0.VPT_shallow"] = state["visual_prompts"][1]
    torch.save(content, path)
    with pytest.raises(ValueError, match=r"deep visual prompts in blocks \[0\]; expected blocks 1..1"):
        released.load_authors_run(str(tmp_path / "theirs"), 3)
    del content["state_dict"]["VPT_image_trans.conv1.1.running_var"]
    torch.save(content, path)
    with pytest.raises(ValueError, match=r"VPT_image_trans.conv1.1.running_var.*PromptKD \+ TextRefiner run"):
        released.load_authors_run(str(tmp_path / "theirs"), 3)


# ----------------------------------------------------------------------------- make and the report

def test_make_base2new_promptkd_commands():
    proc = subprocess.run(["make", "--no-print-directory", "-n", "-C", REPO, "base2new", "DATASET=dtd", "SEED=2",
                           "METHOD=promptkd", "TEACHERS=/t", "GPUS=2"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "tables.py run base2new --method promptkd --teacher /t --root data --clip ViT-B/16 --runs output/promptkd" \
        in text
    assert "--datasets dtd --seeds 2 --launcher" in text and "--nproc_per_node=2" in text
    xd = subprocess.run(["make", "--no-print-directory", "-n", "-C", REPO, "xd", "METHOD=promptkd", "TEACHERS=/t",
                         "XD_TARGETS=dtd eurosat"], capture_output=True, text=True, timeout=60)
    assert xd.returncode == 0 and "tables.py run xd" in xd.stdout and "--datasets dtd eurosat --seeds 1" in xd.stdout, \
        xd.stderr
    assert train.METHODS["promptkd"].recipe.xd == {"depth": 3}  # PromptKD's cross-dataset student
    bad = subprocess.run(["make", "-C", REPO, "base2new", "METHOD=prograd", "DATASET=dtd", f"PYTHON={sys.executable}"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "--method 'prograd': expected one of coop, promptkd" in bad.stderr, bad.stderr


@pytest.mark.slow
def test_make_demo_promptkd(tmp_path):
    """make demo-promptkd end to end, in a folder of its own (DEMO_PKD)."""
    proc = subprocess.run(["make", "--no-print-directory", "-C", REPO, "demo-promptkd", f"DEMO_PKD={tmp_path}/demo",
                           f"PYTHON={sys.executable}"], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "PromptKD + TextRefiner: base-to-new generalisation" in proc.stdout
    assert "PromptKD+TextRefiner            85.22           79.64           82.33" in proc.stdout
    run = tmp_path / "demo" / "output" / "promptkd" / "base2new" / "caltech101" / "seed1"
    base, new = read_results(run / "base"), read_results(run / "new")
    assert (base["method"], base["selection"], base["num_classes"], new["num_classes"]) == \
        ("promptkd", "best-test", 3, 3)


def test_report_promptkd_tables(tmp_path, capsys):
    for seed, (b, n) in zip((1, 2), ((80, 60), (84, 64))):
        write_result(tmp_path / "b2n" / "dtd" / f"seed{seed}" / "base", b, method="promptkd", selection="best-test")
        write_result(tmp_path / "b2n" / "dtd" / f"seed{seed}" / "new", n, method="promptkd", selection="best-test")
    summary = report.report_folder(str(tmp_path / "b2n"))
    assert (summary["method"], summary["selection"]) == ("promptkd", ["best-test"])
    assert summary["datasets"]["dtd"]["base"] == 82
    text = capsys.readouterr().out
    assert "PromptKD + TextRefiner: base-to-new" in text and "Model selection: best-test (the epoch of best test" in text
    dtd = next(line for line in text.splitlines() if line.startswith("DTD"))
    assert dtd.split()[-3:] == ["85.84", "71.37", "77.94"]  # PromptKD's published DTD row beside ours
    assert "PromptKD+TextRefiner            85.22           79.64           82.33" in text
    assert "PromptKD                        86.96           80.73           83.73" in text
    # the published per-dataset table averages to the published 11-dataset row
    b, n, h = results.published_average(results.PUBLISHED["promptkd"]["base2new_datasets"][1], data.PAPER_DATASETS)
    assert (round(b, 2), round(n, 2), round(h, 2)) == (86.96, 80.73, 83.73)
    write_result(tmp_path / "xd" / "dtd" / "seed1", 50.5, method="promptkd", selection="best-test")
    report.report_folder(str(tmp_path / "xd"))
    text = capsys.readouterr().out
    assert "PromptKD + TextRefiner: accuracy in" in text and "55.08" in text.splitlines()[3]


def test_report_refuses_mixed_methods(tmp_path, capsys):
    for dataset, method in (("dtd", "promptkd"), ("eurosat", None)):
        for part, acc in (("base", 80), ("new", 60)):
            write_result(tmp_path / dataset / "seed1" / part, acc, **({"method": method} if method else {}))
    with pytest.raises(SystemExit):
        tables.main(["report", str(tmp_path)])
    assert "mixes methods (coop:" in capsys.readouterr().err


def test_cross_dataset_student_trains_on_a_test_only_targets_test_images(pk_run, tmp_path):
    """PromptKD's transductive cross-dataset protocol on a test-only ImageNet variant:
    the student distils on the target's test images themselves (as released), all classes, and
    the teacher must be the ImageNet one (1000 classes)."""
    base, _ = pk_run
    _, student = synthetic(base)
    teacher_clip, _ = teacher_setup(base)
    root = str(tmp_path / "data")
    data.write_synthetic_dataset(root, "imagenet_r", num_classes=4, images_per_class=4, image_size=32)
    teachers = tmp_path / "teachers" / "ImageNet-xd" / "VLPromptLearner_large"
    os.makedirs(teachers)
    released.write_teacher_checkpoint(str(teachers / "model.pth.tar-20"),
                                         torch.load(teacher_clip, weights_only=True),
                                         [f"imagenet class {i}" for i in range(1000)], depth=PK_DEPTH)
    argv = ["--method", "promptkd", "--dataset", "imagenet_r", "--root", root, "--clip", student, "--teacher",
            str(tmp_path / "teachers"), "--teacher-clip", teacher_clip, "--subsample", "all", "--shots", "0",
            "--depth", "1", "--device", "cpu", "--epochs", "2", "--batch-size", "4", "--workers", "0",
            "--output-dir", str(tmp_path / "out")]
    train.main(argv)
    results = read_results(tmp_path / "out")
    assert (results["train_images"], results["num_images"], results["num_classes"]) == (16, 16, 4)
    assert results["subsample"] == "all" and results["selection"] == "best-test"
    assert results["teacher"].endswith("ImageNet-xd/VLPromptLearner_large/model.pth.tar-20")


def test_plain_promptkd_trains_and_evaluates(pk_run, tmp_path):
    """--no-refiner: plain PromptKD (loss = lambda * kd; the checkpoint holds prompts and image_proj only)."""
    base, _ = pk_run
    train.main(pk_argv(base, tmp_path / "run", "--no-refiner", "--epochs", "2"))
    log = read_log(tmp_path / "run")
    assert all(r["loss"] == pytest.approx(1000 * r["loss_kd"], rel=1e-6) and r["loss_local"] == 0 for r in log)
    model = torch.load(tmp_path / "run" / "best.pt", weights_only=True)["model"]
    assert {k.split(".")[0] for k in model} == {"visual_prompts", "image_proj"}
    new = evaluate_cli.main(["--checkpoint", str(tmp_path / "run" / "best.pt"), "--subsample", "new", "--workers",
                             "0", "--device", "cpu"])
    assert new["num_classes"] == 3 and new["args"]["method"] == "promptkd"


def test_promptkd_benchmark_times_the_released_per_batch_teacher_text(monkeypatch, capsys):
    """bench.py step --method promptkd: PromptKD + TextRefiner against plain PromptKD and against the
    released per-batch teacher text: that variant computes the teacher's class features in every
    step, the two others once (train_step / eval_step, as the real loops)."""
    calls = []
    real = textrefiner.PromptSRCTeacher.class_features

    def counted(self):  # a recomputation replaces the memo
        before = self._class_features
        out = real(self)
        if self._class_features is not before:
            calls.append(id(self))
        return out

    monkeypatch.setattr(textrefiner.PromptSRCTeacher, "class_features", counted)
    bench = ["step", "--method", "promptkd", "--clip", "tiny", "--teacher-clip", "tiny-teacher", "--device", "cpu",
             "--batch-size", "2", "--num-classes", "3", "--steps", "2", "--warmup", "1"]
    rates = benchmarks.main(bench)
    assert set(rates) == {"PromptKD+TextRefiner", "PromptKD", "PromptKD+TR (released)"}
    assert sorted(calls.count(c) for c in set(calls)) == [1, 1, 3]  # 3 rounds: once, once, every step
    out = capsys.readouterr().out
    assert "PromptKD+TextRefiner step time / PromptKD step time" in out and "target <= 1.10" in out
    assert "PromptKD+TextRefiner step time / PromptKD+TR (released) step time" in out
    calls.clear()
    benchmarks.main([*bench, "--eval"])
    assert sorted(calls.count(c) for c in set(calls)) == [1, 1, 3]
    assert "PromptKD+TextRefiner images/s / PromptKD images/s" in capsys.readouterr().out


@pytest.mark.parametrize("key, value", [("text_encoder.transformer.resblocks.1.VPT_shallow", float("nan")),
                                        ("prompt_learner.ctx", 1e5)])  # ctx is fp16: 1e5 is inf there
def test_nonfinite_teacher_is_refused_before_training_and_by_eval(pk_run, tmp_path, key, value, capsys):
    """A NaN or fp16 inf in the teacher: train.py ran an epoch, then blamed --lr; eval.py gave every
    image class 0 with exit status 0."""
    base, out = pk_run
    content = torch.load(os.path.join(teacher_setup(base)[1], TEACHER_FILE), weights_only=False)
    content["state_dict"][key][0, 1] = value
    bad = str(tmp_path / "bad.pth.tar")
    torch.save(content, bad)
    message = f"--teacher {bad}: teacher file {bad}: tensor {key} holds NaN or inf values"
    argv = pk_argv(base, tmp_path / "out")
    argv[argv.index("--teacher") + 1] = bad
    assert_usage_error(train.main, argv, message, capsys)
    assert not os.path.exists(tmp_path / "out" / "log.jsonl")
    assert_usage_error(evaluate_cli.main, ["--checkpoint", os.path.join(out, "best.pt"), "--workers", "0", "--device",
                                           "cpu", "--subsample", "new", "--teacher", bad, "--allow-other-teacher"],
                       message, capsys)


def test_a_wrong_teacher_clip_is_named_not_the_teacher(pk_run, tmp_path, monkeypatch, capsys):
    """A --teacher-clip of the teacher's shapes but other weights looked like a teacher of other classes,
    one of another width was blamed on --teacher, and offline the hint named --clip."""
    import urllib.error
    import urllib.request
    base, _ = pk_run
    _, student = synthetic(base)
    teacher = os.path.join(teacher_setup(base)[1], TEACHER_FILE)
    other = str(tmp_path / "other-teacher-clip.pt")
    torch.save(clip_model.random_state_dict(clip_model.CONFIGS["tiny-teacher"], seed=7), other)
    argv = pk_argv(base, tmp_path / "out")
    for clip, detail in ((other, "its start-of-text token embedding differs from the file's"),
                         (student, "the file's ")):  # the student's CLIP is narrower
        argv[argv.index("--teacher-clip") + 1] = clip
        assert_usage_error(train.main, argv, f"--teacher-clip {clip} is not the CLIP teacher file {teacher} was "
                                             f"trained from: {detail}", capsys)
    assert not os.path.exists(tmp_path / "out" / "log.jsonl")
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.cache/clip/ViT-L-14.pt

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    argv[argv.index("--teacher-clip") + 1] = "ViT-L/14"
    stderr = assert_usage_error(train.main, argv, "--teacher-clip ViT-L/14: cannot download", capsys)
    assert "--clip" not in stderr


def test_depth_beyond_the_students_blocks_fails_once_the_clip_loads(pk_run, tmp_path, monkeypatch, capsys):
    base, _ = pk_run
    monkeypatch.setattr(data, "build_train_loader", lambda *a, **k: pytest.fail("training started"))
    argv = pk_argv(base, tmp_path / "out")
    argv[argv.index("--depth") + 1] = "3"  # the tiny student has 2 blocks
    assert_usage_error(train.main, argv, "--depth must be at most 2, the blocks of the CLIP's image tower; got 3", capsys)
