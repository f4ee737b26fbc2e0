"""
The parked calls of stateless clients (fjmcp/mcp/input_required.py) as a
state machine: a handle is good only for its owner, only once, and only
until it expires; an expired call's unanswered questions are refused to
the child, once.
"""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    invariant,
    rule,
    run_state_machine_as_test,
)
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from fjmcp.mcp.input_required import (
    InputWaits,
    Parked,
    may_ask,
    responses_problem,
    same_call,
)

LIFETIME = 10.0
owners = st.tuples(st.integers(1, 3), st.sampled_from(["grant-a", "grant-b"]))


class FakeRouter:
    """
    Where a parked call's refusals and cancellation go.
    """

    def __init__(self) -> None:
        self.refused: list[dict[str, Any]] = []
        self.abandoned: list[Any] = []

    def client_response(self, message: dict[str, Any]) -> bool:
        self.refused.append(message)
        return True

    def abandon(self, stream: Any) -> int:
        self.abandoned.append(stream)
        return 1


class ParkedCalls(RuleBasedStateMachine):
    handles = Bundle("handles")

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.router = FakeRouter()
        self.waits = InputWaits(self.clock, lifetime=LIFETIME)
        # The model: handle -> (owner, parked at, taken, questions).
        self.model: dict[str, tuple[tuple[int, str], float, bool, int]] = {}
        self.expected_refusals = 0
        self.expected_cancellations = 0

    @rule(target=handles, owner=owners, questions=st.integers(0, 3))
    def park(self, owner: tuple[int, str], questions: int) -> str:
        parked = Parked(owner, object(), self.router, {"method": "tools/call"})  # type: ignore[arg-type]
        for i in range(questions):
            parked.message({"jsonrpc": "2.0", "id": f"fjmcp-{i}", "method": "roots/list"})
        handle = self.waits.park(parked)
        assert handle not in self.model
        self.model[handle] = (owner, self.clock.seconds(), False, questions)
        return handle

    @rule(handle=handles, owner=owners)
    def peek_and_take(self, handle: str, owner: tuple[int, str]) -> None:
        real_owner, at, taken, questions = self.model[handle]
        alive = not taken and self.clock.seconds() < at + LIFETIME
        found = self.waits.peek(handle, owner)
        if alive and owner == real_owner:
            assert found is not None and found.owner == owner
            self.waits.take(handle)
            self.model[handle] = (real_owner, at, True, questions)
        else:
            assert found is None

    @rule(handle=handles)
    def tampered(self, handle: str) -> None:
        owner = self.model[handle][0]
        assert self.waits.peek(handle + "x", owner) is None
        assert self.waits.peek(None, owner) is None

    @rule(seconds=st.floats(0, 2 * LIFETIME))
    def time_passes(self, seconds: float) -> None:
        before = self.clock.seconds()
        self.clock.advance(seconds)
        for _, at, taken, questions in self.model.values():
            if not taken and before < at + LIFETIME <= self.clock.seconds():
                self.expected_refusals += questions
                self.expected_cancellations += 1

    @invariant()
    def expired_calls_cancelled_and_their_questions_refused_once(self) -> None:
        assert len(self.router.refused) == self.expected_refusals
        assert len(self.router.abandoned) == self.expected_cancellations
        assert all(r["error"]["code"] == -32601 for r in self.router.refused)


class ParkedCallsTests(SynchronousTestCase):
    def test_handles_as_a_state_machine(self) -> None:
        run_state_machine_as_test(ParkedCalls)


class RuleTests(SynchronousTestCase):
    def test_who_may_be_asked(self) -> None:
        call = {"method": "tools/call"}
        sampling = {"method": "sampling/createMessage", "id": "fjmcp-1"}
        self.assertTrue(may_ask(call, {"sampling": {}}, sampling))
        self.assertFalse(may_ask(call, {}, sampling))
        self.assertFalse(may_ask(call, {"sampling": True}, sampling))
        self.assertFalse(may_ask({"method": "tools/list"}, {"sampling": {}}, sampling))
        self.assertFalse(may_ask(call, {"sampling": {}}, {"method": "ping", "id": 1}))

    def test_a_follow_up_repeats_its_call(self) -> None:
        call = {"method": "tools/call", "params": {"name": "a", "arguments": {"x": 1}}}
        follow: dict[str, Any] = {
            "method": "tools/call",
            "params": {
                "name": "a",
                "arguments": {"x": 1},
                "inputResponses": {},
                "requestState": "s",
                "_meta": {},
            },
        }
        self.assertTrue(same_call(call, follow))
        follow["params"]["arguments"] = {"x": 2}
        self.assertFalse(same_call(call, follow))

    def test_answers_are_objects(self) -> None:
        self.assertIsNone(responses_problem({"k": {}}))
        self.assertIsNotNone(responses_problem({"k": 5}))
        self.assertIsNotNone(responses_problem([]))
