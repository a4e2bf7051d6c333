"""scripts/train_early_exit_lm.py on a tiny corpus: HF-format output with exit heads, and resume."""
import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--hidden", "32", "--layers", "3", "--heads", "2", "--kv-heads", "1", "--intermediate", "64",
        "--exits", "1,2", "--vocab-size", "300", "--context", "32", "--batch", "4", "--save-every", "5",
        "--threads", "1"]


def test_train_writes_hf_folder_with_exits_and_resumes(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"KING {i % 7}:\nWhat say you, lord {i}? I say thee nay.\n\n" for i in range(400)))
    out = tmp_path / "m"

    def train(steps):
        return subprocess.run([sys.executable, str(ROOT / "scripts" / "train_early_exit_lm.py"), "--data", str(corpus),
                               "--out", str(out), "--steps", str(steps), *TINY],
                              capture_output=True, text=True, timeout=120, check=True)

    train(5)
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 5
    second = train(10)
    assert "resumed from" in second.stdout and json.loads(second.stdout.strip().splitlines()[-1])["step"] == 10
    meta = json.loads((out / "exits.json").read_text())
    assert meta["exit_layers"] == [1, 2] and set(meta["val_loss"]) == {"final", "exit1", "exit2"}

    import transformers
    from split.llama import load_llama
    from split.llama.exits import load_exit_heads
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    x = torch.tensor([transformers.AutoTokenizer.from_pretrained(out).encode("KING 3:\nWhat say")])
    with torch.no_grad():
        assert torch.allclose(hf(x).logits, load_llama(out)(x), atol=1e-4)
    assert set(load_exit_heads(out)) == {1, 2}
