"""
Service wiring for C{twistd fjmcp}: options in, one C{MultiService} out.

Start-up work that must succeed before anything listens (log set-up and the
database schema) happens here, before the reactor runs; everything that
runs afterwards is a service, started and stopped in order.
"""

from __future__ import annotations

import os
import signal
import sys
from http.cookiejar import DefaultCookiePolicy
from typing import TYPE_CHECKING, Any

import attrs
from treq.client import HTTPClient
from treq.cookies import IndexableCookieJar
from twisted.application.internet import TimerService
from twisted.application.service import MultiService, Service
from twisted.internet import endpoints
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.error import ReactorNotRunning
from twisted.internet.interfaces import IReactorFromThreads
from twisted.logger import Logger
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.server import Site

from fjmcp import __version__
from fjmcp.app.heap import FrozenStartupHeap
from fjmcp.app.listeners import Listener, with_backlog
from fjmcp.buildinfo import build_info
from fjmcp.config import Config, secret_box
from fjmcp.config import Options as _ConfigOptions
from fjmcp.forgejo.client import ForgejoClient
from fjmcp.forgejo.credentials import UpstreamCredentials
from fjmcp.http import metrics as http_metrics
from fjmcp.http.browser import BrowserPages
from fjmcp.http.common import RateGuard, access_log_formatter
from fjmcp.http.exchanges import KEEPALIVE
from fjmcp.http.gate import MCPGate
from fjmcp.http.oauth_endpoints import OAuthEndpoints
from fjmcp.http.pages import home_page
from fjmcp.http.ratelimit import RateLimiter
from fjmcp.http.routes import BrokerApp, Health
from fjmcp.http.streamable import MCPEndpoint
from fjmcp.logs import prepare_twistd_observer
from fjmcp.mcp import resources
from fjmcp.mcp.children import ChildSupervisor
from fjmcp.mcp.sessions import SessionManager
from fjmcp.mcp.warm import WarmChildren
from fjmcp.oauth.authorize import AuthorizationFlow
from fjmcp.oauth.cimd import ClientMetadataFetcher
from fjmcp.oauth.clients import ClientRegistry
from fjmcp.oauth.connections import Connections
from fjmcp.oauth.grants import REVOCATION_INTERVAL, BearerCache, GrantEnds
from fjmcp.oauth.signin import ForgejoSignIn
from fjmcp.oauth.tokens import TokenService
from fjmcp.store import Store, StoreError, migrate_database
from fjmcp.store.engines import Location, PostgreSQLLocation, SQLiteLocation

if TYPE_CHECKING:
    from fjmcp.interfaces import IBrokerReactor

log = Logger()


# The database, its -wal/-shm and backups hold sealed tokens and hashes:
# nobody but the broker's user reads them, whatever umask it was started
# with (systemd's UMask= does the same; a container has none).
UMASK = 0o077


class Options(_ConfigOptions):
    def postOptions(self) -> None:
        # Before the configuration creates the data directory.
        os.umask(UMASK)
        super().postOptions()
        assert self.config is not None
        parent = getattr(self, "parent", None)
        if parent is not None:
            # twistd builds its log observer from this factory after options
            # are parsed; that is how --log-format and --log-level apply to
            # twistd's own lines too.
            # twistd only takes a factory by name, hence the hand-over.
            prepare_twistd_observer(self.config, parent.get("logfile"))
            parent["logger"] = "fjmcp.logs.twistd_observer"


def store_location(config: Config) -> Location:
    """
    The database the configuration names: PostgreSQL when --database is
    set, else SQLite in the data directory.
    """
    if config.database:
        return PostgreSQLLocation(config.database, config.database_password)
    return SQLiteLocation(config.db_path)


class StoreService(Service):
    """
    Owns the connection pool's life: closed when the daemon stops, after
    the services that use it.
    """

    name = "store"

    def __init__(self, store: Store) -> None:
        self.store = store

    def stopService(self) -> None:
        super().stopService()
        self.store.close()


class InOrder(MultiService):
    """
    A C{MultiService} that stops its services one after the other, in
    reverse order, each once the previous one has finished stopping.
    Twisted's stops them all at once, so the database pool closed while a
    purge or a session's last write was still queued for it, and that
    write's Deferred (which the timer waits for) never fired.
    """

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        return Deferred.fromCoroutine(self._stop_each())

    async def _stop_each(self) -> None:
        for service in reversed(list(self)):
            try:
                await maybeDeferred(service.stopService)
            except Exception:
                log.failure("stopping {service} failed", service=service)


class PoolService(Service):
    """
    Closes the kept-alive connections to Forgejo when the daemon stops,
    instead of leaving them to the process's end.
    """

    def __init__(self, pool: HTTPConnectionPool) -> None:
        self._pool = pool

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return self._pool.closeCachedConnections()


class CleanShutdown(Service):
    """
    SIGTERM means "stop cleanly" here: the services wind down in order and
    the process exits 0.  (twistd's own handler re-raises the signal at
    exit, which shows up as status 143 under podman and in CI.)
    """

    def __init__(self, reactor: IBrokerReactor) -> None:
        self._reactor = reactor

    def startService(self) -> None:
        super().startService()
        # After startup, so this replaces the handler the reactor installs.
        self._reactor.callWhenRunning(signal.signal, signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        log.info("received SIGTERM, shutting down")
        # A signal handler: hand the stop to the reactor's own thread.
        IReactorFromThreads(self._reactor).callFromThread(self._stop)

    def _stop(self) -> None:
        try:
            self._reactor.stop()
        except ReactorNotRunning:
            # Already stopping: a Ctrl-C to the process group (SIGINT, which
            # twistd handles) and a SIGTERM after it, as fjmcp-demo sends.
            pass


PURGE_INTERVAL = 600.0
IDLE_CONNECTION_TIMEOUT = 300.0


async def purge_expired(store: Store) -> None:
    """
    Forget abandoned logins, expired login sessions and long-dead tokens.
    One failure is logged and the next round tries again.
    """
    try:
        logins, tokens = await store.purge_expired()
    except Exception:
        log.failure("purging expired rows failed; will retry")
        return
    if logins or tokens:
        log.info(
            "purged {logins} expired logins and {tokens} expired codes and tokens",
            logins=logins,
            tokens=tokens,
        )


def makeService(options: Options, reactor: IBrokerReactor | None = None) -> MultiService:
    if reactor is None:
        from twisted.internet import reactor as _reactor

        reactor = _reactor
    config: Config | None = options.config
    assert config is not None
    try:
        version = migrate_database(store_location(config))
    except (StoreError, OSError, Exception) as e:
        # A database we cannot open or upgrade is an operator problem, not a
        # crash: say what and where, then refuse to start.
        where = store_location(config).describe()
        sys.stderr.write(f"fjmcp: cannot use the database {where}: {e}\n")
        raise SystemExit(1) from None
    top = build_service(config, reactor, schema_version=version)
    # The process's own concerns: in makeService, not in the broker that
    # tests build in their own process.
    CleanShutdown(reactor).setServiceParent(top)
    FrozenStartupHeap(reactor).setServiceParent(top)
    return top


@attrs.frozen
class Seams:
    """
    What a test may set in the broker's wiring, and nothing more: the
    production values are the defaults.
    """

    # The child's program and leading arguments, instead of --forgejo-mcp
    # (tests run a scripted child through an interpreter).
    child_command: tuple[str, ...] = ()
    # How long a stopping child gets after its stdin closes, and after SIGTERM.
    child_grace: tuple[float, float] = (1.0, 2.0)
    max_line: int | None = None
    revocation_interval: float = REVOCATION_INTERVAL
    sse_keepalive: float = KEEPALIVE
    # What https client metadata documents are checked against (None: the
    # platform's trust store).
    cimd_trust_root: object | None = None


@attrs.define
class Broker:
    """
    Everything the composition root built, for whoever runs it: twistd
    runs C{service}; tests also reach the parts.
    """

    service: MultiService
    store: Store
    children: ChildSupervisor
    sessions: SessionManager
    clients: ClientRegistry
    upstream: ForgejoClient
    # The kept-alive connections to Forgejo.
    upstream_pool: HTTPConnectionPool
    credentials: UpstreamCredentials
    tokens: TokenService
    bearers: BearerCache
    grant_ends: GrantEnds
    mcp: MCPEndpoint
    app: BrokerApp
    site: Site
    listeners: list[Listener]
    metrics_listener: Listener | None


def build_service(config: Config, reactor: IBrokerReactor, schema_version: int) -> MultiService:
    broker = build_broker(config, reactor)
    log_start(config, schema_version)
    return broker.service


def build_broker(config: Config, reactor: IBrokerReactor, seams: Seams = Seams()) -> Broker:
    """
    The broker, wired: the one place that builds it, for the daemon and the
    tests alike.  Nothing runs until C{service} starts.
    """
    top = InOrder()
    store = Store.open(store_location(config), reactor)
    # Order matters: MultiService stops children in reverse, so listeners
    # close first, then children end, then the pool closes.
    StoreService(store).setServiceParent(top)
    purge = TimerService(PURGE_INTERVAL, lambda: Deferred.fromCoroutine(purge_expired(store)))
    purge.clock = reactor
    purge.setServiceParent(top)
    stdin_grace, term_grace = seams.child_grace
    children = ChildSupervisor(reactor, stdin_grace=stdin_grace, term_grace=term_grace)
    children.setServiceParent(top)
    command = seams.child_command or (config.forgejo_mcp,)
    sessions = SessionManager(
        reactor,
        children,
        command[0],
        config.forgejo_url,
        config.max_sessions,
        config.max_sessions_per_user,
        config.session_idle_timeout,
        max_line=seams.max_line,
        args_prefix=command[1:],
        request_timeout=config.request_timeout,
        unused_timeout=config.session_unused_timeout,
        max_children=config.max_children,
        max_children_per_user=config.max_children_per_user,
        hibernate_after=config.session_hibernate_after,
        # Sessions are kept, so a client resumes its session after a restart.
        records=store,
    )
    # After the supervisor, so it stops first: sessions end (pending requests
    # answered) before their children are stopped.
    sessions.setServiceParent(top)
    clients = ClientRegistry(store)
    # Follows the key file, so fjmcp-admin rotate-key needs no restart.
    box = secret_box(config)
    # Its own HTTP client, and one that keeps no cookies: treq's would carry
    # whatever Forgejo sets from one user's requests into the next user's.
    no_cookies = IndexableCookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))
    pool = HTTPConnectionPool(reactor)
    PoolService(pool).setServiceParent(top)
    upstream = ForgejoClient(
        HTTPClient(Agent(reactor, pool=pool), cookiejar=no_cookies),
        reactor,
        config.forgejo_url,
        config.forgejo_client_id,
        config.forgejo_client_secret,
        config.public_url + "/oauth/callback",
        config.forgejo_scopes,
    )
    credentials = UpstreamCredentials(store, box, upstream, reactor)
    bearers = BearerCache(reactor)
    # Revocations in this process end sessions and cached bearer checks at
    # once (the store announces them); those by fjmcp-admin within seconds.
    grant_ends = GrantEnds(store, sessions, bearers, reactor, seams.revocation_interval)
    grant_ends.setServiceParent(top)
    tokens = TokenService(store, config, reactor, bearers)
    signin = ForgejoSignIn(store, box, upstream, credentials, reactor)
    flow = AuthorizationFlow(
        config,
        store,
        clients,
        signin,
        tokens,
        reactor,
        cimd=ClientMetadataFetcher(
            reactor,
            allow_loopback=config.cimd_allow_loopback,
            tls_trust_root=seams.cimd_trust_root,
        ),
    )
    mcp = MCPEndpoint(
        sessions,
        store,
        reactor,
        max_body=config.max_request_body,
        keepalive=seams.sse_keepalive,
        max_exchanges_per_user=config.max_requests_per_user,
        warm=WarmChildren(sessions, reactor),
    )
    limits = RateGuard(RateLimiter(reactor), config.trusted_proxies)
    app = BrokerApp(
        Health(store, sessions, reactor, home_page(config.mcp_url, config.forgejo_url)),
        MCPGate(config, tokens, credentials, mcp),
        OAuthEndpoints(config, clients, tokens, limits),
        BrowserPages(
            config,
            flow,
            Connections(store, sessions, signin, reactor),
            signin,
            limits,
        ),
    )
    # No form parsing by Twisted: it costs every /mcp POST a MIME parse, and
    # the one form (consent) is read by its route.
    site = Site(
        app.resource(),
        logFormatter=access_log_formatter(config.trusted_proxies),
        parsePOSTFormSubmission=False,
        # Twisted's default keeps an idle connection for 12 hours.  Caddy
        # drops its idle upstream connections after 2 minutes; closing ours
        # later than that avoids racing it for a connection it reuses.
        timeout=IDLE_CONNECTION_TIMEOUT,
    )
    site.displayTracebacks = False
    listeners = []
    for description in config.listen:
        endpoint = endpoints.serverFromString(reactor, with_backlog(description))
        listener = Listener(reactor, description, endpoint, site)
        listener.setServiceParent(top)
        listeners.append(listener)
    metrics_listener = None
    if config.metrics_listen:
        # Its own listener: the public one (behind Caddy) never serves /metrics.
        http_metrics.instrument(site, http_metrics.RouteLabels.of(*BrokerApp.apps()))
        registry = http_metrics.broker_registry(sessions, children, config.max_sessions)
        endpoint = endpoints.serverFromString(reactor, config.metrics_listen)
        metrics_listener = Listener(
            reactor, config.metrics_listen, endpoint, http_metrics.metrics_site(registry)
        )
        metrics_listener.setName("metrics")
        metrics_listener.setServiceParent(top)
    return Broker(
        service=top,
        store=store,
        children=children,
        sessions=sessions,
        clients=clients,
        upstream=upstream,
        upstream_pool=pool,
        credentials=credentials,
        tokens=tokens,
        bearers=bearers,
        grant_ends=grant_ends,
        mcp=mcp,
        app=app,
        site=site,
        listeners=listeners,
        metrics_listener=metrics_listener,
    )


def log_start(config: Config, schema_version: int) -> None:
    """
    The start-up lines: the configuration (debug), its warnings, the
    open-files limit, and which build serves what.
    """
    # The whole configuration, at debug level; secrets are kept out of its repr.
    log.debug("configuration: {config!r}", config=config)
    for warning in config.warnings:
        log.warn("{warning}", warning=warning)
    open_files = resources.raise_limit()
    wanted = resources.descriptors_needed(
        config.max_sessions,
        config.max_children,
        config.max_requests_per_user,
        config.max_children_per_user,
    )
    if open_files < wanted:
        log.warn(
            "the open-files limit ({limit}) is below the {wanted} that --max-sessions "
            "{sessions} and --max-children {children} may need; new sessions are refused "
            "near the limit (raise LimitNOFILE= or the container's nofile ulimit)",
            limit=open_files,
            wanted=wanted,
            sessions=config.max_sessions,
            children=config.max_children,
        )
    build = build_info()
    log.info(
        "fjmcp {version} (revision {revision}, built {built}) for {forgejo} at {public} "
        "(schema {schema}, data in {data})",
        version=__version__,
        revision=build.revision,
        built=build.date,
        forgejo=config.forgejo_url,
        public=config.public_url,
        schema=schema_version,
        data=store_location(config).describe(),
    )
