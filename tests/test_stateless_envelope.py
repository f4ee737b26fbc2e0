"""
Property tests of the stateless revision's rules (fjmcp/mcp/stateless.py):
the header checks accept exactly what agrees with the body, never raise
on any input and always answer under the request's id; the envelope comes
off before the child and the stamps never overwrite what a child said.
"""

from __future__ import annotations

import base64
import copy
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from fjmcp.mcp.jsonrpc import known_id
from fjmcp.mcp.stateless import (
    FORWARDED,
    LIST_CHANGES,
    META_CAPABILITIES,
    META_VERSION,
    NAME_PARAMS,
    SUBSCRIPTION_ID,
    check,
    decode_header_value,
    for_listener,
    honoured,
    is_stateless,
    stamp,
    to_child,
)

VERSION = "2026-07-28"
ids = st.one_of(st.integers(-(2**53), 2**53), st.text(max_size=12))
names = st.text(min_size=1, max_size=20)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)


def header_value(text: str) -> str:
    """
    How a client sends C{text} in a header: as is when plain ASCII without
    surrounding spaces, else in the base64 sentinel.
    """
    if text.isascii() and text.isprintable() and text == text.strip() and not text.startswith("=?"):
        return text
    return "=?base64?" + base64.b64encode(text.encode()).decode() + "?="


@st.composite
def requests(draw: Any) -> tuple[dict[str, Any], dict[str, list[str]]]:
    method = draw(st.sampled_from(sorted(FORWARDED | {"server/discover"})))
    params: dict[str, Any] = {
        "_meta": {
            META_VERSION: VERSION,
            META_CAPABILITIES: draw(st.dictionaries(st.text(max_size=5), st.just({}))),
            "progressToken": draw(ids),
        }
    }
    headers = {"mcp-protocol-version": [VERSION], "mcp-method": [method]}
    if method in NAME_PARAMS:
        name = draw(names)
        params[NAME_PARAMS[method]] = name
        headers["mcp-name"] = [header_value(name)]
    message = {"jsonrpc": "2.0", "id": draw(ids), "method": method, "params": params}
    return message, headers


class HeaderCheckTests(SynchronousTestCase):
    @given(st.text(max_size=40))
    def test_sentinel_round_trip(self, text: str) -> None:
        self.assertEqual(decode_header_value(header_value(text)), text)

    @given(requests())
    def test_agreeing_headers_pass(self, case: tuple[dict[str, Any], dict[str, list[str]]]) -> None:
        message, headers = case
        self.assertIsNone(check(message, headers))

    @given(requests(), st.data())
    def test_any_disagreeing_header_is_a_mismatch(
        self, case: tuple[dict[str, Any], dict[str, list[str]]], data: Any
    ) -> None:
        message, headers = case
        name = data.draw(st.sampled_from(sorted(headers)))
        change = data.draw(st.sampled_from(["drop", "repeat", "other"]))
        spoilt = dict(headers)
        if change == "drop":
            del spoilt[name]
        elif change == "repeat":
            spoilt[name] = headers[name] * 2
        else:
            other = data.draw(st.text(min_size=1, max_size=20))
            if decode_header_value(other) == decode_header_value(headers[name][0]):
                return
            spoilt[name] = [other]
        refusal = check(message, spoilt)
        assert refusal is not None
        self.assertEqual((refusal.status, refusal.response["error"]["code"]), (400, -32020))
        self.assertEqual(refusal.response["id"], message["id"])

    @given(
        json_values,
        st.dictionaries(
            st.sampled_from(["mcp-method", "mcp-name", "x"]),
            st.lists(st.text(max_size=10), max_size=2),
        ),
    )
    def test_anything_else_is_refused_under_its_id(
        self, message: Any, headers: dict[str, list[str]]
    ) -> None:
        refusal = check(message, headers)
        assert refusal is not None
        self.assertIn(refusal.status, (400, 404))
        self.assertEqual(refusal.response["id"], known_id(message))

    def test_era_is_chosen_by_the_version_header(self) -> None:
        modern = {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "tools/list",
            "params": {"_meta": {META_VERSION: VERSION, META_CAPABILITIES: {}}},
        }
        self.assertTrue(is_stateless(VERSION, {}))
        self.assertTrue(is_stateless("v999", {}))
        self.assertFalse(is_stateless("2025-06-18", modern))
        # No header: the envelope says it (and the header check refuses it).
        self.assertTrue(is_stateless(None, modern))
        self.assertFalse(is_stateless(None, {"jsonrpc": "2.0", "id": 1, "method": "initialize"}))


class TranslationTests(SynchronousTestCase):
    @given(requests())
    def test_envelope_off_the_rest_kept(self, case: tuple[dict[str, Any], Any]) -> None:
        message, _ = case
        before = copy.deepcopy(message)
        out = to_child(message)
        self.assertEqual(message, before)
        self.assertEqual(
            out["params"]["_meta"], {"progressToken": message["params"]["_meta"]["progressToken"]}
        )
        rest = {k: v for k, v in out["params"].items() if k != "_meta"}
        self.assertEqual(rest, {k: v for k, v in message["params"].items() if k != "_meta"})

    @given(st.sampled_from(sorted(FORWARDED)), st.dictionaries(st.text(max_size=8), json_values))
    def test_stamps_never_overwrite(self, method: str, result: dict[str, Any]) -> None:
        response: dict[str, Any] = {"jsonrpc": "2.0", "id": 1, "result": copy.deepcopy(result)}
        stamp(method, {"params": {}}, response, {"name": "child", "version": "1"})
        stamped = response["result"]
        for key, value in result.items():
            if key != "_meta":
                self.assertEqual(stamped[key], value)
        self.assertIn("resultType", stamped)
        self.assertIn("io.modelcontextprotocol/serverInfo", stamped["_meta"])
        self.assertEqual(
            "ttlMs" in stamped,
            method.endswith("/list") or method == "resources/read" or "ttlMs" in result,
        )

    def test_resource_not_found_names_the_uri(self) -> None:
        response: dict[str, Any] = {
            "jsonrpc": "2.0",
            "id": 1,
            "error": {"code": -32002, "message": "Resource not found"},
        }
        stamp("resources/read", {"params": {"uri": "file:///x"}}, response, None)
        self.assertEqual(
            response["error"],
            {"code": -32602, "message": "Resource not found", "data": {"uri": "file:///x"}},
        )


class ListenFilterTests(SynchronousTestCase):
    @given(
        st.dictionaries(st.sampled_from([*sorted(LIST_CHANGES), "other"]), json_values),
        st.dictionaries(
            st.sampled_from(["tools", "prompts", "resources", "logging"]),
            st.dictionaries(st.sampled_from(["listChanged", "subscribe"]), json_values),
        ),
        st.sampled_from(
            [m for _, m in LIST_CHANGES.values()]
            + ["notifications/resources/updated", "notifications/message", "x"]
        ),
        ids,
    )
    def test_only_what_was_asked_and_announced_tagged(
        self, asked: dict[str, Any], capabilities: dict[str, Any], method: str, sid: Any
    ) -> None:
        delivered = honoured(asked, capabilities)
        for flag in delivered:
            kind = LIST_CHANGES[flag][0]
            self.assertIs(asked[flag], True)
            self.assertIs(capabilities[kind]["listChanged"], True)
        out = for_listener({"jsonrpc": "2.0", "method": method}, sid, delivered)
        wanted = {LIST_CHANGES[f][1] for f in delivered}
        if method in wanted:
            assert out is not None
            self.assertEqual(out["method"], method)
            self.assertEqual(out["params"]["_meta"][SUBSCRIPTION_ID], sid)
        else:
            self.assertIsNone(out)
