"""
Property tests for the Forgejo stand-in's pure rules (L{fjmcp_dev.standin.model}):
redirect URI matching, PKCE, and scopes, each against the behaviour real
Forgejo has (research notes: Forgejo C{models/auth/oauth2.go},
C{services/auth/oauth2.go}, C{models/auth/access_token_scope.go}).
"""

from __future__ import annotations

import base64
import hashlib
import string

from fjmcp_dev.standin.model import (
    SCOPE_CATEGORIES,
    Forge,
    OAuthError,
    parse_scope,
    pkce_verifies,
    redirect_uri_matches,
    scope_allows,
    seed,
)
from hypothesis import assume, given
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tests.test_standin_support import CHALLENGE, VERIFIER

# --- strategies

segments = st.text(alphabet=string.ascii_letters + string.digits + "-_.~", min_size=1, max_size=8)
paths = st.lists(segments, min_size=0, max_size=3).map(lambda p: "/" + "/".join(p))
names = st.sampled_from(["example.com", "localhost", "Forge.Example.org", "app.test"])
loopback_v4 = st.sampled_from(["127.0.0.1", "127.0.0.53", "127.1.2.3"])
loopback_ips = st.one_of(loopback_v4, st.just("[::1]"))
other_ips = st.sampled_from(["10.0.0.1", "192.168.1.20", "8.8.8.8", "[2001:db8::1]"])
ports = st.integers(min_value=1, max_value=65535)


@st.composite
def uris(draw: st.DrawFn) -> str:
    scheme = draw(st.sampled_from(["http", "https"]))
    host = draw(st.one_of(names, loopback_ips, other_ips))
    port = draw(st.one_of(st.none(), ports))
    netloc = host if port is None else f"{host}:{port}"
    query = draw(st.one_of(st.just(""), segments.map(lambda s: f"?k={s}")))
    return f"{scheme}://{netloc}{draw(paths)}{query}"


def random_case(draw: st.DrawFn, text: str) -> str:
    flips = draw(st.lists(st.booleans(), min_size=len(text), max_size=len(text)))
    return "".join(c.swapcase() if f else c for c, f in zip(text, flips, strict=True))


API_SCOPES = {f"{lvl}:{cat}" for lvl in ("read", "write") for cat in SCOPE_CATEGORIES}
known_scopes = st.sampled_from(sorted(API_SCOPES))
oidc_scopes = st.sampled_from(["openid", "profile", "email", "groups"])
unknown_words = st.text(alphabet=string.ascii_lowercase + ":_-,", min_size=1, max_size=12).filter(
    lambda w: w not in API_SCOPES | {"all", "public-only"}
)


class RedirectURIMatchTests(SynchronousTestCase):
    """
    Forgejo's C{ContainsRedirectURI}: exact after lower-casing and trimming
    one trailing slash; for public clients also with the port of an http
    loopback IP removed.
    """

    @given(uris(), st.booleans())
    def test_registered_uri_matches_itself(self, uri, public):
        self.assertTrue(redirect_uri_matches([uri], uri, public))

    @given(st.data(), uris(), st.booleans())
    def test_case_insensitive_over_the_whole_uri(self, data, uri, public):
        given_uri = random_case(data.draw, uri)
        self.assertTrue(redirect_uri_matches([uri], given_uri, public))
        self.assertTrue(redirect_uri_matches([given_uri], uri, public))

    @given(uris().filter(lambda u: not u.endswith("/")), st.booleans())
    def test_one_trailing_slash_is_ignored_on_either_side(self, uri, public):
        self.assertTrue(redirect_uri_matches([uri], uri + "/", public))
        self.assertTrue(redirect_uri_matches([uri + "/"], uri, public))

    @given(uris().filter(lambda u: not u.endswith("/")), st.booleans())
    def test_only_one_trailing_slash_is_trimmed(self, uri, public):
        self.assertFalse(redirect_uri_matches([uri], uri + "//", public))

    @given(uris(), segments, st.booleans())
    def test_no_prefix_matching(self, uri, extra, public):
        assume("?" not in uri)
        self.assertFalse(redirect_uri_matches([uri], uri.rstrip("/") + "/" + extra, public))
        self.assertFalse(redirect_uri_matches([uri.rstrip("/") + "/" + extra], uri, public))

    @given(uris(), uris(), st.booleans())
    def test_any_registered_uri_may_match(self, first, second, public):
        self.assertTrue(redirect_uri_matches([first, second], second, public))

    @given(st.lists(st.text()), st.text(), st.booleans())
    def test_garbage_never_crashes(self, registered, given_uri, public):
        """
        Unparsable URIs (bad ports, broken IPv6 literals) are non-matches,
        so the authorize endpoint answers 400 rather than 500.
        """
        redirect_uri_matches(registered, given_uri, public)
        self.assertFalse(
            redirect_uri_matches(["http://127.0.0.1/cb"], "http://127.0.0.1:x/cb", True)
        )
        self.assertFalse(redirect_uri_matches(["http://[::1]/cb"], "http://[::1:5/cb", True))

    @given(uris(), st.booleans())
    def test_nothing_registered_matches_nothing(self, uri, public):
        self.assertFalse(redirect_uri_matches([], uri, public))

    @given(loopback_v4, paths, ports)
    def test_public_clients_may_pick_any_loopback_port(self, ip, path, port):
        """
        (IPv4 only here: real Forgejo drops the brackets of an IPv6 host when
        it strips the port, so C{[::1]} registrations never benefit.)
        """
        registered = f"http://{ip}{path}"
        given_uri = f"http://{ip}:{port}{path}"
        self.assertTrue(redirect_uri_matches([registered], given_uri, True))

    @given(loopback_ips, paths, ports)
    def test_confidential_clients_may_not(self, ip, path, port):
        registered = f"http://{ip}{path}"
        self.assertFalse(redirect_uri_matches([registered], f"http://{ip}:{port}{path}", False))

    @given(st.one_of(other_ips, names), paths, ports)
    def test_port_rule_needs_a_loopback_ip(self, host, path, port):
        """
        Not for other IPs, and not for host names, "localhost" included.
        """
        registered = f"http://{host}{path}"
        self.assertFalse(redirect_uri_matches([registered], f"http://{host}:{port}{path}", True))

    @given(loopback_ips, paths, ports)
    def test_port_rule_is_for_http_only(self, ip, path, port):
        registered = f"https://{ip}{path}"
        self.assertFalse(redirect_uri_matches([registered], f"https://{ip}:{port}{path}", True))

    @given(loopback_ips, paths, ports, ports)
    def test_a_registered_port_is_compared(self, ip, path, registered_port, port):
        """
        Stripping the port helps only against a registration without one.
        """
        assume(registered_port != port)
        registered = f"http://{ip}:{registered_port}{path}"
        self.assertFalse(redirect_uri_matches([registered], f"http://{ip}:{port}{path}", True))


class PKCETests(SynchronousTestCase):
    def test_rfc7636_example(self):
        self.assertTrue(pkce_verifies(VERIFIER, CHALLENGE, "S256"))
        self.assertFalse(pkce_verifies(VERIFIER, VERIFIER, "S256"))

    @given(st.text(alphabet=string.ascii_letters + string.digits + "-._~", min_size=43))
    def test_s256_accepts_the_hash_of_the_verifier(self, verifier):
        challenge = (
            base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
            .rstrip(b"=")
            .decode()
        )
        self.assertTrue(pkce_verifies(verifier, challenge, "S256"))
        self.assertFalse(pkce_verifies(verifier, challenge + "A", "S256"))
        self.assertFalse(pkce_verifies(verifier, challenge, "s256"))

    @given(st.text(min_size=1), st.text(min_size=1))
    def test_plain_compares_verbatim(self, verifier, other):
        self.assertTrue(pkce_verifies(verifier, verifier, "plain"))
        self.assertEqual(pkce_verifies(other, verifier, "plain"), other == verifier)

    @given(st.text(), st.text(), st.text().filter(lambda m: m not in ("S256", "plain", "")))
    def test_unknown_methods_never_verify(self, verifier, challenge, method):
        self.assertFalse(pkce_verifies(verifier, challenge, method))

    @given(st.text(min_size=1))
    def test_s256_challenge_is_not_a_plain_one(self, verifier):
        """
        Sending the verifier itself as an S256 challenge does not pass.
        """
        self.assertFalse(pkce_verifies(verifier, verifier, "S256"))


class ScopeTests(SynchronousTestCase):
    def test_research_examples(self):
        self.assertEqual(parse_scope("openid read:user claudeai"), {"read:user"})
        self.assertEqual(parse_scope("claudeai"), {"all"})
        self.assertEqual(parse_scope(""), {"all"})
        self.assertEqual(parse_scope("read:user,read:repository"), {"all"})

    @given(st.lists(st.one_of(oidc_scopes, unknown_words), max_size=6))
    def test_no_api_scope_means_all(self, words):
        self.assertEqual(parse_scope(" ".join(words)), {"all"})

    @given(
        st.lists(st.one_of(known_scopes, st.sampled_from(["all", "public-only"])), min_size=1),
        st.lists(st.one_of(oidc_scopes, unknown_words)),
        st.randoms(),
    )
    def test_api_scopes_are_kept_and_the_rest_ignored(self, api, other, rnd):
        words = api + other
        rnd.shuffle(words)
        self.assertEqual(parse_scope(" ".join(words)), set(api))

    @given(st.lists(known_scopes, min_size=2, max_size=4))
    def test_split_on_single_spaces_only(self, api):
        """
        Commas do not separate scopes; extra spaces are harmless.
        """
        self.assertEqual(parse_scope(",".join(api)), {"all"})
        self.assertEqual(parse_scope("  ".join(api)), set(api))

    @given(
        st.sets(known_scopes), st.sampled_from(SCOPE_CATEGORIES), st.sampled_from(["read", "write"])
    )
    def test_scope_allows(self, granted, category, level):
        required = f"{level}:{category}"
        expected = required in granted or (level == "read" and f"write:{category}" in granted)
        self.assertEqual(scope_allows(granted, required), expected)
        self.assertTrue(scope_allows(granted | {"all"}, required))

    @given(st.sampled_from(SCOPE_CATEGORIES))
    def test_read_does_not_imply_write(self, category):
        self.assertFalse(scope_allows({f"read:{category}"}, f"write:{category}"))
        self.assertTrue(scope_allows({f"write:{category}"}, f"read:{category}"))


class ForgeTokenRuleTests(SynchronousTestCase):
    """
    The token rules straight on the model, without HTTP.
    """

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1000)
        self.forge = Forge(self.clock.seconds)
        seed(self.forge)
        self.app = self.forge.add_app("a", ["http://127.0.0.1:9/cb"], client_id="a")
        user = self.forge.user_by_login("alice")
        assert user is not None
        self.user = user

    def issue(self, scope=""):
        grant = self.forge.ensure_grant(self.user.id, "a", scope)
        code = self.forge.issue_code(grant, "http://127.0.0.1:9/cb", "", "")
        return self.forge.exchange_code(self.app, code, "", "")

    def test_one_grant_per_user_and_app(self):
        self.issue()
        self.issue()
        self.assertEqual(len(self.forge.grants), 1)

    def test_tokens_of_other_forges_are_not_accepted(self):
        other = Forge(self.clock.seconds)
        seed(other)
        tokens = self.issue()
        self.assertIsNone(other.user_for_access_token(tokens.access_token))
        self.assertIsNotNone(self.forge.user_for_access_token(tokens.access_token))

    def test_refresh_token_is_not_an_access_token(self):
        tokens = self.issue()
        self.assertIsNone(self.forge.user_for_access_token(tokens.refresh_token))

    def test_tampered_token_is_rejected(self):
        tokens = self.issue()
        head, payload, sig = tokens.access_token.split(".")
        self.assertIsNone(self.forge.user_for_access_token(f"{head}.{payload}x.{sig}"))
        self.assertIsNone(self.forge.user_for_access_token(f"{head}.{payload}.{sig[:-2]}"))

    def test_tokens_from_the_future_are_rejected(self):
        tokens = self.issue()
        self.clock.advance(-120)
        self.assertIsNone(self.forge.user_for_access_token(tokens.access_token))

    def test_refresh_of_a_revoked_grant(self):
        tokens = self.issue()
        self.forge.revoke_grant(self.user.id, "a")
        with self.assertRaises(OAuthError) as caught:
            self.forge.refresh(self.app, tokens.refresh_token)
        self.assertEqual(
            (caught.exception.error, caught.exception.description),
            ("invalid_grant", "grant does not exist"),
        )
