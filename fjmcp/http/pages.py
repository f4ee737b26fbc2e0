"""
The few HTML pages a person sees: the consent page, the connections page
and error pages.

The pages are trees of L{twisted.web.template.tags}, flattened by Twisted:
every value is a text node or an attribute value, which the flattener
escapes, so no value can open a tag or leave an attribute, and no HTML is
ever put together from strings.  Names and hosts also go through
L{for_people}.  The pages load nothing from elsewhere.
"""

from __future__ import annotations

import datetime
import unicodedata
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from twisted.python.failure import Failure
from twisted.web.template import Flattenable, Tag, flattenString, tags

if TYPE_CHECKING:
    from fjmcp.oauth.connections import Connection

# The flattener has no node for a document type; this one is a constant.
_DOCTYPE = b"<!doctype html>\n"

# Style sheets are text nodes, so the flattener escapes C{&}, C{<} and C{>} in
# them: keep them to rules without those characters (no child selectors).
_STYLE = """
body{font-family:system-ui,sans-serif;max-width:34em;margin:3em auto;padding:0 1em;color:#222}
body{overflow-wrap:anywhere}
.box{border:1px solid #ccc;border-radius:8px;padding:1em 1.5em}
code{background:#f3f3f3;padding:0 .2em}
ul{padding-left:1.2em}
button{font-size:1em;padding:.5em 1.4em;margin:.3em .5em .3em 0;border-radius:6px;cursor:pointer}
.approve{background:#2e7d32;color:#fff;border:1px solid #2e7d32}
.deny{background:#fff;border:1px solid #999}
.warn{color:#8a4b00}
"""

_CONNECTIONS_STYLE = (
    ".conns{list-style:none;padding:0}.conn{border-top:1px solid #ddd;padding:.8em 0}"
    ".notice{background:#e8f5e9;padding:.5em 1em;border-radius:6px}"
)

# What each Forgejo scope lets an assistant do, in words a person reads.
SCOPE_WORDS = {
    "user": "see your Forgejo profile",
    "repository": "repositories, their files, branches and pull requests",
    "issue": "issues, labels, milestones and comments",
    "organization": "organizations and teams",
    "notification": "your notifications",
    "misc": "miscellaneous Forgejo data",
    "package": "packages",
    "activitypub": "federation (ActivityPub) data",
    "admin": "site administration",
}


# Characters a person cannot see but that change what they see: format
# characters (Cf: bidi overrides and isolates such as U+202E, which shows
# what follows it reversed, and zero-width ones), controls, line and paragraph
# separators, and lone surrogates, which are not text at all.
_INVISIBLE = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
UNNAMED = "An unnamed application"


def for_people(text: str) -> str:
    """
    C{text} as a page may show it: without invisible characters, runs of
    white space as one space.  Names come from clients, who choose them to
    be read as something they are not.
    """
    kept = "".join(c for c in text if unicodedata.category(c) not in _INVISIBLE)
    return " ".join(kept.split())


def _name(name: str) -> str:
    return for_people(name) or UNNAMED


def _flatten(root: Flattenable) -> bytes:
    """
    C{root} as UTF-8 HTML, now.  The pages hold no L{Deferred}, so
    L{flattenString}'s result has already fired when it returns; one that
    has not would be a page waiting on something, which is a bug here.
    """
    done: list[bytes] = []
    failed: list[Failure] = []
    flattenString(None, root).addCallbacks(done.append, failed.append)
    if failed:
        failed[0].raiseException()
    if not done:
        raise RuntimeError("a page did not flatten synchronously")
    return done[0]


def _joined(parts: Iterable[Flattenable], separator: str) -> list[Flattenable]:
    joined: list[Flattenable] = []
    for part in parts:
        if joined:
            joined.append(separator)
        joined.append(part)
    return joined


def render(title: str, body: Flattenable) -> bytes:
    """
    The page titled C{title} around C{body}: text, L{tags} or a list of them,
    never markup in a string (a string is shown as text).
    """
    page = tags.html(lang="en")(
        tags.head(
            tags.meta(charset="utf-8"),
            "\n",
            tags.meta(name="viewport", content="width=device-width, initial-scale=1"),
            "\n",
            tags.title(title, " · fjmcp"),
            "\n",
            tags.style(_STYLE),
        ),
        "\n",
        tags.body(tags.div(class_="box")(tags.h1(title), body)),
    )
    return _DOCTYPE + _flatten(page) + b"\n"


def error_page(title: str, message: str) -> bytes:
    return render(title, tags.p(message))


def home_page(mcp_url: str, forgejo_url: str) -> bytes:
    """
    What someone who opens the broker's address in a browser sees: what
    this is, and what to give an MCP client.
    """
    return render(
        "fjmcp",
        [
            tags.p(
                "This is an MCP server for ",
                tags.a(forgejo_url, href=forgejo_url),
                ": AI assistants reach your Forgejo account through it, after you sign "
                "in at Forgejo and approve them.",
            ),
            tags.p("Give your MCP client this address: ", tags.code(mcp_url)),
            tags.p(
                "The applications you approved: ",
                tags.a("your connections", href="/connections"),
                ".",
            ),
        ],
    )


def describe_scopes(scopes: tuple[str, ...]) -> list[str]:
    """
    Turn Forgejo scopes such as C{write:repository} into sentences.
    """
    lines = []
    for scope in scopes:
        level, _, category = scope.partition(":")
        what = SCOPE_WORDS.get(category)
        if scope == "all":
            lines.append("read and change everything your Forgejo account can")
        elif what and level == "write":
            lines.append(f"read and change {what}" if category != "user" else f"change and {what}")
        elif what and level == "read":
            lines.append(f"read {what}" if category != "user" else what)
        else:
            lines.append(scope)
    return lines


def _hidden(name: str, value: str) -> Tag:
    return tags.input(type="hidden", name=name, value=value)


def consent_page(
    *,
    client_name: str,
    client_id: str,
    redirect_host: str,
    forgejo_url: str,
    forgejo_scopes: tuple[str, ...],
    consent_token: str,
    action: str,
    unverified_name: bool,
) -> bytes:
    warning: Flattenable = (
        tags.p(class_="warn")(
            "This client registered itself; its name is its own claim. "
            "Check where it will send you back."
        )
        if unverified_name
        else ""
    )
    body = [
        "\n",
        tags.p(
            tags.b(_name(client_name)),
            " wants to use your account at\n",
            tags.code(forgejo_url),
            " through this MCP server.",
        ),
        "\n",
        warning,
        "\n",
        tags.p(
            "After you approve and sign in to Forgejo, you will be sent back to\n",
            tags.b(for_people(redirect_host)),
            ".",
        ),
        "\n",
        tags.p("It will be able to act as you in Forgejo, with these permissions:"),
        "\n",
        tags.ul([tags.li(line) for line in describe_scopes(forgejo_scopes)]),
        "\n",
        tags.p(
            tags.small(
                "Client ID: ",
                tags.code(client_id),
                ". You can revoke access later on\n",
                tags.a(href="/connections")("your connections page"),
                ".",
            )
        ),
        "\n",
        tags.form(method="post", action=action)(
            "\n",
            _hidden("consent", consent_token),
            "\n",
            tags.button(class_="approve", type="submit", name="decision", value="approve")(
                "Approve"
            ),
            "\n",
            tags.button(class_="deny", type="submit", name="decision", value="deny")("Deny"),
            "\n",
        ),
    ]
    return render("Allow access to Forgejo?", body)


def _when(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def _connection(c: Connection, form_token: str, action: str) -> Tag:
    claimed: Flattenable = (
        [" ", tags.small(class_="warn")("(name given by the application itself)")]
        if c.self_named
        else ""
    )
    hosts = _joined((tags.code(for_people(h)) for h in c.redirect_hosts), ", ") or "none"
    in_use = f", {c.live_sessions} open session(s)" if c.live_sessions else ""
    return tags.li(class_="conn")(
        tags.b(_name(c.name)),
        claimed,
        tags.br(),
        "\n",
        tags.small(
            "Sends you back to ",
            hosts,
            tags.br(),
            "\n",
            f"Approved {_when(c.approved_at)} · last used {_when(c.last_used_at)}{in_use}",
            tags.br(),
            "\n",
            "Client ID: ",
            tags.code(c.client_id),
        ),
        "\n",
        tags.form(method="post", action=action)(
            "\n",
            _hidden("csrf", form_token),
            "\n",
            _hidden("client_id", c.client_id),
            "\n",
            tags.button(class_="deny", type="submit")("Revoke"),
            "\n",
        ),
    )


def connections_page(
    *,
    user_login: str,
    forgejo_url: str,
    connections: Sequence[Connection],
    form_token: str,
    action: str,
    notice: str | None = None,
) -> bytes:
    """
    The clients a signed-in user approved, each with a Revoke button.  Every
    form on the page carries the same single-use C{form_token}.
    """
    listing = (
        tags.ul(class_="conns")([_connection(c, form_token, action) for c in connections])
        if connections
        else tags.p("You have not connected any application.")
    )
    body = [
        tags.style(_CONNECTIONS_STYLE),
        tags.p(class_="notice")(notice) if notice else "",
        "\n",
        tags.p(
            "Signed in as ",
            tags.b(user_login),
            " of ",
            tags.code(forgejo_url),
            ". These\napplications can use your Forgejo account through this MCP server. "
            "Revoking one\nsigns it out at once and ends its open sessions; it has to ask "
            "you again\nbefore it can connect.",
        ),
        "\n",
        listing,
    ]
    return render("Your connected applications", body)
