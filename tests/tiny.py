"""Tiny random models of every supported architecture, built from configs (no downloads)."""

from __future__ import annotations

import functools

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

_TEXT = [
    "The Eiffel Tower is located in the city of Paris.",
    "The capital of Japan is Tokyo. The capital of France is Paris. Rome is in Italy.",
    "The Space Needle is in the city of Seattle. Danielle Darrieux speaks French.",
    "Toko Yasuda plays the guitar. Autonomous University of Madrid is in Spain.",
    "a b c d e f g h i j k l m n o p q r s t u v w x y z 0 1 2 3 4 5 6 7 8 9 . , ; : ! ? ' \" ( ) { }",
]


@functools.lru_cache(maxsize=1)
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    tk = Tokenizer(models.BPE(unk_token=None))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(_TEXT * 5, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<pad>")


def _cfg(model_type: str, V: int):
    common = dict(vocab_size=V, bos_token_id=0, eos_token_id=0, pad_token_id=1)
    if model_type == "gpt2":
        return AutoConfig.for_model("gpt2", n_layer=4, n_embd=24, n_head=4, n_positions=128, **common)
    if model_type == "gptj":
        return AutoConfig.for_model("gptj", n_layer=4, n_embd=24, n_head=4, n_positions=128, rotary_dim=4, **common)
    if model_type == "gpt_neox":
        return AutoConfig.for_model("gpt_neox", num_hidden_layers=4, hidden_size=24, num_attention_heads=4,
                                    intermediate_size=48, max_position_embeddings=128, **common)
    extra = dict(num_hidden_layers=4, hidden_size=24, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=40, max_position_embeddings=128, **common)
    if model_type.startswith("gemma"):
        extra["head_dim"] = 8
    if model_type in ("gemma3_text",):
        extra["sliding_window"] = 16
    if model_type == "granite":  # the head divides by it: a value other than 1 is what the test must see
        extra["logits_scaling"] = 4.0
    if model_type == "cohere":
        extra["logit_scale"] = 0.5
    return AutoConfig.for_model(model_type, **extra)


#: every architecture factedit declares (core/arch.py ARCH_SPECS); test_arch.py checks the two stay in step
ARCHS = ["gpt2", "gptj", "gpt_neox", "llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3_text", "olmo",
         "olmo2", "phi3", "granite", "smollm3", "cohere"]


def tiny_model(model_type: str, seed: int = 0, dtype=torch.float32, **config):
    """A tiny random model of ``model_type`` (``config`` overrides fields, e.g. ``intermediate_size=64``)."""
    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    cfg = _cfg(model_type, len(tok))
    for k, v in config.items():
        setattr(cfg, k, v)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    # random init is tiny; scale up so that activations and updates are not all near zero
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0, 0.3)
    model.eval().requires_grad_(False)
    return model, tok
