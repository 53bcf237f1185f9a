"""report.py and results.py: the statistics (Student's t quantiles, population std, 95% CIs, paired
differences) recomputed here from the results.json files, the side-by-side files make report writes
(report.csv, .md, .tex, .png), the refusals, and a report that never imports torch."""
import csv
import math
import os
import shutil
import statistics
import subprocess
import sys

import pytest
from PIL import Image

import report
import results
from helpers import REPO, write_result

# Student's t at 0.975 as printed in statistics tables (3 decimals)
T_TABLE = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 10: 2.228, 20: 2.086, 30: 2.042, 40: 2.021,
           60: 2.000, 120: 1.980, 1000: 1.962}


def t_density(x, df):
    return math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi) * (
        1 + x * x / df) ** (-(df + 1) / 2)


def t_mass(q, df, steps=2000):
    """P(0 < T < q) by Simpson's rule on the density."""
    h = q / steps
    inner = sum((4 if i % 2 else 2) * t_density(i * h, df) for i in range(1, steps))
    return h / 3 * (t_density(0, df) + inner + t_density(q, df))


def test_student_t_quantiles():
    """The 0.975 quantile holds 97.5% of the t distribution below it (the density integrated), for
    the table's degrees of freedom and the expansion's beyond; and matches a printed t table."""
    for df in [*range(1, 41), 60, 120, 500]:
        assert t_mass(results.t975(df), df) == pytest.approx(0.475, abs=2e-6), df
    for df, t in T_TABLE.items():
        assert round(results.t975(df), 3) == t


def stats(values):
    """(mean, population std, 95% CI half-width or None) of per-seed values."""
    n = len(values)
    ci = results.t975(n - 1) * statistics.stdev(values) / math.sqrt(n) if n > 1 else None
    return statistics.fmean(values), statistics.pstdev(values), ci


def hm(base, new):
    return 2 * base * new / (base + new)


def expected_rows(runs):
    """{(method, refiner, dataset, metric): (seeds, mean, std, ci)} of coop's base-to-new rows, from the
    per-seed accuracies: hm's mean the HM of the mean base and new, its spread the per-seed HMs'; the
    average seed by seed over the datasets and seeds both variants have; delta paired by seed."""
    rows = {}

    def add(kind, dataset, per_seed, centre=None):
        seeds = sorted(per_seed)
        for metric in ("base", "new", "hm"):
            values = [per_seed[s][metric] for s in seeds]
            mean, std, ci = stats(values)
            if metric == "hm":
                mean = centre(seeds) if centre else hm(*(statistics.fmean(per_seed[s][m] for s in seeds)
                                                       for m in ("base", "new")))
            rows[("coop", kind, dataset, metric)] = (" ".join(map(str, seeds)), mean, std, ci)

    def with_hm(base, new):
        return dict(base=base, new=new, hm=hm(base, new))

    per_kind = {kind: {d: {s: with_hm(*acc) for s, acc in seeds.items()} for d, seeds in datasets.items()}
                for kind, datasets in runs.items()}
    averages = {}
    for kind, datasets in per_kind.items():
        common = sorted(set.intersection(*(set(seeds) for seeds in datasets.values())))
        averages[kind] = {s: with_hm(*(statistics.fmean(datasets[d][s][m] for d in datasets) for m in ("base", "new")))
                          for s in common}
        add(kind, "average", averages[kind])
        for dataset, per_seed in datasets.items():
            add(kind, dataset, per_seed)
    for dataset in [*per_kind["yes"], "average"]:
        yes, no = (per_kind[k].get(dataset, averages[k]) for k in ("yes", "no"))
        paired = sorted(yes.keys() & no.keys())
        diff = {s: {m: yes[s][m] - no[s][m] for m in ("base", "new", "hm")} for s in paired}

        def hm_difference(seeds):
            return hm(*(statistics.fmean(yes[s][m] for s in seeds) for m in ("base", "new"))) - hm(
                *(statistics.fmean(no[s][m] for s in seeds) for m in ("base", "new")))
        add("delta", dataset, diff, hm_difference)
    return rows


def write_tables(output):
    """coop with TextRefiner (seeds 1-3) and without (coop-plain: EuroSAT's seed 3 missing) on DTD and
    EuroSAT, and a few-shot table of each: {kind: {dataset: {seed: (base, new)}}}."""
    runs = {"yes": {"dtd": {1: (80.0, 60.0), 2: (82.5, 65.0), 3: (81.0, 70.0)},
                    "eurosat": {1: (90.0, 50.0), 2: (92.5, 55.0), 3: (95.0, 57.5)}},
            "no": {"dtd": {1: (84.0, 50.0), 2: (85.0, 52.5), 3: (86.0, 51.0)},
                   "eurosat": {1: (91.0, 40.0), 2: (93.0, 42.5)}}}
    for kind, folder in (("yes", "coop"), ("no", "coop-plain")):
        for dataset, seeds in runs[kind].items():
            for seed, (base, new) in seeds.items():
                run = output / folder / "base2new" / dataset / f"seed{seed}"
                write_result(run / "base", base, refiner=kind == "yes", shots=16)
                write_result(run / "new", new, refiner=kind == "yes")
                for shots in (1, 2):
                    write_result(output / folder / "fewshot" / dataset / f"shots{shots}" / f"seed{seed}",
                                 base - 10 * (shots == 1), refiner=kind == "yes")
    return runs


def test_make_report_writes_the_side_by_side_files(tmp_path):
    """make report over coop and coop-plain: report.csv's coop rows (yes, no, delta) per dataset and metric
    carry the means, stds and 95% CIs recomputed here; report.md and report.tex (booktabs) hold the same
    table; report.png is a chart with both variants' colours; reading the results loads no torch."""
    output = tmp_path / "output"
    runs = write_tables(output)
    proc = subprocess.run(["make", "--no-print-directory", "-C", REPO, "report", f"OUTPUT={output}",
                           f"PYTHON={sys.executable}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Side by side, base2new" in proc.stdout and "Δ TextRefiner" in proc.stdout
    with open(output / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["protocol", "method", "refiner", "dataset", "shots", "metric", "seeds", "mean", "std",
                             "ci95"]
    found = {(r["method"], r["refiner"], r["dataset"], r["metric"]): r for r in rows if r["protocol"] == "base2new"}
    expected = expected_rows(runs)
    assert found.keys() == expected.keys()
    for key, (seeds, mean, std, ci) in expected.items():
        row = found[key]
        assert (row["seeds"], row["shots"]) == (seeds, "16"), key
        assert float(row["mean"]) == pytest.approx(mean, abs=1e-4) and float(row["std"]) == pytest.approx(std, abs=1e-4)
        assert row["ci95"] == "" if ci is None else float(row["ci95"]) == pytest.approx(ci, abs=1e-4), key
    assert found[("coop", "delta", "eurosat", "base")]["seeds"] == "1 2"  # paired over the seeds both have
    fewshot = {(r["refiner"], r["dataset"], r["shots"]): r for r in rows if r["protocol"] == "fewshot"}
    assert {r["metric"] for r in fewshot.values()} == {"accuracy"}
    one_shot = [runs["yes"]["dtd"][s][0] - 10 for s in (1, 2, 3)]
    assert float(fewshot[("yes", "dtd", "1")]["mean"]) == pytest.approx(statistics.fmean(one_shot), abs=1e-4)
    assert float(fewshot[("delta", "dtd", "2")]["mean"]) == pytest.approx(
        statistics.fmean(runs["yes"]["dtd"][s][0] - runs["no"]["dtd"][s][0] for s in (1, 2, 3)), abs=1e-4)
    tex = (output / "report.tex").read_text()
    assert tex.count(r"\begin{tabular}") == tex.count(r"\bottomrule") == 2
    assert r"\toprule" in tex and r"\midrule" in tex and r"$\Delta$ TextRefiner" in tex
    assert "CoOp+TextRefiner (published) &  & 79.74 & 74.32 & 76.94" in tex
    assert "| Dataset | Method | Seeds | Base | New | HM |" in (output / "report.md").read_text()
    png = output / "report.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as image:
        assert 900 <= image.width <= 3000 and 400 <= image.height <= 3000
        colours = {colour for _, colour in image.convert("RGB").getcolors(maxcolors=1 << 16)}
    assert {tuple(int(c[i:i + 2], 16) for i in (1, 3, 5)) for c in report.COLOURS[0]} <= colours
    check = ("import sys, report; report.main([sys.argv[1]]); "
             "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'numpy', 'torchvision', 'triton'}))")
    proc = subprocess.run([sys.executable, "-c", check, str(output)], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and proc.stdout.splitlines()[-1] == "[]", proc.stdout[-500:] + proc.stderr


def test_report_refuses_folders_that_do_not_pair(tmp_path, capsys):
    """<m>-plain holds the method without TextRefiner: runs with it there, or another method beside <m>,
    are refused; a method of its own file is named by its --method (no title recorded)."""
    write_result(tmp_path / "coop" / "xd" / "dtd" / "seed1", 50.0)
    write_result(tmp_path / "coop-plain" / "xd" / "dtd" / "seed1", 40.0, refiner=True)
    write_result(tmp_path / "kgcoop" / "xd" / "dtd" / "seed1", 40.0, method="kgcoop")
    write_result(tmp_path / "kgcoop-plain" / "xd" / "dtd" / "seed1", 40.0, method="maple", refiner=False)
    with pytest.raises(SystemExit) as err:
        report.main([str(tmp_path)])
    stderr = capsys.readouterr().err
    assert err.value.code == 2 and "2 problem(s) above; no report made" in stderr
    assert "coop-plain/xd: runs with TextRefiner in a -plain folder" in stderr
    assert "hold different methods (kgcoop, maple)" in stderr and not os.path.exists(tmp_path / "report.csv")
    mine = tmp_path / "mine" / "xd"
    write_result(mine / "dtd" / "seed1", 50.0, method="my_method.py:Mine", refiner=False)
    summary = report.main([str(mine)])
    assert summary["dtd"]["accuracy"] == 50.0 and capsys.readouterr().out.startswith("my_method.py:Mine: accuracy in")


def test_a_method_folder_with_no_finished_run_is_left_out_of_the_report(tmp_path, capsys):
    """A method's first job failed and left an empty base/ (a flag the CLIP cannot take): the other
    methods are still reported, the empty one named in a note; with nothing finished anywhere, one line."""
    write_result(tmp_path / "coop" / "xd" / "dtd" / "seed1", 50.0)
    os.makedirs(tmp_path / "promptsrc" / "base2new" / "dtd" / "seed1" / "base")
    report.main([str(tmp_path)])
    captured = capsys.readouterr()
    assert f"note: {tmp_path / 'promptsrc' / 'base2new'} has no finished runs" in captured.err
    assert "CoOp" in captured.out and os.path.exists(tmp_path / "report.csv")
    with pytest.raises(SystemExit) as err:  # that folder's own table: one line
        report.main([str(tmp_path / "promptsrc" / "base2new")])
    assert err.value.code == 2 and capsys.readouterr().err.endswith(
        f"\nerror: report {tmp_path / 'promptsrc' / 'base2new'}: no finished runs (<dataset>/seed<S>/results.json)\n")
    shutil.rmtree(tmp_path / "coop")
    with pytest.raises(SystemExit) as err:
        report.main([str(tmp_path)])
    assert err.value.code == 2 and f"nothing to report: no finished run under {tmp_path}" in capsys.readouterr().err


def test_side_by_side_xd_averages_out_of_its_ten_targets_or_has_no_average_row(tmp_path, capsys):
    """The xd average is over the 10 targets besides ImageNet (the source): 2 of them read "(2/10)";
    targets that are ImageNet variants only have no average row (this crashed in the side-by-side)."""
    for folder, refiner in (("coop", True), ("coop-plain", False)):
        write_result(tmp_path / folder / "xd" / "imagenet_a" / "seed1", 40.0, refiner=refiner)
    report.main([str(tmp_path)])
    out = capsys.readouterr().out
    assert "Side by side, xd" in out and "Average" not in out.split("Side by side, xd")[1]
    for folder, refiner in (("coop", True), ("coop-plain", False)):
        for dataset in ("dtd", "eurosat"):
            write_result(tmp_path / folder / "xd" / dataset / "seed1", 50.0, refiner=refiner)
    report.main([str(tmp_path)])
    side_by_side = capsys.readouterr().out.split("Side by side, xd")[1]
    assert "CoOp (2/10)" in side_by_side and "/11)" not in side_by_side
