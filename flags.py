"""What the command lines (train.py, eval.py, bench.py, tables.py) share: flag types, the flags
every run takes, --method (a name of textrefiner.METHODS, MODULE:CLASS or path/to/file.py:CLASS)
and its recipe's flags, and the one-line errors that name a flag.

    Method = flags.load_method("examples/clip_adapter.py:CLIPAdapter")   # checked: a PromptCLIP
    flags.add_recipe_flags(parser, Method, spec)      # --epochs, --lr, ..., --ratio: default None
    recipe = flags.fill_recipe(parser, args, Method)  # unset flags take the recipe's values
    recipe = flags.prepare_recipe(Method, args, classnames)   # for the run (Recipe.for_run)
    model = flags.build_model(Method, clip, classnames, recipe)

A recipe value a model refuses (textrefiner.RecipeError) reads "--field-name problem".
"""
import argparse
import dataclasses
import hashlib
import importlib
import importlib.util
import os
import re
import sys

import torch

import clip_model
import textrefiner
from data import UserError
from textrefiner import METHODS, NON_NEGATIVE, Range, RecipeError

# The methods this package ships, as imported: a class registered under one of their names later
# is refused by load_method rather than trained and recorded as the built-in.
BUILT_IN = dict(METHODS)


def flag(name):
    """The command-line spelling of a field or flag attribute: batch_size -> --batch-size."""
    return "--" + name.replace("_", "-")


def ranged(kind, allowed):
    """An argparse type=: kind(text), refused by argparse (exit 2, naming the flag) unless the
    textrefiner.Range `allowed` takes it."""
    def parse(text):
        value = kind(text)
        if not allowed.ok(value):
            raise argparse.ArgumentTypeError(f"must be {allowed.text}, got {value}")
        return value
    parse.__name__ = kind.__name__  # argparse's "invalid int value" names the type
    return parse


SEEDS = Range(lambda v: 0 <= v < 2**32, "in [0, 4294967295]")  # what numpy takes
# timedelta overflows past ~2.7e12 s: a week is longer than any collective should wait
TIMEOUTS = Range(lambda v: 0 < v <= 7 * 24 * 3600, "in (0, 604800] (at most a week)")


def device_flag(name):
    """--device's type: cpu, or a CUDA device this machine has (argparse's usage error else)."""
    try:
        device = torch.device(name)
    except RuntimeError:  # not a device string: refused below as any type but cpu and cuda
        device = torch.device("meta")
    count = torch.cuda.device_count()
    if device.type not in ("cpu", "cuda") or device.type == "cuda" and (device.index or 0) >= count:
        raise argparse.ArgumentTypeError(f"{name!r}: expected cpu, cuda or cuda:N, N below the "
                                         f"{count} CUDA devices of this machine")
    return name


def input_names():
    """The weights files a registered method is built from besides CLIP (its recipe's
    weight_files: PromptKD's teacher, teacher_clip), sorted: eval.py's, predict.py's and the table
    runner's --<name> flags. Read at each call: a plug-in method may register more."""
    return sorted({name for Model in METHODS.values() for name in Model.recipe.weight_files})


def input_record(Method, values):
    """results.json's entries of the method's weights files: each one's path and SHA-256, from
    `values` (the run's flags as a dict)."""
    return {key: values.get(key)
            for name in Method.recipe.weight_files for key in (name, name + "_sha256")}


def chosen_device(name):
    """--device's value (None: not given) as a torch.device; by default cuda when available."""
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def add_run_flags(p):
    """The flags train.py, eval.py and predict.py share."""
    p.add_argument("--workers", type=ranged(int, NON_NEGATIVE), default=4,
                   help="data loader workers per rank")
    p.add_argument("--device", type=device_flag,
                   help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--dist-timeout", type=ranged(float, TIMEOUTS), default=900.0, metavar="SECONDS",
                   help="torchrun: a collective waiting longer ends the run (default 900)")
    p.add_argument("--precision", choices=("bf16", "fp16", "fp32"),
                   help="autocast dtype of the frozen towers (default: bf16 on CUDA, fp32 on CPU)")


def add_image_flags(p):
    """How train.py and eval.py read the dataset's images (predict.py reads the user's as given)."""
    p.add_argument("--no-feature-cache", action="store_true",
                   help="no cache: the val/test images encoded at every evaluation, the training "
                        "images decoded every epoch (same results, slower)")
    p.add_argument("--eval-decode", choices=("cpu", "cuda"), default="cpu",
                   help="where val/test JPEGs are decoded: cpu (PIL, as Dassl) or cuda (nvjpeg, "
                        "in batches; pixels close to PIL's, not bitwise)")


def add_recipe_flags(p, Method, spec):
    """A flag per field of the method's recipe, default None (fill_recipe fills it in). A field
    that is also one of the command's own flags is a UserError naming the method."""
    recipe = Method.recipe
    group = p.add_argument_group(f"the recipe of --method {spec} ({recipe.__name__}); unset: the "
                                 f"value shown")
    rules = textrefiner.rules(recipe)
    for field in dataclasses.fields(recipe):
        # a file with `from __future__ import annotations` holds the type's name
        kind = {"int": int, "float": float, "bool": bool}.get(field.type, field.type)
        allowed, required = rules[field.name].get("allowed"), rules[field.name].get("required")
        shown = field.default
        if shown is None:
            shown = f"required: {required}" if required else "per dataset"
        options = dict(help=str(shown), default=None)
        if kind is bool:
            options.update(action=argparse.BooleanOptionalAction)
        elif isinstance(allowed, tuple):
            options.update(choices=allowed, type=kind)
        else:
            kind = kind if kind in (int, float) else str
            options.update(type=ranged(kind, allowed) if isinstance(allowed, Range) else kind)
        try:
            group.add_argument(flag(field.name), **options)
        except argparse.ArgumentError:
            raise UserError(f"--method {spec}: its recipe field {field.name!r} is also "
                            f"{p.prog}'s own flag {flag(field.name)}; rename the field") from None


def method_spec(argv):
    """--method's value in argv (default coop), read before the method's own flags exist."""
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--method", default="coop")
    return first.parse_known_args(argv)[0].method


def parse_known(p, argv, spec):
    """p.parse_args, except that a flag of another method's recipe is named as such."""
    args, unknown = p.parse_known_args(argv)
    for item in unknown:
        owners = recipe_owners(item)
        if owners:
            p.error(f"{item.split('=')[0]} applies to --method {' or '.join(owners)}, not {spec}")
    if unknown:
        p.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def recipe_owners(item):
    """The registered methods whose recipe has the flag of a command-line word (--kd-weight=3,
    --no-refiner)."""
    given = item.split("=")[0]
    name = given[2:].replace("-", "_").removeprefix("no_")
    if not given.startswith("--"):
        return []
    return [m for m, M in METHODS.items() if name in recipe_field_names(M)]


def check_method(method, spec):
    """UserError unless `method` (what --method `spec` names) is a PromptCLIP whose recipe is a
    Recipe dataclass that leaves TextRefiner's settings alone."""
    if not (isinstance(method, type) and issubclass(method, textrefiner.PromptCLIP)):
        raise UserError(f"--method {spec}: {method!r} is not a textrefiner.PromptCLIP subclass")
    recipe = method.recipe
    if not (isinstance(recipe, type) and issubclass(recipe, textrefiner.Recipe)
            and dataclasses.is_dataclass(recipe)):
        raise UserError(f"--method {spec}: its recipe {recipe!r} is not a @dataclass subclass of "
                        f"textrefiner.Recipe")
    for field in dataclasses.fields(recipe):
        if field.name == "method_file" or field.name.endswith("_sha256"):  # set beside the flags
            raise UserError(f"--method {spec}: {recipe.__name__}.{field.name} is a name train.py "
                            f"records with each run (the method's file, an input's SHA-256); "
                            f"rename your field")
        if field.name in textrefiner.REFINER_FIELDS and not field.metadata.get("textrefiner"):
            raise UserError(f"--method {spec}: {recipe.__name__}.{field.name} redeclares "
                            f"TextRefiner's setting {field.name!r}; rename your field (or, to change "
                            f"TextRefiner's default on purpose, declare it with "
                            f"textrefiner.setting(..., textrefiner=True))")


def load_method(spec, recorded_file=None):
    """--method: a name of METHODS, MODULE:CLASS (an importable module) or path/to/file.py:CLASS,
    the file found as given or else at recorded_file (its absolute path when the run started).
    -> the checked PromptCLIP class; UserError (one line) for what cannot be loaded."""
    if spec in METHODS:
        method = METHODS[spec]
        if spec in BUILT_IN and method is not BUILT_IN[spec]:
            raise UserError(f"--method {spec}: textrefiner.METHODS[{spec!r}] is {method!r}, not "
                            f"the built-in {BUILT_IN[spec].__name__}; register your method under "
                            f"a name of its own")
    elif ":" not in spec:
        raise UserError(f"--method {spec!r}: expected one of {', '.join(METHODS)}, MODULE:CLASS or "
                        f"FILE.py:CLASS")
    else:
        where, name = spec.rsplit(":", 1)
        if where.endswith(".py") and not os.path.isfile(where) and recorded_file:
            where = recorded_file
        try:
            module = import_file(where) if where.endswith(".py") else importlib.import_module(where)
        except ImportError as e:
            raise UserError(f"--method {spec}: cannot import {where} ({e})") from None
        method = getattr(module, name, None)
        if method is None:
            raise UserError(f"--method {spec}: {where} has no {name}")
    check_method(method, spec)
    return method


def method_file(spec):
    """The absolute path of a --method FILE.py:CLASS's file (recorded with the run), else None."""
    where = spec.rsplit(":", 1)[0]
    return os.path.abspath(where) if ":" in spec and where.endswith(".py") else None


def raise_errors(p, script):
    """p's usage errors (argparse's own and p.error) as a UserError "script: message", without
    the usage text: a step that tables.py runs fails in one line."""
    def error(message):
        raise UserError(f"{script}: {message}")
    p.error = error


def import_file(path):
    """The module of a .py file, imported once per absolute path (its folder on sys.path meanwhile,
    so it can import its neighbours)."""
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise ImportError(f"no such file {path}")
    name = "textrefiner_method_" + hashlib.sha256(path.encode()).hexdigest()[:16]
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        sys.path.insert(0, os.path.dirname(path))
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
        finally:
            sys.path.remove(os.path.dirname(path))
    return sys.modules[name]


def recipe_field_names(Method):
    return {f.name for f in dataclasses.fields(Method.recipe)}


def recorded_flags(values):
    """A checkpoint's flags in today's spelling (no_refiner was refiner's; a run that names no
    method predates --method: CoOp + TextRefiner)."""
    if "no_refiner" in values and "refiner" not in values:
        values = dict(values, refiner=not values["no_refiner"])
    return dict(values, method=values.get("method", "coop"))


def recipe_of(Method, values):
    """Method's recipe with the values a flat dict (the run's flags, a checkpoint's) holds."""
    values = recorded_flags(values)
    given = {k: values[k] for k in recipe_field_names(Method) if values.get(k) is not None}
    return Method.recipe(**given)


def recipe_message(error):
    """A RecipeError as the command lines say it: the field's flag, then the problem, in which the
    other fields of the registered recipes named in snake_case (warmup_epochs) are flags too."""
    fields = {name for M in METHODS.values() for name in recipe_field_names(M) if "_" in name}

    def spelled(match):
        return flag(match[0]) if match[0] in fields else match[0]
    problem = re.sub(r"\b[a-z]+(?:_[a-z]+)+\b", spelled, error.problem)
    return f"{flag(error.field)} {problem}"


def fill_recipe(p, args, Method, require=True):
    """Every recipe flag left unset takes the recipe's value (with --xd its cross-dataset values,
    with --few-shot its few-shot values for --shots on --dataset); p.error for a value the recipe
    refuses, and (require) for a missing required flag or weights file."""
    given = {k: getattr(args, k) for k in recipe_field_names(Method) if getattr(args, k) is not None}
    defaults = Method.recipe.xd if getattr(args, "xd", False) else {}
    if getattr(args, "few_shot", False):
        defaults = Method.recipe.few_shot(args.shots, args.dataset)
    try:
        recipe = Method.recipe(**{**defaults, **given})
    except RecipeError as e:
        p.error(recipe_message(e))
    for name, rule in textrefiner.rules(recipe).items():
        setattr(args, name, getattr(recipe, name))
        if require and getattr(args, name) is None and rule.get("required"):
            p.error(f"--method {args.method} needs {flag(name)} ({rule['required']})")
    if require:  # weights the model is built from, as --clip
        for name in recipe.weight_files:
            check_weights_flag(p, getattr(args, name), flag(name))
    return recipe


def check_weights_flag(p, name, flag="--clip"):
    """p.error unless name is None, an official CLIP name or an existing file or folder."""
    if name is not None and name not in clip_model.MODELS and not os.path.exists(name):
        p.error(f"{flag} {name!r}: no such file or folder; expected an official name "
                f"({', '.join(clip_model.MODELS)}) or a weights file")


def prepare_recipe(Method, args, classnames):
    """The run's recipe (textrefiner.Recipe.for_run: values per dataset, a teacher folder to its
    file, the prompts of every class checked) before any weights load, recorded in args with the
    SHA-256 of each weights file: --resume and eval.py compare the file by content."""
    try:
        recipe = recipe_of(Method, vars(args)).for_run(args.dataset, args.subsample, classnames)
    except RecipeError as e:
        raise UserError(recipe_message(e)) from None
    vars(args).update(dataclasses.asdict(recipe))
    for name in recipe.weight_files:
        value = getattr(args, name)
        is_file = value is not None and os.path.isfile(value)
        setattr(args, name + "_sha256", clip_model.sha256(value) if is_file else None)
    return recipe


def build_model(Method, clip, classnames, recipe):
    """Method(clip, classnames, recipe); a value the model cannot take is the one-line error
    naming its flag."""
    try:
        return Method(clip, classnames, recipe)
    except RecipeError as e:
        raise UserError(recipe_message(e)) from None


def load_clip(name, flag="--clip"):
    """clip_model.load_clip with a one-line error naming the flag."""
    try:
        return clip_model.load_clip(name)
    except (OSError, ValueError, RuntimeError) as e:
        raise UserError(f"{flag} {name}: {e}") from None
