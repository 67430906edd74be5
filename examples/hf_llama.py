"""A Hugging Face transformers causal LM built from a config (no download):
moec turns the KV cache off and takes the logits.

    pip install -e .[hf]
    moec compile examples/hf_llama.py --experts 8 --topk 2 -o build/hf-llama
    moec compile examples/hf_llama.py --config gpt2 --experts 8 --topk 2 -o build/hf-gpt2
"""
import transformers

CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=352,
                                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                              max_position_embeddings=256),
    "qwen2": lambda: transformers.Qwen2Config(vocab_size=256, hidden_size=128, intermediate_size=352,
                                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                              max_position_embeddings=256),
    "mistral": lambda: transformers.MistralConfig(vocab_size=256, hidden_size=128, intermediate_size=352,
                                                  num_hidden_layers=2, num_attention_heads=4,
                                                  num_key_value_heads=2, max_position_embeddings=256),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=256, n_embd=128, n_layer=2, n_head=4, n_positions=256),
}


def build_model(config: str = "llama", **overrides):
    cfg = CONFIGS[config]()
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
