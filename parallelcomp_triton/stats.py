"""What one answer cost and what the method decided on the way: `Stats`, and the `GenerationResult` that
carries it. Every path (fresh, encoded, batched, distributed) fills the same fields."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

# Fields present only where they apply; `as_dict` leaves them out otherwise, as `--json` prints.
_OPTIONAL = ("encoding", "chunk_documents", "calibration_masked_per_head", "distributed")


@dataclass
class Stats:
    """Settings in force, the plan, chunk eviction's decisions, cache sizes and timings of one answer."""

    mode: str = "parallelcomp"
    dtype: str = ""                      # the weights' precision, e.g. "bfloat16"
    dtype_source: str = ""               # why that precision (precision.resolve_dtype)
    template: str = ""                   # "plain", "chat" or "prompt" (a config's own template)
    encoding: str | None = None          # the encoding directories the chunks' K/V came from, if any
    document_tokens: int = 0
    prefix_tokens: int = 0               # the shared prompt prefix, encoded once per document
    question_tokens: int = 0             # the suffix appended to every chunk: the question and template text
    score_rows: int = 0                  # suffix rows whose attention chooses the kept KV
    time_tokenize_s: float = 0.0
    time_prefill_s: float = 0.0          # chunk encoding, scoring and eviction (all documents of a batch)
    batch_documents: int = 1             # documents answered together
    chunk_spans: list[list[int]] = field(default_factory=list)   # document-token [start, end) per chunk
    chunk_documents: list[int] | None = None  # several documents: which one (its index) each chunk is from
    chunk_nll: list[float | None] = field(default_factory=list)  # the question's NLL, kept chunks only
    chunk_nll_all: list[float | None] = field(default_factory=list)  # every chunk scored (None: not scored)
    kept_chunks: list[int] = field(default_factory=list)         # chunk eviction's survivors, document order
    max_alive_chunk_caches: int = 0      # chunk caches held at once during the prefill (memory bound)
    kv_tokens_per_layer_before: int = 0  # prefix + every chunk
    kv_tokens_per_layer_after: int = 0   # the merged cache: prefix + kept chunks after KV eviction + question
    kv_cache_bytes: int = 0              # the merged cache row's K/V
    question_position: int = 0           # where the re-encoded question starts
    calibration_masked_per_head: dict[int, list[int]] | None = None  # layer -> masked keys per query head
    time_question_s: float = 0.0
    time_decode_s: float = 0.0           # the whole batch's decoding
    new_tokens: int = 0
    decode_steps: int = 0
    decode_ms_per_token: float = 0.0
    time_total_s: float = 0.0
    peak_memory_bytes: int = 0           # the process's peak RSS on CPU, allocated GPU memory on CUDA
    empty_answer: bool = False           # the model ended its turn at once
    distributed: dict | None = None      # ranks, their shares and timings, bytes exchanged

    def as_dict(self) -> dict:
        """The JSON form `--json` prints: every field, those of `_OPTIONAL` only where set."""
        out = dataclasses.asdict(self)
        for name in _OPTIONAL:
            if out[name] is None:
                del out[name]
        return out


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    stats: Stats = field(default_factory=Stats)
    # chunk index -> per layer [H_kv, n] kept chunk-local context positions (KV eviction only).
    kept_positions: dict[int, list[torch.Tensor]] = field(default_factory=dict)
