"""
The log pipeline's own behaviour: the line an operator reads, its time
stamp, and the scrubbing of secrets.
"""

from __future__ import annotations

import io
import time

from hypothesis import given
from hypothesis import strategies as st
from twisted.logger import LogLevel, formatTime
from twisted.trial.unittest import SynchronousTestCase

from fjmcp.logs import REDACTED, _SecondStamp, make_observer


class SecondStampTests(SynchronousTestCase):
    @given(
        st.lists(
            st.floats(min_value=-1e9, max_value=4e9, allow_nan=False, allow_infinity=False)
            | st.none(),
            max_size=30,
        )
    )
    def test_same_as_twisted_for_any_sequence(self, times: list[float | None]) -> None:
        """
        Computed once per second, the stamp is still exactly Twisted's for
        every time in any order (fractions, negatives, repeats, None).
        """
        stamp = _SecondStamp()
        for when in sorted(t for t in times if t is not None) + times:
            self.assertEqual(stamp(when), formatTime(when))


class TextLineTests(SynchronousTestCase):
    def test_line_stamped_scrubbed_and_flushed(self) -> None:
        out = io.StringIO()
        observe = make_observer(out, "text", LogLevel.info, ["gto_verysecretvalue"])
        now = time.time()
        observe(
            {
                "log_time": now,
                "log_level": LogLevel.info,
                "log_namespace": "fjmcp.test",
                "log_format": "renewed {what}",
                "what": "gto_verysecretvalue",
            }
        )
        observe(
            {
                "log_time": now,
                "log_level": LogLevel.debug,
                "log_namespace": "fjmcp.test",
                "log_format": "not shown at info",
            }
        )
        self.assertEqual(out.getvalue(), f"{formatTime(now)} [fjmcp.test] renewed {REDACTED}\n")
