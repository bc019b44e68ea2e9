"""OPC UA application instance certificates: making them, reading them, trusting them.

An OPC UA application proves who it is with an *application instance
certificate* (OPC 10000-6 §6.2.2): an X.509 v3 certificate whose
SubjectAltName holds the application URI (and, for a server, the host names it
is reached by), with the key usages the security policies need. This module

- makes a self-signed one with its key (:func:`create_certificate`, behind the
  operator command ``bioreactor-mpc certs``; docs/opcua-security.md);
- reads a certificate or key in PEM or DER, whatever the file is named, with
  errors that name the file (:func:`read_certificate`, :func:`read_private_key`);
- says why a certificate is not valid now, with its dates
  (:func:`validity_problem`);
- loads a directory of trusted certificates into asyncua's
  :class:`~asyncua.crypto.truststore.TrustStore` and builds the
  :class:`~asyncua.crypto.validator.CertificateValidator` that checks a peer
  against it (:func:`load_trust_store`, :func:`certificate_validator`). A
  certificate is trusted when it, or the CA that signed it, is in the directory:
  never because it was seen before. A certificate it does not trust is
  refused without the traceback asyncua's own trust store logs for it (the
  caller says in one line whose certificate it was and what to do).

Both the runtime's port and the simulated PLC use it.
"""

from __future__ import annotations

import datetime as dt
import errno
import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from asyncua.crypto.truststore import TrustStore
from asyncua.crypto.validator import CertificateValidator, CertificateValidatorOptions
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from plant_models.errors import ConfigError

KEY_SIZE_BITS = 2048
"""RSA key size: the size every current policy (Basic256Sha256, Aes128_Sha256_RsaOaep, Aes256_Sha256_RsaPss) accepts."""
BACKDATE = dt.timedelta(days=1)
"""A new certificate is valid from a day ago, so that a PLC whose clock lags does not refuse it as not yet valid."""
TRUSTED_SUFFIXES = (".der", ".pem")
"""The names asyncua's trust store loads; any other file in a trust directory is an error, not silently ignored."""

_PEM_MARKER = b"-----BEGIN"


def create_certificate(
    path_cert: str | Path,
    path_key: str | Path,
    *,
    common_name: str,
    application_uri: str,
    hostnames: Sequence[str],
    days: int,
    organization: str | None = None,
    overwrite: bool = False,
) -> x509.Certificate:
    """Make a self-signed OPC UA application instance certificate and its private key.

    - ``common_name``: the subject's CN, usually the product or instance name
      (``bioreactor-mpc edge01``); ``organization`` adds the subject's O, which
      OPC 10000-6 asks for (the organization running the application).
    - ``application_uri``: put in the SubjectAltName as a URI. The application
      announces the same URI when it connects, and the peer checks that they
      match (``urn:<host>:bioreactor-mpc`` for the runtime).
    - ``hostnames``: DNS names and IP addresses the application is reached by,
      put in the SubjectAltName (a server needs at least one; for a client
      they are informative).
    - ``days``: validity from now (the start is back-dated by a day for clock
      skew); a year or two is usual, the renewal then being planned.

    The key is 2048-bit RSA, written unencrypted (PKCS#8; PEM unless the name
    ends in ``.der``) with mode 0600: protect it with file permissions. The
    certificate is written DER unless the name ends in ``.pem`` (PLCs usually
    import DER). Key usage: digitalSignature, nonRepudiation, keyEncipherment,
    dataEncipherment and keyCertSign (self-signed); extended key usage:
    serverAuth and clientAuth, so the same function makes client and
    (simulated) server certificates; basicConstraints CA false.

    Existing files are not replaced unless ``overwrite`` is true
    (:class:`FileExistsError` otherwise): a replaced key invalidates every copy
    of the old certificate in the peers' trust lists.
    """
    path_cert, path_key = Path(path_cert), Path(path_key)
    if isinstance(hostnames, str):
        raise TypeError(f"hostnames is a sequence of names; got the single string {hostnames!r}")
    if not common_name.strip():
        raise ValueError("common_name must not be empty")
    if ":" not in application_uri or application_uri != application_uri.strip():
        raise ValueError(f"application_uri must be a URI such as 'urn:edge01:bioreactor-mpc'; got {application_uri!r}")
    if days < 1:
        raise ValueError(f"days must be at least 1; got {days}")
    if path_cert.resolve() == path_key.resolve():
        raise ValueError(f"the certificate and the key need two different files; both are {path_cert}")
    if not overwrite:
        for path in (path_cert, path_key):
            if path.exists():
                raise FileExistsError(errno.EEXIST, "exists; not replaced (overwrite=True replaces it)", str(path))

    key = rsa.generate_private_key(public_exponent=65537, key_size=KEY_SIZE_BITS)
    subject_attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization:
        subject_attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    subject = x509.Name(subject_attributes)
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(application_uri), *_host_names(hostnames)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=True,
                key_encipherment=True,
                data_encipherment=True,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_encoding = serialization.Encoding.DER if path_key.suffix.lower() == ".der" else serialization.Encoding.PEM
    cert_encoding = serialization.Encoding.PEM if path_cert.suffix.lower() == ".pem" else serialization.Encoding.DER
    _write_private(path_key, key.private_bytes(key_encoding, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()), overwrite=overwrite)
    path_cert.parent.mkdir(parents=True, exist_ok=True)
    path_cert.write_bytes(certificate.public_bytes(cert_encoding))
    return certificate


def _host_names(hostnames: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hostnames:
        host = host.strip()
        if not host:
            raise ValueError("hostnames must not contain an empty name")
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def _write_private(path: Path, data: bytes, *, overwrite: bool) -> None:
    """Write a key readable by its owner only, from the moment the file exists."""
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    descriptor = os.open(path, flags, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        os.fchmod(file.fileno(), 0o600)
        file.write(data)


# --------------------------------------------------------------------------- reading


def read_certificate(path: Path, *, field: str) -> x509.Certificate:
    """A certificate from a PEM or DER file; a problem is a :class:`ConfigError` naming ``field`` and the file."""
    data = _read(path, field=field, what="certificate")
    try:
        return x509.load_pem_x509_certificate(data) if data.lstrip().startswith(_PEM_MARKER) else x509.load_der_x509_certificate(data)
    except ValueError as error:
        raise ConfigError(f"{field}: {path}: not an X.509 certificate in PEM or DER ({error})") from None


def read_private_key(path: Path, *, field: str) -> rsa.RSAPrivateKey:
    """An unencrypted RSA private key from a PEM or DER file (PKCS#1 or PKCS#8)."""
    data = _read(path, field=field, what="private key")
    try:
        if data.lstrip().startswith(_PEM_MARKER):
            key = serialization.load_pem_private_key(data, password=None)
        else:
            key = serialization.load_der_private_key(data, password=None)
    except TypeError:
        raise ConfigError(f"{field}: {path}: the private key is encrypted; give an unencrypted key protected by file permissions (0600)") from None
    except ValueError as error:
        raise ConfigError(f"{field}: {path}: not a private key in PEM or DER ({error})") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ConfigError(f"{field}: {path}: the OPC UA RSA security policies need an RSA key; got {type(key).__name__}")
    return key


def _read(path: Path, *, field: str, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{field}: {path}: {what} file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{field}: {path}: is a directory, expected a {what} file") from None
    except OSError as error:
        raise ConfigError(f"{field}: {path}: cannot read the {what} ({error.strerror})") from None


def application_uri(certificate: x509.Certificate) -> str | None:
    """The first URI of the certificate's SubjectAltName: the OPC UA application URI (None without one)."""
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    uris = names.get_values_for_type(x509.UniformResourceIdentifier)
    return uris[0] if uris else None


def validity_problem(certificate: x509.Certificate, *, now: dt.datetime | None = None) -> str | None:
    """Why ``certificate`` is not valid at ``now`` (default: the current time), with its validity dates; None when it is."""
    now = now or dt.datetime.now(dt.UTC)
    start, end = certificate.not_valid_before_utc, certificate.not_valid_after_utc
    if end < now:
        return f"expired on {end:%Y-%m-%d %H:%M} UTC (valid {start:%Y-%m-%d} to {end:%Y-%m-%d}, now {now:%Y-%m-%d %H:%M} UTC)"
    if start > now:
        return f"not valid before {start:%Y-%m-%d %H:%M} UTC (valid {start:%Y-%m-%d} to {end:%Y-%m-%d}, now {now:%Y-%m-%d %H:%M} UTC); is this machine's clock right?"
    return None


def fingerprint(certificate: x509.Certificate) -> str:
    """SHA-256 fingerprint as colon-separated hex, as ``openssl x509 -fingerprint -sha256`` and PLC web pages show it."""
    return certificate.fingerprint(hashes.SHA256()).hex(":").upper()


def describe(certificate: x509.Certificate) -> str:
    """Subject, application URI, validity and fingerprint: what an operator compares before trusting a certificate."""
    return (
        f"subject {certificate.subject.rfc4514_string()!r}, application URI {application_uri(certificate)!r}, "
        f"valid {certificate.not_valid_before_utc:%Y-%m-%d} to {certificate.not_valid_after_utc:%Y-%m-%d}, SHA-256 {fingerprint(certificate)}"
    )


# --------------------------------------------------------------------------- trusting


def trusted_certificates(directory: Path, *, field: str) -> list[x509.Certificate]:
    """The certificates of a trust directory, each checked, so that a misnamed or broken file is an error here.

    asyncua's trust store loads files named ``*.der`` or ``*.pem`` and would
    skip a ``plc.crt`` without a word; every regular file must therefore be a
    certificate with one of those suffixes. An empty directory trusts nothing,
    which is an error too.
    """
    if not directory.is_dir():
        raise ConfigError(f"{field}: {directory}: not a directory (expected the directory of trusted certificates)")
    certificates = []
    for path in sorted(directory.iterdir()):
        if not path.is_file():
            continue
        if path.suffix.lower() not in TRUSTED_SUFFIXES:
            raise ConfigError(f"{field}: {path}: a trusted certificate must be named *.der or *.pem (rename it; other files do not belong here)")
        certificate = read_certificate(path, field=field)
        if (path.suffix.lower() == ".pem") != path.read_bytes().lstrip().startswith(_PEM_MARKER):
            raise ConfigError(f"{field}: {path}: the content does not match the suffix (PEM must be named *.pem, DER *.der)")
        certificates.append(certificate)
    if not certificates:
        raise ConfigError(f"{field}: {directory}: holds no certificate, so nothing would be trusted; copy the peer's certificate (*.der or *.pem) into it")
    return certificates


class QuietTrustStore(TrustStore):
    """asyncua's trust store, refusing an untrusted certificate without logging a traceback.

    asyncua's :meth:`TrustStore.is_trusted` logs every certificate it does not
    trust with ``logger.exception``: a traceback in the log at every refused
    connect. The verification here is the same (the store's own policy and
    certificates); the refusal is reported once, by whoever asked, with the
    certificate's fingerprint and what to do.
    """

    def is_trusted(self, certificate: x509.Certificate) -> bool:
        store = self._trust_store  # asyncua's verification store, built by load()
        if store is None:
            return False
        try:
            self.policy_builder.store(store).build_client_verifier().verify(certificate, [])
        except x509.verification.VerificationError:
            return False
        return True


async def load_trust_store(directory: Path, *, field: str) -> TrustStore:
    """A trust store over ``directory`` (checked first with :func:`trusted_certificates`), loaded now."""
    trusted_certificates(directory, field=field)
    store = QuietTrustStore([directory], [])
    await store.load()
    return store


def certificate_validator(store: TrustStore, *, peer: Literal["server", "client"]) -> CertificateValidator:
    """A validator that accepts a peer's certificate only if the trust store trusts it.

    asyncua's full set (``TRUSTED_VALIDATION``): within its validity period,
    application URI in the SubjectAltName equal to the one the peer announces,
    the key usages of OPC 10000-6 (digitalSignature, nonRepudiation,
    keyEncipherment, dataEncipherment), the extended key usage of its role
    (serverAuth for a server, clientAuth for a client), trusted directly or by
    a CA in the store, not revoked.
    """
    role = CertificateValidatorOptions.PEER_SERVER if peer == "server" else CertificateValidatorOptions.PEER_CLIENT
    return CertificateValidator(CertificateValidatorOptions.TRUSTED_VALIDATION | role, store)
