"""ParallelComp side by side with the alternatives, on the same cases: accuracy and seconds per question for
every method x task x length, in one process.

    python -m parallelcomp_triton.eval compare --methods parallelcomp,streaming,truncate,yarn \\
        --tasks passkey,niah,multikey --lengths 4000,16000 --depths 0.25,0.5,0.75 \\
        --json results/compare.json --plot results/compare.png

Every method answers the same generated cases (same document, question, instruction, template, dtype and
answer length). Each task's in-window reference is measured first: at --reference-length, the better of full
attention and ParallelComp. A task whose reference stays below half marks is one the model cannot do even
inside its window: its cells are shown, marked so, and say nothing for or against a method. --max-seconds
skips a cell whose estimated seconds per question (the method's own time at a shorter length, scaled
quadratically for full-attention modes, linearly for the others) exceed it; skipped cells say so and why,
and no accuracy is extrapolated.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import time

from .config import MODES, ParallelCompConfig
from .errors import ParallelCompError
from .evaluate import needle_chunk, nll_rank
from .tasks import CASES

# Methods that attend over the whole prompt: their cost grows with the square of its length.
QUADRATIC = ("full", "yarn", "dynamic-ntk", "self-extend")
REFERENCE_METHODS = ("full", "parallelcomp")
# Settings that only one method reads: recorded per cell, free to differ between runs that grow one result.
METHOD_SETTINGS = {"self-extend": ("self_extend_window", "self_extend_group"),
                   "streaming": ("sink_tokens", "stream_step")}
WITHIN_REACH = 0.5  # reference accuracy below this: the task is beyond the model, even inside its window


@dataclasses.dataclass
class Grid:
    methods: list[str]
    tasks: list[str]
    lengths: list[int]
    depths: list[float]
    question: str = "cue"
    reference_length: int = 4000
    max_seconds: float | None = None
    seed: int = 0
    max_new_tokens: int | None = None  # None: each task's own (room for all it asks for)

    def check(self) -> None:
        for name, values, known in (("methods", self.methods, MODES), ("tasks", self.tasks, CASES)):
            unknown = [v for v in values if v not in known]
            if not values or unknown:
                raise ParallelCompError(f"--{name}: {', '.join(unknown) or 'none given'}: expected some of "
                                        f"{', '.join(known)}")
        if not self.lengths or min(self.lengths) < 100 or self.reference_length < 100:
            raise ParallelCompError("--lengths and --reference-length must be >= 100 tokens")
        if not self.depths or not all(0 <= d <= 1 for d in self.depths):
            raise ParallelCompError("--depths must be in [0, 1]")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ParallelCompError(f"--max-new-tokens {self.max_new_tokens}: must be >= 1")


def compare(pc, grid: Grid, config: ParallelCompConfig, log=None, save=None, previous: dict | None = None) -> dict:
    """Run the grid; returns the result (see format_table). `save(result)` is called after every cell, so a
    long run leaves what it has measured. `previous`: an earlier result of the same model, dtype, cases and
    settings, whose cells are kept rather than measured again (a grid grown in several runs)."""
    grid.check()
    result = {"model": pc.source, "dtype": str(pc.model.embed_tokens.weight.dtype).removeprefix("torch."),
              "machine": machine(), "grid": dataclasses.asdict(grid), "config": dataclasses.asdict(config),
              "reference": {}, "cells": []}
    cases: dict = {}
    measured: dict = {}  # (method, task, length) -> cell: every cell measured, reference ones included
    if previous is not None:
        _check_same_cases(previous, result)
        # Skipped cells are tried again: this run may allow them.
        measured = {(c["method"], c["task"], c["length"]): c for c in previous["cells"] if c["accuracy"] is not None}
        for name in ("methods", "tasks", "lengths"):
            merged = previous["grid"][name] + [v for v in getattr(grid, name) if v not in previous["grid"][name]]
            result["grid"][name] = sorted(merged) if name == "lengths" else merged
        result["reference"] = dict(previous["reference"])

    def cell(method: str, task: str, length: int, reference: bool = False) -> dict:
        key = (method, task, length)
        if key in measured:
            return measured[key]
        reason = _skip_reason(method, length, measured, grid.max_seconds) if not reference else None
        out = {"task": task, "method": method, "length": length, "accuracy": None, "seconds_per_question": None,
               "skipped": reason, "settings": {k: getattr(config, k) for k in METHOD_SETTINGS.get(method, ())},
               "cases": []}
        if reason is None:
            for depth in grid.depths:
                case = cases.setdefault((task, length, depth), CASES[task](pc.tokenizer, length, depth=depth,
                                                                            seed=grid.seed, question=grid.question))
                cfg = dataclasses.replace(config, mode=method, instruction=config.instruction or case.instruction,
                                          max_new_tokens=grid.max_new_tokens or case.max_new_tokens)
                t = time.perf_counter()
                try:
                    res = pc.generate(case.context, case.question, config=cfg)
                except ParallelCompError as e:  # the mode refuses this case (a setting that cannot fit): said
                    out["skipped"] = f"refused: {e}"
                    break
                seconds = time.perf_counter() - t
                text = res.text
                score = case.score(text)
                required = list(case.required or (case.answer,))
                row = {"depth": depth, "tokens": case.tokens, "required": required, "output": text, "score": score,
                       "seconds": round(seconds, 2)}
                if method == "parallelcomp":  # a miss: was an item's chunk evicted, or read wrong?
                    spans, kept = res.stats.chunk_spans, set(res.stats.kept_chunks)
                    held = [needle_chunk(pc.tokenizer, case, spans, r) for r in required]
                    # NLL ranks (1: best) do not depend on K: a run at one K tells what any other K keeps
                    row.update(chunks=len(spans), kept_chunks=sorted(kept),
                               required_chunks=held, required_kept=sum(c in kept for c in held if c is not None),
                               required_ranks=[nll_rank(res.stats.chunk_nll_all, c) for c in held])
                out["cases"].append(row)
                if log:
                    log(f"{task:>10} {length:>7} {method:>12} depth {depth:.2f}: {score:4.2f} "
                        f"{text.strip()[:50]!r} ({seconds:.1f} s)")
        if out["skipped"] is None:
            out["accuracy"] = statistics.mean(c["score"] for c in out["cases"])
            out["seconds_per_question"] = round(statistics.median(c["seconds"] for c in out["cases"]), 2)
        else:
            out["cases"] = []
            if log:
                log(f"{task:>10} {length:>7} {method:>12}: skipped, {out['skipped']}")
        measured[key] = out
        return out

    for task in grid.tasks:
        refs = [cell(m, task, grid.reference_length, reference=True) for m in REFERENCE_METHODS]
        refs = [c for c in refs if c["accuracy"] is not None]
        if refs:
            best = max(refs, key=lambda c: c["accuracy"])
            result["reference"][task] = {"length": grid.reference_length, "method": best["method"],
                                         "accuracy": best["accuracy"],
                                         "within_reach": best["accuracy"] >= WITHIN_REACH,
                                         "cells": {c["method"]: c["accuracy"] for c in refs}}
        for length in sorted(grid.lengths):
            for method in grid.methods:
                cell(method, task, length)
                result["cells"] = list(measured.values())
                if save:
                    save(result)
    result["cells"] = list(measured.values())
    return result


def _check_same_cases(previous: dict, result: dict) -> None:
    """An earlier result can be grown only when its cases and settings are this run's."""
    for name in ("model", "dtype"):
        if previous.get(name) != result[name]:
            raise ParallelCompError(f"--resume: the earlier result has {name} {previous.get(name)!r}, this run "
                                    f"{result[name]!r}")
    for name in ("depths", "question", "seed", "reference_length", "max_new_tokens"):
        if previous["grid"].get(name) != result["grid"][name]:
            raise ParallelCompError(f"--resume: the earlier result has {name} {previous['grid'].get(name)!r}, "
                                    f"this run {result['grid'][name]!r}")
    def shared(cfg: dict) -> dict:
        return {k: v for k, v in cfg.items() if not any(k in names for names in METHOD_SETTINGS.values())}

    # A setting added since the earlier run had, in effect, its default then.
    defaults = json.loads(json.dumps(dataclasses.asdict(ParallelCompConfig())))
    earlier = {**defaults, **(previous.get("config") or {})}
    if shared(earlier) != shared(json.loads(json.dumps(result["config"]))):
        raise ParallelCompError("--resume: the earlier result was measured with other settings")


def _skip_reason(method: str, length: int, measured: dict, max_seconds: float | None) -> str | None:
    """Why a cell is skipped (None: run it): its estimated seconds per question exceed max_seconds."""
    if max_seconds is None:
        return None
    shorter = [(c["length"], c["seconds_per_question"]) for (m, _, n), c in measured.items()
               if m == method and n < length and c["seconds_per_question"] is not None]
    if not shorter:
        return None
    n0, s0 = max(shorter)
    estimate = s0 * (length / n0) ** (2 if method in QUADRATIC else 1)
    if estimate <= max_seconds:
        return None
    growth = "quadratic" if method in QUADRATIC else "linear"
    return f"estimated {estimate:.0f} s per question ({growth} from {s0:.0f} s at {n0}) > --max-seconds {max_seconds:g}"


def machine() -> str:
    """The CPU's model name and core count (or the GPU's name): every figure names its machine."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, {os.cpu_count()} cores"


def format_table(result: dict) -> str:
    """One row per task and length, one column per method: accuracy and median seconds per question; the
    in-window reference in the task's first row."""
    methods = result["grid"]["methods"]
    lines = ["| task | tokens | " + " | ".join(methods) + " |", "|---|---:|" + "---:|" * len(methods)]
    by_key = {(c["task"], c["method"], c["length"]): c for c in result["cells"]}
    for task in result["grid"]["tasks"]:
        ref = result["reference"].get(task)
        for i, length in enumerate(sorted(result["grid"]["lengths"])):
            name = task
            if i == 0 and ref:
                name += (f" (in-window {100 * ref['accuracy']:.0f}% by {ref['method']})" if ref["within_reach"]
                         else f" (beyond the model: {100 * ref['accuracy']:.0f}% in its window)")
            cells = []
            for m in methods:
                c = by_key.get((task, m, length))
                if c is None:
                    cells.append("not run")
                elif c["skipped"]:
                    cells.append("skipped")
                else:
                    cells.append(f"{100 * c['accuracy']:.0f}% · {c['seconds_per_question']:g} s")
            lines.append(f"| {name} | {length} | " + " | ".join(cells) + " |")
    skipped = [c for c in result["cells"] if c["skipped"]]
    if skipped:
        lines.append("")
        lines += [f"- skipped {c['method']} {c['task']} {c['length']}: {c['skipped']}" for c in skipped]
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    """Accuracy against length, one panel per task, one line per method; the in-window reference dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks, methods = result["grid"]["tasks"], result["grid"]["methods"]
    cols = min(4, len(tasks))
    rows = -(-len(tasks) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False, sharey=True)
    lengths = sorted(result["grid"]["lengths"])
    styles = ["o-", "s--", "^-.", "v:", "D-", "P--", "X-."]
    for ax, task in zip(axes.flat, tasks):
        for i, m in enumerate(methods):
            points = sorted((c["length"], 100 * c["accuracy"]) for c in result["cells"]
                            if c["task"] == task and c["method"] == m and c["accuracy"] is not None
                            and c["length"] in lengths)
            if points:
                # a small sideways shift per method, so that equal scores stay visible
                xs = [n * (1 + 0.04 * (i - (len(methods) - 1) / 2)) for n, _ in points]
                ax.plot(xs, [a for _, a in points], styles[i % len(styles)], label=m, alpha=0.85)
        ref = result["reference"].get(task)
        title = task
        if ref:
            ax.axhline(100 * ref["accuracy"], color="grey", linestyle="--", linewidth=1)
            title += "" if ref["within_reach"] else " (beyond the model)"
        ax.set_title(title)
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [f"{n / 1000:g}K" for n in lengths])
        ax.minorticks_off()
        ax.set_ylim(-5, 105)
        ax.set_xlabel("document tokens")
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    axes[0][0].set_ylabel("accuracy (%)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(methods))
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_json(result: dict, path: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, path)
