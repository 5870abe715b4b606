"""ParallelComp end to end: parallel chunk prefill with KV eviction, chunk eviction by question NLL,
merge, question pass (with optional attention-bias calibration) and decoding on the compressed cache.

Stages: `encode.encode_chunks` (each chunk's K/V, question-independent), `score.score_chunks` (the question
rows over them: NLL, window scores, compressed KV) and chunk eviction, per prefill batch; then merge,
question pass and decoding (here). `encode` stores the first stage's output (`EncodedDocument`) so that
later questions about the same document run only the rest.

`generate` answers one (document, question) pair; `generate_batch` answers many with one code path:
the chunks of all documents are packed into the same varlen prefill batches, every document keeps its own
K best chunks, the question is re-encoded per document, and all sequences decode together over one
batched cache with per-row lengths (a finished sequence leaves the batch). `generate` is `generate_batch`
of one document."""
from __future__ import annotations

import collections
import dataclasses
import resource
import time
from dataclasses import dataclass, field

import torch

from .cache import ChunkCache, CompressedKVCache
from .config import ParallelCompConfig
from .errors import ParallelCompError
from .generation import sample_next
from .encode import (ChunkKV, EncodedDocument, check_model, encode_chunks, open_encoding, read_ahead,
                     write_encoding)
from .kernels.chunk_attention import chunk_attention
from .kernels.decode_attention import decode_attention
from .score import ScoreItem, compress, keep_best, nan_last, score_chunks
from .loading import load_model, resolve_model_dir
from .precision import resolve_dtype
from .prompt import (PromptTokens, resolve_template, score_rows, sentence_ends, snap_spans, split_even,
                     template_name, tokenize_prompt, truncate_middle)


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    stats: dict = field(default_factory=dict)
    # chunk index -> per layer [H_kv, n] kept chunk-local context positions (KV eviction only).
    kept_positions: dict[int, list[torch.Tensor]] = field(default_factory=dict)


@dataclass
class Document:
    """One (context, question) pair tokenized and cut into chunks, plus what its prefill produces."""

    toks: PromptTokens
    spans: list[tuple[int, int]]     # document-token spans of the chunks
    keep: int                        # K: chunks kept after chunk eviction
    budget: int | None               # B: KV tokens kept per chunk, layer and KV head (None: all)
    append_question: bool            # parallelcomp mode: every chunk is encoded with the question after it
    capacity: int                    # merged-cache positions this document can need (upper bound)
    stats: dict
    t0: float
    # Filled by the prefill: the shared prefix KV per layer [H_kv, p, d], the K best chunk caches (document
    # order once the prefill is done), every chunk's question NLL, the most chunk caches alive at once.
    prefix_keys: list[torch.Tensor | None] = field(default_factory=list)
    prefix_values: list[torch.Tensor | None] = field(default_factory=list)
    kept: list[ChunkCache] = field(default_factory=list)
    nll: list[float | None] = field(default_factory=list)
    alive_max: int = 0
    encoded: EncodedDocument | None = None  # where the chunks' K/V are read from (None: encoded on the fly)
    chunk_ids: list[int] | None = None      # generate_from_chunks: the encoding's index of each chunk

    def stored_chunk(self, c: int) -> int:
        """The encoding's index of this document's chunk c."""
        return self.chunk_ids[c] if self.chunk_ids else c


def _peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


class ParallelComp:
    def __init__(self, model, tokenizer, source: str = "", dtype_source: str = "explicit"):
        self.model = model
        self.tokenizer = tokenizer
        # Whole documents are tokenized on purpose: silence the tokenizer's "longer than the model" warning.
        tokenizer.model_max_length = 1 << 62
        self.source = source
        self.args = model.args
        self.dtype_source = dtype_source  # how the weights' precision was chosen (reported in every run's stats)

    @classmethod
    def from_pretrained(cls, model_dir=None, dtype="auto", device="cpu", backend="auto") -> "ParallelComp":
        """Load a model (None: the bundled SmolLM2-135M-Instruct).

        dtype: "auto" (default) runs in bfloat16 where `device` computes it natively (a CPU with AVX512-BF16
        or AMX-BF16, read from the CPU itself, not from the model; a CUDA GPU that supports bf16) and in
        float32 elsewhere; "float32", "bfloat16", "float16" or a torch dtype force one. The choice is in
        every result's stats ("dtype", "dtype_source")."""
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

    # ------------------------------------------------------------------ public API
    @torch.no_grad()
    def generate(self, context, question: str, max_new_tokens: int | None = None,
                 config: ParallelCompConfig | None = None, progress: bool = False,
                 observer=None) -> GenerationResult:
        """Answer `question` about `context`: the document's text, or an EncodedDocument (`encode`), for which
        only the question-dependent work runs. `observer`, if given, is called with what the attention does:
        ``observer.chunk_scores(layer, chunk, scores [context_len, H_kv], kept [H_kv, n] | None)`` for every
        chunk and layer, and ``observer.calibration(layer, scores [S + m, H], mask [S + m, H])`` in calibrated
        layers (see parallelcomp_triton.inspect)."""
        cfg = self.resolve_config(config, max_new_tokens)
        doc = self.prepare(cfg, context, question)
        return self._generate_documents(cfg, [doc], progress, observer)[0]

    @torch.no_grad()
    def generate_from_chunks(self, context: str, question: str, chunks: list[int],
                             config: ParallelCompConfig | None = None) -> GenerationResult:
        """Answer as if chunk eviction had kept exactly `chunks` (indices into the document's split): only
        those are encoded. Chunk eviction does not depend on the KV budget (each chunk's NLL comes from full
        attention inside it), so this replays a run under another B at the cost of K chunks."""
        cfg = self.resolve_config(config, None)
        doc = self.prepare(cfg, context, question)
        if cfg.mode != "parallelcomp" or not chunks or not all(0 <= c < len(doc.spans) for c in chunks):
            raise ParallelCompError(f"chunks {chunks}: expected indices into the {len(doc.spans)} chunks "
                                    "of mode 'parallelcomp'")
        doc.spans, doc.nll = [doc.spans[c] for c in chunks], [None] * len(chunks)
        doc.chunk_ids = list(chunks) if doc.encoded is not None else None
        return self._generate_documents(cfg, [doc], False, None)[0]

    @torch.no_grad()
    def generate_batch(self, pairs, max_new_tokens: int | None = None, config: ParallelCompConfig | None = None,
                       progress: bool = False, return_errors: bool = False) -> list:
        """Answer many (context, question) pairs together; result i equals ``generate(*pairs[i])``. A context
        may be an EncodedDocument (`encode`), also mixed with plain texts.

        Chunks of all documents share the varlen prefill batches (`batch_chunks` chunks each, across
        documents); each document keeps its own K best chunks; decoding runs every sequence in one batch.
        A bad pair raises ParallelCompError naming its index, or with `return_errors` takes a
        ParallelCompError in its slot while the other pairs are answered."""
        cfg = self.resolve_config(config, max_new_tokens)
        prepared = self.prepare_all(cfg, pairs, return_errors)
        docs = [d for d in prepared if isinstance(d, Document)]
        answers = iter(self._generate_documents(cfg, docs, progress, None) if docs else [])
        return [next(answers) if isinstance(d, Document) else d for d in prepared]

    # ------------------------------------------------------------------ preparation
    def resolve_config(self, config: ParallelCompConfig | None, max_new_tokens: int | None) -> ParallelCompConfig:
        """A checked copy of `config` (defaults if None) with `max_new_tokens` applied."""
        cfg = dataclasses.replace(config) if config is not None else ParallelCompConfig()
        if max_new_tokens is not None:
            cfg.max_new_tokens = max_new_tokens
        cfg.check()
        if cfg.calibration is not None:
            cfg.calibration.check(self.args.num_layers)
        return cfg

    def prepare_all(self, cfg: ParallelCompConfig, pairs, return_errors: bool = False) -> list:
        """`prepare` every (context, question) pair: a Document each, or with `return_errors` the
        ParallelCompError of a bad pair in its slot; otherwise the first bad pair raises, naming its index."""
        prepared: list = []
        for i, pair in enumerate(pairs):
            try:
                try:
                    context, question = pair
                except (TypeError, ValueError):
                    raise ParallelCompError("expected a (context, question) pair") from None
                prepared.append(self.prepare(cfg, context, question))
            except ParallelCompError as e:
                if not return_errors:
                    raise ParallelCompError(f"pair {i}: {e}" if len(pairs) > 1 else str(e)) from None
                prepared.append(e)
        return prepared

    def prepare(self, cfg: ParallelCompConfig, context, question: str) -> Document:
        """Tokenize one pair and cut it into chunks; every input check that needs no model pass is here.
        `context` is the document's text or an EncodedDocument (then only the question is tokenized, and the
        encoding's chunks are used: the config must chunk and prompt as the encoding did)."""
        if question is None or (isinstance(question, str) and not question.strip()):
            raise ParallelCompError("the question is empty")
        encoded = context if isinstance(context, EncodedDocument) else None
        if not isinstance(question, str) or not isinstance(context, (str, type(None), EncodedDocument)):
            raise ParallelCompError("the context and the question must be strings")
        dtype = str(self.model.embed_tokens.weight.dtype).removeprefix("torch.")
        stats: dict = {"mode": cfg.mode, "dtype": dtype, "dtype_source": self.dtype_source,
                       "template": "prompt" if cfg.prompt is not None else template_name(self.tokenizer, cfg.template)}
        t0 = time.perf_counter()
        template = resolve_template(self.tokenizer, cfg.template, cfg.prompt, cfg.instruction)
        if encoded is not None:
            self._check_encoding(cfg, encoded)
            toks = tokenize_prompt(self.tokenizer, template, "x", question)  # the prefix and the question
            if toks.prefix != encoded.prefix:
                raise ParallelCompError(f"encoding {encoded.path}: made with another template prefix "
                                        f"({len(encoded.prefix)} tokens, this config gives {len(toks.prefix)}); "
                                        "use the encoding's template and instruction, or encode again")
            toks = dataclasses.replace(toks, document=encoded.document)
            stats["encoding"] = str(encoded.path)
        else:
            toks = tokenize_prompt(self.tokenizer, template, context, question)
        window = cfg.window or self.args.max_position_embeddings
        fixed = len(toks.prefix) + len(toks.suffix) + cfg.max_new_tokens
        if fixed >= window:
            raise ParallelCompError(f"prompt prefix + question ({len(toks.prefix) + len(toks.suffix)} tokens) "
                                    f"+ max_new_tokens ({cfg.max_new_tokens}) do not fit the {window}-token window")
        room = window - fixed
        stats["document_tokens"] = len(toks.document)
        stats["prefix_tokens"], stats["question_tokens"] = len(toks.prefix), len(toks.suffix)
        stats["score_rows"] = score_rows(toks, cfg.score_window)  # the suffix rows whose attention keeps KV

        if cfg.mode == "parallelcomp":
            chunk_tokens = cfg.chunk_tokens or room
            if chunk_tokens > room:
                raise ParallelCompError(f"chunk_tokens {chunk_tokens}: a chunk plus prompt and answer must fit the "
                                        f"{window}-token window (at most {room} here)")
            if encoded is None:
                spans = self.chunk_spans(cfg, toks.document, chunk_tokens, room)
            else:
                # The encoding snapped its chunks with the loosest limit any question allows; spans that fit
                # this question's room are then exactly what chunk_spans(..., room) gives (a tighter limit
                # only removes cut points the encoding did not use).
                spans = encoded.spans
                longest = max(e - s for s, e in spans)
                if longest > room:
                    raise ParallelCompError(f"encoding {encoded.path}: its longest chunk ({longest} tokens) plus "
                                            f"prompt, question and answer does not fit the {window}-token window "
                                            f"(at most {room} here); ask a shorter question or lower max_new_tokens")
            keep, budget, append_question = cfg.keep_chunks, cfg.kv_budget, True
        else:
            doc = toks.document if cfg.mode == "full" else truncate_middle(toks.document, room)
            toks = dataclasses.replace(toks, document=doc)
            spans = [(0, len(doc))]
            keep, budget, append_question = 1, None, False
        # The merged cache holds the prefix, the K longest kept chunks at most, the question and the answer.
        kept_lens = sorted(min(budget, e - s) if budget is not None else e - s for s, e in spans)[-keep:]
        capacity = len(toks.prefix) + sum(kept_lens) + len(toks.suffix) + cfg.max_new_tokens
        stats["time_tokenize_s"] = time.perf_counter() - t0
        layers = self.args.num_layers
        return Document(toks=toks, spans=spans, keep=keep, budget=budget, append_question=append_question,
                        capacity=capacity, stats=stats, t0=t0, prefix_keys=[None] * layers,
                        prefix_values=[None] * layers, nll=[None] * len(spans), encoded=encoded)

    def chunk_spans(self, cfg: ParallelCompConfig, document: list[int], chunk_tokens: int,
                    limit: int) -> list[tuple[int, int]]:
        """Even spans of about `chunk_tokens`, boundaries snapped to sentence ends (spans at most `limit`)."""
        spans = split_even(len(document), chunk_tokens)
        if cfg.snap_to_sentences and len(spans) > 1:
            sentences, lines = sentence_ends(self.tokenizer, document)
            spans = snap_spans(spans, sentences, slack=max(1, chunk_tokens // 8), limit=limit, fallback=lines)
        return spans

    # ------------------------------------------------------------------ encodings
    def _encoding_settings(self, cfg: ParallelCompConfig) -> dict:
        """The config fields an encoding depends on (besides the model): chunking and the prompt prefix."""
        return {"mode": cfg.mode, "chunk_tokens": cfg.chunk_tokens, "snap_to_sentences": cfg.snap_to_sentences,
                "window": cfg.window or self.args.max_position_embeddings, "template": cfg.template,
                "instruction": cfg.instruction, "prompt": cfg.prompt}

    def _check_encoding(self, cfg: ParallelCompConfig, encoded: EncodedDocument) -> None:
        if cfg.mode != "parallelcomp":
            raise ParallelCompError(f"an encoded document is answered in mode 'parallelcomp', not {cfg.mode!r}")
        check_model(encoded, self.model, self.tokenizer)
        made, now = encoded.settings(), self._encoding_settings(cfg)
        for name in ("chunk_tokens", "snap_to_sentences", "window"):
            if made[name] != now[name]:
                raise ParallelCompError(f"encoding {encoded.path}: made with {name}={made[name]!r}, this config "
                                        f"has {now[name]!r}; use the encoding's settings "
                                        "(EncodedDocument.settings()) or encode again")

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
        if cfg.mode != "parallelcomp":
            raise ParallelCompError(f"encode: mode {cfg.mode!r} cuts the document by the question; only mode "
                                    "'parallelcomp' encodes chunks independently of it")
        if cfg.chunk_tokens is None:
            raise ParallelCompError("encode: chunk_tokens=None sizes chunks by the question; give chunk_tokens")
        if not isinstance(context, str):
            raise ParallelCompError("the context must be a string")
        template = resolve_template(self.tokenizer, cfg.template, cfg.prompt, cfg.instruction)
        toks = tokenize_prompt(self.tokenizer, template, context, "?")
        window = cfg.window or self.args.max_position_embeddings
        # The loosest room any question leaves (a suffix and an answer of at least one token each).
        limit = window - len(toks.prefix) - 2
        if cfg.chunk_tokens > limit:
            raise ParallelCompError(f"chunk_tokens {cfg.chunk_tokens}: a chunk plus prompt and answer must fit the "
                                    f"{window}-token window (at most {limit} here)")
        spans = self.chunk_spans(cfg, toks.document, cfg.chunk_tokens, limit)
        settings = dict(self._encoding_settings(cfg), batch_chunks=cfg.batch_chunks)
        return toks.prefix, toks.document, spans, settings

    def load_encoded(self, path) -> EncodedDocument:
        """An encoding saved by `encode(path=...)` or `EncodedDocument.save`, checked against this model:
        another model, tokenizer or dtype, or a missing, truncated or corrupt file is refused in one line."""
        return open_encoding(path, self.model, self.tokenizer)

    # ------------------------------------------------------------------ stages
    def _generate_documents(self, cfg, docs: list[Document], progress, observer) -> list[GenerationResult]:
        cache = self.new_cache(docs)
        t = time.perf_counter()
        work = [(d, c) for d, doc in enumerate(docs) for c in range(len(doc.spans))]
        # A document's kept chunks go into its cache row as soon as its last chunk is scored, so at most
        # K chunk caches per document in flight plus one prefill batch are alive besides the merged cache.
        self.prefill(cfg, docs, work, progress, observer,
                     on_document_done=lambda d, doc: self.merge_document(cache, d, doc))
        prefill_s = time.perf_counter() - t
        for doc in docs:
            doc.stats["time_prefill_s"] = prefill_s
        return self.answer(cfg, docs, cache, observer)

    def new_cache(self, docs: list[Document]) -> CompressedKVCache:
        """An empty batched cache with one row per document, as long as the longest needs."""
        a = self.args
        weight = self.model.embed_tokens.weight
        return CompressedKVCache(a.num_layers, len(docs), a.num_kv_heads, a.num_heads, a.head_dim,
                                 max(doc.capacity for doc in docs), weight.dtype, weight.device)

    @staticmethod
    def merge_document(cache: CompressedKVCache, row: int, doc: Document) -> None:
        """Copy the document's prefix and kept chunks (document order) into its cache row, then free them."""
        doc.kept.sort(key=lambda c: c.index)
        has_prefix = bool(doc.toks.prefix)
        cache.fill_row(row, doc.prefix_keys if has_prefix else None, doc.prefix_values if has_prefix else None,
                       doc.kept)
        for c in doc.kept:
            c.release_kv()
        doc.prefix_keys = doc.prefix_values = []

    def answer(self, cfg, docs: list[Document], cache: CompressedKVCache, observer=None) -> list[GenerationResult]:
        """Question pass per document over its merged row, then batched decoding; one result per document."""
        logits, positions = [], []
        for row, doc in enumerate(docs):
            st, spans, prefix_len = doc.stats, doc.spans, len(doc.toks.prefix)
            st["batch_documents"] = len(docs)
            st["chunk_spans"] = [list(s) for s in spans]
            st["chunk_nll"] = [None] * len(spans)
            for c in doc.kept:
                st["chunk_nll"][c.index] = c.nll
            st["chunk_nll_all"] = list(doc.nll)
            st["kept_chunks"] = [c.index for c in doc.kept]
            st["max_alive_chunk_caches"] = doc.alive_max
            st["kv_tokens_per_layer_before"] = prefix_len + sum(e - s for s, e in spans)
            st["kv_tokens_per_layer_after"] = cache.lengths[row]
            st["kv_cache_bytes"] = cache.nbytes(row)
            # The question sits right after the longest kept chunk in the shared position range.
            p0 = prefix_len + max(c.context_len for c in doc.kept)
            st["question_position"] = p0
            t = time.perf_counter()
            logits.append(self._question_pass(cfg, cache, row, doc.toks.suffix, p0, st, observer))
            st["time_question_s"] = time.perf_counter() - t
            positions.append(p0 + len(doc.toks.suffix))

        t = time.perf_counter()
        outs, steps = self._decode(cfg, cache, torch.cat(logits), positions)
        dt = time.perf_counter() - t
        results = []
        for doc, out_ids in zip(docs, outs):
            st = doc.stats
            st["time_decode_s"] = dt
            st["new_tokens"] = len(out_ids)
            st["decode_steps"] = steps
            st["decode_ms_per_token"] = 1000 * dt / steps if steps else 0.0
            st["time_total_s"] = time.perf_counter() - doc.t0
            st["peak_memory_bytes"] = _peak_memory_bytes(self.device)
            text = self.tokenizer.decode(out_ids, skip_special_tokens=True)
            st["empty_answer"] = not text.strip()  # the CLI says so on stderr; callers can check here
            positions = {c.index: c.positions for c in doc.kept if c.positions is not None}
            results.append(GenerationResult(text=text, token_ids=out_ids, stats=st, kept_positions=positions))
        return results

    def prefill(self, cfg, docs: list[Document], work: list[tuple[int, int]], progress=False, observer=None,
                on_document_done=None) -> None:
        """Encode the chunks `work` = [(document, chunk)] `batch_chunks` at a time, packed varlen across
        documents; keep each document's `keep` best compressed caches in `docs[d].kept`.

        Per batch: the chunks' full K/V (`encode.encode_chunks` in memory, or read from the document's
        encoding), then the question-dependent part (`score.score_chunks`: question NLL, window scores), chunk
        eviction, and KV selection for the batch's chunks that survived it (`score.compress`); the batch's
        full K/V is freed before the next one.
        `on_document_done(d, doc)` runs once all of document d's chunks in `work` are scored."""
        # One config for every document: budget and mode are shared.
        budget, append_question = docs[0].budget, docs[0].append_question
        need_scores = budget is not None or observer is not None
        remaining = collections.Counter(d for d, _ in work)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(work), desc="chunks", unit="chunk", leave=False)
        for first in range(0, len(work), cfg.batch_chunks):
            batch = work[first:first + cfg.batch_chunks]
            # The next batch's stored K/V is read on another core while this one is scored.
            self.read_ahead_chunks(docs, work[first + cfg.batch_chunks:first + 2 * cfg.batch_chunks])
            kvs = self.chunk_kv(docs, batch)
            if append_question:
                items = []
                for (d, c), kv in zip(batch, kvs):
                    doc = docs[d]
                    suffix = doc.toks.suffix
                    items.append(ScoreItem(
                        index=c, kv=kv, prefix_keys=doc.prefix_keys if doc.toks.prefix else [],
                        prefix_values=doc.prefix_values if doc.toks.prefix else [], suffix=suffix,
                        scored=doc.toks.question if cfg.score_tokens == "question" else (0, len(suffix)),
                        window=score_rows(doc.toks, cfg.score_window) if need_scores else 0))
                caches = score_chunks(self.model, items, budget, cfg.pool_kernel, cfg.gqa_reduce, self.backend,
                                      observer, defer=True)
                del items
            else:  # one chunk holding the whole (or truncated) document: nothing to score or evict
                caches = [ChunkCache(index=c, context_len=kv.length, keys=kv.keys, values=kv.values)
                          for (_, c), kv in zip(batch, kvs)]
            del kvs
            # Chunk eviction, per document: the K lowest NLL survive (ties: earlier chunk); the rest are freed.
            new_by_doc: dict[int, list[ChunkCache]] = collections.defaultdict(list)
            for (d, _), cache in zip(batch, caches):
                new_by_doc[d].append(cache)
            del caches
            for d, new in new_by_doc.items():
                doc = docs[d]
                if append_question:
                    for cache in new:
                        doc.nll[cache.index] = cache.nll
                doc.alive_max = max(doc.alive_max, len(doc.kept) + len(new))
                doc.kept = keep_best(doc.kept, new, doc.keep)
                if budget is not None:  # KV selection for the batch's chunks that survived eviction only
                    compress(doc.kept, budget, cfg.pool_kernel, self.backend)
                remaining[d] -= len(new)
                if remaining[d] == 0:
                    doc.kept.sort(key=lambda c: c.index)
                    if on_document_done is not None:
                        on_document_done(d, doc)
            del new_by_doc
            if bar is not None:
                bar.update(len(batch))
        if bar is not None:
            bar.close()

    @staticmethod
    def read_ahead_chunks(docs: list[Document], batch: list[tuple[int, int]]) -> None:
        """Start reading the stored K/V of the encoded chunks in `batch` (the next one) in the background."""
        paths = [docs[d].encoded.chunk_path(docs[d].stored_chunk(c)) for d, c in batch if docs[d].encoded is not None]
        if paths:
            read_ahead(paths)

    def chunk_kv(self, docs: list[Document], batch: list[tuple[int, int]]) -> list[ChunkKV]:
        """The full K/V of the chunks `batch` = [(document, chunk)]: one `encode_chunks` pass over those of
        plain documents, a read of the others' from their encoding. Sets each document's prefix K/V the first
        time one of its chunks comes by."""
        out: list[ChunkKV | None] = [None] * len(batch)
        fresh = [i for i, (d, _) in enumerate(batch) if docs[d].encoded is None]
        if fresh:
            seqs, capture, seen = [], [], set()
            for i in fresh:
                d, c = batch[i]
                doc = docs[d]
                s, e = doc.spans[c]
                seqs.append((doc.toks.prefix, doc.toks.document[s:e]))
                capture.append(bool(doc.toks.prefix) and doc.prefix_keys[0] is None and d not in seen)
                seen.add(d)
            kvs, prefixes = encode_chunks(self.model, seqs, capture, self.backend)
            for i, kv, prefix in zip(fresh, kvs, prefixes):
                out[i] = kv
                if prefix is not None:
                    docs[batch[i][0]].prefix_keys, docs[batch[i][0]].prefix_values = prefix
        for i, (d, c) in enumerate(batch):
            doc = docs[d]
            if doc.encoded is not None:
                if doc.toks.prefix and doc.prefix_keys[0] is None:
                    doc.prefix_keys, doc.prefix_values = doc.encoded.load_prefix(self.device)
                out[i] = doc.encoded.load_chunk(doc.stored_chunk(c), self.device)
        return out

    def _question_pass(self, cfg, cache: CompressedKVCache, row: int, suffix: list[int], p0: int, stats,
                       observer=None) -> torch.Tensor:
        """Re-encode the question over cache row `row`; returns the last row's logits [1, vocab]."""
        model, device, backend = self.model, self.device, self.backend
        m, merged = len(suffix), cache.lengths[row]
        ids = torch.tensor(suffix, dtype=torch.long, device=device)
        pos = torch.arange(p0, p0 + m, device=device)
        cu_q = torch.tensor([0, m], dtype=torch.int32, device=device)
        cu_k = torch.tensor([0, merged + m], dtype=torch.int32, device=device)
        cal = cfg.calibration
        masked_counts = {}

        def attend(layer, q, k, v):
            cache.append(layer, row, merged, k, v)
            k_all, v_all = cache.packed_view(layer, row, merged + m)
            key_mask = None
            if cal is not None and cal.first_layer <= layer <= cal.last_layer:
                rows = min(cal.rows, m)
                _, _, scores = chunk_attention(q, k_all, v_all, cu_q, cu_k, causal=True, score_window=rows,
                                               score_reduce="none", return_lse=False, backend=backend)
                key_mask = (scores / rows > cal.tau) & _region_mask(cal, merged, m, device)[:, None]
                cache.set_key_mask(layer, row, key_mask)
                masked_counts[layer] = key_mask.sum(dim=0).tolist()
                if observer is not None:
                    observer.calibration(layer, scores / rows, key_mask)
            out, _, _ = chunk_attention(q, k_all, v_all, cu_q, cu_k, causal=True, key_mask=key_mask,
                                        return_lse=False, backend=backend)
            return out

        hidden = model(ids, pos, attend, out_rows=torch.tensor([m - 1], device=device))
        cache.lengths[row] = merged + m
        if cal is not None:
            stats["calibration_masked_per_head"] = masked_counts
        return model.lm_head_rows(hidden)

    def _decode(self, cfg, cache: CompressedKVCache, logits: torch.Tensor,
                positions: list[int]) -> tuple[list[list[int]], int]:
        """Decode every row of `cache` together from `logits` [B, vocab], row b's next token at position
        positions[b]. Returns (tokens per row, EOS stripped; decode steps run).

        A sequence that ends (EOS or max_new_tokens) leaves the batch at once: its cache row is compacted
        away (CompressedKVCache.keep_rows), so later steps spend no linear-layer, attention or logit work on it.
        Sampling uses one generator per sequence, seeded alike, so each row draws what it would alone."""
        model, device, backend = self.model, self.device, self.backend
        batch = cache.batch
        generators = None
        if cfg.temperature > 0:
            generators = []
            for _ in range(batch):
                generators.append(torch.Generator(device=device))
                generators[-1].manual_seed(cfg.seed if cfg.seed is not None else 0)
        eos = set() if cfg.ignore_eos else self.eos_ids()
        outs: list[list[int]] = [[] for _ in range(batch)]
        seqs = list(range(batch))  # cache row i decodes sequence seqs[i]
        rows = torch.arange(batch, device=device)
        at = torch.tensor(cache.lengths, dtype=torch.long, device=device)  # where each row's next K/V goes
        pos = torch.tensor(positions, dtype=torch.long, device=device)
        steps = 0
        while True:
            if generators is None:
                tokens = logits.argmax(dim=-1).tolist()
            else:
                tokens = [int(sample_next(logits[i:i + 1], cfg.temperature, cfg.top_p, generators[s])[0])
                          for i, s in enumerate(seqs)]
            alive = []
            for i, (s, token) in enumerate(zip(seqs, tokens)):
                outs[s].append(token)
                if token not in eos and len(outs[s]) < cfg.max_new_tokens:
                    alive.append(i)
            if not alive:
                break
            if len(alive) < len(seqs):
                cache.keep_rows(alive)
                index = torch.tensor(alive, dtype=torch.long, device=device)
                seqs, tokens = [seqs[i] for i in alive], [tokens[i] for i in alive]
                rows, at, pos = rows[:len(alive)], at[index], pos[index]
            if max(cache.lengths) >= cache.capacity:
                raise RuntimeError(f"KV cache overflow: {max(cache.lengths) + 1} > capacity {cache.capacity}")
            cache_lens = (at + 1).to(torch.int32)

            def attend(layer, q, k, v):
                cache.append_tokens(layer, rows, at, k, v)
                return decode_attention(q, cache.keys[layer], cache.values[layer], cache_lens,
                                        key_mask=cache.key_mask[layer], backend=backend)

            hidden = model(torch.tensor(tokens, dtype=torch.long, device=device), pos, attend)
            cache.lengths = [n + 1 for n in cache.lengths]
            at += 1
            pos += 1
            steps += 1
            logits = model.lm_head_rows(hidden)
        for out in outs:
            if out and out[-1] in eos:
                out.pop()
        return outs, steps


def _region_mask(cal, merged: int, m: int, device) -> torch.Tensor:
    """Which of the merged + m keys calibration may mask: merged-cache positions in the region, never the
    question's own tokens."""
    j = torch.arange(merged + m, device=device)
    n = cal.region_tokens
    in_cache = j < merged
    if cal.region == "sink":
        return in_cache & (j < n)
    if cal.region == "recent":
        return in_cache & (j >= merged - n)
    if cal.region == "middle":
        return in_cache & (j >= n) & (j < merged - n)
    return in_cache


_nan_last = nan_last  # distributed.py and benchmarks import it from here
