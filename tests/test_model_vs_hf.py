"""The project's Transformer, loaded by parallelcomp_triton.loading, against transformers'
LlamaForCausalLM reading the same directory: logits within 1e-4 and identical greedy tokens.

Covers the bundled SmolLM2-135M (real weights, real text) and tiny random Llamas saved by
transformers itself: GQA ratios 1/2/3/4/8, tied and untied heads, explicit head_dim, llama3 and
linear rope scaling (transformers-5 and legacy config styles), a sharded save, bf16-saved weights."""

from __future__ import annotations

import math
import pathlib

import pytest
import torch

from _tiny_models import TINY_VARIANTS, TINY_VOCAB, save_tiny_llama
from parallelcomp_triton.loading import load_model, load_transformer

LOGIT_ATOL = 1e-4
N_TOKENS = 512
N_NEW = 32
BUNDLED_PPL_TOKENS = 1024
# transformers' LlamaForCausalLM on the converted GGUF, first 1024 tokens of addiction.txt
# (shared/model-and-data.md).
BUNDLED_PPL = 25.68


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def hf_llama(model_dir, dtype=torch.float32):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(model_dir), dtype=dtype, attn_implementation="eager")
    return model.eval()


def greedy_ours(model, prompt: torch.Tensor, n_new: int) -> list[int]:
    """Naive greedy loop: recompute the whole sequence each step, take the last row's argmax."""
    ids = prompt.clone()
    for _ in range(n_new):
        next_id = model.logits(ids[None])[0, -1].argmax()
        ids = torch.cat([ids, next_id[None]])
    return ids[len(prompt):].tolist()


def greedy_ours_teacher_forced(model, prompt: torch.Tensor, expected: list[int]) -> list[int]:
    """What our greedy loop picks at each step, given the expected tokens so far, in one forward:
    causal logits at row t depend only on tokens <= t, so if these picks equal ``expected``, the
    naive loop above produces ``expected`` too (at 1/len(expected) of its cost)."""
    ids = torch.cat([prompt, torch.tensor(expected, dtype=prompt.dtype)])
    return model.logits(ids[None])[0, len(prompt) - 1 : -1].argmax(-1).tolist()


@torch.no_grad()
def greedy_hf(model, prompt: torch.Tensor, n_new: int) -> list[int]:
    """transformers' incremental decoding with its KV cache (an independent path from ours)."""
    out = model(prompt[None], use_cache=True)
    tokens = []
    for _ in range(n_new):
        next_id = out.logits[0, -1].argmax()
        tokens.append(int(next_id))
        out = model(next_id.view(1, 1), past_key_values=out.past_key_values, use_cache=True)
    return tokens


def assert_logits_close(ours: torch.Tensor, ref: torch.Tensor, atol: float = LOGIT_ATOL):
    assert ours.shape == ref.shape
    assert torch.isfinite(ours).all()
    diff = (ours.float() - ref.float()).abs().max().item()
    assert diff <= atol, f"max |ours - transformers| = {diff:.3g} > {atol}"
    return diff


# ------------------------------------------------------------------------------- tiny random Llamas


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_llamas")
    return {name: save_tiny_llama(root / name, seed=i, **kw) for i, (name, kw) in enumerate(TINY_VARIANTS.items())}


@pytest.mark.parametrize("variant", list(TINY_VARIANTS))
def test_tiny_logits_and_greedy_match_transformers(tiny_dirs, variant):
    model_dir = tiny_dirs[variant]
    ours = load_transformer(model_dir, dtype="float32")
    ref = hf_llama(model_dir)
    cfg = ref.config
    assert ours.args.num_kv_heads == cfg.num_key_value_heads
    assert ours.args.tie_word_embeddings == cfg.tie_word_embeddings
    if cfg.tie_word_embeddings:
        assert ours.lm_head.weight is ours.embed_tokens.weight

    gen = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, TINY_VOCAB, (N_TOKENS,), generator=gen)
    with torch.no_grad():
        ref_logits = ref(ids[None]).logits[0]
    assert ref_logits.abs().max() > 1.0  # logits O(1): the absolute tolerance is meaningful
    assert_logits_close(ours.logits(ids[None])[0], ref_logits)

    prompt = ids[:64]
    expected = greedy_hf(ref, prompt, N_NEW)
    assert greedy_ours_teacher_forced(ours, prompt, expected) == expected


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_out_rows_give_the_full_forwards_rows(tiny_dirs, dtype):
    """forward(..., out_rows=R) skips the last layer's projection and MLP for the other rows: the rows it
    returns must be the full forward's rows R, over packed sequences, in any order, and none at all."""
    model = load_transformer(tiny_dirs["gqa3_tied"], dtype=dtype)
    gen = torch.Generator().manual_seed(7)
    lens = [113, 1, 57]
    ids = torch.randint(0, TINY_VOCAB, (sum(lens),), generator=gen)
    pos = torch.cat([torch.arange(n) for n in lens])
    cu = torch.tensor([0, 113, 114, 171], dtype=torch.int32)
    attend = model.causal_attend(cu)
    with torch.no_grad():
        full = model(ids, pos, attend)
        for rows in ([112, 113, 170, 0], [5], []):
            index = torch.tensor(rows, dtype=torch.long)
            got = model(ids, pos, attend, out_rows=index)
            assert got.shape == (len(rows), model.args.hidden_size) and got.dtype == full.dtype
            # Same products; only the GEMM's row count differs, which may move the last bit.
            tol = 1e-5 if dtype == "float32" else 2e-2
            torch.testing.assert_close(got, full[index], rtol=tol, atol=tol)


def test_tiny_sharded_save_is_really_sharded(tiny_dirs):
    files = sorted(p.name for p in tiny_dirs["sharded"].iterdir())
    assert "model.safetensors.index.json" in files and "model.safetensors" not in files
    assert sum(name.endswith(".safetensors") for name in files) > 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_tiny_low_precision_load(tiny_dirs, dtype):
    """Loading in bf16/fp16: errors vs the fp32 transformers logits are within 2x (+ floor) of
    transformers' own errors in that dtype (flash-attention's rule)."""
    model_dir = tiny_dirs["gqa3_tied"]
    ours = load_transformer(model_dir, dtype=dtype)
    assert all(p.dtype == dtype for p in ours.parameters())
    ids = torch.randint(0, TINY_VOCAB, (1, 128), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref64 = hf_llama(model_dir, torch.float32).double()(ids).logits[0]
        ref_same = hf_llama(model_dir, dtype)(ids).logits[0].double()
    got = ours.logits(ids)[0].double()
    assert torch.isfinite(got).all()
    ours_err = (got - ref64).abs().max().item()
    hf_err = (ref_same - ref64).abs().max().item()
    assert ours_err <= 2 * hf_err + 1e-2, f"{dtype}: ours {ours_err:.3g} vs transformers {hf_err:.3g}"


# ------------------------------------------------------------------------------- bundled SmolLM2


@pytest.fixture(scope="module")
def bundled(bundled_model_dir):
    model, tokenizer = load_model(bundled_model_dir, dtype="float32")
    return model, tokenizer, hf_llama(bundled_model_dir)


@pytest.fixture(scope="module")
def essay_ids(bundled, essays_dir):
    _, tokenizer, _ = bundled
    text = pathlib.Path(essays_dir, "addiction.txt").read_text()
    ids = torch.tensor(tokenizer(text)["input_ids"][:BUNDLED_PPL_TOKENS])
    assert len(ids) == BUNDLED_PPL_TOKENS
    return ids


@pytest.fixture(scope="module")
def essay_logits(bundled, essay_ids):
    """Our logits on the first 1024 essay tokens and transformers' on the first 512, computed once
    (the first 512 rows of a causal 1024-token pass are the 512-token pass)."""
    model, _, ref = bundled
    with torch.no_grad():
        ref_logits = ref(essay_ids[None, :N_TOKENS]).logits[0]
    return model.logits(essay_ids[None])[0], ref_logits


def _perplexity(logits: torch.Tensor, ids: torch.Tensor) -> float:
    nll = torch.nn.functional.cross_entropy(logits[:-1], ids[1:])
    return math.exp(nll.item())


@pytest.mark.slow
def test_bundled_logits_match_transformers(essay_logits, essay_ids):
    ours, ref = essay_logits
    assert_logits_close(ours[:N_TOKENS], ref)
    ids = essay_ids[:N_TOKENS]
    assert _perplexity(ours[:N_TOKENS], ids) == pytest.approx(_perplexity(ref, ids), rel=1e-5)


@pytest.mark.slow
def test_bundled_perplexity_on_real_text(essay_logits, essay_ids):
    """The converted GGUF is a real trained model: its perplexity on the first essay tokens is the one
    transformers gives. A wrong Q/K un-permutation gives about 350, a wrong tokenizer hundreds."""
    ours, _ = essay_logits
    assert _perplexity(ours, essay_ids) == pytest.approx(BUNDLED_PPL, abs=0.02)


@pytest.mark.slow
def test_bundled_greedy_matches_transformers(bundled, essay_ids):
    model, tokenizer, ref = bundled
    prompt = essay_ids[:64]
    expected = greedy_hf(ref, prompt, N_NEW)
    assert greedy_ours_teacher_forced(model, prompt, expected) == expected, tokenizer.decode(expected)


@pytest.mark.slow
def test_bundled_completes_a_fact(bundled):
    """The literal greedy loop on the real model: a short completion everyone can check."""
    model, tokenizer, _ = bundled
    prompt = torch.tensor(tokenizer("The capital of France is")["input_ids"])
    assert tokenizer.decode(greedy_ours(model, prompt, 3)).startswith(" Paris")


@pytest.mark.slow
def test_bundled_bf16_logits_within_transformers_bf16_error(bundled_model_dir, essay_ids):
    """bf16 is the default precision on CPUs with native bf16: on the real model and real text, our bf16
    logits are within 2x (+ floor) of transformers' own bf16 error against float64."""
    ids = essay_ids[None, :256]
    ours = load_transformer(bundled_model_dir, dtype="bfloat16")
    with torch.no_grad():
        ref64 = hf_llama(bundled_model_dir, torch.float32).double()(ids).logits[0]
        ref_same = hf_llama(bundled_model_dir, torch.bfloat16)(ids).logits[0].double()
    got = ours.logits(ids)[0].double()
    assert torch.isfinite(got).all()
    ours_err = (got - ref64).abs().max().item()
    hf_err = (ref_same - ref64).abs().max().item()
    assert ours_err <= 2 * hf_err + 1e-2, f"ours {ours_err:.3g} vs transformers {hf_err:.3g}"
    # Same next-token choice almost everywhere (near-ties may flip in bf16).
    agree = (got.argmax(-1) == ref64.argmax(-1)).float().mean().item()
    assert agree >= 0.95, agree
