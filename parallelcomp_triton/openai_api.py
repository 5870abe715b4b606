"""OpenAI's chat-completions format: a request's fields checked and turned into a question, its documents and
a config; the usage, sources and finish reason of a response."""
import dataclasses
import json

from .docstore import valid_id
from .serve_engine import ApiError

MAX_STOP_STRINGS = 4  # as OpenAI's API
MAX_DOCUMENTS = 32  # per question


def field(body: dict, name: str, types, check=None, message: str = "", default=None):
    """body[name] if of `types` (bool is not a number) and passing `check`; None/missing: `default`."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise ApiError(400, f"{name}: expected {message or types}", param=name)
    if not isinstance(value, types) or (check is not None and not check(value)):
        raise ApiError(400, f"{name}: expected {message}, got {json.dumps(value)[:80]}", param=name)
    return value


def _content_text(message: dict, i: int) -> str:
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported", param="messages")
            texts.append(part["text"])
        return "".join(texts)
    raise ApiError(400, f"messages[{i}].content: expected a string or a list of text parts", param="messages")


def split_messages(messages: list[dict], has_documents: bool) -> tuple[str | None, str]:
    """(inline document or None, question) of a chat request, by the rule of the module's docstring."""
    texts = [_content_text(m, i) for i, m in enumerate(messages)]
    last = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=None)
    if last is None:
        raise ApiError(400, "messages: no user message (the last user message is the question)", param="messages")
    question = texts[last]
    if has_documents:
        if not question.strip():
            raise ApiError(400, "the question (the last user message) is empty", param="messages")
        return None, question.strip()
    earlier = "\n\n".join(t for t in texts[:last] if t.strip())
    if earlier:
        if not question.strip():
            raise ApiError(400, "the question (the last user message) is empty", param="messages")
        return earlier, question.strip()
    text = question.strip()
    for sep in ("\n\n", "\n"):
        cut = text.rfind(sep)
        if cut > 0:
            document, question = text[:cut].strip(), text[cut:].strip()
            if document and question:
                return document, question
    if not text:
        raise ApiError(400, "the question (the last user message) is empty", param="messages")
    raise ApiError(400, "no document: name stored documents in 'documents', or put the document before the "
                        "question (in earlier messages, or in paragraphs before the message's last one)",
                   param="messages")


def parse_chat(body: dict, engine) -> dict:
    """The checked fields of a chat completion request."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise ApiError(400, "messages: expected a non-empty list of {role, content} objects", param="messages")
    documents = body.get("documents")
    if documents is not None:
        if not isinstance(documents, list) or not documents or len(documents) > MAX_DOCUMENTS:
            raise ApiError(400, f"documents: expected a list of 1 to {MAX_DOCUMENTS} document ids",
                           param="documents")
        for doc_id in documents:
            if not valid_id(doc_id):
                raise ApiError(400, f"documents: {json.dumps(doc_id)[:80]} is not a document id",
                               param="documents", code="invalid_document_id")
        if len(set(documents)) != len(documents):
            raise ApiError(400, "documents: an id is named twice", param="documents")
        for doc_id in documents:
            if engine.store.get(doc_id) is None:
                raise ApiError(404, f"no document {doc_id}", param="documents", code="document_not_found")
    text, question = split_messages(messages, documents is not None)
    n = field(body, "n", int, lambda v: v == 1, "1 (one answer per request)", 1)
    max_tokens = field(body, "max_completion_tokens", int, lambda v: v >= 1, "an integer >= 1")
    max_tokens = field(body, "max_tokens", int, lambda v: v >= 1, "an integer >= 1", max_tokens)
    temperature = field(body, "temperature", (int, float), lambda v: 0 <= v <= 2, "a number in [0, 2]")
    top_p = field(body, "top_p", (int, float), lambda v: 0 < v <= 1, "a number in (0, 1]")
    seed = field(body, "seed", int, None, "an integer")
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or len(stop) > MAX_STOP_STRINGS
                             or not all(isinstance(s, str) and s for s in stop)):
        raise ApiError(400, f"stop: expected a string or a list of up to {MAX_STOP_STRINGS} non-empty strings",
                       param="stop")
    stream = field(body, "stream", bool, None, "true or false", False)
    options = field(body, "stream_options", dict, None, "an object", {})
    cfg = dataclasses.replace(
        engine.cfg,
        max_new_tokens=max_tokens if max_tokens is not None else engine.cfg.max_new_tokens,
        temperature=float(temperature) if temperature is not None else engine.cfg.temperature,
        top_p=float(top_p) if top_p is not None else engine.cfg.top_p,
        seed=seed if seed is not None else engine.cfg.seed,
        stop_strings=tuple(stop) if stop else engine.cfg.stop_strings)
    del n
    return {"doc_ids": tuple(documents or ()), "text": text, "question": question, "cfg": cfg, "stream": stream,
            "include_usage": bool(options.get("include_usage"))}


def usage(res, stored: bool) -> dict:
    st = res.stats
    prompt = st.prefix_tokens + st.document_tokens + st.question_tokens
    out = {"prompt_tokens": prompt, "completion_tokens": len(res.token_ids),
           "total_tokens": prompt + len(res.token_ids)}
    if stored:  # the prefix and the documents' K/V were computed when they were stored
        out["prompt_tokens_details"] = {"cached_tokens": st.prefix_tokens + st.document_tokens}
    return out


def sources(res, doc_ids) -> list[dict]:
    """The chunks the answer was drawn from (chunk eviction's survivors, in answer order): the document's id
    (None: the request's own text), the chunk's index in that document and its token span there."""
    st = res.stats
    owners = [d or 0 for d in (getattr(st, "chunk_documents", None) or [0] * len(st.chunk_spans))]
    local, first = [], {}
    for c, d in enumerate(owners):
        first.setdefault(d, c)
        local.append(c - first[d])
    # Spans of several documents count on from the first document's tokens: made relative to their own.
    offset = {d: st.chunk_spans[c][0] for d, c in first.items()}
    return [{"document": doc_ids[owners[c]] if doc_ids else None, "chunk": local[c],
             "tokens": [st.chunk_spans[c][0] - offset[owners[c]], st.chunk_spans[c][1] - offset[owners[c]]]}
            for c in st.kept_chunks]


def finish_reason(res, cfg) -> str:
    return "length" if len(res.token_ids) >= cfg.max_new_tokens else "stop"


# ---------------------------------------------------------------------------------------------- app
