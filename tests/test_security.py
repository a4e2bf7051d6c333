"""Bearer-token auth, TLS and the message size limit, against real servers."""
import datetime
import ipaddress

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edge_runtime.client.oip_client import OipClient
from models import MLP_IN
from server_process import ServerProcess

TOKEN = "s3cret-token-for-tests"
X = np.ones((1, MLP_IN), np.float32)


@pytest.fixture(scope="module")
def auth_server(repository, tmp_path_factory):
    token_file = tmp_path_factory.mktemp("auth") / "token"
    token_file.write_text(TOKEN + "\n")
    proc = ServerProcess(repository, "--token-file", str(token_file))
    yield proc
    proc.kill()


@pytest.mark.parametrize("token", [None, "wrong", TOKEN[:-1], TOKEN + "x"])
def test_inference_needs_the_token(auth_server, token):
    with OipClient(auth_server.address, token=token) as client:
        with pytest.raises(grpc.RpcError) as err:
            client.infer("mlp", {"x": X})
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as err:
            list(client.stream(iter([])))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_right_token_works_and_health_stays_open(auth_server):
    with OipClient(auth_server.address, token=TOKEN) as client:
        assert client.infer("mlp", {"x": X})["y"].shape == (1, 4)
    headers = {"authorization": f"Bearer {TOKEN}"}
    with grpcclient.InferenceServerClient(auth_server.address) as triton:
        assert triton.is_server_live(headers=headers)
    with grpc.insecure_channel(auth_server.address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def _self_signed(directory):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .sign(key, hashes.SHA256()))
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    (directory / "cert.pem").write_bytes(cert_pem)
    (directory / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                          serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))
    return cert_pem


def test_tls(repository, tmp_path):
    cert_pem = _self_signed(tmp_path)
    proc = ServerProcess(repository, "--tls-cert", str(tmp_path / "cert.pem"), "--tls-key", str(tmp_path / "key.pem"))
    try:
        assert "grpcs://" in proc.output()
        with OipClient(proc.address, root_certificates=cert_pem) as client:
            assert client.infer("mlp", {"x": X})["y"].shape == (1, 4)
        with grpcclient.InferenceServerClient(proc.address, ssl=True, root_certificates=str(tmp_path / "cert.pem")) as c:
            assert c.is_server_live()
        with OipClient(proc.address, timeout_s=3) as plaintext:   # a plaintext client cannot talk to it
            with pytest.raises(grpc.RpcError) as err:
                plaintext.live()
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        proc.kill()


def test_message_size_limit(repository):
    proc = ServerProcess(repository, "--max-message-mb", "0.05")   # 52 KB
    try:
        with OipClient(proc.address) as client:
            big = np.ones((32, MLP_IN * 32), np.float32)            # 64 KB of raw input
            with pytest.raises(grpc.RpcError) as err:
                client.infer("mlp", {"x": big})
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert client.infer("mlp", {"x": X})["y"].shape == (1, 4)
    finally:
        proc.kill()
