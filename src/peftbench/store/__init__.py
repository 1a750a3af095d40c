"""The results store (SQLite): the only package that reads or writes the results database."""

from peftbench.store.db import DEFAULT_DB, FINAL_STATUSES, ResultStore
from peftbench.store.export import FLAT_COLUMNS, flat_row, write_csv, write_json
from peftbench.store.lock import RunLock

__all__ = ["DEFAULT_DB", "FINAL_STATUSES", "FLAT_COLUMNS", "ResultStore", "RunLock",
           "flat_row", "write_csv", "write_json"]
