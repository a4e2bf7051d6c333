import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.append(str(ROOT / "scripts"))   # the scripts tests start for real: mlserver_venv, cloud_cluster, loadgen
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from models import build_repository  # noqa: E402
from server_process import ServerProcess  # noqa: E402


@pytest.fixture(scope="module")
def one_torch_thread():
    """For a module that declares `pytestmark = pytest.mark.usefixtures("one_torch_thread")`: torch on
    one thread. Its references are tiny, and a thread pool on a shared machine only spins (10x slower)."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def repository(tmp_path_factory) -> Path:
    return build_repository(tmp_path_factory.mktemp("repository"))


@pytest.fixture(scope="module")
def server(repository):
    """One cloud-service process per test module, on a free loopback port."""
    proc = ServerProcess(repository)
    yield proc
    proc.kill()


@pytest.fixture(scope="session")
def split_deployment(tmp_path_factory):
    """An untrained res_cnn with exits after stage1 and stage2 and a 4-channel bottleneck after stage2,
    deployed: (device dir, repository, net, bottleneck)."""
    from split_models import deploy_res_cnn
    return deploy_res_cnn(tmp_path_factory.mktemp("split"))


@pytest.fixture(scope="session")
def gguf_files(tmp_path_factory):
    """(arch, qtype name) -> (gguf path, written tensors): tests/gguf_files.py's FILES, built once."""
    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    from gguf_files import build_files
    return build_files(tmp_path_factory.mktemp("gguf"))
