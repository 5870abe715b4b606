"""A tiny random Llama and a byte-level tokenizer, built in memory, for fast pipeline tests."""
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from parallelcomp_triton import ParallelComp
from parallelcomp_triton.model import ModelArgs, Transformer

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def byte_tokenizer(add_bos: bool = False) -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|im_end|>")
    fast.add_special_tokens({"additional_special_tokens": SPECIALS})
    fast.chat_template = CHAT_TEMPLATE
    fast.add_bos_token = add_bos
    return fast


def tiny_pc(seed: int = 0, layers: int = 3, heads: int = 4, kv_heads: int = 2, head_dim: int = 64,
            window: int = 4096, add_bos: bool = False, dtype=torch.float32) -> ParallelComp:
    tok = byte_tokenizer(add_bos)
    args = ModelArgs(vocab_size=len(tok), hidden_size=96, intermediate_size=160, num_layers=layers,
                     num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, rope_theta=10000.0,
                     max_position_embeddings=window, bos_token_id=tok.bos_token_id,
                     eos_token_ids=(tok.eos_token_id,))
    g = torch.Generator().manual_seed(seed)
    model = Transformer(args)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 / p.shape[-1] ** 0.5) * 4)
    model.to(dtype).eval()
    return ParallelComp(model, tok, "tiny")
