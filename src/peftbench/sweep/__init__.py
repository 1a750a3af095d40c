"""Sweeps: suites (YAML grids) expanded into runs, executed locally or on Ray, stored.

::

    suite = load_suite("smoke")                      # or a path to a suite YAML
    runs = plan_runs(expand(suite), Path("runs/smoke"))
    with ResultStore("results.sqlite") as store:
        store.add_to_suite(suite.spec.name, [run.run_hash for run in runs])
        todo = runs_to_do(store, runs)
        counts = execute_runs(todo, store, suite.spec.name, workers=2)

Runs execute in processes of their own, forked from a pre-importing fork server: a script
that calls :func:`execute_runs` needs the usual ``if __name__ == "__main__":`` guard.
"""

from peftbench.sweep.driver import execute_runs, exit_code, runs_to_do
from peftbench.sweep.grid import expand
from peftbench.sweep.plan import PlannedRun, plan_runs
from peftbench.sweep.suite import Suite, SuiteSpec, check_names, load_suite, shipped_suites

__all__ = ["PlannedRun", "Suite", "SuiteSpec", "check_names", "execute_runs", "exit_code",
           "expand", "load_suite", "plan_runs", "runs_to_do", "shipped_suites"]
