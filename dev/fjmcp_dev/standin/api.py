"""
The stand-in's REST API (C{/api/v1}): the endpoints forgejo-mcp calls, with
Forgejo's authentication, scope checks, JSON shapes and error bodies.
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any

from klein import Klein
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.server import Request

from fjmcp_dev.standin.model import VERSION, Forge, Issue, Repo, User, scope_allows


def read_body(request: Request, limit: int = 1024 * 1024) -> bytes:
    return request.content.read(limit) if request.content is not None else b""


def rfc3339(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


class APIError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class ForgejoAPI:
    """
    C{/api/v1/...} over a L{Forge}.  C{base_url} is the stand-in's own
    public URL, used for C{html_url}s and error bodies.
    """

    app = Klein()

    def __init__(self, forge: Forge, base_url: str) -> None:
        self.forge = forge
        self.base_url = base_url.rstrip("/")

    # --- helpers

    def _json(self, request: Request, body: Any, status: int = 200) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"Content-Type", b"application/json;charset=utf-8")
        return json.dumps(body).encode()

    @app.handle_errors(APIError)
    def _api_error(self, request: IRequest, failure: Failure) -> bytes:
        e = failure.value
        assert isinstance(e, APIError) and isinstance(request, Request)
        return self._json(
            request, {"message": e.message, "url": self.base_url + "/api/swagger"}, e.status
        )

    def _doer(self, request: Request) -> tuple[User, set[str]] | None:
        """
        Forgejo's API auth middleware, which runs before every route:
        C{Authorization: token X} (that exact word) or C{Bearer X} (any case),
        or Basic with a password.  A token that is not valid (unknown,
        expired, revoked) is a 401 on every route, even C{/version}; no
        credentials at all is anonymous.
        """
        header = (request.getHeader(b"authorization") or b"").decode("latin-1")
        parts = header.split()
        if len(parts) != 2:
            return None
        kind, value = parts
        if kind == "token" or kind.lower() == "bearer":
            found = self.forge.user_for_access_token(value)
            if found is None:
                raise APIError(401, "user does not exist [uid: 0, name: ]")
            return found
        if kind.lower() == "basic":
            try:
                login, _, password = base64.b64decode(value).decode().partition(":")
            except ValueError:
                return None
            user = self.forge.user_by_login(login)
            if user is not None and password == user.password:
                return (user, {"all"})
        return None

    def _authenticate(self, request: Request, *required: str) -> tuple[User, set[str]]:
        """
        Forgejo's rules for a route that needs a signed-in user: 401 without
        credentials, 403 naming the first scope (of the route's groups, outer
        first) that the token lacks.
        """
        found = self._doer(request)
        if found is None:
            raise APIError(401, "token is required")
        for scope in required:
            if not scope_allows(found[1], scope):
                raise APIError(
                    403, f"token does not have at least one of required scope(s): [{scope}]"
                )
        return found

    def _page(self, request: Request, items: list[Any], default_limit: int = 30) -> list[Any]:
        def arg(name: bytes, default: int) -> int:
            try:
                return max(1, int(request.args.get(name, [b""])[0] or default))
            except ValueError:
                return default

        # Forgejo caps every page at MAX_RESPONSE_ITEMS (50 by default).
        page, limit = arg(b"page", 1), min(arg(b"limit", default_limit), 50)
        request.setHeader(b"X-Total-Count", str(len(items)).encode())
        return items[(page - 1) * limit : page * limit]

    def _repo(self, user: User, owner: str, name: str, scopes: set[str]) -> Repo:
        repo = self.forge.repo(owner, name)
        if repo is None or not self.forge.can_see(user, repo, "public-only" in scopes):
            raise APIError(404, "The target couldn't be found.")
        return repo

    def user_json(self, user: User) -> dict[str, Any]:
        return {
            "id": user.id,
            "login": user.login,
            "login_name": "",
            "source_id": 0,
            "full_name": user.full_name,
            "email": user.email,
            "avatar_url": f"{self.base_url}/avatars/{user.login}",
            "html_url": f"{self.base_url}/{user.login}",
            "language": "en-US",
            "is_admin": user.is_admin,
            "last_login": rfc3339(self.forge.now()),
            "created": rfc3339(1704067200),
            "restricted": False,
            "active": True,
            "prohibit_login": False,
            "location": "",
            "pronouns": "",
            "website": "",
            "description": "",
            "visibility": "public",
            "followers_count": 0,
            "following_count": 0,
            "starred_repos_count": 0,
            "username": user.login,
        }

    def repo_json(self, repo: Repo, viewer: User) -> dict[str, Any]:
        owner = self.forge.user_by_login(repo.owner)
        assert owner is not None
        mine = repo.owner == viewer.login or viewer.login in repo.collaborators
        return {
            "id": repo.id,
            "owner": self.user_json(owner),
            "name": repo.name,
            "full_name": repo.full_name,
            "description": repo.description,
            "empty": not repo.files,
            "private": repo.private,
            "fork": False,
            "template": False,
            "mirror": False,
            "size": sum(len(c) for c in repo.files.values()),
            "html_url": f"{self.base_url}/{repo.full_name}",
            "url": f"{self.base_url}/api/v1/repos/{repo.full_name}",
            "ssh_url": f"git@standin.invalid:{repo.full_name}.git",
            "clone_url": f"{self.base_url}/{repo.full_name}.git",
            "website": "",
            "stars_count": 0,
            "forks_count": 0,
            "watchers_count": 1,
            "open_issues_count": sum(1 for i in repo.issues if i.state == "open"),
            "open_pr_counter": 0,
            "release_counter": 0,
            "default_branch": repo.default_branch,
            "archived": False,
            "created_at": rfc3339(repo.created),
            "updated_at": rfc3339(repo.created),
            "permissions": {"admin": mine, "push": mine, "pull": True},
            "has_issues": True,
            "has_wiki": False,
            "has_pull_requests": True,
            "has_projects": False,
            "has_releases": True,
            "has_packages": False,
            "has_actions": False,
            "internal": False,
            "mirror_interval": "",
            "default_merge_style": "merge",
        }

    def issue_json(self, repo: Repo, issue: Issue) -> dict[str, Any]:
        author = self.forge.user_by_login(issue.author)
        assert author is not None
        return {
            "id": issue.id,
            "url": f"{self.base_url}/api/v1/repos/{repo.full_name}/issues/{issue.number}",
            "html_url": f"{self.base_url}/{repo.full_name}/issues/{issue.number}",
            "number": issue.number,
            "user": self.user_json(author),
            "original_author": "",
            "original_author_id": 0,
            "title": issue.title,
            "body": issue.body,
            "ref": "",
            "labels": [],
            "milestone": None,
            "assignee": None,
            "assignees": None,
            "state": issue.state,
            "is_locked": False,
            "comments": 0,
            "created_at": rfc3339(issue.created),
            "updated_at": rfc3339(issue.created),
            "closed_at": rfc3339(issue.created) if issue.state == "closed" else None,
            "due_date": None,
            "pull_request": None,
            "repository": {
                "id": repo.id,
                "name": repo.name,
                "owner": repo.owner,
                "full_name": repo.full_name,
            },
        }

    # --- routes

    @app.route("/version", methods=["GET"])
    def version(self, request: Request) -> bytes:
        self._doer(request)
        return self._json(request, {"version": VERSION})

    @app.route("/user", methods=["GET"])
    def me(self, request: Request) -> bytes:
        user, _ = self._authenticate(request, "read:user")
        return self._json(request, self.user_json(user))

    @app.route("/user/repos", methods=["GET"])
    def my_repos(self, request: Request) -> bytes:
        # /user/repos sits in the /user group (user scope) and adds its own.
        user, scopes = self._authenticate(request, "read:user", "read:repository")
        repos = [
            r
            for r in self.forge.repos_of(user)
            if self.forge.can_see(user, r, "public-only" in scopes)
        ]
        return self._json(request, [self.repo_json(r, user) for r in self._page(request, repos)])

    @app.route("/repos/search", methods=["GET"])
    def search_repos(self, request: Request) -> bytes:
        user, scopes = self._authenticate(request, "read:repository")
        keyword = request.args.get(b"q", [b""])[0].decode().lower()
        found = [
            r
            for r in self.forge.repos
            if self.forge.can_see(user, r, "public-only" in scopes)
            and (keyword in r.name.lower() or keyword in r.description.lower())
        ]
        page = self._page(request, found)
        return self._json(request, {"ok": True, "data": [self.repo_json(r, user) for r in page]})

    @app.route("/repos/<owner>/<name>", methods=["GET"])
    def get_repo(self, request: Request, owner: str, name: str) -> bytes:
        user, scopes = self._authenticate(request, "read:repository")
        return self._json(request, self.repo_json(self._repo(user, owner, name, scopes), user))

    @app.route("/repos/<owner>/<name>/issues", methods=["GET"])
    def list_issues(self, request: Request, owner: str, name: str) -> bytes:
        user, scopes = self._authenticate(request, "read:issue")
        repo = self._repo(user, owner, name, scopes)
        state = request.args.get(b"state", [b"open"])[0].decode() or "open"
        issues = [i for i in repo.issues if state == "all" or i.state == state]
        issues.sort(key=lambda i: i.number, reverse=True)
        return self._json(request, [self.issue_json(repo, i) for i in self._page(request, issues)])

    @app.route("/repos/<owner>/<name>/issues", methods=["POST"])
    def create_issue(self, request: Request, owner: str, name: str) -> bytes:
        user, scopes = self._authenticate(request, "write:issue")
        repo = self._repo(user, owner, name, scopes)
        try:
            body = json.loads(read_body(request) or b"{}")
            title = str(body["title"]).strip()
        except (ValueError, KeyError, TypeError):
            title = ""
        if not title:
            raise APIError(422, "[Title]: Required")
        issue = Issue(
            self.forge.new_id(),
            max((i.number for i in repo.issues), default=0) + 1,
            title,
            str(body.get("body", "")),
            user.login,
            created=self.forge.now(),
        )
        repo.issues.append(issue)
        return self._json(request, self.issue_json(repo, issue), 201)

    @app.route("/repos/<owner>/<name>/issues/<int:number>", methods=["GET"])
    def get_issue(self, request: Request, owner: str, name: str, number: int) -> bytes:
        user, scopes = self._authenticate(request, "read:issue")
        repo = self._repo(user, owner, name, scopes)
        issue = next((i for i in repo.issues if i.number == number), None)
        if issue is None:
            raise APIError(404, "The target couldn't be found.")
        return self._json(request, self.issue_json(repo, issue))

    @app.route("/repos/<owner>/<name>/branches", methods=["GET"])
    def list_branches(self, request: Request, owner: str, name: str) -> bytes:
        user, scopes = self._authenticate(request, "read:repository")
        repo = self._repo(user, owner, name, scopes)
        branch = {
            "name": repo.default_branch,
            "commit": {
                "id": "0" * 40,
                "message": "Initial commit\n",
                "url": f"{self.base_url}/{repo.full_name}/commit/{'0' * 40}",
                "author": {
                    "name": repo.owner,
                    "email": f"{repo.owner}@example.invalid",
                    "username": repo.owner,
                },
                "committer": {
                    "name": repo.owner,
                    "email": f"{repo.owner}@example.invalid",
                    "username": repo.owner,
                },
                "verification": None,
                "timestamp": rfc3339(repo.created),
            },
            "protected": False,
            "required_approvals": 0,
            "enable_status_check": False,
            "status_check_contexts": [],
            "user_can_push": repo.owner == user.login,
            "user_can_merge": repo.owner == user.login,
            "effective_branch_protection_name": "",
        }
        return self._json(request, self._page(request, [branch] if repo.files else []))

    @app.route("/repos/<owner>/<name>/contents/<path:path>", methods=["GET"])
    def get_contents(self, request: Request, owner: str, name: str, path: str) -> bytes:
        user, scopes = self._authenticate(request, "read:repository")
        repo = self._repo(user, owner, name, scopes)
        content = repo.files.get(path)
        if content is None:
            raise APIError(404, "object does not exist [id: , rel_path: " + path + "]")
        raw = content.encode()
        return self._json(
            request,
            {
                "name": path.rsplit("/", 1)[-1],
                "path": path,
                "sha": "1" * 40,
                "last_commit_sha": "0" * 40,
                "type": "file",
                "size": len(raw),
                "encoding": "base64",
                "content": base64.b64encode(raw).decode(),
                "target": None,
                "url": f"{self.base_url}/api/v1/repos/{repo.full_name}/contents/{path}",
                "html_url": f"{self.base_url}/{repo.full_name}/src/branch/main/{path}",
                "git_url": f"{self.base_url}/api/v1/repos/{repo.full_name}/git/blobs/{'1' * 40}",
                "download_url": f"{self.base_url}/{repo.full_name}/raw/branch/main/{path}",
                "submodule_git_url": None,
                "_links": {},
            },
        )

    @app.route("/user/applications/oauth2", methods=["POST"])
    def create_oauth_app(self, request: Request) -> bytes:
        user, _ = self._authenticate(request, "write:user")
        try:
            body = json.loads(read_body(request) or b"{}")
            name = str(body.get("name") or "")
            uris = [str(u) for u in body.get("redirect_uris") or []]
            # Omitted means false: a public client, which must use PKCE.
            confidential = bool(body.get("confidential_client", False))
        except (ValueError, TypeError, AttributeError):
            raise APIError(422, "[Name]: Required") from None
        if not name:
            raise APIError(422, "[Name]: Required")
        if not uris:
            raise APIError(422, "[RedirectURIs]: Required")
        app = self.forge.add_app(name, uris, confidential, owner_id=user.id)
        return self._json(
            request,
            {
                "id": len(self.forge.apps),
                "name": app.name,
                "client_id": app.client_id,
                "client_secret": app.client_secret,
                "redirect_uris": app.redirect_uris,
                "confidential_client": app.confidential,
                "created": rfc3339(self.forge.now()),
            },
            201,
        )

    @app.route("/", branch=True)
    def not_found(self, request: Request) -> bytes:
        self._doer(request)
        raise APIError(404, "The target couldn't be found.")
