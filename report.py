"""The report of finished runs, from their results.json files alone (no torch: it takes a fraction
of a second): each table beside the published numbers and, over a whole output folder, every
method beside itself with TextRefiner, with 95% confidence intervals, as text, CSV, Markdown,
LaTeX (booktabs) and a chart (Pillow).

    python report.py output                  # every output/<method>[-plain]/<protocol>: its table,
                                             # then the side-by-side tables, also written to
                                             # output/report.csv, .md, .tex and .png
    python report.py output/coop/base2new    # one table (and its report.json)

Any problem in any results.json (results.py checks them) is printed on its own line and no report
is made. <m> and <m>-plain (make ... REFINER=0) are one method without and with TextRefiner; Δ =
with - without, paired seed by seed over the seeds both have. A side-by-side average row averages,
seed by seed over the seeds they all have, the paper's datasets (base2new, fewshot: the 11; xd:
the 10 targets besides ImageNet) that every variant of the method has. Statistics: results.py.
"""
import argparse
import csv
import io
import itertools
import json
import math
import os
import sys
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

import outputs
from catalog import UserError
from results import (AVERAGED, GAP, METRICS, NO_RUNS, PROTOCOLS, PUBLISHED, TITLES, Stat,
                     checked_runs, dataset_order, describe, paired_delta, paper_name, seed_average,
                     shots_text, table_text)

# ----------------------------------------------------------------------------- one table


def write_summary(summary, root):
    """<root>/report.json; a report of the same runs changes no file."""
    path, old = os.path.join(root, "report.json"), None
    if os.path.exists(path):
        with open(path) as f:
            old = f.read()
    if old != json.dumps(summary, indent=2):
        outputs.write_json(summary, path, shared=True)  # runs of one table may report at once


def refuse(problems, what):
    print("\n".join(problems), file=sys.stderr)
    raise UserError(f"report {what}: {len(problems)} problem(s) above; no report made")


def report_folder(root):
    """Print one table folder's table and write its report.json -> the summary. Every problem
    found is printed on its own line and no report is made (UserError)."""
    if not os.path.isdir(root):
        raise UserError(f"report {root!r}: not a directory")
    problems = []
    runs = checked_runs(root, problems)
    if problems:
        refuse(problems, root)
    if not runs.values:
        raise UserError(f"report {root}: {NO_RUNS}")
    summary, text = table_text(runs)
    print(text)
    write_summary(summary, root)
    return summary

# ----------------------------------------------------------------------------- side by side


@dataclass
class Line:
    """A row of a side-by-side table: one method on a dataset (or "average")."""
    dataset: str
    group: str  # the method's folder name: <m> of <m> and <m>-plain
    kind: str  # "no" (the host), "yes" (with TextRefiner) or "delta"
    label: str
    cells: dict  # {column: Stat}; column: a metric, or for fewshot the number of shots
    method: str = None  # the --method its runs recorded
    shots: int = None  # base2new, xd: the shots its runs recorded (None: several, or unknown)
    averaged: tuple = ()  # an average row: how many datasets each column averages


def columns(protocol, by_shots, stats_of):
    """{column: Stat} from {shots: per_seed} (or pairs of them for Δ) through stats_of."""
    cells = {}
    for shots, per_seed in sorted(by_shots.items(), key=lambda item: str(item[0])):
        stats = stats_of(per_seed)
        if stats and protocol == "fewshot":
            cells[shots] = stats["accuracy"]
        elif stats:
            cells.update(stats)
    return cells


def averages(protocol, variants):
    """{kind: {shots: per_seed}} of a method's average rows, and {shots: datasets averaged}: per
    number of shots, the averaged datasets every variant has."""
    found = {kind: runs.values for kind, runs in variants.items()}
    out, counts = {kind: {} for kind in found}, {}
    for shots in sorted({k for values in found.values() for _, k in values}, key=str):
        among = [d for d in AVERAGED[protocol] if all((d, shots) in v for v in found.values())]
        if not among:  # e.g. xd targets that are ImageNet variants only: no average row
            continue
        per_kind = {kind: seed_average([v[(d, shots)] for d in among]) for kind, v in found.items()}
        if all(per_kind.values()):
            counts[shots] = len(among)
            for kind, per_seed in per_kind.items():
                out[kind][shots] = per_seed
    return out, counts


def method_lines(protocol, dataset, group, variants):
    """The lines of one method on a dataset: host, with TextRefiner, Δ (those it has)."""
    first = next(iter(variants.values()))  # the variants share their method
    name = first.title if group == first.method else f"{first.title} ({group})"
    labels = dict(no=name, yes=f"{name} + TextRefiner", delta="Δ TextRefiner")
    counts = {}
    if dataset == "average":
        series, counts = averages(protocol, variants)
    else:
        series = {kind: {k: per_seed for (d, k), per_seed in runs.values.items() if d == dataset}
                  for kind, runs in variants.items()}
    shots = set().union(*(runs.shots for runs in variants.values()))
    common = dict(method=first.method, averaged=tuple(counts.values()),
                  shots=next(iter(shots)) if len(shots) == 1 else None)
    lines = [Line(dataset, group, kind, labels[kind], columns(protocol, series[kind], describe),
                  **common) for kind in ("no", "yes") if series.get(kind)]
    if len(lines) == 2:
        both = series["yes"].keys() & series["no"].keys()
        pairs = {k: (series["yes"][k], series["no"][k]) for k in both}
        cells = columns(protocol, pairs, lambda pair: paired_delta(*pair))
        lines.append(Line(dataset, group, "delta", labels["delta"], cells, **common))
    return [line for line in lines if line.cells]


def comparison(protocol, groups):
    """Every line of a protocol's side-by-side table, in its order: the average, then each dataset;
    per dataset the methods by folder name."""
    datasets = dataset_order({d for variants in groups.values() for runs in variants.values()
                              for d in runs.datasets()})
    return [line for dataset in ["average", *datasets] for group in sorted(groups)
            for line in method_lines(protocol, dataset, group, groups[group])]


def pair_folders(tables, problems):
    """{protocol: {group: {"no" | "yes": Runs}}}: <m>/ and <m>-plain/ are one group, which must hold
    one method, once with TextRefiner and once without."""
    groups = {}
    for runs in tables:
        name = os.path.basename(os.path.dirname(os.path.normpath(runs.root)))
        group = name.removesuffix("-plain")
        variants = groups.setdefault(runs.protocol, {}).setdefault(group, {})
        kind = "yes" if runs.refiner else "no"
        if name.endswith("-plain") and runs.refiner:
            problems.append(f"{runs.root}: runs with TextRefiner in a -plain folder (the method "
                            f"without it: make ... REFINER=0); move them to {group}/")
        elif kind in variants:
            problems.append(f"{variants[kind].root} and {runs.root} both hold {runs.title} "
                            f"{'with' if runs.refiner else 'without'} TextRefiner; rename one")
        elif variants and next(iter(variants.values())).method != runs.method:
            other = next(iter(variants.values()))
            problems.append(f"{other.root} and {runs.root} hold different methods ({other.method}, "
                            f"{runs.method}); {group}-plain is {group} without TextRefiner")
        else:
            variants[kind] = runs
    return groups

# ----------------------------------------------------------------------------- the files


@dataclass
class Row:
    """A rendered row: its method label, seeds and a cell per column (a Stat, a published number,
    or None)."""
    label: str
    seeds: str
    cells: list
    signed: bool = False  # Δ: numbers with their sign


def published_rows(protocol, dataset, methods):
    """The published numbers of `methods` on `dataset` (or the average), as rows; their notes."""
    rows, notes = [], []
    for method in methods:
        published = PUBLISHED.get(method, {})
        found = []
        if protocol == "base2new" and dataset == "average":
            found += list(published.get("base2new", {}).items())
        beside = {"base2new": "base2new_datasets", "xd": "xd"}.get(protocol)
        tag, numbers = published.get(beside, (None, {}))
        if dataset in numbers:
            found.append((tag, numbers[dataset]))
        for name, values in found:
            values = values if isinstance(values, tuple) else (values,)
            rows.append(Row(f"{name} (published)", "", list(values)))
        if found:
            notes.append(published["note" if protocol == "base2new" else "xd_note"].rstrip(":"))
    return rows, notes


def grid(protocol, lines):
    """(header, [(block label, [Row])], notes) of a protocol's side-by-side table: a block per
    dataset, the average first."""
    columns = list(METRICS[protocol])
    names = [name.capitalize() if name != "hm" else "HM" for name in columns]
    if protocol == "fewshot":
        columns = sorted({k for line in lines for k in line.cells})
        names = [shots_text(k) for k in columns]
    blocks, notes = [], []
    for dataset, block in itertools.groupby(lines, key=lambda line: line.dataset):
        rows, methods = [], []
        for line in block:
            seeds = sorted({s for stat in line.cells.values() for s in stat.seeds})
            label = line.label + averaged_text(line.averaged, len(AVERAGED[protocol]))
            rows.append(Row(label, ",".join(map(str, seeds)),
                            [line.cells.get(c) for c in columns], line.kind == "delta"))
            if line.method not in methods:
                methods.append(line.method)
        published, found = published_rows(protocol, dataset, methods)
        notes += [note for note in found if note not in notes]
        label = "Average" if dataset == "average" else paper_name(dataset)
        blocks.append((label, rows + published))
    return ["Dataset", "Method", "Seeds", *names], blocks, notes


def averaged_text(counts, total):
    """" (k/total)" after an average row's label when it averages fewer than all `total` datasets
    of its protocol (11; 10 for xd, whose ImageNet is the source)."""
    if not counts or min(counts) == total:
        return ""
    k = str(min(counts)) if min(counts) == max(counts) else f"{min(counts)}-{max(counts)}"
    return f" ({k}/{total})"


def number(cell, signed=False, latex=False):
    """A cell's text: mean±std [CI half-width], or a published number."""
    if cell is None:
        return ""
    if not isinstance(cell, Stat):
        return f"{cell:.2f}"
    mean = f"{cell.mean:+.2f}" if signed else f"{cell.mean:.2f}"
    ci = "" if cell.ci95 is None else f" [{cell.ci95:.2f}]"
    if latex:
        return f"${mean} \\pm {cell.std:.2f}${ci}"
    return f"{mean}±{cell.std:.2f}{ci}"


def table_rows(blocks, latex=False):
    """[(first row of its block, [dataset, method, seeds, *cells])]"""
    escape = tex if latex else str
    return [(i == 0, [escape(label) if i == 0 else "", escape(row.label), row.seeds,
                      *(number(c, row.signed, latex) for c in row.cells)])
            for label, block in blocks for i, row in enumerate(block)]


def text_table(title, header, blocks, notes):
    rows = [header] + [cells for _, cells in table_rows(blocks)]
    widths = [max(len(row[j]) for row in rows) for j in range(len(header))]
    lines = [GAP.join(cell.ljust(w) if j < 3 else cell.rjust(w)
                      for j, (cell, w) in enumerate(zip(row, widths))).rstrip() for row in rows]
    return "\n".join([title, *lines, *notes])


def markdown_table(title, header, blocks, notes):
    def line(cells):
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"
    rows = [line(header), line(["---"] * 3 + ["---:"] * (len(header) - 3))]
    return "\n".join([f"**{title}**", "", *rows, *(line(c) for _, c in table_rows(blocks)), "",
                      *(f"{note}." for note in notes)])


TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
       "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
       "Δ": r"$\Delta$", "±": r"$\pm$"}


def tex(text):
    return "".join(TEX.get(c, c) for c in text)


def latex_table(title, header, blocks, notes):
    """A booktabs tabular; the title and notes as comments above it."""
    out = [f"% {title}", *(f"% {note}." for note in notes),
           f"\\begin{{tabular}}{{lll{'r' * (len(header) - 3)}}}", r"\toprule",
           " & ".join(map(tex, header)) + r" \\", r"\midrule"]
    for i, (first, cells) in enumerate(table_rows(blocks, latex=True)):
        if first and i > 0:
            out.append(r"\midrule")
        out.append(" & ".join(cells) + r" \\")
    return "\n".join([*out, r"\bottomrule", r"\end{tabular}"])


CSV_COLUMNS = ("protocol", "method", "refiner", "dataset", "shots", "metric", "seeds", "mean",
               "std", "ci95")


def csv_rows(protocol, lines):
    """report.csv's rows of a protocol: one per line and column, means and spreads to 4 decimals."""
    for line in lines:
        for column, stat in line.cells.items():
            shots, metric = (column, "accuracy") if protocol == "fewshot" else (line.shots, column)
            ci95 = "" if stat.ci95 is None else f"{stat.ci95:.4f}"
            yield [protocol, line.group, line.kind, line.dataset, "" if shots is None else shots,
                   metric, " ".join(map(str, stat.seeds)), f"{stat.mean:.4f}", f"{stat.std:.4f}",
                   ci95]


def chart_panel(protocol, lines, output):
    """The chart's panel of a protocol: bars per dataset (base2new: HM; xd: accuracy) for each
    method with and without TextRefiner and the published numbers; fewshot: the average accuracy
    against the shots, a line each."""
    groups = sorted({line.group for line in lines})
    series = {}
    for line in lines:
        if line.kind == "delta":
            continue
        key = (line.label, groups.index(line.group), line.kind)
        column = "hm" if protocol == "base2new" else "accuracy"
        for k, stat in line.cells.items():
            if protocol == "fewshot" and line.dataset == "average":
                series.setdefault(key, {})[k] = (stat.mean, stat.ci95)
            elif protocol != "fewshot" and k == column:
                series.setdefault(key, {})[line.dataset] = (stat.mean, stat.ci95)
    title = f"{protocol}: {TITLES[protocol]} in {output}"
    if not series:  # few-shot runs with no seed every dataset has: no average to draw
        return None
    if protocol == "fewshot":
        title = f"{title}, the average over datasets"
        return Panel("lines", title, sorted({k for s in series.values() for k in s}), series)
    for dataset, block in itertools.groupby(lines, key=lambda line: line.dataset):
        methods = list(dict.fromkeys(line.method for line in block))
        for row in published_rows(protocol, dataset, methods)[0]:
            series.setdefault((row.label, None, "published"), {})[dataset] = (row.cells[-1], None)
    categories = list(dict.fromkeys(line.dataset for line in lines))
    names = ["Average" if d == "average" else paper_name(d) for d in categories]
    return Panel("bars", f"{title} ({'HM' if protocol == 'base2new' else 'accuracy'})",
                 list(zip(categories, names)), series)


# ----------------------------------------------------------------------------- the chart

# (host, host + TextRefiner) colours of the methods in turn; published numbers in greys.
COLOURS = (("#9ecae1", "#2171b5"), ("#fdae6b", "#d94801"), ("#a1d99b", "#238b45"),
           ("#bcbddc", "#6a51a3"), ("#fa9fb5", "#c51b8a"))
GREYS = ("#bdbdbd", "#8c8c8c", "#5a5a5a")
PLOT_H, MARGIN, TITLE_H, LABELS_H, LEGEND_H = 260, 56, 34, 30, 22


@dataclass
class Panel:
    """A protocol's part of the chart: bars per category, or lines over the numbers of shots."""
    kind: str  # "bars" or "lines"
    title: str
    xs: list  # bars: [(category, its label)]; lines: the numbers of shots
    series: dict  # {(label, method index or None: published, kind): {x: (mean, ci95 or None)}}

    def colour(self, key):
        _, index, kind = key
        if index is None:
            published = [k for k in self.series if k[1] is None]
            return GREYS[published.index(key) % len(GREYS)]
        return COLOURS[index % len(COLOURS)][kind == "yes"]

    def width(self):
        return 2 * MARGIN + len(self.xs) * max(86, 12 + 10 * len(self.series))

    def legend(self, width, font):
        """[(x, row, key)] of the legend entries, in rows within width."""
        placed, x, row = [], MARGIN, 0
        for key in self.series:
            entry = 22 + font.getlength(key[0]) + 18
            if x + entry > width - MARGIN and x > MARGIN:
                x, row = MARGIN, row + 1
            placed.append((x, row, key))
            x += entry
        return placed


def draw(panels):
    """The chart: the panels one under another, each titled, with its axis and legend."""
    font = ImageFont.load_default(size=13)
    if not panels:
        image = Image.new("RGB", (900, 40), "white")
        ImageDraw.Draw(image).text((MARGIN, 12), "nothing to draw", fill="black", font=font)
        return image
    width = max(900, *(panel.width() for panel in panels))
    legends = [panel.legend(width, font) for panel in panels]
    heights = [TITLE_H + PLOT_H + LABELS_H + LEGEND_H * (1 + max((r for _, r, _ in legend),
                                                                 default=0)) + 16
               for legend in legends]
    image = Image.new("RGB", (width, sum(heights)), "white")
    canvas, top = ImageDraw.Draw(image), 0
    for panel, legend, height in zip(panels, legends, heights):
        canvas.text((MARGIN, top + 8), panel.title, fill="black", font=font)
        box = (MARGIN, top + TITLE_H, width - MARGIN // 2, top + TITLE_H + PLOT_H)
        (draw_bars if panel.kind == "bars" else draw_lines)(canvas, panel, box, font)
        for x, row, key in legend:
            y = box[3] + LABELS_H + row * LEGEND_H
            canvas.rectangle([x, y + 2, x + 14, y + 14], fill=panel.colour(key))
            canvas.text((x + 20, y), key[0], fill="black", font=font)
        top += height
    return image


def axis(canvas, box, low, high, font):
    """Gridlines and their labels every tenth (or fifth) of [low, high] -> value to y."""
    left, top, right, bottom = box

    def y(value):
        return bottom - (min(max(value, low), high) - low) / (high - low) * (bottom - top)
    step = 20 if high - low > 50 else 10 if high - low > 20 else 5
    for value in range(int(low), int(high) + 1, step):
        canvas.line([left, y(value), right, y(value)], fill="#e0e0e0")
        canvas.text((left - 8, y(value)), str(value), fill="black", font=font, anchor="rm")
    canvas.line([left, top, left, bottom], fill="black")
    return y


def whisker(canvas, x, mean, ci95, y):
    if ci95:
        canvas.line([x, y(mean - ci95), x, y(mean + ci95)], fill="black")
        canvas.line([x - 3, y(mean + ci95), x + 3, y(mean + ci95)], fill="black")
        canvas.line([x - 3, y(mean - ci95), x + 3, y(mean - ci95)], fill="black")


def draw_bars(canvas, panel, box, font):
    """A group of bars per category (from 0 to 100), the CI as a whisker."""
    y = axis(canvas, box, 0, 100, font)
    slot = (box[2] - box[0]) / len(panel.xs)
    bar = (slot - 12) / len(panel.series)
    for c, (category, name) in enumerate(panel.xs):
        for i, (key, points) in enumerate(panel.series.items()):
            if category in points:
                mean, ci95 = points[category]
                x = box[0] + c * slot + 6 + i * bar
                canvas.rectangle([x, y(mean), x + max(bar - 2, 1), box[3]], fill=panel.colour(key))
                whisker(canvas, x + bar / 2 - 1, mean, ci95, y)
        canvas.text((box[0] + (c + 0.5) * slot, box[3] + 6), name, fill="black", font=font,
                    anchor="ma")


def draw_lines(canvas, panel, box, font):
    """Accuracy against the numbers of shots (a log scale, as CoOp's figure), a line per method."""
    values = [m + sign * (ci or 0) for p in panel.series.values() for m, ci in p.values()
              for sign in (-1, 1)]
    low, high = max(0, (min(values) // 10) * 10), min(100, (max(values) // 10 + 1) * 10)
    y = axis(canvas, box, low, high, font)
    steps = [math.log2(k) for k in panel.xs]
    span = (max(steps) - min(steps)) or 1

    def x(k):
        return box[0] + 30 + (steps[panel.xs.index(k)] - min(steps)) / span * (box[2] - box[0] - 60)
    for k in panel.xs:
        canvas.text((x(k), box[3] + 6), shots_text(k), fill="black", font=font, anchor="ma")
    for key, points in panel.series.items():
        shots = sorted(points)
        canvas.line([(x(k), y(points[k][0])) for k in shots], fill=panel.colour(key), width=3)
        for k in shots:
            whisker(canvas, x(k), *points[k], y)
            canvas.ellipse([x(k) - 4, y(points[k][0]) - 4, x(k) + 4, y(points[k][0]) + 4],
                           fill=panel.colour(key))

# ----------------------------------------------------------------------------- the command


SIDE_BY_SIDE = ("mean±std over seeds [95% CI half-width]; Δ = with - without TextRefiner, paired "
                "seed by seed")


def report_output(output):
    """Every table folder <output>/<m>/<protocol>: its table and report.json, then per protocol the
    methods side by side, written to <output>/report.{csv,md,tex,png}. A folder with no finished
    run yet is left out (a note); any other problem in any folder: each printed on its own line,
    no report made (UserError)."""
    names = sorted(os.listdir(output)) if os.path.isdir(output) else []
    folders = [os.path.join(output, name, protocol) for name in names for protocol in PROTOCOLS
               if os.path.isdir(os.path.join(output, name, protocol))]
    if not folders:
        raise UserError(f"nothing to report: no {output}/<method>/base2new, xd or fewshot (make "
                        f"report OUTPUT=...)")
    problems, tables = [], []
    for folder in folders:
        found = len(problems)
        runs = checked_runs(folder, problems)
        if len(problems) == found and not runs.values:  # e.g. its first job failed: no table yet
            print(f"note: {folder} has {NO_RUNS}; left out", file=sys.stderr)
            continue
        tables.append(runs)
    if not (tables or problems):
        raise UserError(f"nothing to report: no finished run under {output}")
    groups = {} if problems else pair_folders(tables, problems)
    if problems:
        refuse(problems, output)
    printed = []
    for runs in tables:
        summary, text = table_text(runs)
        write_summary(summary, runs.root)
        printed.append((text, "```\n" + text + "\n```"))
    rows, latex, panels = [CSV_COLUMNS], [], []
    for protocol in (p for p in PROTOCOLS if p in groups):
        lines = comparison(protocol, groups[protocol])
        table = (f"Side by side, {protocol}: {TITLES[protocol]} in {output} ({SIDE_BY_SIDE})",
                 *grid(protocol, lines))
        printed.append((text_table(*table), markdown_table(*table)))
        latex.append(latex_table(*table))
        rows += csv_rows(protocol, lines)
        panels.append(chart_panel(protocol, lines, output))
    print("\n\n".join(text for text, _ in printed))
    write_files(output, rows, [md for _, md in printed], latex, [p for p in panels if p])


def write_files(output, rows, markdown, latex, panels):
    """report.csv, report.md, report.tex and report.png under output, each written atomically."""
    table = io.StringIO()
    csv.writer(table, lineterminator="\n").writerows(rows)
    texts = {"report.csv": table.getvalue(), "report.md": "\n\n".join(markdown) + "\n",
             "report.tex": "% needs \\usepackage{booktabs}\n\n" + "\n\n".join(latex) + "\n"}
    for name, text in texts.items():
        outputs.replace_atomically(os.path.join(output, name), lambda f: f.write(text.encode()))
    image = draw(panels)
    outputs.replace_atomically(os.path.join(output, "report.png"), lambda f: image.save(f, "PNG"))
    print(f"wrote {', '.join(os.path.join(output, name) for name in [*texts, 'report.png'])}")


def main(argv=None):
    p = argparse.ArgumentParser(description="Report finished runs: one table folder "
                                            "(<runs>/<protocol>), or every one under an output "
                                            "folder side by side, with report.{csv,md,tex,png}.")
    p.add_argument("path", help="an output folder (make's OUTPUT), or a table folder such as "
                                "output/coop/base2new")
    args = p.parse_args(argv)
    try:
        if os.path.basename(os.path.normpath(args.path)) in PROTOCOLS:
            return report_folder(args.path)
        return report_output(args.path)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
