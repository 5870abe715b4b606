"""Settings of one ParallelComp run, in one dataclass, checked before any work starts."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from .errors import ParallelCompError

# parallelcomp: the method; full: plain full attention over the whole document (fails past the window);
# truncate: the document's head and tail that fit the window; the training-free alternatives a user would try
# instead (alternatives.py): RoPE scaling (yarn, dynamic-ntk), self-extend, streaming (StreamingLLM).
MODES = ("parallelcomp", "full", "truncate", "yarn", "dynamic-ntk", "self-extend", "streaming")
REGIONS = ("sink", "recent", "middle", "all")
GQA_REDUCES = ("max", "mean", "sum")
KV_STORES = ("exact", "int8")
SCORE_TOKENS = ("suffix", "question")
# auto: the chat template when the tokenizer has one, plain otherwise (prompt.template_name).
TEMPLATES = ("auto", "plain", "chat")
# Weight/activation precision; "auto" = bf16 where the hardware computes it natively (precision.py).
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class Calibration:
    """Attention-bias calibration: in layers first..last, mask (per query head) the merged-cache tokens
    of `region` whose attention from the last `rows` question rows exceeds `tau`."""

    region: str = "sink"
    first_layer: int = 3
    last_layer: int = 6
    tau: float = 0.1
    rows: int = 1
    region_tokens: int = 100  # n of "first n" (sink) and "last n" (recent)

    @classmethod
    def parse(cls, spec: str) -> "Calibration":
        """'REGION:I-J:TAU', e.g. 'sink:3-6:0.1' (TAU optional)."""
        m = re.fullmatch(r"\s*(\w+)\s*:\s*(\d+)\s*-\s*(\d+)\s*(?::\s*([0-9.eE+-]+))?\s*", spec or "")
        if not m:
            raise ParallelCompError(f"--calibrate {spec!r}: expected REGION:I-J[:TAU], e.g. sink:3-6:0.1")
        tau = float(m.group(4)) if m.group(4) else 0.1
        cal = cls(region=m.group(1), first_layer=int(m.group(2)), last_layer=int(m.group(3)), tau=tau)
        cal.check()
        return cal

    def check(self, num_layers: int | None = None) -> None:
        if self.region not in REGIONS:
            raise ParallelCompError(f"calibration region {self.region!r}: expected one of {', '.join(REGIONS)}")
        if self.first_layer < 0 or self.last_layer < self.first_layer:
            raise ParallelCompError(f"calibration layers {self.first_layer}-{self.last_layer}: need 0 <= I <= J")
        if num_layers is not None and self.last_layer >= num_layers:
            raise ParallelCompError(f"calibration layers {self.first_layer}-{self.last_layer}: the model has "
                                    f"{num_layers} layers (0-{num_layers - 1})")
        if not 0.0 < self.tau < 1.0:
            raise ParallelCompError(f"calibration tau {self.tau}: must be in (0, 1)")
        if self.rows < 1 or self.region_tokens < 1:
            raise ParallelCompError("calibration rows and region_tokens must be >= 1")


@dataclass
class ParallelCompConfig:
    """Defaults follow the method's released recipe where it has one and our measurements where it does not
    (see README "Defaults")."""

    mode: str = "parallelcomp"
    # Prompt: the template holds {context} and {question}; what precedes {context} is the shared prefix
    # encoded once, what follows it (with the question filled in) is appended to every chunk.
    # "auto": the tokenizer's chat template when it has one (natural questions are answered with it on the
    # bundled model, plain text ends the turn at once: BENCHMARKS.md, "Questions as people write them"),
    # plain text otherwise.
    template: str = "auto"
    instruction: str = ""  # task text placed before the document, inside the shared prefix
    prompt: str | None = None  # a full template; overrides `template` and `instruction` when given
    # Chunking. 1024 document tokens per chunk: on the bundled 135M model, chunks far below its 8K window
    # retrieve better and prefill faster (BENCHMARKS.md, "Choosing the defaults"). None: as large as the
    # trained window allows after prefix, question and answer (the paper's setting, for larger models).
    chunk_tokens: int | None = 1024
    # Move each chunk boundary (by at most chunk_tokens / 8) to the nearest sentence end (a line end only
    # where no sentence end is in reach), so that no chunk cuts a sentence, such as the one holding the
    # answer, in two.
    snap_to_sentences: bool = True
    window: int | None = None  # trained window; None: the model's max_position_embeddings
    batch_chunks: int = 4  # chunks encoded and scored per forward (at least)
    # Tokens per prefill forward: batches grow past batch_chunks until they hold about this many (0: never).
    # None: 16384 on CUDA (about what serving engines run per step on H100-class GPUs: fewer, larger
    # launches), 0 on a CPU, where larger batches measured no faster (BENCHMARKS.md, "Many questions about
    # one document").
    batch_tokens: int | None = None
    # How an encoding (`encode`, the server's store) keeps its chunks' K/V: "exact", the model's dtype, so that
    # answers from it equal a fresh run's; "int8", one byte per value (per-channel key, per-token value
    # scales) at about half the size (BENCHMARKS.md, "One byte per stored value").
    kv_store: str = "exact"
    # Chunk eviction: keep the K chunks with the lowest question NLL.
    keep_chunks: int = 3
    # Which suffix tokens the NLL averages: "question" = the question's own tokens; "suffix" = all of them
    # (the template's separator, the question, anything after it), as upstream does. The separator's NLL
    # measures how the chunk happens to end, not what it holds, and can rank the chunk holding the answer
    # out (BENCHMARKS.md, "With the package defaults").
    score_tokens: str = "question"
    # Parallel KV-cache eviction: B context tokens per chunk, layer and KV head (None: keep all). 512 of
    # 1024: it retrieves at least as well as larger budgets or keeping every key, at half the cache
    # (BENCHMARKS.md, "KV budget B and chunk count K").
    kv_budget: int | None = 512
    # w: the question's last w tokens (and any template text after them, such as a chat turn's end) score
    # the keys that eviction keeps (prompt.score_rows).
    score_window: int = 8
    # Each key is ranked by the highest window score within pool_kernel // 2 positions of it, so the
    # neighbours of a peak are kept with it. 15, not SnapKV's 7: the scores peak on the words the question
    # repeats, and the answer follows them; narrower pools leave the last digits of a long number outside
    # every kept run (BENCHMARKS.md, "Questions as people write them").
    pool_kernel: int = 15
    gqa_reduce: str = "max"
    calibration: Calibration | None = None
    # Mode self-extend: keys within this many positions of the query keep their own positions, farther ones
    # are grouped (floor(position / group)); group None: the smallest that keeps every position in the window.
    self_extend_window: int = 1024
    self_extend_group: int | None = None
    # Mode streaming: the first sink_tokens tokens stay, the rest is a recent window; the prompt is read
    # stream_step tokens per forward.
    sink_tokens: int = 4
    stream_step: int = 1024
    # Decoding.
    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False  # decode exactly max_new_tokens (benchmarks time decoding even if EOS comes first)
    stop_strings: tuple[str, ...] = field(default_factory=tuple)

    def check(self) -> None:
        if self.mode not in MODES:
            raise ParallelCompError(f"mode {self.mode!r}: expected one of {', '.join(MODES)}")
        if self.prompt is None and self.template not in TEMPLATES:
            raise ParallelCompError(f"template {self.template!r}: expected one of {', '.join(TEMPLATES)}")
        if self.prompt is not None and ("{context}" not in self.prompt or "{question}" not in self.prompt
                                        or self.prompt.index("{context}") > self.prompt.index("{question}")):
            raise ParallelCompError("prompt: must contain {context} followed later by {question}")
        if self.prompt is not None and "{answer_start}" in self.prompt and (
                self.prompt.index("{answer_start}") < self.prompt.index("{question}")):
            raise ParallelCompError("prompt: {answer_start} must come after {question}")
        for name in ("keep_chunks", "batch_chunks", "score_window", "max_new_tokens", "self_extend_window",
                     "stream_step"):
            if getattr(self, name) < 1:
                raise ParallelCompError(f"{name} = {getattr(self, name)}: must be >= 1")
        if self.self_extend_group is not None and self.self_extend_group < 1:
            raise ParallelCompError(f"self_extend_group = {self.self_extend_group}: must be >= 1 (or None: the "
                                    "smallest that fits the window)")
        if self.sink_tokens < 0:
            raise ParallelCompError(f"sink_tokens = {self.sink_tokens}: must be >= 0")
        if self.batch_tokens is not None and self.batch_tokens < 0:
            raise ParallelCompError(f"batch_tokens = {self.batch_tokens}: must be >= 0 (or None for the device's)")
        if self.kv_budget is not None and self.kv_budget < 1:
            raise ParallelCompError(f"kv_budget = {self.kv_budget}: must be >= 1 (or None to keep every token)")
        if self.chunk_tokens is not None and self.chunk_tokens < 1:
            raise ParallelCompError(f"chunk_tokens = {self.chunk_tokens}: must be >= 1")
        if self.window is not None and self.window < 2:
            raise ParallelCompError(f"window = {self.window}: must be >= 2")
        if self.pool_kernel < 1 or self.pool_kernel % 2 == 0:
            raise ParallelCompError(f"pool_kernel = {self.pool_kernel}: must be odd and >= 1")
        if self.gqa_reduce not in GQA_REDUCES:
            raise ParallelCompError(f"gqa_reduce {self.gqa_reduce!r}: expected one of {', '.join(GQA_REDUCES)}")
        if self.kv_store not in KV_STORES:
            raise ParallelCompError(f"kv_store {self.kv_store!r}: expected one of {', '.join(KV_STORES)}")
        if self.score_tokens not in SCORE_TOKENS:
            raise ParallelCompError(f"score_tokens {self.score_tokens!r}: expected one of {', '.join(SCORE_TOKENS)}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ParallelCompError("temperature must be >= 0 and top_p in (0, 1]")
        if self.calibration is not None:
            self.calibration.check()
