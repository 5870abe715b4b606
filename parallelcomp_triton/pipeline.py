"""ParallelComp, the facade: a loaded model and tokenizer, and the method's steps in order.

    plan    (plan.py)    tokenize, check against the trained window, cut the document into chunks
    encode  (encode.py)  each chunk's full K/V, question-independent (stored by `encode` for many questions)
    score   (score.py)   the question over every chunk: NLL ranks the chunks, the K best survive, their KV is
                         pruned to what the question attends to most
    answer  (answer.py)  merge the survivors, re-encode the question (calibration), decode

`generate` answers one (document, question) pair; `generate_batch` answers many with the same code path (the
chunks of all documents share the prefill batches, each document keeps its own K best, all sequences decode
together); `generate` is `generate_batch` of one document.
"""
from __future__ import annotations

import time

import torch

from . import alternatives, answer, plan, score
from .config import ParallelCompConfig
from .encode import chunks_per_batch, write_encoding
from .loading import load_model, resolve_model_dir
from .plan import Plan
from .precision import resolve_dtype
from .stats import GenerationResult
from .read_ahead import ReadAhead
from .storage import EncodedDocument, open_encoding

__all__ = ["ParallelComp", "GenerationResult", "TextStream"]


class ParallelComp:
    def __init__(self, model, tokenizer, source: str = "", dtype_source: str = "explicit"):
        self.model = model
        self.tokenizer = tokenizer
        # Whole documents are tokenized on purpose: silence the tokenizer's "longer than the model" warning.
        tokenizer.model_max_length = 1 << 62
        self.source = source
        self.args = model.args
        self.dtype_source = dtype_source  # how the weights' precision was chosen (reported in every run's stats)
        self.read_ahead = ReadAhead()  # reads an encoding's next batch while this one is scored

    @classmethod
    def from_pretrained(cls, model_dir=None, dtype="auto", device="cpu", backend="auto") -> "ParallelComp":
        """Load a model (None: the bundled SmolLM2-135M-Instruct).

        dtype: "auto" (default) runs in bfloat16 where `device` computes it natively (a CPU with AVX512-BF16
        or AMX-BF16, read from the CPU itself, not from the model; a CUDA GPU that supports bf16) and in
        float32 elsewhere; "float32", "bfloat16", "float16" or a torch dtype force one. The choice is in
        every result's stats (`dtype`, `dtype_source`)."""
        path = resolve_model_dir(model_dir)
        dtype, why = resolve_dtype(dtype, device)
        model, tokenizer = load_model(path, dtype=dtype, device=device)
        model.backend = backend
        return cls(model, tokenizer, str(path), dtype_source=why)

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def backend(self) -> str:
        return self.model.backend

    def eos_ids(self) -> set[int]:
        ids = set(self.args.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return ids

    # ------------------------------------------------------------------ answering
    @torch.no_grad()
    def generate(self, context, question: str, max_new_tokens: int | None = None,
                 config: ParallelCompConfig | None = None, progress: bool = False,
                 observer=None) -> GenerationResult:
        """Answer `question` about `context`: the document's text, or an EncodedDocument (`encode`), for which
        only the question-dependent work runs. `observer`, if given, is called with what the attention does:
        ``observer.chunk_scores(layer, chunk, scores [context_len, H_kv], kept [H_kv, n] | None)`` for every
        chunk and layer, and ``observer.calibration(layer, scores [S + m, H], mask [S + m, H])`` in calibrated
        layers (see parallelcomp_triton.inspect_attention)."""
        cfg = self.resolve_config(config, max_new_tokens)
        return self.run(cfg, [self.plan(context, question, cfg)], progress, observer)[0]

    @torch.no_grad()
    def generate_from_chunks(self, context, question: str, chunks: list[int],
                             config: ParallelCompConfig | None = None) -> GenerationResult:
        """Answer as if chunk eviction had kept exactly `chunks` (indices into the document's split): only
        those are encoded. Chunk eviction does not depend on the KV budget (each chunk's NLL comes from full
        attention inside it), so this replays a run under another B at the cost of K chunks."""
        cfg = self.resolve_config(config, None)
        return self.run(cfg, [self.plan(context, question, cfg).only_chunks(chunks)])[0]

    @torch.no_grad()
    def generate_batch(self, pairs, max_new_tokens: int | None = None, config: ParallelCompConfig | None = None,
                       progress: bool = False, return_errors: bool = False) -> list:
        """Answer many (context, question) pairs together; result i equals ``generate(*pairs[i])``. A context
        may be an EncodedDocument (`encode`), also mixed with plain texts. A bad pair raises
        ParallelCompError naming its index, or with `return_errors` takes a ParallelCompError in its slot
        while the other pairs are answered."""
        cfg = self.resolve_config(config, max_new_tokens)
        planned = self.plan_all(pairs, cfg, return_errors)
        plans = [p for p in planned if isinstance(p, Plan)]
        answers = iter(self.run(cfg, plans, progress) if plans else [])
        return [next(answers) if isinstance(p, Plan) else p for p in planned]

    def stream(self, context, question: str, max_new_tokens: int | None = None,
               config: ParallelCompConfig | None = None, progress: bool = False) -> "TextStream":
        """`generate`, with the answer's text yielded piece by piece as it is decoded: ``for piece in
        pc.stream(doc, q): print(piece, end="")``; afterwards the stream's `result` is what `generate` returns.
        Closing the stream (or dropping it) stops the decoding."""
        cfg = self.resolve_config(config, max_new_tokens)
        plans = [self.plan(context, question, cfg)]
        return TextStream(self._stream(cfg, plans, progress))

    def stream_batch(self, pairs, max_new_tokens: int | None = None, config: ParallelCompConfig | None = None,
                     leave=None, return_errors: bool = False) -> "TextStream":
        """`generate_batch`, streamed: iterating yields (i, text piece) for pair i as the batch decodes;
        afterwards `result` is what `generate_batch` returns. The pairs are planned at once: a bad pair
        raises here, or with `return_errors` is in `errors` ({i: ParallelCompError}) before any decoding.
        `leave(i)`: True ends pair i's decoding at its next step (its client left; its result is cut short)."""
        cfg = self.resolve_config(config, max_new_tokens)
        planned = self.plan_all(pairs, cfg, return_errors)
        stream = TextStream(self._stream_batch(cfg, planned, leave))
        stream.errors = {i: p for i, p in enumerate(planned) if not isinstance(p, Plan)}
        return stream

    def _stream(self, cfg, plans, progress):
        return (yield from _relabel(self._stream_batch(cfg, plans, None, progress), lambda item: item[1],
                                    lambda results: results[0]))

    @torch.no_grad()
    def _stream_batch(self, cfg, planned, leave, progress=False):
        """(pair index, piece) of every Plan in `planned` (the others: errors, passed through to the result)."""
        index = [i for i, p in enumerate(planned) if isinstance(p, Plan)]
        plans = [planned[i] for i in index]
        results = []
        if plans and cfg.mode in alternatives.ALTERNATIVE_MODES:  # no piecewise decoding: each answer in one piece
            results = self.run(cfg, plans)
            for i, result in zip(index, results):
                if result.text:
                    yield i, result.text
        elif plans:
            cache, states = self.prefill(cfg, plans, progress)
            rows = answer.stream_texts(self.model, self.tokenizer, cfg, plans, states, cache, self.eos_ids(),
                                       self.backend, leave=None if leave is None else lambda row: leave(index[row]))
            results = yield from _relabel(rows, lambda item: (index[item[0]], item[1]))
        out = list(planned)
        for i, result in zip(index, results):
            out[i] = result
        return out

    def run(self, cfg: ParallelCompConfig, plans: list[Plan], progress: bool = False,
            observer=None) -> list[GenerationResult]:
        """The method's steps over planned documents: encode, score and evict, merge, answer. The alternative
        modes (alternatives.py) answer each document alone with their own attention."""
        if cfg.mode in alternatives.ALTERNATIVE_MODES:
            return [alternatives.answer(self.model, self.tokenizer, cfg, p, self.eos_ids()) for p in plans]
        cache, states = self.prefill(cfg, plans, progress, observer)
        return answer.answer(self.model, self.tokenizer, cfg, plans, states, cache, self.eos_ids(), self.backend,
                             observer)

    def prefill(self, cfg: ParallelCompConfig, plans: list[Plan], progress: bool = False, observer=None):
        """Encode, score and evict every planned document's chunks; returns the merged cache (a row per
        document) and each document's prefill state."""
        cache = answer.new_cache(self.model, plans)
        t = time.perf_counter()
        work = [(d, c) for d, p in enumerate(plans) for c in range(len(p.spans))]
        # A document's kept chunks go into its cache row as soon as its last chunk is scored, so at most K
        # chunk caches per document plus one prefill batch are alive besides the merged cache.
        states = score.prefill(self.model, cfg, plans, work, self.backend, self.read_ahead, progress, observer,
                               on_document_done=lambda d, state: answer.merge(cache, d, plans[d], state))
        prefill_s = time.perf_counter() - t
        for p in plans:
            p.stats.time_prefill_s = prefill_s
        return cache, states

    # ------------------------------------------------------------------ planning
    def resolve_config(self, config: ParallelCompConfig | None, max_new_tokens: int | None) -> ParallelCompConfig:
        """A checked copy of `config` (defaults if None) with `max_new_tokens` applied."""
        return plan.resolve_config(config, max_new_tokens, self.args.num_layers)

    def plan(self, context, question: str, config: ParallelCompConfig | None = None) -> Plan:
        """Check one pair and cut it into chunks (no model pass); bad input raises a one-line
        ParallelCompError. `context`: the document's text, or an EncodedDocument."""
        cfg = self.resolve_config(config, None)
        return plan.plan_document(self.model, self.tokenizer, cfg, context, question, self.dtype_source)

    def plan_all(self, pairs, config: ParallelCompConfig | None = None, return_errors: bool = False) -> list:
        cfg = self.resolve_config(config, None)
        return plan.plan_all(self.model, self.tokenizer, cfg, pairs, return_errors, self.dtype_source)

    # ------------------------------------------------------------------ encodings
    @torch.no_grad()
    def encode(self, context: str, config: ParallelCompConfig | None = None, path=None,
               progress: bool = False) -> EncodedDocument:
        """Encode `context` once for many questions: every chunk's full K/V per layer (and the prompt prefix's
        once), computed exactly as `generate` computes them (same chunks, same `batch_chunks` batches).

        `path`: the directory to write (atomically; an existing encoding there is replaced); None: a
        temporary directory the returned object owns (removed by its close() or garbage collection).
        Later questions (`generate(encoded, question, config=...)`) run only the question-dependent work;
        their config must chunk as this one (`chunk_tokens`, `snap_to_sentences`, `window`) and give the
        same template prefix. Needs mode 'parallelcomp' and a fixed `chunk_tokens` (None sizes chunks by
        the question)."""
        return write_encoding(self.model, self.tokenizer, self.source, *self.plan_encoding(context, config), path,
                              self.backend, progress)

    def plan_encoding(self, context: str, config: ParallelCompConfig | None = None):
        """What `encode` writes, checked: (prefix tokens, document tokens, chunk spans, settings)."""
        cfg = self.resolve_config(config, None)
        prefix, document, spans, settings = plan.plan_encoding(self.tokenizer, cfg, context,
                                                               self.args.max_position_embeddings)
        # The batches a fresh run on this device would use, recorded so that answers batch alike.
        settings["batch_chunks"] = chunks_per_batch(cfg, self.device, max(e - s for s, e in spans))
        return prefix, document, spans, settings

    def load_encoded(self, path) -> EncodedDocument:
        """An encoding saved by `encode(path=...)` or `EncodedDocument.save`, checked against this model:
        another model, tokenizer or dtype, or a missing, truncated or corrupt file is refused in one line."""
        return open_encoding(path, self.model, self.tokenizer)


def _relabel(pieces, item, value=lambda v: v):
    """A generator of `pieces`' items passed through `item`, returning `pieces`' return value passed through
    `value`; closing it closes `pieces`."""
    try:
        while True:
            try:
                x = next(pieces)
            except StopIteration as done:
                return value(done.value)
            yield item(x)
    finally:
        pieces.close()


class TextStream:
    """An answer's text pieces as they are decoded (`ParallelComp.stream`); `result` is the GenerationResult
    once the iteration has ended (None before). `close()` stops the decoding."""

    def __init__(self, pieces):
        self._pieces = pieces
        self.result: GenerationResult | list | None = None
        self.errors: dict = {}  # stream_batch with return_errors: the pairs refused at planning

    def __iter__(self):
        self.result = yield from self._pieces

    def close(self) -> None:
        self._pieces.close()
