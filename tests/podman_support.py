"""
podman for the tests that run the shipped deployment for real
(tests/test_podman_image.py, test_podman_quadlet.py, test_podman_systemd.py),
set up the way docs/deploy-podman.md's tests found works on the project's
machines (Debian 12, root, no container registry):

- podman, runc, debootstrap, uidmap and slirp4netns from apt when missing
  (only as root under CI=true; elsewhere the tests skip and say why);
- a private containers.conf, pointed at by CONTAINERS_CONF for every podman
  this module runs: default ulimits within this machine's hard limits and
  runc (crun refuses a hybrid cgroup layout), instead of editing
  /etc/containers/containers.conf;
- base images made here, since no registry is reachable: a debootstrap
  --variant=minbase of bookworm from the mirror apt already uses, imported
  into podman, and images built on it: a python stand-in tagged exactly as
  the Containerfile's FROM lines name it (Debian's python3, without
  EXTERNALLY-MANAGED, with this machine's extra CA certificates) and a
  systemd image.  Each is tagged with a hash of its recipe, so a second run
  on one machine builds nothing again;
- the image itself, from the unchanged Containerfile, with the forgejo-mcp
  that `make forgejo-mcp` built standing in for the Go stage
  (--build-context forgejo-mcp=DIR);
- Quadlet, which Debian 12's podman lacks: the quadlet binary from Debian
  13's podman package, downloaded with a private apt state and cached.

Run as a program (`python -m tests.podman_support`, what `make podman-deps`
does), it prepares all of it ahead of the test suite.

Whatever cannot be set up raises SkipTest with the reason, or under CI=true
an AssertionError: CI must run these tests.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import glob
import hashlib
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

from twisted.trial.unittest import SkipTest

ROOT = Path(__file__).resolve().parent.parent
CONTAINERFILE = ROOT / "Containerfile"
CACHE = Path(
    os.environ.get("FJMCP_TEST_CACHE")
    or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fjmcp-tests"
)
PACKAGES = ("podman", "runc", "debootstrap", "uidmap", "slirp4netns")
# The programs those packages bring that the tests use.
PROGRAMS = {
    "podman": "podman",
    "runc": "runc",
    "debootstrap": "debootstrap",
    "newuidmap": "uidmap",
    "slirp4netns": "slirp4netns",
}
# Marks the images made here, with the hash of the recipe they were made by.
LABEL = "io.github.fjmcp.test-recipe"
SUITE = "bookworm"
NPROC = 32768
# The image the tests build from the Containerfile (not `make image`'s tag:
# an operator's localhost/fjmcp:latest is left alone).
IMAGE = "localhost/fjmcp-test:latest"
EXTRA_CA = "/usr/local/share/ca-certificates"
PODMAN_DOC = ROOT / "docs" / "deploy-podman.md"
SYSTEMD_DOC = ROOT / "docs" / "deploy-systemd.md"
QUADLET_UNIT = ROOT / "deploy" / "podman" / "fjmcp-broker.container"
PODMAN_ENV_EXAMPLE = ROOT / "deploy" / "podman" / "fjmcp-broker.env.example"
STANDIN_CLIENT_ID = "fjmcp"
STANDIN_CLIENT_SECRET = "gto_podman_test_secret"

# Debian's python3 standing in for the official python image: `python` and
# `pip` on PATH, pip free to install (the official image has no
# EXTERNALLY-MANAGED), this machine's CA certificates for PyPI.
PYTHON_RECIPE = """\
FROM {base}
RUN apt-get update \\
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \\
      python3 python3-venv python3-pip python-is-python3 ca-certificates \\
 && rm -rf /var/lib/apt/lists/* \\
 && rm -f /usr/lib/python3.*/EXTERNALLY-MANAGED
COPY certs/ /usr/local/share/ca-certificates/
RUN update-ca-certificates
LABEL {label}={hash}
"""

# systemd as PID 1, and what docs/deploy-systemd.md's install steps use
# (its `apt-get install` then finds them installed).
SYSTEMD_RECIPE = """\
FROM {base}
RUN apt-get update \\
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \\
      systemd systemd-sysv dbus ca-certificates curl git make \\
      python3 python3-venv caddy \\
 && systemctl disable caddy.service \\
 && systemctl mask systemd-logind.service getty.target console-getty.service
COPY certs/ /usr/local/share/ca-certificates/
RUN update-ca-certificates
STOPSIGNAL SIGRTMIN+3
LABEL {label}={hash}
CMD ["/sbin/init"]
"""


def ci() -> bool:
    return os.environ.get("CI") == "true"


def unavailable(reason: str) -> NoReturn:
    """
    Skip with C{reason}; under CI=true fail instead, since CI sets podman up
    (`make podman-deps`) before the suite.
    """
    if ci():
        raise AssertionError(f"{reason}; CI must run these tests (make podman-deps sets them up)")
    raise SkipTest(reason)


def log(message: str) -> None:
    print(f"podman_support: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def locked(name: str) -> Iterator[None]:
    """
    One process at a time (trial -j runs test modules side by side).
    """
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def run(
    argv: Sequence[str],
    check: bool = True,
    timeout: float = 600,
    env: dict[str, str] | None = None,
    **kwargs: Any,
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        list(argv), capture_output=True, text=True, timeout=timeout, env=env, **kwargs
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{shlex.join(argv)} exited {result.returncode}:\n{result.stdout[-3000:]}\n"
            f"{result.stderr[-3000:]}"
        )
    return result


def recipe_hash(*parts: str | bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        digest.update(len(data).to_bytes(8, "big") + data)
    return digest.hexdigest()[:16]


def extra_ca_certificates() -> list[Path]:
    return sorted(Path(p) for p in glob.glob(f"{EXTRA_CA}/*.crt"))


def apt_mirror() -> str:
    """
    The Debian mirror apt already uses (deb822 .sources or sources.list):
    the first one serving the main archive, not the security one.
    """
    candidates: list[str] = []
    for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
        for stanza in Path(path).read_text().split("\n\n"):
            fields = dict(
                (k.strip().lower(), v.strip())
                for k, _, v in (
                    line.partition(":")
                    for line in stanza.splitlines()
                    if ":" in line and not line.startswith(("#", " "))
                )
            )
            if (
                "deb" in fields.get("types", "").split()
                and "main" in fields.get("components", "").split()
            ):
                candidates += fields.get("uris", "").split()
    for path in ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list"))]:
        with contextlib.suppress(OSError):
            for line in Path(path).read_text().splitlines():
                words = re.sub(r"\[[^]]*\]", "", line).split()
                if len(words) >= 4 and words[0] == "deb" and "main" in words[3:]:
                    candidates.append(words[1])
    for uri in candidates:
        if "security" not in uri and uri.startswith(("http://", "https://")):
            return uri
    return "http://deb.debian.org/debian"


class Podman:
    """
    podman with this module's private containers.conf.
    """

    def __init__(self, conf: Path) -> None:
        self.env = dict(os.environ, CONTAINERS_CONF=str(conf))
        self.rootless = os.geteuid() != 0
        # A `podman run` with an --ulimit of its own (the unit's Ulimit=)
        # leaves containers.conf's default_ulimits aside and asks for
        # podman's own nproc limit, above this machine's hard limit: runc
        # then fails ("error setting rlimit type 6").  The tests add this
        # to such run lines; on a machine without that hard limit it is moot.
        self.machine_run_args = ["--ulimit", f"nproc={NPROC}:{NPROC}"]

    def __call__(
        self, *args: str, check: bool = True, timeout: float = 600, **kwargs: Any
    ) -> subprocess.CompletedProcess[str]:
        return run(["podman", *args], check=check, timeout=timeout, env=self.env, **kwargs)

    def image_exists(self, name: str) -> bool:
        return self("image", "exists", name, check=False).returncode == 0

    def image_label(self, name: str) -> str | None:
        if not self.image_exists(name):
            return None
        out = self("image", "inspect", "--format", "{{json .Labels}}", name).stdout
        labels = json.loads(out) or {}
        value = labels.get(LABEL)
        return value if isinstance(value, str) else None

    def info(self) -> dict[str, Any]:
        info: dict[str, Any] = json.loads(self("info", "--format", "json").stdout)
        return info

    def network_mode(self) -> str:
        """
        How published ports reach a container here: "rootful" (netavark or
        CNI bridge) or "rootless" (slirp4netns or pasta).
        """
        return "rootless" if self.rootless else "rootful"

    def container_pid(self, name: str) -> int:
        return int(self("inspect", "--format", "{{.State.Pid}}", name).stdout.strip())

    def remove_container(self, name: str) -> None:
        self("rm", "--force", "--time", "5", name, check=False, timeout=120)

    def remove_volume(self, name: str) -> None:
        self("volume", "rm", "--force", name, check=False, timeout=120)

    def logs(self, name: str) -> str:
        result = self("logs", name, check=False)
        return result.stdout + result.stderr


def ensure_installed(install: bool = False) -> None:
    """
    podman and its helpers, installed with apt-get when missing if this
    runs as root and C{install} is set or CI=true.
    """
    missing = [name for name in PROGRAMS if not shutil.which(name)]
    if not missing:
        return
    packages = sorted({PROGRAMS[name] for name in missing})
    if os.geteuid() == 0 and (install or ci()):
        log(f"installing {' '.join(packages)} with apt-get")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        run(["apt-get", "update", "-qq"], env=env, timeout=900)
        run(["apt-get", "install", "-y", "-qq", *PACKAGES], env=env, timeout=1800)
        missing = [name for name in PROGRAMS if not shutil.which(name)]
        if not missing:
            return
    unavailable(
        f"{', '.join(missing)} not installed (apt-get install {' '.join(PACKAGES)}, "
        "or make podman-deps as root)"
    )


def containers_conf() -> Path:
    """
    The private containers.conf: ulimits within this machine's hard limits
    (podman's defaults exceed them and runc's setrlimit fails) and runc.
    """
    hard = run(["sh", "-c", "ulimit -Hn"]).stdout.strip()
    nofile = hard if hard.isdigit() else "65536"
    path = CACHE / "containers.conf"
    text = (
        "# Written by tests/podman_support.py; podman reads it through CONTAINERS_CONF.\n"
        "[containers]\n"
        f'default_ulimits = ["nofile={nofile}:{nofile}", "nproc={NPROC}:{NPROC}"]\n'
        "[engine]\n"
        'runtime = "runc"\n'
    )
    CACHE.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != text:
        temporary = path.with_suffix(".tmp")
        temporary.write_text(text)
        temporary.replace(path)
    return path


@functools.cache
def podman(install: bool = False) -> Podman:
    """
    podman, working, or SkipTest / (under CI) AssertionError saying why not.
    """
    if sys.platform != "linux":
        unavailable("podman tests run on Linux only")
    if os.geteuid() != 0:
        # debootstrap, network namespaces and nsenter: all root's.
        unavailable("the podman tests run as root (they make images and network namespaces)")
    with locked("setup"):
        ensure_installed(install)
        engine = Podman(containers_conf())
        result = engine("info", "--format", "json", check=False, timeout=120)
        if result.returncode != 0:
            unavailable(f"podman info fails: {result.stderr.strip()[-500:]}")
        return engine


# --- base images


def base_image(engine: Podman) -> str:
    """
    A debootstrap --variant=minbase of bookworm imported into podman, from
    the mirror apt uses; made once per recipe.
    """
    recipe = recipe_hash("debootstrap", "--variant=minbase", SUITE)
    tag = f"localhost/fjmcp-test-debian:{SUITE}-{recipe}"
    if engine.image_exists(tag):
        return tag
    if os.geteuid() != 0:
        unavailable(f"no base image {tag}, and debootstrap needs root to make one")
    mirror = apt_mirror()
    log(f"debootstrap --variant=minbase {SUITE} from {mirror} (a few minutes, once)")
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE, prefix="rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        started = time.monotonic()
        result = run(
            ["debootstrap", "--variant=minbase", SUITE, str(rootfs), mirror],
            check=False,
            timeout=1800,
        )
        if result.returncode != 0:
            unavailable(f"debootstrap failed: {result.stdout[-1500:]}{result.stderr[-1500:]}")
        # No apt caches or logs in the image.
        for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for item in (rootfs / leftover).glob("*.deb" if "archives" in leftover else "*_*"):
                item.unlink()
        tar = subprocess.Popen(
            ["tar", "--numeric-owner", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE
        )
        imported = subprocess.run(
            [
                "podman",
                "import",
                "--change",
                f"LABEL {LABEL}={recipe}",
                "--change",
                'CMD ["/bin/bash"]',
                "-",
                tag,
            ],
            stdin=tar.stdout,
            capture_output=True,
            text=True,
            env=engine.env,
            timeout=600,
        )
        assert tar.stdout is not None
        tar.stdout.close()
        tar.wait()
        if imported.returncode != 0 or tar.returncode != 0:
            raise AssertionError(f"podman import failed: {imported.stderr}")
        log(f"base image {tag} made in {time.monotonic() - started:.0f} s")
    return tag


def build_recipe(engine: Podman, name: str, recipe: str, base: str) -> str:
    """
    An image built FROM C{base} by C{recipe} (a Containerfile template; its
    context holds this machine's extra CA certificates), tagged with the
    hash of all that, and built only when no image has that tag.
    """
    certs = extra_ca_certificates()
    digest = recipe_hash(base, recipe, *(c.name.encode() + c.read_bytes() for c in certs))
    tag = f"localhost/fjmcp-test-{name}:{digest}"
    if engine.image_exists(tag):
        return tag
    log(f"building the {name} image {tag} (once)")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(dir=CACHE, prefix=f"{name}-") as tmp:
        context = Path(tmp)
        (context / "certs").mkdir()
        for cert in certs:
            shutil.copy(cert, context / "certs" / cert.name)
        (context / "Containerfile").write_text(recipe.format(base=base, label=LABEL, hash=digest))
        engine("build", "--format", "docker", "-t", tag, str(context), timeout=1800)
    log(f"{tag} built in {time.monotonic() - started:.0f} s")
    return tag


def containerfile_bases() -> list[str]:
    """
    The images the Containerfile's FROM lines name, besides its own stages.
    """
    names = []
    for line in CONTAINERFILE.read_text().splitlines():
        match = re.match(r"FROM\s+(\S+)\s+AS\s+(\S+)", line.strip(), re.IGNORECASE)
        if match:
            names.append((match.group(1), match.group(2)))
    stages = {stage for _, stage in names}
    return [image for image, _ in names if image not in stages]


def python_bases(engine: Podman) -> list[str]:
    """
    The python stand-in, tagged as every python FROM line of the
    Containerfile names it.  An image of that name that was not made here
    (a real one pulled earlier) is left as it is and used.
    """
    stand_in = build_recipe(engine, "python", PYTHON_RECIPE, base_image(engine))
    wanted = sorted({i for i in containerfile_bases() if "/python:" in i})
    for name in wanted:
        label = engine.image_label(name)
        if engine.image_exists(name) and label is None:
            continue  # the real image
        engine("tag", stand_in, name)
    return wanted


def systemd_image(engine: Podman) -> str:
    with locked("images"):
        return build_recipe(engine, "systemd", SYSTEMD_RECIPE, base_image(engine))


# --- the fjmcp image


def forgejo_mcp_binary() -> str:
    from tests.test_forgejo_mcp import find_forgejo_mcp

    return find_forgejo_mcp()


def make_image_command(tag: str, context: Path) -> str:
    """
    The shell command `make image IMAGE=C{tag}` runs with podman, with
    C{--build-context forgejo-mcp=C{context}} added after `build`.
    """
    out = run(
        ["make", "-s", "-n", "image", f"IMAGE={tag}", "CONTAINER_ENGINE=podman"], cwd=str(ROOT)
    ).stdout
    (build,) = [line for line in out.replace("\\\n", " ").splitlines() if " build " in line]
    if not build.startswith("podman build "):
        raise AssertionError(f"make image no longer runs `podman build ...`: {build}")
    return build.replace(
        "podman build ", f"podman build --build-context forgejo-mcp={shlex.quote(str(context))} ", 1
    )


@functools.cache
def fjmcp_image() -> str:
    """
    The image built from the unchanged Containerfile as `make image` builds
    it, with the real forgejo-mcp in place of the Go stage (no Go module
    proxy serves it here); built once per process (podman's layer cache makes
    a second build cheap).
    """
    engine = podman()
    binary = forgejo_mcp_binary()
    with locked("images"):
        python_bases(engine)
        context = CACHE / "forgejo-mcp-context"
        (context / "out").mkdir(parents=True, exist_ok=True)
        target = context / "out" / "forgejo-mcp"
        if not target.exists() or target.read_bytes() != Path(binary).read_bytes():
            shutil.copy(binary, target.with_suffix(".tmp"))
            target.with_suffix(".tmp").replace(target)
        command = make_image_command(IMAGE, context)
        log("building the fjmcp image from the Containerfile")
        started = time.monotonic()
        run(["bash", "-c", command], cwd=str(ROOT), env=engine.env, timeout=1800)
        log(f"{IMAGE} built in {time.monotonic() - started:.0f} s")
    return IMAGE


# --- Quadlet


def private_apt(state: Path, suite: str, mirror: str) -> list[str]:
    """
    apt-get with its own sources (C{suite} of C{mirror} only), lists and
    cache under C{state}: the machine's apt state is left as it is.
    """
    for sub in ("lists/partial", "cache/archives/partial", "sources.list.d", "preferences.d"):
        (state / sub).mkdir(parents=True, exist_ok=True)
    sources = state / "sources.list"
    sources.write_text(
        f"deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] {mirror} {suite} main\n"
    )
    return [
        "apt-get",
        "-q",
        "-o",
        f"Dir::Etc::SourceList={sources}",
        "-o",
        f"Dir::Etc::SourceParts={state / 'sources.list.d'}",
        "-o",
        f"Dir::Etc::PreferencesParts={state / 'preferences.d'}",
        "-o",
        f"Dir::State::Lists={state / 'lists'}",
        "-o",
        f"Dir::Cache={state / 'cache'}",
        "-o",
        "Debug::NoLocking=1",
        "-o",
        "APT::Get::List-Cleanup=0",
    ]


@functools.cache
def quadlet() -> Path:
    """
    The quadlet generator from Debian 13's podman package (Debian 12's podman
    has none), downloaded once with a private apt state and unpacked into
    the cache.
    """
    podman()
    with locked("quadlet"):
        found = sorted(CACHE.glob("quadlet/podman_*/usr/libexec/podman/quadlet"))
        if found:
            return found[-1]
        if not shutil.which("apt-get") or not shutil.which("dpkg"):
            unavailable("fetching Debian 13's quadlet needs apt-get and dpkg")
        state = CACHE / "apt-trixie"
        apt = private_apt(state, "trixie", apt_mirror())
        log("downloading Debian 13's podman package for its quadlet (once)")
        updated = run([*apt, "update"], check=False, timeout=900)
        if updated.returncode != 0:
            unavailable(f"apt-get update for trixie failed: {updated.stderr[-1000:]}")
        downloads = state / "downloads"
        downloads.mkdir(exist_ok=True)
        fetched = run([*apt, "download", "podman/trixie"], check=False, cwd=downloads, timeout=900)
        if fetched.returncode != 0:
            unavailable(f"apt-get download podman failed: {fetched.stderr[-1000:]}")
        (deb,) = sorted(downloads.glob("podman_*.deb"))[-1:]
        unpacked = CACHE / "quadlet" / deb.stem
        partial = unpacked.with_name(unpacked.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.parent.mkdir(parents=True, exist_ok=True)
        run(["dpkg-deb", "-x", str(deb), str(partial)])
        partial.replace(unpacked)
        deb.unlink()
        return unpacked / "usr" / "libexec" / "podman" / "quadlet"


# --- unit files as systemd reads them


def unit_sections(text: str) -> dict[str, list[tuple[str, str]]]:
    """
    A unit file's sections of (key, value) pairs in order, as systemd reads
    them: comments dropped, a trailing backslash joins the next line.
    """
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line[0] in "#;"):
            continue
        if pending and line[:1] in ("#", ";"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        if current is None:
            raise ValueError(f"{line!r} outside a section")
        key, sep, value = line.partition("=")
        if not sep:
            raise ValueError(f"not KEY=VALUE: {line!r}")
        current.append((key.strip(), value.strip()))
    return sections


_ESCAPES = {
    "a": "\a",
    "b": "\b",
    "f": "\f",
    "n": "\n",
    "r": "\r",
    "t": "\t",
    "v": "\v",
    "s": " ",
    "\\": "\\",
    '"': '"',
    "'": "'",
}


def _unescape_one(text: str, i: int) -> tuple[str, int]:
    """
    systemd's cunescape_one() for the escape after the backslash at
    C{text[i - 1]}: the character and the index after the escape.
    """
    c = text[i]
    if c in _ESCAPES:
        return _ESCAPES[c], i + 1
    for letter, width in (("x", 2), ("u", 4), ("U", 8)):
        if c == letter:
            digits = text[i + 1 : i + 1 + width]
            if len(digits) != width or not re.fullmatch(r"[0-9a-fA-F]+", digits):
                raise ValueError(f"bad \\{letter} escape in {text!r}")
            return chr(int(digits, 16)), i + 1 + width
    if c in "01234567":
        digits = text[i : i + 3]
        if not re.fullmatch(r"[0-7]{3}", digits):
            raise ValueError(f"bad octal escape in {text!r}")
        return chr(int(digits, 8)), i + 3
    raise ValueError(f"unknown escape \\{c} in {text!r}")


def split_command_line(text: str) -> list[str]:
    """
    The words of an ExecStart= value as systemd's extract_first_word() with
    EXTRACT_UNQUOTE|EXTRACT_CUNESCAPE splits them (what config_parse_exec
    uses; specifiers are resolved per word afterwards): words end at
    unquoted whitespace; single and double quotes may open anywhere in a
    word and both take C escapes; an unknown escape or an unterminated quote
    is an error.  One command only (no `;`).
    """
    words: list[str] = []
    i, n = 0, len(text)
    while True:
        while i < n and text[i] in " \t\n\r":
            i += 1
        if i >= n:
            return words
        if text[i] == ";" and (i + 1 == n or text[i + 1] in " \t\n\r"):
            raise ValueError("more than one command")
        word: list[str] = []
        quote = ""
        while i < n:
            c = text[i]
            if c == "\\":
                if i + 1 >= n:
                    raise ValueError(f"trailing backslash in {text!r}")
                char, i = _unescape_one(text, i + 1)
                word.append(char)
            elif quote:
                if c == quote:
                    quote = ""
                else:
                    word.append(c)
                i += 1
            elif c in "'\"":
                quote = c
                i += 1
            elif c in " \t\n\r":
                break
            else:
                word.append(c)
                i += 1
        if quote:
            raise ValueError(f"unterminated quote in {text!r}")
        words.append("".join(word))


def resolve_specifiers(word: str, specifiers: dict[str, str]) -> str:
    """
    systemd's unit_full_printf(): %X from C{specifiers}, %% a percent sign,
    an unknown specifier an error.
    """

    def one(match: re.Match[str]) -> str:
        letter = match.group(1)
        if letter == "%":
            return "%"
        if letter not in specifiers:
            raise ValueError(f"specifier %{letter} unknown here")
        return specifiers[letter]

    return re.sub(r"%(.)", one, word)


def exec_start_argv(unit_text: str, specifiers: dict[str, str]) -> list[str]:
    """
    The argv systemd would run for the unit's [Service] ExecStart=, with
    specifiers resolved; $VARIABLE expansion is refused (none expected).
    """
    (value,) = [v for k, v in unit_sections(unit_text)["Service"] if k == "ExecStart"]
    argv = [resolve_specifiers(w, specifiers) for w in split_command_line(value)]
    if argv[0][:1] in "@-:+!":
        raise ValueError(f"ExecStart= prefixes are not handled: {argv[0]!r}")
    for word in argv:
        if "$" in word:
            raise ValueError(f"environment expansion is not handled: {word!r}")
    return argv


# --- for the tests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def doc_blocks(path: Path) -> list[tuple[str, str]]:
    """
    The indented code blocks of a Markdown document, dedented, each with the
    heading it is under: the commands an operator is told to run.
    """
    blocks: list[tuple[str, str]] = []
    heading = ""
    current: list[str] | None = None
    previous_blank = True
    for line in [*path.read_text().splitlines(), ""]:
        if current is not None:
            if line.startswith("    ") or not line.strip():
                current.append(line[4:])
                continue
            blocks.append((heading, "\n".join(current).strip("\n") + "\n"))
            current = None
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        elif line.startswith("    ") and previous_blank:
            current = [line[4:]]
            continue
        previous_blank = not line.strip()
    return blocks


def doc_block(path: Path, containing: str) -> str:
    """
    The one code block of C{path} that contains C{containing}.
    """
    found = [text for _, text in doc_blocks(path) if containing in text]
    if len(found) != 1:
        raise AssertionError(f"{path.name}: {len(found)} code blocks contain {containing!r}")
    return found[0]


def proxy_row(mode: str) -> tuple[str, str]:
    """
    What docs/deploy-podman.md's table of podman modes says for C{mode} (the
    first cell of a row): the peer address the broker sees for requests
    through podman's port forwarding, and the FJMCP_TRUSTED_PROXIES to set.
    """
    rows = [
        [cell.strip().strip("`") for cell in line.strip().strip("|").split("|")]
        for line in PODMAN_DOC.read_text().splitlines()
        if line.startswith("| ")
    ]
    found = [row for row in rows if row[0] == mode]
    if len(found) != 1:
        raise AssertionError(f"docs/deploy-podman.md has no one table row for {mode!r}")
    return found[0][1], found[0][2]


def write_env_file(path: Path, overrides: dict[str, str]) -> None:
    """
    deploy/podman/fjmcp-broker.env.example with C{overrides} in place of its
    values (or added), mode 0600 like the real one.
    """
    lines = []
    left = dict(overrides)
    for line in PODMAN_ENV_EXAMPLE.read_text().splitlines():
        name, sep, _ = line.partition("=")
        if sep and not line.startswith("#") and name in left:
            line = f"{name}={left.pop(name)}"
        lines.append(line)
    lines += [f"{name}={value}" for name, value in left.items()]
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)


class NetNS:
    """
    A network namespace of its own, with loopback up: containers joined to
    it (--network=ns:PATH) and processes of this machine (nsenter) share one
    loopback, like --network=host without sharing the host's ports.
    """

    def __init__(self) -> None:
        self.name = unique("fjmcp-test")
        run(["ip", "netns", "add", self.name])
        self.path = f"/run/netns/{self.name}"
        run(["ip", "-n", self.name, "link", "set", "lo", "up"])

    def argv(self, *argv: str) -> list[str]:
        return ["nsenter", f"--net={self.path}", "--", *argv]

    def remove(self) -> None:
        run(["ip", "netns", "delete", self.name], check=False)


class Background:
    """
    A process of this machine (e.g. nsenter'd into a network namespace), its
    output in files, stopped at the end.
    """

    def __init__(self, argv: Sequence[str], directory: Path, name: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.out = directory / f"{name}.out"
        self.err = directory / f"{name}.err"
        with self.out.open("wb") as out, self.err.open("wb") as err:
            self.process = subprocess.Popen(
                list(argv), stdout=out, stderr=err, stdin=subprocess.DEVNULL, cwd=str(ROOT)
            )

    def wait_for_line(self, prefix: str, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.out.read_text(errors="replace").splitlines():
                if line.startswith(prefix):
                    return line[len(prefix) :].strip()
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(
            f"no {prefix!r} line (exit {self.process.poll()}): "
            f"{self.out.read_text(errors='replace')}{self.err.read_text(errors='replace')}"
        )

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def standin(
    argv_prefix: Sequence[str], directory: Path, redirect_uri: str, port: int = 3000
) -> tuple[Background, str]:
    """
    The Forgejo stand-in (fjmcp_dev.standin) with the broker registered as a
    confidential client (id fjmcp, secret gto_podman_test_secret) and its
    test login switch on; its URL.
    """
    process = Background(
        [
            *argv_prefix,
            sys.executable,
            "-m",
            "fjmcp_dev.standin",
            "--listen",
            f"tcp:{port}:interface=127.0.0.1",
            "--client",
            f"{STANDIN_CLIENT_ID}:{STANDIN_CLIENT_SECRET}:{redirect_uri}",
            "--test-login",
            "--quiet",
        ],
        directory,
        "standin",
    )
    url = process.wait_for_line("forgejo-standin listening on ")
    return process, url


def wait_for_http(argv_prefix: Sequence[str], url: str, timeout: float = 60) -> None:
    """
    Until C{url} answers 200 (fetched by a process started with
    C{argv_prefix}, e.g. in a network namespace).
    """
    probe = (
        "import sys, urllib.request\n"
        "try:\n"
        "    sys.exit(0 if urllib.request.urlopen(sys.argv[1], timeout=2).status == 200 else 1)\n"
        "except Exception:\n"
        "    sys.exit(1)\n"
    )
    deadline = time.monotonic() + timeout
    while True:
        if run([*argv_prefix, sys.executable, "-c", probe, url], check=False).returncode == 0:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{url} did not answer 200 within {timeout:.0f} s")
        time.sleep(0.5)


def sdk_login(argv_prefix: Sequence[str], mcp_url: str, *extra: str) -> dict[str, Any]:
    """
    tests/sdk_oauth_client.py (the MCP Python SDK's OAuth client) against
    C{mcp_url}: registration, login as alice at the stand-in, then
    get_my_user_info; its JSON summary.
    """
    result = run(
        [
            *argv_prefix,
            sys.executable,
            str(ROOT / "tests" / "sdk_oauth_client.py"),
            mcp_url,
            "--login",
            "alice",
            "--call",
            "get_my_user_info",
            "{}",
            *extra,
        ],
        check=False,
        timeout=180,
        cwd=str(ROOT),
    )
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        raise AssertionError(
            f"the SDK client failed (exit {result.returncode}):\n{result.stdout}\n{result.stderr}"
        )
    summary: dict[str, Any] = json.loads(lines[-1])
    return summary


def prepare() -> None:
    """
    Everything the podman tests need, ahead of them (make podman-deps).
    """
    started = time.monotonic()
    engine = podman(install=True)
    with locked("images"):
        python_bases(engine)
    systemd_image(engine)
    quadlet()
    log(f"ready in {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    try:
        prepare()
    except SkipTest as e:
        log(f"not set up: {e}")
        sys.exit(0)
