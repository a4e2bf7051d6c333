"""The collaborative LLM's device half (embeddings + layers [0, k)) from the tensor-parallel side's
int8 / int4 blocks: the same quantized weights serve both (issue 12).

    model = load_device_half("runs/ee_lm", k=2, scheme="int4", group_size=32)   # a split.llama Llama
    h = model.forward_layers(model.embed(tokens), 0, 2, 0)                      # (B, T, C) at layer k

The blocks are those of `edge-runtime tp prepare --world-size 1 --quantize SCHEME --group-size G`,
made once and cached (edge_runtime.tp.launch.cached_shards, DEFAULT_CACHE unless told otherwise).
The Llama is built on the meta device and each block of rank0/ is read into owned memory
(blockfile.read_block) and loaded with split.llama.quantize.load_quantized, so no float copy of a
projection is ever made: int8 weights stay the block's bytes, int4 ones are repacked into the
kernel's layout as they load. The small float tensors (norms, biases, scales) are copied out, so an
int4 block's buffer is freed once repacked. The embeddings are a StreamedEmbedding over
embed.safetensors's int8 rows: each call reads its tokens' rows and scales from the file and returns
them dequantized (float32, bitwise Int8().dequantize of those rows). The table so costs no memory,
where even int8 rows held resident would cost V * C bytes (an fp32 table 4x that), and decoding
reads one row of C bytes per token. The exit head is not here: CollabLlm loads it, float, as before.
"""
from __future__ import annotations

from pathlib import Path

import torch

from edge_runtime.tp.blockfile import block_path, read_block
from edge_runtime.tp.launch import DEFAULT_CACHE, cached_shards
from edge_runtime.tp.streamed_head import StreamedEmbedding, TensorFile
from split.llama import Llama, LlamaConfig
from split.llama.quantize import handler, load_quantized

SCHEMES = ("int8", "int4")


def load_device_half(model_dir, k: int, scheme: str, group_size: int = 32, cache_dir=None) -> Llama:
    """Embeddings + layers [0, k) of the HF folder `model_dir`, stored `scheme` ("int8" | "int4")."""
    if scheme not in SCHEMES:
        raise ValueError(f"quantize must be one of {SCHEMES} (or None for float weights), got {scheme!r}")
    shards = cached_shards(Path(model_dir), 1, None, Path(cache_dir or DEFAULT_CACHE), False, None,
                           handler(scheme, group_size))
    rank0 = shards / "rank0"
    config = LlamaConfig.from_dir(rank0)
    with torch.device("meta"):
        model = Llama(config, layers=range(0, k), with_embed=False, with_head=False)
    state = {}
    for i in range(k):
        for kind in ("attn", "mlp"):
            for key, t in read_block(block_path(rank0, (i, kind)), torch.float32)[0].items():
                state[f"layers.{i}.{key}"] = t.clone() if t.is_floating_point() else t
    load_quantized(model, state)
    embed = rank0 / "embed.safetensors"
    model.embed_tokens = StreamedEmbedding(TensorFile(embed, "embed_tokens.weight"), torch.float32,
                                           (config.vocab_size, config.hidden_size),
                                           TensorFile(embed, "embed_tokens.scales"))
    return model.eval().requires_grad_(False)
