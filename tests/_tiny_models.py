"""Tiny random Llama checkpoints written by transformers' own ``save_pretrained``: the loader must read
exactly what transformers writes (tied/untied heads, GQA, rope scaling, shards, bf16 weights)."""

from __future__ import annotations

import copy
import json
import os
import pathlib

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

TINY_VOCAB = 256


def tiny_config(**overrides):
    """A 2-layer Llama config, hidden 64; ``overrides`` are LlamaConfig fields.

    initializer_range 0.2 (not 0.02) makes logits O(1): then a 1e-4 absolute tolerance means
    something and greedy decoding has clear winners instead of near-ties."""
    from transformers import LlamaConfig

    fields = dict(
        vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, initializer_range=0.2,
        bos_token_id=1, eos_token_id=2,
    )
    fields.update(overrides)
    return LlamaConfig(**fields)


def save_tiny_llama(path, *, seed: int = 0, save_dtype: torch.dtype = torch.float32,
                    max_shard_size: str | None = None, legacy_rope_config: bool = False, **config_overrides):
    """Save a random ``LlamaForCausalLM`` to ``path`` and return the directory.

    save_dtype: dtype of the saved tensors (bf16 checkpoints are common on the hub).
    max_shard_size: e.g. "100KB" to get ``model.safetensors.index.json`` plus shards.
    legacy_rope_config: rewrite config.json in the transformers-4 style (top-level ``rope_theta``
    and ``rope_scaling`` with "type") instead of transformers-5 ``rope_parameters``."""
    from transformers import LlamaForCausalLM

    path = pathlib.Path(path)
    torch.manual_seed(seed)
    # from_config / the constructor may rewrite the config object: never share one between models.
    model = LlamaForCausalLM(copy.deepcopy(tiny_config(**config_overrides)))
    model = model.to(save_dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    if legacy_rope_config:
        cfg_path = path / "config.json"
        cfg = json.loads(cfg_path.read_text())
        params = dict(cfg.pop("rope_parameters"))
        cfg["rope_theta"] = params.pop("rope_theta")
        rope_type = params.pop("rope_type", "default")
        cfg["rope_scaling"] = None if rope_type == "default" else {"type": rope_type, **params}
        cfg_path.write_text(json.dumps(cfg, indent=2))
    return path


# name -> save_tiny_llama keyword arguments; each stresses one loader/model feature.
TINY_VARIANTS = {
    "gqa2_untied": dict(num_attention_heads=4, num_key_value_heads=2),
    "gqa3_tied": dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True),
    "mha_head_dim32": dict(num_attention_heads=4, num_key_value_heads=4, head_dim=32),
    "gqa8_llama3_rope": dict(
        num_attention_heads=8, num_key_value_heads=1, head_dim=16, tie_word_embeddings=True,
        rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 128},
    ),
    "gqa4_linear_rope_legacy": dict(
        num_attention_heads=8, num_key_value_heads=2, head_dim=16, rope_theta=50000.0,
        rope_scaling={"rope_type": "linear", "factor": 4.0}, legacy_rope_config=True,
    ),
    # YaRN as Qwen2.5's model cards add it (factor 4 over the trained window), and dynamic NTK with a window
    # the 512-token test passes (its base then grows with the forward's length).
    "gqa2_yarn": dict(
        num_attention_heads=4, num_key_value_heads=2,
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128},
    ),
    "gqa2_dynamic_legacy": dict(
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rope_scaling={"rope_type": "dynamic", "factor": 2.0}, legacy_rope_config=True,
    ),
    "sharded": dict(num_attention_heads=4, num_key_value_heads=1, max_shard_size="100KB"),
    "bf16_saved": dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=3, save_dtype=torch.bfloat16),
}


# ------------------------------------------------------------------ other families (tests/test_families_*.py)

FAMILY_CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
}
# Per family, what makes the tiny model that family's: Mistral v0.2+ style (no sliding window), Qwen2 with
# its large rope theta, Qwen3 with head_dim 32 != hidden 64 / 4 heads.
FAMILY_DEFAULTS = {
    "llama": {},
    "mistral": dict(sliding_window=None),
    "qwen2": dict(rope_theta=1000000.0),
    "qwen3": dict(head_dim=32, rope_theta=1000000.0),
}


def tiny_family_config(family: str, **overrides):
    """A 2-layer config of `family` (hidden 64, vocab 256, initializer_range 0.2, as tiny_config)."""
    import transformers

    fields = dict(
        vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False, initializer_range=0.2,
        bos_token_id=1, eos_token_id=2,
    )
    fields.update(FAMILY_DEFAULTS[family])
    fields.update(overrides)
    return getattr(transformers, FAMILY_CLASSES[family][0])(**fields)


def save_tiny_family(path, family: str, *, seed: int = 0, tokenizer=None, **config_overrides):
    """Save a random `family` model (transformers' own class and save_pretrained) to `path`, with
    `tokenizer` beside it if given; returns the directory.

    transformers initialises biases to 0 and norm weights to 1; both are redrawn here, so that a
    dropped bias, a dropped or misplaced q/k norm, or a q_norm/k_norm swap changes the logits."""
    import transformers

    path = pathlib.Path(path)
    torch.manual_seed(seed)
    model = getattr(transformers, FAMILY_CLASSES[family][1])(tiny_family_config(family, **config_overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.5)
            elif name.endswith("norm.weight"):
                p.normal_(1.0, 0.2)
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


# name -> (family, save_tiny_family overrides): each stresses one family feature.
FAMILY_VARIANTS = {
    "qwen2": ("qwen2", {}),
    "qwen2_tied_mha": ("qwen2", dict(tie_word_embeddings=True, num_key_value_heads=4)),
    "qwen3": ("qwen3", {}),  # head_dim 32 != 64 / 4
    "qwen3_gqa4_attention_bias": ("qwen3", dict(num_key_value_heads=1, attention_bias=True)),
    "mistral": ("mistral", {}),  # sliding_window null, as Mistral v0.2+ / Nemo
    "mistral_window_covers_all": ("mistral", dict(sliding_window=4096, head_dim=32)),
    "llama_attention_bias": ("llama", dict(attention_bias=True)),
    # Qwen2.5's YaRN block (model cards: add it to config.json for 128K), over a small trained window.
    "qwen2_yarn": ("qwen2", dict(max_position_embeddings=256, rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64})),
}


def transformers_model(model_dir):
    """transformers' own model of any family read from `model_dir`: float32, eager attention."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32,
                                                attn_implementation="eager").eval()
