"""Model signatures: what a publisher signs and how a device checks it (both sides use this module).

    key = parse_public_key("ed25519:3q2+7w...")        # ValueError naming what is wrong
    message = signed_message("mlp", "3", digest)       # the bytes an Ed25519 key signs
    verify(["ed25519:3q2+7w..."], "mlp", "3", digest, signature, key_id)   # or SignatureError

A key id is the public key itself, written "ed25519:<base64 of the raw 32-byte key>", so the
id an agent pins in `[trust] keys` is all it needs to verify.

The signed message binds the model name and the version number as well as the manifest digest:

    b"edgefold-model-signature-v1\\0" + name + b"\\0" + version + b"\\0" + digest

A signature over the digest alone could be replayed: a compromised cloud could serve an old,
known-bad version under a new version number (devices take the highest), or serve one model's
signed files under another model's name. The prefix separates these signatures from anything
else the same key might ever sign. The digest covers every file (edgefold_proto.fleet.
manifest_digest over each path and sha256), and the device checks every file's sha256 on
download, so a verified signature covers every byte installed.

No torch, no grpc: the `cryptography` package only.
"""
import base64
import binascii

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

KEY_PREFIX = "ed25519:"
KEY_BYTES = 32
SIGNATURE_BYTES = 64
DOMAIN = b"edgefold-model-signature-v1\0"


class SignatureError(Exception):
    """A model version's signature is missing, from a key not trusted, or does not verify."""


def parse_public_key(text, what: str = "key") -> Ed25519PublicKey:
    """An "ed25519:<base64 of 32 raw bytes>" string as a public key; ValueError naming `what`."""
    if not isinstance(text, str):
        raise ValueError(f"{what}: expected a string \"{KEY_PREFIX}<base64 of the 32-byte public key>\", "
                         f"got {type(text).__name__}")
    if not text.startswith(KEY_PREFIX):
        raise ValueError(f"{what}: '{text[:80]}' must start with '{KEY_PREFIX}' (an Ed25519 public key as "
                         "`cloud-service keygen` prints it)")
    try:
        raw = base64.b64decode(text[len(KEY_PREFIX):], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{what}: '{text[:80]}' is not '{KEY_PREFIX}' followed by standard base64") from None
    if len(raw) != KEY_BYTES:
        raise ValueError(f"{what}: '{text[:80]}' holds {len(raw)} bytes, an Ed25519 public key has {KEY_BYTES}")
    return Ed25519PublicKey.from_public_bytes(raw)


def key_id(public_key: Ed25519PublicKey) -> str:
    """The "ed25519:<base64>" string of a public key (what agents pin, what a manifest names)."""
    raw = public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return KEY_PREFIX + base64.b64encode(raw).decode("ascii")


def signed_message(name: str, version: str, digest: str) -> bytes:
    """The bytes a publisher signs for `name` at `version` with manifest digest `digest`."""
    for field, value in (("name", name), ("version", version), ("digest", digest)):
        if "\0" in value:
            raise ValueError(f"{field} must not contain a NUL character")
    return DOMAIN + b"\0".join(v.encode("utf-8") for v in (name, version, digest))


def sign(private_key: Ed25519PrivateKey, name: str, version: str, digest: str) -> tuple[bytes, str]:
    """(64-byte signature, key id) of a model version."""
    return private_key.sign(signed_message(name, version, digest)), key_id(private_key.public_key())


def verify(trusted_keys, name: str, version: str, digest: str, signature: bytes, signer: str) -> str:
    """Check a manifest's signature against the pinned `trusted_keys` ("ed25519:..." strings);
    returns the key id that signed it, or raises SignatureError saying precisely why not."""
    what = f"model '{name}' version {version}"
    if not signature and not signer:
        raise SignatureError(f"{what} is unsigned, and this device installs only versions signed by a "
                             "[trust] key")
    try:
        public_key = parse_public_key(signer, "key_id")
    except ValueError as err:
        raise SignatureError(f"{what}: the manifest's {err}") from None
    trusted = {key_id(parse_public_key(k, "trusted key")) for k in trusted_keys}
    if key_id(public_key) not in trusted:
        raise SignatureError(f"{what} is signed by key '{signer[:80]}', which is not one of this device's "
                             f"{len(trusted)} [trust] keys")
    if len(signature) != SIGNATURE_BYTES:
        raise SignatureError(f"{what}: the signature has {len(signature)} bytes, an Ed25519 signature has "
                             f"{SIGNATURE_BYTES}")
    try:
        public_key.verify(bytes(signature), signed_message(name, version, digest))
    except (InvalidSignature, ValueError):
        raise SignatureError(f"{what}: the signature by '{signer[:80]}' does not verify over its name, version "
                             f"and digest {digest[:12]}...: the files were changed after signing, or the "
                             "signature belongs to another version") from None
    return signer


__all__ = ["KEY_PREFIX", "SIGNATURE_BYTES", "SignatureError", "parse_public_key", "key_id",
           "signed_message", "sign", "verify"]
