"""
Client metadata: what an MCP client may register (RFC 7591) or publish in a
client ID metadata document, checked field by field into a typed record.

Pure functions only.  Every rejection names the field and why, as an RFC
7591 error (C{invalid_redirect_uri} or C{invalid_client_metadata}), because
the person reading it is usually a client developer looking at a log.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import attrs

AUTH_METHODS = ("none", "client_secret_post", "client_secret_basic")
GRANT_TYPES = ("authorization_code", "refresh_token")
MAX_REDIRECT_URIS = 20
MAX_URI_LENGTH = 2000
MAX_NAME_LENGTH = 200
# Schemes that must never receive an authorization code, whatever a client
# claims: they run code, read files or leave the browser's control.
FORBIDDEN_SCHEMES = frozenset(
    {"javascript", "data", "file", "vbscript", "about", "blob", "filesystem", "ftp", "ws", "wss"}
)
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class RegistrationError(Exception):
    """
    Client metadata we refuse; C{error} is the RFC 7591 error code.
    """

    def __init__(self, error: str, description: str) -> None:
        super().__init__(f"{error}: {description}")
        self.error = error
        self.description = description


@attrs.frozen
class ClientMetadata:
    """
    Checked client metadata, as stored and as shown on the consent page.
    """

    redirect_uris: tuple[str, ...]
    token_endpoint_auth_method: str
    grant_types: tuple[str, ...]
    response_types: tuple[str, ...]
    client_name: str | None = None
    client_uri: str | None = None
    logo_uri: str | None = None
    scope: str | None = None
    extra: Mapping[str, Any] = attrs.field(factory=dict)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ClientMetadata:
        """
        Rebuild stored metadata (already checked when it was registered).
        """
        fields = ("client_name", "client_uri", "logo_uri", "scope")
        known = {"redirect_uris", "token_endpoint_auth_method", "grant_types", "response_types"}
        return cls(
            redirect_uris=tuple(data["redirect_uris"]),
            token_endpoint_auth_method=data["token_endpoint_auth_method"],
            grant_types=tuple(data["grant_types"]),
            response_types=tuple(data["response_types"]),
            extra={k: v for k, v in data.items() if k not in known and k not in fields},
            **{f: data.get(f) for f in fields},
        )

    @property
    def is_public(self) -> bool:
        return self.token_endpoint_auth_method == "none"  # noqa: S105 - a method name

    def to_json(self) -> dict[str, Any]:
        """
        The metadata as RFC 7591 returns it (without credentials).
        """
        out: dict[str, Any] = dict(self.extra)
        out.update(
            redirect_uris=list(self.redirect_uris),
            token_endpoint_auth_method=self.token_endpoint_auth_method,
            grant_types=list(self.grant_types),
            response_types=list(self.response_types),
        )
        for name in ("client_name", "client_uri", "logo_uri", "scope"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out


def is_loopback_host(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_redirect_uri(uri: Any) -> str:
    """
    One redirect URI: https with a host, http only to a loopback host
    (RFC 8252 section 7.3), or a private-use scheme of a native app (section
    7.1); never a fragment.
    """
    if not isinstance(uri, str) or not uri:
        raise RegistrationError("invalid_redirect_uri", "redirect URIs must be non-empty strings")
    if len(uri) > MAX_URI_LENGTH or _CONTROL.search(uri) or " " in uri:
        raise RegistrationError(
            "invalid_redirect_uri", f"redirect URI is too long or has spaces: {uri[:80]!r}"
        )
    try:
        parts = urlsplit(uri)
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        raise RegistrationError("invalid_redirect_uri", f"not a URI: {uri[:80]!r}") from None
    scheme = parts.scheme.lower()
    if not scheme or not _SCHEME.match(parts.scheme):
        raise RegistrationError("invalid_redirect_uri", f"not an absolute URI: {uri[:80]!r}")
    if "#" in uri:
        raise RegistrationError(
            "invalid_redirect_uri", f"redirect URIs must not have a fragment: {uri[:80]!r}"
        )
    if "@" in parts.netloc:
        # https://claude.ai@evil.example/ goes to evil.example, but a
        # person reading it sees claude.ai.
        raise RegistrationError(
            "invalid_redirect_uri",
            f"redirect URIs must not contain user info (a name or password before @ in the "
            f"host part): {uri[:80]!r}",
        )
    if "\\" in uri:
        # Browsers read a backslash as a slash, Python does not: the host
        # the broker would show and the one the browser goes to differ.
        raise RegistrationError(
            "invalid_redirect_uri", f"redirect URIs must not contain a backslash: {uri[:80]!r}"
        )
    if scheme == "https":
        if not parts.hostname:
            raise RegistrationError("invalid_redirect_uri", f"https URI without host: {uri[:80]!r}")
    elif scheme == "http":
        if not parts.hostname or not is_loopback_host(parts.hostname):
            raise RegistrationError(
                "invalid_redirect_uri",
                f"http redirect URIs are only allowed to loopback (127.0.0.1, [::1], "
                f"localhost); use https: {uri[:80]!r}",
            )
    elif scheme in FORBIDDEN_SCHEMES:
        raise RegistrationError(
            "invalid_redirect_uri", f"the {scheme}: scheme cannot receive codes: {uri[:80]!r}"
        )
    return uri


_DEFAULT_PORTS = {"https": 443, "http": 80}


def redirect_host(uri: str) -> str:
    """
    Where a redirect URI sends a person, as a page shows it: the host, and
    the port unless it is the scheme's default.  Never the user info, which
    reads like a host and is not one (clients registered before it was
    refused may still have it).  A URI without a host (a native app's
    private-use scheme) is shown without its query.  A host outside ASCII
    is shown as its ASCII (punycode) form, as browsers show look-alikes: a
    Cyrillic a (U+0430) in place of a Latin one must not pass for it.
    """
    try:
        parts = urlsplit(uri)
        port = parts.port
    except ValueError:
        return "an address that cannot be read"
    host = parts.hostname
    if not host:
        return urlunsplit((parts.scheme, "", parts.path, "", ""))
    if not host.isascii():
        host = _ascii_host(host)
    if ":" in host:
        host = f"[{host}]"
    if port is not None and port != _DEFAULT_PORTS.get(parts.scheme.lower()):
        host = f"{host}:{port}"
    return host


def _ascii_host(host: str) -> str:
    try:
        return host.encode("idna").decode("ascii")
    except UnicodeError:
        # Not a name IDNA can spell: every character that is not ASCII
        # shown as its code point.
        return host.encode("ascii", "backslashreplace").decode("ascii")


def _optional_uri(metadata: Mapping[str, Any], name: str) -> str | None:
    value = metadata.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > MAX_URI_LENGTH:
        raise RegistrationError("invalid_client_metadata", f"{name} must be a URL string")
    parts = urlsplit(value)
    host = parts.hostname or ""
    if not (parts.scheme == "https" and host) and not (
        parts.scheme == "http" and is_loopback_host(host)
    ):
        raise RegistrationError("invalid_client_metadata", f"{name} must be an https URL")
    return value


def _string_list(
    metadata: Mapping[str, Any], name: str, default: tuple[str, ...]
) -> tuple[str, ...]:
    value = metadata.get(name)
    if value is None:
        return default
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RegistrationError("invalid_client_metadata", f"{name} must be a list of strings")
    return tuple(dict.fromkeys(value))


def check_client_metadata(
    metadata: Any, default_auth_method: str = "client_secret_basic"
) -> ClientMetadata:
    """
    Check a registration request or metadata document.  Unknown fields are
    kept (RFC 7591 says to ignore what we do not understand, and echoing
    them back is harmless); known fields must be right.
    """
    if not isinstance(metadata, Mapping):
        raise RegistrationError("invalid_client_metadata", "the body must be a JSON object")
    uris = metadata.get("redirect_uris")
    if not isinstance(uris, list) or not uris:
        raise RegistrationError(
            "invalid_redirect_uri", "redirect_uris must be a non-empty list of URIs"
        )
    if len(uris) > MAX_REDIRECT_URIS:
        raise RegistrationError(
            "invalid_redirect_uri", f"at most {MAX_REDIRECT_URIS} redirect URIs"
        )
    redirect_uris = tuple(dict.fromkeys(check_redirect_uri(u) for u in uris))

    method = metadata.get("token_endpoint_auth_method", default_auth_method)
    if method not in AUTH_METHODS:
        raise RegistrationError(
            "invalid_client_metadata",
            f"token_endpoint_auth_method must be one of {', '.join(AUTH_METHODS)}",
        )
    grant_types = _string_list(metadata, "grant_types", ("authorization_code",))
    unknown = [g for g in grant_types if g not in GRANT_TYPES]
    if unknown:
        raise RegistrationError(
            "invalid_client_metadata",
            f"unsupported grant_types {unknown}: only authorization_code and refresh_token",
        )
    if "authorization_code" not in grant_types:
        raise RegistrationError(
            "invalid_client_metadata", "grant_types must include authorization_code"
        )
    response_types = _string_list(metadata, "response_types", ("code",))
    if response_types != ("code",):
        raise RegistrationError("invalid_client_metadata", 'response_types must be ["code"]')

    name = metadata.get("client_name")
    if name is not None:
        if not isinstance(name, str):
            raise RegistrationError("invalid_client_metadata", "client_name must be a string")
        name = _CONTROL.sub("", name).strip()[:MAX_NAME_LENGTH] or None
    scope = metadata.get("scope")
    if scope is not None and not isinstance(scope, str):
        raise RegistrationError("invalid_client_metadata", "scope must be a string")

    known = {
        "redirect_uris", "token_endpoint_auth_method", "grant_types", "response_types",
        "client_name", "client_uri", "logo_uri", "scope",
        # Never echo credentials a client tried to choose for itself.
        "client_id", "client_secret", "client_id_issued_at", "client_secret_expires_at",
    }  # fmt: skip
    extra = {k: v for k, v in metadata.items() if k not in known and isinstance(k, str)}
    return ClientMetadata(
        redirect_uris=redirect_uris,
        token_endpoint_auth_method=method,
        grant_types=grant_types,
        response_types=response_types,
        client_name=name,
        client_uri=_optional_uri(metadata, "client_uri"),
        logo_uri=_optional_uri(metadata, "logo_uri"),
        scope=scope,
        extra=extra,
    )


def redirect_uri_registered(registered: tuple[str, ...], given: str) -> bool:
    """
    Exact match, except that a loopback http redirect matches whatever its
    port (RFC 8252 section 7.3: native apps pick a free port at run time).
    """
    if given in registered:
        return True
    try:
        g = urlsplit(given)
        g.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        return False
    if g.scheme != "http" or not g.hostname or not is_loopback_host(g.hostname):
        return False
    for uri in registered:
        r = urlsplit(uri)
        if (
            r.scheme == "http"
            and r.hostname == g.hostname
            and (r.path or "/") == (g.path or "/")
            and r.query == g.query
        ):
            return True
    return False
