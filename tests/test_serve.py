"""The HTTP server (`python -m parallelcomp_triton.serve`), started as a real process on a free localhost port
with a tiny model, and talked to with the official `openai` client and with raw HTTP: answers equal
`pc.generate` token for token (non-streamed, streamed, batched under concurrency, after a restart), every
bad request gets its 4xx in OpenAI's error format, the store survives a kill."""
import dataclasses
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from _cases import DOCUMENTS, SETTINGS, cli_args, document  # noqa: E402

from parallelcomp_triton import ParallelComp, ParallelCompError  # noqa: E402
from parallelcomp_triton.openai_api import split_messages  # noqa: E402
from parallelcomp_triton.serve_engine import ApiError, Job, JobQueue  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[1]
KEY = "test-key-123"
CFG = SETTINGS["budget_chat_k2_b3"]  # chunk_tokens 97, K 2, B 16, chat template, 8 new tokens
DOC_A, DOC_B = DOCUMENTS["d260"], DOCUMENTS["d300"]
QUESTIONS = ["Which word comes first?", "What is the last word in the text?", "Name one word.", "Why?"]
MAX_BODY = 200_000
MAX_DOC_TOKENS = 60_000
LONG_DOC = document(8000, seed=9)  # about 42K tokens: seconds to encode, long enough to be killed during it


class Server:
    """The server process on a free port over one store; `start` again after `kill` restarts it."""

    def __init__(self, model_dir, store, settings=None, dtype="float32"):
        self.model_dir, self.store, self.proc, self.dtype = model_dir, store, None, dtype
        self.settings = settings if settings is not None else self.default_settings()

    @staticmethod
    def default_settings() -> list[str]:
        return [a for a in cli_args(CFG) if a != "--no-progress"]

    def start(self):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1",
                   OPENBLAS_NUM_THREADS="1", HF_HUB_OFFLINE="1")
        env.pop("PARALLELCOMP_API_KEY", None)
        self.log = open(self.store.parent / f"server-{self.port}.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "parallelcomp_triton.serve", "--model", str(self.model_dir), "--store",
             str(self.store), "--port", str(self.port), "--api-key", KEY, "--dtype", self.dtype,
             "--max-body-bytes", str(MAX_BODY), "--max-document-tokens", str(MAX_DOC_TOKENS),
             "--log-level", "warning", *self.settings], cwd=str(ROOT), env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.read_log()
            try:
                if request("GET", "/health", port=self.port)[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError("the server did not answer /health in 90 s: " + self.read_log())

    def read_log(self) -> str:
        self.log.flush()
        return (self.store.parent / f"server-{self.port}.log").read_text()

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)
        self.log.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, key=KEY):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=120)


def request(method, path, body=None, *, port, key=KEY, headers=None, raw=None):
    """(status, JSON body or text) of one raw HTTP request; `body` is sent as JSON, `raw` as given."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    head = dict(headers or {})
    if key is not None:
        head["Authorization"] = f"Bearer {key}"
    data = raw
    if body is not None:
        data, head["Content-Type"] = json.dumps(body).encode(), "application/json"
    try:
        conn.request(method, path, body=data, headers=head)
        resp = conn.getresponse()
        text = resp.read().decode()
        is_json = resp.getheader("content-type", "").startswith("application/json")
        return resp.status, json.loads(text) if is_json else text
    finally:
        conn.close()


@pytest.fixture(scope="module")
def pc(model_dir):
    return ParallelComp.from_pretrained(model_dir, dtype="float32")


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    srv = Server(model_dir, tmp_path_factory.mktemp("serve") / "store").start()
    yield srv
    srv.kill()


@pytest.fixture(scope="module")
def docs(server):
    """The two documents, stored: {text: id}."""
    ids = {}
    for text in (DOC_A, DOC_B):
        status, info = request("POST", "/v1/documents", {"text": text, "name": "doc"}, port=server.port)
        assert status == 201 and info["encoded"], info
        ids[text] = info["id"]
    return ids


def api(server, method, path, body=None, **kw):
    return request(method, path, body, port=server.port, **kw)


def assert_error(status_body, status, code=None):
    got, body = status_body
    assert got == status, body
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"] and "Traceback" not in body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code, body


def ask(client, doc_id, question, **kw):
    return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": question}],
                                          extra_body={"documents": [doc_id]} if doc_id else None, **kw)


# ------------------------------------------------------------------------------------------- answers
def test_non_streamed_answer_equals_generate(server, docs, pc):
    want = pc.generate(DOC_A, QUESTIONS[0], config=CFG)
    got = ask(server.client(), docs[DOC_A], QUESTIONS[0], max_tokens=CFG.max_new_tokens)
    assert got.choices[0].message.content == want.text
    assert got.usage.completion_tokens == len(want.token_ids)
    st = want.stats
    assert got.usage.prompt_tokens == st.prefix_tokens + st.document_tokens + st.question_tokens
    extra = got.model_extra
    assert extra["documents"] == [docs[DOC_A]]
    assert [s["chunk"] for s in extra["sources"]] == st.kept_chunks
    assert [s["tokens"] for s in extra["sources"]] == [st.chunk_spans[c] for c in st.kept_chunks]
    assert {s["document"] for s in extra["sources"]} == {docs[DOC_A]}


def test_streamed_answer_equals_generate(server, docs, pc):
    cfg = dataclasses.replace(CFG, max_new_tokens=20)
    want = pc.generate(DOC_B, QUESTIONS[1], config=cfg)
    events = list(ask(server.client(), docs[DOC_B], QUESTIONS[1], max_tokens=20, stream=True,
                      stream_options={"include_usage": True}))
    assert all(e.object == "chat.completion.chunk" for e in events)
    pieces = [e.choices[0].delta.content for e in events if e.choices and e.choices[0].delta.content]
    assert len(pieces) > 1 and "".join(pieces) == want.text
    finish = [e for e in events if e.choices and e.choices[0].finish_reason]
    assert len(finish) == 1 and [s["chunk"] for s in finish[0].model_extra["sources"]] == want.stats.kept_chunks
    assert events[-1].usage.completion_tokens == len(want.token_ids)


def test_raw_http_stream_is_server_sent_events(server, docs, pc):
    want = pc.generate(DOC_A, QUESTIONS[2], config=CFG)
    status, text = api(server, "POST", "/v1/chat/completions",
                       {"messages": [{"role": "user", "content": QUESTIONS[2]}], "documents": [docs[DOC_A]],
                        "stream": True})
    assert status == 200
    lines = [line for line in text.split("\n\n") if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == want.text


def test_a_message_without_documents_is_split_at_its_last_paragraph(server, pc):
    want = pc.generate(DOC_A, QUESTIONS[0], config=CFG)
    got = ask(server.client(), None, DOC_A + "\n\n" + QUESTIONS[0])
    assert got.choices[0].message.content == want.text and got.model_extra["documents"] == []
    # earlier messages are the document, the last user message the question
    got = server.client().chat.completions.create(model="tiny", messages=[
        {"role": "system", "content": DOC_A}, {"role": "user", "content": QUESTIONS[0]}])
    assert got.choices[0].message.content == want.text


def test_split_messages_rule():
    user = lambda text: {"role": "user", "content": text}  # noqa: E731
    assert split_messages([user("doc one.\n\ndoc two.\n\nQ?")], False) == ("doc one.\n\ndoc two.", "Q?")
    assert split_messages([user("doc\n\nline one\nline two?")], False) == ("doc", "line one\nline two?")
    assert split_messages([user("doc\nQ?")], False) == ("doc", "Q?")
    assert split_messages([{"role": "system", "content": "S"}, user("D"), {"role": "assistant", "content": "A"},
                           user("Q?")], False) == ("S\n\nD\n\nA", "Q?")
    assert split_messages([user("D"), user([{"type": "text", "text": "Q?"}])], True) == (None, "Q?")
    for messages in ([user("Q?")], [user("  ")], [{"role": "system", "content": "D"}]):
        with pytest.raises(ApiError) as info:
            split_messages(messages, False)
        assert info.value.status == 400


# ------------------------------------------------------------------------------------------- documents
def test_documents_endpoints(server, docs):
    status, again = api(server, "POST", "/v1/documents", {"text": DOC_A})
    assert status == 200 and again["id"] == docs[DOC_A] and not again["encoded"]
    assert again["tokens"] == len(DOC_A) and again["chunks"] > 1  # the byte tokenizer: a token per character
    # the same text uploaded as a file, or as a text/plain body: the same id, not encoded again
    boundary = "b0undary"
    form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.txt\"\r\n"
            f"Content-Type: text/plain\r\n\r\n{DOC_A}\r\n--{boundary}--\r\n").encode()
    status, up = api(server, "POST", "/v1/documents", raw=form,
                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert status == 200 and up["id"] == docs[DOC_A] and not up["encoded"]
    status, plain = api(server, "POST", "/v1/documents", raw=DOC_A.encode(), headers={"Content-Type": "text/plain"})
    assert status == 200 and plain["id"] == docs[DOC_A]
    status, listing = api(server, "GET", "/v1/documents")
    assert status == 200 and {d["id"] for d in listing["data"]} >= set(docs.values())
    status, one = api(server, "GET", f"/v1/documents/{docs[DOC_B]}")
    assert status == 200 and one["tokens"] == len(DOC_B) and one["name"] == "doc"
    # a new one, then deleted: gone from the list, the store and the answers
    status, new = api(server, "POST", "/v1/documents", {"text": DOCUMENTS["d90"]})
    assert status == 201 and new["encoded"] and (server.store / new["id"] / "meta.json").is_file()
    assert api(server, "DELETE", f"/v1/documents/{new['id']}") == (200, {"id": new["id"], "object": "document",
                                                                          "deleted": True})
    assert not (server.store / new["id"]).exists()
    assert_error(api(server, "GET", f"/v1/documents/{new['id']}"), 404, "document_not_found")
    assert_error(api(server, "DELETE", f"/v1/documents/{new['id']}"), 404, "document_not_found")
    assert new["id"] not in {d["id"] for d in api(server, "GET", "/v1/documents")[1]["data"]}
    status, models = api(server, "GET", "/v1/models")
    assert status == 200 and [m["id"] for m in models["data"]] == [Path(server.model_dir).name]
    assert api(server, "GET", "/health")[1]["status"] == "ok"


@pytest.mark.parametrize("doc_id", ["nope", "doc-" + "0" * 31 + "g", "doc-..", "DOC-" + "0" * 32])
def test_malformed_document_ids_are_refused(server, doc_id):
    assert_error(api(server, "GET", f"/v1/documents/{doc_id}"), 400, "invalid_document_id")
    assert_error(api(server, "DELETE", f"/v1/documents/{doc_id}"), 400, "invalid_document_id")
    assert_error(api(server, "POST", "/v1/chat/completions",
                     {"messages": [{"role": "user", "content": "q"}], "documents": [doc_id]}), 400,
                 "invalid_document_id")


def test_paths_cannot_escape_the_store(server):
    for path in ("/v1/documents/..%2F..%2Fetc%2Fpasswd", "/v1/documents/%2E%2E", "/v1/documents/../../etc/passwd"):
        status, body = api(server, "GET", path)
        assert status in (400, 404) and "error" in body, (path, body)


# ------------------------------------------------------------------------------------------- errors
def test_401_without_the_key(server):
    for key in (None, "wrong"):
        for method, path in (("GET", "/health"), ("GET", "/v1/models"), ("GET", "/v1/documents"),
                             ("POST", "/v1/chat/completions"), ("POST", "/v1/documents")):
            assert_error(api(server, method, path, key=key), 401, "invalid_api_key")
    with pytest.raises(openai.AuthenticationError):
        ask(server.client(key="wrong"), None, "doc\n\nq")


def test_bad_requests_get_their_4xx(server, docs):
    chat = "/v1/chat/completions"
    user = [{"role": "user", "content": QUESTIONS[0]}]
    assert_error(api(server, "POST", chat, raw=b'{"messages": [', headers={"Content-Type": "application/json"}),
                 400, "invalid_json")
    assert_error(api(server, "POST", chat, raw=b"[1, 2]", headers={"Content-Type": "application/json"}), 400)
    assert_error(api(server, "POST", chat, {"messages": user, "documents": ["doc-" + "0" * 32]}), 404,
                 "document_not_found")
    for empty in ("", "   "):
        assert_error(api(server, "POST", chat, {"messages": [{"role": "user", "content": empty}],
                                                "documents": [docs[DOC_A]]}), 400)
    assert_error(api(server, "POST", chat, {"messages": []}), 400)
    assert_error(api(server, "POST", chat, {"messages": user}), 400)  # no document anywhere
    for field, value in (("temperature", -1), ("top_p", 0), ("max_tokens", 0), ("max_tokens", "8"), ("n", 2),
                         ("stop", [1]), ("stream", "yes"), ("seed", 1.5), ("documents", "x")):
        assert_error(api(server, "POST", chat, {"messages": user, "documents": [docs[DOC_A]], field: value}), 400)
    # a question and answer that do not fit the window: planned in the answering thread, still a 400
    for stream in (False, True):
        assert_error(api(server, "POST", chat, {"messages": user, "documents": [docs[DOC_A]], "max_tokens": 10 ** 6,
                                                "stream": stream}), 400)
    with pytest.raises(openai.NotFoundError):
        ask(server.client(), "doc-" + "1" * 32, "q")
    assert_error(api(server, "POST", "/v1/documents", {"text": "  "}), 400)
    assert_error(api(server, "POST", "/v1/documents", {"text": 5}), 400)
    assert_error(api(server, "POST", "/v1/documents", raw=b"\xff\xfe bad", headers={"Content-Type": "text/plain"}),
                 400)
    assert_error(api(server, "POST", "/v1/documents", raw=b"x", headers={"Content-Type": "image/png"}), 415)
    assert_error(api(server, "GET", "/v1/nothing"), 404)
    assert_error(api(server, "PUT", "/v1/documents"), 405)
    assert api(server, "GET", "/health")[0] == 200  # still serving


def test_oversized_bodies_and_documents_get_413(server):
    big = {"text": "x" * MAX_BODY}
    assert_error(api(server, "POST", "/v1/documents", big), 413, "request_too_large")
    assert_error(api(server, "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "y" * MAX_BODY}]}),
                 413, "request_too_large")
    # chunked, without a Content-Length: counted as it comes
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/v1/documents", body=iter([b'{"text": "', b"z" * MAX_BODY, b'"}']), encode_chunked=True,
                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 413 and json.loads(resp.read())["error"]["code"] == "request_too_large"
    conn.close()
    too_long = document(MAX_DOC_TOKENS // 5 + 2000, seed=4)  # under the body limit, over the token limit
    assert len(too_long) > MAX_DOC_TOKENS and len(too_long) < MAX_BODY
    assert_error(api(server, "POST", "/v1/documents", {"text": too_long}), 413, "document_too_large")


def test_a_full_queue_refuses_with_503():
    import asyncio

    queue = JobQueue(2)
    loop = asyncio.new_event_loop()
    jobs = [Job(kind="answer", loop=loop, events=None, cfg=CFG) for _ in range(3)]
    queue.put(jobs[0])
    queue.put(jobs[1])
    with pytest.raises(ApiError) as info:
        queue.put(jobs[2])
    assert info.value.status == 503 and info.value.body()["error"]["code"] == "overloaded"
    assert queue.take(8) == jobs[:2]  # waiting questions with the same settings: one batch
    loop.close()


def test_a_corrupt_stored_document_is_a_409_not_a_500(server, docs):
    status, info = api(server, "POST", "/v1/documents", {"text": DOCUMENTS["d90"]})
    assert status == 201
    assert ask(server.client(), info["id"], QUESTIONS[0]).choices  # answered, and its encoding read
    (server.store / info["id"] / "chunk_00000.safetensors").write_bytes(b"not a tensor file")
    for stream in (False, True):
        status, body = api(server, "POST", "/v1/chat/completions", {
            "messages": [{"role": "user", "content": QUESTIONS[0]}], "documents": [info["id"]], "stream": stream})
        if stream and status == 200:  # the failure came after the stream started: an error event, then the end
            body = json.loads(body.split("\n\n")[-2][6:])
            assert body["error"]["code"] == "document_unusable" and str(server.store) not in body["error"]["message"]
        else:
            assert_error((status, body), 409, "document_unusable")
            assert str(server.store) not in body["error"]["message"]
    assert ask(server.client(), docs[DOC_A], QUESTIONS[0]).choices  # the others are still answered
    assert api(server, "DELETE", f"/v1/documents/{info['id']}")[0] == 200


# ------------------------------------------------------------------------------------------- concurrency
def test_eight_concurrent_clients_over_two_documents(server, docs, pc):
    asks = [(text, q) for q in QUESTIONS for text in (DOC_A, DOC_B)]
    want = [pc.generate(text, q, config=CFG).text for text, q in asks]
    before = api(server, "GET", "/health")[1]
    barrier = threading.Barrier(len(asks))

    def one(i):
        text, q = asks[i]
        client = server.client()
        barrier.wait()
        return ask(client, docs[text], q).choices[0].message.content

    with ThreadPoolExecutor(len(asks)) as pool:
        got = list(pool.map(one, range(len(asks))))
    assert got == want
    after = api(server, "GET", "/health")[1]
    assert after["answered"] - before["answered"] == len(asks)
    assert after["largest_batch"] > 1  # answered together (generate_batch)
    assert after["waiting"] == {"questions": 0, "documents": 0, "limit": 64}


def test_streamed_questions_that_wait_together_are_streamed_in_one_batch(server, docs, pc):
    asks = [(text, q) for q in QUESTIONS[:2] for text in (DOC_A, DOC_B)]
    want = [pc.generate(text, q, config=CFG).text for text, q in asks]
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    busy = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)  # holds the answering thread
    busy.request("POST", "/v1/chat/completions", headers=headers, body=json.dumps(
        {"messages": [{"role": "user", "content": "Keep talking."}], "documents": [docs[DOC_A]],
         "max_tokens": 1500, "stream": True}))
    resp = busy.getresponse()
    assert resp.status == 200 and resp.readline().startswith(b"data: ")
    before = api(server, "GET", "/health")[1]

    def one(i):
        text, q = asks[i]
        stream = ask(server.client(), docs[text], q, max_tokens=CFG.max_new_tokens, stream=True)
        return "".join(e.choices[0].delta.content or "" for e in stream if e.choices)

    with ThreadPoolExecutor(len(asks)) as pool:
        futures = [pool.submit(one, i) for i in range(len(asks))]
        deadline = time.monotonic() + 30
        while api(server, "GET", "/health")[1]["waiting"]["questions"] < len(asks):
            assert time.monotonic() < deadline, "the questions did not all wait"
            time.sleep(0.02)
        busy.sock.shutdown(socket.SHUT_RDWR)  # frees the thread: the four waiting streams go together
        busy.close()
        got = [f.result() for f in futures]
    assert got == want
    after = api(server, "GET", "/health")[1]
    assert after["answered"] - before["answered"] == len(asks)
    assert after["batches"] - before["batches"] == 1 and after["largest_batch"] >= len(asks)


def test_a_client_that_disconnects_stops_its_decoding(server, docs):
    before = api(server, "GET", "/health")[1]
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    # ~1500 tokens without an end (greedy on this tiny model): seconds of decoding were it not stopped
    body = {"messages": [{"role": "user", "content": "Keep talking."}], "documents": [docs[DOC_A]],
            "max_tokens": 1500, "stream": True}
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body),
                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.readline().startswith(b"data: ")
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    deadline = time.monotonic() + 20
    while api(server, "GET", "/health")[1]["streams_cancelled"] == before["streams_cancelled"]:
        assert time.monotonic() < deadline, "the stream was not stopped"
        time.sleep(0.05)
    assert api(server, "GET", "/health")[1]["answered"] == before["answered"]  # never finished
    assert ask(server.client(), docs[DOC_A], QUESTIONS[0]).choices  # and the server answers on


def test_a_waiting_question_whose_client_leaves_is_dropped_unanswered(server, docs):
    """A non-streamed question still in the queue when its client disconnects is never answered."""
    before = api(server, "GET", "/health")[1]
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    busy = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)  # the answering thread's work
    busy.request("POST", "/v1/chat/completions", headers=headers, body=json.dumps(
        {"messages": [{"role": "user", "content": "Keep talking."}], "documents": [docs[DOC_A]],
         "max_tokens": 1500, "stream": True}))
    resp = busy.getresponse()
    assert resp.status == 200 and resp.readline().startswith(b"data: ")
    waiting = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    waiting.request("POST", "/v1/chat/completions", headers=headers, body=json.dumps(
        {"messages": [{"role": "user", "content": QUESTIONS[0]}], "documents": [docs[DOC_B]]}))
    deadline = time.monotonic() + 20
    while api(server, "GET", "/health")[1]["waiting"]["questions"] == 0:
        assert time.monotonic() < deadline, "the question did not wait"
        time.sleep(0.02)
    waiting.sock.shutdown(socket.SHUT_RDWR)
    waiting.close()
    time.sleep(1)  # the server notices within its poll interval
    busy.sock.shutdown(socket.SHUT_RDWR)  # frees the answering thread, which then takes the left question
    busy.close()
    while api(server, "GET", "/health")[1]["dropped"] == before["dropped"]:
        assert time.monotonic() < deadline, "the question was not dropped"
        time.sleep(0.05)
    after = api(server, "GET", "/health")[1]
    assert after["answered"] == before["answered"] and after["dropped"] == before["dropped"] + 1
    assert ask(server.client(), docs[DOC_B], QUESTIONS[0]).choices  # and the server answers on


# ------------------------------------------------------------------------------------------- restart
def test_kill_and_restart(server, docs, pc):
    want = pc.generate(DOC_B, QUESTIONS[0], config=CFG).text
    # killed while encoding a long document: the encoding is half-written in a temporary sibling
    posting = threading.Thread(target=lambda: _ignore(OSError, api, server, "POST", "/v1/documents",
                                                      {"text": LONG_DOC}), daemon=True)
    posting.start()
    deadline = time.monotonic() + 60
    while not any(p.name.endswith(".tmp") and any(p.glob("chunk_*")) for p in server.store.glob(".doc-*")):
        assert time.monotonic() < deadline, "no encoding started"
        time.sleep(0.01)
    server.kill()
    posting.join(30)
    # what other interrupted writes leave: a directory without meta.json, a listing without its encoding
    (server.store / ("doc-" + "a" * 32)).mkdir()
    (server.store / ("doc-" + "a" * 32) / "chunk_00000.safetensors").write_bytes(b"half")
    (server.store / ("doc-" + "b" * 32 + ".json")).write_text("{}")
    server.start()
    listing = api(server, "GET", "/v1/documents")[1]["data"]
    assert sorted(d["id"] for d in listing) == sorted(docs.values())
    assert {p.name for p in server.store.iterdir()} == {".lock"} | {i for i in docs.values()} | {
        f"{i}.json" for i in docs.values()}
    assert ask(server.client(), docs[DOC_B], QUESTIONS[0]).choices[0].message.content == want
    # a second server cannot share the store
    second = subprocess.run([sys.executable, "-m", "parallelcomp_triton.serve", "--store", str(server.store),
                             "--port", "1"], cwd=str(ROOT), env=dict(os.environ, PYTHONPATH=str(ROOT)),
                            capture_output=True, text=True, timeout=120)
    assert second.returncode == 2 and "another server" in second.stderr


def _ignore(exc, fn, *args, **kw):
    try:
        return fn(*args, **kw)
    except exc:
        return None


# ------------------------------------------------------------------------------------------- many documents
def test_a_question_over_two_stored_documents(server, docs, pc):
    enc_a, enc_b = (pc.load_encoded(server.store / docs[t]) for t in (DOC_A, DOC_B))
    try:
        want = pc.generate([enc_a, enc_b], QUESTIONS[1], config=enc_a.config(CFG))
    except ParallelCompError as e:
        pytest.skip(f"the library does not answer over several documents yet ({e})")
    got = server.client().chat.completions.create(model="tiny", messages=[{"role": "user", "content": QUESTIONS[1]}],
                                                  extra_body={"documents": [docs[DOC_A], docs[DOC_B]]})
    assert got.choices[0].message.content == want.text
    owners = [[docs[DOC_A], docs[DOC_B]][d] for d in want.stats.chunk_documents]
    local = [owners[:c].count(owners[c]) for c in range(len(owners))]  # a chunk's index in its own document
    assert [(s["document"], s["chunk"]) for s in got.model_extra["sources"]] == [
        (owners[c], local[c]) for c in want.stats.kept_chunks]
    spans = {docs[DOC_A]: enc_a.spans, docs[DOC_B]: enc_b.spans}  # each document's own token spans
    assert all(tuple(s["tokens"]) == spans[s["document"]][s["chunk"]] for s in got.model_extra["sources"])
    assert got.model_extra["documents"] == [docs[DOC_A], docs[DOC_B]]


@pytest.mark.slow
def test_an_int8_store_keeps_one_byte_values_and_answers_from_them(model_dir, tmp_path, docs, pc):
    """--kv-store int8: the document gets another id than in an exact store, is stored as int8, and is answered
    as `pc.generate` answers from that encoding."""
    srv = Server(model_dir, tmp_path / "store", settings=[*Server.default_settings(), "--kv-store", "int8"]).start()
    try:
        status, info = api(srv, "POST", "/v1/documents", {"text": DOC_A})
        assert status == 201 and info["settings"]["kv_store"] == "int8" and info["id"] != docs[DOC_A]
        encoded = pc.load_encoded(tmp_path / "store" / info["id"])
        assert encoded.kv_store == "int8"
        want = pc.generate(encoded, QUESTIONS[0], config=CFG)
        got = ask(srv.client(), info["id"], QUESTIONS[0], max_tokens=CFG.max_new_tokens)
        assert got.choices[0].message.content == want.text
    finally:
        srv.kill()


def test_the_answer_is_found_in_the_second_of_two_documents(bundled_model_dir, tmp_path):
    """The bundled model: a filler document, then one with a pass key; the key is answered, from the second."""
    from parallelcomp_triton.tasks import PASSKEY_FILLER, passkey_case

    pc = ParallelComp.from_pretrained(bundled_model_dir)
    case = passkey_case(pc.tokenizer, 1800, depth=0.3, question="natural")
    filler = PASSKEY_FILLER * (len(case.context) // len(PASSKEY_FILLER))
    srv = Server(bundled_model_dir, tmp_path / "store", settings=[], dtype="auto").start()  # the defaults: K = 3
    try:
        ids = [api(srv, "POST", "/v1/documents", {"text": text})[1]["id"] for text in (filler, case.context)]
        got = srv.client().chat.completions.create(
            model="x", messages=[{"role": "user", "content": case.question}], max_tokens=12,
            extra_body={"documents": ids})
        assert case.answer in got.choices[0].message.content
        needle = len(pc.tokenizer.encode(case.context[:case.context.index(case.answer)], add_special_tokens=False))
        assert any(s["document"] == ids[1] and s["tokens"][0] <= needle < s["tokens"][1]
                   for s in got.model_extra["sources"])
    finally:
        srv.kill()


def test_the_model_runs_one_pass_at_a_time():
    """The answering and encoding threads never run passes at once (a bf16 CPU pass of one or two rows
    switches oneDNN off for the whole process, which would change the other pass's numbers)."""
    from _tiny_pipeline import tiny_pc

    from parallelcomp_triton.serve_engine import one_pass_at_a_time

    model = tiny_pc().model
    one_pass_at_a_time(model)
    inside, overlaps = [], []

    def attend(layer, q, k, v):
        inside.append(1)
        overlaps.append(len(inside) > 1)
        time.sleep(0.01)
        inside.pop()
        return q

    ids, pos = torch.tensor([5, 6, 7]), torch.arange(3)

    def passes():
        with torch.no_grad():
            for _ in range(5):
                model(ids, pos, attend)

    threads = [threading.Thread(target=passes) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(overlaps) == 2 * 5 * model.args.num_layers and not any(overlaps)
