"""Issue 13's benchmark: streaming through the agent's OpenAI-compatible endpoint against the same pipeline in-process.

    .venv/bin/python scripts/bench_llm_api.py --out docs/bench_llm_api.jsonl      # 46M and 336M, ~5 min
    .venv/bin/python scripts/bench_llm_api.py --quick                             # a tiny shape, a smoke test

Per shape: a random-initialised Llama checkpoint (transformers, saved under .cache/bench_llm/api/<shape>) with a
WordLevel tokenizer ("t0" .. "tN": one clean word per token, so every token is one streamed chunk) and a ChatML
chat template; an agent (`edge-runtime agent`, its own process, [serve] http_port) serving it as an `llm`
pipeline (fp32, all resident). The same greedy generation of --tokens tokens after a 16-token prompt runs
  * in-process: the same `llm` pipeline opened in this process (pipeline_factory.open_pipeline), iterating its
    TokenStream; a token's time is when the stream hands it out;
  * through the API: the official `openai` client streaming /v1/completions (the prompt as token ids,
    temperature 0, stream_options.include_usage); a token's time is when its chunk arrives;
  * and /v1/chat/completions (the template's prompt), reported beside them (its prompt differs).
The two are alternated --rounds times (the agent idles while this process computes, and the reverse).
Both produce the same token ids (checked: the API's text equals the pipeline's text for them).

One JSON object per row (stdout and --out): shape, path (in-process | completions | chat), ttft_ms (request
to first token, median over rounds), ms_per_token_p50 / _mean (the gaps between consecutive tokens, pooled
over rounds), tokens; and a target row per shape: added_ms_per_token_p50 = completions p50 - in-process p50,
limit 2.0 ms. The machine is a shared 2-core VM: ratios and medians from one run only.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_tp import SHAPES as TP_SHAPES  # scripts/ (this script runs by its path)
from llamacpp_build import SHAPES as PEER_SHAPES

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "bench_llm" / "api"
SHAPES = {"tiny": PEER_SHAPES["tiny"], "46M": TP_SHAPES["46M"], "336M": PEER_SHAPES["336M"]}  # LlamaConfig kwargs
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
EOS = 0  # "t0": the checkpoint's EOS id; prompts are picked so that greedy decoding does not meet it


def log(msg: str) -> None:
    print(f"[bench_llm_api] {msg}", file=sys.stderr, flush=True)


# --- the model folder -----------------------------------------------------------------------------
def model_folder(shape: str) -> Path:
    """A random Llama of `shape` with a WordLevel tokenizer and a ChatML template, written once."""
    path = CACHE / shape
    if (path / "tokenizer_config.json").is_file():
        return path
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    log(f"writing the {shape} checkpoint ...")
    kw = SHAPES[shape]
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(max_position_embeddings=2048, tie_word_embeddings=False, bos_token_id=1,
                                   eos_token_id=EOS, **kw)
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{shape}.", dir=CACHE))
    transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
    specials = ["<|im_start|>", "<|im_end|>", "system", "user", "assistant"]
    vocab = {f"t{i}": i for i in range(kw["vocab_size"] - len(specials))}
    vocab.update({s: len(vocab) + j for j, s in enumerate(specials)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.add_special_tokens(specials[:2])  # the template's markers split out of the text
    tok.save(str(tmp / "tokenizer.json"))
    (tmp / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML, "eos_token": "t0",
                                                            "bos_token": "t1"}))
    tmp.rename(path)
    return path


def prompt_ids(pipe, n_tokens: int) -> list[int]:
    """A 16-token prompt whose greedy continuation runs n_tokens without meeting the EOS id."""
    import random
    for seed in range(50):
        rng = random.Random(seed)
        ids = [rng.randrange(2, pipe.vocab_size - 8) for _ in range(16)]
        s = pipe.stream(ids, n_tokens)
        if len(list(s)) == n_tokens:
            return ids
    raise RuntimeError("no prompt of 50 tried runs to max_tokens without EOS")


# --- the agent ------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_agent(folder: Path, work: Path) -> tuple[subprocess.Popen, int]:
    """`edge-runtime agent` serving `folder` as the `llm` pipeline "bench" on a free HTTP port."""
    http = free_port()
    (work / "agent.toml").write_text(
        f'device_id = "bench"\nprofile = "raspberry-pi-4"\nstate_dir = "{work / "state"}"\n'
        f'[serve]\nhost = "127.0.0.1"\nport = 0\nhttp_port = {http}\n'
        f'[[pipeline]]\nname = "bench"\nkind = "llm"\npath = "{folder}"\ncache_dir = "{work / "shards"}"\n')
    proc = subprocess.Popen([sys.executable, "-m", "edge_runtime.cli", "agent", "--config", str(work / "agent.toml")],
                            cwd=ROOT, stdout=open(work / "agent.log", "w"), stderr=subprocess.STDOUT,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    return proc, http


def wait_for_model(client, deadline_s: float = 300.0) -> None:
    t_end = time.monotonic() + deadline_s
    while time.monotonic() < t_end:
        try:
            if any(m.id == "bench" for m in client.models.list().data):
                return
        except Exception:  # not listening yet
            pass
        time.sleep(0.5)
    raise TimeoutError("the agent did not list the pipeline 'bench' in time")


# --- one generation each way ----------------------------------------------------------------------
def in_process(pipe, ids: list[int], n: int) -> tuple[list[float], list[int]]:
    """Seconds from the request to each token, and the ids."""
    t0 = time.perf_counter()
    times, toks = [], []
    for tok in pipe.stream(ids, n):
        times.append(time.perf_counter() - t0)
        toks.append(tok)
    return times, toks


def through_api(client, ids: list[int], n: int, chat: bool) -> tuple[list[float], str, int]:
    """Seconds from the request to each chunk with text, the text, and the completion token count."""
    t0 = time.perf_counter()
    if chat:
        stream = client.chat.completions.create(
            model="bench", messages=[{"role": "user", "content": " ".join(f"t{i}" for i in ids)}],
            max_tokens=n, temperature=0, stream=True, stream_options={"include_usage": True})
    else:
        stream = client.completions.create(model="bench", prompt=ids, max_tokens=n, temperature=0, stream=True,
                                           stream_options={"include_usage": True})
    times, text, used = [], [], None
    for chunk in stream:
        if chunk.usage is not None:
            used = chunk.usage.completion_tokens
        if not chunk.choices:
            continue
        piece = chunk.choices[0].delta.content if chat else chunk.choices[0].text
        if piece:
            times.append(time.perf_counter() - t0)
            text.append(piece)
    return times, "".join(text), used


def summary(shape: str, path: str, runs: list[list[float]], tokens: int) -> dict:
    gaps = [b - a for t in runs for a, b in zip(t, t[1:])]
    return dict(bench="bench_llm_api", shape=shape, path=path, tokens=tokens, rounds=len(runs),
                ttft_ms=round(1e3 * statistics.median(t[0] for t in runs), 2),
                ms_per_token_p50=round(1e3 * statistics.median(gaps), 3),
                ms_per_token_mean=round(1e3 * statistics.fmean(gaps), 3))


def bench_shape(shape: str, n: int, rounds: int, emit) -> None:
    import openai

    from edge_runtime.agent.config import PipelineConfig
    from edge_runtime.agent.pipeline import Context
    from edge_runtime.agent.pipeline_factory import open_pipeline

    folder = model_folder(shape)
    with tempfile.TemporaryDirectory(prefix="bench_llm_api.") as tmp:
        work = Path(tmp)
        pipe = open_pipeline(PipelineConfig("bench", "llm", path=folder, options={"cache_dir": str(work / "shards")}),
                             folder, Context(None, None, None, None))
        proc, http = start_agent(folder, work)
        try:
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{http}/v1", api_key="none", timeout=120, max_retries=0)
            wait_for_model(client)
            ids = prompt_ids(pipe, n)
            want = pipe.decode(in_process(pipe, ids, n)[1])
            runs = {"in-process": [], "completions": [], "chat": []}
            for r in range(rounds + 1):  # round 0 warms both sides up
                local = in_process(pipe, ids, n)[0]
                api, text, used = through_api(client, ids, n, chat=False)
                chat = through_api(client, ids, n, chat=True)[0]
                if text.strip() != want.strip() or used != n:
                    raise RuntimeError(f"the API streamed {used} tokens {text[:80]!r}, the pipeline {want[:80]!r}")
                if r:
                    runs["in-process"].append(local)
                    runs["completions"].append(api)
                    runs["chat"].append(chat)
            rows = {k: emit(summary(shape, k, v, n)) for k, v in runs.items()}
            added = rows["completions"]["ms_per_token_p50"] - rows["in-process"]["ms_per_token_p50"]
            emit(dict(bench="target", shape=shape, name="ms/token added by the API at p50 (completions - in-process)",
                      measured=round(added, 3), limit=2.0, ok=added <= 2.0,
                      ttft_added_ms=round(rows["completions"]["ttft_ms"] - rows["in-process"]["ttft_ms"], 2)))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            pipe.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="46M,336M")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="the tiny shape, 16 tokens, 2 rounds")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench_llm_api.jsonl"))
    args = ap.parse_args()
    shapes, n, rounds = (["tiny"], 16, 2) if args.quick else (args.shapes.split(","), args.tokens, args.rounds)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as out:
        def emit(row: dict) -> dict:
            print(json.dumps(row), flush=True)
            out.write(json.dumps(row) + "\n")
            return row
        for shape in shapes:
            log(f"{shape}: {n} tokens, {rounds} rounds")
            bench_shape(shape, n, rounds, emit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
