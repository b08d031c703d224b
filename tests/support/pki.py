"""A throwaway PKI for TLS tests: a CA, a server certificate for 127.0.0.1 / localhost, a client
certificate signed by the CA, and a rogue client certificate from another CA. EC P-256 keys: fast."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_ca: Path
    rogue_cert: Path
    rogue_key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(path: Path, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> tuple[Path, Path]:
    key_path = path.with_suffix(".key")
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    cert_path = path.with_suffix(".crt")
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def _builder(subject: str, issuer: x509.Name, key: ec.EllipticCurvePrivateKey) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )


def _ca(path: Path, cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        _builder(cn, _name(cn), key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )  # digital_signature, key_cert_sign, crl_sign
        .sign(key, hashes.SHA256())
    )
    cert_path, _ = _write(path, key, cert)
    return key, cert, cert_path


def _leaf(
    path: Path, cn: str, ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, usage: x509.ObjectIdentifier
) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = _builder(cn, ca_cert.subject, key).add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if usage == ExtendedKeyUsageOID.SERVER_AUTH:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    return _write(path, key, builder.sign(ca_key, hashes.SHA256()))


def make_pki(folder: Path) -> Pki:
    """Write every key and certificate under ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert, ca = _ca(folder / "ca", "cleave test CA")
    server_cert, server_key = _leaf(folder / "server", "localhost", ca_key, ca_cert, ExtendedKeyUsageOID.SERVER_AUTH)
    client_cert, client_key = _leaf(folder / "client", "edge-1", ca_key, ca_cert, ExtendedKeyUsageOID.CLIENT_AUTH)
    rogue_key, rogue_ca_cert, rogue_ca = _ca(folder / "rogue-ca", "rogue CA")
    rogue_cert, rogue_key_path = _leaf(
        folder / "rogue", "edge-1", rogue_key, rogue_ca_cert, ExtendedKeyUsageOID.CLIENT_AUTH
    )
    return Pki(ca, server_cert, server_key, client_cert, client_key, rogue_ca, rogue_cert, rogue_key_path)


if __name__ == "__main__":  # a throwaway PKI to try TLS with: python -m tests.support.pki /tmp/pki
    import sys

    for name, path in vars(make_pki(Path(sys.argv[1] if len(sys.argv) > 1 else "pki"))).items():
        print(f"{name:12} {path}")
