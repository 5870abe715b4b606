"""Reading an encoding's next batch of chunk files into the page cache while the current batch is scored."""
from __future__ import annotations

import os
from pathlib import Path


class ReadAhead:
    """Reads files into the page cache on one background thread. The prefill names the next batch's chunk
    files while it scores this one, so an encoding the page cache does not hold (a new process, a cold disk,
    pages the OS reclaimed) is read on another core rather than page fault by page fault inside the scoring.
    Advice only: errors are left to the load."""

    def __init__(self):
        self.pool = None  # a one-worker ThreadPoolExecutor, started on first use
        self.queued: list = []  # its jobs not yet finished

    def submit(self, paths: list[Path]) -> None:
        """Start reading `paths` and return at once. A job still queued when the next comes is dropped (the
        scoring is reading its batch itself by then). With one CPU there is no other core to read on: the
        kernel is only advised (POSIX_FADV_WILLNEED), which costs no copy."""
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        if cpus < 2:
            advise_will_need(paths)
            return
        if self.pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="encoding-read-ahead")
        for job in self.queued:
            job.cancel()  # only succeeds for a job that has not started
        self.queued = [job for job in self.queued if not job.done()] + [self.pool.submit(read_through, paths)]


def read_through(paths: list[Path], block: int = 1 << 22) -> None:
    """Bring each file into the page cache: sendfile to /dev/null where the OS has it (the pages are pulled
    in, reading the disk where needed, and copied nowhere, so a cached file costs page lookups, not a pass of
    its bytes through the CPU caches the scoring uses), reads into one reused buffer otherwise. Both release
    the GIL. Errors are left to the load."""
    try:
        sink = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        sink = None
    buf = None
    try:
        for path in paths:
            try:
                with open(path, "rb", buffering=0) as f:
                    if sink is None or not _send_whole(f.fileno(), sink, block):
                        buf = buf or bytearray(block)
                        while f.readinto(buf):
                            pass
            except OSError:
                pass
    finally:
        if sink is not None:
            os.close(sink)


def _send_whole(fd: int, sink: int, block: int) -> bool:
    """sendfile all of `fd` to `sink`; False where sendfile is missing or refuses the pair."""
    if not hasattr(os, "sendfile"):
        return False
    size, offset = os.fstat(fd).st_size, 0
    try:
        while offset < size:
            sent = os.sendfile(sink, fd, offset, min(block, size - offset))
            if sent <= 0:
                break
            offset += sent
    except OSError:
        return False
    return True


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
