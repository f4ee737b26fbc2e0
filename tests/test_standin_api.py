"""
The Forgejo stand-in's API (C{/api/v1}), as forgejo-mcp v2.18.0 and the
broker call it: authentication and scopes, the shapes the Forgejo SDK
decodes, visibility of private repositories, and app registration.
"""

from __future__ import annotations

import base64
import re
import uuid
from typing import Any

from fjmcp_dev.standin.model import VERSION
from twisted.trial.unittest import SynchronousTestCase

from tests.test_standin_support import BASE, RFC3339_UTC, Reply, Standin

SCOPE_MESSAGE = "token does not have at least one of required scope(s): [{}]"
TIME_FIELDS = {"created", "last_login", "created_at", "updated_at", "closed_at", "timestamp"}


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def times(value: Any) -> list[tuple[str, Any]]:
    """
    Every (key, value) of a time field, anywhere in a JSON document.
    """
    found: list[tuple[str, Any]] = []
    if isinstance(value, dict):
        for k, v in value.items():
            if k in TIME_FIELDS:
                found.append((k, v))
            found += times(v)
    elif isinstance(value, list):
        for v in value:
            found += times(v)
    return found


class APITestCase(SynchronousTestCase):
    def setUp(self):
        self.s = Standin()

    def assertAPIError(self, reply: Reply, status: int, message: str) -> None:
        self.assertEqual(reply.code, status, reply.body)
        self.assertIn("application/json", reply.header("content-type") or "")
        body = reply.json()
        self.assertEqual(body["message"], message)
        self.assertEqual(body["url"], BASE + "/api/swagger")

    def assertTimes(self, document: Any) -> None:
        """
        Go's decoder needs RFC 3339 with a zone; we send UTC with Z.
        """
        found = times(document)
        self.assertTrue(found)
        for key, value in found:
            if value is not None:
                self.assertRegex(value, RFC3339_UTC, key)


class AuthenticationTests(APITestCase):
    def test_version_needs_no_token(self):
        reply = self.s.api("/version")
        self.assertEqual(reply.code, 200)
        self.assertEqual(reply.json(), {"version": VERSION})

    def test_version_is_new_enough_for_forgejo_mcp(self):
        """
        The SDK parses it with go-version and wants at least 1.11.0, no
        pre-release.
        """
        version = self.s.api("/version").json()["version"]
        match = re.fullmatch(r"(\d+)\.(\d+)\.(\d+)(\+[0-9A-Za-z.-]+)?", version)
        assert match is not None, version
        self.assertGreaterEqual(tuple(int(g) for g in match.groups()[:3]), (1, 11, 0))

    def test_version_with_a_bad_token(self):
        """
        Forgejo authenticates every API request first: an invalid token is
        a 401 even where none is needed.
        """
        reply = self.s.api("/version", "garbage")
        self.assertAPIError(reply, 401, "user does not exist [uid: 0, name: ]")
        self.assertEqual(self.s.api("/version", self.s.access_token()).code, 200)

    def test_user_with_token_or_bearer(self):
        token = self.s.access_token()
        for scheme in ["token", "Bearer", "bearer", "BEARER"]:
            reply = self.s.api("/user", token, scheme=scheme)
            self.assertEqual(reply.code, 200, scheme)
            self.assertEqual(reply.json()["login"], "alice")

    def test_token_scheme_is_case_sensitive(self):
        reply = self.s.api("/user", self.s.access_token(), scheme="Token")
        self.assertAPIError(reply, 401, "token is required")

    def test_no_token(self):
        self.assertAPIError(self.s.api("/user"), 401, "token is required")
        self.assertAPIError(self.s.api("/user/repos"), 401, "token is required")
        self.assertAPIError(
            self.s.api("/repos/alice/hello-world/issues/1"), 401, "token is required"
        )

    def test_invalid_tokens(self):
        tokens = self.s.tokens()
        head, payload, sig = tokens["access_token"].split(".")
        for token in [
            "garbage",
            "0123456789abcdef0123456789abcdef01234567",
            tokens["refresh_token"],
            f"{head}.{payload}.{sig[::-1]}",
        ]:
            reply = self.s.api("/user", token)
            self.assertAPIError(reply, 401, "user does not exist [uid: 0, name: ]")

    def test_expired_token(self):
        token = self.s.access_token()
        self.s.clock.advance(3600)
        self.assertAPIError(self.s.api("/user", token), 401, "user does not exist [uid: 0, name: ]")

    def test_revoked_grant(self):
        token = self.s.access_token()
        self.s.forge.revoke_grant(self.s.user_id("alice"), self.s.broker.client_id)
        self.assertEqual(self.s.api("/user", token).code, 401)

    def test_basic_auth_with_password(self):
        reply = self.s.api("/user", headers={"Authorization": basic("bob", "password")})
        self.assertEqual(reply.json()["login"], "bob")
        reply = self.s.api("/user", headers={"Authorization": basic("bob", "wrong")})
        self.assertEqual(reply.code, 401)


class ScopeTests(APITestCase):
    def api_with(self, scope: str, path: str, method: str = "GET", **kwargs: Any) -> Reply:
        return self.s.api(path, self.s.access_token(scope=scope), method=method, **kwargs)

    def test_missing_read_user(self):
        """
        What makes forgejo-mcp exit at start: /user needs read:user.
        """
        reply = self.api_with("read:repository", "/user")
        self.assertAPIError(reply, 403, SCOPE_MESSAGE.format("read:user"))

    def test_user_repos_needs_user_and_repository_scopes(self):
        self.assertAPIError(
            self.api_with("read:repository", "/user/repos"),
            403,
            SCOPE_MESSAGE.format("read:user"),
        )
        self.assertAPIError(
            self.api_with("read:user", "/user/repos"),
            403,
            SCOPE_MESSAGE.format("read:repository"),
        )
        self.assertEqual(self.api_with("read:user read:repository", "/user/repos").code, 200)

    def test_repository_and_issue_scopes(self):
        self.assertEqual(self.api_with("read:repository", "/repos/alice/hello-world").code, 200)
        self.assertAPIError(
            self.api_with("read:user", "/repos/alice/hello-world"),
            403,
            SCOPE_MESSAGE.format("read:repository"),
        )
        self.assertAPIError(
            self.api_with("read:repository", "/repos/alice/hello-world/issues"),
            403,
            SCOPE_MESSAGE.format("read:issue"),
        )
        self.assertEqual(self.api_with("read:issue", "/repos/alice/hello-world/issues").code, 200)

    def test_writing_needs_write(self):
        reply = self.api_with(
            "read:issue", "/repos/alice/hello-world/issues", method="POST", json={"title": "t"}
        )
        self.assertAPIError(reply, 403, SCOPE_MESSAGE.format("write:issue"))
        reply = self.api_with(
            "write:issue", "/repos/alice/hello-world/issues", method="POST", json={"title": "t"}
        )
        self.assertEqual(reply.code, 201)

    def test_write_implies_read(self):
        self.assertEqual(self.api_with("write:user", "/user").code, 200)

    def test_no_api_scope_means_everything(self):
        for scope in ["claudeai", "", "openid", "openid profile email", "read:user,read:issue"]:
            self.assertEqual(self.api_with(scope, "/user").code, 200, scope)
            self.assertEqual(
                self.api_with(scope, "/repos/alice/hello-world/issues").code, 200, scope
            )
            reply = self.api_with(
                scope, "/repos/alice/hello-world/issues", method="POST", json={"title": "t"}
            )
            self.assertEqual(reply.code, 201, scope)

    def test_unknown_values_beside_api_scopes_are_ignored(self):
        scope = "openid read:user claudeai"
        self.assertEqual(self.api_with(scope, "/user").code, 200)
        self.assertAPIError(
            self.api_with(scope, "/repos/alice/hello-world/issues"),
            403,
            SCOPE_MESSAGE.format("read:issue"),
        )

    def test_scope_belongs_to_the_grant(self):
        """
        A returning user's new sign-in asking for more keeps the grant's
        first scope; only a new grant (after a revoke) changes it.
        """
        first = self.s.tokens(scope="read:user")["access_token"]
        second = self.s.tokens(scope="read:user read:repository")["access_token"]
        self.assertEqual(self.s.api("/repos/alice/hello-world", second).code, 403)
        third = self.s.access_token(scope="read:user read:repository")
        self.assertEqual(self.s.api("/repos/alice/hello-world", third).code, 200)
        self.assertEqual(self.s.api("/user", first).code, 401)


class UserTests(APITestCase):
    def test_user_fields(self):
        reply = self.s.api("/user", self.s.access_token())
        self.assertEqual(reply.code, 200)
        self.assertIn("application/json", reply.header("content-type") or "")
        user = reply.json()
        self.assertEqual(
            {k: user[k] for k in ("id", "login", "username", "full_name", "email", "is_admin")},
            {
                "id": self.s.user_id("alice"),
                "login": "alice",
                "username": "alice",
                "full_name": "Alice Liddell",
                "email": "alice@example.invalid",
                "is_admin": True,
            },
        )
        self.assertIsInstance(user["id"], int)
        self.assertEqual(user["html_url"], BASE + "/alice")
        self.assertTrue(user["avatar_url"].startswith(BASE + "/"))
        self.assertTimes(user)

    def test_ids_are_stable_and_distinct(self):
        alice = self.s.api("/user", self.s.access_token("alice")).json()
        bob = self.s.api("/user", self.s.access_token("bob")).json()
        self.assertNotEqual(alice["id"], bob["id"])
        self.assertFalse(bob["is_admin"])
        again = self.s.api("/user", self.s.access_token("alice")).json()
        self.assertEqual(again["id"], alice["id"])


class RepositoryTests(APITestCase):
    def names(self, reply: Reply) -> list[str]:
        self.assertEqual(reply.code, 200, reply.body)
        return [r["full_name"] for r in reply.json()]

    def test_my_repos_include_private_ones(self):
        reply = self.s.api("/user/repos?limit=100&page=1", self.s.access_token("alice"))
        self.assertEqual(self.names(reply), ["alice/hello-world", "alice/secret-plans"])
        private = {r["name"]: r["private"] for r in reply.json()}
        self.assertEqual(private, {"hello-world": False, "secret-plans": True})
        self.assertEqual(reply.header("x-total-count"), "2")
        self.assertTimes(reply.json())

    def test_my_repos_are_mine(self):
        reply = self.s.api("/user/repos", self.s.access_token("bob"))
        self.assertEqual(self.names(reply), ["bob/widgets"])

    def test_collaborators_see_the_repo(self):
        self.s.forge.repo("carol", "notes").collaborators.append("bob")  # type: ignore[union-attr]
        token = self.s.access_token("bob")
        self.assertIn("carol/notes", self.names(self.s.api("/user/repos", token)))
        self.assertEqual(self.s.api("/repos/carol/notes", token).code, 200)

    def test_paging(self):
        token = self.s.access_token("alice")
        second = self.s.api("/user/repos?limit=1&page=2", token)
        self.assertEqual(self.names(second), ["alice/secret-plans"])
        self.assertEqual(second.header("x-total-count"), "2")
        self.assertEqual(self.names(self.s.api("/user/repos?limit=1&page=3", token)), [])

    def test_repository_shape(self):
        reply = self.s.api("/repos/alice/hello-world", self.s.access_token("bob"))
        self.assertEqual(reply.code, 200)
        repo = reply.json()
        self.assertEqual(repo["owner"]["login"], "alice")
        self.assertEqual(repo["full_name"], "alice/hello-world")
        self.assertEqual(repo["default_branch"], "main")
        self.assertIsInstance(repo["id"], int)
        self.assertEqual(repo["permissions"], {"admin": False, "push": False, "pull": True})
        self.assertTimes(repo)

    def test_private_repos_of_others_are_not_found(self):
        bob = self.s.access_token("bob")
        for path in [
            "/repos/alice/secret-plans",
            "/repos/alice/secret-plans/issues",
            "/repos/alice/secret-plans/issues/1",
            "/repos/alice/secret-plans/branches",
            "/repos/carol/notes",
        ]:
            self.assertAPIError(self.s.api(path, bob), 404, "The target couldn't be found.")
        reply = self.s.api(
            "/repos/alice/secret-plans/issues", bob, method="POST", json={"title": "x"}
        )
        self.assertEqual(reply.code, 404)

    def test_owner_sees_private_repo(self):
        alice = self.s.access_token("alice")
        self.assertEqual(self.s.api("/repos/alice/secret-plans", alice).code, 200)
        self.assertEqual(self.s.api("/repos/alice/secret-plans/issues/1", alice).code, 200)

    def test_unknown_repo(self):
        reply = self.s.api("/repos/alice/nope", self.s.access_token())
        self.assertAPIError(reply, 404, "The target couldn't be found.")

    def test_unknown_path(self):
        reply = self.s.api("/no/such/thing", self.s.access_token())
        self.assertEqual(reply.code, 404)
        self.assertEqual(reply.json()["url"], BASE + "/api/swagger")

    def test_search(self):
        """
        forgejo-mcp reads only C{data} of the search answer.
        """
        bob = self.s.access_token("bob")
        reply = self.s.api("/repos/search?limit=100&page=1&q=secret", bob)
        self.assertEqual(reply.json(), {"ok": True, "data": []})
        alice = self.s.access_token("alice")
        reply = self.s.api("/repos/search?limit=100&page=1&q=secret", alice)
        self.assertEqual([r["full_name"] for r in reply.json()["data"]], ["alice/secret-plans"])

    def test_branches(self):
        reply = self.s.api(
            "/repos/alice/hello-world/branches?limit=100&page=1", self.s.access_token()
        )
        self.assertEqual(reply.code, 200)
        (branch,) = reply.json()
        self.assertEqual(branch["name"], "main")
        self.assertRegex(branch["commit"]["id"], r"^[0-9a-f]{40}$")
        self.assertTimes(reply.json())


class IssueTests(APITestCase):
    def test_list_as_forgejo_mcp_asks(self):
        reply = self.s.api(
            "/repos/alice/hello-world/issues?limit=20&page=1&state=open&type=",
            self.s.access_token("bob"),
            headers={"Content-Type": "application/json", "Accept": "application/json"},
        )
        self.assertEqual(reply.code, 200)
        issues = reply.json()
        self.assertEqual([(i["number"], i["state"]) for i in issues], [(1, "open")])
        self.assertEqual(issues[0]["title"], "Say hello in French")
        self.assertEqual(issues[0]["user"]["login"], "bob")
        self.assertTimes(issues)

    def test_states(self):
        token = self.s.access_token()

        def numbers(state: str) -> list[int]:
            reply = self.s.api(f"/repos/alice/hello-world/issues?state={state}", token)
            return [i["number"] for i in reply.json()]

        self.assertEqual(numbers("open"), [1])
        self.assertEqual(numbers(""), [1])
        self.assertEqual(numbers("closed"), [2])
        self.assertEqual(numbers("all"), [2, 1])

    def test_get(self):
        reply = self.s.api("/repos/alice/hello-world/issues/2", self.s.access_token())
        self.assertEqual(reply.code, 200)
        issue = reply.json()
        self.assertEqual((issue["number"], issue["state"]), (2, "closed"))
        self.assertIsNotNone(issue["closed_at"])
        # The SDK decodes repository.owner as a string: an object breaks it.
        self.assertEqual(
            issue["repository"],
            {
                "id": issue["repository"]["id"],
                "name": "hello-world",
                "owner": "alice",
                "full_name": "alice/hello-world",
            },
        )
        self.assertTimes(issue)

    def test_get_unknown(self):
        reply = self.s.api("/repos/alice/hello-world/issues/99", self.s.access_token())
        self.assertAPIError(reply, 404, "The target couldn't be found.")

    def test_create(self):
        token = self.s.access_token("bob")
        reply = self.s.api(
            "/repos/alice/hello-world/issues",
            token,
            method="POST",
            json={"title": "New", "body": "text"},
        )
        self.assertEqual(reply.code, 201)
        self.assertEqual(reply.json()["number"], 3)
        self.assertEqual(reply.json()["user"]["login"], "bob")
        self.assertEqual(self.s.api("/repos/alice/hello-world/issues/3", token).code, 200)

    def test_create_needs_a_title(self):
        reply = self.s.api(
            "/repos/alice/hello-world/issues", self.s.access_token(), method="POST", json={}
        )
        self.assertAPIError(reply, 422, "[Title]: Required")


class ContentsTests(APITestCase):
    def test_file(self):
        reply = self.s.api(
            "/repos/alice/hello-world/contents/README.md?ref=", self.s.access_token("bob")
        )
        self.assertEqual(reply.code, 200)
        body = reply.json()
        self.assertEqual((body["type"], body["encoding"]), ("file", "base64"))
        self.assertEqual((body["name"], body["path"]), ("README.md", "README.md"))
        text = base64.b64decode(body["content"]).decode()
        self.assertTrue(text.startswith("# hello-world\n"))
        self.assertEqual(body["size"], len(text.encode()))

    def test_missing_file(self):
        reply = self.s.api("/repos/alice/hello-world/contents/nope.txt", self.s.access_token())
        self.assertEqual(reply.code, 404)

    def test_private_contents(self):
        reply = self.s.api("/repos/carol/notes/contents/README.md", self.s.access_token("bob"))
        self.assertEqual(reply.code, 404)


class OAuthApplicationTests(APITestCase):
    """
    POST /api/v1/user/applications/oauth2: how the demo registers the broker.
    """

    def create(self, body: Any, auth: str | None = None) -> Reply:
        return self.s.api(
            "/user/applications/oauth2",
            method="POST",
            json=body,
            headers={"Authorization": auth or basic("alice", "password")},
        )

    def test_create_public_by_default(self):
        reply = self.create({"name": "mine", "redirect_uris": ["http://127.0.0.1:9/cb"]})
        self.assertEqual(reply.code, 201, reply.body)
        app = reply.json()
        self.assertEqual(app["name"], "mine")
        self.assertFalse(app["confidential_client"])
        self.assertEqual(app["redirect_uris"], ["http://127.0.0.1:9/cb"])
        self.assertEqual(str(uuid.UUID(app["client_id"])), app["client_id"])
        self.assertRegex(app["client_secret"], r"^gto_[a-z2-7]+$")
        self.assertRegex(app["created"], RFC3339_UTC)
        self.assertIsInstance(app["id"], int)
        # A public client: authorize without PKCE is refused.
        reply = self.s.authorize(
            app=self.s.forge.apps[app["client_id"]], redirect_uri="http://127.0.0.1:9/cb"
        )
        self.assertEqual(reply.query["error"], "invalid_request")

    def test_create_confidential(self):
        reply = self.create(
            {
                "name": "broker",
                "redirect_uris": ["http://127.0.0.1:9/cb"],
                "confidential_client": True,
            }
        )
        created = reply.json()
        self.assertTrue(created["confidential_client"])
        app = self.s.forge.apps[created["client_id"]]
        code = self.s.code(app=app)
        self.assertEqual(self.s.exchange(code, app=app, client_secret="wrong").code, 400)
        tokens = self.s.exchange(code, app=app, client_secret=created["client_secret"])
        self.assertEqual(tokens.code, 200, tokens.body)

    def test_validation(self):
        for body, message in [
            ({"redirect_uris": ["http://x/"]}, "[Name]: Required"),
            ({"name": "", "redirect_uris": ["http://x/"]}, "[Name]: Required"),
            ({"name": "n"}, "[RedirectURIs]: Required"),
            ({"name": "n", "redirect_uris": []}, "[RedirectURIs]: Required"),
        ]:
            self.assertAPIError(self.create(body), 422, message)

    def test_authentication(self):
        body = {"name": "n", "redirect_uris": ["http://x/"]}
        self.assertEqual(self.create(body, basic("alice", "wrong")).code, 401)
        reply = self.create(body, "token " + self.s.access_token(scope="read:user"))
        self.assertAPIError(reply, 403, SCOPE_MESSAGE.format("write:user"))
        reply = self.create(body, "token " + self.s.access_token(scope="write:user"))
        self.assertEqual(reply.code, 201)
