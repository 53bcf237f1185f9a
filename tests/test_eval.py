"""eval.py: reproduces train.py's test numbers, loads the authors' checkpoint layout, shards
under torchrun; the base2new make flow and the report tables (tables.py)."""
import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import clip_model
import eval as evaluate_cli  # "eval" would shadow the builtin
import outputs
import released
import report
import results
import tables
import train
from helpers import (
    REPO, assert_same_tensors, assert_usage_error, copy_dataset, read_results, rounded, RunsCode, synthetic,
    teacher_setup, torchrun_two_ranks, train_argv, write_authors_folder, write_result)


def test_eval_reproduces_training_test_numbers(run, tmp_path):
    root, weights, out = run
    # --dataset, --root, --clip and --subsample (base) default to the checkpoint's run
    evaluate_cli.main(["--checkpoint", os.path.join(out, "best.pt"), "--workers", "0", "--batch-size", "4",
                       "--device", "cpu", "--output-dir", str(tmp_path)])
    ours, trained = read_results(tmp_path), read_results(out)
    for key in ("accuracy", "macro_f1", "per_class_accuracy", "classnames", "num_images", "num_classes",
                "split", "subsample"):
        assert ours[key] == trained[key], key
    # results.json records the values used, not the flags left at None
    for key in ("dataset", "root", "clip", "shots", "seed", "subsample", "precision"):
        assert ours["args"][key] == trained["args"][key], key
    new = evaluate_cli.main(["--checkpoint", os.path.join(out, "best.pt"), "--workers", "0", "--device", "cpu",
                             "--subsample", "new"])
    assert new["classnames"] == ["class_003", "class_004", "class_005"] and len(new["per_class_accuracy"]) == 3


def test_precision_defaults_to_the_checkpoints_on_cuda():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # device objects only; no GPU needed
    flags = SimpleNamespace(precision=None)
    assert evaluate_cli.eval_precision(flags, {"precision": "fp32"}, cuda) == "fp32"
    assert evaluate_cli.eval_precision(flags, {"precision": "fp16"}, cuda) == "fp16"
    assert evaluate_cli.eval_precision(flags, {"precision": None}, cuda) == "bf16"  # zero-shot
    assert evaluate_cli.eval_precision(flags, {"precision": "bf16"}, cpu) == "fp32"
    assert evaluate_cli.eval_precision(SimpleNamespace(precision="bf16"), {"precision": "fp32"}, cuda) == "bf16"


def test_metrics_by_hand():
    # rows: true class, columns: predicted. Class 2 never occurs and is never predicted.
    confusion = torch.tensor([[3, 1, 0], [2, 2, 0], [0, 0, 0]])
    m = train.metrics(confusion, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(500 / 8) and m["num_images"] == 8
    # F1 a = 2*3 / (4 + 5) = 2/3, F1 b = 2*2 / (4 + 3) = 4/7; c is left out, as sklearn does
    assert m["macro_f1"] == pytest.approx(100 * (2 / 3 + 4 / 7) / 2)
    assert m["per_class_accuracy"] == [75.0, 50.0, None] and m["classnames"] == ["a", "b", "c"]


def test_macro_f1_averages_over_true_classes_only():
    """Dassl/CoOp: f1_score(y_true, y_pred, average="macro", labels=np.unique(y_true)).
    Class c has no image but is predicted once: it is not averaged in, and that prediction
    still counts against a. F1 a = 2*2 / (3 + 2) = 0.8, F1 b = 2*2 / (2 + 2) = 1."""
    m = train.metrics(torch.tensor([[2, 0, 1], [0, 2, 0], [0, 0, 0]]), ["a", "b", "c"])
    assert m["macro_f1"] == pytest.approx(90.0)


def test_per_class_accuracy_keeps_classes_with_the_same_name():
    m = train.metrics(torch.tensor([[1, 1], [0, 2]]), ["crane", "crane"])  # e.g. the bird and the machine
    assert m["per_class_accuracy"] == [50.0, 100.0] and m["classnames"] == ["crane", "crane"]


# The released trainer's CustomCLIP keeps the frozen CLIP under these names.


@pytest.mark.parametrize("dtype, precision", [(torch.float16, "fp16"), (torch.float32, "fp32")])
def test_authors_checkpoint_maps_to_our_names(run, tmp_path, dtype, precision):
    root, weights, out = run
    state = torch.load(os.path.join(out, "last.pt"), weights_only=True)["model"]
    marker = tmp_path / "code-ran"
    write_authors_folder(tmp_path / "theirs", state, weights, epoch=3, dtype=dtype, best_epoch=2,
                         extra={"unexpected": RunsCode(str(marker))})
    mapped, info = released.load_authors_run(str(tmp_path / "theirs"), epoch=3)
    assert not marker.exists()  # objects other than tensors are not built, so no code from the file ran
    assert all(v.dtype == state[k].dtype for k, v in mapped.items())
    assert_same_tensors(mapped, rounded(state, dtype))
    stored_clip = info.pop("clip_weights")
    assert info == {"method": "coop", "epoch": 3, "val_result": None, "precision": precision, "clip": None,
                    "flags": {"n_ctx": 4, "ctx_init": "a photo of a", "cache_size": 25}}  # tiny CLIP: no name
    clip_weights = {k: v for k, v in torch.load(weights, weights_only=True).items() if k != "logit_scale"}
    assert_same_tensors(stored_clip, clip_weights)  # image_encoder.*, text_encoder.* renamed back
    _, best = released.load_authors_run(str(tmp_path / "theirs"))  # model-best.pth.tar
    assert (best["epoch"], best["val_result"]) == (2, 61.25)
    # The same numbers as our own checkpoint holding the same (rounded) tensors.
    ours_path = tmp_path / "ours.pt"
    ckpt = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    torch.save(dict(ckpt, model=rounded(state, dtype)), ours_path)
    common = ["--workers", "0", "--precision", "fp32", "--device", "cpu"]
    theirs = evaluate_cli.main(["--checkpoint", str(tmp_path / "theirs"), "--epoch", "3", "--dataset", "caltech101",
                                "--root", root, "--clip", weights, "--subsample", "base", *common])
    ours = evaluate_cli.main(["--checkpoint", str(ours_path), *common])
    assert theirs["accuracy"] == ours["accuracy"] and theirs["macro_f1"] == ours["macro_f1"]
    assert theirs["per_class_accuracy"] == ours["per_class_accuracy"]


def test_authors_checkpoint_format_errors(run, tmp_path):
    root, weights, out = run
    state = torch.load(os.path.join(out, "last.pt"), weights_only=True)["model"]
    write_authors_folder(tmp_path / "theirs", state, weights, epoch=10)
    with pytest.raises(FileNotFoundError, match="model-best.pth.tar"):
        released.load_authors_run(str(tmp_path / "theirs"))
    full, _ = released.load_authors_run(str(tmp_path / "theirs"), 10, allow_pickle=True)
    assert_same_tensors(full, rounded(state, torch.float16))
    path = tmp_path / "theirs" / "prompt_learner" / "model.pth.tar-10"
    content = torch.load(path, weights_only=False)
    content["state_dict"]["mid_image_trans.conv1.0.weight"] = state["refiner.align.fc1.weight"]  # (D, D)
    torch.save(content, path)
    with pytest.raises(ValueError, match=r"1x1 convolution weight \(out, in, 1, 1\)"):
        released.load_authors_run(str(tmp_path / "theirs"), 10)
    del content["state_dict"]["mid_image_trans.conv1.3.bias"]
    torch.save(content, path)
    with pytest.raises(ValueError, match="mid_image_trans.conv1.3.bias"):
        released.load_authors_run(str(tmp_path / "theirs"), 10)
    write_authors_folder(tmp_path / "other", state, weights, epoch=10)
    memory = tmp_path / "other" / "Memory" / "model.pth.tar-10"
    content = torch.load(memory, weights_only=False)
    del content["memory_item"]
    torch.save(content, memory)
    with pytest.raises(ValueError, match="no 'memory_item'"):
        released.load_authors_run(str(tmp_path / "other"), 10)


def test_authors_backbone_from_the_saved_image_tower():
    def tower(width, patch, grid):
        return {"image_encoder.conv1.weight": torch.zeros(width, 3, patch, patch),
                "image_encoder.positional_embedding": torch.zeros(grid * grid + 1, width)}
    assert released.authors_clip_name(tower(768, 16, 14)) == "ViT-B/16"
    assert released.authors_clip_name(tower(768, 32, 7)) == "ViT-B/32"
    assert released.authors_clip_name(tower(1024, 14, 24)) == "ViT-L/14@336px"
    assert released.authors_clip_name({}) is None


def test_torchrun_sharded_eval_counts_every_image_once(run, tmp_path):
    root, weights, out = run
    # 9 test images over 2 ranks: shards of 5 and 4
    torchrun_two_ranks("eval.py", ["--checkpoint", os.path.join(out, "best.pt"), "--workers", "0", "--device", "cpu",
                                   "--batch-size", "2", "--output-dir", str(tmp_path)])
    sharded, trained = read_results(tmp_path), read_results(out)
    assert sharded["num_images"] == 9
    assert sharded["accuracy"] == trained["accuracy"] and sharded["per_class_accuracy"] == trained["per_class_accuracy"]


def test_make_base2new_flow_and_skip(tmp_path):
    root, weights = synthetic(str(tmp_path))
    out = tmp_path / "output"
    cmd = ["make", "--no-print-directory", "-C", REPO, "base2new", "DATASET=caltech101", "SEED=2",
           f"DATA={root}", f"CLIP={weights}", f"OUTPUT={out}", f"PYTHON={sys.executable}",
           "TRAIN_ARGS=--epochs 2 --batch-size 4 --workers 0 --device cpu", "EVAL_ARGS=--workers 0 --device cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = out / "coop" / "base2new" / "caltech101" / "seed2"
    base, new = read_results(run_dir / "base"), read_results(run_dir / "new")
    assert (base["subsample"], new["subsample"]) == ("base", "new")
    assert base["args"]["seed"] == 2 and base["num_classes"] == new["num_classes"] == 3
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "1 job(s), 1 finished already, 0 to run" in again.stdout, again.stdout
    assert read_results(run_dir / "new") == new  # not evaluated again
    summary = report.report_folder(str(out / "coop" / "base2new"))
    row = summary["datasets"]["caltech101"]
    assert row["base"] == base["accuracy"] and row["new"] == new["accuracy"] and row["seeds"] == [2]


def test_make_xd_commands():
    """Dry run: the table runner's xd protocol for the method (its steps: tests/test_tables.py)."""
    proc = subprocess.run(["make", "--no-print-directory", "-n", "-C", REPO, "xd", "SEED=3", "GPUS=2"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "tables.py run xd --method coop --root data --clip ViT-B/16 --runs output/coop" in text
    targets = "imagenetv2 imagenet_sketch imagenet_a imagenet_r caltech101 oxford_pets stanford_cars " \
              "oxford_flowers food101 fgvc_aircraft sun397 dtd eurosat ucf101"
    assert f"--datasets {targets} --seeds 3" in text
    assert '--launcher ".venv/bin/python -m torch.distributed.run --standalone --nproc_per_node=2"' in text
    assert train.METHODS["coop"].recipe.xd == {"selection": "last"}


def test_report_arithmetic(tmp_path, capsys):
    for seed, (b, n) in zip((1, 2, 3), ((80, 60), (82, 62), (84, 64))):
        write_result(tmp_path / "dtd" / f"seed{seed}" / "base", b)
        write_result(tmp_path / "dtd" / f"seed{seed}" / "new", n)
    write_result(tmp_path / "eurosat" / "seed1" / "base", 90)
    write_result(tmp_path / "eurosat" / "seed1" / "new", 70)
    write_result(tmp_path / "ucf101" / "seed1" / "base", 99)  # unfinished: no new result, left out
    summary = report.report_folder(str(tmp_path))
    dtd = summary["datasets"]["dtd"]
    assert (dtd["base"], dtd["new"]) == (82, 62)
    assert dtd["base_std"] == pytest.approx((8 / 3) ** 0.5)  # population std of 80, 82, 84
    assert dtd["hm"] == pytest.approx(2 * 82 * 62 / 144)
    assert summary["datasets"]["eurosat"]["hm"] == pytest.approx(78.75)
    assert "ucf101" not in summary["datasets"]
    avg = summary["average"]
    assert (avg["base"], avg["new"]) == (86, 66) and avg["hm"] == pytest.approx(2 * 86 * 66 / 152)
    text = capsys.readouterr().out
    assert "Average (2/11)" in text and "74.68" in text and "DTD" in text and "EuroSAT" in text
    assert "82.69" in text and "76.94" in text  # published averages
    assert json.load(open(tmp_path / "report.json"))["average"]["base"] == 86
    # published rows are self-consistent: HM = 2bn/(b+n)
    for b, n, h in [row for published in results.PUBLISHED.values() for row in published["base2new"].values()]:
        assert results.harmonic_mean(b, n) == pytest.approx(h, abs=0.006)
    assert_columns_line_up(text.splitlines(), ["Base", "New", "HM"])


def assert_columns_line_up(lines, headings):
    """Every number's last digit ends where its column heading ends (a "±std" follows it)."""
    start = next(i for i, line in enumerate(lines) if line.startswith("Dataset"))
    header, rows = lines[start], [line for line in lines[start + 1:] if not line.startswith("Published")]
    assert len(rows) >= 2
    for heading in headings:
        end = header.index(heading) + len(heading)
        for row in rows:
            assert row[end - 3] == "." and row[end - 1].isdigit() and row[end:end + 1] in ("", " ", "±"), \
                (heading, header, row)


def test_report_xd(tmp_path, capsys):
    write_result(tmp_path / "imagenet_a" / "seed1", 50)
    write_result(tmp_path / "imagenet_a" / "seed2", 52)
    write_result(tmp_path / "dtd" / "seed10", 100)
    summary = report.report_folder(str(tmp_path))
    assert summary["imagenet_a"]["accuracy"] == 51 and summary["imagenet_a"]["std"] == 1
    text = capsys.readouterr().out
    assert "imagenet_a" in text and "100.00±0.00" in text
    assert_columns_line_up(text.splitlines(), ["Accuracy"])


@pytest.mark.parametrize("argv, message", [
    (["--checkpoint", "/no/such.pt"], "--checkpoint '/no/such.pt' does not exist"),
    (["--zeroshot", "--checkpoint", "x.pt"], "exactly one of --checkpoint PATH and --zeroshot"),
    ([], "exactly one of --checkpoint PATH and --zeroshot"),
    (["--zeroshot", "--dataset", "dtd", "--split", "train"], "invalid choice: 'train'"),
])
def test_bad_flags_are_clear_errors(argv, message, capsys):
    assert_usage_error(evaluate_cli.main, argv, message, capsys)


def test_zeroshot_and_missing_data_errors(run, tmp_path, capsys):
    root, weights, _ = run
    assert_usage_error(tables.main, ["report", str(tmp_path / "nothing")], "report", capsys)
    assert_usage_error(evaluate_cli.main, ["--zeroshot", "--dataset", "dtd", "--root", str(tmp_path / "nothing")],
                       "--root", capsys)
    stderr = assert_usage_error(evaluate_cli.main, ["--zeroshot", "--root", root], "--dataset is required", capsys)
    assert stderr == "error: --dataset is required: zero-shot CLIP has no run to take it from\n"  # not "None: ..."
    stderr = assert_usage_error(evaluate_cli.main, ["--zeroshot", "--dataset", "dtd"], "--root is required", capsys)
    assert stderr == "error: --root is required: zero-shot CLIP has no run to take it from\n"
    zs = evaluate_cli.main(["--zeroshot", "--clip", weights, "--dataset", "caltech101", "--root", root,
                            "--workers", "0", "--device", "cpu"])
    assert zs["num_classes"] == 6 and zs["num_images"] == 18 and zs["checkpoint"] == "zero-shot CLIP"


# ----------------------------------------------------------------------------- reliability

def test_eval_never_replaces_results_of_another_evaluation(run, tmp_path, capsys):
    root, weights, out = run
    before = read_results(out)  # train.py's base-class test
    assert_usage_error(evaluate_cli.main, ["--checkpoint", os.path.join(out, "best.pt"), "--workers", "0",
                                           "--subsample", "new", "--output-dir", out],
                       "holds the results of another evaluation ({'subsample': 'base here, new now'}", capsys)
    assert read_results(out) == before
    # the same evaluation again may replace its own file (a leftover temporary file is cleaned)
    folder = tmp_path / "new"
    argv = ["--checkpoint", os.path.join(out, "best.pt"), "--workers", "0", "--subsample", "new",
            "--output-dir", str(folder)]
    evaluate_cli.main(argv)
    (folder / "results.json.tmp").write_text("{")
    evaluate_cli.main(argv)
    assert sorted(os.listdir(folder)) == ["results.json"]


def test_a_full_disk_loses_no_evaluation(run, tmp_path, monkeypatch, capsys):
    """The accuracy line and the results come out on stdout before results.json fails to be written;
    the one-line error advises no --resume (eval.py has none)."""
    root, weights, out = run
    real = outputs.replace_atomically

    def onto_a_full_disk(path, write, shared=False):
        os.symlink("/dev/full", path + ".tmp")  # every write there fails with ENOSPC
        return real(path, write, shared)

    monkeypatch.setattr(outputs, "replace_atomically", onto_a_full_disk)
    with pytest.raises(SystemExit) as err:
        evaluate_cli.main(["--checkpoint", os.path.join(out, "best.pt"), "--workers", "0", "--subsample", "new",
                           "--output-dir", str(tmp_path)])
    captured = capsys.readouterr()
    assert err.value.code == 2 and captured.err.count("\n") == 1 and "Traceback" not in captured.err
    assert "results.json: No space left on device; nothing was written" in captured.err
    assert "the results are on stdout above" in captured.err and "--resume" not in captured.err
    assert captured.out.startswith("caltech101 new test: accuracy ")
    printed = json.loads(captured.out[captured.out.index("{"):])
    assert printed["subsample"] == "new" and printed["num_images"] == 9 and len(printed["per_class_accuracy"]) == 3
    assert os.listdir(tmp_path) == []


def test_subsample_new_of_an_all_classes_checkpoint_is_refused(run, tmp_path, capsys):
    root, weights, out = run
    ckpt = torch.load(os.path.join(out, "best.pt"), weights_only=True)
    ckpt["args"]["subsample"] = "all"
    torch.save(ckpt, tmp_path / "all.pt")
    assert_usage_error(evaluate_cli.main, ["--checkpoint", str(tmp_path / "all.pt"), "--subsample", "new",
                                           "--workers", "0"], "trained on all classes of caltech101", capsys)


def test_files_that_are_not_our_checkpoints_are_named(run, tmp_path, capsys):
    root, weights, out = run
    with open(os.path.join(out, "best.pt"), "rb") as f:
        whole = f.read()
    state = torch.load(os.path.join(out, "best.pt"), weights_only=True)["model"]
    cases = {"empty.pt": b"", "half.pt": whole[:len(whole) // 2]}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
    torch.save(state, tmp_path / "bare.pt")
    write_authors_folder(tmp_path / "theirs", state, weights, epoch=2)
    expected = {"empty.pt": "not a complete checkpoint (0 bytes", "half.pt": "not a complete checkpoint",
                "bare.pt": "not a checkpoint of train.py (no 'model', 'args' and 'epoch' entries; a bare state dict?)",
                os.path.join("theirs", "prompt_learner", "model.pth.tar-2"): "holds pickled objects"}
    for name, message in expected.items():
        assert_usage_error(evaluate_cli.main, ["--checkpoint", str(tmp_path / name), "--workers", "0"], message,
                           capsys)
    assert_usage_error(evaluate_cli.main, ["--checkpoint", out, "--workers", "0"],
                       f"is a train.py output folder: pass the file, {os.path.join(out, 'best.pt')}", capsys)


def test_authors_memory_item_must_be_a_tensor(run, tmp_path, capsys):
    root, weights, out = run
    state = torch.load(os.path.join(out, "last.pt"), weights_only=True)["model"]
    write_authors_folder(tmp_path / "theirs", state, weights, epoch=2)
    memory = tmp_path / "theirs" / "Memory" / "model.pth.tar-2"
    content = torch.load(memory, weights_only=False)
    content["memory_item"] = [[0.0] * 4]
    torch.save(content, memory)
    assert_usage_error(evaluate_cli.main, ["--checkpoint", str(tmp_path / "theirs"), "--epoch", "2", "--dataset",
                                           "caltech101", "--root", root, "--clip", weights, "--workers", "0"],
                       "memory_item is a list, expected a tensor", capsys)


def test_authors_folder_with_other_clip_weights_is_refused(run, tmp_path, capsys):
    root, weights, out = run
    state = torch.load(os.path.join(out, "last.pt"), weights_only=True)["model"]
    write_authors_folder(tmp_path / "theirs", state, weights, epoch=2)
    other = tmp_path / "other-clip.pt"
    torch.save(clip_model.random_state_dict(clip_model.CONFIGS["tiny"], seed=1), other)
    common = ["--checkpoint", str(tmp_path / "theirs"), "--epoch", "2", "--dataset", "caltech101", "--root", root,
              "--subsample", "base", "--workers", "0"]
    assert_usage_error(evaluate_cli.main, [*common, "--clip", str(other)],
                       "its weights differ from the CLIP stored in", capsys)
    assert evaluate_cli.main([*common, "--clip", weights])["num_classes"] == 3  # the right CLIP passes


def test_a_class_name_over_77_tokens_is_refused_before_clip_loads(run, tmp_path, monkeypatch, capsys):
    """A new class whose prompt is over CLIP's context: training refuses it at start; eval.py --zeroshot
    and eval.py on the new classes ended in tokenize's traceback."""
    root, weights, out = run
    long_name = " ".join(["very"] * 80) + " long class"

    def rename(split):
        return {k: [[p, y, long_name if y == 5 else c] for p, y, c in v] for k, v in split.items()}

    root = copy_dataset(root, tmp_path, rename)
    monkeypatch.setattr(clip_model, "load_clip", lambda *a: pytest.fail("CLIP loaded"))
    assert_usage_error(train.main, train_argv(root, weights, str(tmp_path / "out")),
                       f"--n-ctx 4: the prompt of class '{long_name}' is 89 tokens, over CLIP's 77", capsys)
    assert_usage_error(evaluate_cli.main, ["--zeroshot", "--dataset", "caltech101", "--root", root, "--subsample",
                                           "new", "--workers", "0"],
                       f"--zeroshot: 'a photo of a {{}}.': the prompt of class '{long_name}' is 89 tokens, over CLIP's "
                       f"77 (--dataset caltech101)", capsys)
    assert_usage_error(evaluate_cli.main, ["--checkpoint", os.path.join(out, "best.pt"), "--root", root, "--subsample",
                                           "new", "--workers", "0"],
                       f"--n-ctx 4: the prompt of class '{long_name}' is 89 tokens, over CLIP's 77", capsys)


def test_authors_file_in_the_legacy_tar_format_with_a_crafted_entry_is_one_line(run, tmp_path, capsys):
    """torch's pre-1.6 tar format: a 'storages' entry that is not (key, location, type) raised a TypeError."""
    import io
    import pickle
    import tarfile
    root, weights, out = run
    state = torch.load(os.path.join(out, "last.pt"), weights_only=True)["model"]
    write_authors_folder(tmp_path / "theirs", state, weights, epoch=2)
    crafted = tmp_path / "theirs" / "prompt_learner" / "model.pth.tar-2"
    with tarfile.open(crafted, "w:", format=tarfile.PAX_FORMAT) as tar:
        for name, payload in (("sys_info", pickle.dumps(dict(protocol_version=1001, little_endian=True,
                                                             type_sizes=dict(short=2, int=4, long=8)))),
                              ("storages", pickle.dumps(1) + pickle.dumps(None))):
            entry = tarfile.TarInfo(name)
            entry.size = len(payload)
            tar.addfile(entry, io.BytesIO(payload))
    assert_usage_error(evaluate_cli.main, ["--checkpoint", str(tmp_path / "theirs"), "--epoch", "2", "--dataset",
                                           "caltech101", "--root", root, "--clip", weights, "--workers", "0"],
                       f"{crafted}: unreadable (cannot unpack non-iterable NoneType object)", capsys)


def test_nonfinite_checkpoint_or_authors_folder_is_refused_at_load(run, tmp_path, capsys):
    """A NaN in a checkpoint's model evaluated at chance (every image class 0) with exit status 0."""
    root, weights, out = run
    ckpt = torch.load(os.path.join(out, "best.pt"), weights_only=True)
    ckpt["model"]["prompt_learner.ctx"][1, 2] = float("nan")
    torch.save(ckpt, tmp_path / "nan.pt")
    assert_usage_error(evaluate_cli.main, ["--checkpoint", str(tmp_path / "nan.pt"), "--workers", "0", "--subsample",
                                           "new"], f"{tmp_path}/nan.pt: tensor prompt_learner.ctx holds NaN or inf",
                       capsys)
    state = torch.load(os.path.join(out, "last.pt"), weights_only=True)["model"]
    state["refiner.extractor.weight"][0, 0] = 1e5  # beyond fp16: inf in the released dtype
    write_authors_folder(tmp_path / "theirs", state, weights, epoch=2)
    memory = os.path.join(tmp_path, "theirs", "Memory", "model.pth.tar-2")
    assert_usage_error(evaluate_cli.main, ["--checkpoint", str(tmp_path / "theirs"), "--epoch", "2", "--dataset",
                                           "caltech101", "--root", root, "--clip", weights, "--workers", "0"],
                       f"{memory}: tensor extractor.weight holds NaN or inf", capsys)


@pytest.mark.parametrize("argv, message", [
    (["--zeroshot", "--dataset", "dtd", "--seed", "-1"], "--seed: must be in [0, 4294967295], got -1"),
    (["--zeroshot", "--dataset", "dtd", "--device", "foo"], "argument --device: 'foo': expected cpu, cuda or cuda:N"),
    (["--zeroshot", "--dataset", "dtd", "--batch-size", "0"], "--batch-size: must be positive"),
    (["--zeroshot", "--dataset", "dtd", "--dist-timeout", "-5"], "--dist-timeout: must be in (0, 604800]"),
])
def test_nonsense_eval_flags_are_refused(argv, message, capsys):
    assert_usage_error(evaluate_cli.main, argv, message, capsys)


def test_epoch_with_a_train_checkpoint_and_output_dir_file_fail_at_start(run, tmp_path, capsys):
    root, weights, out = run
    best = os.path.join(out, "best.pt")
    assert_usage_error(evaluate_cli.main, ["--checkpoint", best, "--epoch", "2"],
                       "--epoch N picks model.pth.tar-N in an authors' run folder", capsys)
    (tmp_path / "file").write_text("")
    assert_usage_error(evaluate_cli.main, ["--checkpoint", best, "--output-dir", str(tmp_path / "file")],
                       "is a file, not a directory", capsys)


def test_report_refuses_wrong_malformed_and_stray_results(tmp_path, capsys):
    for seed in (1, 2):
        write_result(tmp_path / "dtd" / f"seed{seed}" / "base", 80)
        write_result(tmp_path / "dtd" / f"seed{seed}" / "new", 60)
    report.report_folder(str(tmp_path))  # a sound folder reports
    shutil.copytree(tmp_path / "dtd" / "seed1", tmp_path / "dtd" / "seed1_old")
    with open(tmp_path / "dtd" / "seed2" / "new" / "results.json", "w") as f:
        f.write('{"accuracy": 6')  # cut short
    write_result(tmp_path / "eurosat" / "seed1" / "base", None)
    write_result(tmp_path / "eurosat" / "seed1" / "new", 66.67, subsample="base")  # eval.py into the base folder
    with pytest.raises(SystemExit) as err:
        tables.main(["report", str(tmp_path)])
    stderr = capsys.readouterr().err
    assert err.value.code == 2 and "Traceback" not in stderr
    for message in ("dtd/seed1_old: unexpected (runs are folders seed<N>)", "dtd/seed2/new/results.json: unreadable",
                    "eurosat/seed1/base/results.json: accuracy is None, expected a number",
                    "eurosat/seed1/new/results.json: holds {'subsample': 'base'}", "4 problem(s) above"):
        assert message in stderr, stderr


def test_make_report_fails_without_output_or_on_a_bad_result(tmp_path):
    def make_report(output):
        return subprocess.run(["make", "--no-print-directory", "-C", REPO, "report", f"OUTPUT={output}"],
                              capture_output=True, text=True, timeout=120)
    proc = make_report(tmp_path / "none")
    assert proc.returncode != 0 and "nothing to report" in proc.stderr, proc.stdout + proc.stderr
    write_result(tmp_path / "output" / "coop" / "base2new" / "dtd" / "seed1" / "base", 80)
    write_result(tmp_path / "output" / "coop" / "base2new" / "dtd" / "seed1" / "new", None)
    proc = make_report(tmp_path / "output")
    assert proc.returncode != 0 and "accuracy is None" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("argv, message", [
    (["--zeroshot", "--method", "coop"], "--method does not apply to --zeroshot"),
    (["--zeroshot", "--teacher", "t.pth.tar"], "--teacher does not apply to --zeroshot"),
    (["--zeroshot", "--clip", "ViT-B/16", "--allow-other-clip"], "--allow-other-clip: there is no run to compare"),
    (["--checkpoint", "CKPT", "--allow-other-teacher"], "--allow-other-teacher: there is no --teacher to compare"),
    (["--checkpoint", "CKPT", "--no-refiner"], "--no-refiner is a training flag (a recipe's)"),
    (["--checkpoint", "CKPT", "--lr=0.1"], "--lr is a training flag (a recipe's)"),
    (["--checkpoint", "CKPT", "--datasets", "oxford_pets"], "unrecognized arguments: --datasets oxford_pets"),
    (["--checkpoint", "CKPT", "--seeds", "2"], "unrecognized arguments: --seeds 2"),
    (["--checkpoint", "CKPT", "--sub", "new"], "unrecognized arguments: --sub new"),  # not --subsample
])
def test_flags_an_evaluation_does_not_use_are_refused(argv, message, tmp_path, capsys):
    """A flag of training, of the table or of the other mode was ignored (e.g. --no-refiner evaluated with
    the refiner and recorded refiner: true)."""
    (tmp_path / "c.pt").write_bytes(b"")
    argv = [str(tmp_path / "c.pt") if a == "CKPT" else a for a in argv]
    assert_usage_error(evaluate_cli.main, [*argv, "--dataset", "caltech101", "--root", str(tmp_path)], message, capsys)


@pytest.mark.parametrize("method", ["ivlp", "promptkd", 7])
def test_a_checkpoint_naming_another_method_is_said_not_to_fit_it(method, run, tmp_path, capsys):
    """A checkpoint whose args name another method than the one that wrote it: its recorded recipe
    does not build on the run's CLIP (was "--depth must be at most 2"), or the name is no method."""
    root, weights, out = run
    ckpt = torch.load(os.path.join(out, "best.pt"), weights_only=True)
    torch.save(dict(ckpt, args=dict(ckpt["args"], method=method)), tmp_path / "other.pt")
    teacher_clip, teachers = teacher_setup(os.path.dirname(out))
    inputs = ["--teacher", teachers, "--teacher-clip", teacher_clip] if method == "promptkd" else []
    message = f"its tensors do not fit a --method {method} model" if method != 7 else "its 'args' name no --method"
    assert_usage_error(evaluate_cli.main, ["--checkpoint", str(tmp_path / "other.pt"), *inputs, "--workers", "0",
                                           "--device", "cpu"], f"other.pt: {message}", capsys)


def test_evaluating_with_another_clip_than_the_runs_is_named(run, tmp_path, capsys):
    """--clip of other weights (the same shapes: it evaluated without a word) is refused by the SHA-256 the
    run recorded, unless --allow-other-clip; the run's CLIP at another path is the same CLIP."""
    root, weights, out = run
    best, common = os.path.join(out, "best.pt"), ["--workers", "0", "--device", "cpu"]
    other = tmp_path / "other-clip.pt"
    torch.save(clip_model.random_state_dict(clip_model.CONFIGS["tiny"], seed=1), other)
    assert_usage_error(evaluate_cli.main, ["--checkpoint", best, "--clip", str(other), *common],
                       f"--clip {other}: not the CLIP {best} was trained with ({weights}, SHA-256", capsys)
    evaluate_cli.main(["--checkpoint", best, "--clip", str(other), "--allow-other-clip", *common])
    shutil.copy(weights, tmp_path / "same-clip.pt")
    same = evaluate_cli.main(["--checkpoint", best, "--clip", str(tmp_path / "same-clip.pt"), *common])
    assert same["accuracy"] == read_results(out)["accuracy"]
