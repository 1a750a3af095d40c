"""Find a dataset's upstream release files under ``--data-dir`` (any subfolder or zip).

A release is recognised by its file names (``in_domain_train.tsv`` ...), wherever the user
unpacked it: directly in the directory, in a subfolder, or inside a ``.zip`` there. Copies
that are not the raw release (e.g. CoLA's ``tokenized/``) are skipped by folder name.
"""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from peftbench.errors import DataError


@dataclass(frozen=True)
class SourceFile:
    """One release file, on disk or inside a zip; ``display`` is how messages name it."""

    name: str
    display: str
    path: Path
    member: str | None = None

    def read_bytes(self) -> bytes:
        try:
            if self.member is None:
                return self.path.read_bytes()
            with zipfile.ZipFile(self.path) as archive:
                return archive.read(self.member)
        except (OSError, zipfile.BadZipFile, KeyError) as exc:
            raise DataError(f"{self.display}: cannot read the file: {exc}") from exc


@dataclass
class _Candidate:
    where: str  # folder or "archive.zip!prefix/"
    files: dict[str, SourceFile] = field(default_factory=dict)
    in_zip: bool = False
    depth: int = 0


def find_release(
    data_dir: str | Path,
    task: str,
    required: Sequence[str],
    optional: Sequence[str] = (),
    exclude: Sequence[str] = ("tokenized",),
    prefer: Sequence[str] = (),
    hint: str = "",
) -> dict[str, SourceFile]:
    """The release files ``required`` (+ those of ``optional`` present), found together.

    Raises DataError naming what was looked for and where when nothing (or only part of the
    release) is found, or when several different copies make the choice ambiguous.
    """
    root = Path(data_dir).expanduser()
    if not root.exists():
        raise DataError(f"task '{task}': --data-dir {root} does not exist")
    names = [*required, *optional]
    candidates = _folder_candidates(root, names, exclude) + _zip_candidates(root, names, exclude)
    complete = [c for c in candidates if all(n in c.files for n in required)]
    wanted = ", ".join(required)
    if not complete:
        if candidates:
            best = candidates[0]
            missing = [n for n in required if n not in best.files]
            raise DataError(
                f"task '{task}': found {required[0]} in {best.where} but not "
                f"{', '.join(missing)} beside it; the release needs {wanted} in one folder"
            )
        raise DataError(
            f"task '{task}': no {required[0]} in {root} or its subfolders (or zips there); "
            f"expected the upstream release files {wanted}. {hint}".rstrip()
        )

    def rank(c: _Candidate) -> tuple[int, int, int]:
        return (0 if Path(c.where.rstrip("/")).name in prefer else 1, int(c.in_zip), c.depth)

    complete.sort(key=rank)
    if len(complete) > 1 and rank(complete[0]) == rank(complete[1]):
        places = ", ".join(c.where for c in complete)
        raise DataError(
            f"task '{task}': several copies of {required[0]} found ({places}); "
            "point --data-dir at the folder of the one to use"
        )
    return complete[0].files


def _excluded(parts: Sequence[str], exclude: Sequence[str]) -> bool:
    return any(part in exclude for part in parts)


def _folder_candidates(root: Path, names: list[str], exclude: Sequence[str]) -> list[_Candidate]:
    if not root.is_dir():
        return []
    found = []
    for path in sorted(root.rglob(names[0])):
        relative = path.relative_to(root)
        if not path.is_file() or _excluded(relative.parts[:-1], exclude):
            continue
        folder = path.parent
        candidate = _Candidate(str(folder), depth=len(relative.parts))
        for name in names:
            if (folder / name).is_file():
                candidate.files[name] = SourceFile(name, str(folder / name), folder / name)
        found.append(candidate)
    return found


def _zip_candidates(root: Path, names: list[str], exclude: Sequence[str]) -> list[_Candidate]:
    zips = [root] if root.is_file() else sorted(root.rglob("*.zip"))
    found = []
    for zip_path in zips:
        try:
            with zipfile.ZipFile(zip_path) as archive:
                members = set(archive.namelist())
        except (OSError, zipfile.BadZipFile):
            continue
        for member in sorted(members):
            parts = member.split("/")
            if parts[-1] != names[0] or _excluded(parts[:-1], exclude):
                continue
            prefix = member[: -len(names[0])]
            candidate = _Candidate(f"{zip_path}!{prefix}", in_zip=True, depth=len(parts))
            for name in names:
                if prefix + name in members:
                    display = f"{zip_path}!{prefix}{name}"
                    candidate.files[name] = SourceFile(name, display, zip_path, prefix + name)
            found.append(candidate)
    return found
