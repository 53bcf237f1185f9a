"""A table folder's runs, read from its results.json files and checked, summarised over seeds and
printed as the papers' table beside the published numbers; and the statistics of the report
(report.py, the command). Files only: no torch.

A table folder is base2new (<dataset>/seed<S>/{base,new}/results.json), xd (<target>/seed<S>/)
or fewshot (<dataset>/shots<K>/seed<S>/). Every results.json is checked (readable, a percentage
for accuracy, the dataset, classes, shots and seed its folder says; no stray folders; one method
per folder): each problem becomes a line of its own.

Over seeds: the mean; std, the population std (as CoOp's parse_test_res.py); ci95, the half-width
t(0.975, n - 1) * sample std / sqrt(n) (none for one seed). HM is the harmonic mean of the mean
base and new accuracy (as the papers' tables), its std and CI those of the per-seed HMs.
"""
import math
import os
import statistics
import sys
from dataclasses import dataclass, field

import outputs
from catalog import DATASETS, PAPER_DATASETS, XD_TARGETS

PROTOCOLS = ("base2new", "xd", "fewshot")
METRICS = {"base2new": ("base", "new", "hm"), "xd": ("accuracy",), "fewshot": ("accuracy",)}
# What an average row averages: the 11 datasets of the base-to-new and few-shot tables; the 10
# cross-dataset targets (ImageNet is the source, its 4 variants the domain-generalisation table).
AVERAGED = {"base2new": PAPER_DATASETS, "xd": PAPER_DATASETS[1:], "fewshot": PAPER_DATASETS}
TITLES = {"base2new": "base-to-new generalisation", "xd": "accuracy",
          "fewshot": "few-shot accuracy (K shots of every class, every class tested)"}


def host_average(row, numbers, source, result="result"):
    """What a host's paper or README published: its 11-dataset average, none with TextRefiner."""
    return dict(note=f"Published 11-dataset averages (ViT-B/16, 16 shots, seeds 1-3; {source}); no "
                     f"{result} of {row} with TextRefiner was published:", base2new={row: numbers})


# What the report prints beside our numbers, per method: note, base2new {row: (base, new, HM)},
# and optionally base2new_datasets (column tag, {dataset: (base, new, HM)}), xd (tag, {dataset:
# accuracy}) and xd_note.
PUBLISHED = {
    "coop": dict(
        note="Published 11-dataset averages (ViT-B/16, 16 shots, seeds 1-3):",
        base2new={"CoOp": (82.69, 63.22, 71.66), "CoOp+TextRefiner": (79.74, 74.32, 76.94)}),
    "promptkd": dict(
        note="Published 11-dataset averages (ViT-B/16 student, seeds 1-3; PromptKD+TextRefiner: "
             "the TextRefiner paper, 16 unlabelled shots; PromptKD and the PK columns: PromptKD's "
             "README, the full unlabelled train set):",
        base2new={"PromptKD+TextRefiner": (85.22, 79.64, 82.33), "PromptKD": (86.96, 80.73, 83.73)},
        base2new_datasets=("PK", {  # PromptKD's README: base, new, HM
            "imagenet": (80.83, 74.66, 77.62), "caltech101": (98.91, 96.65, 97.77),
            "oxford_pets": (96.30, 98.01, 97.15), "stanford_cars": (82.80, 83.37, 83.13),
            "oxford_flowers": (99.42, 82.62, 90.24), "food101": (92.43, 93.68, 93.05),
            "fgvc_aircraft": (49.12, 41.81, 45.17), "sun397": (83.69, 81.54, 82.60),
            "dtd": (85.84, 71.37, 77.94), "eurosat": (97.54, 82.08, 89.14),
            "ucf101": (89.71, 82.27, 86.10)}),
        xd=("PromptKD", {"caltech101": 93.61, "oxford_pets": 91.59, "stanford_cars": 73.93,
                         "oxford_flowers": 75.33, "food101": 88.84, "fgvc_aircraft": 26.24,
                         "sun397": 68.57, "dtd": 55.08, "eurosat": 63.74, "ucf101": 76.39}),
        xd_note="PromptKD: its published transductive cross-dataset accuracy (PromptKD README; "
                "full unlabelled target train sets)"),
    "cocoop": host_average("CoCoOp", (80.47, 71.69, 75.83), "the CoCoOp paper"),
    "kgcoop": host_average("KgCoOp", (80.73, 73.60, 77.00), "KgCoOp's README"),
    "ivlp": host_average("IVLP", (84.21, 71.79, 77.51),
                         "IVLP 4 + 4, depth 9, 20 epochs, in PromptSRC's README"),
    "maple": host_average("MaPLe", (82.28, 75.14, 78.55), "MaPLe's README", "11-dataset result"),
    "promptsrc": host_average("PromptSRC", (84.26, 76.10, 79.97), "PromptSRC's README"),
}

# ----------------------------------------------------------------------------- statistics

# Student's t at 0.975 for 1..30 degrees of freedom (to 6 decimals).
T975 = (12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004, 2.262157,
        2.228139, 2.200985, 2.178813, 2.160369, 2.144787, 2.131450, 2.119905, 2.109816, 2.100922,
        2.093024, 2.085963, 2.079614, 2.073873, 2.068658, 2.063899, 2.059539, 2.055529, 2.051831,
        2.048407, 2.045230, 2.042272)
NORMAL_975 = 1.959963984540054


def t975(df):
    """Student's t quantile at 0.975 for df >= 1 degrees of freedom: the table up to 30, then the
    Cornish-Fisher expansion around the normal quantile (off by less than 1e-7 from 31 on)."""
    if df <= len(T975):
        return T975[df - 1]
    z = NORMAL_975
    terms = ((z**3 + z) / 4, (5 * z**5 + 16 * z**3 + 3 * z) / 96,
             (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384,
             (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160)
    return z + sum(g / df**power for power, g in enumerate(terms, 1))


@dataclass(frozen=True)
class Stat:
    """A metric over seeds: mean, population std, the 95% CI's half-width (None for one seed)."""
    seeds: tuple
    mean: float
    std: float
    ci95: float = None


def spread(seeds, values, mean=None):
    """The Stat of values (one per seed), centred on their mean unless given another."""
    n = len(values)
    ci95 = t975(n - 1) * statistics.stdev(values) / math.sqrt(n) if n > 1 else None
    centre = statistics.fmean(values) if mean is None else mean
    return Stat(tuple(seeds), centre, statistics.pstdev(values), ci95)


def harmonic_mean(base, new):
    return 2 * base * new / (base + new) if base + new > 0 else 0.0


def with_hm(values):
    """A run's metrics; base-to-new adds the HM of its base and new accuracy."""
    if "base" in values:
        return dict(values, hm=harmonic_mean(values["base"], values["new"]))
    return values


def describe(per_seed):
    """{metric: Stat} over the seeds of per_seed {seed: {metric: value}}; hm's mean is the HM of
    the mean base and new."""
    seeds = sorted(per_seed)
    stats = {m: spread(seeds, [per_seed[s][m] for s in seeds]) for m in per_seed[seeds[0]]}
    if "hm" in stats:
        hm = harmonic_mean(stats["base"].mean, stats["new"].mean)
        stats["hm"] = spread(seeds, [per_seed[s]["hm"] for s in seeds], hm)
    return stats


def paired_delta(yes, no):
    """{metric: Stat} of yes - no seed by seed over the seeds both have (hm: the difference of
    their HMs of means, spread as the per-seed differences); None when they share no seed."""
    seeds = sorted(yes.keys() & no.keys())
    if not seeds:
        return None
    means = [describe({s: runs[s] for s in seeds}) for runs in (yes, no)]
    return {m: spread(seeds, [yes[s][m] - no[s][m] for s in seeds],
                      means[0][m].mean - means[1][m].mean) for m in means[0]}


def seed_average(per_seeds):
    """{seed: metrics averaged over the datasets} for the seeds every one of per_seeds (a
    dataset's {seed: metrics}) has."""
    seeds = sorted(set.intersection(*(set(p) for p in per_seeds)))
    linear = [m for m in per_seeds[0][seeds[0]] if m != "hm"] if seeds else []
    return {s: with_hm({m: statistics.fmean(p[s][m] for p in per_seeds) for m in linear})
            for s in seeds}

# ----------------------------------------------------------------------------- reading the runs


@dataclass
class Runs:
    """A table folder's checked runs."""
    root: str
    protocol: str
    values: dict = field(default_factory=dict)  # {(dataset, shots): {seed: {metric: value}}}
    models: dict = field(default_factory=dict)  # {(method, refiner, selection): a results.json}
    titles: dict = field(default_factory=dict)  # {method: the title its runs recorded}
    shots: set = field(default_factory=set)  # what the runs recorded (None: not recorded)

    def add(self, result, path):
        self.models.setdefault((result["method"], result["refiner"], result.get("selection")), path)
        if result.get("title"):
            self.titles.setdefault(result["method"], result["title"])
        self.shots.add(result.get("shots", (result.get("args") or {}).get("shots")))

    @property
    def method(self):
        return next(iter(self.models))[0]

    @property
    def refiner(self):
        return next(iter(self.models))[1]

    @property
    def title(self):
        """The method's class title recorded by train.py, else its --method name."""
        return self.titles.get(self.method, self.method)

    @property
    def selections(self):
        return sorted({s for *_, s in self.models if s})

    def datasets(self):
        return {dataset for dataset, _ in self.values}


def dataset_dirs(root):
    """The <root>/<dataset> folders (files such as report.json are not runs)."""
    return [d for d in sorted(os.listdir(root)) if os.path.isdir(os.path.join(root, d))]


def numbered_dirs(folder, prefix, problems):
    """[(N, <folder>/<prefix><N>)] in order of N; any other entry is added to problems."""
    found = []
    for name in sorted(os.listdir(folder)):
        path, digits = os.path.join(folder, name), name[len(prefix):]
        if name.startswith(prefix) and digits.isdigit() and os.path.isdir(path):
            found.append((int(digits), path))
        else:
            problems.append(f"{path}: unexpected (runs are folders {prefix}<N>); move it out")
    return sorted(found)


def is_percentage(accuracy, images):
    """accuracy: a number in [0, 100], a whole number of the images when their count is known."""
    if type(accuracy) not in (int, float) or not 0 <= accuracy <= 100:
        return False
    correct = accuracy * images / 100 if type(images) is int and images > 0 else 0
    return abs(correct - round(correct)) <= 1e-6


def read_result(path, problems, seed, **expected):
    """A results.json once it is checked to be the test its folder says (dataset, subsample and,
    for few-shot runs, shots), of the folder's seed, a percentage for accuracy; None (and a line
    in problems) otherwise."""
    result = outputs.read_json(path)
    if result is None:
        problems.append(f"{path}: unreadable, or not a results.json (a JSON object); re-run that "
                        f"step or move its folder out")
        return None
    expected = {k: v for k, v in dict(expected, split="test").items() if v is not None}
    wrong = {key: result.get(key) for key in outputs.results_match(result, **expected)}
    if wrong:
        problems.append(f"{path}: holds {wrong}, but its folder is for {expected}; move the file "
                        f"to its place or re-run that step")
    elif not is_percentage(result.get("accuracy"), result.get("num_images")):
        of = f" of its {result['num_images']} images" if "num_images" in result else ""
        problems.append(f"{path}: accuracy is {result.get('accuracy')!r}, expected a number: a "
                        f"percentage in [0, 100]{of}; re-run that step")
    elif outputs.results_match(result, seed=seed):
        problems.append(f"{path}: a run of seed {(result.get('args') or {}).get('seed')} in the "
                        f"folder of seed {seed}; move it to its place")
    else:
        result.setdefault("method", "coop")
        result.setdefault("refiner", not (result.get("args") or {}).get("no_refiner", False))
        return result
    return None


def read_base2new(runs, folder, dataset, seed, problems):
    """base and new accuracy from <folder>/{base,new}/results.json, new/ checked to be evaluated
    from the model base/ tested; None while unfinished."""
    paths = {part: os.path.join(folder, part, "results.json") for part in ("base", "new")}
    if not all(map(os.path.isfile, paths.values())):
        if os.path.isdir(os.path.join(folder, "base")):
            missing = " and no ".join(p for p in paths.values() if not os.path.isfile(p))
            print(f"note: {folder} is unfinished (no {missing}); left out", file=sys.stderr)
        return None
    base, new = (read_result(paths[p], problems, seed, dataset=dataset, subsample=p) for p in paths)
    if not (base and new):
        return None
    model = {key: base.get(key) for key in ("method", "refiner", "checkpoint_sha256")}
    if differs := outputs.results_match(new, **model):
        problems.append(f"{paths['new']}: evaluated from another model than {paths['base']} "
                        f"tested (its {differs[0]} differs); re-run make base2new (it re-evaluates "
                        f"new/) or move the folder out")
        return None
    runs.add(base, paths["base"])
    return with_hm(dict(base=base["accuracy"], new=new["accuracy"]))


def read_runs(root, protocol, problems):
    """Every finished run under a table folder of `protocol`, checked; problems gets a line per
    problem found."""
    runs = Runs(root, protocol)
    for dataset in dataset_dirs(root):
        folder = os.path.join(root, dataset)
        by_shots = [(None, folder)]
        if protocol == "fewshot":
            by_shots = numbered_dirs(folder, "shots", problems)
        for shots, where in by_shots:
            for seed, path in numbered_dirs(where, "seed", problems):
                if protocol == "base2new":
                    values = read_base2new(runs, path, dataset, seed, problems)
                else:
                    values = read_other(runs, path, dataset, shots, seed, problems)
                if values:
                    runs.values.setdefault((dataset, shots), {})[seed] = values
    return runs


def read_other(runs, folder, dataset, shots, seed, problems):
    """The accuracy of an xd or few-shot run (every class tested); None while unfinished."""
    path = os.path.join(folder, "results.json")
    if not os.path.isfile(path):
        return None
    result = read_result(path, problems, seed, dataset=dataset, subsample="all", shots=shots)
    if result is None:
        return None
    runs.add(result, path)
    return dict(accuracy=result["accuracy"])


def protocol_of(root):
    """A table folder's protocol: its name when it is one, else what its layout says."""
    name = os.path.basename(os.path.normpath(root))
    if name in PROTOCOLS:
        return name
    for dataset in dataset_dirs(root):
        for entry in sorted(os.listdir(os.path.join(root, dataset))):
            if entry.startswith("shots"):
                return "fewshot"
            if os.path.isdir(os.path.join(root, dataset, entry, "base")):
                return "base2new"
    return "xd"


NO_RUNS = "no finished runs (<dataset>/seed<S>/results.json)"


def checked_runs(root, problems):
    """read_runs of a table folder, then what makes it no table: several methods, or base2new or
    xd runs of several shot counts (a folder without a finished run has empty runs.values)."""
    runs = read_runs(root, protocol_of(root), problems)
    if len({(method, refiner) for method, refiner, _ in runs.models}) > 1:
        mixed = ", ".join(f"{m}{'' if refiner else ' without TextRefiner'}: {p}"
                          for (m, refiner, _), p in sorted(runs.models.items(), key=str))
        problems.append(f"{root} mixes methods ({mixed}); one table per method: move one method's "
                        f"runs elsewhere")
    if len(runs.shots - {None}) > 1 and runs.protocol != "fewshot":
        problems.append(f"{root} mixes runs of {sorted(runs.shots - {None})} shots; one table per "
                        f"shot count: move one elsewhere")
    return runs

# ----------------------------------------------------------------------------- one table


# Report cells: a mean right-aligned in MEAN_W characters, then "±std" in STD_W + 1 (blank when
# there is no std); column headings are right-aligned over the means with the same widths.
MEAN_W, STD_W, GAP = 8, 5, "  "


def value_cell(mean, std=None, with_std=True):
    spread = "" if not with_std else f"±{std:<{STD_W}.2f}" if std is not None else " " * (STD_W + 1)
    return f"{mean:>{MEAN_W}.2f}" + spread


def heading_cell(name, with_std=True):
    return f"{name:>{MEAN_W}}" + (" " * (STD_W + 1) if with_std else "")


def format_table(rows):
    """rows: [label, seeds, *cells], the heading row first; the two text columns as wide as their
    longest entry."""
    label_w, seeds_w = (max(len(r[i]) for r in rows) for i in (0, 1))
    return [GAP.join([r[0].ljust(label_w), r[1].ljust(seeds_w), *r[2:]]).rstrip() for r in rows]


def published_cells(numbers):
    """Cells of a published (base, new, HM) row; blanks where there is none."""
    if numbers is None:
        return [" " * MEAN_W] * 3
    return [value_cell(v, with_std=False) for v in numbers]


def published_average(published, datasets):
    """(base, new, HM) of published per-dataset numbers averaged over `datasets`, as ours is."""
    base = statistics.fmean(published[d][0] for d in datasets)
    new = statistics.fmean(published[d][1] for d in datasets)
    return base, new, harmonic_mean(base, new)


def dataset_order(datasets):
    """The papers' order (ImageNet, its variants, the other 10), then any other name."""
    known = ["imagenet", *XD_TARGETS]
    return [d for d in known if d in datasets] + sorted(d for d in datasets if d not in known)


def shots_text(k):
    return f"{k} shot" if k == 1 else f"{k} shots"


def paper_name(dataset):
    return DATASETS[dataset].paper_name or dataset if dataset in DATASETS else dataset


def average_label(present, total):
    return "Average" if present == total else f"Average ({present}/{total})"


def summarise_base2new(runs):
    """Per dataset: mean and std over seeds of base and new accuracy, and HM of the means; the
    average row is the mean over the paper's datasets present, HM of those means (how the papers'
    tables compute it)."""
    rows = {}
    for (dataset, _), per_seed in runs.values.items():
        stats = describe(per_seed)
        rows[dataset] = dict(seeds=sorted(per_seed), base=stats["base"].mean,
                             new=stats["new"].mean, hm=stats["hm"].mean,
                             base_std=stats["base"].std, new_std=stats["new"].std)
    paper = [d for d in PAPER_DATASETS if d in rows]
    average = None
    if paper:
        base, new = (statistics.fmean(rows[d][key] for d in paper) for key in ("base", "new"))
        average = dict(datasets=paper, base=base, new=new, hm=harmonic_mean(base, new))
    return dict(datasets=rows, average=average)


def summarise_xd(runs):
    """Per target (ImageNet, its variants, then the others): mean and std over seeds."""
    stats = {d: describe(per_seed)["accuracy"] for (d, _), per_seed in runs.values.items()}
    return {t: dict(seeds=list(stats[t].seeds), accuracy=stats[t].mean, std=stats[t].std)
            for t in dataset_order(stats)}


def summarise_fewshot(runs):
    """Per dataset and number of shots: mean and std over seeds; per number of shots the average
    over the paper's datasets present."""
    rows, average = {}, {}
    for (dataset, shots), per_seed in sorted(runs.values.items()):
        stat = describe(per_seed)["accuracy"]
        rows.setdefault(dataset, {})[str(shots)] = dict(seeds=list(stat.seeds), accuracy=stat.mean,
                                                        std=stat.std)
    for shots in sorted({k for _, k in runs.values}):
        paper = [d for d in PAPER_DATASETS if str(shots) in rows.get(d, {})]
        if paper:
            accuracy = statistics.fmean(rows[d][str(shots)]["accuracy"] for d in paper)
            average[str(shots)] = dict(datasets=paper, accuracy=accuracy)
    return dict(datasets={d: rows[d] for d in dataset_order(rows)}, average=average)


def format_base2new(summary, title, published):
    """The paper's table; a method's published per-dataset numbers sit beside ours."""
    rows, average = summary["datasets"], summary["average"]
    tag, beside = published.get("base2new_datasets", (None, None))
    headings = [heading_cell("Base"), heading_cell("New"), heading_cell("HM", with_std=False)]
    theirs = [heading_cell(f"{tag} {h}", False) for h in ("Base", "New", "HM")] if beside else []
    table = [["Dataset", "Seeds", *headings, *theirs]]
    if average:
        theirs = published_cells(published_average(beside, average["datasets"])) if beside else []
        table.append([average_label(len(average["datasets"]), len(PAPER_DATASETS)), "",
                      value_cell(average["base"]), value_cell(average["new"]),
                      value_cell(average["hm"], with_std=False), *theirs])
    others = sorted(d for d in rows if d not in PAPER_DATASETS)
    for d in [d for d in PAPER_DATASETS if d in rows] + others:
        r, theirs = rows[d], published_cells(beside.get(d)) if beside else []
        table.append([paper_name(d), ",".join(map(str, r["seeds"])),
                      value_cell(r["base"], r["base_std"]), value_cell(r["new"], r["new_std"]),
                      value_cell(r["hm"], with_std=False), *theirs])
    averages = [[name, "", value_cell(b), value_cell(n), value_cell(h, with_std=False)]
                for name, (b, n, h) in published.get("base2new", {}).items()]
    lines = format_table(table + averages)
    note = [published["note"]] if averages else []
    return "\n".join([title, *lines[:len(table)], *note, *lines[len(table):]])


def format_xd(summary, title, published):
    """One accuracy per target; a method's published cross-dataset numbers beside ours."""
    tag, beside = published.get("xd", (None, None))
    theirs = [heading_cell(tag, False)] if beside else []
    table = [["Dataset", "Seeds", heading_cell("Accuracy"), *theirs]]
    for t, r in summary.items():
        theirs = value_cell(beside[t], with_std=False) if t in (beside or {}) else " " * MEAN_W
        table.append([t, ",".join(map(str, r["seeds"])), value_cell(r["accuracy"], r["std"])]
                     + ([theirs] if beside else []))
    return "\n".join([title, *format_table(table)] + ([published["xd_note"]] if beside else []))


def format_fewshot(summary, title):
    """Accuracy per dataset (rows) and number of shots (columns)."""
    shots = sorted({int(k) for r in summary["datasets"].values() for k in r})
    table = [["Dataset", "Seeds", *(heading_cell(shots_text(k)) for k in shots)]]
    if summary["average"]:
        present = max(len(a["datasets"]) for a in summary["average"].values())
        table.append([average_label(present, len(PAPER_DATASETS)), "",
                      *(value_cell(summary["average"][str(k)]["accuracy"])
                        if str(k) in summary["average"] else " " * MEAN_W for k in shots)])
    for dataset, r in summary["datasets"].items():
        seeds = sorted({s for cell in r.values() for s in cell["seeds"]})
        table.append([paper_name(dataset), ",".join(map(str, seeds)),
                      *(value_cell(r[str(k)]["accuracy"], r[str(k)]["std"])
                        if str(k) in r else " " * MEAN_W for k in shots)])
    return "\n".join([title, *format_table(table)])


def table_text(runs):
    """(summary, its printed table) of a checked table folder."""
    name = f"{runs.title} + TextRefiner" if runs.refiner else runs.title
    selection = "; ".join(f"{s} ({outputs.SELECTIONS.get(s, s)})" for s in runs.selections)
    how = "mean±std over seeds"
    if runs.protocol == "base2new":
        how += "; HM of the mean base and new"
    title = (f"{name}: {TITLES[runs.protocol]} in {runs.root} ({how})\n"
             f"Model selection: {selection or 'not recorded'}")
    published = PUBLISHED.get(runs.method, {})
    if runs.protocol == "base2new":
        summary = summarise_base2new(runs)
        text = format_base2new(summary, title, published)
    elif runs.protocol == "xd":
        summary = summarise_xd(runs)
        text = format_xd(summary, title, published)
    else:
        summary = summarise_fewshot(runs)
        text = format_fewshot(summary, title)
    if runs.protocol != "xd":
        summary.update(method=runs.method, refiner=runs.refiner, selection=runs.selections)
    return summary, text
