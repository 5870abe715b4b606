"""What a model's config.json and generation_config.json mean here: the sliding windows, model types and
architectures refused (only where they would change the model), the defaults of fields left out, a
transformers-4 config with an unused window, and the EOS ids decoding stops at."""

from __future__ import annotations

import json

import pytest
import torch

from _cases import document, raises_one_line
from _tiny_models import save_tiny_family, tiny_family_config, transformers_model
from _tiny_pipeline import byte_tokenizer
from parallelcomp_triton import ParallelComp, ParallelCompConfig
from parallelcomp_triton.loading import load_transformer
from parallelcomp_triton.model import ModelArgs
from test_model_vs_hf import assert_logits_close

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_with_tokenizer(path, family):
    tokenizer = byte_tokenizer()
    return save_tiny_family(path, family, tokenizer=tokenizer, vocab_size=len(tokenizer))


_DROP = object()  # an edit that removes the field


def _cfg(family, **edits) -> dict:
    """A config.json dict of the tiny `family` model with `edits` applied."""
    cfg = tiny_family_config(family).to_dict()
    cfg.update(edits)
    return {k: v for k, v in cfg.items() if v is not _DROP}


@pytest.mark.parametrize("family,edits,refused", [
    # Mistral: the window applies to every layer; at least max_position_embeddings it masks nothing.
    ("mistral", dict(sliding_window=32), "sliding_window=32"),
    ("mistral", dict(sliding_window=4095), "sliding_window=4095"),
    # Absent: MistralConfig's 4096 (Mistral 7B v0.1: 4096 of 32768).
    ("mistral", dict(sliding_window=_DROP, max_position_embeddings=32768), "sliding_window=4096"),
    ("mistral", dict(sliding_window=None), None),
    ("mistral", dict(sliding_window=4096), None),
    ("mistral", dict(sliding_window=131072), None),
    # Qwen: a sliding_window value counts only with use_sliding_window, for layers >= max_window_layers.
    ("qwen2", dict(use_sliding_window=False, sliding_window=32, layer_types=None), None),
    ("qwen2", dict(use_sliding_window=True, sliding_window=32, max_window_layers=0, layer_types=None),
     "sliding_window=32"),
    ("qwen2", dict(use_sliding_window=True, sliding_window=32, max_window_layers=1, layer_types=None),
     "sliding_window=32"),
    ("qwen2", dict(use_sliding_window=True, sliding_window=32, max_window_layers=2, layer_types=None), None),
    ("qwen3", dict(use_sliding_window=True, sliding_window=32, layer_types=["full_attention", "sliding_attention"]),
     "sliding_window=32"),
    ("qwen3", dict(use_sliding_window=True, sliding_window=32, layer_types=["full_attention"] * 2), None),
    ("qwen3", dict(use_sliding_window=False, sliding_window=32, layer_types=["sliding_attention"] * 2), None),
])
def test_sliding_window_refused_only_where_it_would_mask(family, edits, refused):
    cfg = _cfg(family, **edits)
    if refused is None:
        assert ModelArgs.from_hf_config(cfg).model_type == family
    else:
        raises_one_line(lambda: ModelArgs.from_hf_config(cfg), refused,
                        f"max_position_embeddings={cfg['max_position_embeddings']}", "not supported")


def test_small_sliding_window_checkpoint_is_refused(tmp_path):
    model_dir = save_tiny_family(tmp_path / "mistral_v01", "mistral", sliding_window=64)
    raises_one_line(lambda: load_transformer(model_dir), model_dir / "config.json", "sliding_window=64")


def test_transformers4_qwen2_config_with_unused_window_loads(tmp_path):
    """Qwen2/2.5 config.json written by transformers 4 keeps e.g. sliding_window 131072 or 32768 with
    use_sliding_window false: ignored by transformers, so here too (and the logits still match)."""
    model_dir = tiny_with_tokenizer(tmp_path / "qwen2_t4", "qwen2")
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg.update(use_sliding_window=False, sliding_window=16, max_window_layers=0)
    cfg.pop("layer_types")
    (model_dir / "config.json").write_text(json.dumps(cfg))
    ours, ref = load_transformer(model_dir), transformers_model(model_dir)
    ids = torch.randint(0, ours.args.vocab_size, (1, 64), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert_logits_close(ours.logits(ids)[0], ref(ids).logits[0])


def _model_type(model_type):
    return pytest.param("llama", dict(model_type=model_type, architectures=["SomethingForCausalLM"]),
                        ["x/config.json", repr(model_type), "llama, mistral, qwen2, qwen3"], id=f"type_{model_type}")


@pytest.mark.parametrize("family,edits,words", [
    *map(_model_type, ["gemma", "qwen2_moe", "mixtral", None]),
    pytest.param("qwen2", dict(architectures=["Qwen2ForSequenceClassification"]),
                 ["Qwen2ForSequenceClassification", "Qwen2ForCausalLM"], id="not_causal_lm"),
    pytest.param("llama", dict(mlp_bias=True), ["mlp_bias"], id="mlp_bias"),
])
def test_unsupported_config_is_one_line(family, edits, words):
    cfg = _cfg(family, **edits)
    raises_one_line(lambda: ModelArgs.from_hf_config(cfg, source="x/config.json"), *words)


def test_defaults_of_fields_config_json_leaves_out():
    """What transformers' config classes assume for a missing field (Qwen3Config: head_dim 128)."""
    assert ModelArgs.from_hf_config(_cfg("qwen3", head_dim=_DROP)).head_dim == 128
    assert ModelArgs.from_hf_config(_cfg("qwen2", head_dim=_DROP)).head_dim == 16
    args = ModelArgs.from_hf_config(_cfg("mistral", max_position_embeddings=_DROP, sliding_window=None))
    assert args.max_position_embeddings == 131072


def test_eos_ids_from_generation_config(tmp_path):
    """transformers stops on generation_config.json's eos_token_id; Qwen lists two there and one in
    config.json. Both files count: decoding stops at a token only generation_config.json names."""
    model_dir = tiny_with_tokenizer(tmp_path / "qwen3", "qwen3")
    gen_path = model_dir / "generation_config.json"
    doc, question = document(30, seed=4), "Which word comes first?"
    cfg = ParallelCompConfig(keep_chunks=1, kv_budget=None, max_new_tokens=6)

    gen_path.unlink()
    pc = ParallelComp.from_pretrained(model_dir, dtype="float32")
    assert pc.args.eos_token_ids == (2,)  # config.json's
    first = pc.generate(doc, question, config=cfg).token_ids
    assert len(first) == 6 and first[0] not in (2, 5)

    gen_path.write_text(json.dumps({"eos_token_id": [first[0], 5, 2], "bos_token_id": 1}))
    pc = ParallelComp.from_pretrained(model_dir, dtype="float32")
    assert pc.args.eos_token_ids == (2, first[0], 5)
    assert pc.generate(doc, question, config=cfg).token_ids == []  # stopped at once (EOS is stripped)

    gen_path.write_text(json.dumps({"eos_token_id": first[0]}))
    assert load_transformer(model_dir).args.eos_token_ids == (2, first[0])
    gen_path.write_text('{"eos_token_id": [1,')
    raises_one_line(lambda: load_transformer(model_dir), gen_path, "invalid JSON")
    gen_path.write_text(json.dumps({"eos_token_id": "</s>"}))
    raises_one_line(lambda: load_transformer(model_dir), gen_path, "eos_token_id")
