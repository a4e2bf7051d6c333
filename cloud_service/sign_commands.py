"""`cloud-service keygen` and `cloud-service sign`: publisher keys and model signatures.

    cloud-service keygen --out publisher.pem         # prints "ed25519:..." for agents' [trust] keys
    cloud-service sign --key publisher.pem repo/mlp/3
        # writes repo/mlp/3.signature (cloud_service/signing.py); prints the key id and the digest

    sign_version(Path("repo/mlp/3"), load_private_key(Path("publisher.pem")))   # the same in Python

The private key is PEM (PKCS8, unencrypted), written with file mode 0600; keygen never
overwrites a file. Sign a version once its files are final: any change afterwards (a byte of
model.onnx, config.toml) makes agents that pin the key refuse it until it is signed again.
"""
import os
import sys
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from cloud_service.fleet import FileHashes, model_files
from cloud_service.signing import load_private_key, write_signature
from edgefold_proto.fleet import VERSION, manifest_digest
from edgefold_proto.signing import key_id, sign as sign_message



def version_digest(model_dir: Path, version: str) -> str:
    """The manifest digest of `version`, exactly what the Fleet service's ModelManifest answers
    (the same files, the same hashes: cloud_service.fleet)."""
    hashes = FileHashes()
    return manifest_digest((path, hashes.sha256(local)[1]) for path, local in model_files(model_dir, version).items())


def sign_version(version_dir: Path, private_key: Ed25519PrivateKey) -> tuple[bytes, str, str]:
    """Sign the model version in `version_dir` (<repository>/<model>/<version>): writes
    <model>/<version>.signature atomically. Returns (signature, key id, digest)."""
    version_dir = Path(os.path.abspath(version_dir))      # "3" or "mlp/3/": the model is the parent folder
    if not version_dir.is_dir():
        raise ValueError(f"MODEL_DIR/VERSION {version_dir}: not a folder")
    model_dir, version = version_dir.parent, version_dir.name
    if not VERSION.match(version):
        raise ValueError(f"MODEL_DIR/VERSION {version_dir}: '{version}' is not a numeric version folder")
    digest = version_digest(model_dir, version)
    signature, signer = sign_message(private_key, model_dir.name, version, digest)
    write_signature(model_dir, version, signature, signer)
    return signature, signer, digest


def keygen(args) -> int:
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    out = Path(args.out)
    try:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ValueError(f"--out {out}: already exists; keygen never overwrites a key") from None
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
        f.flush()
        os.fsync(f.fileno())
    print(f"private key: {out} (keep it secret; sign with `cloud-service sign --key {out} MODEL_DIR/VERSION`)",
          file=sys.stderr)
    print(key_id(key.public_key()))
    return 0


def sign(args) -> int:
    key = load_private_key(args.key)
    _, signer, digest = sign_version(args.version_dir, key)
    print(f"signed {args.version_dir}: key_id {signer} digest {digest}")
    return 0


def add_commands(commands) -> None:
    """Add this module's subcommands to the `cloud-service` parser."""
    p = commands.add_parser("keygen", help="create a publisher's Ed25519 signing key")
    p.add_argument("--out", type=Path, required=True, help="PEM file for the private key (not overwritten)")
    p.set_defaults(run=keygen)
    p = commands.add_parser("sign", help="sign a model version of the repository (MODEL_DIR/VERSION)")
    p.add_argument("--key", type=Path, required=True, help="the publisher's private key (cloud-service keygen)")
    p.add_argument("version_dir", type=Path, metavar="MODEL_DIR/VERSION", help="e.g. repo/mlp/3")
    p.set_defaults(run=sign)
