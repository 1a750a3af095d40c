"""The results store (SQLite): the only package that reads or writes the results database."""

from peftbench.store.db import DEFAULT_DB, FINAL_STATUSES, ResultStore
from peftbench.store.export import FLAT_COLUMNS, flat_row, write_csv, write_json

__all__ = ["DEFAULT_DB", "FINAL_STATUSES", "FLAT_COLUMNS", "ResultStore", "flat_row",
           "write_csv", "write_json"]
