"""Scoped credentials (issue 15): every RPC x every role against a real server, revocation on a
running server, --token-file as an operator, device identity over mTLS, and bad input."""
import datetime
import ipaddress
import json
import secrets
import sqlite3
import subprocess
import sys
import time
import urllib.request
from contextlib import closing

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cloud_service.config import ConfigError
from cloud_service.credentials import CredentialStore, Credentials, Unauthenticated
from cloud_service.state import StateStore, state_path
from edgefold_proto import BIDI_STREAMING, METHODS, UNARY, pb
from edgefold_proto.fleet import FLEET_METHODS, fleet_pb
from models import MLP_IN, mlp_onnx, write
from server_process import ServerProcess, free_port

OK, DENIED, UNAUTH = grpc.StatusCode.OK, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED
ALLOWED = {OK, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT}   # the handler answered
APP = {"ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer",
       "ModelStreamInfer", "ModelStatistics", "RepositoryIndex"}
DEVICE = APP | {"ModelManifest", "DownloadModelFile", "Heartbeat"}
OPERATOR = set(METHODS) | set(FLEET_METHODS)
DEVICE_ID = "pi-kitchen-1"
LEGACY = "legacy-token-file-secret"


def cli(*args, check_rc: int | None = 0) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "cloud_service.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=60)
    if check_rc is not None:
        assert done.returncode == check_rc, done.stdout + done.stderr
    return done


def token_add(repo, role, *extra) -> tuple[str, str]:
    reply = json.loads(cli("token", "add", "--repository", repo, "--role", role, *extra, "--json").stdout)
    assert set(reply) == {"id", "token"}
    return reply["id"], reply["token"]


def mlp_repository(root):
    mlp_onnx(root / "mlp" / "1" / "model.onnx")
    write(root / "mlp" / "config.toml", "max_batch_size = 8\n[parameters]\nintra_op_thread_count = 1\n")
    return root


def requests() -> dict:
    """A request per RPC that the handler answers with OK (or NOT_FOUND for the unknown model)."""
    x = np.ones((1, MLP_IN), np.float32)
    infer = pb.ModelInferRequest(model_name="mlp", raw_input_contents=[x.tobytes()])
    infer.inputs.add(name="x", datatype="FP32", shape=x.shape)
    return {
        "ServerLive": pb.ServerLiveRequest(), "ServerReady": pb.ServerReadyRequest(),
        "ModelReady": pb.ModelReadyRequest(name="mlp"), "ServerMetadata": pb.ServerMetadataRequest(),
        "ModelMetadata": pb.ModelMetadataRequest(name="mlp"), "ModelInfer": infer, "ModelStreamInfer": infer,
        "ModelStatistics": pb.ModelStatisticsRequest(name="mlp"), "RepositoryIndex": pb.RepositoryIndexRequest(),
        "RepositoryModelLoad": pb.RepositoryModelLoadRequest(model_name="no_such_model"),
        "RepositoryModelUnload": pb.RepositoryModelUnloadRequest(model_name="no_such_model"),
        "ModelManifest": fleet_pb.ModelManifestRequest(name="mlp"),
        "DownloadModelFile": fleet_pb.DownloadRequest(name="mlp", path="config.toml"),
        "Heartbeat": fleet_pb.HeartbeatRequest(device_id=DEVICE_ID),
        "ListDevices": fleet_pb.ListDevicesRequest(),
    }


def call(channel, name: str, request=None, authorization: str | None = None) -> grpc.StatusCode:
    """The status one RPC ends with, called by its path (every kind, the bidi stream included)."""
    m = METHODS.get(name) or FLEET_METHODS[name]
    request = request if request is not None else requests()[name]
    kwargs = dict(metadata=[("authorization", authorization)] if authorization else None, timeout=10)
    codec = dict(request_serializer=lambda msg: msg.SerializeToString(), response_deserializer=m.response.FromString)
    try:
        if m.kind == UNARY:
            channel.unary_unary(m.path, **codec)(request, **kwargs)
        elif m.kind == BIDI_STREAMING:
            replies = list(channel.stream_stream(m.path, **codec)(iter([request]), **kwargs))
            assert [r.error_message for r in replies] == [""], replies
        else:
            list(channel.unary_stream(m.path, **codec)(request, **kwargs))
    except grpc.RpcError as err:
        return err.code()
    return OK


def bearer(token: str) -> str:
    return f"Bearer {token}"


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    """A server whose repository has app, device, operator and revoked credentials, plus --token-file."""
    root = tmp_path_factory.mktemp("secured")
    repo = mlp_repository(root / "repo")
    tokens = {role: token_add(repo, role, *(["--device-id", DEVICE_ID] if role == "device" else []))[1]
              for role in ("app", "device", "operator")}
    revoked_id, tokens["revoked"] = token_add(repo, "operator", "--note", "to be revoked")
    cli("token", "revoke", "--repository", repo, revoked_id)
    (root / "token").write_text(LEGACY + "\n")
    metrics_port = free_port()
    proc = ServerProcess(repo, "--token-file", root / "token", "--metrics-port", str(metrics_port))
    proc.repo, proc.tokens, proc.metrics_port = repo, tokens, metrics_port
    yield proc
    proc.kill()


CASES = {  # credential -> (authorization value, RPCs it may call; every other one: the code it gets)
    "app": (None, APP, DENIED),
    "device": (None, DEVICE, DENIED),
    "operator": (None, OPERATOR, DENIED),
    "token-file": (bearer(LEGACY), OPERATOR, DENIED),
    "none": ("", set(), UNAUTH),
    "unknown": (bearer(f"{secrets.token_hex(6)}.{secrets.token_urlsafe(32)}"), set(), UNAUTH),
    "malformed": (bearer("not-a-token"), set(), UNAUTH),
    "wrong-scheme": ("Basic dXNlcjpwYXNz", set(), UNAUTH),
    "revoked": (None, set(), UNAUTH),
}


@pytest.mark.parametrize("credential", list(CASES))
def test_role_by_rpc_matrix(secured, credential):
    authorization, allowed, refused = CASES[credential]
    if authorization is None:
        authorization = bearer(secured.tokens[credential])
    wrong = {}
    with grpc.insecure_channel(secured.address) as channel:
        for name in sorted(OPERATOR):
            code = call(channel, name, authorization=authorization)
            if (code in ALLOWED) if name in allowed else (code == refused):
                continue
            wrong[name] = f"{code.name}, want {'allowed' if name in allowed else refused.name}"
    assert not wrong, f"{credential}: {wrong}"


def test_heartbeat_only_for_its_own_device(secured):
    other = fleet_pb.HeartbeatRequest(device_id="pi-garage-2")
    with grpc.insecure_channel(secured.address) as channel:
        assert call(channel, "Heartbeat", authorization=bearer(secured.tokens["device"])) == OK
        assert call(channel, "Heartbeat", other, bearer(secured.tokens["device"])) == DENIED
        assert call(channel, "Heartbeat", other, bearer(secured.tokens["operator"])) == OK
        assert call(channel, "Heartbeat", other, bearer(LEGACY)) == OK
        assert call(channel, "Heartbeat", authorization=bearer(secured.tokens["app"])) == DENIED


def test_messages_name_the_role_and_the_reason(secured):
    with grpc.insecure_channel(secured.address) as channel:
        unload = channel.unary_unary(METHODS["RepositoryModelUnload"].path,
                                     request_serializer=lambda m: m.SerializeToString())
        request = pb.RepositoryModelUnloadRequest(model_name="no_such_model")
        for authorization, code, fragment in [
                (bearer(secured.tokens["app"]), DENIED, "needs role 'operator'"),
                (None, UNAUTH, "authorization: Bearer"),
                (bearer(secured.tokens["revoked"]), UNAUTH, "revoked")]:
            with pytest.raises(grpc.RpcError) as err:
                unload(request, metadata=[("authorization", authorization)] if authorization else None, timeout=10)
            assert err.value.code() == code and fragment in err.value.details(), err.value.details()
            assert secured.tokens["revoked"] not in err.value.details()


def test_health_stays_open_and_denials_are_counted(secured):
    with grpc.insecure_channel(secured.address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert call(channel, "ServerLive") == UNAUTH
    text = urllib.request.urlopen(f"http://127.0.0.1:{secured.metrics_port}/metrics", timeout=10).read().decode()
    counted = [line for line in text.splitlines() if line.startswith('edgefold_auth_denied_total{code="UNAUTHENTICATED"}')]
    assert counted and float(counted[0].split()[-1]) >= 1, text[-2000:]


def test_tokens_are_stored_hashed(secured):
    listing = cli("token", "list", "--repository", secured.repo, "--json").stdout
    rows = [json.loads(line) for line in listing.splitlines()]
    assert {r["role"] for r in rows} == {"app", "device", "operator"} and sum(bool(r["revoked"]) for r in rows) == 1
    assert all(set(r) == {"id", "role", "device_id", "created", "revoked", "note"} for r in rows)
    stored = b"".join(p.read_bytes() for p in state_path(secured.repo).parent.iterdir() if p.is_file())
    for token in secured.tokens.values():
        assert token.split(".")[1].encode() not in stored and token.split(".")[1] not in listing


def wait_for(code, address, name, authorization, deadline_s=10.0) -> float:
    """Seconds until `name` called with `authorization` ends with `code` (polling; 10 s at most)."""
    start = time.monotonic()
    with grpc.insecure_channel(address) as channel:
        while True:
            got = call(channel, name, authorization=authorization)
            elapsed = time.monotonic() - start
            if got == code or elapsed > deadline_s:
                assert got == code, f"still {got.name} after {elapsed:.2f} s"
                return elapsed
            time.sleep(0.02)


def test_add_and_revoke_reach_a_running_server(secured):
    cid, token = token_add(secured.repo, "app", "--note", "added while serving")
    added = wait_for(OK, secured.address, "ServerLive", bearer(token))
    revoked_at = time.monotonic()
    assert "revoked" in cli("token", "revoke", "--repository", secured.repo, cid).stdout
    delay = wait_for(UNAUTH, secured.address, "ServerLive", bearer(token))   # asserts, naming the time taken
    print(f"added token seen after {added:.3f} s; revocation seen {delay:.3f} s after `token revoke` returned "
          f"({time.monotonic() - revoked_at:.3f} s including the command)")
    assert "already revoked" in cli("token", "revoke", "--repository", secured.repo, cid).stdout


def test_first_credential_closes_an_open_server(tmp_path):
    repo = mlp_repository(tmp_path / "repo")
    proc = ServerProcess(repo)
    try:
        with grpc.insecure_channel(proc.address) as channel:
            assert call(channel, "ServerLive") == OK          # no credentials at all: open, as before
        _, token = token_add(repo, "app")
        delay = wait_for(UNAUTH, proc.address, "ServerLive", None)
        with grpc.insecure_channel(proc.address) as channel:
            assert call(channel, "ServerLive", authorization=bearer(token)) == OK, f"closed after {delay:.2f} s"
    finally:
        proc.kill()


def test_credentials_in_process(tmp_path):
    state = StateStore(tmp_path)
    store = CredentialStore(state)
    open_ = Credentials(state)
    assert not open_.enforced
    cid, token = store.add("device", device_id=DEVICE_ID, note="kitchen")
    assert open_.poll() and open_.enforced
    caller = open_.authenticate(bearer(token))
    assert (caller.role, caller.device_id, caller.credential) == ("device", DEVICE_ID, cid)
    assert not open_.poll()                                   # nothing changed: nothing read
    for bad in (None, "", "Bearer", bearer(token[:-1]), bearer(token + "x"), bearer("0" * 12 + token[12:])):
        with pytest.raises(Unauthenticated):
            open_.authenticate(bad)
    store.revoke(cid)
    open_.poll()
    with pytest.raises(Unauthenticated, match="revoked"):
        open_.authenticate(bearer(token))
    assert Credentials(state, token=LEGACY).authenticate(bearer(LEGACY)).role == "operator"
    for role, device_id, field in (("root", None, "role"), ("device", None, "device_id"), ("app", DEVICE_ID, "device_id"),
                                   ("device", "../x", "device_id"), ("app", None, "note")):
        with pytest.raises(ValueError, match=field):
            store.add(role, device_id, note="x" * 1000 if field == "note" else "")
    with pytest.raises(ValueError, match="no such credential"):
        store.revoke("0123456789ab")
    _, token = store.add("app")
    assert open_.poll() and open_.authenticate(bearer(token)).role == "app"
    with closing(state.connect()) as db, db:         # the table gone under a running server: fail closed
        db.execute("DROP TABLE credentials")
    assert open_.poll() and open_.enforced
    with pytest.raises(Unauthenticated):
        open_.authenticate(bearer(token))


def test_open_server_warns_when_reachable_from_other_hosts(tmp_path):
    proc = ServerProcess(mlp_repository(tmp_path / "repo"), "--host", "0.0.0.0")
    try:
        assert "no credentials: anyone who reaches 0.0.0.0 may call every RPC" in proc.output()
    finally:
        proc.kill()


# --- mTLS: a client certificate names its device ------------------------------------------
def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_ca(name: str):
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


def issue(ca, common_name: str, server: bool = False) -> tuple[bytes, bytes]:
    """(key PEM, certificate PEM) for `common_name`, signed by `ca`."""
    ca_key, ca_cert = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
               .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1)))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return _key_pem(key), builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def mtls(tmp_path_factory):
    root = tmp_path_factory.mktemp("mtls")
    repo = mlp_repository(root / "repo")
    ca, other_ca = make_ca("edgefold test devices"), make_ca("someone else")
    server_key, server_cert = issue(ca, "localhost", server=True)
    ca_pem = ca[1].public_bytes(serialization.Encoding.PEM)
    for name, data in (("server.key", server_key), ("server.pem", server_cert), ("ca.pem", ca_pem)):
        (root / name).write_bytes(data)
    _, operator = token_add(repo, "operator")
    _, app = token_add(repo, "app")
    proc = ServerProcess(repo, "--tls-cert", root / "server.pem", "--tls-key", root / "server.key",
                         "--tls-client-ca", root / "ca.pem")
    proc.ca, proc.other_ca, proc.ca_pem, proc.operator, proc.app = ca, other_ca, ca_pem, operator, app
    proc.root = root
    yield proc
    proc.kill()


def tls_channel(server, client=None):
    key, cert = client if client else (None, None)
    return grpc.secure_channel(server.address, grpc.ssl_channel_credentials(server.ca_pem, key, cert))


def test_client_certificate_acts_as_its_device(mtls):
    other = fleet_pb.HeartbeatRequest(device_id="pi-garage-2")
    with tls_channel(mtls, issue(mtls.ca, DEVICE_ID)) as channel:
        assert call(channel, "Heartbeat") == OK
        assert call(channel, "ModelManifest") == OK
        assert call(channel, "ModelInfer") == OK
        assert call(channel, "Heartbeat", other) == DENIED
        assert call(channel, "RepositoryModelUnload") == DENIED
        assert call(channel, "ListDevices") == DENIED
        # an explicit token wins over the certificate: it may raise the role, or lower it, and a bad one is refused
        assert call(channel, "RepositoryModelUnload", authorization=bearer(mtls.operator)) in ALLOWED
        assert call(channel, "Heartbeat", authorization=bearer(mtls.app)) == DENIED
        assert call(channel, "Heartbeat", authorization=bearer("not-a-token")) == UNAUTH


def test_certificate_whose_name_is_not_a_device_id(mtls):
    with tls_channel(mtls, issue(mtls.ca, "not a device id!")) as channel:
        assert call(channel, "ServerLive") == UNAUTH
        assert call(channel, "ServerLive", authorization=bearer(mtls.app)) == OK


def test_certificate_from_another_ca_or_none_cannot_connect(mtls):
    # gRPC Python either requires a client certificate or never asks for one: with --tls-client-ca
    # every client presents one, so a token alone (no certificate) does not get through the handshake
    for client in (issue(mtls.other_ca, DEVICE_ID), None):
        with tls_channel(mtls, client) as channel:
            assert call(channel, "ServerLive", authorization=bearer(mtls.operator)) == grpc.StatusCode.UNAVAILABLE


def test_client_cert_port_keeps_the_main_port_for_tokens(mtls, tmp_path):
    """--client-cert-port: certificate holders on their own port, bearer tokens (no certificate) on --port."""
    root = mtls.root
    repo = mlp_repository(tmp_path / "repo")
    _, app = token_add(repo, "app")
    cert_port = free_port()
    proc = ServerProcess(repo, "--tls-cert", root / "server.pem", "--tls-key", root / "server.key",
                         "--tls-client-ca", root / "ca.pem", "--client-cert-port", str(cert_port))
    try:
        proc.ca, proc.ca_pem = mtls.ca, mtls.ca_pem
        with tls_channel(proc) as channel:                              # no certificate: the token port
            assert call(channel, "ServerLive", authorization=bearer(app)) == OK
            assert call(channel, "ServerLive") == UNAUTH
            assert call(channel, "Heartbeat", authorization=bearer(app)) == DENIED
        proc.address = f"127.0.0.1:{cert_port}"
        with tls_channel(proc, issue(mtls.ca, DEVICE_ID)) as channel:    # a device certificate: its port
            assert call(channel, "Heartbeat") == OK
            assert call(channel, "ListDevices") == DENIED
        with tls_channel(proc) as channel:                              # that port requires a certificate
            assert call(channel, "ServerLive", authorization=bearer(app)) == grpc.StatusCode.UNAVAILABLE
    finally:
        proc.kill()


# --- bad input -----------------------------------------------------------------------------
def serve_fails(repo, *flags) -> str:
    """`serve` must exit non-zero at once; returns what it printed."""
    done = cli("serve", "--repository", repo, "--host", "127.0.0.1", "--port", "0", *flags, check_rc=None)
    assert done.returncode != 0 and "serving" not in done.stdout, done.stdout + done.stderr
    return done.stdout + done.stderr


def test_damaged_state_database_stops_the_server(tmp_path):
    repo = mlp_repository(tmp_path / "garbage")
    state_path(repo).parent.mkdir()
    state_path(repo).write_bytes(b"this is not a database" * 100)
    assert str(state_path(repo)) in serve_fails(repo)
    repo = mlp_repository(tmp_path / "bad-row")
    StateStore(repo)
    with closing(sqlite3.connect(state_path(repo))) as db, db:
        db.execute("INSERT INTO credentials (id, role, device_id, secret_sha256, created) "
                   "VALUES ('0123456789ab', 'device', NULL, x'00', 0)")
    out = serve_fails(repo)
    assert str(state_path(repo)) in out and "0123456789ab" in out and "device_id" in out, out
    with pytest.raises(ConfigError, match="credentials"):
        Credentials(StateStore(repo))


def test_bad_tls_files_stop_the_server(tmp_path):
    repo = mlp_repository(tmp_path / "repo")
    ca = make_ca("ca")
    key, cert = issue(ca, "localhost", server=True)
    other_key, _ = issue(ca, "localhost", server=True)
    files = {"key.pem": key, "cert.pem": cert, "other.key": other_key, "junk.pem": b"not PEM at all\n",
             "ca.pem": ca[1].public_bytes(serialization.Encoding.PEM)}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    p = {name: str(tmp_path / name) for name in files}
    for flags, fragment in [
            (["--tls-cert", p["junk.pem"], "--tls-key", p["key.pem"]], f"--tls-cert {p['junk.pem']}"),
            (["--tls-cert", p["cert.pem"], "--tls-key", p["junk.pem"]], f"--tls-key {p['junk.pem']}"),
            (["--tls-cert", p["cert.pem"], "--tls-key", p["other.key"]], "is not the key of --tls-cert"),
            (["--tls-cert", p["cert.pem"], "--tls-key", p["key.pem"], "--tls-client-ca", p["junk.pem"]],
             f"--tls-client-ca {p['junk.pem']}"),
            (["--tls-client-ca", p["ca.pem"]], "--tls-client-ca needs --tls-cert")]:
        assert fragment in serve_fails(repo, *flags)


@pytest.mark.parametrize("args, fragment", [
    (["add", "--role", "device"], "--device-id"),
    (["add", "--role", "root"], "--role"),
    (["add", "--role", "device", "--device-id", "../etc"], "--device-id"),
    (["add", "--role", "app", "--device-id", "pi-1"], "--device-id"),
    (["add", "--role", "app", "--note", "x" * 500], "--note"),
    (["revoke", "0123456789ab"], "no such credential"),
    (["revoke", "not-an-id"], "12 hex"),
])
def test_token_command_errors(tmp_path, args, fragment):
    repo = mlp_repository(tmp_path / "repo")
    token_add(repo, "app")
    action, *rest = args
    done = cli("token", action, "--repository", repo, *rest, check_rc=2)
    assert fragment in done.stderr, done.stderr


def test_token_commands_need_the_repository(tmp_path):
    for args in (["add", "--role", "app"], ["list"], ["revoke", "0123456789ab"]):
        done = cli("token", args[0], "--repository", tmp_path / "missing", *args[1:], check_rc=2)
        assert "--repository" in done.stderr and "missing" in done.stderr
    done = cli("token", "list", "--repository", mlp_repository(tmp_path / "fresh"), check_rc=2)
    assert "state.sqlite3" in done.stderr             # never served, no credentials: says so
