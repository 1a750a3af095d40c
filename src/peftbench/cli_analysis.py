"""``peftbench report``, ``recommend``, ``analyze`` and ``reference build``.

Results come from a results database (``--db``, SQLite written by ``peftbench run``), a
JSON file of run records (``--db runs.json``: ``peftbench results --format json`` or a
reference file), or the reference results shipped with peftbench (``--reference``).
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table as RichTable

from peftbench.errors import UsageError
from peftbench.store import DEFAULT_DB
from peftbench.text import count as counted

console = Console(soft_wrap=True, emoji=False)
notes_console = Console(stderr=True, soft_wrap=True, emoji=False)  # stdout may be JSON
wide_console = console if console.is_terminal else Console(width=200, emoji=False)

DbOption = Annotated[Path | None, typer.Option(
    help="results: SQLite database from `peftbench run`, or a JSON file of run records")]
ReferenceOption = Annotated[str | None, typer.Option(
    help="use the reference results shipped with peftbench (e.g. quickstart)")]
SuiteOption = Annotated[str | None, typer.Option(help="only the runs of this suite (--db)")]
ModelOption = Annotated[str | None, typer.Option(help="only the runs of this model")]
ScalesOption = Annotated[str, typer.Option(
    help="data scale thresholds LOW,HIGH: low < LOW <= medium < HIGH <= high")]
PreferOption = Annotated[str, typer.Option(
    help="accuracy (ties within seed noise only) | balanced (+2 points) | cheap (+5 points):"
         " how much score to give up for a cheaper method")]


@dataclass
class Source:
    """Loaded run records and a sentence saying where they come from."""

    records: list[dict[str, Any]]
    label: str
    kind: str  # database | json | reference
    meta: dict[str, Any]


def load_records(db: Path | None, reference: str | None = None, suite: str | None = None,
                 model: str | None = None, default_db: bool = False) -> Source:
    """Run records from ``--db`` (SQLite or JSON) or a shipped reference.

    Without either: the default database when ``default_db``, else the shipped reference.
    """
    from peftbench import reference as ref

    if db is not None and reference is not None:
        raise UsageError("--db and --reference: give one of them.")
    if db is None and reference is None and default_db:
        db = Path(DEFAULT_DB)
        if not db.is_file():
            raise UsageError(f"no results database {DEFAULT_DB} here: pass --db PATH (from "
                             "`peftbench run`), or --reference quickstart for the results "
                             "shipped with peftbench.")
    if db is None:
        loaded = ref.load(reference)
        source = Source(loaded.runs, f"Reference results shipped with peftbench: "
                        f"{loaded.describe()}", "reference", loaded.meta)
    elif db.suffix.lower() == ".json":
        loaded = ref.read(db)
        label = f"Run records from {db}" + (f" ({loaded.describe()})" if loaded.meta.get(
            "suite") or loaded.meta.get("date") else "")
        source = Source(loaded.runs, label, "json", loaded.meta)
    else:
        source = _from_database(db, suite)
    if suite is not None and source.kind != "database":
        raise UsageError("--suite selects runs in a results database (--db *.sqlite); "
                         f"{source.kind} results have no suites.")
    if model is not None:
        present = sorted({r["run"]["config"].get("model") for r in source.records} - {None})
        source.records = [r for r in source.records if model in (
            r["run"]["config"].get("model"), (r.get("model") or {}).get("name"))]
        if not source.records and present:
            raise UsageError(f"--model {model!r} matches no run; the models with runs are "
                             f"{', '.join(present)} ({source.label}).")
        source.label += f", model {model}"
    if not source.records:
        what = f"model {model!r} in " if model else ""
        raise UsageError(f"no runs for {what}{source.label}: run a suite first "
                         "(`peftbench run quickstart --db PATH`).")
    return source


def _from_database(db: Path, suite: str | None) -> Source:
    from peftbench.store import ResultStore

    with ResultStore(db, must_exist=True) as store:
        if suite is not None and suite not in store.suites():
            known = ", ".join(store.suites()) or "none yet"
            raise UsageError(f"--suite {suite!r}: no such suite in {db} (suites: {known}).")
        records = store.records(suite)
        missing = len(store.planned(suite) - {r["run"]["hash"] for r in records}) \
            if suite is not None else 0
    label = f"Results database {db}" + (f", suite {suite}" if suite else "")
    if missing:  # a sweep interrupted, or not run to its end yet
        label += (f" ({missing} of its planned runs have no result yet: `peftbench run` "
                  "the suite again to finish it)")
    return Source(records, label, "database", {"suite": suite})


def _analysis(source: Source, scales: str, prefer: str = "balanced",
              max_trainable_params: float | None = None,
              max_memory_mb: float | None = None) -> Any:
    from peftbench.analysis import DecisionConfig, Scales, analyse_records

    config = DecisionConfig(Scales.parse(scales), prefer, max_trainable_params, max_memory_mb)
    analysis = analyse_records(source.records, config)
    _note_set_aside(analysis.cells)
    return analysis


def _note_set_aside(cells: list[Any]) -> None:
    """Say on stderr which runs the cells left out (another setup than their latest)."""
    from peftbench.analysis.records import set_aside_note

    if note := set_aside_note(cells):
        notes_console.print(f"[bold yellow]note:[/] {escape(note)}", highlight=False)


# -- report ----------------------------------------------------------------------------------
def report(
    db: DbOption = None,
    reference: ReferenceOption = None,
    out: Annotated[Path, typer.Option(help="HTML file; the Markdown twin goes beside it")
                   ] = Path("report.html"),
    suite: SuiteOption = None,
    model: ModelOption = None,
    scales: ScalesOption = "500,5000",
    prefer: PreferOption = "balanced",
) -> None:
    """Write the report: one self-contained HTML page (tables, plots) and its Markdown twin
    (same name, .md)."""
    from peftbench.report import write_report

    if out.suffix.lower() not in (".html", ".htm"):
        raise UsageError(f"--out {out}: expected an .html file (the Markdown twin, "
                         f"{out.with_suffix('.md').name}, is written beside it).")
    source = load_records(db, reference, suite, model, default_db=True)
    analysis = _analysis(source, scales, prefer)
    options = {"--db": db, "--reference": reference, "--suite": suite, "--model": model,
               "--out": out}
    command = " ".join(["peftbench report", *(f"{k} {v}" for k, v in options.items()
                                              if v is not None)])
    try:
        html_path, md_path = write_report(analysis, out, source.label, command)
    except OSError as exc:
        raise UsageError(f"--out {out}: cannot write the report ({exc.strerror or exc}); "
                         "give a path in a writable folder") from None
    aside = sum(len(c.set_aside) for c in analysis.cells)
    console.print(f"report: {escape(str(html_path))} and {escape(str(md_path))} "
                  f"({len(analysis.cells)} cells from {len(source.records)} runs, "
                  f"{len(analysis.failed)} failed or diverged"
                  f"{f', {aside} set aside' if aside else ''})", highlight=False)


# -- recommend -------------------------------------------------------------------------------
def recommend(
    task_type: Annotated[str, typer.Option(help="classification | generation")],
    train_size: Annotated[int, typer.Option(help="training examples you have")],
    db: DbOption = None,
    reference: ReferenceOption = None,
    suite: SuiteOption = None,
    model: ModelOption = None,
    prefer: PreferOption = "balanced",
    max_trainable_params: Annotated[str | None, typer.Option(
        help="only methods with at most this many trainable parameters (e.g. 500000, "
             "1.5M, 16.4K)")] = None,
    max_memory_mb: Annotated[float | None, typer.Option(
        help="only methods with at most this peak memory (MB)")] = None,
    scales: ScalesOption = "500,5000",
    json_output: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Which method for a new task: recommendation, configuration, evidence, confidence.

    Uses --db (your results) if given, else the reference results shipped with peftbench.
    """
    from peftbench.analysis import DecisionConfig, Scales
    from peftbench.analysis.recommend import recommend as apply
    from peftbench.analysis.records import build_cells, split_runs

    source = load_records(db, reference, suite, model)
    config = DecisionConfig(Scales.parse(scales), prefer,
                            parse_count(max_trainable_params, "--max-trainable-params"),
                            max_memory_mb)
    cells = build_cells(split_runs(source.records)[0])
    if not cells:
        raise UsageError(f"{source.label}: no completed run to recommend from.")
    _note_set_aside(cells)
    result = apply(cells, task_type, train_size, config)
    if result.method is None:
        excluded = "; ".join(f"{m}: {r}" for m, r in result.decision.excluded)
        raise UsageError(f"no measured method fits the caps ({excluded}). Raise "
                         "--max-trainable-params / --max-memory-mb.")
    payload = recommendation_json(result, source, config.scales)
    if json_output:
        sys.stdout.write(json.dumps(payload, indent=2, default=str) + "\n")
    else:
        _print_recommendation(payload)


_SUFFIXES = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "b": 1e9}


def parse_count(text: str | None, option: str) -> float | None:
    """A count as typed or as peftbench prints it: ``500000``, ``1.5M``, ``16.4K``, ``2e6``."""
    if text is None:
        return None
    match = re.fullmatch(r"\s*([^\skKmMgGbB]+)\s*([kKmMgGbB]?)\s*", text.replace(",", ""))
    try:
        return float(match.group(1)) * _SUFFIXES[match.group(2).lower()]  # type: ignore[union-attr]
    except (AttributeError, ValueError):
        raise UsageError(f"{option} {text!r}: expected a number, optionally with K, M or G "
                         "(e.g. 1.5M).") from None


def recommendation_json(result: Any, source: Source, scales: Any) -> dict[str, Any]:
    """The recommendation as plain JSON-able data."""
    d = result.decision

    def summary(s: Any) -> dict[str, Any]:
        return {"method": s.method, "score_gap_to_best": s.gap.mean, "gap_std": s.gap.std,
                "cases": len(s.cells), "seeds": s.seeds, "tied_with_best": d.tied(s),
                "trainable_params": s.value("trainable"),
                "trainable_pct": s.value("trainable_pct"),
                "train_seconds": s.value("train_seconds"), "peak_memory_mb": s.value("memory_mb"),
                "cost_index": s.cost_index}

    models = sorted({m for m, _, _ in d.cases})
    return {
        "task_type": result.task_type, "train_size": result.train_size, "scale": result.scale,
        "scale_range": scales.describe(result.scale),
        "prefer": d.prefer,
        "recommended": {"method": result.method, "method_args": result.method_args,
                        "resolved_method_args": result.resolved_args, "lr": result.lr,
                        "measured_on": models},
        "runner_up": d.runner_up.method if d.runner_up else None,
        "why": d.why,
        "confidence": {"level": result.confidence, "reasons": result.confidence_reasons},
        "tie_rule": {"noise": d.noise, "noise_kind": d.noise_kind, "tolerance": d.tolerance},
        "ranking": [summary(s) for s in d.ranking],
        "excluded_by_caps": [{"method": m, "reason": r} for m, r in d.excluded],
        "evidence": [{"model": e.model, "task": e.task, "train_size": e.train_size,
                      "metric": e.metric, "score": e.score.mean, "score_std": e.score.std,
                      "seeds": e.score.n, "best_method": e.best_method,
                      "best_score": e.best_score.mean,
                      "full_score": e.full_score.mean if e.full_score else None,
                      "trainable_params": e.trainable, "train_seconds": e.train_seconds,
                      "peak_memory_mb": e.memory_mb, "tied_with_best": e.tied_with_best}
                     for e in result.evidence],
        "measured_sizes": result.measured_sizes, "evidence_sizes": result.evidence_sizes,
        "source": {"kind": source.kind, "description": source.label,
                   **{k: source.meta.get(k) for k in ("suite", "model", "date",
                                                       "peftbench_version", "git_sha")
                      if k in source.meta}},
    }


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}" if isinstance(value, float) else str(value)


def _print_recommendation(p: dict[str, Any]) -> None:
    from peftbench.report.tables import count

    rec = p["recommended"]
    args = " ".join(f"--method-arg {k}={json.dumps(v) if not isinstance(v, str) else v}"
                    for k, v in rec["method_args"].items())
    lr = f" --lr {rec['lr']:g}" if rec["lr"] is not None else ""
    colour = {"high": "green", "medium": "yellow", "low": "red"}[p["confidence"]["level"]]
    console.print(f"[dim]{escape(p['source']['description'])}[/]", highlight=False)
    console.print(f"For a [bold]{p['task_type']}[/] task with {p['train_size']:,} training "
                  f"examples ({p['scale']} data: {p['scale_range']}), preference "
                  f"{p['prefer']}:", highlight=False)
    console.print(f"  recommended  [bold green]{escape(rec['method'])}[/]   runner-up: "
                  f"{escape(str(p['runner_up'] or '-'))}", highlight=False)
    console.print(f"  configure    --method {escape(rec['method'])} {escape(args)}{lr}"
                  f"   (selected on {escape(', '.join(rec['measured_on']))})", highlight=False)
    console.print(f"  why          {escape(p['why'])}", highlight=False)
    console.print(f"  confidence   [bold {colour}]{p['confidence']['level']}[/]: "
                  f"{escape('; '.join(p['confidence']['reasons']))}", highlight=False)
    ranking = RichTable("method", "gap to best", "seeds", "trainable", "train s", "peak MB",
                        "cost index", "tied", title="ranking", box=box.SIMPLE_HEAD)
    for s in p["ranking"]:
        ranking.add_row(escape(s["method"]), _fmt(s["score_gap_to_best"]), str(s["seeds"]),
                        count(s["trainable_params"]), _fmt(s["train_seconds"]),
                        _fmt(s["peak_memory_mb"], 0), _fmt(s["cost_index"], 2),
                        "yes" if s["tied_with_best"] else "")
    for x in p["excluded_by_caps"]:
        ranking.add_row(escape(x["method"]), "excluded: " + escape(x["reason"]), *[""] * 6)
    wide_console.print(ranking)
    multi = len(rec["measured_on"]) > 1
    evidence = RichTable(*(["model"] if multi else []), "task", "size", "metric", rec["method"],
                         "best", "full", "tied", title="evidence", box=box.SIMPLE_HEAD)
    for e in p["evidence"]:
        mine = _fmt(e["score"]) + (f" ± {e['score_std']:.1f}" if e["score_std"] else "")
        evidence.add_row(*([escape(e["model"])] if multi else []),
                         escape(e["task"]), f"{e['train_size']:,}", escape(str(e["metric"])),
                         f"{mine} (n={e['seeds']})",
                         f"{escape(e['best_method'])} {_fmt(e['best_score'])}",
                         _fmt(e["full_score"]), "yes" if e["tied_with_best"] else "no")
    wide_console.print(evidence)


# -- analyze ---------------------------------------------------------------------------------
def analyze(
    db: DbOption = None,
    reference: ReferenceOption = None,
    suite: SuiteOption = None,
    model: ModelOption = None,
    scales: ScalesOption = "500,5000",
    prefer: PreferOption = "balanced",
    json_output: Annotated[bool, typer.Option("--json", help="print the tables as JSON")
                           ] = False,
) -> None:
    """Print the convergence, claim, data-requirement, decision and (when run) selective
    training tables."""
    from peftbench.report.tables import all_tables

    source = load_records(db, reference, suite, model, default_db=True)
    tables = all_tables(_analysis(source, scales, prefer))
    keys = ("convergence", "claim", "requirement_type", "requirement", "decision",
            *(("selective",) if tables["selective"].rows else ()), "failed")
    if json_output:
        out = {k: {"title": tables[k].title, "header": tables[k].header,
                   "rows": tables[k].rows, "notes": tables[k].notes} for k in keys}
        sys.stdout.write(json.dumps({"source": source.label, "tables": out}, indent=2) + "\n")
        return
    console.print(f"[dim]{escape(source.label)}[/]", highlight=False)
    for key in keys:
        t = tables[key]
        rich = RichTable(*t.header, title=t.title, box=box.SIMPLE_HEAD, title_justify="left")
        for row in t.rows:
            rich.add_row(*(f"[bold]{escape(c)}[/]" if type(c).__name__ == "Strong" else
                           escape(c) for c in row))
        wide_console.print(rich)
        if key in ("claim", "selective"):  # their summary sentences
            for note in t.notes[:-1 if key == "claim" else -3]:
                console.print(f"  {escape(note)}", highlight=False)


# -- reference -------------------------------------------------------------------------------
reference_app = typer.Typer(no_args_is_help=True,
                            help="Reference results shipped with peftbench (for `recommend`).")


@reference_app.command("build")
def reference_build(
    db: Annotated[Path, typer.Option(help="results database (or JSON of run records)")],
    suite: Annotated[str | None, typer.Option(help="the suite whose runs to ship")] = None,
    out: Annotated[Path | None, typer.Option(
        help="file to write (default: the peftbench/reference/ folder, <suite>.json)")] = None,
    description: Annotated[str, typer.Option(help="one line about these results")] = "",
    overwrite: Annotated[bool, typer.Option(
        help="replace an existing --out file (never the --db file itself)")] = False,
) -> None:
    """Build a reference file from stored results.

    peftbench run quickstart --db reference.sqlite;
    peftbench reference build --db reference.sqlite --suite quickstart
    --out src/peftbench/reference/quickstart.json --overwrite
    """
    from peftbench import reference as ref
    from peftbench.files import write_json_atomic

    if out is None:
        out = Path(ref.__file__).parent / f"{suite or 'reference'}.json"
    _check_reference_out(db, out, overwrite)
    source = load_records(db, None, suite)
    data = ref.build(source.records, suite or source.meta.get("suite"), description)
    try:
        write_json_atomic(out, data)  # a failed write leaves any earlier file as it was
    except OSError as exc:
        raise UsageError(f"--out {out}: cannot write the reference file "
                         f"({exc.strerror or exc}); give a writable path") from None
    console.print(f"reference: {escape(str(out))} ({counted(len(data['runs']), 'run')}, suite "
                  f"{escape(str(data['suite'] or '(none)'))}, model "
                  f"{escape(str(data['model']))}, {data['date']})", highlight=False)


def _check_reference_out(db: Path, out: Path, overwrite: bool) -> None:
    """Refuse to write the reference over its own input, or over any existing file unless
    ``--overwrite`` (the default --out is a file shipped with peftbench)."""
    if out.exists() and db.exists() and out.samefile(db):  # links and spellings too
        raise UsageError(f"--out {out} is the --db file itself: writing the reference there "
                         "would replace the results it is built from; give another --out.")
    if out.is_dir():
        raise UsageError(f"--out {out} is a folder; give a file name such as "
                         f"{out / 'reference.json'}.")
    if out.exists() and not overwrite:
        raise UsageError(f"--out {out} exists; give another file, or --overwrite to replace "
                         "it.")


@reference_app.command("show")
def reference_show() -> None:
    """List the reference results shipped with this peftbench."""
    from peftbench import reference as ref

    files = ref.shipped()
    if not files:
        console.print(f"no reference results shipped. Build them: {escape(ref.REGENERATE)}",
                      highlight=False)
        return
    for path in files:
        loaded = ref.read(path)
        console.print(f"{escape(path.stem)}: {counted(len(loaded.runs), 'run')}; "
                      f"{escape(loaded.describe())}", highlight=False)


def register(app: typer.Typer) -> None:
    """Add ``report``, ``recommend``, ``analyze`` and ``reference`` to the app."""
    app.command("report")(report)
    app.command("recommend")(recommend)
    app.command("analyze")(analyze)
    app.add_typer(reference_app, name="reference")
