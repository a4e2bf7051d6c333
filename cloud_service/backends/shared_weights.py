"""One copy of a checkpoint's weights per process. The models of a repository that serve the same
checkpoint with the same layers share one loaded Llama: `llm_full` (cloud-only and speculative
verification), `llm_stream` and a token-id `llm_tok` hold every layer; `llm` and `llm_prop` hold
layers [k, L). A 1B checkpoint served five ways is then two copies in memory, not five.

    model = shared_llama(checkpoint, layers=range(4, 8), with_embed=False)

Inference never writes to the weights, and every session and stream keeps its own KV cache, so
several models' batchers may run one Llama at once. A checkpoint whose files changed (name, size
or modification time) loads anew; a copy is freed once no model holds it (weak references), so an
unloaded or replaced model gives its memory back.
"""
import threading
import weakref
from pathlib import Path

from split.llama import Llama, LlamaConfig, load_llama

_loaded: "weakref.WeakValueDictionary[tuple, Llama]" = weakref.WeakValueDictionary()
_lock = threading.Lock()


def _fingerprint(checkpoint: Path) -> tuple:
    files = [checkpoint] if checkpoint.is_file() else sorted(f for f in checkpoint.iterdir() if f.is_file())
    return tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files)


def shared_llama(checkpoint: str | Path, layers: range | None = None, with_embed: bool = True) -> Llama:
    """load_llama(checkpoint, layers, with_embed), or the copy another model of this process loaded."""
    path = Path(checkpoint).resolve()
    layers = layers if layers is not None else range(LlamaConfig.from_dir(path).num_hidden_layers)
    key = (str(path), layers.start, layers.stop, with_embed, _fingerprint(path))
    with _lock:   # one load at a time: a second model of the same checkpoint waits for the first's copy
        model = _loaded.get(key)
        if model is None:
            model = load_llama(path, layers=layers, with_embed=with_embed)
            _loaded[key] = model
        return model
