"""The alternatives' modes (yarn, dynamic-ntk, self-extend, streaming) on tiny random models: inside the window
each is full attention, token for token; past it each does what its definition says, checked against an
independent computation (transformers' rope formulas, a naive float64 self-extend attention), and streaming
keeps its cache inside the window."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from _cases import raises_one_line
from _tiny_pipeline import tiny_pc
from parallelcomp_triton import ParallelCompConfig
from parallelcomp_triton.alternatives import ALTERNATIVE_MODES, ATTENTIONS, self_extend_group
from parallelcomp_triton.model import apply_rope, rope_inv_freq

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WINDOW = 96  # the tiny model's trained window: documents below go past it


@pytest.fixture(scope="module")
def pc():
    return tiny_pc(seed=3, window=WINDOW)


def document(n_chars: int, seed: int = 0) -> str:
    g = torch.Generator().manual_seed(seed)
    words = ["alpha", "beta", "gamma", "delta", "key", "is", "the", "sun", "sky"]
    return " ".join(words[int(i)] for i in torch.randint(0, len(words), (n_chars // 5,), generator=g))


def config(mode: str, **kw) -> ParallelCompConfig:
    return ParallelCompConfig(mode=mode, template="plain", max_new_tokens=6, ignore_eos=True, **kw)


@pytest.mark.parametrize("mode", ALTERNATIVE_MODES)
def test_inside_the_window_every_alternative_is_full_attention(pc, mode):
    """The question fits the window: no scaling, one group, nothing evicted; the answer is mode full's, token
    for token (the pipeline's own full attention: an independent path through chunk prefill and decoding)."""
    doc, question = document(40), "what is the key?"
    full = pc.generate(doc, question, config=config("full"))
    ours = pc.generate(doc, question, config=config(mode))
    assert full.stats.document_tokens + full.stats.question_tokens + 6 <= WINDOW
    assert ours.token_ids == full.token_ids
    assert ours.stats.mode == mode and ours.stats.kv_tokens_per_layer_before > 0


def _runner(pc, mode: str, capacity: int, **kw):
    return ATTENTIONS[mode](pc.model, config(mode, **kw), WINDOW, capacity)


@pytest.mark.parametrize("mode", ["yarn", "dynamic-ntk"])
def test_rope_modes_scale_as_transformers_does(pc, mode):
    """The frequencies past the window are transformers' own for a rope_scaling of factor capacity / window."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    capacity = 3 * WINDOW + 17
    runner = _runner(pc, mode, capacity)
    a = pc.model.args
    hf_type = {"yarn": "yarn", "dynamic-ntk": "dynamic"}[mode]
    scaling = {"rope_type": hf_type, "factor": capacity / WINDOW}
    if hf_type == "yarn":
        scaling["original_max_position_embeddings"] = WINDOW
    hf = LlamaConfig(hidden_size=a.num_heads * a.head_dim, num_attention_heads=a.num_heads, head_dim=a.head_dim,
                     max_position_embeddings=WINDOW, rope_theta=a.rope_theta, rope_scaling=scaling)
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS[hf_type](hf, "cpu", seq_len=capacity)
    torch.testing.assert_close(rope_inv_freq(runner.args), inv_freq, rtol=1e-5, atol=0)
    cos, _ = pc.model.rope(torch.zeros(1), torch.float32, runner.args)
    assert cos[0, 0].item() == pytest.approx(attention_factor, rel=1e-6)
    assert not torch.equal(rope_inv_freq(runner.args), rope_inv_freq(a))  # it did scale


def _naive_self_extend_logits(model, ids: torch.Tensor, near: int, group: int) -> torch.Tensor:
    """Last-row logits with self-extend attention computed pair by pair in float64: every (i, j) with
    i - j < near at positions (i, j), others at (i // G + near - near // G, j // G)."""
    n, d = ids.numel(), model.args.head_dim
    pos = torch.arange(n)
    i, j = pos[:, None], pos[None]
    use_near = (i - j) < near

    def rot(x, positions):
        cos, sin = model.rope(positions, torch.float64)
        return apply_rope(x.double(), cos, sin)

    def attend(layer, q, k, v):
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1).double()
        s_near = torch.einsum("ihd,jhd->hij", rot(q, pos), rot(k, pos))
        s_far = torch.einsum("ihd,jhd->hij", rot(q, pos // group + near - near // group), rot(k, pos // group))
        s = torch.where(use_near, s_near, s_far) / math.sqrt(d)
        s = s.masked_fill(j > i, float("-inf"))
        return torch.einsum("hij,jhd->ihd", s.softmax(-1), v).to(q.dtype)

    identity = (torch.ones(n, d), torch.zeros(n, d))
    hidden = model(ids, torch.zeros(n, dtype=torch.long), attend, out_rows=torch.tensor([n - 1]), rotary=identity)
    return model.lm_head_rows(hidden)


@pytest.mark.parametrize("near,group", [(16, None), (24, 4), (32, 5)])
def test_self_extend_matches_a_naive_pair_by_pair_attention(pc, near, group, monkeypatch):
    """Past the window, against the definition computed pair by pair in float64 (small query blocks, so the
    block edges are crossed many times)."""
    import parallelcomp_triton.alternatives as alternatives

    monkeypatch.setattr(alternatives, "QUERY_BLOCK", 37)
    ids = torch.randint(0, pc.model.args.vocab_size, (250,), generator=torch.Generator().manual_seed(1))
    runner = _runner(pc, "self-extend", 250 + 6, self_extend_window=near, self_extend_group=group)
    assert runner.group > 1
    with torch.no_grad():
        ours = runner.forward(ids)
        expected = _naive_self_extend_logits(pc.model, ids, near, runner.group)
        torch.testing.assert_close(ours, expected.float(), atol=2e-4, rtol=1e-4)
        # decoding steps: one query over both kinds of keys
        nxt = torch.tensor([5])
        torch.testing.assert_close(runner.forward(nxt), _naive_self_extend_logits(pc.model, torch.cat([ids, nxt]),
                                                                                  near, runner.group).float(),
                                   atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("masked", [False, True])
def test_attention_with_lse_on_a_cpu_equals_explicit_scores(monkeypatch, dtype, masked):
    """The CPU flash kernel path of `_attend_with_lse` against its explicit path (other devices) and the
    float64 definition: GQA, keys wider than values (self-extend's band), masked rows."""
    import parallelcomp_triton.alternatives as alternatives

    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(37, 6, 32, generator=g), torch.randn(50, 2, 32, generator=g)
    v = torch.randn(50, 2, 16, generator=g)
    mask = (torch.rand(37, 50, generator=g) > 0.4) | torch.eye(37, 50, dtype=torch.bool) if masked else None
    scores = torch.einsum("nhd,mhd->hnm", q.double(), k.double().repeat_interleave(3, dim=1)) * 0.2
    if masked:
        scores = scores.masked_fill(~mask, float("-inf"))
    want = torch.einsum("hnm,mhd->nhd", torch.softmax(scores, -1), v.double().repeat_interleave(3, dim=1))
    want_lse = torch.logsumexp(scores, -1).T
    out, lse = alternatives._attend_with_lse(q.to(dtype), k.to(dtype), v.to(dtype), mask, 0.2)
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.double(), want, **tol)
    torch.testing.assert_close(lse.double(), want_lse, **tol)
    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.Tensor, "device", property(lambda t: torch.device("meta") if t is q else cpu))
    explicit_out, explicit_lse = alternatives._attend_with_lse(q, k, v, mask, 0.2)  # float32: the other path
    monkeypatch.undo()
    torch.testing.assert_close(explicit_out.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(explicit_lse.double(), want_lse, atol=1e-5, rtol=1e-5)


def test_self_extend_group_keeps_every_position_in_the_window():
    cfg = config("self-extend", self_extend_window=1024)
    for capacity in (8192, 8193, 16000, 33000, 131072):
        g = self_extend_group(cfg, 8192, capacity)
        assert (capacity - 1) // g + 1024 - 1024 // g < 8192
        assert g == 1 or (capacity - 1) // (g - 1) + 1024 - 1024 // (g - 1) >= 8192  # the smallest that fits


def test_streaming_cache_stays_in_the_window_and_keeps_the_sinks(pc):
    ids = torch.randint(0, pc.model.args.vocab_size, (400,), generator=torch.Generator().manual_seed(2))
    runner = _runner(pc, "streaming", 400 + 6, sink_tokens=4, stream_step=16)
    with torch.no_grad():
        runner.forward(ids)
        assert runner.cached_tokens() <= WINDOW - 6 and runner.evicted == 400 - runner.cached_tokens()
        for _ in range(6):
            runner.forward(torch.tensor([7]))
        assert runner.cached_tokens() <= WINDOW
        # the sinks' raw keys are those of the prompt's first tokens: a fresh runner over them alone
        fresh = _runner(pc, "streaming", 10, sink_tokens=4, stream_step=16)
        fresh.forward(ids[:4])
        for layer in range(pc.model.args.num_layers):
            torch.testing.assert_close(runner.keys[layer][:4], fresh.keys[layer][:4])


def test_streaming_past_the_window_differs_from_full_attention(pc):
    doc, question = document(600, seed=4), "what is the key?"
    full = pc.generate(doc, question, config=config("full"))
    streaming = pc.generate(doc, question, config=config("streaming", stream_step=16))
    assert streaming.stats.kv_tokens_per_layer_after <= WINDOW < full.stats.kv_tokens_per_layer_after
    assert streaming.stats.kv_cache_bytes < full.stats.kv_cache_bytes


@pytest.mark.parametrize("cfg,names", [
    (dict(mode="self-extend", self_extend_group=0), ["self_extend_group"]),
    (dict(mode="self-extend", self_extend_window=0), ["self_extend_window"]),
    (dict(mode="streaming", sink_tokens=-1), ["sink_tokens"]),
    (dict(mode="streaming", stream_step=0), ["stream_step"]),
])
def test_bad_settings_are_one_line_errors(pc, cfg, names):
    raises_one_line(lambda: pc.generate("some text", "q?", config=ParallelCompConfig(**cfg)), *names)


@pytest.mark.parametrize("kw,names", [
    (dict(mode="self-extend", self_extend_window=WINDOW), ["self_extend_window", str(WINDOW)]),
    (dict(mode="self-extend", self_extend_window=16, self_extend_group=2), ["self_extend_group 2", "window"]),
    (dict(mode="streaming", stream_step=90), ["streaming", str(WINDOW)]),
])
def test_settings_that_cannot_fit_the_window_are_refused(pc, kw, names):
    mode = kw.pop("mode")
    raises_one_line(lambda: pc.generate(document(800), "q?", config=config(mode, **kw)), *names)


def test_rope_modes_refuse_a_checkpoint_that_scales_its_own(pc):
    model = pc.model
    scaled = dataclasses.replace(model.args, rope_scaling={"rope_type": "linear", "factor": 2.0})
    monkey = type(model).__new__(type(model))
    monkey.__dict__.update(model.__dict__)
    monkey.args = scaled
    raises_one_line(lambda: ATTENTIONS["yarn"](monkey, config("yarn"), WINDOW, 300), "linear", "mode yarn")


def test_several_documents_and_encodings_stay_parallelcomp_only(pc):
    raises_one_line(lambda: pc.generate(["a b", "c d"], "q?", config=config("streaming")), "streaming")


def test_stream_gives_the_answer_in_one_piece(pc):
    doc, question = document(300), "what is the key?"
    stream = pc.stream(doc, question, config=config("self-extend", self_extend_window=16))
    pieces = list(stream)
    assert "".join(pieces) == stream.result.text == pc.generate(doc, question, config=config(
        "self-extend", self_extend_window=16)).text


def test_distributed_refuses_the_alternatives(pc):
    from parallelcomp_triton.distributed import generate_distributed

    raises_one_line(lambda: generate_distributed(pc, None, [("some text", "q?")], config=config("yarn")),
                    "--distributed", "yarn")


def test_streaming_in_steps_within_the_window_equals_one_full_forward(pc):
    """Nothing evicted: reading the prompt 16 tokens per forward (each step's queries over the cache and
    themselves, masked) gives the logits of one causal forward over all of it, and so does each decode step."""
    ids = torch.randint(0, pc.model.args.vocab_size, (70,), generator=torch.Generator().manual_seed(5))
    stepped = _runner(pc, "streaming", 80, stream_step=16)
    whole = _runner(pc, "yarn", 80)  # no scaling inside the window: plain full attention
    with torch.no_grad():
        torch.testing.assert_close(stepped.forward(ids), whole.forward(ids), atol=1e-4, rtol=1e-4)
        for token in (3, 9):
            nxt = torch.tensor([token])
            torch.testing.assert_close(stepped.forward(nxt), whole.forward(nxt), atol=1e-4, rtol=1e-4)
    assert stepped.evicted == 0
