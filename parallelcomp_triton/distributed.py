"""Chunk-parallel prefill across ranks with torch.distributed.

    torchrun --nproc-per-node 2 -m parallelcomp_triton.run --input doc.txt --question "..." --distributed

Every rank holds the whole model. The chunks of each document are split into contiguous shares, one per
rank (sizes differ by at most one, the larger shares first, so rank 0 always owns chunk 0 and with it the
shared prompt prefix's KV). Each rank prefills and compresses its share exactly as one process would
(`score.prefill`) and keeps its own K best chunks per document: the global K best are among the
ranks' local K best, so nothing else has to move. Then:

1. all-gather of (document, chunk, question NLL) of every rank's local K best, and of every chunk's NLL
   for the stats; every rank picks the same global K best (lowest NLL, ties to the earlier chunk);
2. each owner sends those compressed caches to rank 0 (`dist.send`: one [2 * layers, H_kv, n, d] K/V
   tensor per chunk, plus one [layers, H_kv, n] int32 tensor of kept positions when KV eviction is on);
   rank 0 knows every shape from the chunk spans, so no metadata travels;
3. rank 0 merges, runs the question pass and decodes (`answer.answer`); the other ranks are done.

Encoded documents (`encode_distributed`, `--save-encoding` / `--encoding` with `--distributed`): each rank
encodes its share of the chunks and writes their files into one directory, which every rank must see;
answering from it, each rank reads its own share's chunks from there, then as above.

Backend: nccl on GPUs (rank r uses cuda:LOCAL_RANK), gloo on CPU. Results equal the single-process run
token for token up to floating-point ties (a chunk's numbers do not depend on which rank encodes it, only on
which chunks share its prefill batch, as in one process with another `batch_chunks`).
"""
from __future__ import annotations

import os
import pickle
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import answer
from .alternatives import ALTERNATIVE_MODES
from .cache import ChunkCache
from .encode import ChunkSource, progress_bar, write_chunks
from .errors import ParallelCompError
from .pipeline import ParallelComp
from .plan import Plan
from .score import keep_best, prefill
from .storage import AtomicDir, EncodedDocument, encoding_meta


@dataclass
class DistContext:
    rank: int
    world_size: int
    device: torch.device
    backend: str

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank (pickled; for small things such as the input text)."""
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self, together: bool = True) -> None:
        """Leave the process group. `together`: every rank gets here (normal end, or the same bad input on
        every rank); then wait for all first, since a gloo rank that tears down while a peer still works
        (rank 0 decoding) can abort in the C++ teardown ("terminate called without an active exception").
        Otherwise (one rank failed alone) just return: the process exits and torchrun stops the others."""
        if dist.is_initialized() and together:
            dist.barrier()
            dist.destroy_process_group()


def init_distributed(device: str | None = None) -> DistContext:
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE, MASTER_ADDR, ...)."""
    missing = [name for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise ParallelCompError(f"--distributed: {', '.join(missing)} not set; launch with "
                                "torchrun --nproc-per-node N -m parallelcomp_triton.run ... --distributed")
    use_cuda = device.startswith("cuda") if device else torch.cuda.is_available()
    if use_cuda:
        if not torch.cuda.is_available():
            raise ParallelCompError(f"--device {device}: CUDA is not available on this machine")
        where = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(where)
        dist.init_process_group("nccl", device_id=where)
    else:
        where = torch.device("cpu")
        dist.init_process_group("gloo")
    return DistContext(dist.get_rank(), dist.get_world_size(), where, dist.get_backend())


def chunk_shares(num_chunks: int, world_size: int) -> list[range]:
    """Contiguous shares of range(num_chunks), one per rank, larger ones first (rank 0 owns chunk 0)."""
    base, extra = divmod(num_chunks, world_size)
    shares, start = [], 0
    for rank in range(world_size):
        end = start + base + (1 if rank < extra else 0)
        shares.append(range(start, end))
        start = end
    return shares


def _owner(shares: list[range], chunk: int) -> int:
    return next(rank for rank, share in enumerate(shares) if chunk in share)


def _send_chunk(cache: ChunkCache, dst: int) -> int:
    """Send one compressed chunk cache; returns the bytes sent."""
    kv = torch.stack(cache.keys + cache.values)  # one message: [2 * layers, H_kv, n, d]
    dist.send(kv, dst)
    sent = kv.numel() * kv.element_size()
    if cache.positions is not None:
        positions = torch.stack(cache.positions).to(torch.int32)
        dist.send(positions, dst)
        sent += positions.numel() * positions.element_size()
    return sent


def _recv_chunk(pc: ParallelComp, plan: Plan, chunk: int, nll: float, src: int) -> ChunkCache:
    a = pc.args
    s, e = plan.spans[chunk]
    n = min(plan.budget, e - s) if plan.budget is not None else e - s
    weight = pc.model.embed_tokens.weight
    kv = torch.empty(2 * a.num_layers, a.num_kv_heads, n, a.head_dim, dtype=weight.dtype, device=weight.device)
    dist.recv(kv, src)
    positions = None
    if plan.budget is not None:
        positions = torch.empty(a.num_layers, a.num_kv_heads, n, dtype=torch.int32, device=weight.device)
        dist.recv(positions, src)
        positions = list(positions.unbind(0))
    layers = list(kv.unbind(0))
    return ChunkCache(index=chunk, context_len=e - s, nll=nll, keys=layers[:a.num_layers],
                      values=layers[a.num_layers:], positions=positions)


@torch.no_grad()
def generate_distributed(pc: ParallelComp, ctx: DistContext, pairs, max_new_tokens: int | None = None,
                         config=None, progress: bool = False, return_errors: bool = False) -> list:
    """`pc.generate_batch(pairs, ...)` with the chunk prefill spread over the ranks. Every rank must call it
    with the same arguments. Rank 0 gets the results; the other ranks get a list of the same length with
    None for answered pairs (and the ParallelCompError of bad pairs when `return_errors`)."""
    cfg = pc.resolve_config(config, max_new_tokens)
    if cfg.mode in ALTERNATIVE_MODES:  # one attention over the whole prompt: nothing to share out
        raise ParallelCompError(f"--distributed spreads chunks over ranks; mode {cfg.mode!r} has none (use "
                                "parallelcomp, full or truncate)")
    planned = pc.plan_all(pairs, cfg, return_errors)
    plans = [p for p in planned if isinstance(p, Plan)]
    if not plans:
        return planned
    rank, world = ctx.rank, ctx.world_size
    shares = [chunk_shares(len(plan.spans), world) for plan in plans]

    t = time.perf_counter()
    work = [(d, c) for d in range(len(plans)) for c in shares[d][rank]]
    states = prefill(pc.model, cfg, plans, work, pc.backend, pc.read_ahead, progress)
    prefill_s = time.perf_counter() - t

    # 1. Agree on the K best chunks of every document.
    t_exchange = time.perf_counter()
    local = {"kept": [(d, c.index, c.nll) for d, state in enumerate(states) for c in state.kept],
             "nll": [(d, c, states[d].nll[c]) for d, c in work], "chunks": len(work), "prefill_s": prefill_s}
    score_bytes = len(pickle.dumps(local))
    gathered: list = [None] * world
    dist.all_gather_object(gathered, local)
    winners: list[list[tuple[int, float]]] = []  # per document: (chunk, nll), document order
    for d, plan in enumerate(plans):
        candidates = [(c, nll) for part in gathered for dd, c, nll in part["kept"] if dd == d]
        winners.append(sorted(keep_best(candidates, plan.keep, nll_of=lambda x: x[1], index_of=lambda x: x[0])))

    # 2. The owners send the winners' caches to rank 0, in one agreed order (document, chunk).
    kv_bytes = 0
    received: dict[tuple[int, int], ChunkCache] = {}
    for d, plan in enumerate(plans):
        mine = {c.index: c for c in states[d].kept}
        for c, nll in winners[d]:
            owner = _owner(shares[d], c)
            if owner == 0:
                continue
            if rank == owner:
                kv_bytes += _send_chunk(mine[c], dst=0)
            elif rank == 0:
                received[(d, c)] = _recv_chunk(pc, plan, c, nll, src=owner)
    sent: list = [None] * world
    dist.all_gather_object(sent, {"kv_bytes": kv_bytes, "score_bytes": score_bytes})
    if rank != 0:
        return [None if isinstance(p, Plan) else p for p in planned]

    # 3. Rank 0: the global K best per document, every chunk's NLL, then merge, question pass and decoding.
    for d, state in enumerate(states):
        mine = {c.index: c for c in state.kept}
        state.kept = [mine[c] if (d, c) not in received else received[(d, c)] for c, _ in winners[d]]
        for part in gathered:
            for dd, c, nll in part["nll"]:
                if dd == d:
                    state.nll[c] = nll
    exchange_s = time.perf_counter() - t_exchange
    cache = answer.new_cache(pc.model, plans)
    for row, (plan, state) in enumerate(zip(plans, states)):
        answer.merge(cache, row, plan, state)
        plan.stats.time_prefill_s = time.perf_counter() - t
        plan.stats.distributed = {
            "world_size": world, "backend": ctx.backend,
            "chunks_per_rank": [part["chunks"] for part in gathered],
            "prefill_s_per_rank": [round(part["prefill_s"], 4) for part in gathered],
            "exchange_s": round(exchange_s, 4),
            # Point-to-point K/V payload to rank 0, and each rank's pickled share of the score all-gather.
            "kv_bytes_sent_per_rank": [s["kv_bytes"] for s in sent],
            "score_bytes_sent_per_rank": [s["score_bytes"] for s in sent],
        }
    answers = iter(answer.answer(pc.model, pc.tokenizer, cfg, plans, states, cache, pc.eos_ids(), pc.backend))
    return [next(answers) if isinstance(p, Plan) else p for p in planned]


def on_every_rank(ctx: DistContext, fn, *args):
    """fn(*args) on every rank; where it fails (one line: ParallelCompError) on any rank, every rank raises the
    first failing rank's line, so that no rank waits in a later collective for one that has left."""
    result, error = None, None
    try:
        result = fn(*args)
    except ParallelCompError as e:
        error = str(e)
    errors: list = [None] * ctx.world_size
    dist.all_gather_object(errors, error)
    failed = [(rank, e) for rank, e in enumerate(errors) if e is not None]
    if failed:
        rank, message = failed[0]
        raise ParallelCompError(message if rank == 0 else f"rank {rank}: {message}")
    return result


@torch.no_grad()
def encode_distributed(pc: ParallelComp, ctx: DistContext, context: str, path, config=None,
                       progress: bool = False) -> EncodedDocument:
    """`pc.encode(context, config, path)` with the chunks spread over the ranks as `generate_distributed`
    spreads them: each rank encodes its share (`batch_chunks` at a time from the share's first chunk) and
    writes its chunks' files into the temporary directory rank 0 made beside `path`; rank 0 writes meta.json
    last and renames it into place. `path` must be on a disk every rank sees (one host, or a shared file
    system); otherwise every rank fails with one line. Every rank must call it with the same arguments and
    gets the encoding, read back and checked."""
    prefix, document, spans, settings = pc.plan_encoding(context, config)
    share = chunk_shares(len(spans), ctx.world_size)[ctx.rank]
    made = on_every_rank(ctx, lambda: AtomicDir(path, settings["kv_store"]) if ctx.rank == 0 else None)
    tmp = ctx.broadcast(str(made.tmp) if made is not None else None)

    def join() -> AtomicDir:
        if made is not None:
            return made
        if not os.path.isdir(tmp):
            raise ParallelCompError(f"--save-encoding {path}: rank 0's directory {tmp} is not visible here; under "
                                    "--distributed the encoding must be on a disk every rank shares")
        return AtomicDir.join(path, tmp, settings["kv_store"])

    def write(writer: AtomicDir) -> None:
        bar = progress_bar(len(share), "encoding", progress)
        try:
            write_chunks(writer, pc.model, ChunkSource(prefix, document, tuple(spans)), settings["batch_chunks"],
                         share, pc.backend, bar)
        except OSError as e:  # a full or read-only disk on this rank
            raise ParallelCompError(f"{path}: cannot write ({e.strerror or e})") from None
        finally:
            if bar is not None:
                bar.close()

    def commit(files: list[dict]) -> None:
        if made is None:
            return
        for part in files:
            made.files.update(part)
        try:
            made.commit(encoding_meta(pc.model, pc.tokenizer, pc.source, prefix, document, spans, settings))
        except OSError as e:
            raise ParallelCompError(f"{path}: cannot write ({e.strerror or e})") from None

    try:
        writer = on_every_rank(ctx, join)
        on_every_rank(ctx, write, writer)
        files: list = [None] * ctx.world_size
        dist.all_gather_object(files, writer.files)
        on_every_rank(ctx, commit, files)
    except BaseException:
        if made is not None:
            made.abort()
        raise
    return on_every_rank(ctx, pc.load_encoded, path)
