"""Use a trained model: classify your own images, export the refined classifier as a plain head for
any CLIP runtime, or draw what TextRefiner's cache has learned.

    python predict.py cat.jpg photos/ --checkpoint output/coop/base2new/dtd/seed1/base/best.pt
    python predict.py photos/ --checkpoint best.pt --classnames "banded,woven,zigzagged" --topk 2
    python predict.py photos/ --checkpoint best.pt --classnames names.txt --json   # a name a line
    python predict.py photos/ --zeroshot --classnames "cat,dog" --clip ViT-B/16     # zero-shot CLIP
    python predict.py --export-head head.pt --checkpoint best.pt [--classnames ...]
    python predict.py --atlas atlas.png --checkpoint best.pt [--dataset D --root /data] [--images N]

A line per image: its path and the top-k classes with their probabilities; --json: one JSON object
per line, {"image": path, "top": [[class, probability], ...]}. A folder is read recursively (files
with an image extension). An unreadable image is named on stderr, the others are predicted, and the
exit status is 2. The classes are the checkpoint's own unless --classnames names others: any class
names for a host whose classes are prompts (the base-to-new promise). The model is rebuilt as
eval.py rebuilds it (its method, recipe and weights files from the checkpoint; --clip must be the
CLIP the run was trained with, by SHA-256) and sees images as eval.py does (its test transform and
batches), so the top-1 over a test split is eval.py's accuracy.

--export-head OUT.pt: torch.load(OUT.pt, weights_only=True) is {"weight": (C, D) float32, the
classifier rows, "classnames", "logit_scale" (exponentiated), "clip", "clip_sha256"}; with CLIP's
test preprocessing and its plain image tower, logit_scale * normalise(image feature) @ weight.T are
the model's logits. With TextRefiner the rows are the refined class features, which the method does
not re-normalise (their norms are part of the logits); without it they are unit rows. Only for a
model whose image features are the plain tower's and whose classifier depends on no image (CoOp,
KgCoOp, zero-shot CLIP, with or without TextRefiner); the others are refused, saying why.

--atlas OUT.png: the frozen image tower over --images N (200) test images of the dataset (evenly
spaced along the split), their tokens aligned by the refiner in eval mode (BatchNorm with the
running statistics training left, where training normalised with each batch's statistics); for
each of the M cache slots the --patches K (8) patches whose normalised aligned tokens have the
highest cosine with the slot, drawn a row per slot (each patch with a patch of context around,
outlined, and its score), and OUT.json:
{"slots": [[{"image": path, "patch": [row, col], "score": cosine}, ... best first], ...]}.

From Python (textrefiner.load is this module's load):

    model = textrefiner.load("best.pt", classnames=None, clip=None, device=None)
    model.predict(["cat.jpg", PIL.Image.open("dog.png")], topk=3)   # [[(class, probability), ...]]
"""
import argparse
import json
import math
import os
import sys

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageOps
from torch.utils.data import DataLoader, Dataset

import clip_model
import data
import eval as evaluation  # "eval" would shadow the builtin
import flags
import outputs
import textrefiner
import train
from data import UserError
from textrefiner import POSITIVE

# the file extensions of the image formats Pillow reads
IMAGE_EXTENSIONS = {ext for ext, kind in Image.registered_extensions().items()
                    if kind in Image.OPEN}


def get_parser():
    p = argparse.ArgumentParser(
        prog="predict.py",
        description="Classify images with a trained checkpoint, export its classifier as a head, "
                    "or draw its TextRefiner cache.")
    p.add_argument("images", nargs="*", metavar="IMAGE_OR_FOLDER")
    p.add_argument("--checkpoint", help="train.py's best.pt/last.pt, or an authors' run folder")
    p.add_argument("--zeroshot", action="store_true", help="zero-shot CLIP instead of a checkpoint")
    p.add_argument("--classnames", metavar="FILE|a,b,c",
                   help="a file with one class name a line, or names separated by commas "
                        "(default: the checkpoint's classes)")
    p.add_argument("--topk", type=flags.ranged(int, POSITIVE), default=5)
    p.add_argument("--json", action="store_true", help="one JSON object per image")
    p.add_argument("--clip", help="CLIP name or weights file (default: the checkpoint's)")
    p.add_argument("--batch-size", type=flags.ranged(int, POSITIVE), default=100)
    p.add_argument("--export-head", metavar="OUT.pt", help="write the classifier as a plain head")
    p.add_argument("--atlas", metavar="OUT.png", help="draw the cache slots' best patches")
    p.add_argument("--dataset", help="--atlas: the images' dataset (default: the checkpoint's)")
    p.add_argument("--root", help="--atlas: data root (default: the checkpoint's)")
    p.add_argument("--subsample", choices=data.SUBSAMPLES, help="--atlas: default the run's")
    p.add_argument("--images", type=flags.ranged(int, POSITIVE), default=200, dest="atlas_images",
                   metavar="N", help="--atlas: test images searched")
    p.add_argument("--patches", type=flags.ranged(int, POSITIVE), default=8,
                   help="--atlas: patches listed and drawn per slot")
    evaluation.add_input_flags(p)
    flags.add_run_flags(p)
    # what eval.py's functions read that predict.py does not ask for
    p.set_defaults(method=None, epoch=None, output_dir=None)
    return p


def parse_args(argv=None):
    p = get_parser()
    args = p.parse_args(argv)
    modes = [bool(args.images), bool(args.export_head), bool(args.atlas)]
    if sum(modes) != 1:
        p.error("give images to classify, --export-head OUT.pt or --atlas OUT.png (one of them)")
    if not args.atlas and (args.dataset or args.root or args.subsample):
        p.error("--dataset, --root and --subsample choose --atlas's images")
    if args.atlas and args.atlas.endswith(".json"):
        p.error(f"--atlas {args.atlas}: expected a .png (OUT.json is written beside it)")
    if args.clip:
        flags.check_weights_flag(p, args.clip)
    return args

# ----------------------------------------------------------------------------- the model


def read_classnames(text):
    """--classnames: a file with one name a line, else names separated by commas."""
    if os.path.isfile(text):
        with open(text) as f:
            names = [line.strip() for line in f]
    elif "," not in text and (os.sep in text or text.endswith(".txt")):
        raise UserError(f"--classnames {text}: no such file")
    else:
        names = [name.strip() for name in text.split(",")]
    names = [name for name in names if name]
    if not names:
        raise UserError(f"--classnames {text!r}: no class names (expected a file with one name a "
                        f"line, or names separated by commas)")
    return names


def own_classnames(args, recorded, Method):
    """The classes the checkpoint's model was built with: recorded in it, else its dataset's."""
    if recorded.get("classnames"):
        return recorded["classnames"]
    if recorded["dataset"] and recorded["root"] and os.path.isdir(recorded["root"]):
        splits = data.run_splits(recorded["dataset"], recorded["root"], recorded["shots"],
                                 recorded["seed"], recorded["subsample"], Method.transductive)
        return splits.classnames
    source = "zero-shot CLIP has" if args.zeroshot else f"{args.checkpoint} records"
    raise UserError(f"--classnames is required: {source} no classes of its own")


def open_model(args, classnames=None):
    """args: predict.py's flags -> a Predictor; classnames None: the checkpoint's own classes."""
    if args.zeroshot == bool(args.checkpoint):
        raise UserError("give exactly one of --checkpoint PATH and --zeroshot")
    if args.checkpoint and not os.path.exists(args.checkpoint):
        raise UserError(f"--checkpoint {args.checkpoint!r}: no such file or folder")
    state, recorded, stored_clip, Method = evaluation.read_run(args)
    names = own_classnames(args, recorded, Method) if classnames is None else list(classnames)
    if not names:
        raise UserError("--classnames: the class list is empty")
    model, recorded, clip_name = evaluation.load_model(args, recorded, Method, names, names, state,
                                                       stored_clip)
    device = flags.chosen_device(args.device)
    precision = evaluation.eval_precision(args, recorded, device)
    return Predictor(model.to(device).eval(), names, device, precision, clip_name, recorded,
                     args.batch_size, args.workers)


def load(checkpoint, classnames=None, clip=None, device=None, **options):
    """textrefiner.load: a checkpoint (or an authors' run folder) ready for inference, the classes
    its own unless `classnames`; options: predict.py's other flags by name (precision, workers,
    batch_size, teacher, zeroshot=True with checkpoint None, ...). Bad input: data.UserError."""
    args = get_parser().parse_args([])
    unknown = sorted(set(options) - set(vars(args)))
    if unknown:
        raise TypeError(f"load: unknown options {', '.join(unknown)}")
    args.workers = 0  # in this process: no start-up cost for a few images
    vars(args).update(options, checkpoint=checkpoint, clip=clip)
    args.device = None if device is None else str(device)
    return open_model(args, classnames)


class Images(Dataset):
    """Paths or PIL images -> (uint8 (3, R, R) by eval.py's test transform, index, None), or
    (None, index, why) for one that cannot be read."""

    def __init__(self, images, resolution):
        self.images, self.transform = images, data.build_transform(False, resolution)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        image = self.images[index]
        if isinstance(image, Image.Image):
            return self.transform(image.convert("RGB")), index, None
        if not os.path.isfile(image):
            return None, index, f"no such image: {image}"
        try:
            return self.transform(data.load_image(image)), index, None
        except UserError as e:
            return None, index, str(e)


def collate(rows):
    """-> (uint8 (b, 3, R, R) of the readable images or None, their indices, [(index, why)])."""
    good = [row for row in rows if row[0] is not None]
    images = torch.stack([row[0] for row in good]) if good else None
    return images, [row[1] for row in good], [(row[1], row[2]) for row in rows if row[0] is None]


class Predictor:
    """A model in eval mode on its device with its classes: predict(images, topk), logits(images),
    head() (--export-head's dict). Images: paths or PIL images, in eval.py's batches."""

    def __init__(self, model, classnames, device, precision, clip, recorded, batch_size=100,
                 workers=0):
        self.model, self.classnames, self.recorded = model, classnames, recorded
        self.device, self.precision, self.clip = device, precision, clip
        self.batch_size, self.workers = batch_size, workers

    def batches(self, images):
        """Yields (indices, logits (b, C) fp32 on the CPU, [(index, why) of unreadable images])."""
        dataset = Images(images, self.model.clip.config.image_resolution)
        batches = math.ceil(len(images) / self.batch_size)
        # one batch: decoded in this process; more: the workers decode ahead of the model
        loader = DataLoader(dataset, batch_size=self.batch_size,
                            num_workers=max(0, min(self.workers, batches - 1)), collate_fn=collate,
                            pin_memory=self.device.type == "cuda")
        for batch, indices, errors in loader:
            logits = None
            if batch is not None:
                logits, _ = train.eval_step(self.model, batch, self.device, self.precision)
                logits = logits.float().cpu()  # (b, C)
            yield indices, logits, errors

    def logits(self, images):
        """(N, C) fp32 logits of a path, a PIL image or a list of them; UserError for one that
        cannot be read."""
        images = images if isinstance(images, (list, tuple)) else [images]
        out = []
        for _, logits, errors in self.batches(images):
            if errors:
                raise UserError(errors[0][1])
            out.append(logits)
        return torch.cat(out)

    def top(self, logits, k):
        """(C,) logits -> [(class, probability), ...] of the k most probable classes."""
        probs = logits.softmax(-1)
        best = logits.topk(min(k, len(self.classnames))).indices.tolist()
        return [(self.classnames[i], probs[i].item()) for i in best]

    def predict(self, images, topk=5):
        """-> a list per image of its top-k (class, probability), most probable first."""
        return [self.top(row, topk) for row in self.logits(images)]

    def head(self):
        """--export-head's dict (module docstring), the classifier computed in fp32; UserError for
        a model no head stands for."""
        why = unexportable(self.model)
        if why:
            raise UserError(f"--export-head: {why}")
        with torch.no_grad():
            weight = self.model.class_features().float().cpu().contiguous()  # (C, D)
        # the CLIP's SHA-256 computed here: only a head records it
        return dict(weight=weight, classnames=list(self.classnames),
                    logit_scale=self.model.clip.logit_scale.exp().item(), clip=self.clip,
                    clip_sha256=clip_model.weights_sha256(self.clip))


def plain_tower(model):
    """Whether the model's image features are the frozen tower's own (the tokens its refiner
    aligned came from it too)."""
    own = type(model).image_features is textrefiner.PromptCLIP.image_features
    return own and textrefiner.reuses_image_features(model)


def unexportable(model):
    """Why no head on the plain CLIP image tower gives the model's logits, or None."""
    name = type(model).__name__
    if not plain_tower(model):
        return (f"{name}'s image features are not the plain CLIP image tower's (its image tower is "
                f"prompted or trained), so no head on plain CLIP gives its logits")
    if type(model).logits is not textrefiner.PromptCLIP.logits:
        return f"{name}'s class features depend on each image (its own logits): no fixed head"
    return None

# ----------------------------------------------------------------------------- the commands


def image_paths(given):
    """The files named and the image files under the folders named (recursively, sorted)."""
    paths = []
    for path in given:
        if os.path.isdir(path):
            for folder, subfolders, files in sorted(os.walk(path)):
                subfolders.sort()
                paths += [os.path.join(folder, f) for f in sorted(files)
                          if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS]
        elif os.path.exists(path):
            paths.append(path)
        else:
            raise UserError(f"no such image or folder: {path}")
    if not paths:
        raise UserError(f"no image files in {', '.join(given)}")
    return paths


def print_predictions(predictor, paths, topk, as_json):
    """A line per image; each unreadable image one line on stderr, then exit status 2."""
    bad = 0
    for indices, logits, errors in predictor.batches(paths):
        for _, why in errors:
            print(f"error: {why}", file=sys.stderr)
        bad += len(errors)
        for index, row in zip(indices, [] if logits is None else logits):
            top = predictor.top(row, topk)
            if as_json:
                print(json.dumps({"image": paths[index], "top": [list(t) for t in top]}))
            else:
                print(paths[index] + "  " + "  ".join(f"{name} {p:.4f}" for name, p in top))
    if bad:
        raise SystemExit(2)


def check_writable(path, flag):
    """At start, not after the work: path's folder exists."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"{flag} {path}: no such folder {folder}")


@torch.no_grad()
def cache_atlas(predictor, items, patches):
    """The frozen tower over items, their patch tokens aligned in eval mode -> a best-first list
    of `patches` {"image", "patch": [row, col], "score"} per cache slot; score = the cosine of the
    normalised aligned token with the slot (the cache's rows are unit vectors)."""
    model, device = predictor.model, predictor.device
    refiner, resolution = model.refiner, model.clip.config.image_resolution
    scores = []  # [(b, G*G, M)]
    for images, _ in data.build_eval_loader(items, predictor.batch_size, resolution,
                                            workers=predictor.workers):
        with train.autocast(device, predictor.precision):
            _, tokens, _ = model.clip.encode_image(data.normalize(images.to(device)),
                                                   return_tokens=True)  # (b, T, D)
        aligned = refiner.align_tokens(tokens)[:, 1:]  # (b, G*G, D) the patches, CLS left out
        scores.append((F.normalize(aligned, dim=-1) @ refiner.cache.t()).cpu())
    scores = torch.cat(scores)  # (N, G*G, M)
    per_image, grid = scores.shape[1], math.isqrt(scores.shape[1])
    best = scores.flatten(0, 1).topk(min(patches, scores.shape[0] * per_image), dim=0)  # (k, M)
    slots = []
    for values, indices in zip(best.values.t().tolist(), best.indices.t().tolist()):
        slots.append([dict(image=items[i // per_image].impath,
                           patch=list(divmod(i % per_image, grid)), score=v)
                      for v, i in zip(values, indices)])
    return slots


def draw_atlas(slots, resolution, patch, path):
    """A row per slot: its number and best score, then its patches as eval.py's test crop shows
    them, each with one patch of context around it, outlined, its score below."""
    cell, label, gap = 96, 110, 6
    scale = cell / (3 * patch)
    width = label + max(map(len, slots)) * (cell + gap)
    canvas = Image.new("RGB", (width, len(slots) * (cell + 20)), "white")
    draw = ImageDraw.Draw(canvas)
    transform, pictures = data.build_transform(False, resolution), {}
    for m, entries in enumerate(slots):
        y = m * (cell + 20)
        draw.text((6, y + 6), f"slot {m}", fill="black")
        draw.text((6, y + 24), f"best {entries[0]['score']:.3f}", fill="black")
        for j, entry in enumerate(entries):
            if entry["image"] not in pictures:  # the test crop, a patch of grey around it
                tensor = transform(data.load_image(entry["image"]))  # uint8 (3, R, R)
                picture = Image.fromarray(tensor.permute(1, 2, 0).numpy())
                pictures[entry["image"]] = ImageOps.expand(picture, patch, fill=(128, 128, 128))
            row, col = entry["patch"]
            crop = pictures[entry["image"]].crop((col * patch, row * patch, (col + 3) * patch,
                                                  (row + 3) * patch))
            x = label + j * (cell + gap)
            canvas.paste(crop.resize((cell, cell), Image.NEAREST), (x, y))
            inner = round(patch * scale)  # the patch: black then white, seen on any colour
            draw.rectangle((x + inner - 1, y + inner - 1, x + 2 * inner + 1, y + 2 * inner + 1),
                           outline="black")
            draw.rectangle((x + inner, y + inner, x + 2 * inner, y + 2 * inner), outline="white")
            draw.text((x, y + cell + 2), f"{entry['score']:.3f}", fill="black")
    outputs.replace_atomically(path, lambda f: canvas.save(f, format="PNG"))


def write_atlas(predictor, args):
    """--atlas: OUT.png and OUT.json over --images test images of the dataset."""
    model = predictor.model
    if model.refiner is None:
        raise UserError(f"--atlas: the model ({type(model).__name__}) has no TextRefiner cache "
                        f"(trained without TextRefiner)")
    if not plain_tower(model):
        raise UserError(f"--atlas: {type(model).__name__}'s refiner aligned the tokens of its own "
                        f"(prompted) image tower, not the frozen tower's the atlas runs")
    recorded, Method = predictor.recorded, type(model)
    dataset, root, subsample, _ = evaluation.what_to_evaluate(args, recorded, Method)
    items = data.run_splits(dataset, root, recorded["shots"], recorded["seed"], subsample).test
    if not items:
        raise UserError(f"--dataset {dataset}: the test split is empty")
    n = min(args.atlas_images, len(items))
    items = [items[i * len(items) // n] for i in range(n)]  # evenly spaced: many classes
    slots = cache_atlas(predictor, items, args.patches)
    config = model.clip.config
    draw_atlas(slots, config.image_resolution, config.vision_patch_size, args.atlas)
    outputs.write_json(dict(slots=slots), os.path.splitext(args.atlas)[0] + ".json")
    print(f"{args.atlas}: {len(slots)} cache slots, their best {len(slots[0])} patches of {n} "
          f"{dataset} test images")


def main(argv=None):
    with train.command_line():
        args = parse_args(argv)
        classnames = None if args.classnames is None else read_classnames(args.classnames)
        paths = image_paths(args.images) if args.images else None
        for path, flag in ((args.export_head, "--export-head"), (args.atlas, "--atlas")):
            if path:
                check_writable(path, flag)
        predictor = open_model(args, classnames)
        if args.export_head:
            outputs.save_atomic(predictor.head(), args.export_head)
            print(f"{args.export_head}: {len(predictor.classnames)} classes, CLIP {predictor.clip}")
        elif args.atlas:
            write_atlas(predictor, args)
        else:
            print_predictions(predictor, paths, args.topk, args.json)


if __name__ == "__main__":
    main()
