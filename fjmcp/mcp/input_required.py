"""
Stateless calls that wait for their client's input (the 2026-07-28
revision's C{input_required} results): a handshake-era child asks its
client (sampling, elicitation, roots) in the middle of a call; a stateless
client can only be asked in the call's answer, and answers in a new request
that repeats the call with its C{inputResponses} and the C{requestState}
the broker gave it.

Between the two the child's call stays pending here, "parked": the
C{requestState} is an unguessable handle to it, good once, for its owner
(user and grant) and that same call only, for L{PARK_LIFETIME} seconds;
then the child's questions are refused to it and its call is cancelled.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from typing import Any

import attrs
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from fjmcp.mcp.router import SessionRouter
from fjmcp.mcp.session import Session
from fjmcp.mcp.stateless import refusal_to_child

# Which client capability each question needs.
CAPABILITY_OF = {
    "sampling/createMessage": "sampling",
    "elicitation/create": "elicitation",
    "roots/list": "roots",
}
# The calls whose answer may be a question.
ASKING = frozenset({"tools/call", "prompts/get", "resources/read"})
# What a follow-up adds to the call it repeats.
FOLLOW_UP = frozenset({"_meta", "inputResponses", "requestState"})
PARK_LIFETIME = 120.0


def may_ask(call: Mapping[str, Any], capabilities: Any, question: Mapping[str, Any]) -> bool:
    """
    Whether the child's C{question} can go to the client of C{call}: a call
    that may be answered with a question, and a client that declared the
    capability it needs.
    """
    needed = CAPABILITY_OF.get(str(question.get("method")))
    return (
        call.get("method") in ASKING
        and needed is not None
        and isinstance(capabilities, dict)
        and isinstance(capabilities.get(needed), dict)
    )


def same_call(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """
    Whether a follow-up repeats the call it answers (its additions aside).
    """

    def core(message: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
        params = message.get("params")
        params = params if isinstance(params, dict) else {}
        return message.get("method"), {k: v for k, v in params.items() if k not in FOLLOW_UP}

    return core(a) == core(b)


def responses_problem(responses: Any) -> str | None:
    """
    What is wrong with a follow-up's C{inputResponses}, if anything.
    """
    if not isinstance(responses, dict):
        return "inputResponses must be an object"
    for key, value in responses.items():
        if not isinstance(value, dict):
            return f"inputResponses[{key!r}] must be an object"
    return None


@attrs.define(eq=False)
class Parked:
    """
    A call waiting for its client's input.  It stands in for the call's
    answer in the router meanwhile: further questions of the child's are
    kept, and should the child finish the call anyway, its answer.
    """

    owner: tuple[int, str]
    session: Session
    router: SessionRouter
    call: dict[str, Any]
    # The child's questions not answered yet, by the broker's id for each.
    asked: dict[str, dict[str, Any]] = attrs.Factory(dict)
    final: dict[str, Any] | None = None
    expiry: IDelayedCall | None = None

    def message(self, message: dict[str, Any]) -> None:
        if "id" in message and "method" in message:
            self.asked[str(message["id"])] = message

    def finish(self, response: dict[str, Any]) -> None:
        self.final = response

    def refuse_all(self) -> None:
        """
        Refuse to the child every question of its still unanswered.
        """
        for question in self.asked.values():
            self.router.client_response(refusal_to_child(question))
        self.asked.clear()

    def input_required(self, handle: str) -> dict[str, Any]:
        """
        The result that asks the client, under the handle it answers with.
        """
        return {
            "resultType": "input_required",
            "inputRequests": {
                key: {"method": q["method"], **({"params": q["params"]} if "params" in q else {})}
                for key, q in self.asked.items()
            },
            "requestState": handle,
        }


class InputWaits:
    """
    The parked calls, by handle.
    """

    def __init__(self, clock: IReactorTime, lifetime: float = PARK_LIFETIME) -> None:
        self._clock = clock
        self._lifetime = lifetime
        self._parked: dict[str, Parked] = {}

    def park(self, parked: Parked) -> str:
        handle = secrets.token_urlsafe(32)
        parked.expiry = self._clock.callLater(self._lifetime, self._expire, handle)
        self._parked[handle] = parked
        return handle

    def peek(self, handle: Any, owner: tuple[int, str]) -> Parked | None:
        """
        The call parked under C{handle} when it is C{owner}'s.
        """
        parked = self._parked.get(handle) if isinstance(handle, str) else None
        return parked if parked is not None and parked.owner == owner else None

    def take(self, handle: str) -> Parked:
        parked = self._parked.pop(handle)
        if parked.expiry is not None and parked.expiry.active():
            parked.expiry.cancel()
        return parked

    def _expire(self, handle: str) -> None:
        """
        Nobody came back: the child's questions are refused and its call
        cancelled (so nothing of it waits on, nor keeps the session awake).
        """
        parked = self._parked.pop(handle, None)
        if parked is None:
            return
        parked.refuse_all()
        parked.router.abandon(parked)
