"""Tiny random Llama-family configs shared by the decoder and shared-prefix tests (no download): Qwen2
(q/k/v biases), Llama with grouped-query attention, Qwen3 (per-head q/k norms), Mistral with one
key/value head."""

from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

V = 23
COMMON = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, max_position_embeddings=64)
CONFIGS = {
    "qwen2": lambda: Qwen2Config(**COMMON, num_attention_heads=4, num_key_value_heads=4),
    "llama_gqa": lambda: LlamaConfig(**COMMON, num_attention_heads=4, num_key_value_heads=2),
    "qwen3": lambda: Qwen3Config(**COMMON, num_attention_heads=4, num_key_value_heads=2, head_dim=8),
    "mistral": lambda: MistralConfig(**COMMON, num_attention_heads=4, num_key_value_heads=1, sliding_window=None),
}
