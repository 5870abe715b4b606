"""Reading an encoding's files: their checksums, and the next batch's files read (and checksummed) on a
background thread while the current batch is scored."""
from __future__ import annotations

import os
import threading
import zlib
from pathlib import Path

BLOCK = 1 << 19  # bytes per read: a buffer that stays in the reading core's L2 cache


def crc32_hex(crc: int) -> str:
    return f"{crc & 0xFFFFFFFF:08x}"


class Crc32:
    """zlib.crc32 as a running checksum of bytes written (the stdlib's fastest: about 3 GB/s on one core
    here, sha256 about 1.4, blake2b about 0.6). It guards against damage (flipped, zeroed or lost bytes),
    not against someone who rewrites a file and its meta.json."""

    def __init__(self):
        self.crc = 0

    def update(self, data) -> None:
        self.crc = zlib.crc32(data, self.crc)

    def hexdigest(self) -> str:
        return crc32_hex(self.crc)


def file_identity(st: os.stat_result) -> tuple:
    """What tells a file apart from itself rewritten: device, inode, size and modification time."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def file_checksum(path, buf: bytearray | None = None) -> tuple[tuple, str]:
    """(identity, crc32 hex) of the file at `path`, read whole in BLOCK-sized reads into one buffer (both
    the reads and zlib release the GIL). OSError where it cannot be read."""
    buf = buf if buf is not None else bytearray(BLOCK)
    view = memoryview(buf)
    crc = 0
    with open(path, "rb", buffering=0) as f:
        identity = file_identity(os.fstat(f.fileno()))
        while n := f.readinto(buf):
            crc = zlib.crc32(view[:n], crc)
    return identity, crc32_hex(crc)


class Checksums:
    """The checksums the read-ahead computes, each kept until the load of its file takes it (`take`), so that
    a file read ahead is not read a second time to be verified. A file handed to the reader is marked
    queued at once, and its load waits for the reader's checksum (the reader goes through a batch's files
    in the order the loads want them) unless the job is dropped. One table per process (`CHECKSUMS`): the
    loads do not know which reader read their file."""

    def __init__(self):
        self.cond = threading.Condition()
        # path -> ("queued",), ("reading",) or ("done", identity, crc hex, generation)
        self.table: dict[str, tuple] = {}
        self.generation = 0

    def queue(self, paths) -> int:
        """Mark `paths` as a new job's; returns its generation. Checksums two jobs old are dropped (their
        loads are past: a job is submitted one batch ahead of its loads)."""
        with self.cond:
            self.generation += 1
            old = self.generation - 2
            for path in [p for p, e in self.table.items() if e[0] == "done" and e[3] <= old]:
                del self.table[path]
            for path in paths:
                self.table[str(path)] = ("queued",)
            return self.generation

    def forget(self, paths) -> None:
        """Paths the reader will not read after all (a dropped job, a reader that stopped): their loads read
        them."""
        with self.cond:
            for path in map(str, paths):
                if self.table.get(path, ("",))[0] in ("queued", "reading"):
                    del self.table[path]
            self.cond.notify_all()

    def reading(self, path: str) -> None:
        with self.cond:
            self.table[path] = ("reading",)

    def done(self, path: str, result: tuple[tuple, str] | None, generation: int) -> None:
        with self.cond:
            if result is None:
                self.table.pop(path, None)
            else:
                self.table[path] = ("done", *result, generation)
            self.cond.notify_all()

    def take(self, path: str) -> tuple[tuple, str] | None:
        """(identity, crc hex) the reader found for `path`, waiting while it is queued or being read; None
        where the reader has not read it (then the caller reads the file itself)."""
        with self.cond:
            while self.table.get(path, ("",))[0] in ("queued", "reading"):
                self.cond.wait()
            entry = self.table.pop(path, None)
        return None if entry is None else (entry[1], entry[2])

    def clear(self) -> None:
        with self.cond:
            self.table.clear()
            self.cond.notify_all()


CHECKSUMS = Checksums()


class ReadAhead:
    """Reads files on one background thread: the prefill names the next batch's chunk files while it scores
    this one, so each is brought into the page cache and checksummed on another core (an encoding the page
    cache does not hold is read there rather than page fault by page fault inside the scoring, and its load
    need not read it again to verify it). Errors are left to the load."""

    def __init__(self, table: Checksums = CHECKSUMS):
        self.pool = None  # a one-worker ThreadPoolExecutor, started on first use
        self.queued: list = []  # (job, its paths) not yet finished
        self.table = table

    def submit(self, paths: list[Path]) -> None:
        """Start reading `paths` and return at once. A job still queued when the next comes is dropped (the
        scoring is reading its batch itself by then). With one CPU there is no other core to read on: the
        kernel is only advised (POSIX_FADV_WILLNEED), which costs no copy, and the loads verify their files."""
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        if cpus < 2:
            advise_will_need(paths)
            return
        if self.pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="encoding-read-ahead")
        for job, job_paths in self.queued:
            if job.cancel():  # only succeeds for a job that has not started
                self.table.forget(job_paths)
        generation = self.table.queue(paths)
        try:
            job = self.pool.submit(read_through, paths, generation=generation, table=self.table)
        except RuntimeError:  # the pool is shut down (interpreter exit): the loads read for themselves
            self.table.forget(paths)
            return
        self.queued = [(j, p) for j, p in self.queued if not j.done()] + [(job, paths)]


def read_through(paths: list[Path], block: int = BLOCK, generation: int = 0, table: Checksums = CHECKSUMS) -> None:
    """Read each file whole into one reused buffer (the pages come into the page cache, reading the disk
    where needed) and leave its checksum in `table` for its load. Missing or unreadable files are skipped:
    errors are left to the load."""
    buf = bytearray(block)
    try:
        for path in paths:
            key = str(path)
            table.reading(key)
            result = None
            try:
                result = file_checksum(path, buf)
            except OSError:
                pass
            finally:
                table.done(key, result, generation)
    finally:
        table.forget(paths)  # any not done (the reader stopped): their loads read them


def advise_will_need(paths: list[Path]) -> None:
    if not hasattr(os, "posix_fadvise"):
        return
    for path in paths:
        try:
            fd = os.open(str(path), os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(fd)
