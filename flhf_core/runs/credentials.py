"""TLS certificates and SuperNode keys for a secure federation, generated locally.

A secure Flower deployment needs (Flower docs: "Enable TLS connections" and
"Authenticate SuperNodes"):

- a certificate authority (CA) that every party trusts (``--root-certificates``
  on SuperNodes, ``root-certificates`` in the ``flwr`` CLI's connection);
- a server certificate for the SuperLink, signed by that CA and valid for the
  address the others dial (here 127.0.0.1 and localhost);
- one ECDSA key pair per SuperNode on a NIST curve, in OpenSSH format: the
  SuperNode signs its requests with the private key
  (``--auth-supernode-private-key``), and the SuperLink accepts only nodes whose
  public key was registered with ``flwr supernode register``.

For a real multi-machine deployment, sign the server certificate for the
SuperLink's public host name instead (``hosts``) and keep the CA key offline.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from flhf_core.common import write_private

VALIDITY = dt.timedelta(days=30)
CURVE = ec.SECP384R1  # P-384: accepted by Flower for node keys, and by TLS


_CA_KEY_USAGE = x509.KeyUsage(  # a CA signs certificates (and revocation lists), nothing else
    digital_signature=False,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)


@dataclass(frozen=True)
class Credentials:
    """Paths of everything a secure loopback federation needs."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    node_keys: tuple[Path, ...]  # private keys, OpenSSH; the public key sits beside with ".pub"

    def public_key(self, user: int) -> Path:
        return self.node_keys[user].with_suffix(".pub")


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def certificate_authority(
    folder: Path, name: str = "FLHF loopback CA"
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed CA certificate and its key, written as ``ca.crt`` and ``ca.key``."""
    key = ec.generate_private_key(CURVE())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_CA_KEY_USAGE, critical=True)
        .sign(key, hashes.SHA384())
    )
    (folder / "ca.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    write_private(folder / "ca.key", _pem_key(key))
    return cert, key


def server_certificate(
    folder: Path, ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, hosts: tuple[str, ...]
) -> None:
    """``server.pem`` and ``server.key``: the SuperLink's certificate, valid for ``hosts``."""
    key = ec.generate_private_key(CURVE())
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    (folder / "server.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    write_private(folder / "server.key", _pem_key(key))


def node_key(path: Path) -> Path:
    """An ECDSA key pair for one SuperNode: ``path`` (private) and ``path.pub``, both OpenSSH."""
    key = ec.generate_private_key(CURVE())
    write_private(
        path,
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        ),
    )
    path.with_suffix(".pub").write_bytes(
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )
    return path


def generate(folder: Path, users: int, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> Credentials:
    """A CA, a SuperLink certificate for ``hosts`` and ``users`` SuperNode key pairs in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    ca, ca_key = certificate_authority(folder)
    server_certificate(folder, ca, ca_key, hosts)
    keys = tuple(node_key(folder / f"supernode-{user}.key") for user in range(users))
    return Credentials(folder / "ca.crt", folder / "server.pem", folder / "server.key", keys)


def superexec_secrets(folder: Path, users: int) -> list[Path]:
    """Shared secrets with which each SuperExec proves itself to the API it pulls work from:
    ``superexec-server.secret`` (the ServerApp executor and the SuperLink), and
    ``superexec-<k>.secret`` (user k's ClientApp executor and its SuperNode): nobody else on
    the network can pose as an executor and read the app's messages."""
    paths = [folder / "superexec-server.secret", *(folder / f"superexec-{k}.secret" for k in range(users))]
    for path in paths:
        write_private(path, os.urandom(32).hex().encode())
    return paths
