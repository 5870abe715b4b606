"""One question over several documents: their chunks are ranked together by the question's NLL and the best
K kept whichever document they come from; texts, encodings and a mix answer alike."""
import dataclasses
import json

import pytest

from _cases import DOCUMENTS, SETTINGS, cli_args, raises_one_line
from _tiny_pipeline import tiny_pc

from parallelcomp_triton.score import keep_best

QUESTION = "Which word comes first?"
DOCS = [DOCUMENTS["d260"], DOCUMENTS["d400"], DOCUMENTS["d90"]]


@pytest.fixture(scope="module")
def pc():
    return tiny_pc()


@pytest.mark.parametrize("name", ["budget_chat_k2_b3", "no_budget_k3_b1", "calibration_k2_b3"])
def test_texts_encodings_and_a_mix_answer_alike(pc, name):
    cfg = SETTINGS[name]
    fresh = pc.generate(DOCS, QUESTION, config=cfg)
    encoded = [pc.encode(doc, cfg) for doc in DOCS]
    for context in (encoded, [encoded[0], DOCS[1], encoded[2]]):
        got = pc.generate(context, QUESTION, config=cfg)
        assert got.token_ids == fresh.token_ids and got.stats.kept_chunks == fresh.stats.kept_chunks
        assert got.stats.chunk_nll_all == pytest.approx(fresh.stats.chunk_nll_all, abs=1e-4)
    assert "".join(pc.stream(encoded, QUESTION, config=cfg)) == fresh.text
    kept = fresh.stats.kept_chunks
    assert pc.generate_from_chunks(encoded, QUESTION, kept, config=cfg).token_ids == fresh.token_ids


def test_one_ranking_over_every_documents_chunks(pc):
    cfg = SETTINGS["budget_chat_k2_b3"]
    res = pc.generate(DOCS, QUESTION, config=cfg)
    st = res.stats
    alone = [pc.generate(doc, QUESTION, config=cfg).stats for doc in DOCS]
    # Chunks: each document's own, one after another, spans shifted past the documents before it.
    assert st.chunk_documents == [i for i, a in enumerate(alone) for _ in a.chunk_spans]
    offsets = [0]
    for a in alone:
        offsets.append(offsets[-1] + a.document_tokens)
    assert st.chunk_spans == [[s + offsets[i], e + offsets[i]] for i, a in enumerate(alone) for s, e in a.chunk_spans]
    assert st.document_tokens == offsets[-1]
    # Every chunk scored as it is alone; the K lowest NLLs of all of them kept.
    every = [nll for a in alone for nll in a.chunk_nll_all]
    assert st.chunk_nll_all == pytest.approx(every, abs=1e-4)
    want = keep_best(list(enumerate(every)), cfg.keep_chunks, nll_of=lambda x: x[1], index_of=lambda x: x[0])
    assert st.kept_chunks == sorted(c for c, _ in want)
    assert len({st.chunk_documents[c] for c in range(len(every))}) == 3


def test_one_document_in_a_list_is_that_document(pc):
    cfg = SETTINGS["budget_chat_k2_b3"]
    one, listed = pc.generate(DOCS[0], QUESTION, config=cfg), pc.generate([DOCS[0]], QUESTION, config=cfg)
    assert listed.token_ids == one.token_ids and listed.stats.chunk_documents == [0] * len(one.stats.chunk_spans)
    assert one.stats.chunk_documents is None and "chunk_documents" not in one.stats.as_dict()


@pytest.mark.parametrize("context,config,words", [
    ([], SETTINGS["budget_chat_k2_b3"], ["no documents"]),
    ([DOCS[0], DOCS[1]], SETTINGS["full"], ["several documents", "parallelcomp"]),
    ([DOCS[0], 3], SETTINGS["budget_chat_k2_b3"], ["must be strings"]),
    ([DOCS[0], "  "], SETTINGS["budget_chat_k2_b3"], ["empty"]),
])
def test_bad_document_lists_are_one_line_errors(pc, context, config, words):
    raises_one_line(lambda: pc.generate(context, QUESTION, config=config), *words)


def test_encodings_made_with_other_chunking_are_refused(pc):
    cfg = SETTINGS["budget_chat_k2_b3"]
    other = pc.encode(DOCS[1], dataclasses.replace(cfg, chunk_tokens=61))
    raises_one_line(lambda: pc.generate([pc.encode(DOCS[0], cfg), other], QUESTION, config=cfg), "chunk_tokens")


def test_cli_several_inputs_and_encodings(pc, model_dir, tmp_path, capsys):
    from parallelcomp_triton import ParallelComp
    from parallelcomp_triton.run import main

    cfg = SETTINGS["budget_chat_k2_b3"]
    paths = []
    for i, doc in enumerate(DOCS[:2]):
        paths.append(tmp_path / f"doc{i}.txt")
        paths[-1].write_text(doc)
    common = ["--model", str(model_dir), "--question", QUESTION, "--no-progress", "--json", *cli_args(cfg)]
    assert main(["--input", str(paths[0]), "--input", str(paths[1]), *common]) == 0
    fresh = json.loads(capsys.readouterr().out)
    want = ParallelComp.from_pretrained(model_dir).generate(DOCS[:2], QUESTION, config=cfg)
    assert fresh["token_ids"] == want.token_ids and fresh["stats"]["chunk_documents"] == want.stats.chunk_documents
    for i, path in enumerate(paths):
        assert main(["--input", str(path), "--question", "x", "--save-encoding", str(tmp_path / f"enc{i}"),
                     "--model", str(model_dir), "--no-progress", *cli_args(cfg)]) == 0
    capsys.readouterr()
    assert main(["--encoding", str(tmp_path / "enc0"), "--encoding", str(tmp_path / "enc1"), *common]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == want.token_ids
    assert main(["--input", str(paths[0]), "--input", str(paths[1]), *common,
                 "--save-encoding", str(tmp_path / "both")]) == 2
    assert "one --input" in capsys.readouterr().err
