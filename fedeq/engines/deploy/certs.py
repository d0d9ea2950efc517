"""TLS certificates and SuperNode authentication keys for a real Flower deployment.

Everything is generated with the ``cryptography`` package into one folder (:class:`CertLayout`):

``ca.pem`` / ``ca.key``
    A self-signed certificate authority. ``ca.pem`` goes to every machine; ``ca.key`` never leaves the
    machine that generated the folder.
``superlink.pem`` / ``superlink.key``
    The SuperLink's server certificate (signed by the CA) with the given host names / IP addresses as
    subject alternative names. SuperNodes and ``flwr`` verify it against ``ca.pem``.
``supernode-<i>.pem`` / ``supernode-<i>.key``
    Certificate of SuperNode ``i``'s local Runtime API (the channel between the SuperNode and the processes
    that run the ClientApp), signed by the same CA.
``node-auth/supernode-<i>`` / ``node-auth/supernode-<i>.pub``
    SuperNode ``i``'s authentication key pair (ECDSA P-384, OpenSSH format): the SuperLink only accepts
    SuperNodes whose public key was registered (``flwr supernode register``).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "DEFAULT_HOSTS",
    "CertError",
    "CertLayout",
    "NodeKeys",
    "check_layout",
    "generate_ca",
    "generate_deployment",
    "generate_node_keys",
    "issue_certificate",
    "load_public_key_openssh",
    "public_keys",
    "server_names",
]

#: Names every generated server certificate is valid for (local experiments).
DEFAULT_HOSTS: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")
_VALID_DAYS = 365


class CertError(ValueError):
    """A certificate folder is missing files or holds unusable ones; ``key`` names the argument."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(f"{key}: {message}")


@dataclass(frozen=True)
class NodeKeys:
    """Paths of one SuperNode's authentication key pair (OpenSSH format)."""

    private_key: Path
    public_key: Path


@dataclass(frozen=True)
class CertLayout:
    """File names inside a certificate folder."""

    folder: Path

    @property
    def ca_cert(self) -> Path:
        return self.folder / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.folder / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.folder / "superlink.pem"

    @property
    def server_key(self) -> Path:
        return self.folder / "superlink.key"

    def node_cert(self, index: int) -> Path:
        """Certificate of SuperNode ``index``'s Runtime API."""
        return self.folder / f"supernode-{index}.pem"

    def node_cert_key(self, index: int) -> Path:
        """Private key of SuperNode ``index``'s Runtime API certificate."""
        return self.folder / f"supernode-{index}.key"

    def node_keys(self, index: int) -> NodeKeys:
        """Authentication key pair of SuperNode ``index``."""
        base = self.folder / "node-auth" / f"supernode-{index}"
        return NodeKeys(private_key=base, public_key=base.with_name(base.name + ".pub"))


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    if private:
        os.chmod(tmp, 0o600)
    tmp.replace(path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedeq"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _san(hosts: Iterable[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(h.strip().strip("[]") for h in hosts if h.strip()):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    if not names:
        raise CertError("hosts", "at least one host name or IP address is required")
    return x509.SubjectAlternativeName(names)


def _san_names(hosts: Iterable[str]) -> list[str]:
    """The names of :func:`_san` as :func:`server_names` reports them."""
    return [str(name.value) for name in _san(hosts)]


def _builder(
    common_name: str, issuer: x509.Name, key: ec.EllipticCurvePrivateKey, days: int
) -> x509.CertificateBuilder:
    """A certificate for ``key`` named ``common_name``, issued by ``issuer``, valid from 5 minutes ago."""
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
    )


def generate_ca(folder: str | Path, common_name: str = "fedeq CA", days: int = _VALID_DAYS) -> CertLayout:
    """Create a self-signed CA (``ca.pem``, ``ca.key``) in ``folder``."""
    layout = CertLayout(Path(folder))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        _builder(common_name, _name(common_name), key, days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write(layout.ca_key, _key_pem(key), private=True)
    _write(layout.ca_cert, cert.public_bytes(serialization.Encoding.PEM))
    return layout


def _load_ca(layout: CertLayout) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert = x509.load_pem_x509_certificate(layout.ca_cert.read_bytes())
    key = serialization.load_pem_private_key(layout.ca_key.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertError("certs", f"{layout.ca_key} is not an EC private key")
    return cert, key


def issue_certificate(
    layout: CertLayout,
    cert_path: Path,
    key_path: Path,
    common_name: str,
    hosts: Sequence[str],
    days: int = _VALID_DAYS,
) -> None:
    """Issue a TLS server certificate for ``hosts`` signed by the CA of ``layout``."""
    ca_cert, ca_key = _load_ca(layout)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        _builder(common_name, ca_cert.subject, key, days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_san(hosts), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write(key_path, _key_pem(key), private=True)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM))


def generate_node_keys(keys: NodeKeys) -> NodeKeys:
    """Create an ECDSA P-384 authentication key pair in OpenSSH format (what Flower expects)."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write(keys.private_key, private, private=True)
    _write(keys.public_key, public + b"\n")
    return keys


def load_public_key_openssh(path: str | Path) -> ec.EllipticCurvePublicKey:
    """Load an OpenSSH EC public key (raises :class:`CertError` when unusable)."""
    try:
        key = serialization.load_ssh_public_key(Path(path).read_bytes())
    except (OSError, ValueError) as err:
        raise CertError("public key", f"cannot load {path}: {err}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise CertError("public key", f"{path} is not an EC public key")
    return key


def generate_deployment(
    folder: str | Path,
    num_nodes: int,
    hosts: Sequence[str] = DEFAULT_HOSTS,
    node_hosts: Sequence[str] = DEFAULT_HOSTS,
    overwrite: bool = False,
) -> CertLayout:
    """Generate the CA, the SuperLink certificate and, per SuperNode, a certificate and an auth key pair.

    Existing files are kept (keys already registered stay valid, devices can be added later), except the
    SuperLink certificate when ``hosts`` changed; ``overwrite`` regenerates everything, the CA included.
    """
    if num_nodes < 0:
        raise CertError("--nodes", f"must be >= 0 (got {num_nodes})")
    layout = CertLayout(Path(folder))
    layout.folder.mkdir(parents=True, exist_ok=True)
    if overwrite or not (layout.ca_cert.is_file() and layout.ca_key.is_file()):
        generate_ca(layout.folder)
        overwrite = True
    have = set(server_names(layout.server_cert)) if layout.server_cert.is_file() else set()
    if overwrite or not layout.server_key.is_file() or have != set(_san_names(hosts)):
        issue_certificate(layout, layout.server_cert, layout.server_key, "fedeq SuperLink", list(hosts))
    for i in range(num_nodes):
        if overwrite or not (layout.node_cert(i).is_file() and layout.node_cert_key(i).is_file()):
            issue_certificate(
                layout, layout.node_cert(i), layout.node_cert_key(i), f"fedeq SuperNode {i}", node_hosts
            )
        keys = layout.node_keys(i)
        if overwrite or not (keys.private_key.is_file() and keys.public_key.is_file()):
            generate_node_keys(keys)
    return layout


def _check_cert(path: Path, key: str) -> x509.Certificate:
    if not path.is_file():
        raise CertError(key, f"missing file {path} (generate it with `fedeq deploy certs`)")
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError as err:
        raise CertError(key, f"{path} is not a PEM certificate ({err})") from None


def check_layout(
    folder: str | Path,
    *,
    server: bool = False,
    node_certs: Iterable[int] = (),
    node_private: Iterable[int] = (),
    node_public: Iterable[int] = (),
    key: str = "--certs",
) -> CertLayout:
    """Check that ``folder`` holds what a role needs; raise :class:`CertError` naming ``key`` if not.

    ``ca.pem`` is always required; ``server``: the SuperLink certificate and key; ``node_certs``: those
    SuperNodes' Runtime API certificates and keys; ``node_private`` / ``node_public``: their
    authentication private / public keys.
    """
    path = Path(folder)
    if not path.is_dir():
        raise CertError(
            key, f"certificate folder {path} does not exist (create it with `fedeq deploy certs`)"
        )
    layout = CertLayout(path)
    _check_cert(layout.ca_cert, key)
    required: list[Path] = []
    if server:
        _check_cert(layout.server_cert, key)
        required.append(layout.server_key)
    for i in node_certs:
        _check_cert(layout.node_cert(i), key)
        required.append(layout.node_cert_key(i))
    required += [layout.node_keys(i).private_key for i in node_private]
    required += [layout.node_keys(i).public_key for i in node_public]
    for p in required:
        if not p.is_file():
            raise CertError(key, f"missing file {p} (generate it with `fedeq deploy certs`)")
    return layout


def public_keys(folder: str | Path) -> dict[int, Path]:
    """SuperNode index → public key file, for every ``node-auth/supernode-<i>.pub`` in ``folder``."""
    out: dict[int, Path] = {}
    for p in (Path(folder) / "node-auth").glob("supernode-*.pub"):
        index = p.name[len("supernode-") : -len(".pub")]
        if index.isdigit():
            out[int(index)] = p
    return dict(sorted(out.items()))


def server_names(cert_path: str | Path) -> list[str]:
    """Host names and IP addresses a certificate is valid for (its subject alternative names)."""
    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [
        *san.get_values_for_type(x509.DNSName),
        *(str(ip) for ip in san.get_values_for_type(x509.IPAddress)),
    ]
