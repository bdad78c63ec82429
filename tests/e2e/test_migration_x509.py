"""Migrating from a company X.509 CA to hybrid identities, with ``openssl``-made certificates and
real daemons: a node signs its transition record with its TLS key (``pqtunnel migrate x509``),
peers that trust the CA (``pqtunnel trust --x509-ca``) accept and pin it; another CA, an
expired certificate and a record for another name are refused."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from tests.nodes import Daemon, init_node, pq

CA_CONFIG = ("[ca]\ndefault_ca = d\n[d]\ndatabase = index.txt\nnew_certs_dir = .\nserial = serial\n"
             "default_md = sha256\npolicy = p\nunique_subject = no\n[p]\ncommonName = supplied\n")


def openssl(directory: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)


def make_ca(root: Path, name: str) -> Path:
    """A CA directory (P-256 key, self-signed certificate ``ca.pem``) that ``openssl ca`` can issue from."""
    directory = root / name
    directory.mkdir()
    openssl(directory, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", "ca.key", "-out", "ca.pem", "-days", "30", "-subj", f"/CN={name}",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    (directory / "ca.cnf").write_text(CA_CONFIG)
    (directory / "index.txt").write_text("")
    (directory / "serial").write_text("01\n")
    return directory


def issue(ca: Path, name: str, *, san: str | None = None, end: str | None = None) -> tuple[Path, Path]:
    """A leaf certificate and key for ``name`` (SAN DNS ``san or name``), ending at ``end`` (openssl time)."""
    key, csr, cert = ca / f"{name}.key", ca / f"{name}.csr", ca / f"{name}.pem"
    openssl(ca, "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", key.name, "-out", csr.name, "-subj", f"/CN={name}")
    (ca / f"{name}.ext").write_text(f"subjectAltName=DNS:{san or name}\nkeyUsage=critical,digitalSignature\n")
    ending = ["-enddate", end] if end else ["-days", "30"]
    openssl(ca, "ca", "-batch", "-config", "ca.cnf", "-cert", "ca.pem", "-keyfile", "ca.key", "-in", csr.name,
            "-out", cert.name, "-extfile", f"{name}.ext", "-notext", *ending)
    return cert, key


def x509_node(root: Path, name: str, cert: Path, key: Path, trusted_ca: Path) -> tuple[Path, str]:
    home, fingerprint = init_node(root, name)
    result = pq("migrate", "x509", "--cert", str(cert), "--key", str(key), home=home)
    assert result.returncode == 0, result.stderr
    result = pq("trust", "--x509-ca", str(trusted_ca / "ca.pem"), home=home)
    assert result.returncode == 0, result.stderr
    return home, fingerprint


def pins(home: Path) -> str:
    path = home / "known_peers"
    return path.read_text() if path.exists() else ""


def test_peers_with_certificates_from_a_trusted_ca_are_accepted_and_pinned(tmp_path: Path) -> None:
    corp = make_ca(tmp_path, "corp")
    alice_home, alice_fp = x509_node(tmp_path, "alice", *issue(corp, "alice"), corp)
    bob_home, bob_fp = x509_node(tmp_path, "bob", *issue(corp, "bob"), corp)
    bob = Daemon(bob_home).start()
    alice = Daemon(alice_home, ["--peer", f"bob=127.0.0.1:{bob.port}"]).start()
    try:
        ping = pq("ping", "bob", home=alice_home)
        assert ping.returncode == 0, ping.stderr
        assert f"bob {bob_fp}" in pins(alice_home) and f"alice {alice_fp}" in pins(bob_home)
        peers = json.loads(pq("peers", "--json", home=alice_home).stdout)
        assert [(p["name"], p["trust"]) for p in peers if p["name"] == "bob"] == [("bob", "migrated:x509")]
        status = json.loads(pq("migrate", "status", "--json", home=alice_home).stdout)
        assert status["x509_cas"] == ["CN=corp"] and status["own_record"]["kind"] == "x509"
        assert status["migrated_peers"] == [{"name": "bob", "fingerprint": bob_fp, "method": "migrated:x509"}]
    finally:
        alice.kill()
        bob.kill()
    assert "Traceback" not in alice.logs() + bob.logs()


def _refused(alice_home: Path, bob_home: Path, dial_as: str = "bob") -> str:
    bob = Daemon(bob_home).start()
    alice = Daemon(alice_home, ["--peer", f"{dial_as}=127.0.0.1:{bob.port}"]).start()
    try:
        refused = pq("ping", dial_as, "--timeout", "5", home=alice_home)
        assert refused.returncode != 0
        return refused.stderr + alice.logs()
    finally:
        alice.kill()
        bob.kill()


def test_a_certificate_from_a_foreign_ca_is_refused(tmp_path: Path) -> None:
    corp, rogue = make_ca(tmp_path, "corp"), make_ca(tmp_path, "rogue")
    alice_home, _ = x509_node(tmp_path, "alice", *issue(corp, "alice"), corp)
    bob_home, _ = x509_node(tmp_path, "bob", *issue(rogue, "bob"), rogue)
    assert "does not verify against our X.509 CA" in _refused(alice_home, bob_home)
    assert pins(alice_home) == ""


def test_an_expired_certificate_is_refused(tmp_path: Path) -> None:
    corp = make_ca(tmp_path, "corp")
    alice_home, _ = x509_node(tmp_path, "alice", *issue(corp, "alice"), corp)
    soon = time.strftime("%Y%m%d%H%M%SZ", time.gmtime(time.time() + 4))
    bob_home, _ = x509_node(tmp_path, "bob", *issue(corp, "bob", end=soon), corp)
    time.sleep(max(0.0, time.mktime(time.strptime(soon, "%Y%m%d%H%M%SZ")) - time.mktime(time.gmtime()) + 1))
    assert "expired" in _refused(alice_home, bob_home)
    assert pins(alice_home) == ""
    late = pq("migrate", "x509", "--cert", str(corp / "bob.pem"), "--key", str(corp / "bob.key"), home=bob_home)
    assert late.returncode == 1 and "the certificate expired on" in late.stderr
    assert len(late.stderr.strip().splitlines()) == 1


def test_a_name_mismatch_is_refused(tmp_path: Path) -> None:
    corp = make_ca(tmp_path, "corp")
    alice_home, _ = x509_node(tmp_path, "alice", *issue(corp, "alice"), corp)
    bob_home, _ = x509_node(tmp_path, "bob", *issue(corp, "bob"), corp)
    assert "transition record is for bob, not carol" in _refused(alice_home, bob_home, dial_as="carol")
    cert, key = issue(corp, "dave", san="mallory")  # a certificate that does not name the node
    dave_home, _ = init_node(tmp_path, "dave")
    wrong = pq("migrate", "x509", "--cert", str(cert), "--key", str(key), home=dave_home)
    assert wrong.returncode == 1 and wrong.stderr.strip().endswith("names mallory, not this node (dave)")
    assert pins(alice_home) == ""
