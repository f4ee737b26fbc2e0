"""
The HTML pages (L{fjmcp.http.pages}): whatever text a client, a user or
Forgejo puts in them stays text.  The pages are built with
L{twisted.web.template}, so escaping is the flattener's; these tests read
the pages back with L{html.parser} and check that the tags are the page's
own and every value comes back exactly as given.
"""

from __future__ import annotations

from html.parser import HTMLParser
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from fjmcp.http.pages import (
    UNNAMED,
    connections_page,
    consent_page,
    describe_scopes,
    error_page,
    for_people,
    render,
)
from fjmcp.oauth.connections import Connection

# Elements that have no end tag, written C{<br>} or C{<br />}.
VOID = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta"})
HOSTILE = "\"><script>alert('x')</script>&amp;<img src=x onerror=alert(1)>"


class Parsed(HTMLParser):
    """
    A page as a browser's parser reads it: its start tags in order, each
    with its attributes and the text inside it (its descendants' too).
    """

    def __init__(self, page: bytes) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.unclosed: list[int] = []
        self.feed(page.decode("utf-8"))
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        self.text.append("")
        if tag not in VOID:
            self.unclosed.append(len(self.tags) - 1)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        self.text.append("")

    def handle_endtag(self, tag: str) -> None:
        assert self.tags[self.unclosed[-1]][0] == tag, (tag, self.tags[self.unclosed[-1]])
        self.unclosed.pop()

    def handle_data(self, data: str) -> None:
        for index in self.unclosed:
            self.text[index] += data

    def shape(self) -> list[tuple[str, list[str]]]:
        """
        The tags and the names of their attributes, without any value.
        """
        return [(name, list(attrs)) for name, attrs in self.tags]

    def texts(self, tag: str) -> list[str]:
        """
        The text in each C{tag} element, or in each element of class
        C{.name} for C{tag} C{.name}.
        """
        return [
            text
            for (name, attrs), text in zip(self.tags, self.text, strict=True)
            if (attrs.get("class") == tag[1:] if tag.startswith(".") else name == tag)
        ]

    def attrs(self, tag: str) -> list[dict[str, str | None]]:
        return [attrs for name, attrs in self.tags if name == tag]

    def hidden(self, name: str) -> list[str | None]:
        return [a["value"] for a in self.attrs("input") if a.get("name") == name]


def read(page: bytes) -> Parsed:
    parsed = Parsed(page)
    # Nothing left open: every tag the page opened, it closed.
    assert not parsed.unclosed, parsed.unclosed
    return parsed


# Any text, and text thick with what means something in HTML (random text
# seldom holds a "<" before a letter).  st.text() leaves out lone surrogates,
# which cannot be UTF-8 (and never reach a page: they come from decoded
# UTF-8 or JSON, which refuse them).
markup = st.sampled_from(
    [*"<>&\"'=/\n", "<script>", "</b>", "<img src=x onerror=alert(1)>", '" x="', "<!--", "-->"]
) | st.sampled_from(["&amp;", "&lt;", "&quot;", "&#x27;", "&#0;", "<![CDATA["])
texts = st.text() | st.lists(st.text(max_size=4) | markup, max_size=8).map("".join)
moments = st.none() | st.floats(min_value=0, max_value=4e9)


def connections() -> st.SearchStrategy[Connection]:
    return st.builds(
        Connection,
        client_id=texts,
        name=texts,
        self_named=st.booleans(),
        redirect_hosts=st.lists(texts, max_size=3).map(tuple),
        approved_at=moments,
        last_used_at=moments,
        live_grants=st.integers(0, 5),
        live_sessions=st.integers(0, 5),
    )


class EscapingTests(SynchronousTestCase):
    def assertNoMarkupFromInput(self, page: bytes) -> None:
        lowered = page.lower()
        self.assertNotIn(b"<script", lowered)
        self.assertNotIn(b"<img", lowered)

    @given(title=texts, message=texts)
    def test_error_page(self, title: str, message: str) -> None:
        page = read(error_page(title, message))
        self.assertEqual(page.shape(), read(error_page("t", "m")).shape())
        self.assertEqual(page.texts("title"), [f"{title} · fjmcp"])
        self.assertEqual(page.texts("h1"), [title])
        self.assertEqual(page.texts("p"), [message])
        self.assertNoMarkupFromInput(error_page(title, message))

    @given(
        client_name=texts,
        client_id=texts,
        redirect_host=texts,
        forgejo_url=texts,
        scopes=st.lists(texts, max_size=4).map(tuple),
        consent_token=texts,
        action=texts,
        unverified_name=st.booleans(),
    )
    def test_consent_page(
        self,
        client_name: str,
        client_id: str,
        redirect_host: str,
        forgejo_url: str,
        scopes: tuple[str, ...],
        consent_token: str,
        action: str,
        unverified_name: bool,
    ) -> None:
        def page_of(**values: Any) -> bytes:
            return consent_page(forgejo_scopes=scopes, unverified_name=unverified_name, **values)

        raw = page_of(
            client_name=client_name,
            client_id=client_id,
            redirect_host=redirect_host,
            forgejo_url=forgejo_url,
            consent_token=consent_token,
            action=action,
        )
        page = read(raw)
        plain = page_of(
            client_name="c",
            client_id="i",
            redirect_host="h",
            forgejo_url="u",
            consent_token="t",
            action="/a",
        )
        self.assertEqual(page.shape(), read(plain).shape())
        self.assertNoMarkupFromInput(raw)
        self.assertEqual(
            page.texts("b"), [for_people(client_name) or UNNAMED, for_people(redirect_host)]
        )
        self.assertEqual(page.texts("code"), [forgejo_url, client_id])
        self.assertEqual(page.texts("li"), describe_scopes(scopes))
        self.assertEqual(page.attrs("form"), [{"method": "post", "action": action}])
        self.assertEqual(page.hidden("consent"), [consent_token])
        self.assertEqual(page.hidden("decision"), [])
        self.assertEqual(
            [(b.get("name"), b.get("value")) for b in page.attrs("button")],
            [("decision", "approve"), ("decision", "deny")],
        )

    @given(
        user_login=texts,
        forgejo_url=texts,
        shown=st.lists(connections(), max_size=3),
        form_token=texts,
        action=texts,
        notice=st.none() | texts,
    )
    def test_connections_page(
        self,
        user_login: str,
        forgejo_url: str,
        shown: list[Connection],
        form_token: str,
        action: str,
        notice: str | None,
    ) -> None:
        raw = connections_page(
            user_login=user_login,
            forgejo_url=forgejo_url,
            connections=shown,
            form_token=form_token,
            action=action,
            notice=notice,
        )
        page = read(raw)
        plain = connections_page(
            user_login="u",
            forgejo_url="f",
            connections=[
                Connection("i", "n", c.self_named, ("h",) * len(c.redirect_hosts), 0.0, 0.0, 0, 0)
                for c in shown
            ],
            form_token="t",
            action="/a",
            notice="n" if notice else None,
        )
        self.assertEqual(page.shape(), read(plain).shape())
        self.assertNoMarkupFromInput(raw)
        self.assertEqual(
            page.texts("b"), [user_login] + [for_people(c.name) or UNNAMED for c in shown]
        )
        codes = [forgejo_url]
        for c in shown:
            codes += [for_people(h) for h in c.redirect_hosts] + [c.client_id]
        self.assertEqual(page.texts("code"), codes)
        notices = [
            t
            for (name, a), t in zip(page.tags, page.text, strict=True)
            if a.get("class") == "notice"
        ]
        self.assertEqual(notices, [notice] if notice else [])
        self.assertEqual(page.attrs("form"), [{"method": "post", "action": action}] * len(shown))
        self.assertEqual(page.hidden("csrf"), [form_token] * len(shown))
        self.assertEqual(page.hidden("client_id"), [c.client_id for c in shown])


class PageTests(SynchronousTestCase):
    def test_attribute_values_are_escaped(self) -> None:
        """
        Quotes, ampersands and angle brackets in a value cannot end the
        attribute or open a tag.
        """
        page = consent_page(
            client_name=HOSTILE,
            client_id=HOSTILE,
            redirect_host=HOSTILE,
            forgejo_url=HOSTILE,
            forgejo_scopes=(HOSTILE,),
            consent_token=HOSTILE,
            action=HOSTILE,
            unverified_name=True,
        )
        escaped = b"&quot;&gt;&lt;script&gt;alert('x')&lt;/script&gt;&amp;amp;&lt;img"
        self.assertIn(b'name="consent" value="' + escaped, page)
        self.assertIn(b'<form method="post" action="' + escaped, page)
        self.assertIn(b"<code>" + escaped.replace(b"&quot;", b'"'), page)
        self.assertNotIn(b"<script", page)
        self.assertNotIn(b"<img", page)
        self.assertEqual(read(page).hidden("consent"), [HOSTILE])

    def test_consent_form(self) -> None:
        """
        What the tests' browsers and people's read from the consent page.
        """
        page = consent_page(
            client_name="Claude",
            client_id="fjmcp-1",
            redirect_host="claude.ai",
            forgejo_url="https://forgejo.example",
            forgejo_scopes=("read:user", "write:repository", "all", "odd"),
            consent_token="tok-1",
            action="/oauth/authorize/consent",
            unverified_name=False,
        ).decode()
        self.assertTrue(page.startswith('<!doctype html>\n<html lang="en"><head>'))
        self.assertIn('name="consent" value="tok-1"', page)
        self.assertIn("<b>Claude</b> wants to use your account at\n", page)
        self.assertIn("sent back to\n<b>claude.ai</b>", page)
        self.assertNotIn('class="warn"', page)
        self.assertEqual(
            read(page.encode()).texts("li"),
            [
                "see your Forgejo profile",
                "read and change repositories, their files, branches and pull requests",
                "read and change everything your Forgejo account can",
                "odd",
            ],
        )

    def test_a_string_body_is_text(self) -> None:
        """
        L{render} takes tags; markup in a string is shown, not obeyed.
        """
        page = render("t", "<b>x</b>")
        self.assertIn(b"&lt;b&gt;x&lt;/b&gt;", page)
        self.assertNotIn(b"<b>", page)

    def test_pages_never_wait(self) -> None:
        """
        A page that would wait on a L{Deferred} is refused, not returned
        half-written.
        """
        self.assertRaises(RuntimeError, render, "t", Deferred())
