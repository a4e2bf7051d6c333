"""Signed model versions and the agent's client certificate, for real: the `cloud-service keygen` /
`sign` commands, a real `cloud-service serve`, the device's ModelStore and `edge-runtime agent`
subprocesses.

    .venv/bin/python -m pytest -q tests/test_trust.py

A device that pins publisher keys ([trust] keys) installs only versions signed by one of them: a
version changed after signing, signed by another key, unsigned, or with a malformed signature is
refused before anything is downloaded, and the installed version keeps serving.
"""
import base64
import datetime
import ipaddress
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from edge_runtime.agent.config import AgentConfigError, load_agent_config
from edge_runtime.agent.model_store import ModelStore, ModelTrustError
from edge_runtime.client.fleet_client import FleetClient
from edge_runtime.client.oip_client import OipClient
from edgefold_proto import pb
from edgefold_proto.signing import SignatureError, key_id, sign, verify
from models import mlp_device_package, mlp_onnx, write
from server_process import AgentProcess, ServerProcess
from test_agent import X, agent_toml, reference_mlp, wait_ready

MLP = '[[pipeline]]\nname = "mlp"\nkind = "local"\nmodel = "mlp"\n'
DEVICE_PACKAGE = 'backend = "device"\n'       # the cloud hands the files out; tampering cannot break its serving


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cloud_service.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=60)


def keygen(path: Path) -> str:
    done = cli("keygen", "--out", path)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def sign_version(key: Path, version_dir: Path) -> tuple[str, str]:
    """`cloud-service sign`; returns the (key id, digest) it prints."""
    done = cli("sign", "--key", key, version_dir)
    assert done.returncode == 0, done.stderr
    words = done.stdout.split()
    return words[words.index("key_id") + 1], words[words.index("digest") + 1]


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys")
    return {"publisher": (folder / "publisher.pem", keygen(folder / "publisher.pem")),
            "other": (folder / "other.pem", keygen(folder / "other.pem"))}


@pytest.fixture
def repo(tmp_path):
    return mlp_device_package(tmp_path / "repo")


@pytest.fixture
def cloud(repo):
    proc = ServerProcess(repo)
    yield proc
    proc.kill()


def pinned_store(tmp_path: Path, keys) -> ModelStore:
    return ModelStore(tmp_path / "device", trusted_keys=[keys["publisher"][1]])


def nothing_downloaded(store: ModelStore, digest: str) -> bool:
    partial = store.root / ".partial" / f"mlp-{digest}"
    return not partial.exists() and not (store.root / "mlp" / digest).exists()


# --- keygen and sign ------------------------------------------------------------------------------
def test_keygen_writes_a_private_key_only_its_owner_reads_and_never_overwrites(tmp_path, keys):
    path, public = keys["publisher"]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert isinstance(key, ed25519.Ed25519PrivateKey) and key_id(key.public_key()) == public
    assert public.startswith("ed25519:") and len(base64.b64decode(public[8:])) == 32
    before = path.read_bytes()
    again = cli("keygen", "--out", path)
    assert again.returncode == 2 and "already exists" in again.stderr and path.read_bytes() == before


def test_sign_refuses_a_key_that_is_not_an_ed25519_private_key(tmp_path, repo):
    ec_key = tmp_path / "ec.pem"
    ec_key.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    done = cli("sign", "--key", ec_key, repo / "mlp" / "1")
    assert done.returncode == 2 and "--key" in done.stderr and "Ed25519" in done.stderr
    (tmp_path / "junk.pem").write_text("not a key\n")
    done = cli("sign", "--key", tmp_path / "junk.pem", repo / "mlp" / "1")
    assert done.returncode == 2 and "not a PEM private key" in done.stderr
    assert not (repo / "mlp" / "1.signature").exists()


def test_the_signature_binds_the_name_and_the_version():
    key = ed25519.Ed25519PrivateKey.generate()
    digest = "ab" * 32
    signature, signer = sign(key, "mlp", "2", digest)
    assert len(signature) == 64 and verify([signer], "mlp", "2", digest, signature, signer) == signer
    for name, version, other_digest in [("mlp", "3", digest), ("other", "2", digest), ("mlp", "2", "cd" * 32)]:
        with pytest.raises(SignatureError, match="does not verify"):   # replayed as a newer version, another model
            verify([signer], name, version, other_digest, signature, signer)
    with pytest.raises(SignatureError, match="unsigned"):
        verify([signer], "mlp", "2", digest, b"", "")
    with pytest.raises(SignatureError, match="not one of"):
        verify(["ed25519:" + base64.b64encode(bytes(32)).decode()], "mlp", "2", digest, signature, signer)
    with pytest.raises(SignatureError, match="63 bytes"):
        verify([signer], "mlp", "2", digest, signature[:63], signer)


# --- the device's store against a real cloud -------------------------------------------------------
def test_a_signed_version_installs_and_its_manifest_carries_the_signature(tmp_path, keys, repo, cloud):
    signer, digest = sign_version(keys["publisher"][0], repo / "mlp" / "1")
    assert signer == keys["publisher"][1]
    with FleetClient(cloud.address) as fleet:
        manifest = fleet.manifest("mlp")
        assert manifest.digest == digest and manifest.key_id == signer and len(manifest.signature) == 64
        model, changed = pinned_store(tmp_path, keys).pull(fleet, "mlp")
    assert changed and (model.version, model.digest) == ("1", digest)


@pytest.mark.parametrize("tampered", ["2/model.onnx", "config.toml"])
def test_a_version_changed_after_signing_is_refused_and_the_old_one_stays(tmp_path, keys, repo, cloud, tampered):
    store = pinned_store(tmp_path, keys)
    sign_version(keys["publisher"][0], repo / "mlp" / "1")
    with FleetClient(cloud.address) as fleet:
        store.pull(fleet, "mlp")
        mlp_onnx(repo / "mlp" / "2" / "model.onnx", seed=2)
        sign_version(keys["publisher"][0], repo / "mlp" / "2")
        path = repo / "mlp" / tampered                         # changed after signing:
        if tampered == "config.toml":
            path.write_text(DEVICE_PACKAGE + "# one more line\n")
        else:
            data = bytearray(path.read_bytes())
            data[-1] ^= 1                                      # one bit
            path.write_bytes(bytes(data))
        with pytest.raises(ModelTrustError, match="does not verify") as err:
            store.pull(fleet, "mlp")
        assert "version 2" in str(err.value)
        assert nothing_downloaded(store, fleet.manifest("mlp").digest)
    assert store.current("mlp").version == "1"


def test_a_version_signed_with_an_unpinned_key_is_refused(tmp_path, keys, repo, cloud):
    signer, _ = sign_version(keys["other"][0], repo / "mlp" / "1")
    with FleetClient(cloud.address) as fleet:
        with pytest.raises(ModelTrustError, match="not one of") as err:
            pinned_store(tmp_path, keys).pull(fleet, "mlp")
    assert signer[:20] in str(err.value)
    assert pinned_store(tmp_path, keys).current("mlp") is None


def test_an_unsigned_version_is_refused_while_keys_are_pinned_and_installed_without(tmp_path, keys, repo, cloud):
    with FleetClient(cloud.address) as fleet:
        with pytest.raises(ModelTrustError, match="unsigned"):
            pinned_store(tmp_path, keys).pull(fleet, "mlp")
        model, changed = ModelStore(tmp_path / "open-device").pull(fleet, "mlp")   # no keys: as before
    assert changed and model.version == "1"


@pytest.mark.parametrize("content, reason", [
    ("wrong-length", "63 bytes"),
    ("garbage", "unsigned"),                     # the cloud logs it and serves the version unsigned
    ("not-base64", "unsigned"),
])
def test_a_malformed_signature_is_refused_with_a_clear_reason(tmp_path, keys, repo, cloud, content, reason):
    signer, _ = sign_version(keys["publisher"][0], repo / "mlp" / "1")
    path = repo / "mlp" / "1.signature"
    entry = json.loads(path.read_text())
    if content == "wrong-length":
        entry["signature"] = base64.b64encode(base64.b64decode(entry["signature"])[:63]).decode()
        path.write_text(json.dumps(entry))
    elif content == "garbage":
        path.write_bytes(b"\x00\xffnot json at all")
    else:
        path.write_text(json.dumps({"key_id": signer, "signature": "%%%"}))
    with FleetClient(cloud.address) as fleet:
        with pytest.raises(ModelTrustError, match=reason):
            pinned_store(tmp_path, keys).pull(fleet, "mlp")
        assert fleet.manifest("mlp").version == "1"            # the cloud keeps answering


# --- the agent --------------------------------------------------------------------------------------
@pytest.mark.parametrize("keys_toml, index", [
    ('["nope"]', 0),
    ('["ed25519:%s", "ed25519:abc"]', 1),                                  # not base64 of 32 bytes
    ('["ed25519:%s", "ed25519:%s"]' % ("{good}", base64.b64encode(bytes(31)).decode()), 1),
    ('[5]', 0),
])
def test_trust_keys_in_the_wrong_format_stop_the_agent(tmp_path, keys, keys_toml, index):
    good = keys["publisher"][1][len("ed25519:"):]
    trust = "[trust]\nkeys = " + keys_toml.replace("%s", good, 1).replace("{good}", good) + "\n"
    config = agent_toml(tmp_path / "agent.toml", "127.0.0.1:1", trust + MLP)
    with pytest.raises(AgentConfigError) as err:
        load_agent_config(config)
    assert str(config) in str(err.value) and f"[trust] keys[{index}]" in str(err.value)
    done = subprocess.run([sys.executable, "-m", "edge_runtime.cli", "agent", "--config", str(config)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and f"[trust] keys[{index}]" in done.stderr, done.stderr


def test_an_empty_trust_list_and_half_a_client_certificate_are_config_errors(tmp_path):
    for body, field in [("[trust]\nkeys = []\n", "keys"), ("", "tls_key")]:
        extra = 'tls_ca = "ca.pem"\ntls_cert = "device.pem"\n' if field == "tls_key" else ""
        config = agent_toml(tmp_path / "agent.toml", "127.0.0.1:1", body + MLP, cloud_extra=extra)
        with pytest.raises(AgentConfigError, match=field):
            load_agent_config(config)
    config = agent_toml(tmp_path / "agent.toml", "127.0.0.1:1", MLP,
                        cloud_extra='tls_cert = "device.pem"\ntls_key = "device.key"\n')
    with pytest.raises(AgentConfigError, match="tls_ca"):
        load_agent_config(config)


def test_an_agent_that_pins_the_key_keeps_serving_when_a_tampered_version_appears(tmp_path, keys, repo, cloud):
    sign_version(keys["publisher"][0], repo / "mlp" / "1")
    trust = f'[trust]\nkeys = ["{keys["publisher"][1]}"]\n'
    config = agent_toml(tmp_path / "agent.toml", cloud.address, trust + MLP, heartbeat_s=0.2, update_s=0.5)
    v1, v2 = repo / "mlp" / "1" / "model.onnx", repo / "mlp" / "2" / "model.onnx"
    agent = AgentProcess(config)
    try:
        assert "signed by one of 1 [trust] keys" in agent.wait_for("trust:")
        with OipClient(agent.address) as client:
            wait_ready(client)
            np.testing.assert_array_equal(client.infer("mlp", {"x": X})["y"], reference_mlp(v1, X))
            staging = tmp_path / "staging" / "mlp"                 # signed here, so the agent never sees it
            write(staging / "config.toml", DEVICE_PACKAGE)
            mlp_onnx(staging / "2" / "model.onnx", seed=2)
            sign_version(keys["publisher"][0], staging / "2")
            (repo / "mlp" / "2.signature").write_bytes((staging / "2.signature").read_bytes())
            mlp_onnx(v2, seed=3)                                   # the cloud serves other files under it
            agent.wait_for("does not verify", timeout_s=60)
            np.testing.assert_array_equal(client.infer("mlp", {"x": X})["y"], reference_mlp(v1, X))
            assert list(client.call("ModelMetadata", pb.ModelMetadataRequest(name="mlp")).versions) == ["1"]
            current = json.loads((tmp_path / "state" / "models" / "mlp" / "CURRENT").read_text())
            assert current["version"] == "1"
            sign_version(keys["publisher"][0], repo / "mlp" / "2")  # the publisher signs what is there now
            agent.wait_for("ready from mlp v2", timeout_s=60)
            np.testing.assert_array_equal(client.infer("mlp", {"x": X})["y"], reference_mlp(v2, X))
    finally:
        assert agent.terminate() == 0, agent.output()


def test_an_agent_without_keys_says_it_installs_unsigned_versions(tmp_path, repo, cloud):
    agent = AgentProcess(agent_toml(tmp_path / "agent.toml", cloud.address, MLP))
    try:
        assert "unsigned included" in agent.wait_for("trust:")
        with OipClient(agent.address) as client:
            wait_ready(client)
    finally:
        assert agent.terminate() == 0, agent.output()


# --- the agent's client certificate ---------------------------------------------------------------
def _certificate(subject: str, key, issuer=None, issuer_key=None, ca: bool = False, server: bool = False):
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer.subject if issuer else name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


def write_pki(folder: Path, device_id: str) -> None:
    """ca.pem; server.pem / server.key (localhost, 127.0.0.1); device.pem / device.key (CN = device_id)."""
    def pem_key(key):
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("edgefold test CA", ca_key, ca=True)
    (folder / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for stem, subject, server in [("server", "localhost", True), ("device", device_id, False)]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _certificate(subject, key, ca, ca_key, server=server)
        (folder / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (folder / f"{stem}.key").write_bytes(pem_key(key))


def serve_takes_a_client_ca() -> bool:
    return "--tls-client-ca" in cli("serve", "--help").stdout


@pytest.mark.skipif(not serve_takes_a_client_ca(), reason="cloud-service serve has no --tls-client-ca yet")
def test_an_agent_with_a_client_certificate_and_no_token_pulls_and_heartbeats(tmp_path, repo):
    write_pki(tmp_path, "test-pi")
    cloud = ServerProcess(repo, "--tls-cert", tmp_path / "server.pem", "--tls-key", tmp_path / "server.key",
                          "--tls-client-ca", tmp_path / "ca.pem")
    extra = 'tls_ca = "ca.pem"\ntls_cert = "device.pem"\ntls_key = "device.key"\n'
    agent = AgentProcess(agent_toml(tmp_path / "agent.toml", cloud.address, MLP, cloud_extra=extra))
    try:
        with OipClient(agent.address) as client:
            wait_ready(client)                                  # the model was pulled over mutual TLS
            np.testing.assert_array_equal(client.infer("mlp", {"x": X})["y"],
                                          reference_mlp(repo / "mlp" / "1" / "model.onnx", X))
        agent.wait_for("cloud reachable", timeout_s=30)         # a heartbeat was accepted
        with FleetClient(cloud.address, root_certificates=(tmp_path / "ca.pem").read_bytes(), timeout_s=5) as bare:
            with pytest.raises(grpc.RpcError):                   # no client certificate: no connection
                bare.manifest("mlp")
    finally:
        assert agent.terminate() == 0, agent.output()
        cloud.kill()
