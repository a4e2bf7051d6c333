"""The plain Llama-family model (Llama, Mistral, Qwen2) that runs any range of its layers, and the
one decode loop every generator in the project uses (generate.py, sampling.py)."""

from .checkpoint import checkpoint_index, hf_name, load_llama
from .config import LlamaConfig
from .generate import Generation, Stop, generate
from .kv_cache import KVCache
from .model import MLP, Attention, DecoderLayer, Llama, RMSNorm, RotaryEmbedding, rope_inv_freq
from .sampling import Sampling, sample

__all__ = [
    "Attention", "DecoderLayer", "Generation", "KVCache", "Llama", "LlamaConfig", "MLP", "RMSNorm",
    "RotaryEmbedding", "Sampling", "Stop", "checkpoint_index", "generate", "hf_name", "load_llama",
    "rope_inv_freq", "sample",
]
