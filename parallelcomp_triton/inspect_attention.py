"""Attention pictures: where the question looks in each chunk, per band of layers.

    python -m parallelcomp_triton.inspect_attention --input doc.txt --question "What is the pass key?" --out attn.png \\
        [--model DIR] [--chunk-tokens N] [--kv-budget B] [--keep-chunks K] [--calibrate REGION:I-J:TAU] \\
        [--bands 0-7,8-15,16-23,24-29]

Runs the pipeline with an observer that records the kernels' window scores: for every chunk and layer, the
attention the last w question rows give each context token (summed over the rows by the kernel; divided by
w here, so a value is the share of one row's attention; max over each GQA group, the pipeline's default
reduction). For each band of layers the figure has two panels:

- left, along the document: the score of every token averaged over the band's layers and KV heads, one
  curve per chunk (chunks evicted by the question NLL in grey), log scale; ticks along the bottom mark the
  tokens KV eviction keeps in the band's first layer (any KV head), red triangles along the top the tokens
  calibration masks in the band's calibrated layers (with --calibrate);
- right, inside a chunk: the same scores binned over the relative position in the chunk and divided by
  the chunk's mean (1 = uniform), one thin line per chunk and their mean in black, with the shape the mean
  takes: U-shape (both ends above the middle), mountain (the middle above both ends), uniform (no bin
  beyond 2x of another), or sink/recency when one end alone stands out.

matplotlib (Agg, no display) is imported only when drawing: pip install 'parallelcomp-triton[plot]'.
`python -m parallelcomp_triton.inspect` is an alias.
"""
from __future__ import annotations

import dataclasses
import os
import re
import struct
import sys
from dataclasses import dataclass, field

import numpy as np

from .cli import Parser, add_model_options, add_settings_options, check_writable, cli_main, config_from_args, \
    read_document
from .errors import ParallelCompError

PROFILE_BINS = 20
SHAPE_RATIO = 1.5  # an end "stands out" when its bins average 1.5x the middle's
UNIFORM_SPREAD = 2.0  # max bin / min bin below this: uniform
FORMATS = (".png", ".pdf", ".svg")


class AttentionRecorder:
    """Pipeline observer keeping what the pictures need, on the CPU in numpy:
    mass[(layer, chunk)]  float32 [context_len]   window scores averaged over KV heads
    kept[(layer, chunk)]  int32 [H_kv, n]         kept chunk-local positions (KV eviction on)
    calibration_masks[layer] bool [S + m, H]      merged-cache tokens masked per query head
    calibration_scores[layer] float32 [S + m, H]  the attention that decided it"""

    def __init__(self):
        self.mass: dict[tuple[int, int], np.ndarray] = {}
        self.kept: dict[tuple[int, int], np.ndarray] = {}
        self.calibration_masks: dict[int, np.ndarray] = {}
        self.calibration_scores: dict[int, np.ndarray] = {}

    def chunk_scores(self, layer, chunk, scores, kept):
        self.mass[(layer, chunk)] = scores.float().mean(dim=1).cpu().numpy()
        if kept is not None:
            self.kept[(layer, chunk)] = kept.cpu().numpy().astype(np.int32)

    def calibration(self, layer, scores, mask):
        self.calibration_scores[layer] = scores.float().cpu().numpy()
        self.calibration_masks[layer] = mask.cpu().numpy().astype(bool)


@dataclass
class AttentionPicture:
    path: str
    width_px: int
    height_px: int
    bands: list[dict]  # per band: layers, shape, head/middle/tail ratios, kept and calibration counts
    result: object = field(repr=False, default=None)  # the pipeline's GenerationResult


# --------------------------------------------------------------------------------------------------
# Bands, profiles and shapes
# --------------------------------------------------------------------------------------------------


def default_bands(num_layers: int, count: int = 4) -> list[tuple[int, int]]:
    """`count` bands of ceil(num_layers / count) layers, the last one shorter (30 -> 0-7 ... 24-29)."""
    size = -(-num_layers // count)
    return [(a, min(a + size, num_layers) - 1) for a in range(0, num_layers, size)]


def parse_bands(spec: str) -> list[tuple[int, int]]:
    """'0-7,8-15,20' -> [(0, 7), (8, 15), (20, 20)]."""
    bands = []
    for part in (spec or "").split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+))?\s*", part)
        if not m:
            raise ParallelCompError(f"--bands {spec!r}: expected comma-separated layer ranges like 0-7,8-15")
        a, b = int(m.group(1)), int(m.group(2) if m.group(2) is not None else m.group(1))
        if b < a:
            raise ParallelCompError(f"--bands {spec!r}: range {a}-{b} runs backwards")
        bands.append((a, b))
    return bands


def check_bands(bands, num_layers: int) -> None:
    if not bands:
        raise ParallelCompError("--bands: no layer range given")
    for a, b in bands:
        if b >= num_layers:
            raise ParallelCompError(f"--bands {a}-{b}: the model has {num_layers} layers (0-{num_layers - 1})")


def chunk_profile(mass: np.ndarray, bins: int = PROFILE_BINS) -> np.ndarray:
    """Mean score per relative-position bin, divided by the chunk's mean (1 everywhere = uniform)."""
    n = len(mass)
    edges = np.linspace(0, n, min(bins, n) + 1).round().astype(int)
    sums = np.add.reduceat(mass.astype(np.float64), edges[:-1])
    prof = sums / np.diff(edges)
    if len(prof) < bins:  # chunks shorter than `bins` tokens: stretch onto the common grid
        prof = prof[np.minimum((np.arange(bins) * len(prof)) // bins, len(prof) - 1)]
    mean = prof.mean()
    return prof / mean if mean > 0 else np.ones(bins)


def classify_shape(profile: np.ndarray) -> dict:
    """Name the shape of a relative-position profile: first and last 10% against the middle 50%."""
    bins = len(profile)
    edge = max(1, bins // 10)
    head, tail = float(profile[:edge].mean()), float(profile[-edge:].mean())
    middle = float(profile[bins // 4: bins - bins // 4].mean())
    spread = float(profile.max() / max(profile.min(), 1e-12))
    if spread < UNIFORM_SPREAD:
        shape = "uniform"
    elif min(head, tail) > SHAPE_RATIO * middle:
        shape = "U-shape"
    elif middle > SHAPE_RATIO * max(head, tail):
        shape = "mountain"
    elif head > SHAPE_RATIO * middle:
        shape = "sink (start-heavy)"
    elif tail > SHAPE_RATIO * middle:
        shape = "recency (end-heavy)"
    else:
        shape = "mixed"
    return {"shape": shape, "head": round(head, 3), "middle": round(middle, 3), "tail": round(tail, 3),
            "spread": round(spread, 2)}


def _smooth(values: np.ndarray, width: int) -> np.ndarray:
    """Moving average over `width` tokens; near the chunk's ends it averages only the tokens that exist
    (padding by repeating the edge would smear a first-token sink over `width` / 2 tokens)."""
    if width <= 1 or len(values) <= width:
        return values
    kernel = np.ones(width)
    return np.convolve(values, kernel, mode="same") / np.convolve(np.ones(len(values)), kernel, mode="same")


def calibration_drops(rec: AttentionRecorder, layer: int, spans, kept_chunks, prefix_len: int, num_heads: int,
                       budget) -> tuple[np.ndarray, int]:
    """Document positions calibration masked in `layer` (any query head) and the number of masked prefix
    tokens. The merged cache holds the prefix, then each kept chunk's kept tokens (per KV head) in order."""
    mask = rec.calibration_masks[layer]
    doc_positions, prefix_hits = [], 0
    rows, heads = np.nonzero(mask)
    for j, hq in zip(rows.tolist(), heads.tolist()):
        if j < prefix_len:
            prefix_hits += 1
            continue
        offset = prefix_len
        for c in kept_chunks:
            start, end = spans[c]
            n = end - start if budget is None else min(budget, end - start)
            if j < offset + n:
                local = j - offset
                if (layer, c) in rec.kept:
                    kept = rec.kept[(layer, c)]
                    group = num_heads // kept.shape[0]
                    local = int(kept[hq // group, local])
                doc_positions.append(start + local)
                break
            offset += n
    return np.unique(np.array(doc_positions, dtype=np.int64)), prefix_hits


# --------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------


def _import_matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ParallelCompError("matplotlib is not installed (pip install 'parallelcomp-triton[plot]')") from None
    return Figure, FigureCanvasAgg


def check_output_path(path: str) -> None:
    ext = os.path.splitext(path)[1].lower()
    if ext not in FORMATS:
        raise ParallelCompError(f"--out {path}: expected a {', '.join(FORMATS)} file name")
    check_writable(path, f"--out {path}")


def render_attention(pc, context: str, question: str, out_path: str, config=None, bands=None, dpi: int = 100,
                     figsize: tuple[float, float] | None = None, progress: bool = False) -> AttentionPicture:
    """Run `pc.generate` with an AttentionRecorder and draw the picture described in the module docstring
    into `out_path`. bands: [(first, last), ...] layer ranges (default: the layers in 4 bands). figsize in
    inches (default: 14 wide, 2.6 per band + 0.9 high); the file is figsize * dpi pixels."""
    from .config import ParallelCompConfig

    figure_cls, canvas_cls = _import_matplotlib()
    check_output_path(out_path)
    num_layers = pc.args.num_layers
    bands = list(bands) if bands else default_bands(num_layers)
    check_bands(bands, num_layers)
    cfg = dataclasses.replace(config) if config is not None else ParallelCompConfig(max_new_tokens=8)
    if cfg.mode != "parallelcomp":
        raise ParallelCompError(f"mode {cfg.mode!r}: the pictures show parallelcomp chunks only")
    rec = AttentionRecorder()
    result = pc.generate(context, question, config=cfg, progress=progress, observer=rec)
    stats = result.stats
    spans = [tuple(s) for s in stats.chunk_spans]
    kept_chunks = stats.kept_chunks
    rows = max(1, stats.score_rows)
    num_heads = pc.args.num_heads

    figsize = figsize or (14.0, 2.6 * len(bands) + 0.9)
    fig = figure_cls(figsize=figsize, dpi=dpi, layout="constrained")
    canvas_cls(fig)
    grid = fig.add_gridspec(len(bands), 2, width_ratios=(3.2, 1.0))
    colors = _chunk_colors(len(spans))
    summaries = []
    for bi, (first, last) in enumerate(bands):
        layers = range(first, last + 1)
        ax_doc, ax_rel = fig.add_subplot(grid[bi, 0]), fig.add_subplot(grid[bi, 1])
        profiles, band_min = [], np.inf
        for c, (start, end) in enumerate(spans):
            mass = np.mean([rec.mass[(layer, c)] for layer in layers], axis=0) / rows
            x = np.arange(start, end)
            alive = c in kept_chunks
            color = colors[c] if alive else "0.6"
            ax_doc.plot(x, np.maximum(mass, 1e-9), color=color, lw=0.4, alpha=0.45 if alive else 0.25)
            ax_doc.plot(x, np.maximum(_smooth(mass, max(1, (end - start) // 64)), 1e-9), color=color,
                        lw=1.6 if alive else 1.0, ls="-" if alive else "--")
            positive = mass[mass > 0]
            if len(positive):
                band_min = min(band_min, float(positive.min()))
            prof = chunk_profile(mass)
            profiles.append(prof)
            centers = (np.arange(PROFILE_BINS) + 0.5) / PROFILE_BINS
            ax_rel.plot(centers, prof, color=color, lw=0.8, alpha=0.6 if alive else 0.35)
        mean_profile = np.mean(profiles, axis=0)
        shape = classify_shape(mean_profile)
        centers = (np.arange(PROFILE_BINS) + 0.5) / PROFILE_BINS
        ax_rel.plot(centers, mean_profile, color="black", lw=2.2)
        ax_rel.axhline(1.0, color="0.5", lw=0.8, ls=":")
        ax_rel.set_yscale("log")
        ax_rel.set_xlim(0, 1)
        ax_rel.set_title(f"{_band_name(first, last)}: {shape['shape']}", fontsize=10, fontweight="bold")
        ax_rel.set_ylabel("score / chunk mean", fontsize=8)
        ax_rel.tick_params(labelsize=7)

        # Tokens KV eviction keeps in the band's first layer (union over KV heads), as ticks along the bottom.
        kept_total = 0
        for c in kept_chunks if cfg.kv_budget is not None else ():
            if (first, c) in rec.kept:
                pos = np.unique(rec.kept[(first, c)].ravel())
                pos = pos[pos >= 0] + spans[c][0]
                kept_total += len(pos)
                ax_doc.vlines(pos, 0.0, 0.05, transform=ax_doc.get_xaxis_transform(), color=colors[c], lw=0.4)
        # Tokens calibration masks in the band's calibrated layers (any query head), as triangles on top.
        cal_layers = [layer for layer in layers if layer in rec.calibration_masks]
        dropped, prefix_dropped = np.array([], dtype=np.int64), 0
        for layer in cal_layers:
            pos, hits = calibration_drops(rec, layer, spans, kept_chunks, stats.prefix_tokens, num_heads,
                                          cfg.kv_budget)
            dropped, prefix_dropped = np.union1d(dropped, pos), prefix_dropped + hits
        if len(dropped):
            ax_doc.plot(dropped, np.full(len(dropped), 0.97), "v", color="red", ms=4,
                        transform=ax_doc.get_xaxis_transform(), clip_on=False)
        for start, _ in spans[1:]:
            ax_doc.axvline(start, color="0.8", lw=0.6)
        ax_doc.set_yscale("log")
        if np.isfinite(band_min):
            ax_doc.set_ylim(bottom=max(band_min, 1e-7) / 2)
        margin = 0.004 * spans[-1][1]  # so a chunk's first-token spike at x = 0 is not hidden by the spine
        ax_doc.set_xlim(-margin, spans[-1][1] + margin)
        ax_doc.set_ylabel(f"{_band_name(first, last)}\nattention per row", fontsize=8)
        ax_doc.tick_params(labelsize=7)
        notes = [f"KV kept (layer {first}): {kept_total} tokens"] if cfg.kv_budget is not None else []
        if cal_layers:
            notes.append(f"calibration ({_band_name(cal_layers[0], cal_layers[-1])}) masks {len(dropped)} tokens"
                         + (f" + {prefix_dropped} prefix entries" if prefix_dropped else ""))
        if notes:
            ax_doc.set_title("; ".join(notes), loc="left", fontsize=8)
        summaries.append({"layers": [first, last], **shape, "kept_tokens_first_layer": kept_total,
                          "calibrated_layers": cal_layers, "calibration_masked_document_tokens": int(len(dropped)),
                          "calibration_masked_prefix_entries": prefix_dropped})
    _legend(fig.axes[0], cfg)
    ax_doc.set_xlabel("document token (chunk boundaries in grey)", fontsize=8)
    ax_rel.set_xlabel("relative position in chunk", fontsize=8)
    _header(fig, pc, question, result.text, stats, cfg, rows, len(spans))
    fig.savefig(out_path, dpi=dpi)
    width, height = (int(round(v * dpi)) for v in figsize)
    return AttentionPicture(out_path, width, height, summaries, result)


def _legend(ax, cfg) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color="#1f77b4", lw=1.6, label="kept chunk (smoothed; raw faint)"),
               Line2D([], [], color="0.6", lw=1.0, ls="--", label="chunk evicted by question NLL")]
    if cfg.kv_budget is not None:
        handles.append(Line2D([], [], color="#1f77b4", marker="|", ls="", ms=8, label="KV kept by eviction"))
    if cfg.calibration is not None:
        handles.append(Line2D([], [], color="red", marker="v", ls="", ms=5, label="masked by calibration"))
    wide = ax.figure.get_figwidth() >= 11
    legend = ax.legend(handles=handles, loc="upper right", fontsize=7, ncol=len(handles) if wide else 2,
                       framealpha=0.9)
    legend.set_in_layout(False)  # a legend wider than a narrow figure's panel must not squeeze the panels


def _band_name(first: int, last: int) -> str:
    return f"layer {first}" if first == last else f"layers {first}-{last}"


def _chunk_colors(count: int) -> list:
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf",
               "#bcbd22", "#7f7f7f"]
    return [palette[i % len(palette)] for i in range(count)]


def _header(fig, pc, question, answer, stats, cfg, rows, num_chunks) -> None:
    import textwrap

    budget = "all" if cfg.kv_budget is None else cfg.kv_budget
    model = os.path.basename(str(pc.source).rstrip("/")) or "model"
    text = (f"Where the question looks: {stats.document_tokens} tokens in {num_chunks} chunks, kept chunks "
            f"{stats.kept_chunks}, KV budget {budget}/chunk, window w={rows} ({model}). "
            f"Q: {_clip(question, 70)!r}  A: {_clip(answer, 40)!r}")
    width = max(40, int(fig.get_figwidth() * 13))  # characters per line at font size 10
    fig.suptitle("\n".join(textwrap.wrap(text, width)[:3]), fontsize=10)


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 3] + "..."


def png_size(path: str) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk; ParallelCompError if the file is not a PNG."""
    with open(path, "rb") as f:
        head = f.read(24)
    if len(head) < 24 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        raise ParallelCompError(f"{path}: not a PNG file")
    return struct.unpack(">II", head[16:24])


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def build_parser() -> Parser:
    p = Parser(prog="python -m parallelcomp_triton.inspect_attention", description=__doc__.split("\n")[0])
    p.add_argument("--input", required=True, help="document file (UTF-8), or - for stdin")
    p.add_argument("--question", required=True)
    p.add_argument("--out", required=True, help="picture file (.png, .pdf or .svg)")
    p.add_argument("--bands", default=None, help="layer bands, e.g. 0-7,8-15,16-23,24-29 (default: 4 bands)")
    p.add_argument("--dpi", type=int, default=100)
    add_model_options(p)
    add_settings_options(p, omit=("mode",), max_new_tokens=8)  # the pictures show parallelcomp chunks only
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv=None) -> int:
    return cli_main(argv, build_parser, _main)


def _main(args) -> int:
    _import_matplotlib()  # before minutes of work, not after
    check_output_path(args.out)
    bands = parse_bands(args.bands) if args.bands is not None else None
    if not 10 <= args.dpi <= 600:
        raise ParallelCompError(f"--dpi {args.dpi}: must be in 10..600")
    cfg = config_from_args(args)
    context = read_document(args.input)
    if bands is not None:
        check_bands(bands, 1 << 30)
    from .pipeline import ParallelComp

    pc = ParallelComp.from_pretrained(args.model, dtype=args.dtype, backend=args.backend)
    pic = render_attention(pc, context, args.question, args.out, config=cfg, bands=bands, dpi=args.dpi,
                           progress=not args.no_progress)
    print(f"wrote {pic.path} ({pic.width_px}x{pic.height_px} px); answer: {pic.result.text.strip()!r}")
    for band in pic.bands:
        cal = (f"; calibration masks {band['calibration_masked_document_tokens']} document tokens"
               if band["calibrated_layers"] else "")
        print(f"{_band_name(*band['layers']) + ':':<13} {band['shape']:<19} start {band['head']:.2f}x, middle "
              f"{band['middle']:.2f}x, end {band['tail']:.2f}x of the chunk mean{cal}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
