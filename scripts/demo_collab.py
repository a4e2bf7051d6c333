"""edgefold demo: collaborative LLM generation, device exit head + cloud continuation, on loopback.

    make demo            # or: .venv/bin/python scripts/demo_collab.py [--prompt "ROMEO:"]

Trains a small early-exit Llama on Shakespeare once (about 2 minutes on 2 cores; cached in
.cache/demo_collab/ee_lm, or pass --model runs/ee_lm for the full one), calibrates its exit
threshold so the tokens decided on the device agree with the full model's top-1 at least 95% of
the time (a perplexity target let this little model's exit decide everything: its last layers add
little perplexity-wise, yet disagree with the exit often), starts `cloud-service serve` with the
llm_continuation backend (layers [k, L)), the full model (cloud-only and speculative verification)
and the streaming model, then runs `edge-runtime generate` in standalone, collaborative,
speculative, cloud-stream, cloud-only and auto mode and prints, for each, who decided the tokens,
bytes sent, round trips, cloud work and ms/token.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "demo_collab"
BIN = Path(sys.executable)
CORPUS = ROOT.parent / "shared" / "data" / "shakespeare.txt"


def ensure_model(model: Path) -> None:
    if (model / "exits.json").is_file() and (model / "model.safetensors").is_file():
        return
    if not CORPUS.is_file():
        raise SystemExit(f"demo: corpus {CORPUS} not found (the project's shared/ folder sits beside the repository)")
    print(f"training a small early-exit LM into {model} (once) ...", flush=True)
    subprocess.run([str(BIN), str(ROOT / "scripts" / "train_early_exit_lm.py"), "--out", str(model),
                    "--hidden", "128", "--layers", "4", "--heads", "4", "--kv-heads", "2", "--intermediate", "344",
                    "--exits", "2", "--vocab-size", "1024", "--context", "64", "--batch", "16",
                    "--steps", "400", "--max-minutes", "2"], check=True)


def ensure_calibrated(model: Path) -> None:
    """Calibrate the exit threshold for 95% top-1 agreement with the full model on held-out text (once)."""
    meta = json.loads((model / "exits.json").read_text())
    if "min_agreement" in meta.get("threshold", {}).get("max_prob", {}).get("target", {}):
        return
    text = CORPUS.read_text(encoding="utf-8")
    val = model / "val.txt"
    val.write_text(text[int(len(text) * 0.95):][:20000], encoding="utf-8")
    subprocess.run([str(BIN), "-m", "edge_runtime.cli", "calibrate", "--model", str(model),
                    "--eval-text", str(val), "--min-agreement", "0.95", "--max-tokens", "4096"], check=True)


def summary(mode: str, r: dict) -> str:
    """One line: who decided the tokens, bytes, round trips, cloud work, ms/token."""
    n = max(len(r["tokens"]), 1)
    who = ", ".join(f"{r['sources'].count(s)} {s}" for s in ("edge", "draft", "cloud", "degraded") if s in r["sources"])
    c = r.get("counters") or r                     # cloud-stream reports its figures at the top level
    sent = c.get("request_bytes", c.get("bytes_sent", 0))
    chose = f" (chose {r['chose']})" if mode == "auto" else ""
    return (f"\n== {mode}{chose}: tokens decided by {who}; {sent / n:.0f} request bytes and "
            f"{c.get('round_trips', c.get('requests', 0))} round trips for {n} tokens; "
            f"{c.get('cloud_layer_evals', 0)} cloud layer-evaluations; {r['ms_per_token']:.1f} ms/token"
            f"{', DEGRADED' if r['degraded'] else ''}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=CACHE / "ee_lm")
    p.add_argument("--prompt", default="ROMEO:\n")
    p.add_argument("--max-new-tokens", type=int, default=32)
    args = p.parse_args()
    ensure_model(args.model)
    ensure_calibrated(args.model)
    meta = json.loads((args.model / "exits.json").read_text())
    k = max(meta["exit_layers"])
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp)
        for name, first, mode in (("llm", k, "exact"), ("llm_full", 0, "exact")):
            (repo / name / "1").mkdir(parents=True)
            (repo / name / "config.toml").write_text(
                f'backend = "llm_continuation"\n[sequence_batching]\n[parameters]\n'
                f'checkpoint = "{args.model.resolve()}"\nfirst_layer = {first}\ncatch_up = "{mode}"\n')
        (repo / "llm_stream" / "1").mkdir(parents=True)
        (repo / "llm_stream" / "config.toml").write_text(
            f'backend = "llm_stream"\n[model_transaction_policy]\ndecoupled = true\n[parameters]\n'
            f'checkpoint = "{args.model.resolve()}"\nintra_op_thread_count = 1\n')
        cloud = subprocess.Popen([str(BIN), "-m", "cloud_service.cli", "serve", "--repository", str(repo),
                                  "--host", "127.0.0.1", "--port", "0", "--log-level", "WARNING"],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 env={**os.environ, "PYTHONUNBUFFERED": "1"})
        port = []
        threading.Thread(target=lambda: [port.append(int(m.group(1))) for line in cloud.stdout
                                         if (m := re.search(r"serving grpcs?://[^:]+:(\d+)", line))],
                         daemon=True).start()
        try:
            t0 = time.monotonic()
            while not port:
                if cloud.poll() is not None or time.monotonic() - t0 > 90:
                    raise SystemExit("cloud-service did not start")
                time.sleep(0.05)
            for mode in ("standalone", "collaborative", "speculative", "cloud-stream", "cloud-only", "auto"):
                out = subprocess.run([str(BIN), "-m", "edge_runtime.cli", "generate", "--model", str(args.model),
                                      "--mode", mode, "--cloud", f"127.0.0.1:{port[0]}", "--prompt", args.prompt,
                                      "--max-new-tokens", str(args.max_new_tokens), "--json"],
                                     capture_output=True, text=True, check=True)
                print(summary(mode, json.loads(out.stdout)))
                print(args.prompt + json.loads(out.stdout)["text"])
        finally:
            cloud.terminate()
            cloud.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
