"""
The routing of one MCP session between HTTP exchanges and its stdio child:
id rewriting both ways, where each message from the child goes, and that
every client request is answered exactly once whatever happens.
"""

from __future__ import annotations

import copy
import itertools
import json
from collections.abc import Callable
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    precondition,
    rule,
)
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from fjmcp.mcp.router import INTERNAL_ERROR, REQUEST_CANCELLED, REQUEST_TIMEOUT, SessionRouter


def same(a: Any, b: Any) -> bool:
    """
    Equal as JSON, so C{1}, C{1.0} and C{True} are told apart.
    """
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


class FakeStream:
    """
    Records what the router delivers for one client request, in order.
    """

    def __init__(self, log: list[tuple[Any, dict[str, Any]]] | None = None) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self._log = log

    def message(self, message: dict[str, Any]) -> None:
        self.events.append(("message", message))
        if self._log is not None:
            self._log.append((self, message))

    def finish(self, response: dict[str, Any]) -> None:
        self.events.append(("finish", response))

    @property
    def messages(self) -> list[dict[str, Any]]:
        return [m for kind, m in self.events if kind == "message"]

    @property
    def finished(self) -> list[dict[str, Any]]:
        return [m for kind, m in self.events if kind == "finish"]

    def well_formed(self) -> bool:
        """
        At most one finish, and nothing after it.
        """
        kinds = [kind for kind, _ in self.events]
        return "finish" not in kinds[:-1]


class Harness:
    def __init__(self) -> None:
        self.to_child: list[dict[str, Any]] = []
        self.standalone: list[dict[str, Any]] = []
        self.router = SessionRouter(self.to_child.append, self.standalone.append)

    def request(
        self, client_id: Any, method: str = "tools/call", params: Any = None
    ) -> tuple[FakeStream, dict[str, Any]]:
        """
        A client request; returns its stream and what the child got.
        """
        stream = FakeStream()
        message: dict[str, Any] = {"jsonrpc": "2.0", "id": client_id, "method": method}
        if params is not None:
            message["params"] = params
        before = len(self.to_child)
        self.router.client_request(message, stream)
        self.assertOneMore(before)
        return stream, self.to_child[-1]

    def assertOneMore(self, before: int) -> None:
        assert len(self.to_child) == before + 1, self.to_child[before:]

    def answer(self, sent: dict[str, Any], result: Any = None) -> None:
        """
        The child answers a request it got, echoing its id.
        """
        if result is None:
            result = {"echo": sent.get("params")}
        self.router.child_message({"jsonrpc": "2.0", "id": sent["id"], "result": result})

    def child_request(self, child_id: Any, method: str = "sampling/createMessage", **params: Any):
        message = {"jsonrpc": "2.0", "id": child_id, "method": method, "params": params}
        self.router.child_message(message)
        return message


def log_message(text: str, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    params: dict[str, Any] = {"level": "info", "data": text}
    if meta is not None:
        params["_meta"] = meta
    return {"jsonrpc": "2.0", "method": "notifications/message", "params": params}


def progress(token: Any, value: int = 1) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "method": "notifications/progress",
        "params": {"progressToken": token, "progress": value, "total": 10},
    }


def cancelled(request_id: Any) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "method": "notifications/cancelled",
        "params": {"requestId": request_id, "reason": "user gave up"},
    }


class RoundTripTests(SynchronousTestCase):
    def test_round_trip(self) -> None:
        """
        The child gets the request under a fresh integer id; the client gets
        the child's response under its own id.
        """
        h = Harness()
        stream, sent = h.request(7, "tools/list", {"cursor": "x"})
        self.assertEqual(
            sent, {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {"cursor": "x"}}
        )
        self.assertEqual(h.router.in_flight, 1)
        h.answer(sent, {"tools": []})
        self.assertEqual(stream.finished, [{"jsonrpc": "2.0", "id": 7, "result": {"tools": []}}])
        self.assertEqual(stream.messages, [])
        self.assertEqual(h.router.in_flight, 0)
        self.assertEqual(h.standalone, [])

    def test_error_response(self) -> None:
        h = Harness()
        stream, sent = h.request("q")
        error = {"code": -32602, "message": "bad params"}
        h.router.child_message({"jsonrpc": "2.0", "id": sent["id"], "error": error})
        self.assertEqual(stream.finished, [{"jsonrpc": "2.0", "id": "q", "error": error}])

    def test_child_ids_never_reused(self) -> None:
        h = Harness()
        seen: set[int] = set()
        for _ in range(5):
            _, sent = h.request(1)
            self.assertNotIn(sent["id"], seen)
            seen.add(sent["id"])
            h.answer(sent)
        self.assertEqual(h.router.in_flight, 0)

    def test_same_id_out_of_order(self) -> None:
        """
        Two requests with the same client id, answered in reverse order,
        each reach their own stream.
        """
        h = Harness()
        first, sent1 = h.request(1, params={"who": "first"})
        second, sent2 = h.request(1, params={"who": "second"})
        self.assertNotEqual(sent1["id"], sent2["id"])
        h.answer(sent2)
        self.assertEqual(first.finished, [])
        self.assertEqual(second.finished[0]["result"], {"echo": {"who": "second"}})
        h.answer(sent1)
        self.assertEqual(first.finished[0]["result"], {"echo": {"who": "first"}})
        self.assertEqual(first.finished[0]["id"], 1)
        self.assertEqual(second.finished[0]["id"], 1)

    def test_weird_ids(self) -> None:
        """
        Whatever the client's id is, the response carries exactly it back.
        """
        weird = ["abc", "", 0, -5, 2**70, 1.5, True, 1.0, 1, "1", [1, 2], {"a": [1]}, "ünï"]
        h = Harness()
        pairs = [h.request(w) for w in weird]
        for _, sent in reversed(pairs):
            h.answer(sent)
        for w, (stream, _) in zip(weird, pairs, strict=True):
            [response] = stream.finished
            self.assertTrue(same(response["id"], w), (response["id"], w))
            self.assertIs(type(response["id"]), type(w))

    def test_missing_id_is_not_a_request(self) -> None:
        h = Harness()
        self.assertRaises(ValueError, h.router.client_request, {"method": "x"}, FakeStream())
        self.assertRaises(
            ValueError, h.router.client_request, {"id": None, "method": "x"}, FakeStream()
        )
        self.assertEqual(h.to_child, [])
        self.assertEqual(h.router.in_flight, 0)

    def test_unknown_child_response_dropped(self) -> None:
        h = Harness()
        stream, sent = h.request(1)
        for bad in [99, "1", str(sent["id"]), True, None, 1.0, [1]]:
            h.router.child_message({"jsonrpc": "2.0", "id": bad, "result": {}})
        self.assertEqual(stream.events, [])
        self.assertEqual(h.standalone, [])
        self.assertEqual(h.router.in_flight, 1)

    def test_garbage_from_child(self) -> None:
        """
        Anything that is not a JSON-RPC message is dropped without a trace.
        """
        h = Harness()
        stream, _ = h.request(1)
        h.request(2)
        for junk in [
            5,
            "x",
            None,
            [],
            [[{"jsonrpc": "2.0", "method": "notifications/message"}]],
            {"foo": 1},
            {"id": 1},
            {"method": 5, "id": 1},
            {"jsonrpc": "2.0", "method": "notifications/progress"},
            {"jsonrpc": "2.0", "method": "notifications/progress", "params": 3},
            {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": []},
            {"jsonrpc": "2.0", "method": "notifications/cancelled"},
        ]:
            h.router.child_message(junk)
        self.assertEqual(stream.events, [])
        self.assertEqual(h.router.in_flight, 2)
        # The two progress notifications without a usable token go standalone.
        self.assertEqual([m["method"] for m in h.standalone], ["notifications/progress"] * 2)

    def test_callers_dicts_untouched(self) -> None:
        h = Harness()
        request = {
            "jsonrpc": "2.0",
            "id": "r",
            "method": "tools/call",
            "params": {"name": "x", "_meta": {"progressToken": "tok", "other": 1}},
        }
        before = copy.deepcopy(request)
        stream = FakeStream()
        h.router.client_request(request, stream)
        self.assertEqual(request, before)
        sent = h.to_child[-1]
        self.assertEqual(sent["params"]["_meta"], {"progressToken": sent["id"], "other": 1})

        child_progress = progress(sent["id"])
        child_before = copy.deepcopy(child_progress)
        h.router.child_message(child_progress)
        self.assertEqual(child_progress, child_before)

        server = {"jsonrpc": "2.0", "id": 3, "method": "roots/list"}
        server_before = copy.deepcopy(server)
        h.router.child_message(server)
        self.assertEqual(server, server_before)
        answer = {"jsonrpc": "2.0", "id": stream.messages[-1]["id"], "result": {"roots": []}}
        answer_before = copy.deepcopy(answer)
        self.assertTrue(h.router.client_response(answer))
        self.assertEqual(answer, answer_before)

        cancel = cancelled("r")
        cancel_before = copy.deepcopy(cancel)
        h.router.client_notification(cancel)
        self.assertEqual(cancel, cancel_before)

        response = {"jsonrpc": "2.0", "id": sent["id"], "result": {}}
        response_before = copy.deepcopy(response)
        h.router.child_message(response)
        self.assertEqual(response, response_before)

    def test_reentrant_child(self) -> None:
        """
        A child that answers while it is being written to (or a stream that
        sends the next request from finish()) is routed correctly.
        """
        streams: list[FakeStream] = []
        router: SessionRouter

        def to_child(message: dict[str, Any]) -> None:
            if "method" in message and "id" in message:
                router.child_message({"jsonrpc": "2.0", "id": message["id"], "result": {"ok": 1}})

        class Chaining(FakeStream):
            def finish(self, response: dict[str, Any]) -> None:
                super().finish(response)
                if len(streams) < 3:
                    nxt = Chaining()
                    streams.append(nxt)
                    router.client_request({"jsonrpc": "2.0", "id": 1, "method": "ping"}, nxt)

        router = SessionRouter(to_child, lambda m: None)
        first = Chaining()
        streams.append(first)
        router.client_request({"jsonrpc": "2.0", "id": 1, "method": "ping"}, first)
        self.assertEqual(len(streams), 3)
        for s in streams:
            self.assertEqual(s.finished, [{"jsonrpc": "2.0", "id": 1, "result": {"ok": 1}}])
        self.assertEqual(router.in_flight, 0)


class NotificationTests(SynchronousTestCase):
    def test_initialized_forwarded_unchanged(self) -> None:
        h = Harness()
        note = {"jsonrpc": "2.0", "method": "notifications/initialized"}
        h.router.client_notification(note)
        h.router.client_notification(
            {"jsonrpc": "2.0", "method": "notifications/roots/list_changed"}
        )
        self.assertEqual(
            h.to_child,
            [note, {"jsonrpc": "2.0", "method": "notifications/roots/list_changed"}],
        )

    def test_client_progress_forwarded_unchanged(self) -> None:
        """
        Progress the client reports on one of the child's requests carries
        the child's own token, which needs no rewriting.
        """
        h = Harness()
        h.router.client_notification(progress("child-token"))
        self.assertEqual(h.to_child, [progress("child-token")])

    def test_progress_by_token(self) -> None:
        """
        Progress goes to the request that asked for it, with the client's
        token restored, even when two requests used the same token.
        """
        h = Harness()
        meta = {"_meta": {"progressToken": 1}}
        a, sent_a = h.request(1, params=meta)
        b, sent_b = h.request(1, params=meta)
        token_a = sent_a["params"]["_meta"]["progressToken"]
        token_b = sent_b["params"]["_meta"]["progressToken"]
        self.assertNotEqual(token_a, token_b)
        h.router.child_message(progress(token_b, 3))
        self.assertEqual(a.messages, [])
        self.assertEqual(b.messages, [progress(1, 3)])
        h.router.child_message(progress(token_a, 4))
        self.assertEqual(a.messages, [progress(1, 4)])
        self.assertEqual(h.standalone, [])

    def test_string_token_restored(self) -> None:
        h = Harness()
        a, sent = h.request("x", params={"_meta": {"progressToken": "abc"}})
        h.router.child_message(progress(sent["params"]["_meta"]["progressToken"]))
        self.assertEqual(a.messages, [progress("abc")])

    def test_invalid_token_not_rewritten(self) -> None:
        """
        Only strings and integers are progress tokens; anything else is
        passed through as it is and no progress is expected for it.
        """
        h = Harness()
        for bad in [True, None, 1.5, [1], {"t": 1}]:
            params = {"_meta": {"progressToken": bad}}
            _, sent = h.request("x", params=params)
            self.assertEqual(sent["params"], params)

    def test_progress_unknown_token_standalone(self) -> None:
        h = Harness()
        a, _ = h.request(1, params={"_meta": {"progressToken": "t"}})
        h.router.child_message(progress("t"))
        h.router.child_message(progress("unknown"))
        self.assertEqual(a.messages, [])
        self.assertEqual(h.standalone, [progress("t"), progress("unknown")])

    def test_progress_after_finish_dropped(self) -> None:
        """
        Late progress for a finished request names a token only the router
        knew; the client could not place it, so it goes nowhere.
        """
        h = Harness()
        a, sent = h.request(1, params={"_meta": {"progressToken": "t"}})
        b, _ = h.request(2)
        h.answer(sent)
        h.router.child_message(progress(sent["params"]["_meta"]["progressToken"]))
        self.assertEqual(a.messages, [])
        self.assertEqual(b.messages, [])
        self.assertEqual(h.standalone, [])

    def test_progress_for_request_without_token(self) -> None:
        """
        A request that asked for no progress gets none, even if the child
        names its id as a token.
        """
        h = Harness()
        a, sent = h.request(1)
        h.router.child_message(progress(sent["id"]))
        self.assertEqual(a.messages, [])

    def test_logging_single_request(self) -> None:
        h = Harness()
        a, _ = h.request(1)
        h.router.child_message(log_message("one"))
        self.assertEqual(a.messages, [log_message("one")])
        self.assertEqual(h.standalone, [])

    def test_logging_several_requests(self) -> None:
        h = Harness()
        a, _ = h.request(1)
        b, _ = h.request(2)
        h.router.child_message(log_message("two"))
        self.assertEqual(a.messages, [])
        self.assertEqual(b.messages, [])
        self.assertEqual(h.standalone, [log_message("two")])

    def test_logging_no_request(self) -> None:
        h = Harness()
        h.router.child_message(log_message("none"))
        self.assertEqual(h.standalone, [log_message("none")])

    def test_logging_by_token(self) -> None:
        """
        A notification whose C{_meta} names a request's progress token goes
        to that request even when several are in flight.
        """
        h = Harness()
        a, _ = h.request(1)
        b, sent_b = h.request(2, params={"_meta": {"progressToken": "pb"}})
        token = sent_b["params"]["_meta"]["progressToken"]
        h.router.child_message(log_message("for b", {"progressToken": token}))
        self.assertEqual(a.messages, [])
        self.assertEqual(b.messages, [log_message("for b", {"progressToken": "pb"})])

    def test_list_changed_always_standalone(self) -> None:
        h = Harness()
        a, sent = h.request(1, params={"_meta": {"progressToken": "t"}})
        token = sent["params"]["_meta"]["progressToken"]
        notes = [
            {"jsonrpc": "2.0", "method": "notifications/tools/list_changed"},
            {"jsonrpc": "2.0", "method": "notifications/prompts/list_changed"},
            {"jsonrpc": "2.0", "method": "notifications/resources/list_changed"},
            {
                "jsonrpc": "2.0",
                "method": "notifications/resources/updated",
                "params": {"uri": "file:///x", "_meta": {"progressToken": token}},
            },
        ]
        for note in notes:
            h.router.child_message(note)
        self.assertEqual(a.messages, [])
        self.assertEqual(h.standalone, notes)


class ServerRequestTests(SynchronousTestCase):
    def test_server_request_to_stream_and_back(self) -> None:
        h = Harness()
        a, sent = h.request(1)
        h.child_request(1, maxTokens=5)
        [forwarded] = a.messages
        self.assertEqual(
            forwarded,
            {
                "jsonrpc": "2.0",
                "id": "fjmcp-1",
                "method": "sampling/createMessage",
                "params": {"maxTokens": 5},
            },
        )
        self.assertEqual(h.router.server_requests_pending, 1)
        h.to_child.clear()
        result = {"role": "assistant", "content": {"type": "text", "text": "hi"}}
        self.assertTrue(
            h.router.client_response({"jsonrpc": "2.0", "id": "fjmcp-1", "result": result})
        )
        self.assertEqual(h.to_child, [{"jsonrpc": "2.0", "id": 1, "result": result}])
        self.assertEqual(h.router.server_requests_pending, 0)
        # Answered once; a second answer is unknown.
        self.assertFalse(
            h.router.client_response({"jsonrpc": "2.0", "id": "fjmcp-1", "result": {}})
        )
        self.assertEqual(len(h.to_child), 1)
        # The client request is unaffected.
        h.answer(sent)
        self.assertEqual(len(a.finished), 1)

    def test_error_answer_mapped_back(self) -> None:
        h = Harness()
        h.child_request("child-7", "elicitation/create")
        [forwarded] = h.standalone
        error = {"code": -1, "message": "User rejected sampling request"}
        self.assertTrue(
            h.router.client_response({"jsonrpc": "2.0", "id": forwarded["id"], "error": error})
        )
        self.assertEqual(h.to_child, [{"jsonrpc": "2.0", "id": "child-7", "error": error}])

    def test_server_request_without_single_request_standalone(self) -> None:
        h = Harness()
        h.child_request(0, "roots/list")
        a, _ = h.request(1)
        b, _ = h.request(2)
        h.child_request(1, "ping")
        self.assertEqual(a.messages, [])
        self.assertEqual(b.messages, [])
        self.assertEqual([m["id"] for m in h.standalone], ["fjmcp-1", "fjmcp-2"])

    def test_a_sessions_routers_number_questions_in_one_sequence(self) -> None:
        """
        The old child (retiring after a token renewal) and the new one each
        ask something: their questions get different ids, so an answer to
        one never reaches the other.
        """
        numbers = itertools.count(1)
        old, new = Harness(), Harness()
        old.router = SessionRouter(old.to_child.append, old.standalone.append, numbers=numbers)
        new.router = SessionRouter(new.to_child.append, new.standalone.append, numbers=numbers)
        old.child_request(1, "roots/list")
        new.child_request(1, "roots/list")
        (asked_old,), (asked_new,) = old.standalone, new.standalone
        self.assertNotEqual(asked_old["id"], asked_new["id"])
        self.assertFalse(new.router.client_response({"jsonrpc": "2.0", "id": asked_old["id"]}))
        self.assertTrue(old.router.client_response({"jsonrpc": "2.0", "id": asked_old["id"]}))

    def test_server_request_by_token(self) -> None:
        h = Harness()
        a, _ = h.request(1)
        b, sent_b = h.request(1, params={"_meta": {"progressToken": 1}})
        token = sent_b["params"]["_meta"]["progressToken"]
        h.child_request(5, _meta={"progressToken": token})
        self.assertEqual(a.messages, [])
        [forwarded] = b.messages
        self.assertEqual(forwarded["params"], {"_meta": {"progressToken": 1}})
        self.assertEqual(forwarded["id"], "fjmcp-1")

    def test_answerable_after_stream_finished(self) -> None:
        h = Harness()
        a, sent = h.request(1)
        h.child_request(42)
        h.answer(sent)
        self.assertEqual(len(a.finished), 1)
        self.assertTrue(h.router.client_response({"jsonrpc": "2.0", "id": "fjmcp-1", "result": {}}))
        self.assertEqual(h.to_child[-1], {"jsonrpc": "2.0", "id": 42, "result": {}})

    def test_unknown_client_response(self) -> None:
        h = Harness()
        h.child_request(1)
        before = list(h.to_child)
        for bad in ["fjmcp-2", "nope", 1, None, ["fjmcp-1"], {"id": "fjmcp-1"}, True]:
            self.assertFalse(h.router.client_response({"jsonrpc": "2.0", "id": bad, "result": {}}))
        self.assertFalse(h.router.client_response({"jsonrpc": "2.0", "result": {}}))
        self.assertEqual(h.to_child, before)
        self.assertEqual(h.router.server_requests_pending, 1)

    def test_broker_ids_distinct_from_child_ids(self) -> None:
        """
        Two child requests with the same child id still get distinct broker
        ids, each answerable once.
        """
        h = Harness()
        h.child_request(1)
        h.child_request(1)
        ids = [m["id"] for m in h.standalone]
        self.assertEqual(len(set(ids)), 2)
        for broker_id in ids:
            self.assertTrue(h.router.client_response({"id": broker_id, "result": {}}))
        self.assertEqual([m["id"] for m in h.to_child], [1, 1])


class CancellationTests(SynchronousTestCase):
    def test_client_cancels(self) -> None:
        """
        The child gets the cancellation under its id for the request; the
        client's stream ends at once with a "Request cancelled" error, and
        the child's late answer is dropped.
        """
        h = Harness()
        a, sent = h.request("req-a")
        b, _ = h.request("req-b")
        h.router.client_notification(cancelled("req-a"))
        self.assertEqual(
            h.to_child[-1],
            {
                "jsonrpc": "2.0",
                "method": "notifications/cancelled",
                "params": {"requestId": sent["id"], "reason": "user gave up"},
            },
        )
        self.assertEqual(
            a.finished,
            [
                {
                    "jsonrpc": "2.0",
                    "id": "req-a",
                    "error": {"code": REQUEST_CANCELLED, "message": "Request cancelled"},
                }
            ],
        )
        self.assertEqual(h.router.in_flight, 1)
        h.answer(sent)
        self.assertEqual(len(a.finished), 1)
        self.assertEqual(b.events, [])

    def test_client_cancels_unknown(self) -> None:
        h = Harness()
        a, sent = h.request(1)
        h.answer(sent)
        count = len(h.to_child)
        h.router.client_notification(cancelled(1))
        h.router.client_notification(cancelled("1"))
        h.router.client_notification(cancelled(None))
        h.router.client_notification({"jsonrpc": "2.0", "method": "notifications/cancelled"})
        self.assertEqual(len(h.to_child), count)
        self.assertEqual(len(a.finished), 1)

    def test_client_cancel_type_sensitive(self) -> None:
        """
        Cancelling C{"1"} does not cancel C{1}.
        """
        h = Harness()
        a, _ = h.request(1)
        h.router.client_notification(cancelled("1"))
        h.router.client_notification(cancelled(True))
        h.router.client_notification(cancelled(1.0))
        self.assertEqual(a.events, [])
        self.assertEqual(h.router.in_flight, 1)

    def test_client_cancels_ambiguous(self) -> None:
        """
        When several requests in flight share the id, the router cannot tell
        which one is meant and forwards nothing.
        """
        h = Harness()
        a, _ = h.request(1)
        b, _ = h.request(1)
        count = len(h.to_child)
        h.router.client_notification(cancelled(1))
        self.assertEqual(len(h.to_child), count)
        self.assertEqual(a.events + b.events, [])
        self.assertEqual(h.router.in_flight, 2)

    def test_child_cancels_its_request(self) -> None:
        h = Harness()
        a, _ = h.request(1)
        h.child_request(77)
        h.router.child_message(cancelled(77))
        self.assertEqual(a.messages[-1], cancelled("fjmcp-1"))
        # Cancelled: the client's late answer is not forwarded.
        count = len(h.to_child)
        self.assertFalse(h.router.client_response({"id": "fjmcp-1", "result": {}}))
        self.assertEqual(len(h.to_child), count)

    def test_child_cancel_after_stream_finished(self) -> None:
        """
        If the stream that carried the child's request has ended, its
        cancellation goes to the standalone stream.
        """
        h = Harness()
        a, sent = h.request(1)
        h.child_request(77)
        h.answer(sent)
        h.router.child_message(cancelled(77))
        self.assertEqual(h.standalone, [cancelled("fjmcp-1")])
        self.assertEqual(len(a.messages), 1)

    def test_child_cancel_standalone_request(self) -> None:
        h = Harness()
        h.child_request("s")
        a, _ = h.request(1)
        h.router.child_message(cancelled("s"))
        self.assertEqual(h.standalone[-1], cancelled("fjmcp-1"))
        self.assertEqual(a.messages, [])

    def test_child_cancels_unknown(self) -> None:
        h = Harness()
        a, _ = h.request(1)
        h.child_request(77)
        h.router.client_response({"id": "fjmcp-1", "result": {}})
        h.router.child_message(cancelled(77))
        h.router.child_message(cancelled(5))
        h.router.child_message(cancelled(None))
        self.assertEqual(len(a.messages), 1)
        self.assertEqual(h.standalone, [])


class FailAllTests(SynchronousTestCase):
    def test_fail_all(self) -> None:
        h = Harness()
        pairs = [h.request(i) for i in ("a", 1, 1)]
        done, done_sent = h.request("done")
        h.answer(done_sent)
        h.child_request(9)
        h.router.fail_all(-32603, "the child died")
        for (stream, _), client_id in zip(pairs, ("a", 1, 1), strict=True):
            self.assertEqual(
                stream.finished,
                [
                    {
                        "jsonrpc": "2.0",
                        "id": client_id,
                        "error": {"code": -32603, "message": "the child died"},
                    }
                ],
            )
        self.assertEqual(len(done.finished), 1)
        self.assertEqual(h.router.in_flight, 0)
        self.assertEqual(h.router.server_requests_pending, 0)
        # Nothing afterwards: late answers, a second fail_all.
        for _, sent in pairs:
            h.answer(sent)
        h.router.fail_all(-32603, "again")
        for stream, _ in pairs:
            self.assertEqual(len(stream.finished), 1)
        self.assertFalse(h.router.client_response({"id": "fjmcp-1", "result": {}}))

    def test_broken_stream_does_not_stop_others(self) -> None:
        class Broken(FakeStream):
            def finish(self, response: dict[str, Any]) -> None:
                super().finish(response)
                raise RuntimeError("connection went away")

        h = Harness()
        broken = Broken()
        h.router.client_request({"id": 1, "method": "x"}, broken)
        ok, _ = h.request(2)
        h.router.fail_all(-32603, "gone")
        self.assertEqual(len(broken.finished), 1)
        self.assertEqual(len(ok.finished), 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_child_unwritable(self) -> None:
        """
        A request the child cannot take is answered at once with an internal
        error; a notification or response is just lost.
        """

        def to_child(message: dict[str, Any]) -> None:
            raise OSError("broken pipe")

        router = SessionRouter(to_child, lambda m: None)
        stream = FakeStream()
        router.client_request({"jsonrpc": "2.0", "id": "x", "method": "ping"}, stream)
        [response] = stream.finished
        self.assertEqual(response["id"], "x")
        self.assertEqual(response["error"]["code"], INTERNAL_ERROR)
        self.assertEqual(router.in_flight, 0)
        router.client_notification({"jsonrpc": "2.0", "method": "notifications/initialized"})
        router.child_message({"jsonrpc": "2.0", "id": 1, "method": "ping"})
        self.assertTrue(router.client_response({"jsonrpc": "2.0", "id": "fjmcp-1", "result": {}}))


class BatchTests(SynchronousTestCase):
    def test_batch_from_child(self) -> None:
        h = Harness()
        a, sent_a = h.request("a")
        b, sent_b = h.request("b", params={"_meta": {"progressToken": "pb"}})
        token = sent_b["params"]["_meta"]["progressToken"]
        h.router.child_message(
            [
                progress(token),
                {"jsonrpc": "2.0", "id": sent_a["id"], "result": {"n": "a"}},
                "junk",
                log_message("only b left"),
                {"jsonrpc": "2.0", "method": "notifications/tools/list_changed"},
                {"jsonrpc": "2.0", "id": sent_b["id"], "result": {"n": "b"}},
                {"jsonrpc": "2.0", "id": sent_b["id"], "result": {"n": "again"}},
            ]
        )
        self.assertEqual(
            a.events, [("finish", {"jsonrpc": "2.0", "id": "a", "result": {"n": "a"}})]
        )
        self.assertEqual(
            b.events,
            [
                ("message", progress("pb")),
                ("message", log_message("only b left")),
                ("finish", {"jsonrpc": "2.0", "id": "b", "result": {"n": "b"}}),
            ],
        )
        self.assertEqual(
            h.standalone, [{"jsonrpc": "2.0", "method": "notifications/tools/list_changed"}]
        )


TIMEOUT = 10.0


def expected_cancel(child_id: int, reason: str) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "method": "notifications/cancelled",
        "params": {"requestId": child_id, "reason": reason},
    }


class ClockHarness(Harness):
    """
    A router whose requests have a deadline of C{TIMEOUT} seconds on a fake
    clock.  C{silent} records the time of each report of a child that wrote
    nothing while a request waited; C{on_silent}, when set, runs then too.
    """

    def __init__(self, timeout: float | None = TIMEOUT) -> None:
        super().__init__()
        self.clock = Clock()
        self.silent: list[float] = []
        self.on_silent: Callable[[], None] | None = None
        self.router = SessionRouter(
            self.to_child.append,
            self.standalone.append,
            clock=self.clock,
            timeout=timeout,
            on_silent=self._silent,
        )

    def _silent(self) -> None:
        self.silent.append(self.clock.seconds())
        if self.on_silent is not None:
            self.on_silent()

    def timers(self) -> int:
        return len(self.clock.getDelayedCalls())

    def cancellations(self) -> list[dict[str, Any]]:
        return [m for m in self.to_child if m.get("method") == "notifications/cancelled"]


NULL_ID_REFUSAL = {
    "jsonrpc": "2.0",
    "id": None,
    "error": {"code": -32700, "message": "Parse error"},
}


class DeadlineTests(SynchronousTestCase):
    """
    A request the child does not answer in time ends with an error for the
    client, a cancellation for the child, and no trace in the router.
    """

    def test_unanswered_request_times_out(self) -> None:
        """
        At the deadline, and not a moment before, the client's stream
        finishes once with -32001 under the client's own id and the child is
        told to stop under its id; the child's late answer goes nowhere.
        """
        h = ClockHarness()
        stream, sent = h.request("slow-1")
        self.assertEqual(h.timers(), 1)
        h.clock.advance(TIMEOUT - 1)
        self.assertEqual(stream.events, [])
        self.assertEqual(h.router.in_flight, 1)
        h.clock.advance(1)
        self.assertEqual(len(stream.events), 1)
        [response] = stream.finished
        self.assertEqual(set(response), {"jsonrpc", "id", "error"})
        self.assertEqual(response["jsonrpc"], "2.0")
        self.assertEqual(response["id"], "slow-1")
        self.assertEqual(response["error"]["code"], -32001)
        self.assertEqual(REQUEST_TIMEOUT, -32001)
        self.assertIn("10 s", response["error"]["message"])
        self.assertEqual(h.cancellations(), [expected_cancel(sent["id"], "the request timed out")])
        self.assertEqual(h.router.in_flight, 0)
        self.assertEqual(h.timers(), 0)
        count = len(h.to_child)
        h.answer(sent)
        h.router.child_message({"jsonrpc": "2.0", "id": sent["id"], "error": {"code": 1}})
        self.assertEqual(len(stream.events), 1)
        self.assertEqual(h.standalone, [])
        self.assertEqual(len(h.to_child), count)
        h.clock.advance(TIMEOUT * 3)
        self.assertEqual(len(stream.events), 1)
        self.assertEqual(len(h.to_child), count)

    def test_progress_after_timeout_dropped(self) -> None:
        h = ClockHarness()
        stream, sent = h.request(1, params={"_meta": {"progressToken": "t"}})
        h.clock.advance(TIMEOUT)
        h.router.child_message(progress(sent["params"]["_meta"]["progressToken"]))
        self.assertEqual(len(stream.events), 1)
        self.assertEqual(h.standalone, [])

    def test_timeout_keeps_odd_ids(self) -> None:
        """
        The timeout error carries exactly the id the client sent.
        """
        ids: list[Any] = [0, -1, 2**70, "", "ünï\u202e", "1"]
        h = ClockHarness()
        streams = [h.request(i)[0] for i in ids]
        h.clock.advance(TIMEOUT)
        for client_id, stream in zip(ids, streams, strict=True):
            [response] = stream.finished
            self.assertTrue(same(response["id"], client_id), (response, client_id))
            self.assertIs(type(response["id"]), type(client_id))
            self.assertEqual(response["error"]["code"], REQUEST_TIMEOUT)

    def test_each_request_has_its_own_deadline(self) -> None:
        h = ClockHarness()
        first, sent1 = h.request(1)
        h.clock.advance(4)
        second, sent2 = h.request(2)
        h.clock.advance(TIMEOUT - 4)
        self.assertEqual(first.finished[0]["error"]["code"], REQUEST_TIMEOUT)
        self.assertEqual(second.events, [])
        self.assertEqual(h.timers(), 1)
        h.clock.advance(3)
        self.assertEqual(second.events, [])
        h.clock.advance(1)
        self.assertEqual(second.finished[0]["error"]["code"], REQUEST_TIMEOUT)
        self.assertEqual(
            h.cancellations(),
            [
                expected_cancel(sent1["id"], "the request timed out"),
                expected_cancel(sent2["id"], "the request timed out"),
            ],
        )

    def test_silent_child_reported(self) -> None:
        """
        A child that wrote nothing since the request was sent is reported,
        after the client got its error: whoever hears of it may end the
        session, and that must not replace the error.
        """
        h = ClockHarness()
        h.clock.advance(1)
        h.router.child_message(log_message("before the request"))
        h.clock.advance(1)
        stream, _ = h.request(1)
        finished_when_reported: list[int] = []
        h.on_silent = lambda: finished_when_reported.append(len(stream.finished))
        h.clock.advance(TIMEOUT)
        self.assertEqual(h.silent, [2 + TIMEOUT])
        self.assertEqual(finished_when_reported, [1])
        self.assertEqual(stream.finished[0]["error"]["code"], REQUEST_TIMEOUT)

    def test_child_that_wrote_is_not_silent(self) -> None:
        """
        Anything the child writes after the request was sent (an answer to
        another request, a notification, even junk) shows it is alive: the
        request still times out, but the child is not reported.
        """
        writes: list[Any] = [
            log_message("still here"),
            {"jsonrpc": "2.0", "method": "notifications/tools/list_changed"},
            {"foo": 1},
            "junk",
            [],
        ]
        for write in writes:
            h = ClockHarness()
            # Later than the router's start, which counts as hearing from it.
            h.clock.advance(1)
            stream, _ = h.request(1)
            h.clock.advance(TIMEOUT / 2)
            h.router.child_message(write)
            h.clock.advance(TIMEOUT / 2)
            self.assertEqual(stream.finished[0]["error"]["code"], REQUEST_TIMEOUT, write)
            self.assertEqual(h.silent, [], write)

    def test_answer_to_another_request_is_not_silence(self) -> None:
        h = ClockHarness()
        h.clock.advance(1)
        waiting, _ = h.request("waits")
        h.clock.advance(1)
        other, sent = h.request("answered")
        h.clock.advance(1)
        h.answer(sent)
        h.clock.advance(TIMEOUT)
        self.assertEqual(other.finished[0]["result"], {"echo": None})
        self.assertEqual(waiting.finished[0]["error"]["code"], REQUEST_TIMEOUT)
        self.assertEqual(h.silent, [])

    def test_silence_counted_per_request(self) -> None:
        """
        The child wrote after the first request was sent but not after the
        second: only the second's deadline reports it.
        """
        h = ClockHarness()
        h.clock.advance(1)
        first, _ = h.request(1)
        h.clock.advance(1)
        h.router.child_message(log_message("alive"))
        h.clock.advance(1)
        second, _ = h.request(2)
        h.clock.advance(TIMEOUT - 2)
        self.assertEqual(len(first.finished), 1)
        self.assertEqual(h.silent, [])
        h.clock.advance(2)
        self.assertEqual(len(second.finished), 1)
        self.assertEqual(h.silent, [3 + TIMEOUT])

    def test_no_timer_left_behind(self) -> None:
        """
        However a request ends before its deadline, its timer goes with it,
        and the deadline passing later changes nothing.
        """
        h = ClockHarness()
        answered, sent = h.request("answered")
        h.answer(sent)
        self.assertEqual(h.timers(), 0)
        refused, sent = h.request("refused")
        h.router.child_message({"jsonrpc": "2.0", "id": sent["id"], "error": {"code": -1}})
        self.assertEqual(h.timers(), 0)
        cancelled_stream, _ = h.request("cancelled")
        h.router.client_notification(cancelled("cancelled"))
        self.assertEqual(h.timers(), 0)
        abandoned, _ = h.request("abandoned")
        h.router.abandon(abandoned)
        self.assertEqual(h.timers(), 0)
        failed, _ = h.request("failed")
        h.router.fail_all(-32603, "gone")
        self.assertEqual(h.timers(), 0)
        null_refused, _ = h.request("null")
        h.router.child_message(NULL_ID_REFUSAL)
        self.assertEqual(h.timers(), 0)
        count = len(h.to_child)
        h.clock.advance(TIMEOUT * 2)
        for stream in (answered, refused, cancelled_stream, failed, null_refused):
            self.assertEqual(len(stream.events), 1)
            self.assertNotEqual(stream.finished[0].get("error", {}).get("code"), REQUEST_TIMEOUT)
        self.assertEqual(abandoned.events, [])
        self.assertEqual(len(h.to_child), count)
        self.assertEqual(h.silent, [])

    def test_no_timer_for_request_answered_while_written(self) -> None:
        """
        A child that answers while the request is being written to it, and
        a child that cannot be written to: either way the request is over
        when C{client_request} returns, and no timer waits for it.
        """
        clock = Clock()
        router: SessionRouter

        def answering(message: dict[str, Any]) -> None:
            if "id" in message:
                router.child_message({"jsonrpc": "2.0", "id": message["id"], "result": {}})

        router = SessionRouter(answering, lambda m: None, clock=clock, timeout=TIMEOUT)
        stream = FakeStream()
        router.client_request({"jsonrpc": "2.0", "id": 1, "method": "ping"}, stream)
        self.assertEqual(stream.finished, [{"jsonrpc": "2.0", "id": 1, "result": {}}])
        self.assertEqual(clock.getDelayedCalls(), [])

        def broken(message: dict[str, Any]) -> None:
            raise OSError("broken pipe")

        router = SessionRouter(broken, lambda m: None, clock=clock, timeout=TIMEOUT)
        stream = FakeStream()
        router.client_request({"jsonrpc": "2.0", "id": 2, "method": "ping"}, stream)
        self.assertEqual(stream.finished[0]["error"]["code"], INTERNAL_ERROR)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_no_deadline_without_timeout(self) -> None:
        h = ClockHarness(timeout=None)
        stream, _ = h.request(1)
        self.assertEqual(h.timers(), 0)
        h.clock.advance(10 * TIMEOUT)
        self.assertEqual(stream.events, [])
        self.assertEqual(h.router.in_flight, 1)

    def test_child_answers_its_cancellation(self) -> None:
        """
        A child that answers the timeout's cancellation at once (while the
        router is still writing it) does not give the client a second answer.
        """
        clock = Clock()
        router: SessionRouter

        def to_child(message: dict[str, Any]) -> None:
            if message.get("method") == "notifications/cancelled":
                router.child_message(
                    {"jsonrpc": "2.0", "id": message["params"]["requestId"], "result": {}}
                )

        router = SessionRouter(to_child, lambda m: None, clock=clock, timeout=TIMEOUT)
        stream = FakeStream()
        router.client_request({"jsonrpc": "2.0", "id": "x", "method": "tools/call"}, stream)
        clock.advance(TIMEOUT)
        self.assertEqual(len(stream.events), 1)
        self.assertEqual(stream.finished[0]["error"]["code"], REQUEST_TIMEOUT)

    def test_next_request_from_timeout_gets_its_own_deadline(self) -> None:
        """
        A client that sends the next request from the timeout's finish (as
        a retrying client would) gets a fresh deadline for it.
        """
        h = ClockHarness()
        retries: list[FakeStream] = []

        class Retrying(FakeStream):
            def finish(self, response: dict[str, Any]) -> None:
                super().finish(response)
                if len(retries) < 2:
                    nxt = Retrying()
                    retries.append(nxt)
                    h.router.client_request({"jsonrpc": "2.0", "id": 1, "method": "ping"}, nxt)

        first = Retrying()
        h.router.client_request({"jsonrpc": "2.0", "id": 1, "method": "ping"}, first)
        h.clock.advance(TIMEOUT)
        self.assertEqual(len(first.finished), 1)
        self.assertEqual(len(retries), 1)
        self.assertEqual(retries[0].events, [])
        self.assertEqual(h.timers(), 1)
        h.clock.advance(TIMEOUT)
        self.assertEqual(len(retries[0].finished), 1)
        self.assertEqual(len(retries), 2)
        self.assertEqual(h.router.in_flight, 1)


class AbandonTests(SynchronousTestCase):
    """
    A client that went away: its requests are forgotten and the child is
    told, while everyone else's go on.
    """

    def test_abandon_forgets_the_streams_requests(self) -> None:
        h = ClockHarness()
        gone = FakeStream()
        sent_gone = []
        for client_id in ("a", "b"):
            h.router.client_request(
                {"jsonrpc": "2.0", "id": client_id, "method": "tools/call"}, gone
            )
            sent_gone.append(h.to_child[-1])
        other, sent_other = h.request("a")
        self.assertEqual(h.router.in_flight, 3)
        before = len(h.to_child)

        self.assertEqual(h.router.abandon(gone), 2)

        self.assertEqual(h.router.in_flight, 1)
        self.assertEqual(
            h.to_child[before:],
            [expected_cancel(sent["id"], "the client disconnected") for sent in sent_gone],
        )
        self.assertEqual(gone.events, [])
        self.assertEqual(h.timers(), 1)
        # Later answers for it go nowhere; the other stream's still arrive.
        for sent in sent_gone:
            h.answer(sent)
        self.assertEqual(gone.events, [])
        self.assertEqual(h.standalone, [])
        self.assertEqual(other.events, [])
        h.answer(sent_other)
        self.assertEqual(other.finished, [{"jsonrpc": "2.0", "id": "a", "result": {"echo": None}}])
        self.assertEqual(h.timers(), 0)
        h.clock.advance(TIMEOUT * 2)
        self.assertEqual(gone.events, [])
        self.assertEqual(h.silent, [])

    def test_others_keep_their_deadline(self) -> None:
        h = ClockHarness()
        gone, _ = h.request(1)
        other, sent = h.request(1)
        h.clock.advance(TIMEOUT / 2)
        h.router.abandon(gone)
        h.clock.advance(TIMEOUT / 2)
        self.assertEqual(gone.events, [])
        self.assertEqual(other.finished[0]["error"]["code"], REQUEST_TIMEOUT)
        self.assertEqual(other.finished[0]["id"], 1)
        self.assertEqual(
            h.cancellations()[-1], expected_cancel(sent["id"], "the request timed out")
        )

    def test_client_cancel_after_abandon_is_dropped(self) -> None:
        """
        The abandoned request is gone: a cancellation naming its id now
        matches only the other request with that id, which it ends.
        """
        h = ClockHarness()
        gone, _ = h.request(7)
        other, sent = h.request(7)
        h.router.abandon(gone)
        h.router.client_notification(cancelled(7))
        self.assertEqual(gone.events, [])
        self.assertEqual(other.finished[0]["error"]["code"], REQUEST_CANCELLED)
        self.assertEqual(h.cancellations()[-1]["params"]["requestId"], sent["id"])

    def test_progress_after_abandon_dropped(self) -> None:
        h = ClockHarness()
        gone, sent = h.request(1, params={"_meta": {"progressToken": "p"}})
        other, _ = h.request(2)
        h.router.abandon(gone)
        h.router.child_message(progress(sent["params"]["_meta"]["progressToken"]))
        self.assertEqual(gone.events, [])
        self.assertEqual(other.events, [])
        self.assertEqual(h.standalone, [])

    def test_abandon_what_is_not_in_flight(self) -> None:
        """
        A stream whose requests all ended (answered, timed out, abandoned
        already) or that never had one: nothing to forget, nothing sent.
        """
        h = ClockHarness()
        answered, sent = h.request(1)
        h.answer(sent)
        timed_out, _ = h.request(2)
        h.clock.advance(TIMEOUT)
        twice, _ = h.request(3)
        self.assertEqual(h.router.abandon(twice), 1)
        count = len(h.to_child)
        for stream in (answered, timed_out, twice, FakeStream()):
            self.assertEqual(h.router.abandon(stream), 0)
        self.assertEqual(len(h.to_child), count)
        self.assertEqual(len(answered.events), 1)
        self.assertEqual(len(timed_out.events), 1)
        self.assertEqual(twice.events, [])

    def test_abandon_with_child_unwritable(self) -> None:
        """
        The child cannot be told (its stdin is gone): the request is still
        forgotten, and nothing is raised to the caller.
        """
        clock = Clock()
        writable = [True]

        def to_child(message: dict[str, Any]) -> None:
            if not writable[0]:
                raise OSError("broken pipe")

        router = SessionRouter(to_child, lambda m: None, clock=clock, timeout=TIMEOUT)
        stream = FakeStream()
        router.client_request({"jsonrpc": "2.0", "id": 1, "method": "ping"}, stream)
        writable[0] = False
        self.assertEqual(router.abandon(stream), 1)
        self.assertEqual(router.in_flight, 0)
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertEqual(stream.events, [])


class NullIdRefusalTests(SynchronousTestCase):
    """
    A child that cannot parse a line answers with C{"id": null}; it reads
    its stdin in order and answers at once, so the refusal is for the
    request written last.
    """

    def test_fails_most_recent_pending_request(self) -> None:
        h = ClockHarness()
        first, _ = h.request("first")
        second, _ = h.request(2)
        third, sent3 = h.request("third")
        h.answer(sent3)
        self.assertEqual(h.timers(), 2)

        h.router.child_message(NULL_ID_REFUSAL)
        self.assertEqual(first.events, [])
        self.assertEqual(
            second.finished, [{**NULL_ID_REFUSAL, "id": 2}], "the last one still pending"
        )
        self.assertEqual(h.router.in_flight, 1)
        self.assertEqual(h.timers(), 1)

        h.router.child_message(NULL_ID_REFUSAL)
        self.assertEqual(first.finished, [{**NULL_ID_REFUSAL, "id": "first"}])
        self.assertEqual(len(second.events), 1)
        self.assertEqual(len(third.events), 1)
        self.assertEqual(h.timers(), 0)
        self.assertEqual(h.router.in_flight, 0)

        # Nothing pending: dropped.
        h.router.child_message(NULL_ID_REFUSAL)
        for stream in (first, second, third):
            self.assertEqual(len(stream.events), 1)
        self.assertEqual(h.standalone, [])
        h.clock.advance(TIMEOUT * 2)
        for stream in (first, second, third):
            self.assertEqual(len(stream.events), 1)

    def test_keeps_the_childs_error(self) -> None:
        h = ClockHarness()
        stream, _ = h.request(["odd", "id"])
        error = {"code": -32700, "message": "Parse error", "data": {"offset": 3}}
        h.router.child_message({"jsonrpc": "2.0", "id": None, "error": error})
        self.assertEqual(stream.finished, [{"jsonrpc": "2.0", "id": ["odd", "id"], "error": error}])

    def test_nothing_pending(self) -> None:
        h = ClockHarness()
        h.router.child_message(NULL_ID_REFUSAL)
        self.assertEqual(h.standalone, [])
        self.assertEqual(h.to_child, [])
        stream, sent = h.request(1)
        h.answer(sent)
        h.router.child_message(NULL_ID_REFUSAL)
        self.assertEqual(len(stream.events), 1)

    def test_after_timeout_and_abandon(self) -> None:
        """
        Requests that timed out or were abandoned are not pending: a
        refusal goes to the latest one still waiting, or nowhere.
        """
        h = ClockHarness()
        older, _ = h.request("older")
        h.clock.advance(1)
        gone, _ = h.request("gone")
        h.router.abandon(gone)
        h.router.child_message(NULL_ID_REFUSAL)
        self.assertEqual(gone.events, [])
        self.assertEqual(older.finished, [{**NULL_ID_REFUSAL, "id": "older"}])
        expired, _ = h.request("expired")
        h.clock.advance(TIMEOUT)
        h.router.child_message(NULL_ID_REFUSAL)
        self.assertEqual(len(expired.events), 1)
        self.assertEqual(expired.finished[0]["error"]["code"], REQUEST_TIMEOUT)

    def test_null_id_result_dropped(self) -> None:
        """
        Only a refusal is matched up; a result without an id is nobody's.
        """
        h = ClockHarness()
        stream, _ = h.request(1)
        h.router.child_message({"jsonrpc": "2.0", "id": None, "result": {}})
        self.assertEqual(stream.events, [])
        self.assertEqual(h.router.in_flight, 1)


# Client ids: small pools so that clashes are common, plus odd JSON values.
client_ids = st.one_of(
    st.sampled_from([0, 1, 1, "1", True, False, 1.0, "a", -1]),
    st.integers(),
    st.text(max_size=3),
    st.floats(allow_nan=False, allow_infinity=False),
    st.lists(st.integers(0, 3), max_size=2),
    st.dictionaries(st.sampled_from("ab"), st.integers(0, 2), max_size=2),
)


class InterleavingTests(SynchronousTestCase):
    @settings(max_examples=300)
    @given(ids=st.lists(client_ids, min_size=1, max_size=8), data=st.data())
    def test_any_interleaving(self, ids: list[Any], data: st.DataObject) -> None:
        """
        Whatever the client ids and whatever order the child answers in,
        every stream gets exactly one response: its own, under its own id.
        """
        h = Harness()
        streams: list[FakeStream] = []
        unanswered: list[dict[str, Any]] = []
        while len(streams) < len(ids) or unanswered:
            send = len(streams) < len(ids) and (
                not unanswered or data.draw(st.booleans(), label="send")
            )
            if send:
                n = len(streams)
                stream, sent = h.request(ids[n], params={"n": n})
                streams.append(stream)
                unanswered.append(sent)
            else:
                i = data.draw(st.integers(0, len(unanswered) - 1), label="answer")
                h.answer(unanswered.pop(i))
        for n, stream in enumerate(streams):
            self.assertEqual(len(stream.events), 1)
            [response] = stream.finished
            self.assertTrue(same(response["id"], ids[n]))
            self.assertEqual(response["result"], {"echo": {"n": n}})
        self.assertEqual(h.router.in_flight, 0)


def _is_plain_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class RouterMachine(RuleBasedStateMachine):
    """
    Client requests, child answers, child requests, client answers,
    cancellations both ways, notifications, fail_all, time passing (and
    deadlines with it) and clients going away in any order, checked against
    a model of what each side may see.  Every client request is finished
    exactly once, or abandoned with nothing on its stream after that.
    """

    FAIL_CODE = -32000

    # Requests the child got and has not answered (child-side ids).
    child_inbox = Bundle("child_inbox")
    # Requests of the child that reached the client (broker-side ids).
    client_inbox = Bundle("client_inbox")

    def __init__(self) -> None:
        super().__init__()
        self.to_child: list[dict[str, Any]] = []
        # Everything delivered to the client, in order: (stream or None, message).
        self.deliveries: list[tuple[FakeStream | None, dict[str, Any]]] = []
        self.clock = Clock()
        self.silent_reports = 0
        self.router = SessionRouter(
            self.to_child.append,
            self._standalone,
            clock=self.clock,
            timeout=TIMEOUT,
            on_silent=self._on_silent,
        )
        # Client side: (stream, client id, client token) by request number.
        self.requests: list[tuple[FakeStream, Any, Any]] = []
        self.child_id_of: dict[int, int] = {}  # request number -> child-side id
        self.broker_ids_seen: set[str] = set()
        self.answerable: set[str] = set()
        # Child side.
        self.child_ids_issued: list[Any] = []  # its request ids not yet answered, repeats kept
        self.child_uncancelled: list[Any] = []
        self.child_seen_request_ids: set[int] = set()
        self.child_tokens: dict[int, Any] = {}  # child-side id -> token the child saw
        self.child_read = 0
        self.delivered_read = 0
        # Time: when each request was sent (clock and order of events), when
        # the child last wrote anything, and which clients went away (with
        # how many events their stream had then).
        self.events = 0
        self.sent_at: dict[int, tuple[float, int]] = {}
        self.heard_at: tuple[float, int] = (0.0, 0)
        self.abandoned: dict[int, int] = {}
        self.child_cancelled: set[int] = set()

    def _standalone(self, message: dict[str, Any]) -> None:
        self.deliveries.append((None, message))

    def _on_silent(self) -> None:
        self.silent_reports += 1

    def _child_writes(self, message: Any) -> None:
        self.events += 1
        self.heard_at = (self.clock.seconds(), self.events)
        self.router.child_message(message)

    def _open(self) -> list[int]:
        """
        The requests still waiting for the child: not finished, not abandoned.
        """
        return [
            n
            for n, (stream, _, _) in enumerate(self.requests)
            if not stream.finished and n not in self.abandoned
        ]

    @rule(target=child_inbox, client_id=client_ids, token=st.none() | st.sampled_from([1, "t", 0]))
    def client_request(self, client_id: Any, token: Any) -> int:
        n = len(self.requests)
        params: dict[str, Any] = {"n": n}
        if token is not None:
            params["_meta"] = {"progressToken": token}
        stream = FakeStream(self.deliveries)
        self.requests.append((stream, client_id, token))
        before = len(self.to_child)
        self.router.client_request(
            {"jsonrpc": "2.0", "id": client_id, "method": "tools/call", "params": params}, stream
        )
        assert len(self.to_child) == before + 1
        child_id = self.to_child[-1]["id"]
        self.child_id_of[n] = child_id
        self.events += 1
        self.sent_at[n] = (self.clock.seconds(), self.events)
        return int(child_id)

    @rule(child_id=consumes(child_inbox))
    def child_answers(self, child_id: int) -> None:
        [n] = [n for n, cid in self.child_id_of.items() if cid == child_id]
        self._child_writes({"jsonrpc": "2.0", "id": child_id, "result": {"n": n}})

    @rule(bogus=st.integers(-3, 1000) | st.text(max_size=3) | st.none())
    def child_answers_unknown(self, bogus: Any) -> None:
        if _is_plain_int(bogus) and bogus in self.child_seen_request_ids:
            return
        before = len(self.deliveries)
        snapshot = [len(s.events) for s, _, _ in self.requests]
        self._child_writes({"jsonrpc": "2.0", "id": bogus, "result": {}})
        assert snapshot == [len(s.events) for s, _, _ in self.requests]
        assert len(self.deliveries) == before

    @rule(
        target=client_inbox,
        child_id=st.integers(0, 4) | st.sampled_from(["x", "y"]),
        with_token=st.booleans(),
        data=st.data(),
    )
    def child_request(self, child_id: Any, with_token: bool, data: st.DataObject) -> str:
        params: dict[str, Any] = {}
        if with_token and self.child_tokens:
            owner = data.draw(st.sampled_from(sorted(self.child_tokens)))
            params["_meta"] = {"progressToken": self.child_tokens[owner]}
        self.child_ids_issued.append(child_id)
        self.child_uncancelled.append(child_id)
        before = len(self.deliveries)
        self._child_writes(
            {"jsonrpc": "2.0", "id": child_id, "method": "sampling/createMessage", "params": params}
        )
        assert len(self.deliveries) == before + 1
        _, forwarded = self.deliveries[-1]
        broker_id = forwarded["id"]
        assert isinstance(broker_id, str)
        assert broker_id.startswith("fjmcp-")
        assert broker_id not in self.broker_ids_seen
        self.broker_ids_seen.add(broker_id)
        self.answerable.add(broker_id)
        return broker_id

    @rule(broker_id=client_inbox, error=st.booleans())
    def client_answers(self, broker_id: str, error: bool) -> None:
        answer: dict[str, Any] = {"jsonrpc": "2.0", "id": broker_id}
        if error:
            answer["error"] = {"code": -1, "message": "no"}
        else:
            answer["result"] = {}
        before = len(self.to_child)
        known = self.router.client_response(answer)
        assert known == (broker_id in self.answerable)
        assert len(self.to_child) == before + (1 if known else 0)
        self.answerable.discard(broker_id)

    @rule(bogus=st.text(max_size=8) | st.integers() | st.none())
    def client_answers_unknown(self, bogus: Any) -> None:
        if bogus in self.answerable:
            return
        before = len(self.to_child)
        assert not self.router.client_response({"jsonrpc": "2.0", "id": bogus, "result": {}})
        assert len(self.to_child) == before

    @precondition(lambda self: self.requests)
    @rule(data=st.data())
    def client_cancels(self, data: st.DataObject) -> None:
        _, client_id, _ = data.draw(st.sampled_from(self.requests))
        matching = [n for n in self._open() if same(self.requests[n][1], client_id)]
        before = len(self.to_child)
        self.router.client_notification(cancelled(client_id))
        if len(matching) == 1:
            stream = self.requests[matching[0]][0]
            assert stream.finished[0]["error"]["code"] == REQUEST_CANCELLED
            assert self.to_child[before:] == [
                _with_request_id(cancelled(client_id), self.child_id_of[matching[0]])
            ]
        else:
            assert len(self.to_child) == before

    @precondition(lambda self: self.child_uncancelled)
    @rule(data=st.data())
    def child_cancels(self, data: st.DataObject) -> None:
        child_id = data.draw(st.sampled_from(self.child_uncancelled))
        self.child_uncancelled.remove(child_id)
        before = len(self.deliveries)
        self._child_writes(cancelled(child_id))
        if len(self.deliveries) > before:
            _, note = self.deliveries[-1]
            broker_id = note["params"]["requestId"]
            assert broker_id in self.answerable
            self.answerable.discard(broker_id)

    @rule(kind=st.sampled_from(["progress", "message", "list_changed"]), data=st.data())
    def child_notifies(self, kind: str, data: st.DataObject) -> None:
        open_before = self._open()
        before = len(self.deliveries)
        if kind == "progress" and self.child_tokens:
            owner = data.draw(st.sampled_from(sorted(self.child_tokens)))
            self._child_writes(progress(self.child_tokens[owner]))
            targets = [n for n in open_before if self.child_id_of[n] == owner]
            if targets:
                stream, _, token = self.requests[targets[0]]
                assert self.deliveries[before:] == [(stream, progress(token))]
            else:
                assert len(self.deliveries) == before
        elif kind == "list_changed":
            self._child_writes({"jsonrpc": "2.0", "method": "notifications/tools/list_changed"})
            assert self.deliveries[-1][0] is None
        else:
            self._child_writes(log_message("hello"))
            target = self.deliveries[-1][0]
            if len(open_before) == 1:
                assert target is self.requests[open_before[0]][0]
            else:
                assert target is None

    @rule(seconds=st.sampled_from([0.0, 1.0, 3.0, TIMEOUT - 1, TIMEOUT, TIMEOUT + 1]))
    def time_passes(self, seconds: float) -> None:
        """
        Every request whose deadline is reached ends now with a timeout
        under its client id, and the child is told; a child that wrote
        nothing since such a request was sent is reported for it, and only
        then.  (Writes at the very instant the request was sent cannot be
        ordered by the clock; either answer is fine for them.)
        """
        now = self.clock.seconds() + seconds
        due = [n for n in self._open() if self.sent_at[n][0] + TIMEOUT <= now]
        heard_time, heard_event = self.heard_at
        surely_silent = sum(1 for n in due if heard_time < self.sent_at[n][0])
        maybe_silent = sum(1 for n in due if heard_event < self.sent_at[n][1])
        before, reports = len(self.to_child), self.silent_reports
        self.clock.advance(seconds)
        for n in due:
            stream, client_id, _ = self.requests[n]
            [response] = stream.finished
            assert same(response["id"], client_id)
            assert response["error"]["code"] == REQUEST_TIMEOUT
        assert self.to_child[before:] == [
            expected_cancel(self.child_id_of[n], "the request timed out") for n in due
        ]
        assert surely_silent <= self.silent_reports - reports <= maybe_silent

    @precondition(lambda self: self.requests)
    @rule(data=st.data())
    def client_goes_away(self, data: st.DataObject) -> None:
        n = data.draw(st.integers(0, len(self.requests) - 1), label="request")
        stream = self.requests[n][0]
        in_flight = n in self._open()
        before = len(self.to_child)
        assert self.router.abandon(stream) == (1 if in_flight else 0)
        if in_flight:
            self.abandoned[n] = len(stream.events)
            assert self.to_child[before:] == [
                expected_cancel(self.child_id_of[n], "the client disconnected")
            ]
        else:
            assert len(self.to_child) == before

    @rule()
    def fail_all(self) -> None:
        open_before = self._open()
        self.router.fail_all(self.FAIL_CODE, "gone")
        for n in open_before:
            assert self.requests[n][0].finished[0]["error"]["code"] == self.FAIL_CODE
        assert self.router.server_requests_pending == 0
        self.answerable.clear()

    @invariant()
    def child_sees_only_its_ids(self) -> None:
        """
        Everything the child got since the last check: requests under fresh
        integer ids, answers only to ids it used itself (no more often than
        it used them), cancellations only of requests it got.
        """
        for message in self.to_child[self.child_read :]:
            method = message.get("method")
            if method is None:
                assert message["id"] in self.child_ids_issued, message
                self.child_ids_issued.remove(message["id"])
            elif "id" in message:
                assert _is_plain_int(message["id"])
                assert message["id"] not in self.child_seen_request_ids
                self.child_seen_request_ids.add(message["id"])
                meta = message["params"].get("_meta")
                if meta is not None:
                    self.child_tokens[message["id"]] = meta["progressToken"]
            else:
                assert method == "notifications/cancelled"
                request_id = message["params"]["requestId"]
                assert request_id in self.child_seen_request_ids
                # Once per request, however it ended.
                assert request_id not in self.child_cancelled, request_id
                self.child_cancelled.add(request_id)
        self.child_read = len(self.to_child)

    @invariant()
    def streams_consistent(self) -> None:
        for n, (stream, client_id, _) in enumerate(self.requests):
            assert stream.well_formed(), stream.events
            for response in stream.finished:
                assert same(response["id"], client_id)
                if "result" in response:
                    assert response["result"] == {"n": n}
                else:
                    assert response["error"]["code"] in (
                        REQUEST_CANCELLED,
                        REQUEST_TIMEOUT,
                        self.FAIL_CODE,
                    )
            if n in self.abandoned:
                # Nothing reaches a client that went away.
                assert len(stream.events) == self.abandoned[n], stream.events
        assert self.router.in_flight == len(self._open())
        # One deadline per request in flight, none left behind.
        assert len(self.clock.getDelayedCalls()) == self.router.in_flight
        assert self.router.server_requests_pending == len(self.answerable)

    @invariant()
    def client_sees_only_broker_ids(self) -> None:
        for _, message in self.deliveries[self.delivered_read :]:
            if "id" in message:
                assert message["id"] in self.broker_ids_seen
        self.delivered_read = len(self.deliveries)

    def teardown(self) -> None:
        self.router.fail_all(self.FAIL_CODE, "the end")
        self.clock.advance(TIMEOUT * 2)
        for n, (stream, _, _) in enumerate(self.requests):
            if n in self.abandoned:
                assert stream.finished == [], stream.events
                assert len(stream.events) == self.abandoned[n]
            else:
                assert len(stream.finished) == 1, stream.events
            assert stream.well_formed()


def _with_request_id(message: dict[str, Any], request_id: Any) -> dict[str, Any]:
    return {**message, "params": {**message["params"], "requestId": request_id}}


_MachineTestCase: Any = RouterMachine.TestCase


class RouterModelTests(_MachineTestCase):
    settings = settings(max_examples=300, stateful_step_count=40, deadline=None)

    def test_router_model(self) -> None:
        # trial collects test_* methods; hypothesis names its test runTest.
        self.runTest()
