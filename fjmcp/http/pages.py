"""
The few HTML pages a person sees: the consent page, the connections page
and error pages.
Everything shown is escaped, and names and hosts go through L{for_people};
the pages load nothing from elsewhere.
"""

from __future__ import annotations

import datetime
import html
import unicodedata
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fjmcp.oauth.connections import Connection

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title} · fjmcp</title>
<style>
body{{font-family:system-ui,sans-serif;max-width:34em;margin:3em auto;padding:0 1em;color:#222}}
.box{{border:1px solid #ccc;border-radius:8px;padding:1em 1.5em}}
code{{background:#f3f3f3;padding:0 .2em}}
ul{{padding-left:1.2em}}
button{{font-size:1em;padding:.5em 1.4em;margin:.3em .5em .3em 0;border-radius:6px;cursor:pointer}}
.approve{{background:#2e7d32;color:#fff;border:1px solid #2e7d32}}
.deny{{background:#fff;border:1px solid #999}}
.warn{{color:#8a4b00}}
</style></head>
<body><div class="box"><h1>{title}</h1>{body}</div></body></html>
"""

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


def render(title: str, body: str) -> bytes:
    return _PAGE.format(title=html.escape(title), body=body).encode("utf-8")


def error_page(title: str, message: str) -> bytes:
    return render(title, f"<p>{html.escape(message)}</p>")


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
    e = html.escape
    abilities = "".join(f"<li>{e(line)}</li>" for line in describe_scopes(forgejo_scopes))
    warning = (
        '<p class="warn">This client registered itself; its name is its own claim. '
        "Check where it will send you back.</p>"
        if unverified_name
        else ""
    )
    body = f"""
<p><b>{e(_name(client_name))}</b> wants to use your account at
<code>{e(forgejo_url)}</code> through this MCP server.</p>
{warning}
<p>After you approve and sign in to Forgejo, you will be sent back to
<b>{e(for_people(redirect_host))}</b>.</p>
<p>It will be able to act as you in Forgejo, with these permissions:</p>
<ul>{abilities}</ul>
<p><small>Client ID: <code>{e(client_id)}</code>. You can revoke access later on
<a href="/connections">your connections page</a>.</small></p>
<form method="post" action="{e(action)}">
<input type="hidden" name="consent" value="{e(consent_token)}">
<button class="approve" type="submit" name="decision" value="approve">Approve</button>
<button class="deny" type="submit" name="decision" value="deny">Deny</button>
</form>"""
    return render("Allow access to Forgejo?", body)


def _when(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return moment.strftime("%Y-%m-%d %H:%M UTC")


_CONNECTIONS_STYLE = (
    ".conns{list-style:none;padding:0}.conn{border-top:1px solid #ddd;padding:.8em 0}"
    ".notice{background:#e8f5e9;padding:.5em 1em;border-radius:6px}"
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
    e = html.escape
    rows = []
    for c in connections:
        claimed = ' <small class="warn">(name given by the application itself)</small>'
        hosts = ", ".join(f"<code>{e(for_people(h))}</code>" for h in c.redirect_hosts) or "none"
        in_use = f", {c.live_sessions} open session(s)" if c.live_sessions else ""
        rows.append(
            f"""<li class="conn"><b>{e(_name(c.name))}</b>{claimed if c.self_named else ""}<br>
<small>Sends you back to {hosts}<br>
Approved {e(_when(c.approved_at))} · last used {e(_when(c.last_used_at))}{e(in_use)}<br>
Client ID: <code>{e(c.client_id)}</code></small>
<form method="post" action="{e(action)}">
<input type="hidden" name="csrf" value="{e(form_token)}">
<input type="hidden" name="client_id" value="{e(c.client_id)}">
<button class="deny" type="submit">Revoke</button>
</form></li>"""
        )
    listing = (
        f'<ul class="conns">{"".join(rows)}</ul>'
        if rows
        else "<p>You have not connected any application.</p>"
    )
    message = f'<p class="notice">{e(notice)}</p>' if notice else ""
    body = f"""<style>{_CONNECTIONS_STYLE}</style>{message}
<p>Signed in as <b>{e(user_login)}</b> of <code>{e(forgejo_url)}</code>. These
applications can use your Forgejo account through this MCP server. Revoking one
signs it out at once and ends its open sessions; it has to ask you again
before it can connect.</p>
{listing}"""
    return render("Your connected applications", body)
