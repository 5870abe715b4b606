"""ParallelComp on the bundled SmolLM2-135M-Instruct: equivalence with transformers, torch vs Triton
(interpreter) agreement, and passkey retrieval beyond the trained 8K window."""
import pytest
import torch

from parallelcomp_triton import ParallelComp, ParallelCompConfig
from parallelcomp_triton.tasks import passkey_case

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pc(bundled_model_dir):
    # float32: the one-chunk case below must equal transformers' float32 greedy generate token for token.
    return ParallelComp.from_pretrained(bundled_model_dir, dtype="float32")


def test_one_chunk_no_eviction_equals_transformers_generate(pc, essays_dir):
    """A document that fits one chunk, K = 1, no KV eviction: the same tokens as transformers' greedy
    generate on the same prompt (prefix + document + question suffix, tokenized the same way)."""
    from transformers import AutoModelForCausalLM

    text = open(f"{essays_dir}/addiction.txt", encoding="utf-8").read()[:1500]
    question = "What is this text about?"
    cfg = ParallelCompConfig(template="chat", keep_chunks=1, kv_budget=None, max_new_tokens=24)
    res = pc.generate(text, question, config=cfg)
    assert len(res.stats.chunk_spans) == 1 and len(res.token_ids) > 3
    template = pc.tokenizer.apply_chat_template([{"role": "user", "content": "{context}\n\n{question}"}],
                                                tokenize=False, add_generation_prompt=True)
    head, tail = template.split("{context}")
    enc = lambda s: pc.tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    ids = enc(head) + enc(text) + enc(tail.replace("{question}", question))
    hf = AutoModelForCausalLM.from_pretrained(pc.source, dtype=torch.float32).eval()
    out = hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False,
                      eos_token_id=sorted(pc.eos_ids()), pad_token_id=pc.tokenizer.eos_token_id)
    expected = out[0, len(ids):].tolist()
    if expected and expected[-1] in pc.eos_ids():
        expected = expected[:-1]
    assert res.token_ids == expected


def test_torch_and_triton_backends_agree(pc):
    """Same kept chunks, same kept KV positions in every layer and head, same answer."""
    case = passkey_case(pc.tokenizer, 330, depth=0.4, seed=1)
    cfg = ParallelCompConfig(template="chat", chunk_tokens=90, keep_chunks=2, kv_budget=24, max_new_tokens=5)
    results = {}
    for backend in ("torch", "triton"):
        pc.model.backend = backend
        try:
            results[backend] = pc.generate(case.context, case.question, config=cfg)
        finally:
            pc.model.backend = "auto"
    a, b = results["torch"], results["triton"]
    assert len(a.stats.chunk_spans) >= 4
    assert a.stats.kept_chunks == b.stats.kept_chunks
    for chunk, layers in a.kept_positions.items():
        for layer, pos in enumerate(layers):
            assert torch.equal(pos, b.kept_positions[chunk][layer]), (chunk, layer)
    assert a.token_ids == b.token_ids
    assert a.stats.chunk_nll_all == pytest.approx(b.stats.chunk_nll_all, abs=1e-3)


def test_passkey_beyond_trained_window(pc):
    """About 10K tokens, past the model's 8K window: ParallelComp retrieves the pass key."""
    case = passkey_case(pc.tokenizer, 10_000, depth=0.6, seed=0)
    cfg = ParallelCompConfig(instruction=case.instruction, max_new_tokens=12)  # package defaults otherwise
    res = pc.generate(case.context, case.question, config=cfg)
    assert case.tokens > 9_000
    assert case.answer in res.text, res.text
    # Bounded memory: K kept chunk caches plus one batch at most, and the merged cache is compressed.
    assert res.stats.max_alive_chunk_caches <= cfg.keep_chunks + cfg.batch_chunks
    assert res.stats.kv_tokens_per_layer_after < res.stats.kv_tokens_per_layer_before / 2
