"""What the command-line front ends (run, evaluate, longbench, inspect_attention) share: the options that set
a `ParallelCompConfig`, declared once here, the config built from them, the model options, one-line errors
with exit code 2, and reading input files."""
from __future__ import annotations

import argparse
import os
import sys

from .config import DTYPE_CHOICES, KV_STORES, MODES, SCORE_TOKENS, TEMPLATES, Calibration, ParallelCompConfig
from .errors import ParallelCompError

BACKENDS = ("auto", "torch", "triton")


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line on stderr and exit code 2."""

    def error(self, message):  # argparse would print the whole usage first
        print(f"error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def int_or_none(word: str):
    """An argparse type: an integer, or `word` (any case) meaning None."""
    def parse(value: str):
        if value.lower() == word:
            return None
        try:
            return int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer or {word!r}, got {value!r}") from None

    return parse


parse_chunk_tokens = int_or_none("max")  # 'max': chunks as large as the trained window allows
parse_kv_budget = int_or_none("none")  # 'none': keep every KV token


def settings_options() -> dict[str, dict]:
    """argparse keyword arguments of every option that sets a ParallelCompConfig field, by dest: the field's
    name, except `calibrate`, whose REGION:I-J:TAU text becomes the `calibration` field."""
    d = ParallelCompConfig()
    return {
        "mode": dict(choices=MODES, default=d.mode,
                     help="parallelcomp (default); full or truncate; or an alternative to compare with: yarn, "
                          "dynamic-ntk, self-extend, streaming"),
        "template": dict(choices=TEMPLATES, default=d.template),
        "instruction": dict(default=d.instruction, help="task text placed before the document (shared prefix)"),
        "chunk_tokens": dict(type=parse_chunk_tokens, default=d.chunk_tokens,
                             help=f"document tokens per chunk (default {d.chunk_tokens}), or 'max': as many as "
                                  "the window allows"),
        "window": dict(type=int, default=d.window, help="trained window (default: the model's)"),
        "batch_chunks": dict(type=int, default=d.batch_chunks, help="chunks prefilled together (at least)"),
        "batch_tokens": dict(type=int, default=d.batch_tokens,
                             help="tokens per prefill forward, batches grow to fit (default: 16384 on CUDA, "
                                  "0 on a CPU)"),
        "kv_store": dict(choices=KV_STORES, default=d.kv_store,
                         help="how encodings keep their chunks' K/V: exact (the model's dtype, default) or int8 "
                              "(one byte per value, about half the size)"),
        "keep_chunks": dict(type=int, default=d.keep_chunks, help="K: chunks kept after eviction"),
        "score_tokens": dict(choices=SCORE_TOKENS, default=d.score_tokens,
                             help="chunk NLL over the whole question suffix or the question's own tokens"),
        "kv_budget": dict(type=parse_kv_budget, default=d.kv_budget,
                          help="B: KV tokens kept per chunk, layer and KV head, or 'none'"),
        "score_window": dict(type=int, default=d.score_window, help="w: question rows that score keys"),
        "pool_kernel": dict(type=int, default=d.pool_kernel,
                            help="KV eviction: keys within pool_kernel // 2 of a high-scoring key are kept with "
                                 "it (odd)"),
        "calibrate": dict(default=None, metavar="REGION:I-J:TAU", help="e.g. sink:3-6:0.1"),
        "self_extend_window": dict(type=int, default=d.self_extend_window,
                                   help="mode self-extend: the neighbour window (keys nearer keep their positions)"),
        "self_extend_group": dict(type=int_or_none("auto"), default=d.self_extend_group,
                                  help="mode self-extend: the group size, or 'auto': the smallest that fits the "
                                       "window (default)"),
        "sink_tokens": dict(type=int, default=d.sink_tokens, help="mode streaming: attention sinks kept"),
        "stream_step": dict(type=int, default=d.stream_step, help="mode streaming: prompt tokens per forward"),
        "max_new_tokens": dict(type=int, default=d.max_new_tokens),
        "temperature": dict(type=float, default=d.temperature),
        "top_p": dict(type=float, default=d.top_p),
        "seed": dict(type=int, default=d.seed),
        "ignore_eos": dict(action="store_true", help="decode exactly --max-new-tokens tokens"),
    }


def add_settings_options(parser: argparse.ArgumentParser, omit=(), helps: dict | None = None, **defaults) -> None:
    """Declare the settings options on `parser` (in a group of their own). `omit`: dests a front end does
    not take, or declares itself under another dest; `defaults` and `helps`: per dest, where a front end's
    default or meaning differs."""
    options = settings_options()
    unknown = (set(omit) | set(defaults) | set(helps or {})) - set(options)
    if unknown:
        raise ValueError(f"not settings options: {', '.join(sorted(unknown))}")
    group = parser.add_argument_group("settings")
    for dest, kwargs in options.items():
        if dest in omit:
            continue
        if dest in defaults:
            kwargs["default"] = defaults[dest]
        if helps and dest in helps:
            kwargs["help"] = helps[dest]
        group.add_argument("--" + dest.replace("_", "-"), dest=dest, **kwargs)


def config_from_args(args: argparse.Namespace, **overrides) -> ParallelCompConfig:
    """A checked ParallelCompConfig from the settings options in `args` (fields whose option the front end
    omitted keep their defaults), then `overrides` (field=value); a bad setting raises ParallelCompError."""
    values = {dest: getattr(args, dest) for dest in settings_options() if hasattr(args, dest)}
    calibrate = values.pop("calibrate", None)
    if calibrate:
        values["calibration"] = Calibration.parse(calibrate)
    values.update(overrides)
    cfg = ParallelCompConfig(**values)
    cfg.check()
    return cfg


def add_model_options(parser: argparse.ArgumentParser, device: bool = False) -> None:
    """--model, --backend, --dtype and, with `device`, --device (without it the model loads on the CPU)."""
    parser.add_argument("--model", default=None,
                        help="model directory or Hub id ORG/NAME[@REV] (default: bundled SmolLM2-135M)")
    parser.add_argument("--backend", choices=BACKENDS, default="auto")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                        help="auto: bfloat16 where the CPU/GPU computes it natively, else float32")
    if device:
        parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")


def cli_main(argv, build_parser, body, quiet=lambda args: False) -> int:
    """Parse `argv`, run `body(args)`; bad input becomes one line on stderr and exit code 2. `quiet(args)`:
    say nothing about it (the exit code still tells)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2, already printed in one line)
        return int(e.code or 0)
    try:
        return body(args)
    except ParallelCompError as e:
        if not quiet(args):
            print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def read_input_bytes(path: str, kind: str = "a text file") -> bytes:
    """The bytes of `path` (stdin for "-"), or a one-line ParallelCompError."""
    try:
        if path == "-":
            return sys.stdin.buffer.read()
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise ParallelCompError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ParallelCompError(f"{path}: is a directory, expected {kind}") from None
    except OSError as e:
        raise ParallelCompError(f"{path}: cannot read ({e.strerror or e})") from None


def read_document(path: str) -> str:
    """A UTF-8 document that is not blank, or a one-line ParallelCompError."""
    data = read_input_bytes(path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ParallelCompError(f"{path}: not UTF-8 text (bad byte at offset {e.start})") from None
    if not text.strip():
        raise ParallelCompError(f"{path}: the document is empty")
    return text


def check_writable(path: str, name: str | None = None) -> None:
    """That an output file can be written where `path` says, before the work that fills it; errors name the
    file as `name` (default: the path)."""
    name = name or path
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ParallelCompError(f"{name}: folder {folder} does not exist")
    if os.path.isdir(path):
        raise ParallelCompError(f"{name}: is a directory")


def empty_answer_warning(stats, where: str = "") -> str:
    """The one stderr line for an answer that came out empty, with the likely fix for the template used."""
    if stats.template == "plain":
        fix = "try --template chat, or end the question with the start of its answer (e.g. '... The pass key is')"
    else:
        fix = ("end the question with the start of its answer (e.g. '... The pass key is'), or keep more of the "
               "document (--keep-chunks, --kv-budget)")
    return f"warning: {where}empty answer (the model ended its turn at once); {fix}"
