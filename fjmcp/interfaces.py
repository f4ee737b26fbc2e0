"""
The reactor the broker runs on, named once.  Components that need more than
one of Twisted's reactor interfaces (time and processes for sessions, core
and threads for the database pool, TCP for listeners) take an
L{IBrokerReactor} instead of C{Any}; those that need one take that one
(most take an C{IReactorTime}, so tests pass a L{twisted.internet.task.Clock}).

Twisted types its global reactor as a make-believe interface that combines
the commonly implemented ones (core, time, FD set, TCP, processes); this is
that type, for annotations only (import it under C{TYPE_CHECKING}).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from twisted.internet import _IReactorCommon as IBrokerReactor

__all__ = ["IBrokerReactor"]
