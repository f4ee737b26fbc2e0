"""
The daemon's garbage-collector set-up (fjmcp/app/heap.py).
"""

from __future__ import annotations

import gc
import weakref

from twisted.internet.testing import MemoryReactor
from twisted.trial.unittest import SynchronousTestCase

from fjmcp.app.heap import FrozenStartupHeap


class Cycle:
    me: Cycle | None = None


class FrozenStartupHeapTests(SynchronousTestCase):
    def test_start_up_objects_left_out_of_later_collections(self) -> None:
        """
        Once the reactor runs, what start-up built is frozen (no later
        collection walks it) and its garbage collected first; nothing is
        frozen before the reactor runs.
        """
        self.addCleanup(gc.unfreeze)
        gc.unfreeze()
        reactor = MemoryReactor()
        service = FrozenStartupHeap(reactor)
        service.startService()
        self.assertEqual(gc.get_freeze_count(), 0)
        garbage = Cycle()
        garbage.me = garbage
        gone = weakref.ref(garbage)
        del garbage
        kept = Cycle()
        for call, args, kwargs in reactor.whenRunningHooks:
            call(*args, **kwargs)
        self.assertIsNone(gone())
        frozen = gc.get_freeze_count()
        self.assertGreater(frozen, 0)
        # Frozen: no longer in any generation a collection walks.
        self.assertFalse(any(kept is o for o in gc.get_objects()))
