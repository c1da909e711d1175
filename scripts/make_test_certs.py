"""Certificates and keys for TESTS ONLY of a secured loopback deployment. Never deploy them.

Writes into OUT_DIR:
  ca.crt, ca.key            a throwaway root CA
  server.crt, server.key    the SuperLink's TLS certificate for 127.0.0.1 and localhost
  wrong-ca.crt              another CA, which did not sign the server (a node given it must fail)
  node-<i>.key, node-<i>.pub  SuperNode authentication keys (EC P-384) in OpenSSH format
                            (what `flower-supernode --auth-supernode-private-key` and
                            `flwr supernode register` read)

Usage:  python scripts/make_test_certs.py OUT_DIR [--nodes 2] [--days 2]
Uses the `cryptography` package (installed with flwr); no openssl binary needed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _write_key(path: Path, key, openssh: bool = False) -> None:
    fmt = serialization.PrivateFormat.OpenSSH if openssh else serialization.PrivateFormat.PKCS8
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())
    )
    path.chmod(0o600)


def _ca(name: str, days: int):
    key = ec.generate_private_key(ec.SECP384R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    return key, cert


def make(out: Path, nodes: int = 2, days: int = 2) -> None:
    out.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = _ca("dpfl test CA (do not trust)", days)
    _write_key(out / "ca.key", ca_key)
    (out / "ca.crt").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    _, wrong = _ca("dpfl wrong CA (do not trust)", days)
    (out / "wrong-ca.crt").write_bytes(wrong.public_bytes(serialization.Encoding.PEM))

    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write_key(out / "server.key", key)
    (out / "server.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    for i in range(nodes):
        node = ec.generate_private_key(ec.SECP384R1())
        _write_key(out / f"node-{i}.key", node, openssh=True)  # the format SuperNodes read
        (out / f"node-{i}.pub").write_bytes(
            node.public_key().public_bytes(
                serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
            )
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--days", type=int, default=2)
    args = parser.parse_args()
    make(args.out_dir, args.nodes, args.days)
    print(f"wrote test-only certificates and keys to {args.out_dir}")


if __name__ == "__main__":
    main()
