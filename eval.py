"""Evaluate a checkpoint (any --method; the checkpoint says which), zero-shot CLIP, or an authors'
run folder. The tables of many runs: tables.py.

    python eval.py --checkpoint output/coop/base2new/dtd/seed1/base/best.pt --subsample new \
        --output-dir output/coop/base2new/dtd/seed1/new                 # base2new: the new classes
    python eval.py --checkpoint output/coop/xd/imagenet/seed1/last.pt --dataset imagenet_a \
        --root /data --output-dir output/coop/xd/imagenet_a/seed1       # another dataset
    torchrun --standalone --nproc_per_node=4 eval.py --checkpoint ...  # sharded: every image once
    python eval.py --checkpoint their_run/ --dataset dtd --root /data --subsample new  # authors'
    python eval.py --zeroshot --dataset dtd --root /data --subsample new  # CoOp's hand-made prompts

--dataset, --root, --clip, --shots, --seed, --precision and the method's inputs (PromptKD's
--teacher, --teacher-clip) default to the checkpoint's run; another input file than the run's (by
SHA-256) is refused unless --allow-other-<input>. --subsample defaults to the run's on the same
dataset, else all. results.json holds accuracy, macro_f1, per_class_accuracy (aligned with
classnames), num_images, num_classes, split, method, selection and the arguments as resolved; an
existing results.json of another evaluation in --output-dir is never replaced.
"""
import argparse
import json
import os
from contextlib import nullcontext

import clip_model
import data
import features
import outputs
import flags
import released
import textrefiner
import train
from data import UserError
from textrefiner import METHODS, POSITIVE, RecipeError, ZeroShotCLIP, ZeroShotRecipe


def get_parser():
    p = argparse.ArgumentParser(
        prog="eval.py", allow_abbrev=False,
        description="Evaluate a checkpoint, zero-shot CLIP or an authors' run folder.")
    p.add_argument("--checkpoint", help="train.py's best.pt/last.pt, or an authors' run folder")
    p.add_argument("--epoch", type=flags.ranged(int, POSITIVE),
                   help="authors' folder: load model.pth.tar-EPOCH (default: model-best)")
    p.add_argument("--zeroshot", action="store_true", help="zero-shot CLIP instead of a checkpoint")
    p.add_argument("--method", help="refuse a checkpoint of another method")
    add_input_flags(p)
    p.add_argument("--dataset", help=f"one of {', '.join(data.DATASETS)}")
    p.add_argument("--root", help="data root")
    p.add_argument("--subsample", choices=data.SUBSAMPLES)
    p.add_argument("--split", default="test", choices=("test", "val"))
    p.add_argument("--clip", help="CLIP name or weights file (default: the checkpoint's)")
    p.add_argument("--shots", type=int,
                   help="few-shot split that defines base/new (default: the checkpoint's)")
    p.add_argument("--seed", type=flags.ranged(int, flags.SEEDS))
    p.add_argument("--batch-size", type=flags.ranged(int, POSITIVE), default=100, help="per rank")
    p.add_argument("--output-dir", help="write results.json here")
    flags.add_run_flags(p)
    flags.add_image_flags(p)
    return p


def add_input_flags(p):
    """--allow-other-clip, and --<name> and --allow-other-<name> for every weights file a
    registered method is built from besides CLIP (PromptKD's --teacher, --teacher-clip): default
    the run's."""
    p.add_argument("--allow-other-clip", action="store_true",
                   help="use another --clip than the one the run recorded (SHA-256)")
    for name in flags.input_names():
        flag = name.replace("_", "-")
        p.add_argument(f"--{flag}", help="default: the run's")
        p.add_argument(f"--allow-other-{flag}", action="store_true",
                       help=f"use another --{flag} file than the one the run recorded")


def check_args(p, args):
    """Flag errors argparse cannot see; p.error exits with status 2 and the usage line."""
    if args.zeroshot == bool(args.checkpoint):
        p.error("give exactly one of --checkpoint PATH and --zeroshot")
    if args.checkpoint and not os.path.exists(args.checkpoint):
        p.error(f"--checkpoint {args.checkpoint!r} does not exist")
    if args.epoch is not None and not (args.checkpoint and os.path.isdir(args.checkpoint)):
        p.error("--epoch N picks model.pth.tar-N in an authors' run folder; a train.py checkpoint "
                "is one epoch (best.pt: best val, last.pt: last epoch)")
    if args.clip:
        flags.check_weights_flag(p, args.clip)
    inputs = flags.input_names()
    for name in ("clip", *inputs):
        if getattr(args, "allow_other_" + name) and (args.zeroshot or not getattr(args, name)):
            compared = "no run" if args.zeroshot else f"no {flags.flag(name)}"
            p.error(f"--allow-other-{name.replace('_', '-')}: there is {compared} to compare, "
                    f"nothing to allow")
    for name in ("method", *inputs):
        if args.zeroshot and getattr(args, name):
            p.error(f"{flags.flag(name)} does not apply to --zeroshot (zero-shot CLIP has no "
                    f"method and no inputs but --clip)")
    if args.output_dir:
        try:
            outputs.check_output_dir(args.output_dir, files=("results.json",))
        except UserError as e:
            p.error(str(e))

# ----------------------------------------------------------------------------- evaluation


def read_checkpoint(args):
    """-> (trainable state dict, the run's flags as a dict (method, selection and the classes the
    model was built with included; None where the checkpoint does not say), the CLIP weights an
    authors' folder stores (None for train.py's checkpoints, which hold no CLIP))."""
    if os.path.isdir(args.checkpoint):
        ours = [n for n in ("best.pt", "last.pt")
                if os.path.isfile(os.path.join(args.checkpoint, n))]
        if ours and released.authors_method(args.checkpoint) is None:
            raise UserError(f"--checkpoint {args.checkpoint} is a train.py output folder: pass the "
                            f"file, {os.path.join(args.checkpoint, ours[0])}")
        state, info = released.load_authors_run(args.checkpoint, args.epoch)
        recorded = dict(info["flags"], method=info["method"], dataset=None, root=None, shots=16,
                        seed=1, subsample="all", precision=info["precision"], refiner=True,
                        clip=info["clip"] or "ViT-B/16", selected=None, classnames=None)
        return state, recorded, info["clip_weights"]
    ckpt = outputs.load_checkpoint(args.checkpoint)
    # selected: the selection the run made, e.g. "best-test"
    recorded = dict(flags.recorded_flags(ckpt["args"]), selected=ckpt.get("selection"),
                    classnames=ckpt.get("classnames"))
    return ckpt["model"], recorded, None


def read_run(args):
    """What --checkpoint (or --zeroshot) holds -> (trainable state or None, the run's flags as
    read_checkpoint gives them, an authors' folder's CLIP weights or None, the method's class)."""
    if args.zeroshot:
        recorded = dict(method=None, dataset=None, root=None, shots=16, seed=1, subsample="all",
                        clip="ViT-B/16", precision=None, selected=None, classnames=None)
        return None, recorded, None, ZeroShotCLIP
    state, recorded, stored_clip = read_checkpoint(args)
    return state, recorded, stored_clip, checkpoint_method(args, recorded)


def checkpoint_method(args, recorded):
    """The class of the checkpoint's method; --method and the weight-file flags must be its: a
    flag of another method is named with what the checkpoint is."""
    method = recorded["method"]
    if args.method and args.method != method:
        raise UserError(f"--method {args.method}: {args.checkpoint} is a --method {method} "
                        f"checkpoint")
    Method = flags.load_method(method, recorded.get("method_file"))
    for name in set(flags.input_names()) - set(Method.recipe.weight_files):
        owners = " or ".join(m for m, M in METHODS.items() if name in M.recipe.weight_files)
        for given in (flags.flag(attribute) for attribute in (name, "allow_other_" + name)
                      if getattr(args, attribute)):
            raise UserError(f"{given}: {args.checkpoint} is a --method {method} checkpoint, "
                            f"which has no {name.replace('_', '-')} (a checkpoint of --method "
                            f"{owners} takes {given})")
    return Method


def resolve_inputs(args, recorded, Method, classnames):
    """The weights files the model is built from (a PromptKD student's teacher): the flags, else
    the run's, resolved by the recipe (a teacher folder to its file); a file that is not the run's
    (SHA-256) is refused unless --allow-other-<name>. -> (the run's flags so resolved, recipe)."""
    weight_files = Method.recipe.weight_files
    rules = textrefiner.rules(Method.recipe)
    run_files = {name: recorded.get(name) for name in weight_files}
    for name in weight_files:
        given, flag = getattr(args, name), flags.flag(name)
        if given is None and run_files[name] is None and rules[name].get("required"):
            raise UserError(f"{flag} is required: {args.checkpoint} names none (an authors' run "
                            f"folder does not record it; pass the one it was trained with)")
        recorded[name] = given or run_files[name]
        value = recorded[name]
        if value is not None and value not in clip_model.MODELS and not os.path.exists(value):
            hint = "" if given else f" (the one {args.checkpoint} was trained with; pass {flag})"
            raise UserError(f"{flag} {value!r}: no such file or folder{hint}")
    run_sha = {name: recorded.get(name + "_sha256") for name in weight_files}
    namespace = argparse.Namespace(**recorded)
    recipe = flags.prepare_recipe(Method, namespace, classnames)
    for name in weight_files:
        ours, theirs = getattr(namespace, name + "_sha256"), run_sha[name]
        allowed = getattr(args, "allow_other_" + name)
        if None not in (ours, theirs) and ours != theirs and not allowed:
            flag = flags.flag(name)
            raise UserError(f"{flag} {getattr(namespace, name)}: not the {flag[2:]} "
                            f"{args.checkpoint} was trained with ({run_files[name]}, SHA-256 "
                            f"{theirs[:16]}..., this file {ours[:16]}...); pass that file, or "
                            f"--allow-other-{flag[2:]} to evaluate with this one anyway")
    return vars(namespace), recipe


def eval_precision(args, recorded, device):
    """--precision, else on CUDA the precision the checkpoint was trained in (a model trained in
    fp32 is tested in fp32, not in the bf16 default); the CPU computes in fp32."""
    if args.precision is None and device.type == "cuda" and recorded["precision"]:
        return recorded["precision"]
    return train.default_precision(args, device)


def what_to_evaluate(args, recorded, Method):
    """-> (dataset, root, subsample, checkpoint): the flags, else the run's. Refused when
    --output-dir holds another evaluation's results (e.g. the training's, with --subsample new)."""
    dataset, root = args.dataset or recorded["dataset"], args.root or recorded["root"]
    for flag, value in (("--dataset", dataset), ("--root", root)):
        if value is None:
            source = "zero-shot CLIP has no run to take it from" if args.zeroshot else \
                f"{args.checkpoint} does not name one"
            raise UserError(f"{flag} is required: {source}")
    if dataset not in data.DATASETS:
        raise UserError(f"--dataset {dataset!r}: expected one of {', '.join(data.DATASETS)}")
    if not os.path.isdir(root):
        raise UserError(f"--root {root!r} is not a directory")
    same_dataset = dataset == recorded["dataset"]
    subsample = args.subsample or (recorded["subsample"] if same_dataset else "all")
    trained_on_all = same_dataset and recorded["subsample"] == "all" and not Method.transductive
    if subsample == "new" and trained_on_all and not args.zeroshot:
        raise UserError(f"--subsample new: {args.checkpoint} was trained on all classes of "
                        f"{dataset} (subsample: all), so its 'new' classes are training classes; "
                        f"use --subsample all")
    checkpoint = "zero-shot CLIP" if args.zeroshot else os.path.realpath(args.checkpoint)
    path = os.path.join(args.output_dir, "results.json") if args.output_dir else None
    if path and os.path.exists(path):
        old = outputs.read_json(path)
        if old is None:
            raise UserError(f"{path} exists and is not a readable results.json; move it away or "
                            f"choose another --output-dir")
        expected = dict(dataset=dataset, subsample=subsample, split=args.split,
                        checkpoint=checkpoint)
        differ = {key: f"{old.get(key)} here, {expected[key]} now"
                  for key in outputs.results_match(old, **expected)}
        if differ:
            raise UserError(f"{path} holds the results of another evaluation ({differ}); choose "
                            f"another --output-dir, or delete it")
    return dataset, root, subsample, checkpoint


def load_model(args, recorded, Method, classnames, all_classnames, state, stored_clip):
    """The model of `classnames` (all_classnames: every class the run meets, whose prompts must
    fit), its inputs resolved -> (model, the run's flags so resolved, the CLIP's name or file)."""
    if args.zeroshot:
        try:
            recipe = ZeroShotRecipe().for_run(recorded["dataset"], recorded["subsample"],
                                              classnames)
        except RecipeError as e:
            raise UserError(f"--zeroshot: {e.problem} (--dataset {recorded['dataset']})") from None
    else:
        recorded, recipe = resolve_inputs(args, recorded, Method, all_classnames)
    clip_name = args.clip or recorded["clip"]
    if not args.zeroshot and os.path.isfile(args.checkpoint):  # train.py's (a folder: the authors')
        check_run_clip(args, recorded, clip_name)
    clip = flags.load_clip(clip_name)
    if stored_clip:
        released.check_authors_clip(clip, stored_clip, clip_name, args.checkpoint)
    if args.zeroshot:
        return ZeroShotCLIP(clip, classnames, recipe), recorded, clip_name
    try:
        model = Method(clip, classnames, recipe)
        model.load_trainable_state_dict(state)
    except ValueError as e:  # a RecipeError too: the recorded recipe does not build on its CLIP
        if isinstance(e, RecipeError) and e.field in Method.recipe.weight_files:
            raise UserError(flags.recipe_message(e)) from None  # an input file's own problem
        problem = flags.recipe_message(e) if isinstance(e, RecipeError) else e
        raise UserError(f"{args.checkpoint}: its tensors do not fit a --method "
                        f"{recorded['method']} model with its recorded flags ({problem}); was it "
                        f"written by another method, or on another CLIP?") from None
    return model, recorded, clip_name


def check_run_clip(args, recorded, clip_name):
    """The CLIP must be the one the run was trained with (by SHA-256; an official name's is in its
    address) unless --allow-other-clip."""
    theirs = recorded.get("clip_sha256")
    if theirs is None:  # a run that predates the record: the CLIP it names, as it is now
        theirs = clip_model.weights_sha256(recorded["clip"])
    ours = clip_model.weights_sha256(clip_name)
    if None not in (theirs, ours) and ours != theirs and not args.allow_other_clip:
        raise UserError(f"--clip {clip_name}: not the CLIP {args.checkpoint} was trained with "
                        f"({recorded['clip']}, SHA-256 {theirs[:16]}..., this one {ours[:16]}...); "
                        f"pass that CLIP, or --allow-other-clip to evaluate with this one anyway")


def run(args):
    """The evaluation args describe; with --output-dir, under that folder's lock (a training or
    another evaluation into it meanwhile is refused: no result is lost between check and write)."""
    rank, world_size, device, _ = train.setup_runtime(args)
    with train.output_lock(args.output_dir, rank, world_size) if args.output_dir else nullcontext():
        state, recorded, stored_clip, Method = read_run(args)
        precision = eval_precision(args, recorded, device)
        dataset, root, subsample, checkpoint = what_to_evaluate(args, recorded, Method)
        shots = recorded["shots"] if args.shots is None else args.shots
        seed = recorded["seed"] if args.seed is None else args.seed
        splits = data.run_splits(dataset, root, shots, seed, subsample,
                                 Method.transductive and not args.zeroshot)
        items = getattr(splits, args.split)
        if not items:
            raise UserError(f"{dataset}: the {args.split} split is empty")
        # The run's own classes (its teacher's): its subsample on its dataset; else those evaluated.
        own = recorded["subsample"] if dataset == recorded["dataset"] else subsample
        recorded.update(dataset=dataset, root=root, shots=shots, seed=seed, subsample=own)
        model, recorded, clip_name = load_model(args, recorded, Method, splits.classnames,
                                                splits.all_classnames, state, stored_clip)
        loader = data.build_eval_loader(items, args.batch_size, model.clip.config.image_resolution,
                                        rank=rank, world_size=world_size, workers=args.workers,
                                        pin_memory=device.type == "cuda",
                                        decode_on=train.decode_device(args, device))
        results = train.evaluate(model.to(device), loader, splits.eval_classnames, device,
                                 precision, features.for_run(args.no_feature_cache),
                                 rows=None if args.zeroshot else splits.rows)
        inputs = flags.input_record(Method, recorded)
        resolved = dict(dataset=dataset, root=root, subsample=subsample, shots=shots, seed=seed,
                        clip=clip_name, precision=precision, method=recorded["method"], **inputs)
        trained = not args.zeroshot
        sha = clip_model.sha256(checkpoint) if os.path.isfile(checkpoint) else None  # not a folder
        results.update(split=args.split, dataset=dataset, subsample=subsample,
                       checkpoint=checkpoint, checkpoint_sha256=sha,
                       method=recorded["method"] if trained else None,
                       refiner=bool(recorded.get("refiner")) if trained else None,
                       selection=recorded["selected"] if trained else None, **inputs,
                       args=dict(vars(args), **resolved))
        if rank == 0:
            write_results(args, results)
    return results


def write_results(args, results):
    """The accuracy line, and results.json in --output-dir (a full disk: the results on stdout)."""
    print(f"{results['dataset']} {results['subsample']} {args.split}: accuracy "
          f"{results['accuracy']:.2f} macro-F1 {results['macro_f1']:.2f} on "
          f"{results['num_images']} images, {results['num_classes']} classes")
    if args.output_dir:
        try:
            outputs.write_json(results, os.path.join(args.output_dir, "results.json"))
        except UserError as e:  # the evaluation is not lost with the file
            print(json.dumps(results, indent=2))
            raise UserError(f"{e}; the results are on stdout above") from None


def parse_args(argv=None, step=False):
    """eval.py's flags, checked: a bad one is argparse's usage error (exit status 2); step (a step
    of tables.py): a one-line UserError. A recipe's flag is refused as training's."""
    p = get_parser()
    if step:
        flags.raise_errors(p, "eval.py")
    args, unknown = p.parse_known_args(argv)
    for item in unknown:
        if flags.recipe_owners(item):
            p.error(f"{item.split('=')[0]} is a training flag (a recipe's): eval.py evaluates a "
                    f"checkpoint with the recipe it was trained with; train again to change it")
    if unknown:
        p.error(f"unrecognized arguments: {' '.join(unknown)}")
    check_args(p, args)
    return args


def main(argv=None):
    with train.command_line():
        return run(parse_args(argv))


if __name__ == "__main__":
    main()
