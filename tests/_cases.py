"""The one table of documents, questions and settings that every equivalence test runs through: an answer
must not depend on the path that computed it, fresh (`generate`), from an encoding (test_encode), in a
batch (test_batch), across gloo ranks (test_distributed), on a GPU (test_gpu_pipeline).

`CASES` run through every path: greedy parallelcomp runs, so encodable, and equal across devices.
`EXTRA_CASES` run only where they can: mode "full" has no chunks to encode or distribute, and a sampled
answer is equal on one device only (a CUDA generator draws other numbers than a CPU one)."""
from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

import pytest
import torch

from parallelcomp_triton import Calibration, ParallelCompConfig, ParallelCompError

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()


def document(n_words: int, seed: int = 0) -> str:
    """Random words of WORDS; the byte tokenizer of the tiny models makes about 5 tokens of a word."""
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


# By length: under each of SETTINGS each has a chunk count of its own, "d12" a single chunk.
DOCUMENTS = {
    "d12": document(12, seed=2),
    "d90": document(90, seed=4),
    "d260": document(260, seed=3),
    "d300": document(300, seed=3),
    "d400": document(400, seed=1),  # long enough at chunk_tokens 150 for each of two ranks to own winners
}

# "Hm" is shorter than the score window (8): its chunks score with a window of its own length, in a
# chunk_attention call of their own inside a shared batch. The last one ends in a cue (an answer's start).
QUESTIONS = ["Which word comes first?", "What is the last word in the text?", "Hm", "Which word is last? It is"]

CALIBRATION = Calibration(region="sink", first_layer=1, last_layer=2, tau=0.02, rows=2, region_tokens=30)

SETTINGS = {
    "budget_chat_k2_b3": ParallelCompConfig(chunk_tokens=97, keep_chunks=2, kv_budget=16, batch_chunks=3,
                                            max_new_tokens=8, template="chat"),
    "no_budget_k3_b1": ParallelCompConfig(chunk_tokens=97, keep_chunks=3, kv_budget=None, batch_chunks=1,
                                          max_new_tokens=8, template="plain"),
    "no_budget_chat_k3_b4": ParallelCompConfig(chunk_tokens=61, keep_chunks=3, kv_budget=None, batch_chunks=4,
                                               max_new_tokens=10, template="chat"),
    # an instruction: a shared prefix under the plain template too
    "calibration_k2_b3": ParallelCompConfig(chunk_tokens=80, keep_chunks=2, kv_budget=24, batch_chunks=3,
                                            max_new_tokens=8, instruction="Read this.", template="plain",
                                            calibration=CALIBRATION),
    "calibration_auto_k2_b5": ParallelCompConfig(chunk_tokens=80, keep_chunks=2, kv_budget=24, batch_chunks=5,
                                                 max_new_tokens=10, calibration=CALIBRATION),
    "suffix_k1_b1": ParallelCompConfig(chunk_tokens=120, keep_chunks=1, kv_budget=12, batch_chunks=1,
                                       max_new_tokens=8, score_tokens="suffix", template="plain"),
    # the default template (chat here) with a cue question: the answer's start opens the assistant's turn
    "auto_cue_k2_b2": ParallelCompConfig(chunk_tokens=97, keep_chunks=2, kv_budget=16, batch_chunks=2,
                                         max_new_tokens=8),
    # chat: a shared prefix, which rank 0 must hold for every document (it owns every chunk 0)
    "chat_k3_b2_c150": ParallelCompConfig(chunk_tokens=150, keep_chunks=3, kv_budget=32, batch_chunks=2,
                                          max_new_tokens=8, template="chat"),
    "sampling_k3": ParallelCompConfig(chunk_tokens=70, keep_chunks=3, kv_budget=20, max_new_tokens=6,
                                      temperature=1.0, top_p=0.9, seed=5),
    "full": ParallelCompConfig(mode="full", max_new_tokens=5),
}


@dataclass(frozen=True)
class Case:
    id: str  # the settings' name
    context: str
    question: str
    config: ParallelCompConfig


def _case(settings: str, doc: str, question: str) -> Case:
    return Case(settings, DOCUMENTS[doc], question, SETTINGS[settings])


CASES = [
    _case("budget_chat_k2_b3", "d260", QUESTIONS[0]),
    _case("no_budget_k3_b1", "d260", QUESTIONS[1]),
    _case("no_budget_chat_k3_b4", "d260", QUESTIONS[2]),
    _case("calibration_k2_b3", "d260", QUESTIONS[0]),
    _case("calibration_auto_k2_b5", "d260", QUESTIONS[1]),
    _case("suffix_k1_b1", "d260", QUESTIONS[2]),
    _case("auto_cue_k2_b2", "d260", QUESTIONS[3]),
    _case("chat_k3_b2_c150", "d400", QUESTIONS[0]),
]
EXTRA_CASES = [
    _case("sampling_k3", "d260", "Say something."),
    _case("full", "d260", QUESTIONS[0]),
]
# Each torchrun costs seconds of start-up: the settings that differ most in how chunks are shared out.
DISTRIBUTED = ["chat_k3_b2_c150", "no_budget_k3_b1"]

# The rest of a batch: documents of other lengths (chunk counts), one of a single chunk.
BATCH = [(DOCUMENTS["d12"], "Name one?"), (DOCUMENTS["d300"], QUESTIONS[1]), (DOCUMENTS["d90"], QUESTIONS[2])]


def case(id: str) -> Case:
    return next(c for c in CASES + EXTRA_CASES if c.id == id)


def params(cases) -> list:
    """pytest.param per case, named by its id."""
    return [pytest.param(c, id=c.id) for c in cases]


def pairs(c: Case) -> list[tuple[str, str]]:
    """The (context, question) pairs of a batch around case `c`: its own first, then BATCH."""
    return [(c.context, c.question), *BATCH]


def changed_fields(cfg: ParallelCompConfig) -> dict:
    """The fields of `cfg` that differ from the defaults."""
    default = ParallelCompConfig()
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
            if getattr(cfg, f.name) != getattr(default, f.name)}


def cli_args(cfg: ParallelCompConfig, only=None) -> list[str]:
    """The command-line options that give `cfg` (or only its fields named in `only`), and --no-progress."""
    out = []
    for name, value in changed_fields(cfg).items():
        if only is not None and name not in only:
            continue
        flag = "--" + name.replace("_", "-")
        if name == "calibration":
            if (value.rows, value.region_tokens) != (1, 100):
                raise ValueError(f"{value}: --calibrate sets region, layers and tau only")
            out += ["--calibrate", f"{value.region}:{value.first_layer}-{value.last_layer}:{value.tau}"]
        elif value is True:
            out.append(flag)
        elif value is None:
            out += [flag, {"kv_budget": "none", "chunk_tokens": "max"}[name]]
        elif name in ("prompt", "stop_strings", "snap_to_sentences", "gqa_reduce"):
            raise ValueError(f"{name}: no command-line option")
        else:
            out += [flag, str(value)]
    return out + ["--no-progress"]


def assert_same(got, want, exact_nll: bool = True):
    """Two answers to one question that must not differ: tokens, plan, chunk eviction's and KV eviction's
    decisions, calibration's masks; chunk NLLs bitwise, or (another batch make-up) up to float rounding."""
    assert got.token_ids == want.token_ids
    assert got.text == want.text
    for key in ("chunk_spans", "kept_chunks", "kv_tokens_per_layer_before", "kv_tokens_per_layer_after",
                "question_position", "prefix_tokens", "question_tokens", "document_tokens",
                "calibration_masked_per_head"):
        assert getattr(got.stats, key) == getattr(want.stats, key), key
    if exact_nll:
        assert got.stats.chunk_nll_all == want.stats.chunk_nll_all
    else:
        assert got.stats.chunk_nll_all == pytest.approx(want.stats.chunk_nll_all, abs=1e-4)
    assert sorted(got.kept_positions) == sorted(want.kept_positions)
    for c in want.kept_positions:
        # .cpu(): a GPU run is compared with a CPU one through this too
        assert all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(got.kept_positions[c], want.kept_positions[c])), c


def raises_one_line(fn, *names) -> str:
    """Run fn; it must raise ParallelCompError whose message is one line containing every name."""
    with pytest.raises(ParallelCompError) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message and message.strip() == message, repr(message)
    for name in names:
        assert str(name) in message, f"{name!r} not in {message!r}"
    return message
