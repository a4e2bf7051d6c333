"""The plain Llama-family model (Llama, Mistral, Qwen2, Qwen3, Phi-3; the differences in
families.py) that runs any range of its layers, and the one decode loop every generator in the
project uses (generate.py, sampling.py)."""

from .checkpoint import checkpoint_index, hf_name, load_llama, read_tensor
from .config import LlamaConfig
from .families import FAMILIES, SUPPORTED_MODEL_TYPES, Source, hf_source
from .generate import Generation, Stop, generate
from .kv_cache import KVCache
from .model import MLP, Attention, DecoderLayer, Llama, RMSNorm, RotaryEmbedding, rope_inv_freq
from .sampling import Sampling, sample

__all__ = [
    "Attention", "DecoderLayer", "FAMILIES", "Generation", "KVCache", "Llama", "LlamaConfig", "MLP",
    "RMSNorm", "RotaryEmbedding", "SUPPORTED_MODEL_TYPES", "Sampling", "Source", "Stop", "checkpoint_index",
    "generate", "hf_name", "hf_source", "load_llama", "read_tensor", "rope_inv_freq", "sample",
]
