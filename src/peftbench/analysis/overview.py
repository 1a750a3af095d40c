"""Every analysis of a set of run records, computed once (for the report and the CLI)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from peftbench.analysis.convergence import (
    CONVERGED,
    THRESHOLDS,
    CellConvergence,
    ClaimVerdict,
    VersusFull,
    analyse,
    check_claim,
)
from peftbench.analysis.data_requirement import (
    Requirement,
    TypeRequirement,
    by_task_type,
    requirements,
)
from peftbench.analysis.decision import Decision, DecisionConfig, decision_table
from peftbench.analysis.records import (
    Cell,
    Record,
    build_cells,
    set_aside_failures,
    split_runs,
)
from peftbench.analysis.selective import Finding, Variant, findings, variants


@dataclass
class Analysis:
    records: list[Record]
    failed: list[Record]  # failed, diverged or without a score: never averaged
    cells: list[Cell]
    convergence: list[CellConvergence]
    versus: list[VersusFull]
    claims: list[ClaimVerdict]
    requirements: list[Requirement]
    type_requirements: list[TypeRequirement]
    decisions: list[Decision]
    config: DecisionConfig
    selective: list[Variant]  # the selective-training study (empty when none was run)
    selective_findings: list[Finding]

    def convergence_of(self, cell: Cell) -> CellConvergence | None:
        return next((c for c in self.convergence if c.key == cell.key), None)

    def versus_of(self, cell: Cell) -> VersusFull | None:
        return next((v for v in self.versus if v.peft.key == cell.key), None)


def analyse_records(records: Iterable[Record], config: DecisionConfig | None = None,
                    thresholds: tuple[float, ...] = THRESHOLDS,
                    threshold: float = CONVERGED) -> Analysis:
    """Cells, convergence, the claim, data requirements, the decision table and the
    selective-training study."""
    config = config or DecisionConfig()
    records = list(records)
    ok, failed = split_runs(records)
    cells = build_cells(ok)
    failed = set_aside_failures(failed, cells)  # another setup's failures: set aside
    convergence, versus = analyse(cells, thresholds, threshold)
    claims = check_claim(cells, versus, config.scales.of)
    reqs = requirements(cells, versus)
    aside = {id(r) for c in cells for r in c.set_aside}  # never averaged in, here either
    study = variants([r for r in ok if id(r) not in aside])
    return Analysis(records, failed, cells, convergence, versus, claims, reqs,
                    by_task_type(reqs), decision_table(cells, config), config, study,
                    findings(study))
