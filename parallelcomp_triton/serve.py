"""HTTP server: OpenAI-compatible chat completions over documents encoded once.

    python -m parallelcomp_triton.serve [--model DIR|ORG/NAME] [--store DIR] [--host 127.0.0.1] [--port 8000]
                                        [--api-key KEY] [settings options of `run`]

Endpoints (FastAPI on uvicorn): POST /v1/chat/completions (streamed or not; `documents: [id, ...]` names
stored documents), POST/GET /v1/documents, GET/DELETE /v1/documents/{id}, GET /v1/models, GET /health.
Every error is a JSON object in OpenAI's format, {"error": {"message", "type", "param", "code"}}.

Who does what: the event loop parses and checks requests and never runs the model. One answering thread
owns the questions: it takes the waiting ones from a bounded queue (503 when full), answers every
non-streamed question that shares decoding settings with the first in one `generate_batch` call, and
streamed ones one at a time through `ParallelComp.stream`, handing each piece to the event loop (a client
that disconnects closes its stream, which stops the decoding). One encoding thread encodes new documents
(its own bounded queue) with the same weights and its own tokenizer, alongside the answering thread, so a
long encoding does not hold up questions about stored documents.

A chat request without `documents` is answered from the text of its messages: the last user message is the
question and the text of every message before it (system prompt, earlier turns, in order, joined by blank
lines) is the document; a request with a single message is split at its last blank line (else at its last
line break): the paragraphs before it are the document, the last paragraph the question. Such a document is
answered fresh and not stored.
"""
import asyncio
import hmac
import json
import os
import sys
import time
import traceback
import uuid

from .cli import Parser, add_model_options, add_settings_options, cli_main, config_from_args
from .docstore import DocStore, document_id, valid_id
from .errors import ParallelCompError
from .openai_api import field, finish_reason, parse_chat, sources, usage
from .serve_engine import ApiError, Engine, Job

API_KEY_ENV = "PARALLELCOMP_API_KEY"


def default_store() -> str:
    from .bundled import cache_dir

    return os.path.join(str(cache_dir()), "store")


def build_parser() -> Parser:
    p = Parser(prog="python -m parallelcomp_triton.serve", description=__doc__.split("\n")[0])
    add_model_options(p, device=True)
    p.add_argument("--store", default=None,
                   help="directory of the stored documents (default: $PARALLELCOMP_CACHE/store or "
                        "~/.cache/parallelcomp_triton/store)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None,
                   help=f"every request must send 'Authorization: Bearer KEY' (default: ${API_KEY_ENV}; unset: none)")
    p.add_argument("--max-body-bytes", type=int, default=16 << 20,
                   help="largest request body, document uploads included (default 16 MiB); larger: 413")
    p.add_argument("--max-document-tokens", type=int, default=262144,
                   help="longest document POST /v1/documents encodes (default 262144 tokens); longer: 413")
    p.add_argument("--queue-size", type=int, default=64,
                   help="questions (and, apart, documents to encode) that may wait; more: 503 (default 64)")
    p.add_argument("--max-batch", type=int, default=8, help="questions answered together at most (default 8)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    add_settings_options(p, omit=("mode",))
    return p


def main(argv=None) -> int:
    return cli_main(argv, build_parser, _main)


def _main(args) -> int:
    import uvicorn

    from . import ParallelComp

    cfg = config_from_args(args)
    if cfg.chunk_tokens is None:
        raise ParallelCompError("--chunk-tokens max sizes chunks by the question; the server encodes documents "
                                "before their questions: give a number")
    for name in ("max_body_bytes", "max_document_tokens", "queue_size", "max_batch"):
        if getattr(args, name) < 1:
            raise ParallelCompError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")
    if not 0 <= args.port < 65536:
        raise ParallelCompError(f"--port {args.port}: must be in 0-65535")
    store = DocStore(args.store or default_store())
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ParallelCompError(f"--device {device}: CUDA is not available on this machine")
    pc = ParallelComp.from_pretrained(args.model, dtype=args.dtype, device=device, backend=args.backend)
    engine = Engine(pc, cfg, store, queue_size=args.queue_size, max_batch=args.max_batch,
                    max_document_tokens=args.max_document_tokens, model_id=model_name(args.model, pc))
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    app = create_app(engine, api_key=api_key, max_body_bytes=args.max_body_bytes)
    print(f"serving {engine.model_id} on http://{args.host}:{args.port} (store {store.root}, "
          f"{len(store)} documents{', API key required' if api_key else ''})", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def model_name(arg, pc) -> str:
    """The model's id in the API: the --model Hub id as given, a directory's name, or the bundled model's."""
    if arg is None:
        return "SmolLM2-135M-Instruct"
    if os.path.isdir(arg):
        return os.path.basename(os.path.normpath(arg))
    return str(arg)


# ---------------------------------------------------------------------------------------------- errors
class BodyTooLarge(Exception):
    pass


def create_app(engine: Engine, api_key: str | None = None, max_body_bytes: int = 16 << 20):
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    app = FastAPI(title="parallelcomp-triton", docs_url=None, redoc_url=None, openapi_url=None)

    def error_response(e: ApiError, headers=None) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return error_response(e, {"Retry-After": "1"} if e.status == 503 else None)

    @app.exception_handler(BodyTooLarge)
    async def _too_large(request, e):
        return error_response(ApiError(413, f"the request body is larger than {max_body_bytes} bytes "
                                            "(--max-body-bytes)", code="request_too_large"))

    @app.exception_handler(HTTPException)
    async def _http_error(request, e: HTTPException):
        message = {404: f"no route {request.url.path}", 405: f"method {request.method} not allowed on "
                                                             f"{request.url.path}"}.get(e.status_code, str(e.detail))
        return error_response(ApiError(e.status_code, message))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e):
        where = "; ".join(f"{'.'.join(map(str, err.get('loc', ())))}: {err.get('msg', '')}" for err in e.errors())
        return error_response(ApiError(400, f"invalid request ({where[:200]})"))

    @app.exception_handler(Exception)
    async def _internal(request, e):
        traceback.print_exception(e)
        return error_response(ApiError(500, f"internal error ({type(e).__name__}); see the server log"))

    async def read_json(request: Request) -> dict:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, ValueError) as e:
            raise ApiError(400, f"the body is not valid JSON ({type(e).__name__}: {str(e)[:100]})",
                           code="invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object", code="invalid_json")
        return body

    # -------------------------------------------------------------- meta
    @app.get("/health")
    async def health():
        return engine.health()

    def model_card() -> dict:
        return {"id": engine.model_id, "object": "model", "created": engine.started, "owned_by": "parallelcomp"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != engine.model_id:
            raise ApiError(404, f"no model {model_id}; this server serves {engine.model_id}", param="model",
                           code="model_not_found")
        return model_card()

    # -------------------------------------------------------------- documents
    @app.post("/v1/documents")
    async def add_document(request: Request):
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        name = None
        if kind == "multipart/form-data":
            try:
                form = await request.form(max_files=1, max_fields=4, max_part_size=max_body_bytes)
            except BodyTooLarge:
                raise
            except Exception as e:
                raise ApiError(400, f"the form cannot be read ({str(e)[:100]})") from None
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise ApiError(400, "the form must carry the document as a file field named 'file'", param="file")
            data, name = await upload.read(), upload.filename
            if isinstance(form.get("name"), str):
                name = form["name"]
            text = _decode(data, "file")
        elif kind in ("text/plain", "text/markdown"):
            text = _decode(await request.body(), "body")
        elif kind in ("application/json", ""):
            body = await read_json(request)
            text = body.get("text")
            if not isinstance(text, str):
                raise ApiError(400, "text: expected the document as a string (or upload it as a file)",
                               param="text")
            name = field(body, "name", str, None, "a string")
        else:
            raise ApiError(415, f"content type {kind!r}: send JSON {{\"text\": ...}}, text/plain or a "
                                "multipart/form-data upload (field 'file')")
        if not text.strip():
            raise ApiError(400, "the document is empty", param="text")
        doc_id = document_id(engine.fingerprint, text)
        info = engine.store.get(doc_id)
        if info is not None:
            return JSONResponse(dict(info, encoded=False), status_code=200)
        # The same text posted again while it is encoded waits for that encoding.
        pending = encoding.get(doc_id)
        if pending is None:
            job = engine.submit(engine.encodes, kind="encode", text=text, doc_id=doc_id, name=name)
            pending = encoding[doc_id] = asyncio.ensure_future(_outcome(job))
            pending.add_done_callback(lambda _: encoding.pop(doc_id, None))
        info, created = await asyncio.shield(pending)
        return JSONResponse(dict(info, encoded=created), status_code=201 if created else 200)

    encoding: dict[str, asyncio.Future] = {}

    def checked_id(doc_id: str) -> str:
        if not valid_id(doc_id):
            raise ApiError(400, f"{doc_id[:80]!r} is not a document id (doc- and 32 hex digits)",
                           param="id", code="invalid_document_id")
        return doc_id

    @app.get("/v1/documents")
    async def list_documents():
        return {"object": "list", "data": engine.store.list()}

    @app.get("/v1/documents/{doc_id}")
    async def get_document(doc_id: str):
        info = engine.store.get(checked_id(doc_id))
        if info is None:
            raise ApiError(404, f"no document {doc_id}", param="id", code="document_not_found")
        return info

    @app.delete("/v1/documents/{doc_id}")
    async def delete_document(doc_id: str):
        checked_id(doc_id)
        removed = await asyncio.to_thread(engine.store.remove, doc_id)
        engine.forget(doc_id)
        if not removed:
            raise ApiError(404, f"no document {doc_id}", param="id", code="document_not_found")
        return {"id": doc_id, "object": "document", "deleted": True}

    # -------------------------------------------------------------- chat
    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req = parse_chat(await read_json(request), engine)
        job = engine.submit(engine.questions, kind="stream" if req["stream"] else "answer",
                            question=req["question"], doc_ids=req["doc_ids"], text=req["text"], cfg=req["cfg"])
        head = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": engine.model_id}
        extra = lambda res: {"documents": list(req["doc_ids"]), "sources": sources(res, req["doc_ids"])}  # noqa: E731
        if not req["stream"]:
            try:
                res = await _outcome_while_connected(job, request)
            except asyncio.CancelledError:
                job.cancelled.set()
                raise
            if res is None:  # the client left: nobody to answer (499, as nginx logs it)
                return JSONResponse(ApiError(499, "the client closed the connection").body(), status_code=499)
            return {**head, "object": "chat.completion",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": res.text},
                                 "logprobs": None, "finish_reason": finish_reason(res, req["cfg"])}],
                    "usage": usage(res, bool(req["doc_ids"])), **extra(res)}
        try:
            first = await job.events.get()  # planning errors still get their 4xx
        except asyncio.CancelledError:
            job.cancelled.set()
            raise
        if first[0] == "error":
            raise first[1]

        def chunk(delta, reason=None, **more) -> str:
            return "data: " + json.dumps({**head, "object": "chat.completion.chunk",
                                          "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                                       "finish_reason": reason}], **more}) + "\n\n"

        async def events():
            try:
                yield chunk({"role": "assistant", "content": ""})
                while True:
                    event = await job.events.get()
                    if event[0] == "piece":
                        yield chunk({"content": event[1]})
                    elif event[0] == "error":
                        yield "data: " + json.dumps(event[1].body()) + "\n\n"
                        return
                    else:
                        res = event[1]
                        yield chunk({}, finish_reason(res, req["cfg"]), **extra(res))
                        if req["include_usage"]:
                            yield "data: " + json.dumps({**head, "object": "chat.completion.chunk", "choices": [],
                                                         "usage": usage(res, bool(req["doc_ids"]))}) + "\n\n"
                        yield "data: [DONE]\n\n"
                        return
            finally:
                job.cancelled.set()  # a disconnect cancels this generator: the answering thread stops decoding

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return Guard(app, api_key, max_body_bytes)


async def _outcome(job: Job):
    """The value of a job's ("done", value) event; its ("error", e) raises e."""
    while True:
        event = await job.events.get()
        if event[0] == "done":
            return event[1]
        if event[0] == "error":
            raise event[1]


async def _outcome_while_connected(job: Job, request, poll: float = 0.25):
    """`_outcome(job)`, or None once the client has disconnected: the job is then cancelled, so the
    answering thread drops it if it has not taken it yet (a batch it is already in runs to its end)."""
    outcome = asyncio.ensure_future(_outcome(job))
    try:
        while True:
            done, _ = await asyncio.wait({outcome}, timeout=poll)
            if done:
                return outcome.result()
            if await request.is_disconnected():
                job.cancelled.set()
                return None
    finally:
        outcome.cancel()


def _decode(data: bytes, param: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"the document is not UTF-8 text (bad byte at offset {e.start})", param=param) from None


class Guard:
    """ASGI middleware in front of every route: the API key (401) and the body size (413), before any
    route reads the body."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.api_key is not None:
            auth = headers.get("authorization", "")
            given = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(given.encode(), self.api_key.encode()):
                return await _send_json(send, ApiError(401, "missing or wrong API key (send 'Authorization: "
                                                            "Bearer KEY')", code="invalid_api_key"),
                                        {"www-authenticate": "Bearer"})
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            return await _send_json(send, ApiError(413, f"the request body is larger than {self.max_body_bytes} "
                                                        "bytes (--max-body-bytes)", code="request_too_large"),
                                    {"connection": "close"})
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:
                    raise BodyTooLarge()
            return message

        await self.app(scope, counted, send)


async def _send_json(send, e: ApiError, headers: dict | None = None) -> None:
    body = json.dumps(e.body()).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": e.status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


if __name__ == "__main__":
    sys.exit(main())
