"""
A token family against a model: hypothesis drives the real token service
and store through random refreshes (fresh, inside and after the grace
window), revocations and the passing of time, and every answer must be the
model's.

No threads: the store's pool runs each transaction inline and its reactor
is a fake clock, so every Deferred has fired by the time the call returns.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import attrs
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from fjmcp.oauth.clients import ClientRegistry
from fjmcp.oauth.tokens import InvalidTokenError
from fjmcp.secrets.crypto import new_pkce_pair
from fjmcp.store import Store, UpstreamUser, make_pool, migrate_database
from fjmcp.store.engines import Location, PostgreSQLLocation, SQLiteLocation
from tests.helpers import make_config, token_service
from tests.postgres_support import postgres_database
from tests.store_engines import OnPostgreSQL, rows

FORM = {"Content-Type": "application/x-www-form-urlencoded"}
REDIRECT = "http://127.0.0.1:9/cb"
ACCESS_LIFETIME = 100.0
REFRESH_LIFETIME = 1000.0
GRACE = 10.0


class InlineReactor(task.Clock):
    """
    A fake clock that also is the pool's reactor: results come back "from
    the thread" at once.
    """

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        f(*args, **kwargs)

    def callWhenRunning(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
        return 1

    def removeSystemEventTrigger(self, trigger: Any) -> None:
        pass


class InlineThreadPool:
    def callInThreadWithCallback(
        self, on_result: Callable[[bool, Any], None], f: Callable[..., Any], *a: Any, **kw: Any
    ) -> None:
        try:
            result = f(*a, **kw)
        except BaseException:
            on_result(False, Failure())
        else:
            on_result(True, result)

    def stop(self) -> None:
        pass


def inline_store(where: Path | Location, clock: InlineReactor) -> Store:
    pool = make_pool(where, clock)  # type: ignore[arg-type]
    pool.threadpool = InlineThreadPool()  # type: ignore[assignment]
    return Store(pool, clock, where)


def now_(d: Deferred[Any]) -> Any:
    """
    The result of a Deferred that has already fired (they all have here).
    """
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


@attrs.define
class ModelRefresh:
    token: str
    expires_at: float
    rotated_at: float | None = None


@attrs.define
class ModelAccess:
    token: str
    expires_at: float
    revoked: bool = False


class TokenFamilyMachine(RuleBasedStateMachine):
    # A PostgreSQL database to run on (emptied for every example), or None
    # for a new SQLite file each time.
    postgres: PostgreSQLLocation | None = None

    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="fjmcp-model-"))
        self.config = make_config(
            str(self.tmp),
            access_token_lifetime=ACCESS_LIFETIME,
            refresh_token_lifetime=REFRESH_LIFETIME,
            refresh_grace_period=GRACE,
        )
        where: Location = SQLiteLocation(self.config.db_path)
        if self.postgres is not None:
            where = self.postgres
            rows(where, "DROP SCHEMA public CASCADE; CREATE SCHEMA public")
        migrate_database(where)
        self.clock = InlineReactor()
        self.clock.advance(1000)
        self.store = inline_store(where, self.clock)
        self.service = token_service(self.store, self.config, self.clock)
        client = now_(
            Deferred.fromCoroutine(
                ClientRegistry(self.store).register(
                    {"redirect_uris": [REDIRECT], "token_endpoint_auth_method": "none"}
                )
            )
        )
        self.client_id = client["client_id"]
        now_(self.store.replace_upstream_credential(UpstreamUser(1, "u"), b"x", None, 0.0, ""))
        verifier, challenge = new_pkce_pair()
        code = now_(
            Deferred.fromCoroutine(
                self.service.issue_code(
                    self.client_id, 1, REDIRECT, challenge, "mcp", self.config.mcp_url
                )
            )
        )
        status, body = self.post(
            "/oauth/token",
            grant_type="authorization_code",
            code=code,
            code_verifier=verifier,
            redirect_uri=REDIRECT,
        )
        assert status == 200, body
        # The model.
        self.now = self.clock.seconds()
        self.family_revoked = False
        self.refresh_tokens = [ModelRefresh(body["refresh_token"], self.now + REFRESH_LIFETIME)]
        self.access_tokens = [ModelAccess(body["access_token"], self.now + ACCESS_LIFETIME)]

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def post(self, path: str, **form: str) -> tuple[int, dict[str, Any]]:
        form["client_id"] = self.client_id
        body = urlencode(form).encode()
        call = self.service.token_response if path == "/oauth/token" else self.service.revoke
        status, headers, payload = now_(Deferred.fromCoroutine(call(body, FORM)))
        assert headers["Cache-Control"] == "no-store"
        return status, payload

    # --- actions

    def _refresh(self, token: ModelRefresh) -> None:
        status, body = self.post(
            "/oauth/token", grant_type="refresh_token", refresh_token=token.token
        )
        if self.family_revoked:
            expected = "invalid_grant"
        elif token.rotated_at is not None and self.now - token.rotated_at > GRACE:
            expected = "invalid_grant"
            self.family_revoked = True
        elif self.now >= token.expires_at:
            expected = "invalid_grant"
        else:
            expected = "ok"
        if expected == "ok":
            assert status == 200, body
            if token.rotated_at is None:
                token.rotated_at = self.now
            self.refresh_tokens.append(
                ModelRefresh(body["refresh_token"], self.now + REFRESH_LIFETIME)
            )
            self.access_tokens.append(ModelAccess(body["access_token"], self.now + ACCESS_LIFETIME))
        else:
            assert (status, body["error"]) == (400, expected), (status, body)

    @rule()
    def refresh_newest(self) -> None:
        """
        What a well-behaved client does.
        """
        self._refresh(self.refresh_tokens[-1])

    @rule(which=st.integers(min_value=0))
    def refresh_any(self, which: int) -> None:
        """
        A racing, retrying or stolen token.
        """
        self._refresh(self.refresh_tokens[which % len(self.refresh_tokens)])

    # Mostly around the grace window, sometimes past the lifetimes.
    @rule(seconds=st.sampled_from([0, 1, 5, 9, 10, 10, 11, 11, 30, 99, 100, 101, 1000]))
    def wait(self, seconds: int) -> None:
        self.clock.advance(seconds)
        self.now += seconds

    # Revocation ends the story, so it only happens one time in five.
    @rule(
        which=st.integers(min_value=0),
        kind=st.sampled_from(["access", "refresh"]),
        hint=st.sampled_from(["", "access_token", "refresh_token"]),
        go=st.integers(min_value=0, max_value=4),
    )
    def revoke(self, which: int, kind: str, hint: str, go: int) -> None:
        if go:
            return
        tokens: list[Any] = self.access_tokens if kind == "access" else self.refresh_tokens
        token = tokens[which % len(tokens)]
        extra = {"token_type_hint": hint} if hint else {}
        status, _ = self.post("/oauth/revoke", token=token.token, **extra)
        assert status == 200
        if kind == "access":
            token.revoked = True
        else:
            self.family_revoked = True

    # --- what must hold after every step

    @invariant()
    def access_tokens_match(self) -> None:
        for token in self.access_tokens:
            valid = not (token.revoked or self.family_revoked or self.now >= token.expires_at)
            d = Deferred.fromCoroutine(self.service.check_bearer("Bearer " + token.token))
            try:
                grant = now_(d)
            except InvalidTokenError as e:
                assert not valid, e.description
            else:
                assert valid, token
                assert grant.client_id == self.client_id

    @invariant()
    def one_family(self) -> None:
        live = now_(self.store.list_families(forgejo_user_id=1))
        assert len(live) == (0 if self.family_revoked else 1), live


_MachineTestCase: Any = TokenFamilyMachine.TestCase


class TokenFamilyModelTests(_MachineTestCase):
    settings = settings(max_examples=100, stateful_step_count=30, deadline=None)

    def test_family_rules(self) -> None:
        # trial collects test_* methods; hypothesis names its test runTest.
        self.runTest()


class PostgresTokenFamilyMachine(TokenFamilyMachine):
    pass


_PostgresMachineTestCase: Any = PostgresTokenFamilyMachine.TestCase


class TokenFamilyModelOnPostgreSQL(OnPostgreSQL, _PostgresMachineTestCase):
    """
    The same model with the store on PostgreSQL (one database, emptied for
    each example).
    """

    settings = settings(max_examples=40, stateful_step_count=30, deadline=None)

    def mktemp(self) -> str:
        # What postgres_database asks of a trial test case (this is a
        # unittest one): a new path for its password file's directory.
        directory = tempfile.mkdtemp(prefix="fjmcp-model-")
        self.addCleanup(shutil.rmtree, directory, True)
        return directory + "/db"

    def setUp(self) -> None:
        db = postgres_database(self)
        PostgresTokenFamilyMachine.postgres = PostgreSQLLocation(db.url, db.password)

    def test_family_rules(self) -> None:
        self.runTest()


class NeverCrashTests(SynchronousTestCase):
    """
    Whatever arrives at the token and revocation endpoints, the answer is
    an OAuth error with a 4xx status, never a 500.
    """

    def setUp(self) -> None:
        tmp = Path(self.mktemp()).resolve()
        self.config = make_config(str(tmp))
        migrate_database(self.config.db_path)
        self.clock = InlineReactor()
        self.store = inline_store(self.config.db_path, self.clock)
        self.addCleanup(self.store.close)
        self.service = token_service(self.store, self.config, self.clock)
        client = now_(
            Deferred.fromCoroutine(
                ClientRegistry(self.store).register(
                    {"redirect_uris": [REDIRECT], "token_endpoint_auth_method": "none"}
                )
            )
        )
        self.client_id = client["client_id"]

    def check(self, body: bytes, headers: dict[str, str]) -> None:
        for call in (self.service.token_response, self.service.revoke):
            status, out_headers, payload = now_(Deferred.fromCoroutine(call(body, headers)))
            if status == 200:
                # Only a revocation of some (unknown) token can succeed here.
                self.assertEqual(call, self.service.revoke)
                continue
            self.assertIn(status, (400, 401, 413), payload)
            self.assertIsInstance(payload["error"], str)
            self.assertEqual(out_headers["Cache-Control"], "no-store")

    @settings(deadline=None, max_examples=200)
    @given(st.binary(max_size=300), st.sampled_from(["", "Basic Zm9vOmJhcg==", "Basic %%%"]))
    def test_any_bytes(self, body: bytes, authorization: str) -> None:
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        if authorization:
            headers["Authorization"] = authorization
        self.check(body, headers)

    @settings(deadline=None, max_examples=200)
    @given(
        st.dictionaries(
            st.sampled_from(
                [
                    "grant_type",
                    "code",
                    "code_verifier",
                    "redirect_uri",
                    "refresh_token",
                    "client_secret",
                    "scope",
                    "resource",
                    "token",
                    "token_type_hint",
                ]
            ),
            st.sampled_from(["authorization_code", "refresh_token", "", "x", "a" * 50])
            | st.text(max_size=20),
        ),
        st.booleans(),
    )
    def test_any_form(self, form: dict[str, str], known_client: bool) -> None:
        form = dict(form)
        form["client_id"] = self.client_id if known_client else "fjmcp-nobody"
        body = urlencode(form).encode()
        self.check(body, {"Content-Type": "application/x-www-form-urlencoded"})
