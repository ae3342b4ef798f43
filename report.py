"""Fills the tables of the Markdown pages from the CSVs under results/ and draws docs/glance.png. Only the text
between `<!-- table: NAME -->` and `<!-- /table -->` is this script's: table NAME of TABLES below. Needs no torch.

    python report.py            # after a CSV under results/ changed: refill every table, redraw the figure
    python report.py --check    # write nothing; exit 1 naming each page whose tables the CSVs no longer give
"""
import os
import re
import sys
from pathlib import Path
from statistics import mean, stdev

import utils

HERE = Path(__file__).resolve().parent
PAGES = ("README.md", "docs/*.md", "results/*.md")  # the pages whose marked tables are filled
MARKED = re.compile(r"(<!-- table: ([\w-]+) -->\n).*?(<!-- /table -->)", re.S)
REFERENCE = {"pretrain": 3760, "finetune": 2080}  # img/s of IcarusWizard/MAE on one H100 (docs/speed.md)
ARMS = {"mae": "MAE: pretraining + fine-tuning", "scratch": "from scratch"}


# A cell makes a column's text from a group of rows (one row where a table does not group).
def cell(column, form="{}", scale=1):  # the first row's ``column`` (times ``scale`` if a number); '-' if blank
    text = lambda v: "-" if v in (None, "") else form.format(float(v) * scale if re.search("[fg]}", form) else v)
    return lambda rows: text(rows[0].get(column))


def mean_sd(column, scale=1, form="{:.2f}", unit=" %"):  # 'mean ± sample std' ('mean' for one row, '–' for none)
    text = lambda v: "–" if not v else form.format(mean(v)) + (" ± " + form.format(stdev(v)) if v[1:] else "") + unit
    return lambda rows: text([float(r[column]) * scale for r in rows if r.get(column)])


each = lambda *how: lambda rows: ", ".join(cell(*how)([r]) for r in rows if r.get(how[0]))  # a value per seed
count = lambda column: lambda rows: str(sum(bool(r.get(column)) for r in rows))
kind = lambda row: "pretrain" if row["key"].startswith("pretrain") else "finetune"
epochs = lambda r: f"{r['pretrain_epochs']} + {r['finetune_epochs']}"
ARM, SOURCE = ("arm", lambda g: ARMS[g[0]["arm"]]), ("CSV", lambda g: ", ".join(dict.fromkeys(r["_link"] for r in g)))
# runs.csv: a setting's group holds its pretraining runs (k-NN, probe, loss) and fine-tuning runs (test accuracy)
ACCURACY = [("n", count("val_acc")), ("fine-tuned test acc.", mean_sd("val_acc", 100)),
            ("k-NN (k = 20)", mean_sd("knn_acc", 100)), ("linear probe", mean_sd("probe_acc", 100)),
            ("per seed (0, 1)", each("val_acc", "{:.2f}", 100))]
LOSS = ("pretraining loss", lambda g: f"{mean(float(r['loss']) for r in g if r['loss']):.4f}")  # seeds' agree
minutes = lambda rows: ", ".join(f"{sum(float(r['seconds']) for r in rows if r['seed'] == s) / 60:.1f}"
                                 for s in dict.fromkeys(r["seed"] for r in rows))  # each seed's epoch seconds


def versus(*same):  # adds ``_vs``: images per second over the fp32 eager row's with the same ``same`` columns
    key, speed = lambda r: tuple(r[c] for c in same), lambda r: float(r["images_per_s"])
    eager = lambda r: (r["precision"], r["compile"], r["augment"]) == ("fp32", "none", "none")
    def prepare(rows):
        base = {key(r): speed(r) for r in rows if eager(r)}
        return [dict(r, _vs=speed(r) / base[key(r)] if key(r) in base and r.get("status", "ok") == "ok" else "")
                for r in rows]
    return prepare


BUDGET = dict(by=lambda r: (r["_link"], r["machine"], float(r["budget_minutes"]), r["arm"]), columns=[
    "machine", ("minutes per arm", cell("budget_minutes", "{:g}")), ARM, ("n", count("test_acc")),
    ("final test acc.", mean_sd("test_acc")), ("per seed", each("test_acc", "{:.2f}")),
    ("epochs", lambda g: ", ".join(epochs(r) if r["arm"] == "mae" else r["finetune_epochs"] for r in g)),
    ("wall (min)", each("wall_minutes")), SOURCE])
STUDY = "cpu_study/runs.csv"
FEW = {**BUDGET, "csv": ["*/budget.csv"], "where": lambda r: r.get("labels_per_class"),  # the few-label studies
       "by": lambda r: (r["_link"], r["machine"], int(r["labels_per_class"]), r["arm"])}
LABELS = [("labels per class", cell("labels_per_class")), ARM, ("minutes per arm", cell("budget_minutes", "{:g}"))]
GLANCE = [("test accuracy", mean_sd("test_acc")), ("seeds", count("test_acc"))]
# name: csv (globs under results/), prepare (rows -> rows), where (row -> used?), by (row -> its group, and the
# groups' order; without it each row is one, in the CSVs' order), columns [a CSV column, or (heading, cell)].
TABLES = {
    "glance": {**BUDGET, "csv": ["cpu_full30_tuned/budget.csv", "budget/*.csv"], "columns": [
        "machine", ARM, ("minutes per run", cell("budget_minutes", "{:g}")), *GLANCE, SOURCE]},
    "few_labels_glance": {**FEW, "csv": ["cpu_labels30_tuned/budget.csv"], "columns": [*LABELS, *GLANCE]},
    "budget": {**BUDGET, "csv": ["*/budget.csv", "budget/*.csv"],  # every time-budget study with all labels
               "where": lambda r: not r.get("labels_per_class")},
    "few_labels": {**FEW, "columns": [*LABELS, ("n", count("test_acc")), ("test acc.", mean_sd("test_acc")),
        ("per seed", each("test_acc", "{:.2f}")), ("wall (min)", each("wall_minutes")),
        ("machine, date", lambda g: "{machine}, {date}".format(**g[0])), SOURCE]},
    "tuning": dict(csv=["*/tuning.csv"], columns=[
        "choice", "tried", ("test acc. (%)", cell("test_acc")), ("s / step", cell("seconds_per_step")), "condition",
        "decision", ("machine, date", lambda g: "{machine}, {date}".format(**g[0]))]),
    "cpu_study": dict(csv=[STUDY], by=lambda r: r["stage"] == "scratch", columns=[
        ("run", lambda g: "from scratch" if g[0]["stage"] == "scratch" else "MAE pretraining + fine-tuning"), *ACCURACY,
        ("training minutes (seed 0, 1)", minutes)],
        where=lambda r: r["stage"] == "scratch" or (r["decoder_depth"], r["mask_strategy"]) == ("2", "random")),
    "decoder_depth": dict(csv=[STUDY], by=lambda r: int(r["decoder_depth"]), columns=["decoder_depth", *ACCURACY, LOSS],
                          where=lambda r: r["stage"] != "scratch" and r["mask_strategy"] == "random"),
    "mask_strategy": dict(csv=[STUDY], by=lambda r: (r["mask_strategy"] != "random", r["mask_strategy"]),
                          columns=["mask_strategy", *ACCURACY, LOSS],
                          where=lambda r: r["stage"] != "scratch" and r["decoder_depth"] == "2"),
    "epochs": dict(csv=["epochs.csv"], columns=[  # the default commands first, as the campaign measures them
        ("command", lambda g: f"`{g[0]['command'].split(' --total_epoch')[0]}`"),  # without the campaign's own flags
        ("s/epoch", cell("seconds_per_epoch", "{:.2f}")), ("img/s", cell("images_per_s", "{:,.0f}")),
        ("full schedule", lambda g: cell("seconds_per_epoch", *(("{:.2f} h", 2000 / 3600) if kind(g[0]) == "pretrain"
                                                                else ("{:.1f} min", 100 / 60)))(g)),
        ("vs the reference", lambda g: cell("images_per_s", "{:.1f}×", 1 / REFERENCE[kind(g[0])])(g))]),
    "bench": dict(csv=["bench.csv"], prepare=versus("gpu", "workload", "batch"), columns=[
        "workload", "batch", "precision", "compile", "augment",
        ("img/s", lambda g: cell("images_per_s", "{:,.0f}")(g) if g[0]["status"] == "ok" else g[0]["status"]),
        ("vs fp32 eager", cell("_vs", "{:.2f}×")), ("memory GiB", cell("peak_memory_gib", "{:.1f}"))]),
    "cpu_speed": dict(csv=["cpu_speed.csv"], prepare=versus("command", "workload"), columns=[
        ("command", cell("command", "`{}`")), ("step", cell("workload")), "batch", "precision", "compile",
        ("img/s", cell("images_per_s", "{:,.0f}")), ("vs fp32 eager", cell("_vs", "{:.2f}×"))]),
}


def table_rows(name, results, page):  # the rows table ``name`` shows, with ``_link``: their CSV linked from ``page``
    spec, rows, results = TABLES[name], [], Path(results)
    for path in sorted({p for pattern in spec["csv"] for p in results.glob(pattern)}):
        shown, target = path.relative_to(results).as_posix(), Path(os.path.relpath(path, page.parent)).as_posix()
        rows += [dict(r, _link=f"[results/{shown}]({target})") for r in utils.read_csv(path)]
    return [r for r in spec.get("prepare", list)(rows) if spec.get("where", bool)(r)]


def render_table(name, results, page):  # TABLES[name] as Markdown, from ``results``, its links relative to ``page``
    if name not in TABLES:
        raise ValueError(f"{page}: report.py has no table {name!r} (it has {', '.join(TABLES)})")
    spec, groups = TABLES[name], {}
    heads, cells = zip(*((c.replace("_", " "), cell(c)) if isinstance(c, str) else c for c in spec["columns"]))
    try:
        for i, r in enumerate(table_rows(name, results, page)):
            groups.setdefault(spec["by"](r) if "by" in spec else i, []).append(r)
        return utils.markdown(heads, [[c(groups[k]) for c in cells] for k in sorted(groups)])
    except KeyError as error:  # a CSV without a column the table reads
        raise ValueError(f"{page}: table {name}: its CSVs under {results} have no column {error}") from None


def fill_tables(page, results=HERE / "results", write=True):
    """Refills the marked tables of ``page`` (write=False: only compares); returns whether it already held them."""
    old = page.read_text()
    new = MARKED.sub(lambda m: m[1] + render_table(m[2], results, page) + m[3], old)
    if write and new != old:  # whole or not at all: a reader never sees half a page
        utils.write_text(page, new)
    return new == old


def draw_glance(results, path):  # the glance table's runs in summarize.py's figure, the arms a little apart
    import summarize  # here: filling tables needs neither numpy nor matplotlib

    rows, series = table_rows("glance", results, path), {}
    for r in rows:
        x = float(r["budget_minutes"]) * (1.03 if r["arm"] == "scratch" else 1 / 1.03)  # log scale: a factor apart
        series.setdefault(f"{ARMS[r['arm']]}, {r['machine']}", {}).setdefault(x, []).append(float(r["test_acc"]))
    budgets = sorted({float(r["budget_minutes"]) for r in rows})
    summarize.dots_figure({name: sorted(points.items()) for name, points in series.items()}, Path(path),
                          "CIFAR-10 test accuracy against training minutes", [(b, f"{b:g}") for b in budgets],
                          "training minutes per run (budget)", log=True)


def main(argv=None):
    parser = utils.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a page's tables are stale")
    parser.add_argument("--root", type=Path, default=HERE, help="the folder whose pages are filled (the repository)")
    args = parser.parse_args(argv)
    pages, results = [p for pattern in PAGES for p in sorted(args.root.glob(pattern))], args.root / "results"
    try:
        stale = [p.relative_to(args.root).as_posix() for p in pages if not fill_tables(p, results, not args.check)]
        if not args.check:
            draw_glance(results, args.root / "docs" / "glance.png")
    except (OSError, ValueError) as error:  # one line: the file, or the page and its table
        return print(f"report.py: error: {type(error).__name__}: {error}", file=sys.stderr) or 2
    if args.check and stale:
        print(f"not current: {', '.join(stale)} (run python report.py)", file=sys.stderr)
        return 1
    print(f"current: {len(pages)} pages" if args.check else f"filled {len(pages)} pages ({len(stale)} changed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
