"""The plain Llama-family model (Llama, Mistral, Qwen2) that runs any range of its layers."""

from .checkpoint import checkpoint_index, hf_name, load_llama
from .config import LlamaConfig
from .generate import generate_greedy
from .kv_cache import KVCache
from .model import MLP, Attention, DecoderLayer, Llama, RMSNorm, RotaryEmbedding, rope_inv_freq

__all__ = [
    "Attention", "DecoderLayer", "KVCache", "Llama", "LlamaConfig", "MLP", "RMSNorm", "RotaryEmbedding",
    "checkpoint_index", "generate_greedy", "hf_name", "load_llama", "rope_inv_freq",
]
