"""A tiny random early-exit Llama (4 layers, exit head after layer 2) and its cloud repository
entries, for the collaborative-LLM and agent tests."""
import torch

from split.llama.exits import ExitHead, save_exit_heads

K, L = 2, 4


def make_model(path):
    import transformers
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=L, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=97, max_position_embeddings=256,
                                   initializer_range=0.2)
    transformers.LlamaForCausalLM(cfg).eval().save_pretrained(path, safe_serialization=True)
    from split.llama import LlamaConfig
    head = ExitHead(LlamaConfig.from_dir(path))
    with torch.no_grad():
        head.proj.weight.normal_(0, 0.3)
    save_exit_heads(path, {K: head})


def write_model(repo, name, model_dir, first_layer, catch_up="exact", max_state_bytes=64 << 20, extra=""):
    d = repo / name
    (d / "1").mkdir(parents=True)
    (d / "config.toml").write_text(
        f'backend = "llm_continuation"\n[sequence_batching]\nmax_sequence_idle_microseconds = 600000000\n'
        f'max_state_bytes = {max_state_bytes}\n[parameters]\ncheckpoint = "{model_dir}"\n'
        f'first_layer = {first_layer}\ncatch_up = "{catch_up}"\ntop_k = 3\n{extra}')
