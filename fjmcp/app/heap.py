"""
The daemon's garbage collector settings: what it costs the requests it
pauses.

CPython's collector stops the reactor while it runs, and every request in
flight waits.  A full (oldest-generation) collection walks every tracked
object, most of which were made at start-up (modules, the resource tree,
the option tables) and live as long as the process: measured under load at
16 sessions (docs/benchmarks.md), such a pause took up to 33 ms, several
times the median request, and set the p99.  Freezing the start-up heap
takes those objects out of every later collection; cyclic garbage made
while serving is collected as before.
"""

from __future__ import annotations

import gc

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorCore
from twisted.logger import Logger

log = Logger()


class FrozenStartupHeap(Service):
    """
    Once the reactor runs (every service started, the listeners bound):
    collect what start-up left behind, then freeze the rest.
    """

    def __init__(self, reactor: IReactorCore) -> None:
        self._reactor = reactor

    def startService(self) -> None:
        super().startService()
        self._reactor.callWhenRunning(self.freeze)

    def freeze(self) -> None:
        gc.collect()
        gc.freeze()
        log.debug("froze {count} start-up objects", count=gc.get_freeze_count())
