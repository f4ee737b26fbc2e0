"""
The routing of one MCP session between HTTP exchanges and its stdio child:
id rewriting both ways, where each message from the child goes, and that
every client request is answered exactly once whatever happens.
"""

from __future__ import annotations

import copy
import json
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
from twisted.trial.unittest import SynchronousTestCase

from fjmcp.mcp.router import INTERNAL_ERROR, REQUEST_CANCELLED, SessionRouter


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
    cancellations both ways, notifications and fail_all in any order,
    checked against a model of what each side may see.
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
        self.router = SessionRouter(self.to_child.append, self._standalone)
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

    def _standalone(self, message: dict[str, Any]) -> None:
        self.deliveries.append((None, message))

    def _open(self) -> list[int]:
        return [n for n, (stream, _, _) in enumerate(self.requests) if not stream.finished]

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
        return int(child_id)

    @rule(child_id=consumes(child_inbox))
    def child_answers(self, child_id: int) -> None:
        [n] = [n for n, cid in self.child_id_of.items() if cid == child_id]
        self.router.child_message({"jsonrpc": "2.0", "id": child_id, "result": {"n": n}})

    @rule(bogus=st.integers(-3, 1000) | st.text(max_size=3) | st.none())
    def child_answers_unknown(self, bogus: Any) -> None:
        if _is_plain_int(bogus) and bogus in self.child_seen_request_ids:
            return
        before = len(self.deliveries)
        snapshot = [len(s.events) for s, _, _ in self.requests]
        self.router.child_message({"jsonrpc": "2.0", "id": bogus, "result": {}})
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
        self.router.child_message(
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
        self.router.child_message(cancelled(child_id))
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
            self.router.child_message(progress(self.child_tokens[owner]))
            targets = [n for n in open_before if self.child_id_of[n] == owner]
            if targets:
                stream, _, token = self.requests[targets[0]]
                assert self.deliveries[before:] == [(stream, progress(token))]
            else:
                assert len(self.deliveries) == before
        elif kind == "list_changed":
            self.router.child_message(
                {"jsonrpc": "2.0", "method": "notifications/tools/list_changed"}
            )
            assert self.deliveries[-1][0] is None
        else:
            self.router.child_message(log_message("hello"))
            target = self.deliveries[-1][0]
            if len(open_before) == 1:
                assert target is self.requests[open_before[0]][0]
            else:
                assert target is None

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
                assert message["params"]["requestId"] in self.child_seen_request_ids
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
                    assert response["error"]["code"] in (REQUEST_CANCELLED, self.FAIL_CODE)
        assert self.router.in_flight == len(self._open())
        assert self.router.server_requests_pending == len(self.answerable)

    @invariant()
    def client_sees_only_broker_ids(self) -> None:
        for _, message in self.deliveries[self.delivered_read :]:
            if "id" in message:
                assert message["id"] in self.broker_ids_seen
        self.delivered_read = len(self.deliveries)

    def teardown(self) -> None:
        self.router.fail_all(self.FAIL_CODE, "the end")
        for stream, _, _ in self.requests:
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
