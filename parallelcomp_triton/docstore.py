"""The server's documents on disk (`python -m parallelcomp_triton.serve --store DIR`): one encoding directory
per document (storage.py's format, written atomically by `ParallelComp.encode`), named by its id.

    DIR/.lock                 held (flock) by the one server using the store
    DIR/doc-<32 hex>/         an encoding: listed exactly when its meta.json is there
    DIR/doc-<32 hex>.json     what the listing shows (name, characters, created_at, counts): a cache, rebuilt
                              from meta.json when missing

A document's id is a hash of its text and of everything its encoding depends on (model identity, dtype,
chunking and prompt settings, prefill batches): the same text under the same settings gets the same id, and
is not encoded again. Ids are checked against one pattern before any path is built from them, so no id can
name a path outside the store. At start, what an interrupted write or delete left (temporary siblings, a
directory without meta.json, a listing file without its encoding) is removed.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import threading
import time
import uuid
from pathlib import Path

from .errors import ParallelCompError

ID_PATTERN = re.compile(r"doc-[0-9a-f]{32}")


def document_id(fingerprint: str, text: str) -> str:
    """The id of `text` encoded under `fingerprint` (model and settings, see `serve.Engine.fingerprint`)."""
    h = hashlib.sha256()
    h.update(fingerprint.encode())
    h.update(b"\0")
    h.update(text.encode("utf-8", "surrogatepass"))
    return "doc-" + h.hexdigest()[:32]


def valid_id(doc_id) -> bool:
    return isinstance(doc_id, str) and ID_PATTERN.fullmatch(doc_id) is not None


class DocStore:
    """The documents of one store directory; thread-safe (the event loop reads, the encoding thread adds,
    DELETE removes)."""

    def __init__(self, root):
        self.root = Path(root).expanduser().resolve()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self._lock_file = open(self.root / ".lock", "a+")
        except OSError as e:
            raise ParallelCompError(f"store {self.root}: cannot write ({e.strerror or e})") from None
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise ParallelCompError(f"store {self.root}: another server is using it") from None
        self._lock = threading.Lock()
        self._index: dict[str, dict] = {}
        self._recover()

    # -------------------------------------------------------------- paths
    def path(self, doc_id: str) -> Path:
        """The encoding directory of a valid id (ValueError for anything else: no path is built from it)."""
        if not valid_id(doc_id):
            raise ValueError(f"invalid document id {doc_id!r}")
        return self.root / doc_id

    def _info_path(self, doc_id: str) -> Path:
        return self.root / f"{doc_id}.json"

    # -------------------------------------------------------------- reading
    def get(self, doc_id: str) -> dict | None:
        with self._lock:
            info = self._index.get(doc_id)
            return dict(info) if info is not None else None

    def list(self) -> list[dict]:
        with self._lock:
            return sorted((dict(i) for i in self._index.values()), key=lambda i: (i["created_at"], i["id"]))

    def __len__(self) -> int:
        with self._lock:
            return len(self._index)

    # -------------------------------------------------------------- writing
    def add(self, doc_id: str, meta: dict, name: str | None, characters: int) -> dict:
        """Record an encoding `ParallelComp.encode` has just written at `path(doc_id)` (`meta`: its meta.json)."""
        info = _info(doc_id, meta, name=name, characters=characters, created_at=int(time.time()))
        _write_atomic(self._info_path(doc_id), info)
        with self._lock:
            self._index[doc_id] = info
        return dict(info)

    def remove(self, doc_id: str) -> bool:
        """Delete a document; False if there is none. It disappears at once (its directory is renamed away,
        then removed); a question already reading its files may fail."""
        path = self.path(doc_id)
        with self._lock:
            if self._index.pop(doc_id, None) is None:
                return False
            gone = self.root / f".{doc_id}.{uuid.uuid4().hex[:8]}.deleted"
            try:
                os.replace(path, gone)
            except FileNotFoundError:
                gone = None
            self._info_path(doc_id).unlink(missing_ok=True)
        if gone is not None:
            shutil.rmtree(gone, ignore_errors=True)
        return True

    # -------------------------------------------------------------- start-up
    def _recover(self) -> None:
        """Remove what interrupted writes and deletes left; index every complete encoding."""
        for entry in sorted(self.root.iterdir()):
            name = entry.name
            if name.startswith(".doc-"):  # AtomicDir's .tmp/.old siblings, listing files' .tmp, .deleted dirs
                _remove(entry)
                continue
            if ID_PATTERN.fullmatch(name) and entry.is_dir():
                meta_path = entry / "meta.json"
                if not meta_path.is_file():  # never committed (AtomicDir renames complete directories only)
                    _remove(entry)
                    continue
                info = _read_info(self._info_path(name), name)
                if info is None:  # killed between the encoding's rename and its listing file
                    try:
                        meta = json.loads(meta_path.read_text())
                    except (OSError, ValueError):
                        continue  # unreadable: not listed; answering it would be refused anyway
                    info = _info(name, meta, name=None, characters=None, created_at=int(meta_path.stat().st_mtime))
                    _write_atomic(self._info_path(name), info)
                self._index[name] = info
            elif name.endswith(".json") and ID_PATTERN.fullmatch(name[:-5]) and not (self.root / name[:-5]).is_dir():
                _remove(entry)  # a listing file whose encoding was deleted


def _info(doc_id: str, meta: dict, name, characters, created_at: int) -> dict:
    return {"id": doc_id, "object": "document", "name": name, "characters": characters,
            "tokens": len(meta["document"]), "chunks": len(meta["spans"]), "created_at": created_at,
            "dtype": meta.get("dtype"), "settings": meta.get("settings", {})}


def _read_info(path: Path, doc_id: str) -> dict | None:
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and info.get("id") == doc_id else None


def _write_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        entry.unlink(missing_ok=True)
