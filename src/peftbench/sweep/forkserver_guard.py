"""Imported first by the runs' fork server: Ctrl-C must not interrupt its preload.

The fork server shares the terminal's process group, so a Ctrl-C during its ~5 s import of
torch & co. printed a ``KeyboardInterrupt`` traceback from inside multiprocessing. The
sweep itself handles Ctrl-C (and kills the run processes); the fork server ignores it,
as multiprocessing makes it do anyway once its preload is done. Run processes put Python's
default handler back (``worker.restore_interrupts``).

Import it only as the fork server's first preload: importing it ignores Ctrl-C.
"""

from __future__ import annotations

import signal

signal.signal(signal.SIGINT, signal.SIG_IGN)
