"""Reference results shipped with peftbench: what ``peftbench recommend`` uses by default.

A reference file (``src/peftbench/reference/<suite>.json``) is one JSON object::

    {"format": "peftbench-reference", "format_version": 1,
     "suite": "quickstart", "model": "smollm2-135m", "date": "2026-05-01",
     "peftbench_version": "0.1.0", "git_sha": "9a602a3...", "built_at": "...",
     "description": "...", "runs": [<run record>, ...]}

``runs`` holds full run records (the keys of ``result.json``). Regenerate it with::

    peftbench run quickstart --db reference.sqlite
    peftbench reference build --db reference.sqlite --suite quickstart \
        --out src/peftbench/reference/quickstart.json

``peftbench reference build`` also takes the JSON export of ``peftbench results --format
json`` (``--db runs.json``).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from peftbench.errors import UsageError
from peftbench.text import dotted

FORMAT = "peftbench-reference"
FORMAT_VERSION = 1
DEFAULT_NAME = "quickstart"
REGENERATE = ("peftbench run quickstart --db reference.sqlite && peftbench reference build "
              "--db reference.sqlite --suite quickstart "
              "--out src/peftbench/reference/quickstart.json --overwrite")


@dataclass
class Reference:
    """Shipped (or user-given) reference results and where they come from."""

    meta: dict[str, Any]
    runs: list[dict[str, Any]]
    path: Path | None = None

    def describe(self) -> str:
        m = self.meta
        return (f"suite {m.get('suite') or '?'}, model {m.get('model') or '?'}, "
                f"{m.get('date') or 'undated'}, peftbench {m.get('peftbench_version') or '?'}"
                f" ({(m.get('git_sha') or 'no git sha')[:10]})")


def shipped() -> list[Path]:
    """The reference files shipped with this installation."""
    folder = resources.files(__name__)
    return sorted(Path(str(f)) for f in folder.iterdir() if f.name.endswith(".json"))


class _Config(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    task: str
    method: str
    seed: int | None = None
    train_size: int | None = None
    method_args: dict[str, Any] | None = None


class _Run(BaseModel):
    model_config = ConfigDict(extra="allow")

    config: _Config


class _Record(BaseModel):
    """The parts of a run record the analysis reads (the rest is optional)."""

    model_config = ConfigDict(extra="allow")

    run: _Run
    status: str
    scores: dict[str, Any] | None = None
    params: dict[str, Any] | None = None
    efficiency: dict[str, Any] | None = None
    curve: list[dict[str, Any]] | None = None
    task: dict[str, Any] | None = None
    model: dict[str, Any] | None = None


_RECORDS = TypeAdapter(list[_Record])


def _check_runs(runs: Any, where: str) -> list[dict[str, Any]]:
    """``runs`` if it is a list of run records, else a :class:`UsageError` naming the first
    few problems (``runs[3].run.config.method: Field required``)."""
    try:
        _RECORDS.validate_python(runs)
    except ValidationError as exc:
        problems = [f"{dotted(('runs', *e['loc']))}: "
                    f"{e['msg'].replace(' or instance of _Record', '')}"
                    for e in exc.errors()[:3]]
        more = f" (and {exc.error_count() - 3} more)" if exc.error_count() > 3 else ""
        raise UsageError(f"{where}: not peftbench run records: {'; '.join(problems)}{more}. "
                         "Expected a JSON array of result.json objects (`peftbench results "
                         "--format json`), or a reference file with a 'runs' array.") from None
    return runs


def read(path: Path) -> Reference:
    """A reference file, or a bare JSON array of run records (``peftbench results``)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file.") from None
    except (OSError, ValueError) as exc:  # ValueError: bad JSON, not UTF-8
        raise UsageError(f"{path}: not readable JSON ({exc}).") from None
    if isinstance(data, list):
        runs = _check_runs(data, str(path))
        return Reference({"suite": None, "model": _models(runs), "date": None}, runs, path)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise UsageError(f"{path}: not a peftbench reference file (no \"format\": "
                         f"\"{FORMAT}\").")
    if int(data.get("format_version", 0)) > FORMAT_VERSION:
        raise UsageError(f"{path}: reference format {data['format_version']} is newer than "
                         "this peftbench reads; upgrade peftbench.")
    meta = {k: v for k, v in data.items() if k != "runs"}
    return Reference(meta, _check_runs(data.get("runs"), str(path)), path)


def load(name: str | None = None) -> Reference:
    """The shipped reference ``name`` (default: quickstart, else the only one)."""
    files = {p.stem: p for p in shipped()}
    if not files:
        raise UsageError("no reference results are shipped with this peftbench "
                         "(src/peftbench/reference/*.json is empty). Pass --db with results "
                         f"of your own, or generate the reference: {REGENERATE}")
    if name is None:
        name = DEFAULT_NAME if DEFAULT_NAME in files else sorted(files)[0]
    if name not in files:
        own = (" A reference file of your own is read with --db FILE.json."
               if name.endswith(".json") or "/" in name else "")
        raise UsageError(f"--reference {name!r}: no such reference (shipped: "
                         f"{', '.join(sorted(files))}).{own}")
    return read(files[name])


def _models(runs: list[dict[str, Any]]) -> str | None:
    names = sorted({str(r["run"]["config"].get("model")) for r in runs
                    if isinstance(r.get("run"), dict) and "config" in r["run"]})
    return ", ".join(names) or None


def _most_common(values: list[Any]) -> Any:
    values = [v for v in values if v]
    return Counter(values).most_common(1)[0][0] if values else None


def build(runs: list[dict[str, Any]], suite: str | None, description: str = "") -> dict[str, Any]:
    """The reference file's content for ``runs`` (tracebacks dropped)."""
    if not runs:
        raise UsageError("no runs to put into the reference (is the suite / database right?).")
    from peftbench import __version__

    finished = [r["run"].get("finished_at") for r in runs if r["run"].get("finished_at")]
    provenance = [r.get("provenance") or {} for r in runs]
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "suite": suite,
        "model": _models(runs),
        "date": max(finished)[:10] if finished else None,
        "peftbench_version": _most_common([(p.get("versions") or {}).get("peftbench")
                                           for p in provenance]) or __version__,
        "git_sha": _most_common([p.get("git_sha") for p in provenance]),
        "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "description": description, "regenerate": REGENERATE,
        "runs": [{k: v for k, v in r.items() if k != "traceback"} for r in runs],
    }
