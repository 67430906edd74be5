"""Hugging Face transformers decoders built from configs (no download), one tiny
random-weight model per family: moec turns the KV cache off and takes the logits.

    pip install -e .[hf]
    moec compile examples/hf_models.py --experts 8 --topk 2 -o build/hf-llama
    moec compile examples/hf_models.py --config falcon --experts 8 --topk 2 -o build/hf-falcon

FAMILIES lists the --config names; every one compiles, verifies and trains
(tests/test_hf.py).
"""
import transformers

D, F, HEADS, LAYERS, VOCAB, CONTEXT = 128, 352, 4, 2, 256, 256
HEAD_DIM = D // HEADS
LLAMA_LIKE = dict(vocab_size=VOCAB, hidden_size=D, intermediate_size=F, num_hidden_layers=LAYERS,
                  num_attention_heads=HEADS, num_key_value_heads=2, max_position_embeddings=CONTEXT)

# family -> (config class name, keyword arguments)
FAMILIES = {
    "llama": ("LlamaConfig", LLAMA_LIKE),
    "mistral": ("MistralConfig", LLAMA_LIKE),
    "qwen2": ("Qwen2Config", LLAMA_LIKE),
    "qwen3": ("Qwen3Config", dict(LLAMA_LIKE, head_dim=HEAD_DIM)),
    "gemma": ("GemmaConfig", dict(LLAMA_LIKE, head_dim=HEAD_DIM)),
    "gemma2": ("Gemma2Config", dict(LLAMA_LIKE, head_dim=HEAD_DIM, sliding_window=64)),
    "gemma3": ("Gemma3TextConfig", dict(LLAMA_LIKE, head_dim=HEAD_DIM, sliding_window=64)),
    "phi": ("PhiConfig", dict(LLAMA_LIKE, num_key_value_heads=HEADS)),
    "phi3": ("Phi3Config", dict(LLAMA_LIKE, pad_token_id=0)),
    "stablelm": ("StableLmConfig", LLAMA_LIKE),
    "starcoder2": ("Starcoder2Config", LLAMA_LIKE),
    "olmo": ("OlmoConfig", dict(LLAMA_LIKE, pad_token_id=0)),
    "olmo2": ("Olmo2Config", dict(LLAMA_LIKE, pad_token_id=0)),
    "granite": ("GraniteConfig", LLAMA_LIKE),
    "cohere": ("CohereConfig", dict(LLAMA_LIKE, pad_token_id=0)),
    "nemotron": ("NemotronConfig", dict(LLAMA_LIKE, head_dim=HEAD_DIM)),  # squared-ReLU FFN
    "gpt2": ("GPT2Config", dict(vocab_size=VOCAB, n_embd=D, n_layer=LAYERS, n_head=HEADS, n_positions=CONTEXT)),
    "gptj": ("GPTJConfig", dict(vocab_size=VOCAB, n_embd=D, n_layer=LAYERS, n_head=HEADS, n_positions=CONTEXT,
                                rotary_dim=16)),
    "gpt_neox": ("GPTNeoXConfig", dict(LLAMA_LIKE, num_key_value_heads=None)),
    "opt": ("OPTConfig", dict(vocab_size=VOCAB, hidden_size=D, ffn_dim=F, num_hidden_layers=LAYERS,
                              num_attention_heads=HEADS, max_position_embeddings=CONTEXT, word_embed_proj_dim=D)),
    "bloom": ("BloomConfig", dict(vocab_size=VOCAB, hidden_size=D, n_layer=LAYERS, n_head=HEADS)),
    "falcon": ("FalconConfig", dict(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=LAYERS,
                                    num_attention_heads=HEADS, max_position_embeddings=CONTEXT)),
}


def build_model(config: str = "llama", **overrides):
    if config not in FAMILIES:
        raise ValueError(f"unknown config {config!r}; one of {', '.join(FAMILIES)}")
    cls, kwargs = FAMILIES[config]
    cfg = getattr(transformers, cls)(**{k: v for k, v in kwargs.items() if v is not None})
    for key, value in overrides.items():
        setattr(cfg, key, value)
    try:
        return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    except ValueError:  # a family without an SDPA path (BLOOM, Gemma2)
        return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
