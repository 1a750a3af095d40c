"""The report: self-contained HTML (tables, inline SVG, no scripts), escaped user strings, the
Markdown twin, failed runs apart; and a real render in headless Chromium."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from analysis_fakes import fake_suite, make_record
from peftbench.analysis import analyse_records
from peftbench.report import write_report

EVIL = "<script>alert(1)</script>|*x*"
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium"
                                        if Path("/usr/bin/chromium").exists() else None)


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[Path, Path, str, str]:
    records = fake_suite(tasks=("rotten_tomatoes", "news_headlines"), sizes=(100, 1000),
                         seeds=(0, 1))
    # a user task whose name (and label) try to inject markup
    for method in ("full", "lora"):
        for seed in (0, 1):
            records.append(make_record(task=EVIL, task_type="classification",
                                       metric="accuracy", method=method, seed=seed,
                                       scores=[50.0, 70.0 + seed, 75.0]))
    # a selective-training study on rotten_tomatoes / 100: partial fine-tuning of the last
    # six layers, and LoRA on modules with a markup name
    for seed in (0, 1):
        records.append(make_record(method="partial", seed=seed, trainable=20_000_000,
                                   method_args={"layers": "-6:", "modules": None},
                                   scores=[50.0, 74.0 + seed, 76.0]))
    records.append(make_record(method="lora", trainable=100_000,  # the suite's setup: 5 evals
                               scores=[50.0, 55.0, 60.0, 65.0, 68.0, 70.0],
                               method_args={"target_modules": ["<b>q</b>"]}))
    records.append(make_record(method="ia3", seed=7, status="diverged", scores=[50, 10],
                               test=5.0, error="training loss became nan at step 4"))
    records.append(make_record(method="bitfit", seed=8, status="failed",
                               error="Traceback ...\nValueError: <img src=x onerror=alert(1)>"))
    out = tmp_path_factory.mktemp("report") / "report.html"
    html_path, md_path = write_report(analyse_records(records), out, f"test results {EVIL}",
                                      "peftbench report --db results.sqlite")
    return html_path, md_path, html_path.read_text(), md_path.read_text()


def test_html_is_self_contained_with_tables_and_inline_svg(report):
    html = report[2]
    for table in ("t-decision", "t-benchmark", "t-convergence", "t-claim", "t-requirement",
                  "t-requirement_type", "t-selective", "t-failed", "t-prov_models",
                  "t-prov_versions"):
        assert f'class="{table}"' in html, table
    # score vs size, 2 Pareto plots, the selective study, learning curves for 3 tasks
    assert html.count("<svg") == 7
    assert "<script" not in html.lower()
    assert not re.search(r'(src|href)="(https?:)?//', html)  # nothing fetched from a network
    assert "<link" not in html and "@import" not in html


def test_user_strings_are_escaped_everywhere(report):
    _, _, html, md = report
    assert "<script>alert(1)" not in html and "<img src=x" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "&lt;img src=x onerror=alert(1)&gt;" in html
    assert "<b>q</b>" not in html and "&lt;b&gt;q&lt;/b&gt;" in html
    assert "<script>" not in md and "<img src=x" not in md
    assert "&lt;script&gt;alert(1)&lt;/script&gt;\\|\\*x\\*" in md


def test_failed_and_diverged_runs_are_listed_not_averaged(report):
    _, _, html, _ = report
    failed = html[html.index('class="t-failed"'):]
    failed = failed[:failed.index("</table>")]
    assert "diverged" in failed and "training loss became nan at step 4" in failed
    assert "ValueError: &lt;img" in failed
    benchmark = html[html.index('class="t-benchmark"'):]
    benchmark = benchmark[:benchmark.index("</table>")]
    assert "1 failed/diverged" in benchmark
    assert "(n=3)" not in benchmark  # the extra seeds were not averaged in


def test_markdown_twin_has_the_tables_and_links_the_plots(report):
    _, md_path, _, md = report
    for heading in ("## Benchmark", "## Convergence", "## Data requirement",
                    "### Decision table", "## Selective training", "## Failed and diverged runs",
                    "## Provenance"):
        assert heading in md
    assert "rotten\\_tomatoes, 100 examples: supported: partial on last 6 layers" in md
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(links) == 7
    for link in links:
        svg = (md_path.parent / link).read_text()
        assert svg.startswith("<?xml") and "<svg" in svg
    table_lines = [line for line in md.splitlines() if line.startswith("| ")]
    assert all(line.endswith(" |") for line in table_lines)


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium at /usr/bin/chromium "
                    "(Debian: apt-get install chromium)")
def test_report_renders_in_headless_chromium(report, tmp_path):
    html_path = report[0]
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0"]
    url = html_path.resolve().as_uri()
    dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", url], capture_output=True,
                         text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "Uncaught" not in dom.stderr
    assert dom.stdout.count("<svg") == 7
    for table in ("t-decision", "t-benchmark", "t-convergence", "t-claim", "t-selective",
                  "t-failed"):
        assert f'class="{table}"' in dom.stdout
    assert "<script" not in dom.stdout.lower()

    shot = tmp_path / "report.png"
    proc = subprocess.run([CHROMIUM, *flags, f"--screenshot={shot}", "--window-size=1400,3000",
                           "--hide-scrollbars", url], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and shot.exists(), proc.stderr[-2000:]
    assert "Uncaught" not in proc.stderr
    assert shot.stat().st_size > 50_000  # a blank page is a few KB
    try:
        from PIL import Image
    except ImportError:
        return
    with Image.open(shot) as image:
        assert image.size == (1400, 3000)
        rgb = image.convert("RGB")
        colours = rgb.getcolors(maxcolors=1 << 20) or []
        assert len(colours) > 50  # text, plots, table stripes: not a single colour
        # the dark header band is drawn at the top
        assert sum(rgb.getpixel((20, 20))) < 200


def test_report_with_only_failed_runs_and_no_baseline_still_renders(tmp_path):
    failed = make_record(status="failed", error="ValueError: bad data")
    del failed["task"], failed["model"]  # a run that failed before loading its task
    lonely = make_record(method="lora", scores=[], test=80.0)  # completed, without a curve
    out, md = write_report(analyse_records([failed, lonely]), tmp_path / "r.html", "edge")
    html = out.read_text()
    assert "No completed runs to plot" not in html  # lora has a score: plots are drawn
    assert "ValueError: bad data" in html and "no full baseline" in html
    out, md = write_report(analyse_records([failed]), tmp_path / "only-failed.html", "edge")
    html = out.read_text()
    assert "No completed runs to plot" in html and "<svg" not in html
    assert "No rows." in html and "ValueError: bad data" in md.read_text()


def test_a_table_mixing_precisions_says_so_and_marks_each_cell(tmp_path):
    """precision: auto can store bf16 runs from one machine and fp32 runs from another in
    one suite: speed and memory are then not comparable, and the report must say so."""
    from peftbench.report.tables import benchmark

    records = [make_record(method=m, seed=s) for m in ("full", "lora") for s in (0, 1)]
    table = benchmark(analyse_records(records))
    assert not any("more than one precision" in n for n in table.notes)
    assert all(row[-1] == "" for row in table.rows)
    for r in records:
        if r["run"]["config"]["method"] == "lora":
            r["run"]["config"]["precision"], r["run"]["precision"] = "auto", "fp32"
    table = benchmark(analyse_records(records))
    (note,) = [n for n in table.notes if "more than one precision" in n]
    assert "bf16: 2 runs, fp32: 2 runs" in note
    assert {row[2]: row[-1] for row in table.rows} == {"full": "bf16", "lora": "fp32"}


def test_records_without_a_precision_do_not_count_as_another_precision():
    from peftbench.report.tables import benchmark

    records = [make_record(method=m) for m in ("full", "lora")]
    del records[0]["run"]["config"]["precision"]  # an older record that does not say
    table = benchmark(analyse_records(records))
    assert not any("more than one precision" in n for n in table.notes)


def test_markdown_links_survive_spaces_and_brackets_in_the_file_name(tmp_path):
    from urllib.parse import unquote

    _, md = write_report(analyse_records(fake_suite(tasks=("rotten_tomatoes",),
                                                      sizes=(100,), seeds=(0,))),
                           tmp_path / "my report (v1).html", "edge")
    links = re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", md.read_text())
    assert links and all((md.parent / unquote(link)).is_file() for link in links)


def test_a_ratio_against_a_full_run_that_never_converged_is_not_printed_as_0x():
    from peftbench.analysis.records import Stat
    from peftbench.report.tables import _median, ratio

    assert ratio(Stat.of([]), full_never=1) == "0 (full never)" == _median(0.0)
    assert ratio(Stat.of([0.5, 1.5])) == "1.00x ± 0.71" and _median(float("inf")) == "never"
    assert ratio(Stat.of([2.0]), full_never=1) == "2.00x (+1 full never)"  # was 1.00x ± 1.41
    assert ratio(Stat.of([]), never=1, full_never=1) == "(+1 never) (+1 full never)"


def test_failures_are_told_apart_by_configuration():
    """Failures of lr 1.0 were noted on the lr 0.01 row that completed every seed."""
    from peftbench.report.tables import benchmark, failed

    good = [make_record(method="lora", lr=0.01, seed=s) for s in (0, 1)]
    bad = [make_record(method="lora", lr=1.0, seed=s, status="diverged",
                       method_args={"r": 4}) for s in (0, 1)]
    analysis = analyse_records(good + bad)
    [row] = benchmark(analysis).rows
    assert row[5] == "0.01"
    assert row[-1] == "2 failed/diverged in other configurations"
    assert [r[4] for r in failed(analysis).rows] == ["1 · r=4", "1 · r=4"]
    again = analyse_records([*good, make_record(method="lora", lr=0.01, seed=2,
                                                status="failed")])
    assert benchmark(again).rows[0][-1] == "1 failed/diverged"
