"""Each model family (Mistral, Qwen2, Qwen3 besides Llama) against transformers: tiny random checkpoints
saved by transformers' own classes load with our logits within 1e-4 of transformers' (eager, fp32) and
identical greedy tokens, the family's switches set from config.json, and a ParallelComp run equal to
transformers' greedy decoding of the whole prompt."""

from __future__ import annotations

import pathlib

import pytest
import torch

from _cases import document
from _tiny_models import FAMILY_VARIANTS, save_tiny_family, transformers_model
from _tiny_pipeline import byte_tokenizer
from parallelcomp_triton import ParallelComp, ParallelCompConfig
from parallelcomp_triton.loading import load_transformer, read_safetensors
from test_model_vs_hf import assert_logits_close, greedy_hf, greedy_ours_teacher_forced

N_TOKENS = 128
N_NEW = 32

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    tokenizer = byte_tokenizer()
    root = tmp_path_factory.mktemp("families")
    return {name: save_tiny_family(root / name, family, seed=i, tokenizer=tokenizer, vocab_size=len(tokenizer), **kw)
            for i, (name, (family, kw)) in enumerate(FAMILY_VARIANTS.items())}


@pytest.mark.parametrize("variant", list(FAMILY_VARIANTS))
def test_family_logits_and_greedy_match_transformers(family_dirs, variant):
    model_dir = family_dirs[variant]
    family, _ = FAMILY_VARIANTS[variant]
    ours = load_transformer(model_dir)
    ref = transformers_model(model_dir)
    assert ours.args.model_type == family and type(ref).__name__.lower().startswith(family)
    assert ours.args.head_dim == ref.model.layers[0].self_attn.head_dim
    if ref.config.tie_word_embeddings:
        assert ours.lm_head.weight is ours.embed_tokens.weight

    ids = torch.randint(0, ours.args.vocab_size, (N_TOKENS,), generator=torch.Generator().manual_seed(99))
    with torch.no_grad():
        ref_logits = ref(ids[None]).logits[0]
    assert ref_logits.abs().max() > 1.0
    assert_logits_close(ours.logits(ids[None])[0], ref_logits)

    prompt = ids[:32]
    expected = greedy_hf(ref, prompt, N_NEW)
    assert greedy_ours_teacher_forced(ours, prompt, expected) == expected


def test_family_fields_and_checkpoint_keys(family_dirs):
    """The family switches are the few ModelArgs fields; parameter names are the checkpoint's keys."""
    expect = {"qwen2": (True, False, False), "qwen3": (False, False, True), "mistral": (False, False, False),
              "qwen3_gqa4_attention_bias": (True, True, True), "llama_attention_bias": (True, True, False)}
    for name, (qkv_bias, o_bias, qk_norm) in expect.items():
        model = load_transformer(family_dirs[name])
        a = model.args
        assert (a.qkv_bias, a.o_bias, a.qk_norm) == (qkv_bias, o_bias, qk_norm), name
        saved = {k.removeprefix("model.") for k in read_safetensors(family_dirs[name])}
        assert set(model.state_dict()) - {"lm_head.weight"} <= saved | {"lm_head.weight"}
        assert ("layers.1.self_attn.q_proj.bias" in saved) == qkv_bias
        assert ("layers.1.self_attn.k_norm.weight" in saved) == qk_norm
    assert load_transformer(family_dirs["qwen3"]).args.head_dim == 32


@pytest.mark.parametrize("variant", ["qwen2", "qwen3", "mistral"])
def test_parallelcomp_run_equals_transformers_greedy(family_dirs, variant):
    """One chunk, K = 1, every KV kept: the answer is greedy decoding of the whole prompt, here checked
    against transformers' own cached decoding. Then a run with several chunks, eviction and a KV budget."""
    pc = ParallelComp.from_pretrained(family_dirs[variant], dtype="float32")
    doc, question = document(40, seed=1), "Which word comes first?"
    cfg = ParallelCompConfig(keep_chunks=1, kv_budget=None, max_new_tokens=8, ignore_eos=True, template="chat")
    res = pc.generate(doc, question, config=cfg)
    assert len(res.stats.chunk_spans) == 1
    toks = pc.plan(doc, question, cfg).toks
    full = torch.tensor(toks.prefix + toks.document + toks.suffix)
    assert res.token_ids == greedy_hf(transformers_model(family_dirs[variant]), full, 8)

    cfg = ParallelCompConfig(chunk_tokens=40, keep_chunks=2, kv_budget=16, max_new_tokens=4, ignore_eos=True)
    res = pc.generate(document(120, seed=2), question, config=cfg)
    assert len(res.stats.chunk_spans) >= 3 and len(res.stats.kept_chunks) == 2
    assert len(res.token_ids) == 4


@pytest.fixture(scope="module")
def bundled_tokenizer(bundled_model_dir):
    from parallelcomp_triton.loading import load_tokenizer

    return load_tokenizer(bundled_model_dir)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2", "qwen3", "mistral"])
def test_family_with_the_bundled_tokenizer_matches_transformers(family, bundled_tokenizer, essays_dir, tmp_path):
    """A random checkpoint of each family made by transformers with the bundled tokenizer (its full 49,152-token
    vocabulary) beside it: loaded through ParallelComp, logits on real text within 1e-4 of transformers'."""
    path = save_tiny_family(tmp_path / family, family, tokenizer=bundled_tokenizer,
                            vocab_size=len(bundled_tokenizer))
    pc = ParallelComp.from_pretrained(path, dtype="float32")
    text = pathlib.Path(essays_dir, "addiction.txt").read_text()[:2000]
    ids = torch.tensor(pc.tokenizer(text)["input_ids"][:N_TOKENS])
    assert len(ids) == N_TOKENS and pc.args.vocab_size == len(bundled_tokenizer)
    with torch.no_grad():
        ref = transformers_model(path)(ids[None]).logits[0]
    assert_logits_close(pc.model.logits(ids[None])[0], ref)
