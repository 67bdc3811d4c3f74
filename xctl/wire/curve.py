"""CURVE keys, allow-lists and the ZAP handler (DESIGN §6 "Security", issue 10).

Key files are pyzmq's ``zmq.auth`` certificates (ZPL text): ``NAME.key`` holds the public key,
``NAME.key_secret`` the key pair; both carry ``role`` and ``name`` in their ``metadata``.

Directory layouts:

- The **aggregator's** ``--keys DIR``: its own pair ``server.key`` / ``server.key_secret`` and
  three allow-lists of public certificates, ``agents/``, ``operators/`` and ``admins/``. The
  directory a certificate sits in decides its role; its name is the metadata ``name`` (else
  the file name). An agent's name is the node it may speak for.
- An **agent's or a CLI user's** ``--keys DIR``: its own pair ``NAME.key_secret`` (an agent
  prefers the one named after its node; the CLI takes the only one, or ``--keys
  DIR/NAME.key_secret``) and ``server.key``, the aggregator's public certificate, which the
  client checks the aggregator against (``curve_serverkey``).

A directory that holds no key files at all counts as "no keys" (plaintext, with a warning),
so an empty Kubernetes Secret keeps the manifests working; a half-filled one is an error.

ZAP: :class:`ZapHandler` (a ``zmq.auth`` ThreadAuthenticator: its own thread and sockets)
accepts a client key on a socket's ZAP domain only if it is listed with a role that domain
allows (``events``, ``control``: agents; ``query``: operators and admins), and gives the
connection the User-Id ``role:name:key``. The aggregator reads that User-Id on every message
and checks it against the *current* allow-lists (:meth:`Keyring.identity`), so a key removed
by a SIGHUP reload is refused on new connections at once and its messages on connections
already open are dropped.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import stat
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from xctl.core.errors import ConfigError, UsageError
from xctl.wire.sockets import Socket, SocketSetup

log = logging.getLogger(__name__)

AGENT: Final = "agent"
OPERATOR: Final = "operator"
ADMIN: Final = "admin"
SERVER: Final = "server"
#: Roles a client key can have, and the aggregator's allow-list directory of each.
ROLE_DIRS: Final[dict[str, str]] = {AGENT: "agents", OPERATOR: "operators", ADMIN: "admins"}
#: ZAP domain of each aggregator socket → the roles that may connect to it.
DOMAIN_ROLES: Final[dict[str, frozenset[str]]] = {
    "events": frozenset({AGENT}),
    "control": frozenset({AGENT}),
    "query": frozenset({OPERATOR, ADMIN}),
}
SERVER_PUBLIC: Final = "server.key"
SERVER_SECRET: Final = "server.key_secret"  # noqa: S105 - a file name
#: Names of keys (node names for agents): no ':' (the User-Id separator) and no '/'.
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.@-]{0,127}$")
_Z85_KEY = re.compile(r"^[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}$")
#: Refusals of one key are logged at most this often (a refused client may retry fast).
_REFUSAL_LOG_S: Final = 60.0


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise UsageError(
            f"key name {name!r}: use letters, digits, '_', '.', '@' and '-' (at most 128; a node name for an agent)"
        )
    return name


# ------------------------------------------------------------------------------ certificates


@dataclass(frozen=True, slots=True)
class Certificate:
    """One certificate file: its public key, its secret key if it is a pair, its metadata."""

    path: Path
    public_key: str
    secret_key: str | None
    metadata: Mapping[str, str] = field(default_factory=dict)

    @property
    def role(self) -> str | None:
        return self.metadata.get("role")

    @property
    def name(self) -> str:
        return self.metadata.get("name") or self.path.name.rsplit(".", 1)[0]


def _zpl_value(raw: str) -> str:
    value = raw.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        value = value[1:-1]
    return value


def read_certificate(path: str | os.PathLike[str]) -> Certificate:
    """Parse a ``zmq.auth`` certificate (the ZPL subset pyzmq and czmq write)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read key file {p}: {exc}") from exc
    section = ""
    metadata: dict[str, str] = {}
    keys: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.split("#", 1)[0] if raw.lstrip().startswith("#") else raw
        if not line.strip():
            continue
        if not line[:1].isspace():
            section = line.strip()
            continue
        name, sep, value = line.strip().partition("=")
        if not sep:
            continue
        if section == "metadata":
            metadata[name.strip()] = _zpl_value(value)
        elif section == "curve":
            keys[name.strip()] = _zpl_value(value)
    public = keys.get("public-key")
    secret = keys.get("secret-key")
    if public is None or not _Z85_KEY.match(public):
        raise ConfigError(f"{p}: not a CURVE certificate (no valid public-key; `xctl keys new` writes them)")
    if secret is not None and not _Z85_KEY.match(secret):
        raise ConfigError(f"{p}: secret-key is not a 40-character Z85 key")
    return Certificate(p, public, secret, metadata)


_BANNER_PUBLIC = """#   ****  Generated on {0} by xctl (pyzmq zmq.auth format)  ****
#   ZeroMQ CURVE Public Certificate
#   Exchange securely, or use a secure mechanism to verify the contents
#   of this file after exchange.

"""


def _write_public(path: Path, public_key: str, metadata: Mapping[str, str]) -> None:
    """pyzmq writes metadata into the secret file only; the public one needs it too."""
    lines = [_BANNER_PUBLIC.format(datetime.datetime.now()), "metadata\n"]
    lines += [f'    {k} = "{v}"\n' for k, v in metadata.items()]
    lines += ["curve\n", f'    public-key = "{public_key}"\n']
    path.write_text("".join(lines), encoding="utf-8")


def write_key_pair(directory: str | os.PathLike[str], name: str, role: str) -> tuple[Path, Path]:
    """Write ``NAME.key`` and ``NAME.key_secret`` (mode 0600) in ``directory``; never overwrite."""
    check_name(name)
    if role not in (*ROLE_DIRS, SERVER):
        raise UsageError(f"role {role!r}: expected one of agent, operator, admin, server")
    out = Path(directory)
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    public, secret = out / f"{name}.key", out / f"{name}.key_secret"
    for existing in (public, secret):
        if existing.exists():
            raise UsageError(f"{existing} exists: remove it first, or choose another --name")
    old_umask = os.umask(0o077)
    try:
        pub_path, sec_path = zmq.auth.create_certificates(str(out), name, metadata={"role": role, "name": name})
    finally:
        os.umask(old_umask)
    cert = read_certificate(sec_path)
    _write_public(Path(pub_path), cert.public_key, {"role": role, "name": name})
    os.chmod(sec_path, stat.S_IRUSR | stat.S_IWUSR)
    os.chmod(pub_path, stat.S_IRUSR | stat.S_IWUSR | stat.S_IRGRP | stat.S_IROTH)
    return Path(pub_path), Path(sec_path)


# ------------------------------------------------------------------------------ the allow-lists


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a key is: its role (agent, operator, admin), its name, its public key (Z85)."""

    role: str
    name: str
    public_key: str

    @property
    def user_id(self) -> str:
        """The ZAP User-Id of its connections: ``role:name:key`` (names hold no ':')."""
        return f"{self.role}:{self.name}:{self.public_key}"

    @property
    def label(self) -> str:
        """For logs and audit records: ``name (role)``."""
        return f"{self.name} ({self.role})"


def parse_user_id(user_id: str) -> tuple[str, str, str] | None:
    role, sep, rest = user_id.partition(":")
    name, sep2, key = rest.partition(":")
    if not sep or not sep2 or not key:
        return None
    return role, name, key


class Keyring:
    """The aggregator's allow-lists, immutable once loaded (a reload builds a new one and swaps
    the reference, so the ZAP thread and the socket thread never see half a list)."""

    def __init__(self, identities: Mapping[str, Identity], problems: list[str] | None = None) -> None:
        self.identities: dict[str, Identity] = dict(identities)
        self.problems = list(problems or [])
        self._by_user_id: dict[str, Identity] = {i.user_id: i for i in self.identities.values()}

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> Keyring:
        """Read ``agents/``, ``operators/``, ``admins/`` under ``directory`` (missing ones are empty)."""
        base = Path(directory)
        found: dict[str, Identity] = {}
        problems: list[str] = []
        conflicts: set[str] = set()
        for role, sub in ROLE_DIRS.items():
            folder = base / sub
            if not folder.is_dir():
                continue
            for path in sorted(folder.glob("*.key")):
                try:
                    cert = read_certificate(path)
                    name = check_name(cert.name)
                except (ConfigError, UsageError) as exc:
                    problems.append(f"{path}: skipped: {exc}")
                    continue
                if cert.secret_key is not None:
                    problems.append(f"{path}: holds a secret key; an allow-list needs only the public certificate")
                if cert.role is not None and cert.role != role:
                    problems.append(f"{path}: made for role {cert.role!r}, listed in {sub}/: it counts as {role}")
                other = found.get(cert.public_key)
                if other is not None:
                    if {other.role, role} == {OPERATOR, ADMIN}:
                        found[cert.public_key] = Identity(ADMIN, other.name if other.role == ADMIN else name,
                                                          cert.public_key)
                        continue
                    conflicts.add(cert.public_key)
                    problems.append(f"{path}: the same key is also listed as {other.label}: refused in both")
                    continue
                found[cert.public_key] = Identity(role, name, cert.public_key)
        for key in conflicts:
            found.pop(key, None)
        return cls(found, problems)

    def lookup(self, public_key: str) -> Identity | None:
        return self.identities.get(public_key)

    def identity(self, user_id: str | None) -> Identity | None:
        """The identity behind a connection's User-Id while its key is still listed, with the
        same role and name; None once it was removed (or never was)."""
        if not user_id:
            return None
        return self._by_user_id.get(user_id)

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(ROLE_DIRS, 0)
        for ident in self.identities.values():
            out[ident.role] += 1
        return out


# ------------------------------------------------------------------------------ key directories


def _key_files(directory: Path) -> list[Path]:
    return [p for p in directory.iterdir() if p.is_file() and p.name.endswith((".key", ".key_secret"))]


def _no_keys(directory: Path) -> bool:
    """True when ``directory`` holds no key file and no allow-list: "no keys configured"."""
    if _key_files(directory):
        return False
    return not any((directory / sub).is_dir() and any((directory / sub).glob("*.key")) for sub in ROLE_DIRS.values())


@dataclass(frozen=True, slots=True)
class ServerKeys:
    """The aggregator's key pair and allow-lists."""

    directory: Path
    public_key: str
    secret_key: str
    keyring: Keyring

    def reload(self) -> ServerKeys:
        """The same server key with the allow-lists read again (SIGHUP)."""
        return ServerKeys(self.directory, self.public_key, self.secret_key, Keyring.load(self.directory))


def load_server_keys(directory: str | os.PathLike[str]) -> ServerKeys | None:
    """The aggregator's keys, or None when ``directory`` holds none at all (see the module doc)."""
    base = Path(directory)
    if not base.is_dir():
        raise ConfigError(f"--keys {base}: no such directory (create it with: xctl keys server {base})")
    secret_path = base / SERVER_SECRET
    if not secret_path.exists():
        if _no_keys(base):
            return None
        raise ConfigError(
            f"--keys {base}: no server key pair ({SERVER_SECRET}) next to the allow-lists: run xctl keys server {base}"
        )
    cert = read_certificate(secret_path)
    if cert.secret_key is None:
        raise ConfigError(f"{secret_path}: holds no secret-key")
    keyring = Keyring.load(base)
    return ServerKeys(base, cert.public_key, cert.secret_key, keyring)


@dataclass(frozen=True, slots=True)
class ClientKeys:
    """A client's (agent's or CLI user's) key pair and the aggregator's public key."""

    path: Path
    public_key: str
    secret_key: str
    server_key: str
    role: str | None
    name: str


def load_client_keys(location: str | os.PathLike[str], *, node: str | None = None) -> ClientKeys | None:
    """Keys from ``location`` (a directory, or a ``NAME.key_secret`` file next to ``server.key``).

    An agent passes its ``node``: the pair named after the node is preferred, and a pair made
    for another node is refused (the aggregator would refuse everything it sends). None when
    the directory holds no key files at all.
    """
    where = Path(location)
    if where.is_file():
        chosen, base = where, where.parent
    elif where.is_dir():
        base = where
        if _no_keys(base):
            return None
        pairs = sorted(p for p in base.glob("*.key_secret") if p.name != SERVER_SECRET)
        named = [p for p in pairs if node is not None and p.name == f"{node}.key_secret"]
        if named:
            chosen = named[0]
        elif len(pairs) == 1:
            chosen = pairs[0]
        elif not pairs:
            raise ConfigError(
                f"--keys {base}: no key pair of yours (NAME.key_secret; make one with: xctl keys new --role ROLE "
                f"--name NAME {base})"
            )
        else:
            names = ", ".join(p.name for p in pairs)
            raise ConfigError(f"--keys {base}: several key pairs ({names}): pass --keys {base}/NAME.key_secret")
    else:
        raise ConfigError(f"--keys {where}: no such directory or file")
    cert = read_certificate(chosen)
    if cert.secret_key is None:
        raise ConfigError(f"{chosen}: holds no secret-key (the .key_secret file is the key pair)")
    server_path = base / SERVER_PUBLIC
    if not server_path.exists():
        raise ConfigError(
            f"{server_path}: missing: copy the aggregator's public certificate (its {SERVER_PUBLIC}) here, so this "
            "client can tell the real aggregator from an impostor"
        )
    server = read_certificate(server_path)
    if node is not None and cert.role == AGENT and cert.name != node:
        raise ConfigError(f"{chosen}: this agent key is for node {cert.name!r}, not {node!r}")
    return ClientKeys(chosen, cert.public_key, cert.secret_key, server.public_key, cert.role, cert.name)


# ------------------------------------------------------------------------------ socket setup


def server_setup(keys: ServerKeys, domain: str) -> SocketSetup:
    """CURVE server options for an aggregator socket in ZAP ``domain``. ZAP_ENFORCE_DOMAIN: a
    missing ZAP handler refuses every client (libzmq would otherwise accept them all)."""
    if domain not in DOMAIN_ROLES:
        raise ValueError(f"unknown ZAP domain {domain!r}")

    def setup(sock: Socket) -> None:
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.public_key.encode())
        sock.setsockopt(zmq.CURVE_SECRETKEY, keys.secret_key.encode())
        sock.setsockopt(zmq.ZAP_DOMAIN, domain.encode())
        sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)

    return setup


def client_setup(keys: ClientKeys) -> SocketSetup:
    """CURVE client options: our pair, and the server key the aggregator must prove it holds."""

    def setup(sock: Socket) -> None:
        sock.setsockopt(zmq.CURVE_SERVERKEY, keys.server_key.encode())
        sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.public_key.encode())
        sock.setsockopt(zmq.CURVE_SECRETKEY, keys.secret_key.encode())

    return setup


def chain(*setups: SocketSetup | None) -> SocketSetup | None:
    """One setup running each of ``setups`` in order (None entries skipped)."""
    real = [s for s in setups if s is not None]
    if not real:
        return None
    if len(real) == 1:
        return real[0]

    def setup(sock: Socket) -> None:
        for s in real:
            s(sock)

    return setup


# ------------------------------------------------------------------------------ ZAP


class _DomainPolicy:
    """``zmq.auth``'s credentials provider for one ZAP domain."""

    def __init__(self, handler: ZapHandler, domain: str) -> None:
        self.handler = handler
        self.domain = domain

    def callback(self, domain: str, key: bytes) -> bool:
        return self.handler.allowed(self.domain, key.decode("ascii", "replace"))


class ZapHandler(ThreadAuthenticator):
    """The aggregator's ZAP handler: its own thread and REP socket on the context's ZAP
    endpoint. Start it before binding the CURVE sockets."""

    def __init__(self, context: zmq.Context[Any], keyring: Keyring) -> None:
        super().__init__(context=context, log=logging.getLogger("xctl.zap"))
        self._keyring = keyring
        self._lock = threading.Lock()
        #: Refused handshakes by reason (unknown_key, wrong_role), for health and /metrics.
        self.refused: dict[str, int] = {}
        self.accepted = 0
        self._logged: dict[str, float] = {}

    @property
    def keyring(self) -> Keyring:
        return self._keyring

    def set_keyring(self, keyring: Keyring) -> None:
        self._keyring = keyring  # one reference swap: atomic for the ZAP thread

    def start(self) -> None:
        super().start()
        for domain in DOMAIN_ROLES:
            self.configure_curve_callback(domain, _DomainPolicy(self, domain))

    def allowed(self, domain: str, public_key: str) -> bool:
        ident = self._keyring.lookup(public_key)
        roles = DOMAIN_ROLES.get(domain, frozenset())
        if ident is not None and ident.role in roles:
            with self._lock:
                self.accepted += 1
            return True
        reason = "unknown_key" if ident is None else "wrong_role"
        with self._lock:
            self.refused[reason] = self.refused.get(reason, 0) + 1
            now = time.monotonic()
            last = self._logged.get(public_key)
            quiet = last is not None and now - last < _REFUSAL_LOG_S
            if not quiet:
                if len(self._logged) > 4096:
                    self._logged.clear()
                self._logged[public_key] = now
        if not quiet:
            who = "an unknown key" if ident is None else f"the key of {ident.label}"
            log.warning("refused %s (%s) on the %s port", who, public_key, domain)
        return False

    def curve_user_id(self, client_public_key: bytes) -> str:
        key = z85.encode(client_public_key).decode("ascii")
        ident = self._keyring.lookup(key)
        # Removed between the check and here: a User-Id no list holds, so every message is dropped.
        return ident.user_id if ident is not None else f"revoked::{key}"

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"accepted": self.accepted, **{f"refused_{k}": v for k, v in self.refused.items()}}


# ------------------------------------------------------------------------------ handshake failures

#: Monitor events a client watches to tell a refused handshake from a silent aggregator.
HANDSHAKE_EVENTS: Final = (
    zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)


def handshake_failure(event: int, value: int, *, curve: bool) -> str | None:
    """What a monitor event means for a client, or None when it is not a refusal we know.

    - FAILED_AUTH: the aggregator's ZAP handler refused our key.
    - FAILED_PROTOCOL with a mechanism mismatch: one side uses CURVE and the other not.
    - FAILED_NO_DETAIL with CURVE: the aggregator could not complete the handshake with the
      server key we have (server.key is not this aggregator's).
    """
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return "key not authorised by the aggregator"
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
        if curve:
            return "the aggregator does not use CURVE keys (it runs in plaintext): drop --keys / XCTL_KEYS"
        return "the aggregator requires CURVE keys: give --keys DIR (or XCTL_KEYS)"
    if event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL and curve:
        return "CURVE handshake failed: server.key is not this aggregator's public key"
    return None

