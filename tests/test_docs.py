"""The pages under docs/ and the README: their tables are what report.py fills from the CSVs under results/ (and
report.py needs no torch), --check fails on a stale page and passes after a rebuild, the tables' numbers are the
CSVs' (recomputed here with numpy), every relative link points to a file (and heading), and the README keeps the
test command CI runs."""
import csv
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

import report

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
BUDGET_HEAD = ["arm", "budget_minutes", "pretrain_share", "seed", "test_acc", "pretrain_epochs", "finetune_epochs",
               "wall_minutes", "machine", "date"]


def write_csv(path, head, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([head, *rows])


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def table_rows(markdown):
    """The body rows of the markdown tables in ``markdown`` (no header, no separator), as lists of cells."""
    lines = [line for line in markdown.splitlines() if line.startswith("|")] + ["end"]
    separator = lambda line: set(line) <= set("|-: ")
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line, after in zip(lines, lines[1:])
            if not separator(line) and not separator(after)]


def mean_std(values, scale=100):
    values = np.asarray(values, dtype=float) * scale
    return f"{values.mean():.2f} ± {values.std(ddof=1):.2f} %"


def small_repo(root):
    """A repository with a README (the glance table), a docs page (the budget table) and two small studies."""
    write_csv(root / "results" / "cpu_full30_tuned" / "budget.csv", BUDGET_HEAD, [
        ["mae", "30.0", "0.5", 0, 61.0, 6, 3, 29.5, "a CPU", "2026-12-01"],
        ["mae", "30.0", "0.5", 1, 63.0, 6, 3.5, 29.0, "a CPU", "2026-12-01"],
        ["scratch", "30.0", "0", 0, 60.5, 0, 7, 29.9, "a CPU", "2026-12-01"]])
    write_csv(root / "results" / "budget" / "campaign.csv", BUDGET_HEAD + ["command"], [
        ["mae", "3.5", "0.5", 0, 70.25, 20, 5, 3.4, "a GPU", "2026-12-02T10:00:00+00:00", "python campaign.py"],
        ["mae", "7", "0.5", 0, 75.5, 40, 10, 6.9, "a GPU", "2026-12-02T11:00:00+00:00", "python campaign.py"]])
    (root / "docs").mkdir()
    (root / "README.md").write_text("# A repo\n\n<!-- table: glance -->\nold\n<!-- /table -->\n\nText after.\n")
    (root / "docs" / "results.md").write_text("# Results\n\nSome words.\n\n<!-- table: budget -->\n<!-- /table -->\n")
    return root


def test_tables_are_filled_from_the_csvs_and_only_between_the_markers(tmp_path):
    root = small_repo(tmp_path)
    assert not report.fill_tables(root / "README.md", root / "results")  # it changed
    readme = (root / "README.md").read_text()
    assert readme.startswith("# A repo\n\n<!-- table: glance -->\n| machine |") and readme.endswith(
        "<!-- /table -->\n\nText after.\n") and "old" not in readme
    rows = [r for r in table_rows(readme) if r[0] == "a CPU"]
    assert rows[0] == ["a CPU", report.ARMS["mae"], "30", mean_std([61.0, 63.0], 1), "2",
                       "[results/cpu_full30_tuned/budget.csv](results/cpu_full30_tuned/budget.csv)"]
    assert rows[1][:5] == ["a CPU", "from scratch", "30", "60.50 %", "1"]
    gpu = [r for r in table_rows(readme) if r[0] == "a GPU"]
    assert [r[2:4] for r in gpu] == [["3.5", "70.25 %"], ["7", "75.50 %"]] and "budget/campaign.csv" in gpu[0][-1]
    assert report.fill_tables(root / "README.md", root / "results")  # now current: nothing to do
    report.fill_tables(root / "docs" / "results.md", root / "results")
    mae = [r for r in table_rows((root / "docs" / "results.md").read_text()) if r[0] == "a CPU"][0]
    assert mae[5:] == ["61.00, 63.00", "6 + 3, 6 + 3.5", "29.5, 29.0",
                       "[results/cpu_full30_tuned/budget.csv](../results/cpu_full30_tuned/budget.csv)"]


def test_check_fails_on_a_stale_page_and_passes_after_a_rebuild(tmp_path, capsys):
    root = small_repo(tmp_path)
    readme = (root / "README.md").read_text()
    assert report.main(["--root", str(root), "--check"]) == 1
    assert "README.md, docs/results.md" in capsys.readouterr().err
    assert (root / "README.md").read_text() == readme and not (root / "docs" / "glance.png").exists()  # untouched
    assert report.main(["--root", str(root)]) == 0
    assert (root / "docs" / "glance.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report.main(["--root", str(root), "--check"]) == 0
    with open(root / "results" / "budget" / "campaign.csv", "a") as f:  # a new row lands: the glance is stale
        f.write("scratch,7,0,0,71.0,0,20,6.9,a GPU,2026-12-02,python campaign.py\n")
    assert report.main(["--root", str(root), "--check"]) == 1
    assert "not current: README.md, docs/results.md" in capsys.readouterr().err


def test_an_unknown_table_or_a_missing_column_is_one_line(tmp_path, capsys):
    root = small_repo(tmp_path)
    (root / "docs" / "speed.md").write_text("<!-- table: speeed -->\n<!-- /table -->\n")
    assert report.main(["--root", str(root)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "speed.md" in err and "'speeed'" in err
    (root / "docs" / "speed.md").unlink()
    write_csv(root / "results" / "budget" / "bad.csv", ["arm", "seed", "test_acc"], [["mae", 0, 50.0]])
    assert report.main(["--root", str(root)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "glance" in err and "'machine'" in err


def test_the_committed_pages_are_current_without_torch():
    check = "import sys; sys.modules['torch'] = None; import report; sys.exit(report.main(['--check']))"
    done = subprocess.run([sys.executable, "-c", check], cwd=REPO, timeout=60, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (REPO / "docs" / "glance.png").is_file()


def test_the_cpu_study_tables_are_the_csv_means():
    runs = read_csv(REPO / "results" / "cpu_study" / "runs.csv")
    page = (REPO / "docs" / "results.md").read_text()
    pick = lambda stage, **kw: [r for r in runs if r["stage"] == stage and all(r[k] == v for k, v in kw.items())]
    for depth, strategy in [("1", "random"), ("2", "random"), ("4", "random"), ("2", "block"), ("2", "grid"),
                            ("2", "blockwise")]:
        tuned = pick("finetune", decoder_depth=depth, mask_strategy=strategy)
        pre = pick("pretrain", decoder_depth=depth, mask_strategy=strategy)
        assert len(tuned) == len(pre) == 2
        expected = [mean_std([float(r["val_acc"]) for r in tuned]), mean_std([float(r["knn_acc"]) for r in pre]),
                    mean_std([float(r["probe_acc"]) for r in pre])]
        assert any(set(expected) <= set(row) for row in table_rows(page)), (depth, strategy)
    scratch = mean_std([float(r["val_acc"]) for r in pick("scratch")])
    assert scratch == "49.42 ± 1.58 %" and any(scratch in row for row in table_rows(page))
    assert "53.75 ± 1.95 %" in page


def test_the_speed_tables_are_the_csv_values():
    rows = table_rows((REPO / "docs" / "speed.md").read_text())
    for row in read_csv(REPO / "results" / "epochs.csv"):
        assert any(f"{float(row['seconds_per_epoch']):.2f}" in r and f"{float(row['images_per_s']):,.0f}" in r
                   for r in rows), row["key"]
    for row in read_csv(REPO / "results" / "bench.csv") + read_csv(REPO / "results" / "cpu_speed.csv"):
        assert any(f"{float(row['images_per_s']):,.0f}" in r and row["precision"] in r for r in rows)
    assert any("1.08 h" in r for r in rows) and any("8.5 min" in r for r in rows)


def anchors(page):
    """The anchors of a page's headings, as GitHub makes them."""
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in re.findall(r"^#+ (.+)$", page.read_text(),
                                                                                      re.M)}


def test_every_relative_link_points_to_a_file_and_heading():
    for page in PAGES:
        for target in LINK.findall(page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            path = (page.parent / path).resolve() if path else page
            assert path.exists(), f"{page.relative_to(REPO)} links {target}, which does not exist"
            assert REPO in path.parents, f"{page.relative_to(REPO)} links outside the repository: {target}"
            assert not anchor or anchor in anchors(path), f"{page.relative_to(REPO)} links {target}: no such heading"


def test_the_readme_keeps_the_ci_test_command_and_the_commands():
    ci = (REPO / ".ci" / "run").read_text()
    command = re.search(r"python -m pytest[^\n&|;]*", ci).group(0).strip()
    readme = (REPO / "README.md").read_text()
    assert command == "python -m pytest -q" and f"    {command}" in readme
    for line in ["pip install -r requirements.txt", "python mae_pretrain.py --decoder_depth 8 --mask_strategy block",
                 "python train_classifier.py --pretrained_model_path vit-t-mae.pt", "tensorboard --logdir logs",
                 "python visualize_predictions.py", "--preset small", "Development: "]:
        assert line in readme
    assert len(readme.split()) <= 1600
    for heading in ["Bad input", "Runs, locks and checkpoints", "Resume and stop", "Write failures", "Bad data"]:
        assert f"\n## {heading}\n" in (REPO / "docs" / "safety.md").read_text()
