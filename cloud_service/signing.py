"""Publisher signatures of model versions, stored beside the repository's version folders.

    key = load_private_key(Path("publisher.pem"))
    write_signature(Path("repo/mlp"), "3", signature, key_id)        # repo/mlp/3.signature
    read_signature(Path("repo/mlp"), "3")         # -> (64 signature bytes, "ed25519:...") or (b"", "")

Signing itself (the digest as the Fleet service serves it) is sign_commands.sign_version; it
lives there, not here, because cloud_service.fleet reads signatures through this module.

`<model>/<version>.signature` is JSON: {"key_id": "ed25519:<base64>", "signature": "<base64>"}.
It sits beside the version folder, not in it, so it is not one of the version's files and does
not change the digest it signs (the message: edgefold_proto.signing.signed_message).

A signature file that cannot be read or parsed is logged and the version is served unsigned:
an agent with pinned keys then refuses it, one without them installs it as before. The server
never fails a manifest over it.
"""
import base64
import binascii
import json
import logging
import os
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key


log = logging.getLogger(__name__)
MAX_SIGNATURE_FILE = 4096


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """An Ed25519 private key from a PEM file (`cloud-service keygen`); ValueError saying what is wrong."""
    data = Path(path).read_bytes()
    try:
        key = load_pem_private_key(data, password=None)
    except TypeError:
        raise ValueError(f"--key {path}: the key is encrypted; use an unencrypted PEM key "
                         "(`cloud-service keygen`)") from None
    except (ValueError, UnsupportedAlgorithm) as err:
        raise ValueError(f"--key {path}: not a PEM private key ({err})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"--key {path}: a {type(key).__name__.lstrip('_')}, expected an Ed25519 private key "
                         "(`cloud-service keygen`)")
    return key


def signature_path(model_dir: Path, version: str) -> Path:
    return Path(model_dir) / f"{version}.signature"


def write_signature(model_dir: Path, version: str, signature: bytes, key_id: str) -> Path:
    """Write <model>/<version>.signature atomically (temp file, fsync, os.replace); returns its path."""
    target = signature_path(model_dir, version)
    tmp = target.with_name(f".{target.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"key_id": key_id, "signature": base64.b64encode(signature).decode("ascii")}, f)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)
    return target


def read_signature(model_dir: Path, version: str) -> tuple[bytes, str]:
    """(signature, key id) of a version, or (b"", "") when it is unsigned or its file is unusable
    (logged). The signature is not checked here: devices do that against their own keys."""
    path = signature_path(model_dir, version)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SIGNATURE_FILE + 1)
    except FileNotFoundError:
        return b"", ""
    except OSError as err:
        log.warning("%s: cannot read (%s); version %s is served unsigned", path, err, version)
        return b"", ""
    try:
        if len(data) > MAX_SIGNATURE_FILE:
            raise ValueError(f"over {MAX_SIGNATURE_FILE} bytes")
        entry = json.loads(data)
        key_id, text = entry["key_id"], entry["signature"]
        if not isinstance(key_id, str) or not isinstance(text, str):
            raise ValueError("'key_id' and 'signature' must be strings")
        if len(key_id) > 128:
            raise ValueError(f"'key_id' has {len(key_id)} characters, at most 128")
        key_id.encode("utf-8")               # a lone surrogate from JSON could not go on the wire
        return base64.b64decode(text, validate=True), key_id
    except (ValueError, KeyError, TypeError, binascii.Error) as err:
        log.warning("%s: not a signature file (%s: %s); version %s is served unsigned", path,
                    type(err).__name__, err, version)
        return b"", ""
