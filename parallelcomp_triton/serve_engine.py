"""The server's engine: the one model shared by every request. Questions wait in a bounded queue and one
answering thread takes them, non-streamed ones that share decoding settings together in one
`generate_batch` call, streamed ones one at a time through `ParallelComp.stream`; new documents are encoded
by a second thread from a queue of their own (serve.py says why)."""
import asyncio
import collections
import copy
import dataclasses
import json
import threading
import time
import traceback

from .docstore import DocStore
from .errors import ParallelCompError


class ApiError(Exception):
    """An error answered as OpenAI does: HTTP `status`, {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
             404: "invalid_request_error", 405: "invalid_request_error", 409: "invalid_request_error",
             413: "invalid_request_error", 415: "invalid_request_error", 503: "server_error", 500: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


# ---------------------------------------------------------------------------------------------- jobs
@dataclasses.dataclass
class Job:
    """One piece of work for a model thread; it reports to the event loop through `events` (an asyncio.Queue):
    ("started",), ("piece", text), ("done", value) or ("error", ApiError)."""

    kind: str                                   # "answer", "stream" or "encode"
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    question: str = ""
    doc_ids: tuple = ()                         # stored documents (answer, stream)
    text: str | None = None                     # an inline document (answer, stream) or the text to encode
    cfg: object = None                          # ParallelCompConfig with the request's decoding settings
    doc_id: str | None = None                   # encode: the id it will get
    name: str | None = None                     # encode: the file name or name given
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)

    def emit(self, *event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is closed (server shutting down)
            self.cancelled.set()

    def batch_key(self):
        c = self.cfg
        return (c.max_new_tokens, c.temperature, c.top_p, c.seed, c.stop_strings)


class JobQueue:
    """A bounded FIFO shared by the event loop (put) and one model thread (take)."""

    def __init__(self, size: int):
        self.size = size
        self.jobs: collections.deque[Job] = collections.deque()
        self.cond = threading.Condition()

    def put(self, job: Job) -> None:
        with self.cond:
            if len(self.jobs) >= self.size:
                raise ApiError(503, f"the server is busy ({len(self.jobs)} requests waiting); retry later",
                               code="overloaded")
            self.jobs.append(job)
            self.cond.notify()

    def __len__(self) -> int:
        with self.cond:
            return len(self.jobs)

    def take(self, max_batch: int = 1) -> list[Job]:
        """The oldest job; if it is a question, with it the other waiting questions of its kind (streamed or
        not) that decode under the same settings (oldest first, `max_batch` in all)."""
        with self.cond:
            while not self.jobs:
                self.cond.wait()
            first = self.jobs.popleft()
            batch = [first]
            if first.kind in ("answer", "stream"):
                for job in list(self.jobs):
                    if len(batch) >= max_batch:
                        break
                    if job.kind == first.kind and job.batch_key() == first.batch_key():
                        self.jobs.remove(job)
                        batch.append(job)
            return batch


# ---------------------------------------------------------------------------------------------- engine
def one_pass_at_a_time(model) -> None:
    """Let the answering and the encoding thread share the model one pass at a time. Overlapping passes
    would not compute alone: a pass of one or two rows on a bf16 CPU switches oneDNN off for the whole
    process (`model._cpu_gemv`), so the other thread's GEMMs would run other kernels and round otherwise,
    and answers and stored encodings would depend on what else the server was doing. A question waits at
    most one pass of an encoding (one batch of chunks)."""
    if getattr(model, "one_pass_lock", None) is not None:
        return
    model.one_pass_lock = threading.RLock()
    for name in ("forward", "lm_head_rows", "token_nll"):
        def locked(*args, _method=getattr(model, name), **kwargs):
            with model.one_pass_lock:
                return _method(*args, **kwargs)

        setattr(model, name, locked)


def store_fingerprint(pc, cfg) -> str:
    """What a stored document's encoding depends on besides its text (hashed into its id): the model, dtype,
    chunking and prompt settings, prefill batches, device, and how its K/V are kept."""
    from .storage import encoding_settings, model_identity

    settings = encoding_settings(cfg, pc.args.max_position_embeddings)
    if settings["kv_store"] == "exact":  # as before the setting existed: documents stored then keep their ids
        del settings["kv_store"]
    return json.dumps({
        "model": model_identity(pc.model, pc.tokenizer), "dtype": str(pc.model.embed_tokens.weight.dtype),
        "settings": settings,
        "batch_chunks": cfg.batch_chunks, "batch_tokens": cfg.batch_tokens, "device": pc.device.type,
    }, sort_keys=True, default=str)


class Engine:
    """The model, the store and the two threads that use them (see the module's docstring)."""

    def __init__(self, pc, cfg, store: DocStore, queue_size: int = 64, max_batch: int = 8,
                 max_document_tokens: int = 262144, model_id: str = "model"):
        from . import ParallelComp
        self.pc, self.cfg, self.store, self.model_id = pc, cfg, store, model_id
        one_pass_at_a_time(pc.model)
        self.max_batch, self.max_document_tokens = max_batch, max_document_tokens
        # The encoding thread's own tokenizer (a fast tokenizer must not be used by two threads at once);
        # the weights are shared, read-only.
        self.encoder = ParallelComp(pc.model, copy.deepcopy(pc.tokenizer), pc.source, pc.dtype_source)
        self.questions, self.encodes = JobQueue(queue_size), JobQueue(queue_size)
        self.fingerprint = store_fingerprint(pc, cfg)
        self.loaded: dict[str, object] = {}  # id -> EncodedDocument (read and checked once)
        self.loaded_lock = threading.Lock()
        self.counts = collections.Counter()
        self.started = int(time.time())
        threading.Thread(target=self._loop, args=(self.questions, self._answer_jobs), name="answering",
                         daemon=True).start()
        threading.Thread(target=self._loop, args=(self.encodes, self._encode_jobs), name="encoding",
                         daemon=True).start()

    # -------------------------------------------------------------- threads
    def _loop(self, queue: JobQueue, work) -> None:
        while True:
            jobs = queue.take(self.max_batch)
            try:
                work(jobs)
            except Exception as e:  # a bug: every job of the batch gets a 500, the server goes on
                traceback.print_exc()
                for job in jobs:
                    job.emit("error", ApiError(500, f"internal error ({type(e).__name__}); see the server log"))

    def _answer_jobs(self, jobs: list[Job]) -> None:
        groups: dict[str, list] = {}
        for job in jobs:
            if job.cancelled.is_set():  # its client left while it waited
                self.counts["dropped"] += 1
                continue
            try:
                context, cfg = self._context(job)
            except ApiError as e:
                job.emit("error", e)
                continue
            groups.setdefault(repr(cfg), []).append((job, context, cfg))
        if jobs[0].kind == "stream":
            for group in groups.values():
                self._stream(group)
            return
        for group in groups.values():
            cfg = group[0][2]
            pairs = [(context, job.question) for job, context, _ in group]
            try:
                results = self.pc.generate_batch(pairs, config=cfg, return_errors=True)
            except ParallelCompError:  # e.g. a corrupt stored file: answer one by one to tell whose
                results = [self._one(context, question, cfg) for context, question in pairs]
            self.counts["batches"] += 1
            self.counts["largest_batch"] = max(self.counts["largest_batch"], len(group))
            for (job, _, _), res in zip(group, results):
                if isinstance(res, ParallelCompError):
                    job.emit("error", self._error(res, job))
                else:
                    self.counts["answered"] += 1
                    job.emit("done", res)

    def _one(self, context, question, cfg):
        try:
            return self.pc.generate(context, question, config=cfg)
        except ParallelCompError as e:
            return e

    def _stream(self, group: list) -> None:
        """Streamed questions answered together (`stream_batch`): each piece goes to its client as decoded; a
        client that leaves takes its row out of the batch at the next step."""
        jobs = [job for job, _, _ in group]
        cfg = group[0][2]
        try:
            stream = self.pc.stream_batch([(context, job.question) for job, context, _ in group], config=cfg,
                                          leave=lambda i: jobs[i].cancelled.is_set(), return_errors=True)
        except ParallelCompError as e:
            for job in jobs:
                job.emit("error", self._error(e, job))
            return
        for i, job in enumerate(jobs):
            if i in stream.errors:
                job.emit("error", self._error(stream.errors[i], job))
            else:
                job.emit("started")
        if len(jobs) > len(stream.errors):
            self.counts["batches"] += 1
            self.counts["largest_batch"] = max(self.counts["largest_batch"], len(jobs) - len(stream.errors))
        try:
            for i, piece in stream:
                if not jobs[i].cancelled.is_set():
                    jobs[i].emit("piece", piece)
                if all(job.cancelled.is_set() for k, job in enumerate(jobs) if k not in stream.errors):
                    stream.close()  # every client went away: stop decoding
                    break
        except ParallelCompError as e:  # e.g. a corrupt stored file found while reading
            for i, job in enumerate(jobs):
                if i not in stream.errors:
                    job.emit("error", self._error(e, job))
            return
        for i, job in enumerate(jobs):
            if i in stream.errors:
                continue
            if job.cancelled.is_set():
                self.counts["streams_cancelled"] += 1
            else:
                self.counts["answered"] += 1
                job.emit("done", stream.result[i])

    def _encode_jobs(self, jobs: list[Job]) -> None:
        for job in jobs:
            info = self.store.get(job.doc_id)
            if info is not None:
                job.emit("done", (info, False))
                continue
            try:
                _, document, _, _ = self.encoder.plan_encoding(job.text, self.cfg)
                if len(document) > self.max_document_tokens:
                    raise ApiError(413, f"the document has {len(document)} tokens; this server encodes at most "
                                        f"{self.max_document_tokens} (--max-document-tokens)",
                                   param="text", code="document_too_large")
                enc = self.encoder.encode(job.text, config=self.cfg, path=self.store.path(job.doc_id))
            except ApiError as e:
                job.emit("error", e)
                continue
            except ParallelCompError as e:
                job.emit("error", ApiError(400, self._hide_paths(str(e)), param="text"))
                continue
            self.counts["encoded"] += 1
            job.emit("done", (self.store.add(job.doc_id, enc.meta, job.name, len(job.text)), True))

    # -------------------------------------------------------------- helpers (model threads)
    def _context(self, job: Job):
        """The context and config a question is answered with: its stored documents (one, or a list) under
        their encoding's settings, or its inline text under the server's."""
        if not job.doc_ids:
            return job.text, job.cfg
        docs = [self._load(doc_id) for doc_id in job.doc_ids]
        return (docs[0] if len(docs) == 1 else docs), docs[0].config(job.cfg)

    def _load(self, doc_id: str):
        with self.loaded_lock:
            enc = self.loaded.get(doc_id)
        if enc is not None and enc.path.is_dir():
            return enc
        if self.store.get(doc_id) is None:
            raise ApiError(404, f"no document {doc_id} (deleted?)", param="documents", code="document_not_found")
        try:
            enc = self.pc.load_encoded(self.store.path(doc_id))
        except ParallelCompError as e:
            raise ApiError(409, f"document {doc_id} cannot be answered: {self._hide_paths(str(e))}; delete it "
                                "and add it again", param="documents", code="document_unusable") from None
        with self.loaded_lock:
            self.loaded[doc_id] = enc
        return enc

    def forget(self, doc_id: str) -> None:
        with self.loaded_lock:
            self.loaded.pop(doc_id, None)

    def _hide_paths(self, message: str) -> str:
        """A library message without the store's directory (`encoding /store/doc-x: ...` -> `doc-x: ...`)."""
        return message.replace(f"encoding {self.store.root}/", "").replace(f"{self.store.root}/", "")

    def _error(self, e: ParallelCompError, job: Job) -> ApiError:
        message = self._hide_paths(str(e))
        if str(e).startswith("encoding ") and job.doc_ids:  # a stored file failed its checks or its read
            return ApiError(409, f"a stored document cannot be answered: {message}; delete it and add it again",
                            param="documents", code="document_unusable")
        return ApiError(400, message, param="messages")

    # -------------------------------------------------------------- event loop side
    def submit(self, queue: JobQueue, **fields) -> Job:
        job = Job(loop=asyncio.get_running_loop(), events=asyncio.Queue(), **fields)
        queue.put(job)
        return job

    def health(self) -> dict:
        return {"status": "ok", "model": self.model_id, "documents": len(self.store),
                "waiting": {"questions": len(self.questions), "documents": len(self.encodes),
                            "limit": self.questions.size},
                **{k: self.counts[k] for k in ("answered", "batches", "largest_batch", "encoded",
                                               "streams_cancelled", "dropped")}}


# ---------------------------------------------------------------------------------------------- requests
