"""Stage 1, planning: one (document, question) pair tokenized, checked against the trained window and cut into
chunks that each reuse the model's trained positions. No model pass; every input check that needs none is
here, so bad input fails before any work starts."""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

from .config import ParallelCompConfig
from .encode import ChunkSource
from .errors import ParallelCompError
from .prompt import (PromptTokens, resolve_template, score_rows, sentence_ends, snap_spans, split_even,
                     template_name, tokenize_prompt, truncate_middle)
from .stats import Stats
from .storage import CHUNKING_SETTINGS, EncodedDocument, check_model, dtype_name, encoding_settings


@dataclass(frozen=True)
class Plan:
    """What the method will do with one question about one document or several (whose chunks then compete
    in one ranking). `stats` is the answer's report, filled in by every stage."""

    toks: PromptTokens                  # document: the documents' tokens one after another
    spans: tuple[tuple[int, int], ...]  # document-token spans of the chunks (none crosses two documents)
    keep: int                           # K: chunks kept after chunk eviction
    budget: int | None                  # B: KV tokens kept per chunk, layer and KV head (None: all)
    append_question: bool               # every chunk is scored with the question after it (mode parallelcomp)
    capacity: int                       # merged-cache positions this question can need (upper bound)
    stats: Stats
    t0: float                           # when planning started (the answer's total time counts from here)
    # Per chunk, the encoding its K/V are read from and its index there (None: encoded on the fly).
    stored: tuple[tuple[EncodedDocument, int] | None, ...] | None = None
    chunk_documents: tuple[int, ...] | None = None  # several documents: which one each chunk comes from

    @property
    def source(self) -> ChunkSource:
        return ChunkSource(self.toks.prefix, self.toks.document, self.spans, self.stored)

    def only_chunks(self, chunks: list[int]) -> "Plan":
        """This plan as if chunk eviction had kept exactly `chunks` (indices into its spans)."""
        if not self.append_question or not chunks or not all(0 <= c < len(self.spans) for c in chunks):
            raise ParallelCompError(f"chunks {chunks}: expected indices into the {len(self.spans)} chunks "
                                    "of mode 'parallelcomp'")

        def pick(values):
            return tuple(values[c] for c in chunks) if values is not None else None

        return dataclasses.replace(self, spans=pick(self.spans), stored=pick(self.stored),
                                   chunk_documents=pick(self.chunk_documents))


def resolve_config(config: ParallelCompConfig | None, max_new_tokens: int | None,
                   num_layers: int) -> ParallelCompConfig:
    """A checked copy of `config` (defaults if None) with `max_new_tokens` applied."""
    cfg = dataclasses.replace(config) if config is not None else ParallelCompConfig()
    if max_new_tokens is not None:
        cfg.max_new_tokens = max_new_tokens
    cfg.check()
    if cfg.calibration is not None:
        cfg.calibration.check(num_layers)
    return cfg


def chunk_spans(tokenizer, cfg: ParallelCompConfig, document: list[int], chunk_tokens: int,
                limit: int) -> list[tuple[int, int]]:
    """Even spans of about `chunk_tokens`, boundaries snapped to sentence ends (spans at most `limit`)."""
    spans = split_even(len(document), chunk_tokens)
    if cfg.snap_to_sentences and len(spans) > 1:
        sentences, lines = sentence_ends(tokenizer, document)
        spans = snap_spans(spans, sentences, slack=max(1, chunk_tokens // 8), limit=limit, fallback=lines)
    return spans


def plan_document(model, tokenizer, cfg: ParallelCompConfig, context, question: str,
                  dtype_source: str = "") -> Plan:
    """Tokenize one question and its document(s) and cut them into chunks. `context`: a document's text, an
    EncodedDocument (then only the question is tokenized and the encoding's chunks are used: the config
    must chunk and prompt as the encoding did), or a list of these, whose chunks are ranked together."""
    if question is None or (isinstance(question, str) and not question.strip()):
        raise ParallelCompError("the question is empty")
    several = isinstance(context, (list, tuple))
    documents = list(context) if several else [context]
    if not isinstance(question, str) or not all(isinstance(d, (str, EncodedDocument)) or (d is None and not several)
                                                for d in documents):
        raise ParallelCompError("the context and the question must be strings")
    if not documents:
        raise ParallelCompError("no documents: give at least one")
    if several and cfg.mode != "parallelcomp":
        raise ParallelCompError(f"several documents are answered in mode 'parallelcomp', not {cfg.mode!r}")
    args = model.args
    stats = Stats(mode=cfg.mode, dtype=dtype_name(model.embed_tokens.weight.dtype), dtype_source=dtype_source,
                  template="prompt" if cfg.prompt is not None else template_name(tokenizer, cfg.template))
    t0 = time.perf_counter()
    template = resolve_template(tokenizer, cfg.template, cfg.prompt, cfg.instruction)
    parts = [_tokenize_part(model, tokenizer, cfg, template, d, question) for d in documents]
    toks = parts[0][0]
    encodings = [str(d.path) for d in documents if isinstance(d, EncodedDocument)]
    if encodings:
        stats.encoding = ", ".join(encodings)
    window = cfg.window or args.max_position_embeddings
    fixed = len(toks.prefix) + len(toks.suffix) + cfg.max_new_tokens
    if fixed >= window:
        raise ParallelCompError(f"prompt prefix + question ({len(toks.prefix) + len(toks.suffix)} tokens) "
                                f"+ max_new_tokens ({cfg.max_new_tokens}) do not fit the {window}-token window")
    room = window - fixed
    stats.prefix_tokens, stats.question_tokens = len(toks.prefix), len(toks.suffix)
    stats.score_rows = score_rows(toks, cfg.score_window)  # the suffix rows whose attention keeps KV

    stored, chunk_documents = None, None
    if cfg.mode == "parallelcomp":
        chunk_tokens = cfg.chunk_tokens or room
        if chunk_tokens > room:
            raise ParallelCompError(f"chunk_tokens {chunk_tokens}: a chunk plus prompt and answer must fit the "
                                    f"{window}-token window (at most {room} here)")
        document, spans, stored_list, owners = [], [], [], []
        for i, ((part, encoded), source) in enumerate(zip(parts, documents)):
            if encoded is None:
                local = chunk_spans(tokenizer, cfg, part.document, chunk_tokens, room)
            else:
                # The encoding snapped its chunks with the loosest limit any question allows; spans that fit
                # this question's room are then exactly what chunk_spans(..., room) gives (a tighter limit
                # only removes cut points the encoding did not use).
                local = encoded.spans
                longest = max(e - s for s, e in local)
                if longest > room:
                    raise ParallelCompError(f"encoding {encoded.path}: its longest chunk ({longest} tokens) plus "
                                            f"prompt, question and answer does not fit the {window}-token window "
                                            f"(at most {room} here); ask a shorter question or lower "
                                            "max_new_tokens")
            offset = len(document)
            document += part.document
            spans += [(offset + s, offset + e) for s, e in local]
            stored_list += [(encoded, c) for c in range(len(local))] if encoded is not None else [None] * len(local)
            owners += [i] * len(local)
        toks = dataclasses.replace(toks, document=document)
        stored = tuple(stored_list) if encodings else None
        chunk_documents = tuple(owners) if several else None
        keep, budget, append_question = cfg.keep_chunks, cfg.kv_budget, True
    else:
        doc = truncate_middle(toks.document, room) if cfg.mode == "truncate" else toks.document
        toks = dataclasses.replace(toks, document=doc)
        spans = [(0, len(doc))]
        keep, budget, append_question = 1, None, False
    stats.document_tokens = sum(len(part.document) for part, _ in parts)
    # The merged cache holds the prefix, the K longest kept chunks at most, the question and the answer.
    kept_lens = sorted(min(budget, e - s) if budget is not None else e - s for s, e in spans)[-keep:]
    capacity = len(toks.prefix) + sum(kept_lens) + len(toks.suffix) + cfg.max_new_tokens
    stats.time_tokenize_s = time.perf_counter() - t0
    return Plan(toks=toks, spans=tuple(tuple(s) for s in spans), keep=keep, budget=budget,
                append_question=append_question, capacity=capacity, stats=stats, t0=t0, stored=stored,
                chunk_documents=chunk_documents)


def _tokenize_part(model, tokenizer, cfg, template: str, context, question: str):
    """(PromptTokens, EncodedDocument or None) of one document: its own tokens, or its encoding's (checked
    against this config and model, and its prefix against this template's)."""
    if not isinstance(context, EncodedDocument):
        return tokenize_prompt(tokenizer, template, context, question), None
    encoded = context
    check_encoding(model, tokenizer, cfg, encoded)
    toks = tokenize_prompt(tokenizer, template, "x", question)  # the prefix and the question
    if toks.prefix != encoded.prefix:
        raise ParallelCompError(f"encoding {encoded.path}: made with another template prefix "
                                f"({len(encoded.prefix)} tokens, this config gives {len(toks.prefix)}); "
                                "use the encoding's template and instruction, or encode again")
    return dataclasses.replace(toks, document=encoded.document), encoded


def plan_all(model, tokenizer, cfg: ParallelCompConfig, pairs, return_errors: bool = False,
             dtype_source: str = "") -> list:
    """`plan_document` for every (context, question) pair: a Plan each, or with `return_errors` the
    ParallelCompError of a bad pair in its slot; otherwise the first bad pair raises, naming its index."""
    planned: list = []
    for i, pair in enumerate(pairs):
        try:
            try:
                context, question = pair
            except (TypeError, ValueError):
                raise ParallelCompError("expected a (context, question) pair") from None
            planned.append(plan_document(model, tokenizer, cfg, context, question, dtype_source))
        except ParallelCompError as e:
            if not return_errors:
                raise ParallelCompError(f"pair {i}: {e}" if len(pairs) > 1 else str(e)) from None
            planned.append(e)
    return planned


def check_encoding(model, tokenizer, cfg: ParallelCompConfig, encoded: EncodedDocument) -> None:
    """Refuse, in one line, an encoding this config or model cannot answer from."""
    if cfg.mode != "parallelcomp":
        raise ParallelCompError(f"an encoded document is answered in mode 'parallelcomp', not {cfg.mode!r}")
    check_model(encoded, model, tokenizer)
    made, now = encoded.settings(), encoding_settings(cfg, model.args.max_position_embeddings)
    for name in CHUNKING_SETTINGS:
        if made[name] != now[name]:
            raise ParallelCompError(f"encoding {encoded.path}: made with {name}={made[name]!r}, this config "
                                    f"has {now[name]!r}; use the encoding's settings "
                                    "(EncodedDocument.settings()) or encode again")


def plan_encoding(tokenizer, cfg: ParallelCompConfig, context: str, trained_window: int):
    """What `encode` writes, checked: (prefix tokens, document tokens, chunk spans, settings)."""
    if cfg.mode != "parallelcomp":
        raise ParallelCompError(f"encode: mode {cfg.mode!r} cuts the document by the question; only mode "
                                "'parallelcomp' encodes chunks independently of it")
    if cfg.chunk_tokens is None:
        raise ParallelCompError("encode: chunk_tokens=None sizes chunks by the question; give chunk_tokens")
    if not isinstance(context, str):
        raise ParallelCompError("the context must be a string")
    template = resolve_template(tokenizer, cfg.template, cfg.prompt, cfg.instruction)
    toks = tokenize_prompt(tokenizer, template, context, "?")
    window = cfg.window or trained_window
    # The loosest room any question leaves (a suffix and an answer of at least one token each).
    limit = window - len(toks.prefix) - 2
    if cfg.chunk_tokens > limit:
        raise ParallelCompError(f"chunk_tokens {cfg.chunk_tokens}: a chunk plus prompt and answer must fit the "
                                f"{window}-token window (at most {limit} here)")
    spans = chunk_spans(tokenizer, cfg, toks.document, cfg.chunk_tokens, limit)
    settings = dict(encoding_settings(cfg, trained_window), batch_chunks=cfg.batch_chunks)
    return toks.prefix, toks.document, spans, settings
