"""The Llama-family decoder in plain PyTorch modules (gpt-fast style): Llama, Mistral, Qwen2 and Qwen3.

The families differ only in a few ``ModelArgs`` fields, not in separate model classes: biases on the
q/k/v (Qwen2) or all attention projections (``attention_bias``), a per-head RMSNorm on q and k before
rotary (Qwen3) and the checkpoint's ``head_dim``. ``ModelArgs.from_hf_config`` maps a ``config.json`` to
them and refuses what the model cannot run (other architectures, MLP biases, sliding-window attention
that would mask anything, unknown rope scaling).

The model works on *packed* token streams: `input_ids` [N] and `position_ids` [N], with the
sequence boundaries and the attention itself supplied by the caller through an `attend` callback,
``attend(layer_idx, q [N, H, d], k [N, H_kv, d], v [N, H_kv, d]) -> out [N, H, d]``.
That one seam lets the same layers serve a plain causal pass, the parallel chunk prefill (which
also collects window scores and compresses the cache), the question pass over a merged cache and
single-token decoding, without any cache object living inside the model.

Parameter names equal the Hugging Face checkpoint keys without their leading "model.".
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ParallelCompError

AttendFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "dynamic")

# model_type -> the one architecture of that family this model implements.
FAMILIES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
# What transformers' config classes assume when config.json leaves a field out.
_DEFAULT_MAX_POSITIONS = {"llama": 2048, "mistral": 4096 * 32, "qwen2": 32768, "qwen3": 32768}
_DEFAULT_HEAD_DIM = {"qwen3": 128}  # the others: hidden_size // num_attention_heads


@dataclass
class ModelArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    model_type: str = "llama"
    qkv_bias: bool = False  # biases on q_proj, k_proj, v_proj (Qwen2; attention_bias in Llama and Qwen3)
    o_bias: bool = False  # a bias on o_proj (attention_bias in Llama and Qwen3)
    qk_norm: bool = False  # per-head RMSNorm over head_dim on q and k before rotary (Qwen3)

    @classmethod
    def from_hf_config(cls, cfg: dict, source: str = "config.json") -> "ModelArgs":
        """Read a Hugging Face Llama / Mistral / Qwen2 / Qwen3 `config.json` dict; refuse what this model
        cannot run."""
        model_type = cfg.get("model_type")
        if model_type not in FAMILIES:
            raise ParallelCompError(f"{source}: unsupported model_type {model_type!r} "
                                    f"(supported: {', '.join(FAMILIES)})")
        arch = FAMILIES[model_type]
        archs = cfg.get("architectures") or [arch]
        if arch not in archs:
            raise ParallelCompError(f"{source}: unsupported architectures {archs} "
                                    f"(expected {arch} for model_type {model_type!r})")
        if model_type == "llama" and cfg.get("mlp_bias"):
            raise ParallelCompError(f"{source}: mlp_bias=true is not supported")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ParallelCompError(f"{source}: unsupported hidden_act {cfg.get('hidden_act')!r} (expected 'silu')")
        # transformers' attention layers: Qwen2 always has q/k/v biases and none on o_proj, Mistral none;
        # Llama and Qwen3 put attention_bias on all four projections.
        attention_bias = bool(cfg.get("attention_bias", False)) and model_type in ("llama", "qwen3")
        try:
            hidden = int(cfg["hidden_size"])
            heads = int(cfg["num_attention_heads"])
            kv_heads = int(cfg.get("num_key_value_heads") or heads)
            head_dim = int(cfg.get("head_dim") or _DEFAULT_HEAD_DIM.get(model_type) or hidden // heads)
            args = dict(
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=kv_heads,
                head_dim=head_dim,
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                max_position_embeddings=int(cfg.get("max_position_embeddings", _DEFAULT_MAX_POSITIONS[model_type])),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            )
            window = _sliding_window(cfg, model_type, args["num_layers"])
        except KeyError as e:
            raise ParallelCompError(f"{source}: missing field {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise ParallelCompError(f"{source}: bad field value ({e})") from None
        # Sliding-window attention: refused when it could mask anything, otherwise a no-op. Every attention
        # ParallelComp runs spans less than the window: a chunk with its prompt, question and answer fits
        # max_position_embeddings tokens, and the question pass and decoding over the merged cache use
        # positions below it too, so no query is max_position_embeddings or more positions past a key.
        # A window at least that large therefore never masks a key. A smaller one (Mistral 7B v0.1: 4096
        # of 32768) would mask keys in every long chunk. Clamping the window to it instead would be exact
        # only until someone raises ParallelCompConfig.window / --window again (nothing here can see that),
        # so such a checkpoint is refused. Mistral v0.2+ and Nemo have sliding_window null; Qwen2/Qwen3
        # apply theirs only with use_sliding_window, and then only to layers >= max_window_layers.
        if window is not None and window < args["max_position_embeddings"]:
            raise ParallelCompError(f"{source}: sliding_window={window} is smaller than max_position_embeddings="
                                    f"{args['max_position_embeddings']}; sliding-window attention is not supported")
        # transformers >= 5 folds rope_theta and rope_scaling into rope_parameters.
        rope_params = cfg.get("rope_parameters") or {}
        theta = cfg.get("rope_theta", rope_params.get("rope_theta", 10000.0))
        scaling = cfg.get("rope_scaling") or (rope_params if rope_params else None)
        if scaling is not None:
            scaling = {k: v for k, v in dict(scaling).items() if k != "rope_theta"}
            rope_type = scaling.get("rope_type", scaling.get("type", "default"))
            if rope_type not in _ROPE_TYPES:
                raise ParallelCompError(f"{source}: unsupported rope scaling type {rope_type!r} "
                                        f"(supported: {', '.join(_ROPE_TYPES)})")
            scaling["rope_type"] = rope_type
            if rope_type == "default":
                scaling = None
        if heads % kv_heads != 0:
            raise ParallelCompError(f"{source}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
        return cls(**args, rope_theta=float(theta), rope_scaling=scaling,
                   bos_token_id=cfg.get("bos_token_id"), eos_token_ids=eos_ids(cfg.get("eos_token_id"), source),
                   model_type=model_type, qkv_bias=attention_bias or model_type == "qwen2", o_bias=attention_bias,
                   qk_norm=model_type == "qwen3")


def eos_ids(value, source: str = "config.json") -> tuple[int, ...]:
    """An `eos_token_id` field (an id, a list of ids or null) as a tuple of ids."""
    ids = value if isinstance(value, (list, tuple)) else ([] if value is None else [value])
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ParallelCompError(f"{source}: eos_token_id {value!r} is not a token id or a list of them")
    return tuple(ids)


def _sliding_window(cfg: dict, model_type: str, num_layers: int) -> int | None:
    """The sliding window some layer applies, as transformers reads the config, or None when none does."""
    if model_type == "llama":
        return None
    window = cfg.get("sliding_window", 4096)  # MistralConfig's and the Qwen configs' default when absent
    if window is None:
        return None
    if model_type in ("qwen2", "qwen3"):
        # Qwen configs keep a sliding_window value even when use_sliding_window is false: then it is unused.
        if not cfg.get("use_sliding_window", False):
            return None
        first = int(cfg.get("max_window_layers", 28))
        layer_types = cfg.get("layer_types") or ["sliding_attention" if i >= first else "full_attention"
                                                 for i in range(num_layers)]
        if "sliding_attention" not in layer_types:
            return None
    return int(window)  # Mistral: every layer


def rope_inv_freq(args: ModelArgs, seq_len: int | None = None) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2], fp32, with the checkpoint's rope scaling applied (transformers'
    formulas). seq_len: the length a forward covers (max position + 1), which only "dynamic" reads."""
    dim = args.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    inv_freq = 1.0 / (args.rope_theta ** exponents)
    scaling = args.rope_scaling
    if scaling is None:
        return inv_freq
    rope_type = scaling["rope_type"]
    if rope_type == "linear":
        return inv_freq / float(scaling["factor"])
    if rope_type == "dynamic":
        trained = args.max_position_embeddings
        base = dynamic_ntk_base(args.rope_theta, dim, float(scaling["factor"]), seq_len or trained, trained)
        return 1.0 / (base ** exponents)
    if rope_type == "yarn":
        return _yarn_inv_freq(args, inv_freq)
    # llama3 (Llama 3.1): long wavelengths are divided by `factor`, short ones kept, the band between blended.
    factor = float(scaling["factor"])
    low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
    old_len = float(scaling.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def dynamic_ntk_base(theta: float, dim: int, factor: float, length: int, trained: int) -> float:
    """Dynamic NTK's rope base for a forward covering `length` positions: past the trained window the base
    grows with the length (transformers' formula); within it, `theta` unchanged."""
    length = max(length, trained)
    return theta * ((factor * length / trained) - (factor - 1)) ** (dim / (dim - 2))


def _yarn_factor(args: ModelArgs) -> float:
    scaling = args.rope_scaling
    if scaling.get("factor") is not None:
        return float(scaling["factor"])
    return args.max_position_embeddings / _yarn_original(args)


def _yarn_original(args: ModelArgs) -> int:
    return int(args.rope_scaling.get("original_max_position_embeddings") or args.max_position_embeddings)


def _yarn_inv_freq(args: ModelArgs, inv_freq: torch.Tensor) -> torch.Tensor:
    """YaRN: frequencies that turn more than beta_fast times over the trained window are kept, fewer than
    beta_slow times divided by the factor, a linear ramp between."""
    scaling, dim, base = args.rope_scaling, args.head_dim, args.rope_theta
    factor, trained = _yarn_factor(args), _yarn_original(args)
    beta_fast, beta_slow = float(scaling.get("beta_fast") or 32), float(scaling.get("beta_slow") or 1)

    def dim_of(rotations: float) -> float:  # the dimension that turns `rotations` times over the window
        return dim * math.log(trained / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_of(beta_fast), dim_of(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (keep the frequency), 0: interpolate (divide it by the factor)
    return (inv_freq / factor) * (1 - keep) + inv_freq * keep


def rope_attention_factor(args: ModelArgs) -> float:
    """What cos and sin are multiplied by (YaRN's attention temperature; 1 for every other type)."""
    scaling = args.rope_scaling
    if scaling is None or scaling["rope_type"] != "yarn":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])

    def mscale(factor: float, m: float = 1.0) -> float:
        return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

    factor = _yarn_factor(args)
    if scaling.get("mscale") and scaling.get("mscale_all_dim"):
        return mscale(factor, float(scaling["mscale"])) / mscale(factor, float(scaling["mscale_all_dim"]))
    return mscale(factor)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, heads, d]; cos/sin [N, d] (halves duplicated, Hugging Face's rotate-half layout)."""
    # Same products and sums as x * cos + rotate_half(x) * sin (bit for bit), without materialising the
    # rotated copy: two half-width outputs written in place.
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[:, None, :half], sin[:, None, :half]
    out = torch.empty_like(x)
    torch.mul(x1, c, out=out[..., :half]).sub_(x2 * s)
    torch.mul(x2, c, out=out[..., half:]).add_(x1 * s)
    return out


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 statistics whatever the activation dtype, as transformers does.
        xf = x.float()
        inv = xf.pow(2).mean(-1, keepdim=True).add_(self.eps).rsqrt_()
        h = (xf * inv).to(x.dtype)
        # In place when the dtypes agree (the same products as weight * h, without another [N, hidden] buffer).
        return h.mul_(self.weight) if h.dtype == self.weight.dtype else self.weight * h


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = args.num_heads, args.num_kv_heads, args.head_dim
        self.q_proj = nn.Linear(args.hidden_size, args.num_heads * args.head_dim, bias=args.qkv_bias)
        self.k_proj = nn.Linear(args.hidden_size, args.num_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.v_proj = nn.Linear(args.hidden_size, args.num_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.o_proj = nn.Linear(args.num_heads * args.head_dim, args.hidden_size, bias=args.o_bias)
        # Qwen3: RMSNorm over each head's head_dim features, one weight shared by all heads.
        self.q_norm = RMSNorm(args.head_dim, args.rms_norm_eps) if args.qk_norm else None
        self.k_norm = RMSNorm(args.head_dim, args.rms_norm_eps) if args.qk_norm else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: AttendFn,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """rows: project only these rows of the attention output (K/V and attention still cover all of x)."""
        n = x.shape[0]
        q = self.q_proj(x).view(n, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(n, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:  # before rotary, as Qwen3 does
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        v = self.v_proj(x).view(n, self.num_kv_heads, self.head_dim)
        out = attend(self.layer_idx, q, k, v)
        if rows is not None:
            out, n = out[rows], rows.numel()
        return self.o_proj(out.reshape(n, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x), inplace=True).mul_(self.up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(args, layer_idx)
        self.mlp = MLP(args)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, x, cos, sin, attend, rows=None):
        """rows: the output rows wanted (default all); the others are never projected or sent through the MLP."""
        h = self.self_attn(self.input_layernorm(x), cos, sin, attend, rows)
        # Residual adds into the fresh sublayer outputs (x + h == h + x exactly), saving two [N, hidden] buffers.
        x = h.add_(x if rows is None else x[rows])
        return self.mlp(self.post_attention_layernorm(x)).add_(x)


# bf16 matrix-vector products on the CPU: for one or two rows, ATen's own GEMV streams the weights about
# twice as fast as oneDNN's matmul; from 4 rows up oneDNN is faster (BENCHMARKS.md, "bf16 by default"). So
# decode-sized calls switch oneDNN off for their duration (a process-wide flag, restored after; a large bf16
# GEMM another thread runs meanwhile takes ATen's slower path).
_NATIVE_GEMV_ROWS = 2


@contextlib.contextmanager
def _cpu_gemv(rows: int, like: torch.Tensor):
    native = (rows <= _NATIVE_GEMV_ROWS and like.device.type == "cpu" and like.dtype == torch.bfloat16
              and torch._C._get_mkldnn_enabled())
    if native:
        torch._C._set_mkldnn_enabled(False)
    try:
        yield
    finally:
        if native:
            torch._C._set_mkldnn_enabled(True)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args, i) for i in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        # Which kernels the default attention uses: "auto", "torch" or "triton".
        self.backend = "auto"
        self._inv_freq: torch.Tensor | None = None

    def rope(self, position_ids: torch.Tensor, dtype: torch.dtype,
             args: ModelArgs | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [N, head_dim] at `position_ids` with this model's rope (or `args`': another scaling)."""
        args = args or self.args
        device = position_ids.device
        if args.rope_scaling is not None and args.rope_scaling["rope_type"] == "dynamic":
            # Depends on the length this forward covers (a host read; dynamic checkpoints only).
            inv_freq = rope_inv_freq(args, int(position_ids.max()) + 1).to(device)
        elif args is self.args:
            if self._inv_freq is None or self._inv_freq.device != device:
                self._inv_freq = rope_inv_freq(args).to(device)
            inv_freq = self._inv_freq
        else:
            inv_freq = rope_inv_freq(args).to(device)
        freqs = position_ids.float()[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        scale = rope_attention_factor(args)
        if scale == 1.0:
            return emb.cos().to(dtype), emb.sin().to(dtype)
        return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attend: AttendFn,
                out_rows: torch.Tensor | None = None, rotary=None) -> torch.Tensor:
        """Packed tokens [N] at positions [N] -> final-normed hidden states [N, hidden], or [len(out_rows),
        hidden] for just the rows `out_rows` (an index tensor). Callers that read a few rows (the question's
        logits) pass them: the last layer's output projection and MLP then skip every other row, a thirtieth
        of the linear work on the bundled model. Every layer still computes K/V (and attend) for all N.
        rotary: (cos, sin) to rotate q and k with instead of the model's own at `position_ids` (the
        alternatives runner passes the identity and rotates inside `attend`)."""
        x = self.embed_tokens(input_ids)
        cos, sin = rotary if rotary is not None else self.rope(position_ids, x.dtype)
        last = len(self.layers) - 1
        with _cpu_gemv(x.shape[0], x):
            for i, layer in enumerate(self.layers):
                x = layer(x, cos, sin, attend, out_rows if i == last else None)
        if out_rows is not None and not self.layers:
            x = x[out_rows]
        return self.norm(x)

    def lm_head_rows(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits for the given hidden rows only: callers pass the few rows they need, never a whole chunk."""
        with _cpu_gemv(hidden.shape[0], hidden):
            return self.lm_head(hidden).float()

    def token_nll(self, hidden: torch.Tensor, targets: torch.Tensor, block: int = 8192) -> torch.Tensor:
        """-log p(targets[i] | hidden[i]) in float32, [rows]. The LM head runs over vocabulary blocks with a
        running logsumexp, so the [rows, vocab] float32 logits never exist at once (a long question scored
        over a batch of chunks has thousands of rows: 1.6 GB for 8K rows of a 49K vocabulary) and the head's
        weight is still read once (blocks of rows would re-read it per block)."""
        rows = hidden.shape[0]
        lse = torch.full((rows,), float("-inf"), dtype=torch.float32, device=hidden.device)
        target_logit = torch.empty(rows, dtype=torch.float32, device=hidden.device)
        weight = self.lm_head.weight
        with _cpu_gemv(rows, hidden):
            for v0 in range(0, weight.shape[0], block):
                logits = F.linear(hidden, weight[v0:v0 + block]).float()
                lse = torch.logaddexp(lse, torch.logsumexp(logits, -1))
                # A gather and a select, not boolean indexing: that would read the mask's count back to
                # the host (a GPU wait) in every block.
                inside = (targets >= v0) & (targets < v0 + logits.shape[1])
                picked = logits.gather(1, (targets - v0).clamp(0, logits.shape[1] - 1)[:, None])[:, 0]
                target_logit = torch.where(inside, picked, target_logit)
        return lse - target_logit

    def causal_attend(self, cu_seqlens: torch.Tensor) -> AttendFn:
        """Plain causal attention inside each packed sequence."""
        from .kernels.chunk_attention import chunk_attention

        def attend(layer_idx, q, k, v):
            out, _, _ = chunk_attention(q, k, v, cu_seqlens, cu_seqlens, causal=True, return_lse=False,
                                        backend=self.backend)
            return out

        return attend

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """[B, T] -> [B, T, vocab] with full causal attention (positions 0..T-1 unless given)."""
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        b, t = input_ids.shape
        device = input_ids.device
        if position_ids is None:
            position_ids = torch.arange(t, device=device).expand(b, t)
        cu = torch.arange(0, (b + 1) * t, t, device=device, dtype=torch.int32)
        hidden = self.forward(input_ids.reshape(-1), position_ids.reshape(-1), self.causal_attend(cu))
        return self.lm_head_rows(hidden).view(b, t, -1)
