"""CURVE keys, allow-lists and key directories (xctl/wire/curve.py); the plaintext bind rule."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import zmq
import zmq.auth

from xctl.aggregator.server import check_plaintext_bind, is_loopback
from xctl.core.errors import ConfigError, UsageError
from xctl.wire.curve import (
    Keyring,
    handshake_failure,
    load_client_keys,
    load_server_keys,
    parse_user_id,
    read_certificate,
    write_key_pair,
)


@pytest.fixture
def agg(tmp_path: Path) -> Path:
    where = tmp_path / "agg"
    write_key_pair(where, "server", "server")
    for sub in ("agents", "operators", "admins"):
        (where / sub).mkdir()
    return where


def listed(agg: Path, tmp: Path, role: str, name: str, sub: str | None = None) -> Path:
    where = tmp / f"{role}-{name}"
    public, _ = write_key_pair(where, name, role)
    shutil.copyfile(public, agg / (sub or f"{role}s") / public.name)
    shutil.copyfile(agg / "server.key", where / "server.key")
    return where


def test_key_pairs_are_zmq_auth_certificates_with_role_and_name(tmp_path: Path) -> None:
    public, secret = write_key_pair(tmp_path, "node1", "agent")
    pub, sec = zmq.auth.load_certificate(secret)
    assert sec is not None and zmq.auth.load_certificate(public) == (pub, None)
    for path in (public, secret):
        cert = read_certificate(path)
        assert (cert.role, cert.name, cert.public_key) == ("agent", "node1", pub.decode())
    assert read_certificate(secret).secret_key == sec.decode()
    with pytest.raises(UsageError, match="exists"):
        write_key_pair(tmp_path, "node1", "agent")
    with pytest.raises(UsageError):
        write_key_pair(tmp_path, "a:b", "agent")
    with pytest.raises(UsageError):
        write_key_pair(tmp_path, "x", "root")


def test_a_certificate_pyzmq_wrote_reads_too(tmp_path: Path) -> None:
    _, secret = zmq.auth.create_certificates(str(tmp_path), "raw", metadata={"role": "admin", "name": "alice"})
    cert = read_certificate(secret)
    assert (cert.role, cert.name) == ("admin", "alice")
    bad = tmp_path / "bad.key"
    bad.write_text("curve\n    public-key = \"short\"\n")
    with pytest.raises(ConfigError, match="not a CURVE certificate"):
        read_certificate(bad)


def test_keyring_roles_come_from_the_directory(agg: Path, tmp_path: Path) -> None:
    listed(agg, tmp_path, "agent", "n1")
    op = listed(agg, tmp_path, "operator", "alice")
    shutil.copyfile(op / "alice.key", agg / "admins" / "alice.key")  # also an admin: an admin
    listed(agg, tmp_path, "operator", "eve", sub="agents")  # an operator key dropped in agents/
    both = listed(agg, tmp_path, "agent", "n2")
    shutil.copyfile(both / "n2.key", agg / "operators" / "n2.key")  # agent and operator: refused
    ring = Keyring.load(agg)
    roles = {i.name: i.role for i in ring.identities.values()}
    assert roles == {"n1": "agent", "alice": "admin", "eve": "agent"}
    assert any("listed in agents/" in p for p in ring.problems)
    assert any("refused in both" in p for p in ring.problems)
    assert ring.counts() == {"agent": 2, "operator": 0, "admin": 1}


def test_user_ids_are_checked_against_the_current_lists(agg: Path, tmp_path: Path) -> None:
    listed(agg, tmp_path, "agent", "n1")
    ring = Keyring.load(agg)
    (ident,) = ring.identities.values()
    assert ring.identity(ident.user_id) == ident
    assert parse_user_id(ident.user_id) == ("agent", "n1", ident.public_key)
    assert ring.identity(f"admin:n1:{ident.public_key}") is None, "the role is part of the identity"
    assert ring.identity(None) is None and ring.identity("") is None
    (agg / "agents" / "n1.key").unlink()
    assert Keyring.load(agg).identity(ident.user_id) is None


def test_server_keys(agg: Path, tmp_path: Path) -> None:
    keys = load_server_keys(agg)
    assert keys is not None and keys.secret_key and keys.keyring.counts()["agent"] == 0
    empty = tmp_path / "empty"
    empty.mkdir()
    assert load_server_keys(empty) is None, "no key files at all: no keys"
    (agg / "server.key_secret").unlink()
    with pytest.raises(ConfigError, match="no server key pair"):
        load_server_keys(agg)
    with pytest.raises(ConfigError, match="no such directory"):
        load_server_keys(tmp_path / "missing")


def test_client_keys_choose_their_pair(agg: Path, tmp_path: Path) -> None:
    where = listed(agg, tmp_path, "agent", "n1")
    keys = load_client_keys(where, node="n1")
    assert keys is not None and keys.name == "n1" and keys.server_key == read_certificate(agg / "server.key").public_key
    with pytest.raises(ConfigError, match="not 'n2'"):
        load_client_keys(where, node="n2")
    write_key_pair(where, "n2", "agent")
    assert load_client_keys(where, node="n2").name == "n2"  # type: ignore[union-attr]
    with pytest.raises(ConfigError, match="several key pairs"):
        load_client_keys(where)
    assert load_client_keys(where / "n1.key_secret").name == "n1"  # type: ignore[union-attr]
    (where / "server.key").unlink()
    with pytest.raises(ConfigError, match=r"server\.key"):
        load_client_keys(where / "n1.key_secret")
    empty = tmp_path / "nothing"
    empty.mkdir()
    assert load_client_keys(empty) is None


def test_handshake_failures_are_named() -> None:
    assert "not authorised" in str(handshake_failure(zmq.EVENT_HANDSHAKE_FAILED_AUTH, 400, curve=True))
    mismatch = zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH
    assert "requires CURVE" in str(handshake_failure(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, mismatch, curve=False))
    assert "plaintext" in str(handshake_failure(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, mismatch, curve=True))
    assert "server.key" in str(handshake_failure(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, 0, curve=True))
    assert handshake_failure(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, 0, curve=False) is None


@pytest.mark.parametrize("host", ["127.0.0.1", "127.1.2.3", "::1", "localhost", "lo"])
def test_loopback_binds_need_no_keys(host: str) -> None:
    assert is_loopback(host)
    check_plaintext_bind(host, insecure=False)


@pytest.mark.parametrize("host", ["*", "0.0.0.0", "::", "10.0.0.1", "eth0", "head.example.org"])
def test_other_plaintext_binds_need_insecure(host: str) -> None:
    assert not is_loopback(host)
    with pytest.raises(UsageError, match="--insecure"):
        check_plaintext_bind(host, insecure=False)
    check_plaintext_bind(host, insecure=True)
