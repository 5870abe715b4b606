"""A small Llama in plain PyTorch modules (gpt-fast style).

The model works on *packed* token streams: `input_ids` [N] and `position_ids` [N], with the
sequence boundaries and the attention itself supplied by the caller through an `attend` callback,
``attend(layer_idx, q [N, H, d], k [N, H_kv, d], v [N, H_kv, d]) -> out [N, H, d]``.
That one seam lets the same layers serve a plain causal pass, the parallel chunk prefill (which
also collects window scores and compresses the cache), the question pass over a merged cache and
single-token decoding, without any cache object living inside the model.

Parameter names equal the Hugging Face checkpoint keys without their leading "model.".
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ParallelCompError

AttendFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

_ROPE_TYPES = ("default", "linear", "llama3")


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

    @classmethod
    def from_hf_config(cls, cfg: dict, source: str = "config.json") -> "ModelArgs":
        """Read a Hugging Face Llama `config.json` dict; refuse what this model cannot run."""
        model_type = cfg.get("model_type")
        if model_type != "llama":
            raise ParallelCompError(f"{source}: unsupported model_type {model_type!r} (only 'llama' is supported)")
        archs = cfg.get("architectures") or ["LlamaForCausalLM"]
        if "LlamaForCausalLM" not in archs:
            raise ParallelCompError(f"{source}: unsupported architectures {archs} (expected LlamaForCausalLM)")
        for flag in ("attention_bias", "mlp_bias"):
            if cfg.get(flag):
                raise ParallelCompError(f"{source}: {flag}=true is not supported")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ParallelCompError(f"{source}: unsupported hidden_act {cfg.get('hidden_act')!r} (expected 'silu')")
        try:
            hidden = int(cfg["hidden_size"])
            heads = int(cfg["num_attention_heads"])
            kv_heads = int(cfg.get("num_key_value_heads") or heads)
            head_dim = int(cfg.get("head_dim") or hidden // heads)
            args = dict(
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=kv_heads,
                head_dim=head_dim,
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            )
        except KeyError as e:
            raise ParallelCompError(f"{source}: missing field {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise ParallelCompError(f"{source}: bad field value ({e})") from None
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
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        return cls(**args, rope_theta=float(theta), rope_scaling=scaling,
                   bos_token_id=cfg.get("bos_token_id"), eos_token_ids=tuple(int(e) for e in eos_ids))


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2], fp32, with the checkpoint's rope scaling applied."""
    dim = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = args.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling["rope_type"] == "linear":
        return inv_freq / float(scaling["factor"])
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
        self.q_proj = nn.Linear(args.hidden_size, args.num_heads * args.head_dim, bias=False)
        self.k_proj = nn.Linear(args.hidden_size, args.num_kv_heads * args.head_dim, bias=False)
        self.v_proj = nn.Linear(args.hidden_size, args.num_kv_heads * args.head_dim, bias=False)
        self.o_proj = nn.Linear(args.num_heads * args.head_dim, args.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: AttendFn,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """rows: project only these rows of the attention output (K/V and attention still cover all of x)."""
        n = x.shape[0]
        q = apply_rope(self.q_proj(x).view(n, self.num_heads, self.head_dim), cos, sin)
        k = apply_rope(self.k_proj(x).view(n, self.num_kv_heads, self.head_dim), cos, sin)
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

    def rope(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self._inv_freq is None or self._inv_freq.device != position_ids.device:
            self._inv_freq = rope_inv_freq(self.args).to(position_ids.device)
        freqs = position_ids.float()[:, None] * self._inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attend: AttendFn,
                out_rows: torch.Tensor | None = None) -> torch.Tensor:
        """Packed tokens [N] at positions [N] -> final-normed hidden states [N, hidden], or [len(out_rows),
        hidden] for just the rows `out_rows` (an index tensor). Callers that read a few rows (the question's
        logits) pass them: the last layer's output projection and MLP then skip every other row, a thirtieth
        of the linear work on the bundled model. Every layer still computes K/V (and attend) for all N."""
        x = self.embed_tokens(input_ids)
        cos, sin = self.rope(position_ids, x.dtype)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, attend, out_rows if i == last else None)
        if out_rows is not None and not self.layers:
            x = x[out_rows]
        return self.norm(x)

    def lm_head_rows(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits for the given hidden rows only: callers pass the few rows they need, never a whole chunk."""
        return self.lm_head(hidden).float()

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
