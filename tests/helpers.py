"""What several test files share: the synthetic data and tiny CLIP, one CoOp and one PromptKD
training run (conftest.py's session fixtures), the authors' file writers, float64 references of the
towers and of TextRefiner's equations, and assertion helpers."""
import collections
import contextlib
import json
import math
import os
import subprocess
import sys
import warnings
from collections import OrderedDict
from unittest import mock

import pytest
import torch
import torch.nn as nn

import bench
import clip_model
import data
import outputs
import released
import textrefiner
import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 6 classes -> 3 base classes; per class 6 train, 3 val, 3 test images of 32 px: 4 steps/epoch at batch 4.
EPOCHS, LR = 3, 0.01
PK_DEPTH = 2  # the PromptKD runs' student and teacher prompt depth
TEACHER_FILE = os.path.join("Caltech101", "VLPromptLearner", "model-best.pth.tar")
# The released trainer's CustomCLIP keeps the frozen CLIP's text tower under these names.
AUTHORS_TEXT_TOWER = ("transformer.", "positional_embedding", "ln_final.", "text_projection", "token_embedding.")


def save_torchscript_archive(state_dict, path):
    """An OpenAI-like TorchScript archive: fp16 weights under OpenAI's names plus the
    input_resolution / context_length / vocab_size entries of the released JIT files."""
    config = clip_model.config_from_state_dict(state_dict)
    root = nn.Module()
    for key, value in state_dict.items():
        *parents, leaf = key.split(".")
        module = root
        for name in parents:
            if name not in module._modules:
                module.add_module(name, nn.Module())
            module = module._modules[name]
        value = value.detach().half() if value.is_floating_point() else value.detach()
        module.register_parameter(leaf, nn.Parameter(value, requires_grad=False))
    for key, value in dict(input_resolution=config.image_resolution, context_length=config.context_length,
                           vocab_size=config.vocab_size).items():
        root.register_buffer(key, torch.tensor(value))
    with warnings.catch_warnings():  # OpenAI ships TorchScript, so we write it despite the deprecation
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(root), path)


def synthetic(base):
    """Data root and tiny CLIP weights under `base` (written once per session)."""
    root, weights = os.path.join(base, "data"), os.path.join(base, "tiny-clip.pt")
    if not os.path.exists(weights):
        data.write_synthetic_dataset(root, "caltech101", num_classes=6, images_per_class=12, image_size=32)
        torch.save(clip_model.random_state_dict(clip_model.CONFIGS["tiny"]), weights + ".tmp")
        os.replace(weights + ".tmp", weights)
    return root, weights


def train_argv(root, weights, out, *extra):
    # --device cpu: on a GPU host the default is CUDA, and under torchrun rank 1 would ask for
    # cuda:1 on a 1-GPU machine; the 1- and 2-process runs must also run the same way
    return ["--dataset", "caltech101", "--root", root, "--clip", weights, "--subsample", "base", "--device", "cpu",
            "--epochs", str(EPOCHS), "--batch-size", "4", "--lr", str(LR), "--workers", "0",
            "--log-interval", "2", "--output-dir", out, *extra]


def trained_run(tmp_path_factory):
    """One uninterrupted training run shared by the tests of both files."""
    base = str(tmp_path_factory.getbasetemp())
    root, weights = synthetic(base)
    out = os.path.join(base, "run")
    if not os.path.exists(os.path.join(out, "results.json")):
        train.main(train_argv(root, weights, out))
    return root, weights, out


def copy_dataset(root, tmp_path, change):
    """A copy of the synthetic caltech101 split file (images shared) edited by change(split)."""
    folder = tmp_path / "data" / "caltech-101"
    folder.mkdir(parents=True)
    os.symlink(os.path.join(root, "caltech-101", "101_ObjectCategories"), folder / "101_ObjectCategories")
    with open(os.path.join(root, "caltech-101", "split_zhou_Caltech101.json")) as f:
        split = json.load(f)
    with open(folder / "split_zhou_Caltech101.json", "w") as f:
        json.dump(change(split), f)
    return str(tmp_path / "data")


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def assert_same_tensors(a, b, exact=True):
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def assert_close_to_scale(a, b, rel):
    """Every tensor of state dict a within rel of b's largest magnitude: float32 summation-order drift
    scales with a tensor's size, not with each element's (BatchNorm statistics near 0)."""
    assert a.keys() == b.keys()
    for k in a:
        error, scale = (a[k].double() - b[k].double()).abs().max(), b[k].double().abs().max()
        assert error <= rel * scale, (k, error.item(), scale.item())


def torchrun_two_ranks(script, argv):
    """`script argv` under torchrun as 2 processes (gloo on the CPU); must exit cleanly."""
    # without it a GPU host's default device is CUDA, and rank 1 asks a 1-GPU machine for cuda:1
    assert argv[argv.index("--device") + 1] == "cpu", "torchrun_two_ranks: argv needs --device cpu"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(REPO, script), *argv]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-20000:]


def assert_usage_error(main, argv, message, capsys):
    """main(argv) exits as argparse does on a bad flag: status 2, message on stderr, no
    traceback; a user error that is not a flag (bad data, files) is one line."""
    with pytest.raises(SystemExit) as err:
        main(argv)
    stderr = capsys.readouterr().err
    assert err.value.code == 2 and message in stderr, stderr
    assert "Traceback" not in stderr and (stderr.startswith("usage:") or stderr.count("\n") == 1), stderr
    return stderr


def write_lock(folder, **holder):
    with open(os.path.join(folder, ".lock"), "w") as f:
        json.dump(dict(dict(pidns=outputs.lock_holder()["pidns"], since="then"), **holder), f)


def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", ""])
    proc.wait()
    return proc.pid


class Interrupted(Exception):
    """A training run stopped by interrupt_at_epoch, as if killed."""


def interrupt_at_epoch(monkeypatch, epoch):
    """Training raises Interrupted when its train loader is set to `epoch`: the checkpoints and
    log lines of the epochs before are written by then (monkeypatch.undo() ends it)."""
    real_loader = data.build_train_loader

    def loader_killed_at_epoch(*args, **kwargs):
        loader = real_loader(*args, **kwargs)
        set_epoch = loader.set_epoch

        def checked(e):
            if e == epoch:
                raise Interrupted
            set_epoch(e)
        loader.set_epoch = checked
        return loader

    monkeypatch.setattr(data, "build_train_loader", loader_killed_at_epoch)


def counting(calls, name, fn):
    """fn, counting its calls in calls[name]."""
    def counted(*args, **kwargs):
        calls[name] += 1
        return fn(*args, **kwargs)
    return counted


_image_opens = []  # [the file descriptor image opens are written to] while image_opens() records
_audit_hooked = []  # [True] once the hook is added: an audit hook stays for the process's life


def _record_image_open(event, args):
    if _image_opens and (path := bench.opened_image(event, args)):
        os.write(_image_opens[-1], f"{path}\n".encode())


@contextlib.contextmanager
def image_opens(path):
    """The block with every image file that this process and the loader workers it forks open
    (the interpreter's "open" audit events, not the code's own counting) appended to path; yields
    a function -> Counter of the opens so far by absolute path."""
    if not _audit_hooked:
        sys.addaudithook(_record_image_open)
        _audit_hooked.append(True)
    _image_opens.append(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT))
    try:
        yield lambda: opened_images(path)
    finally:
        os.close(_image_opens.pop())


def opened_images(path):
    """Counter of the image paths in a file image_opens (or bench.TableCounts) wrote."""
    with open(path) as f:
        return collections.Counter(line.rstrip("\n").split("\t")[-1] for line in f
                                   if not line.startswith("totals\t"))


def read_results(folder):
    with open(os.path.join(folder, "results.json")) as f:
        return json.load(f)


class RunsCode:
    """A pickled object whose unpickling would create a directory: loading must not run it."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.makedirs, (self.path,)


def authors_clip_state(weights):
    """OpenAI-named CLIP weights under the released CustomCLIP's names."""
    out = {}
    for k, v in torch.load(weights, weights_only=True).items():
        if k.startswith("visual."):
            out["image_encoder." + k[len("visual."):]] = v
        elif k.startswith(AUTHORS_TEXT_TOWER):
            out["text_encoder." + k] = v
        else:
            out[k] = v  # logit_scale
    return out


def write_authors_folder(folder, state, weights, epoch, dtype=torch.float16, best_epoch=None, extra=None):
    """An output folder of the released code as its Dassl trainer writes it: prompt_learner/ and
    Memory/, each with model.pth.tar-<epoch> (and model-best.pth.tar when best_epoch is given)
    and Dassl's 'checkpoint' pointer; every file {'state_dict', 'epoch', 'optimizer', 'scheduler',
    'val_result'}. prompt_learner's state_dict is the whole CustomCLIP (ctx, the fixed prompt
    buffers, the frozen CLIP as image_encoder.* / text_encoder.* / logit_scale, the alignment as
    mid_image_trans.conv1.{0,1,3}: 1x1 Conv2d + BatchNorm2d); Memory's is {'extractor.weight'},
    with the cache as the file's 'memory_item'. With the default fp16 precision, ctx, convs,
    extractor and cache are fp16 and BatchNorm fp32; the scheduler entry holds pickled objects
    (Dassl's warm-up scheduler state keeps its CosineAnnealingLR successor and so the optimiser)."""
    n_ctx, width = state["prompt_learner.ctx"].shape
    n_cls = 3
    learner = OrderedDict()
    learner["prompt_learner.ctx"] = state["prompt_learner.ctx"].to(dtype)
    learner["prompt_learner.token_prefix"] = torch.zeros(n_cls, 1, width, dtype=dtype)
    learner["prompt_learner.token_suffix"] = torch.zeros(n_cls, 77 - 1 - n_ctx, width, dtype=dtype)
    learner["prompt_learner.tokenized_prompts"] = torch.zeros(n_cls, 77, dtype=torch.long)
    learner.update(authors_clip_state(weights))
    for theirs, ours in released.AUTHORS_ALIGN.items():
        t = state["refiner.align." + ours]
        if theirs in released.AUTHORS_CONV_WEIGHTS:
            t = t[:, :, None, None]  # Linear (out, in) -> Conv2d 1x1 (out, in, 1, 1)
        if theirs.startswith(("0.", "3.")):
            t = t.to(dtype)  # CLIP's convert_weights makes the convolutions fp16, not BatchNorm
        learner["mid_image_trans.conv1." + theirs] = t
    memory = OrderedDict([("extractor.weight", state["refiner.extractor.weight"].to(dtype))])
    params = [torch.nn.Parameter(t.clone()) for t in (learner["prompt_learner.ctx"], memory["extractor.weight"])]
    optim = torch.optim.SGD(params, lr=0.002, momentum=0.9, weight_decay=5e-4)
    for p in params:
        p.grad = torch.ones_like(p)
    optim.step()
    successor = torch.optim.lr_scheduler.CosineAnnealingLR(optim, 10.0)
    sched = {"successor": successor, "warmup_epoch": 1, "cons_lr": 1e-5, "base_lrs": [0.002],
             "last_epoch": 1, "_step_count": epoch + 1}
    cache = state["refiner.cache"].to(dtype).requires_grad_() * 1  # the write leaves it in a graph
    write_dassl_run(folder, {"prompt_learner": learner, "Memory": memory}, cache, optim, sched, epoch,
                    best_epoch, extra)


def write_dassl_run(folder, parts, memory_item, optim, sched, epoch, best_epoch=None, extra=None):
    """The released trainer's save_model: per registered model (parts: {folder name: state
    dict}) model.pth.tar-{epoch}, model-best.pth.tar when best_epoch is given, and Dassl's
    'checkpoint' pointer; Memory's files also carry the cache as 'memory_item'."""
    saves = [(f"model.pth.tar-{epoch}", epoch, None)]
    if best_epoch is not None:
        saves.append(("model-best.pth.tar", best_epoch, 61.25))
    for part, state_dict in parts.items():
        os.makedirs(os.path.join(folder, part))
        for name, at, val_result in saves:
            content = {"state_dict": state_dict, "epoch": at, "optimizer": optim.state_dict(), "scheduler": sched,
                       "val_result": val_result}
            if part == "Memory":
                content = {"memory_item": memory_item, **content}
            torch.save(dict(content, **(extra or {})), os.path.join(folder, part, name))
        with open(os.path.join(folder, part, "checkpoint"), "w") as f:
            f.write(f"model.pth.tar-{epoch}\n")


def rounded(state, dtype):
    """What storing our fp32 trainables in the released dtypes does to them."""
    out = {}
    for k, v in state.items():
        keep = k.endswith("num_batches_tracked") or k.startswith("refiner.align.bn.")
        out[k] = v if keep else v.to(dtype).float()
    return out


def write_result(folder, accuracy, **fields):
    """A results.json as train.py/eval.py write it for its place: <dataset>/seed<S>/{base,new}
    (base2new), <dataset>/seed<S> (xd, all classes) or <dataset>/shots<K>/seed<S> (fewshot, all
    classes), with the title train.py records for a built-in method; fields override."""
    os.makedirs(folder)
    parts = os.path.normpath(folder).split(os.sep)
    what = dict(dataset=parts[-3], subsample=parts[-1], args=dict(seed=int(parts[-2][len("seed"):]))) \
        if parts[-1] in ("base", "new") else dict(dataset=parts[-2], subsample="all",
                                                    args=dict(seed=int(parts[-1][len("seed"):])))
    if parts[-2].startswith("shots"):
        shots = int(parts[-2][len("shots"):])
        what.update(dataset=parts[-3], shots=shots, args=dict(what["args"], shots=shots))
    method = fields.get("method", "coop")
    if method in textrefiner.METHODS:
        what["title"] = textrefiner.METHODS[method].title
    with open(os.path.join(folder, "results.json"), "w") as f:
        json.dump(dict(accuracy=accuracy, split="test", **dict(what, **fields)), f)


def ref_layer_norm(x, sd, prefix):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5) * sd[prefix + ".weight"] + sd[prefix + ".bias"]


def ref_block(x, sd, prefix, mask):
    """Pre-LN block with explicit softmax attention; returns the new x and the probabilities."""
    B, L, W = x.shape
    H, hd = W // 64, 64
    h = ref_layer_norm(x, sd, prefix + ".ln_1")
    qkv = h @ sd[prefix + ".attn.in_proj_weight"].T + sd[prefix + ".attn.in_proj_bias"]
    q, k, v = (t.reshape(B, L, H, hd) for t in qkv.split(W, dim=-1))
    scores = torch.einsum("blhd,bmhd->bhlm", q, k) / math.sqrt(hd) + mask
    probs = torch.exp(scores - scores.amax(-1, keepdim=True))
    probs = probs / probs.sum(-1, keepdim=True)  # (B, H, L, L)
    attn = torch.einsum("bhlm,bmhd->blhd", probs, v).reshape(B, L, W)
    x = x + attn @ sd[prefix + ".attn.out_proj.weight"].T + sd[prefix + ".attn.out_proj.bias"]
    h = ref_layer_norm(x, sd, prefix + ".ln_2") @ sd[prefix + ".mlp.c_fc.weight"].T + sd[prefix + ".mlp.c_fc.bias"]
    h = h * torch.sigmoid(1.702 * h)
    return x + h @ sd[prefix + ".mlp.c_proj.weight"].T + sd[prefix + ".mlp.c_proj.bias"], probs


def ref_encode_image(sd, imgs, prompts=None):
    """prompts (depth, n, W): appended after the T tokens at the input (no positional
    embedding), prompts[i] overwriting the last n tokens before block i; the outputs are
    the T image tokens and the CLS row at the patch columns of the softmax over all keys."""
    sd = {k: v.double() for k, v in sd.items()}
    W, _, P, _ = sd["visual.conv1.weight"].shape
    B, _, R, _ = imgs.shape
    G = R // P
    T = G * G + 1
    # Patch embedding as a matmul over flattened (channel, row, col) patches, row-major grid.
    patches = imgs.double().reshape(B, 3, G, P, G, P).permute(0, 2, 4, 1, 3, 5).reshape(B, G * G, 3 * P * P)
    x = patches @ sd["visual.conv1.weight"].reshape(W, -1).T
    x = torch.cat([sd["visual.class_embedding"].expand(B, 1, W), x], 1) + sd["visual.positional_embedding"]
    if prompts is not None:
        prompts = prompts.double()
        x = torch.cat([x, prompts[0].expand(B, -1, -1)], 1)
    x = ref_layer_norm(x, sd, "visual.ln_pre")
    layers = len({k for k in sd if k.startswith("visual.transformer.resblocks.") and k.endswith("in_proj_weight")})
    for i in range(layers):
        if prompts is not None and 1 <= i < len(prompts):
            x = x.clone()
            x[:, T:] = prompts[i]
        x, probs = ref_block(x, sd, f"visual.transformer.resblocks.{i}", mask=0.0)
    tokens = ref_layer_norm(x[:, :T], sd, "visual.ln_post") @ sd["visual.proj"]
    return tokens[:, 0], tokens, probs[:, :, 0, 1:T].mean(1)


def ref_encode_text(sd, ids, embeddings=None, deep_prompts=None):
    """The full 77-token computation with an explicit causal mask. embeddings (C, 77, W)
    replace the token embeddings of ids; deep_prompts (K, n, W) overwrite positions 1..n
    before blocks 1..K."""
    sd = {k: v.double() for k, v in sd.items()}
    x = (sd["token_embedding.weight"][ids] if embeddings is None else embeddings.double()) + sd["positional_embedding"]
    L = ids.shape[1]
    mask = torch.full((L, L), float("-inf"), dtype=torch.float64).triu(1)
    layers = len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")})
    for i in range(layers):
        if deep_prompts is not None and 1 <= i <= len(deep_prompts):
            x = x.clone()
            x[:, 1:1 + deep_prompts.shape[1]] = deep_prompts[i - 1].double()
        x, _ = ref_block(x, sd, f"transformer.resblocks.{i}", mask)
    x = ref_layer_norm(x, sd, "ln_final")
    return x[torch.arange(len(ids)), ids.argmax(-1)] @ sd["text_projection"]


def rel_err(actual, expected):
    """max |actual - expected| / max |expected|, in float64."""
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


def ref_projection(x, p, prefix, running=None, eps=1e-5):
    """Linear -> BatchNorm1d -> ReLU -> Linear over rows; batch statistics (biased variance)
    unless running = (mean, var). -> (y, batch mean, batch var)."""
    h = x @ p[prefix + ".fc1.weight"].t() + p[prefix + ".fc1.bias"]
    mean, var = (h.mean(0), ((h - h.mean(0)) ** 2).mean(0)) if running is None else running
    z = torch.relu((h - mean) / torch.sqrt(var + eps) * p[prefix + ".bn.weight"] + p[prefix + ".bn.bias"])
    return z @ p[prefix + ".fc2.weight"].t() + p[prefix + ".fc2.bias"], mean, var


def spec_semantic_tokens(aligned, cls_attn, topk=5):
    """TextRefiner's local rows from the equations: per image the CLS token, the top-k patches by
    CLS attention and the mean over all tokens (B, k+2, D); asserts the top-k is well defined."""
    ranked = cls_attn.argsort(dim=1, descending=True)
    gaps = cls_attn.gather(1, ranked[:, topk - 1:topk]) - cls_attn.gather(1, ranked[:, topk:topk + 1])
    assert gaps.min() > 1e-5 * cls_attn.max(), "top-5 is ill-conditioned for this seed"
    return torch.stack([torch.stack([aligned[i, 0]] + [aligned[i, j + 1] for j in ranked[i, :topk]]
                                    + [aligned[i].mean(0)]) for i in range(aligned.shape[0])])


def spec_cache_update(cache, aligned):
    """TextRefiner's cache update from the equations, slot by slot, on all B*T aligned tokens;
    asserts that no token's assignment is a near tie."""
    x_hat = aligned.detach().reshape(-1, aligned.shape[-1])
    x_hat = x_hat / x_hat.norm(dim=-1, keepdim=True)
    scores = x_hat @ cache.t()  # (N, M)
    top2 = scores.topk(2, dim=1).values
    assert (top2[:, 0] - top2[:, 1]).min() > 1e-5, "cache assignment is ill-conditioned for this seed"
    assign, col_max = scores.argmax(1), scores.max(0).values
    new_cache = cache.clone()
    for m in range(cache.shape[0]):
        rows = (assign == m).nonzero()[:, 0]
        if len(rows):
            weights = torch.exp(scores[rows, m] - col_max[m])
            new_cache[m] = 0.8 * cache[m] + 0.2 * (weights[:, None] * x_hat[rows]).sum(0)
    return new_cache / new_cache.norm(dim=-1, keepdim=True)


def save_half_batch_step(model, rank, out_dir, *batch):
    """One training step of this rank (of 2) on its half of the batch tensors, gradients
    averaged over the ranks as DDP does; loss, gradients and trainable state saved to
    out_dir/rank{rank}.pt for the comparison with one process on the whole batch."""
    import torch.distributed as dist

    # no tensor built from a host value per step: on CUDA that is a blocking copy
    with mock.patch.object(torch, "tensor", side_effect=AssertionError("torch.tensor in a step")):
        out = model(*(t[2 * rank:2 * rank + 2] for t in batch))
        out["loss"].backward()
    grads = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            dist.all_reduce(p.grad)
            grads[name] = p.grad / 2
    torch.save(dict(loss=out["loss"].detach(), grads=grads, state=model.trainable_state_dict()),
               f"{out_dir}/rank{rank}.pt")


def teacher_setup(base):
    """(teacher CLIP weights file, folder of released-layout teachers) under base: the
    caltech101 base-class teacher (3 of the 6 synthetic classes, depth 2) whose CLIP weights are
    not the base file's (PromptSRC's weight averaging), and one trained on 4 classes."""
    root, _ = synthetic(base)
    clip_path, teachers = os.path.join(base, "teacher-clip.pt"), os.path.join(base, "teachers")
    if not os.path.exists(os.path.join(teachers, TEACHER_FILE)):
        weights = clip_model.random_state_dict(clip_model.CONFIGS["tiny-teacher"], seed=1)
        torch.save(weights, clip_path)
        averaged = {k: v + 0.01 if k.startswith("visual.transformer") else v for k, v in weights.items()}
        base_names = data.load_splits("caltech101", root, subsample="base")["classnames"]
        os.makedirs(os.path.dirname(os.path.join(teachers, TEACHER_FILE)))
        released.write_teacher_checkpoint(os.path.join(base, "four-classes.pth.tar"), weights,
                                             base_names + ["class_003"], depth=PK_DEPTH)
        released.write_teacher_checkpoint(os.path.join(teachers, TEACHER_FILE), averaged, base_names, depth=PK_DEPTH)
    return clip_path, teachers


def pk_argv(base, out, *extra):
    root, student = synthetic(base)
    teacher_clip, teachers = teacher_setup(base)
    return ["--method", "promptkd", "--dataset", "caltech101", "--root", root, "--clip", student,
            "--teacher", teachers, "--teacher-clip", teacher_clip, "--subsample", "base", "--device", "cpu",
            "--epochs", str(EPOCHS), "--batch-size", "4", "--depth", str(PK_DEPTH), "--workers", "0",
            "--log-interval", "3", "--output-dir", str(out), *extra]


def table_worker_counting_reads(*args):
    """tables.table_worker in its spawned process, appending each CLIP file it reads to the file
    $CLIP_READS names (a monkeypatch of the test's process does not reach it), and each image file
    it or its loader workers open to $BENCH_COUNTS (bench.TableCounts: the interpreter's audit
    events)."""
    read = clip_model.read_state_dict

    def counted(path):
        with open(os.environ["CLIP_READS"], "a") as f:
            f.write(f"{path}\n")
        return read(path)
    clip_model.read_state_dict = counted
    bench.counted_table_worker(*args)


def trained_run_dir(base):
    """test_train.py's CoOp run (trained here when this file runs alone)."""
    out = os.path.join(base, "run")
    if not os.path.exists(os.path.join(out, "results.json")):
        root, weights = synthetic(base)
        train.main(train_argv(root, weights, out))
    return out
