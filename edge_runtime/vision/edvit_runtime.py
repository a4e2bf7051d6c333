"""ED-ViT across peer devices (issue 16): the requesting device sends each frame to every peer
(an agent serving one class-wise sub-model on its Open Inference Protocol port), fuses the answers
that arrive within the deadline, and flags the frame `degraded` when a peer did not answer. No torch.

    runtime = EdvitRuntime("deploy/edvit/edvit", ["10.0.0.2:8011", "10.0.0.3:8011", "10.0.0.4:8011"])
    result = runtime.infer(frames)        # (B, 1, 64, 64) float32
    result.logits, result.label, result.present, result.degraded

Peers are asked in parallel, each call with the deadline; a peer that is down, late, or answers
something malformed (a wrong shape, NaN or Inf, no `logits`) counts as missing for that request,
with one log line saying which peer and why. The fusion (fusion.onnx, written by
split.vision.edvit_deploy) takes each sub-model's log-probabilities, zeros for a missing one, and
which peers answered.
"""
import json
import logging
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from edge_runtime.client.oip_client import OipClient
from edge_runtime.vision.deployment import session

log = logging.getLogger(__name__)
MANIFEST = "edvit.json"


@dataclass
class EdvitResult:
    logits: np.ndarray      # (B, classes) the fusion's
    label: np.ndarray       # (B,) int64
    present: np.ndarray     # (peers,) bool: which peers answered this request
    degraded: bool          # a peer did not answer


def log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


class EdvitRuntime:
    def __init__(self, folder: str | Path, peers: list[str], deadline_s: float = 0.5, threads: int = 1,
                 clients: list[OipClient] | None = None):
        folder = Path(folder)
        self.manifest = json.loads((folder / MANIFEST).read_text())
        self.subs = self.manifest["sub_models"]
        if len(peers) != len(self.subs):
            raise ValueError(f"{folder}: {len(self.subs)} sub-models ({', '.join(s['name'] for s in self.subs)}) "
                             f"need one peer each, got {len(peers)} peers")
        self.peers, self.deadline_s = list(peers), float(deadline_s)
        self.widths = [len(s["classes"]) + 1 for s in self.subs]
        self.fusion = session(folder / "fusion.onnx", threads)
        self.clients = clients or [OipClient(p, timeout_s=self.deadline_s) for p in self.peers]
        self.pool = ThreadPoolExecutor(max_workers=len(self.peers), thread_name_prefix="edvit-peer")

    def _ask(self, i: int, frames: np.ndarray) -> np.ndarray | None:
        """Peer i's (B, width) logits, or None (down, late or malformed: logged)."""
        sub, peer = self.subs[i], self.peers[i]
        try:
            out = self.clients[i].infer(sub["name"], {"x": frames}, timeout_s=self.deadline_s).get("logits")
        except grpc.RpcError as err:
            log.warning("edvit: peer %s (%s) did not answer: %s", i, peer, err)
            return None
        expected = (len(frames), self.widths[i])
        if out is None or out.shape != expected or out.dtype.kind != "f" or not np.isfinite(out).all():
            what = "no 'logits'" if out is None else f"logits {out.dtype} {list(out.shape)}" + (
                "" if out.dtype.kind != "f" or np.isfinite(out).all() else " holding NaN or Inf")
            log.warning("edvit: peer %s (%s) answered %s, expected float %s: treated as missing",
                        i, peer, what, list(expected))
            return None
        return out.astype(np.float32)

    def fuse(self, outputs: list[np.ndarray | None], batch: int) -> np.ndarray:
        """The fusion's (B, classes) logits over the peers' answers (None: missing)."""
        answers = [log_softmax(o) if o is not None else np.zeros((batch, w), np.float32)
                   for o, w in zip(outputs, self.widths)]
        present = np.array([[o is not None for o in outputs]] * batch, np.float32)   # (B, peers)
        return self.fusion.run(None, {"answers": np.concatenate(answers, 1).astype(np.float32),
                                      "present": present})[0]

    def infer(self, frames: np.ndarray) -> EdvitResult:
        frames = np.ascontiguousarray(frames, np.float32)
        futures = [self.pool.submit(self._ask, i, frames) for i in range(len(self.peers))]
        done, _ = wait(futures, timeout=self.deadline_s + 0.05)   # the calls' own deadlines end them
        outputs = [f.result() if f in done else None for f in futures]
        for i, f in enumerate(futures):
            if f not in done:
                log.warning("edvit: peer %s (%s) missed the %.3f s deadline", i, self.peers[i], self.deadline_s)
        logits = self.fuse(outputs, len(frames))
        present = np.array([o is not None for o in outputs])
        return EdvitResult(logits, logits.argmax(1).astype(np.int64), present, not present.all())

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        for client in self.clients:
            client.close()
