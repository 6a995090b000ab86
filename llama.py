"""Llama: gpt.py modernised with RMSNorm, rotary positions, SwiGLU and grouped-query attention.

gpt.py's decoder-only transformer with what Llama (Touvron et al. 2023, arXiv:2302.13971) made
standard: RMSNorm (arXiv:1910.07467), rotary position embeddings on queries and keys (RoFormer,
arXiv:2104.09864), a SwiGLU MLP (arXiv:2002.05202), grouped-query attention (GQA,
arXiv:2305.13245), no biases, an untied head. Tokens are UTF-8 bytes (+ specials), so sft.py's
task world encodes too; sft.py to grpo.py copy this model. For inference: a KV cache, a sliding
window with attention sinks and a rolling cache that streams past block_size in constant memory
(StreamingLLM, arXiv:2309.17453), int8 weights, a benchmark. --norm/--pos/--mlp: gpt.py's pieces.

Run:
  python llama.py                                  # CPU: 4 layers, 96 dims, Shakespeare bytes
  python llama.py --device cuda                    # GPU: gpt.py's preset (6 x 384, block 256)
  torchrun --standalone --nproc_per_node 8 llama.py --device cuda --gradient-accumulation-steps 8
  python llama.py --sample-only --prompt "ROMEO:"  # sample from out/llama/ckpt.pt
  python llama.py --sample-only --quantize int8    # int8 weights: bytes, tokens/s, val loss
  python llama.py --bench                          # tokens/s: KV cache, no cache, rolling cache
  python llama.py --window 32 --sinks 4            # sliding window + sinks, trained and streamed
  python llama.py --norm layernorm --pos learned --mlp gelu --max-time 60  # gpt.py's pieces

Result: val loss 1.8731 at iter 700 of the CPU default, 53 s on 2 cores (docs/llama.md: more).
Simplifications: one text file, split 90/10; evaluation on rank 0 only; a full plain KV cache
restarts from its last half block; int8 weights are for inference only, quantized after training.
"""
import argparse
import base64
import contextlib
import dataclasses
import hashlib
import inspect
import io
import json
import math
import os
import re
import shutil
import sys
import time
import types
import typing
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tiktoken
import torch
import torch.distributed as dist
# before any process group exists: its functions default to `group=WORLD`, and imported
# later (DDP does, through torch._dynamo) that default would keep the group and gloo's
# threads alive past destroy_process_group, to abort the exit (see main)
import torch.distributed.nn  # noqa: F401
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP


@dataclass
class Config:
    data: str = "shakespeare"  # dataset name (shakespeare, names) or path to a text file
    tokenizer: str = "byte"  # byte (UTF-8 bytes + specials), gpt2 (tiktoken) or a bpe.py path
    n_layer: int = 4  # transformer blocks
    n_head: int = 4  # query heads per block
    n_kv_head: int = 0  # K/V heads, each shared by n_head/n_kv_head query heads (GQA); 0 = n_head
    n_embd: int = 96  # embedding width C
    block_size: int = 64  # context length T in tokens
    dropout: float = 0.0  # dropout probability (attention, residual, embedding)
    tie_weights: bool = False  # share the token embedding with the LM head (gpt.py always does)
    norm: str = "rmsnorm"  # rmsnorm or layernorm (gpt.py's; an ablation)
    pos: str = "rope"  # rope, learned (gpt.py's position table) or none (ablations)
    mlp: str = "swiglu"  # swiglu or gelu (gpt.py's MLP, same parameter count; an ablation)
    rope_theta: float = 10000.0  # RoPE base: pair i turns by theta^(-2i/hs) radians per position
    window: int = 0  # sliding-window attention: a query sees only the last W positions (0 = all)
    sinks: int = 0  # attention sinks: the first S positions stay visible to every query (--window)
    batch_size: int = 16  # sequences per micro-batch and process
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step, over all processes
    max_iters: int = 800  # optimizer steps
    max_time: float = 0.0  # stop training (with a final eval) after this many seconds; 0 = no limit
    learning_rate: float = 3e-3  # peak learning rate
    min_lr: float = 3e-4  # learning rate at the end of the cosine decay
    warmup_iters: int = 30  # steps of linear warmup
    lr_decay_iters: int = 0  # step where the cosine decay reaches min_lr (0 = max_iters)
    weight_decay: float = 0.1  # AdamW decoupled weight decay on matrices
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.99  # AdamW beta2
    grad_clip: float = 1.0  # clip the global gradient norm to this (0 = off)
    eval_interval: int = 100  # evaluate and checkpoint every N steps (and at the last step)
    eval_iters: int = 20  # batches per split in each evaluation
    log_interval: int = 1  # print and log the training loss every N steps
    log_grad_norms: bool = False  # add per-layer gradient norms to the logged steps of log.jsonl
    out_dir: str = "out/llama"  # checkpoint, log.jsonl, samples.txt and figures go here
    resume: bool = False  # continue the run saved in --out-dir
    overwrite: bool = False  # let a fresh run replace an existing checkpoint in --out-dir
    sample_only: bool = False  # only sample from the checkpoint in --out-dir
    prompt: str = "\n"  # text the samples continue
    num_samples: int = 5  # samples to draw
    max_new_tokens: int = 512  # tokens per sample (and per --bench / --quantize timing)
    temperature: float = 0.8  # sampling temperature (0 = greedy)
    top_k: int = 200  # sample among the k most likely tokens (0 = off)
    top_p: float = 1.0  # nucleus sampling: smallest set with probability >= p (1 = off)
    kv_cache: bool = True  # generate with the KV cache (--no-kv-cache reruns the whole context)
    quantize: str = "none"  # none or int8: with --sample-only/--bench, weight-only quantization
    bench: bool = False  # time generation (KV cache, no cache, rolling cache, streaming) and exit
    device: str = "auto"  # auto, cpu, cuda, cuda:N or mps
    dtype: str = "auto"  # auto, float32, bfloat16 or float16
    compile: bool = False  # torch.compile the model (the GPU preset turns it on)
    seed: int = 1337  # seed for init, batches, dropout and sampling
    tensorboard: bool = False  # also log to TensorBoard in --out-dir/tensorboard
    plot: bool = False  # write loss.png (and grad_norms.png with --log-grad-norms) (matplotlib)


# gpt.py's GPU preset (nanoGPT's shakespeare_char) with GQA, ending at step 1500 (docs/llama.md)
GPU_PRESET = dict(n_layer=6, n_head=6, n_kv_head=2, n_embd=384, block_size=256, batch_size=64,
                  dropout=0.2, max_iters=1500, learning_rate=1e-3, min_lr=1e-4, warmup_iters=100,
                  eval_interval=250, eval_iters=200, log_interval=10, compile=True)


@dataclass
class ModelConfig:
    """The Llama's shape, saved in the checkpoint as `model_args` (see Config for the meanings)."""
    vocab_size: int  # V (the tokenizer's, padded to a multiple of 64)
    block_size: int  # T
    n_layer: int  # L
    n_head: int  # nh
    n_embd: int  # C
    n_kv_head: int = 0  # nkv (0 = n_head: multi-head attention)
    dropout: float = 0.0  # p
    tie_weights: bool = False  # LM head = token embedding
    norm: str = "rmsnorm"  # or layernorm
    pos: str = "rope"  # or learned, none
    mlp: str = "swiglu"  # or gelu
    rope_theta: float = 10000.0  # RoPE base
    window: int = 0  # sliding window W (0 = full causal attention)
    sinks: int = 0  # attention sinks S
    norm_eps: float = 1e-5  # epsilon of RMSNorm/LayerNorm

    def __post_init__(self):
        self.n_kv_head = self.n_kv_head or self.n_head


IGNORE_INDEX = -100  # PyTorch's cross-entropy default: targets with this id add no loss


class RMSNorm(nn.Module):
    """NEW vs gpt.py: RMSNorm (Zhang & Sennrich 2019, arXiv:1910.07467), y = x / rms(x) * g.

    LayerNorm re-centres (subtracts the mean) and re-scales; RMSNorm keeps only the re-scaling,
    which the paper found carries the benefit: one reduction instead of two, and no bias.
    """

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))  # the gain g

    def forward(self, x):
        xf = x.float()  # the mean of squares in float32, also under bf16 autocast
        rms_inv = torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)  # (B, T, 1)
        return (xf * rms_inv).type_as(x) * self.weight


def make_norm(config):
    """--norm rmsnorm (Llama) or layernorm (gpt.py's, without bias like every layer here)."""
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd, config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=False)


def rope_cos_sin(pos, hs, theta):
    """cos and sin of the rotary angles pos * theta^(-2i/hs), i < hs/2 -> two (T, hs/2) tensors.

    Pair i turns by theta^(-2i/hs) radians per position: from one radian per token (i = 0) to
    a full turn every ~60k tokens (theta = 10^4), so both near and far offsets stay distinct.
    Computed in float64: 10^4 tokens into a stream float32 angles would be off by ~1e-3 rad.
    """
    inv_freq = theta ** (-torch.arange(0, hs, 2, dtype=torch.float64,
                                       device=pos.device) / hs)  # (hs/2,)
    angles = pos.double()[:, None] * inv_freq[None, :]  # (T, 1) * (1, hs/2) -> (T, hs/2)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x, cos, sin):
    """NEW vs gpt.py: rotary position embedding (RoFormer, Su et al. 2021, arXiv:2104.09864).

    Each pair (x_i, x_{i+hs/2}) of a query or key x (..., hs) at position m is turned by the
    angle m*w_i (cos, sin: (T, hs/2), or (T, 1, hs/2) for x in (B, T, heads, hs) layout).
    Relative position falls out of the dot product: with R(a) the rotation by a,
    q_m . k_n = (R(mw) q)^T (R(nw) k) = q^T R(mw)^T R(nw) k =
    q^T R((n-m)w) k, because rotations compose and R(a)^T = R(-a). An attention score depends
    only on the offset n - m (Eq. 16 of the paper), never on where the pair sits in the text,
    and rotations keep norms. Which dimensions pair up is a convention (halves here, like
    GPT-NeoX and Hugging Face's Llama; Meta's code interleaves): Wq and Wk absorb it.
    """
    x1, x2 = x.chunk(2, dim=-1)  # (..., hs/2) each
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).type_as(x)


def attention_mask(qpos, kpos, window, sinks):
    """NEW vs gpt.py: (Tq, Tk) bool, True where a query at position qpos may see a key at kpos.

    Causal; with a window W a query sees only the last W positions (its own included) and the
    first S, the attention sinks: Xiao et al. (arXiv:2309.17453) found that softmax attention
    parks surplus weight on the first tokens, so evicting them breaks a sliding window.
    kpos = -1 marks an empty cache slot.
    """
    qpos, kpos = qpos[:, None], kpos[None, :]  # (Tq, 1), (1, Tk)
    mask = (kpos <= qpos) & (kpos >= 0)
    if window:
        mask = mask & ((kpos > qpos - window) | (kpos < sinks))
    return mask


class KVCache:
    """NEW vs gpt.py: the keys and values of every layer, preallocated, for generation.

    Each generated token then costs one forward pass of one token, instead of a pass over the
    whole context. Without a window, slot = position and the cache holds block_size positions.
    With --window W --sinks S it is a rolling buffer of S + W slots: positions 0..S-1 (the
    sinks) keep slots 0..S-1 for ever, later positions cycle through slots S..S+W-1, each
    overwriting the one that has just left every query's window, so memory and time per token
    stay constant however long the stream. `pos` (the position in each slot) feeds the masks.
    """

    def __init__(self, config, batch_size):
        self.window, self.sinks = config.window, config.sinks
        self.capacity = config.sinks + config.window if config.window else config.block_size
        self.shape = (config.n_layer, batch_size, config.n_kv_head, self.capacity,
                      config.n_embd // config.n_head)  # (L, B, nkv, slots, hs)
        self.k = self.v = None  # allocated at the first write, in the keys' dtype and device
        self.pos = None  # (slots,) position held by each slot, -1 = empty
        self.seen = 0  # positions written so far = the position of the next token
        self.slots = None  # the slots of the tokens of the current forward pass

    @property
    def full(self):
        """A plain cache cannot take another token; a rolling one never fills."""
        return not self.window and self.seen == self.capacity

    def advance(self, pos):
        """Give slots to the new positions pos (T,); called once per forward pass."""
        T = pos.numel()
        if self.pos is None:
            self.pos = torch.full((self.capacity,), -1, dtype=torch.long, device=pos.device)
        if self.seen + T <= self.capacity:
            self.slots = pos  # until the buffer wraps, slot = position
        elif self.window and T == 1:
            self.slots = self.sinks + (pos - self.sinks) % self.window  # the ring after the sinks
        else:  # a chunk that wraps would overwrite keys its own first tokens still need
            raise ValueError(f"{T} new tokens do not fit the cache ({self.seen} of {self.capacity} "
                             "slots used); feed them one at a time (see prefill)")
        self.pos.index_copy_(0, self.slots, pos)
        self.seen += T

    def update(self, layer, k, v):
        """Store a layer's new keys and values (B, nkv, T, hs) -> that layer's filled slots
        (B, nkv, n, hs) twice and the positions they hold (n,)."""
        if self.k is None:
            self.k = torch.zeros(self.shape, dtype=k.dtype, device=k.device)
            self.v = torch.zeros(self.shape, dtype=v.dtype, device=v.device)
        self.k[layer].index_copy_(2, self.slots, k)
        self.v[layer].index_copy_(2, self.slots, v)
        n = min(self.seen, self.capacity)
        return self.k[layer, :, :, :n], self.v[layer, :, :, :n], self.pos[:n]

    def nbytes(self):
        return 0 if self.k is None else self.k.nbytes + self.v.nbytes


class CausalSelfAttention(nn.Module):
    """Causal self-attention with grouped-query heads, rotary positions and an optional
    sliding window with attention sinks.

    NEW vs gpt.py: grouped-query attention (Ainslie et al. 2023, arXiv:2305.13245): only
    n_kv_head key/value heads, each shared by a group of n_head/n_kv_head query heads, so the
    KV cache shrinks by that factor at a small cost in quality; n_kv_head = n_head is gpt.py's
    multi-head attention, n_kv_head = 1 is multi-query attention (Shazeer 2019).
    """

    def __init__(self, config, layer_idx):
        super().__init__()
        self.hs = config.n_embd // config.n_head
        kv_dim = config.n_kv_head * self.hs
        # Q, K, V at once: C query columns, then kv_dim key and kv_dim value columns; no biases
        self.c_attn = nn.Linear(config.n_embd, config.n_embd + 2 * kv_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.dropout = config.dropout
        self.window, self.sinks = config.window, config.sinks
        self.layer_idx = layer_idx  # which layer of a KVCache is this one's

    def forward(self, x, pos, rope, cache=None):
        """x (B, T, C) at positions pos (T,); rope = ((cos, sin), sink (cos, sin) or None) or
        None; with a cache, the keys and values of earlier positions come from there."""
        B, T, C = x.size()
        nh, nkv = self.n_head, self.n_kv_head
        qkv = self.c_attn(x)  # (B, T, C + 2 kv_dim): nh query heads, nkv key heads, nkv value heads
        qk = qkv[..., :(nh + nkv) * self.hs].view(B, T, nh + nkv, self.hs)  # (B, T, nh+nkv, hs)
        # (B, nkv, T, hs)
        v = qkv[..., (nh + nkv) * self.hs:].view(B, T, nkv, self.hs).transpose(1, 2)
        q_sink = None
        if rope is not None:  # cos, sin: (T, 1, hs/2), broadcast over the heads
            (cos, sin), sink_rope = rope
            if sink_rope is not None:
                q_sink = apply_rope(qk[:, :, :nh], *sink_rope).transpose(1, 2)  # (B, nh, T, hs)
            qk = apply_rope(qk, cos, sin)  # queries and keys turned in one go
        q, k = qk.transpose(1, 2).split([nh, nkv], dim=1)  # (B, nh, T, hs), (B, nkv, T, hs)
        kpos = pos
        if cache is not None:
            k, v, kpos = cache.update(self.layer_idx, k, v)  # (B, nkv, Tk, hs) x2, (Tk,)
        dropout_p = self.dropout if self.training else 0.0
        if q_sink is not None:
            y = self.sink_attention(q, k, v, q_sink, pos, kpos)
        elif not self.window and (T == 1 or k.size(2) == T):
            # plain causal attention in one fused kernel (one new token sees every cached key);
            # enable_gqa lets each group of n_head/n_kv_head query heads read its shared
            # key/value head without copies
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=T > 1,
                                               enable_gqa=True)  # (B, nh, T, hs)
        else:  # a window, or T new queries after Tk - T cached positions: explicit mask
            mask = attention_mask(pos, kpos, self.window, self.sinks)  # (T, Tk)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                               enable_gqa=True)  # (B, nh, T, hs)
        # (B, T, nh, hs) -> (B, T, C): heads side by side
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))

    def sink_attention(self, q, k, v, q_sink, pos, kpos):
        """NEW vs gpt.py: window + sink attention, the sinks scored at rolling-cache offsets.

        Which positions should RoPE see once a stream outgrows block_size? StreamingLLM
        (arXiv:2309.17453, Sec. 3.2) numbers tokens by their place in the cache, not in the
        text, and so do we: with absolute positions the sinks would end up 10 * block_size
        tokens before the query, an offset no training step ever showed the model. As scores
        depend only on offsets (apply_rope), no cached key needs re-rotating: a window key is
        fewer than W positions from its query either way, and a sink key is scored against the
        query turned to its cache slot min(t, S+W-1) instead of t (q_sink), an offset of at
        most S+W-1 < block_size. Training uses the same rule, so a full forward pass and the
        rolling cache compute one function at every length (tests/test_llama.py checks it).
        """
        rep = self.n_head // self.n_kv_head
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (B, nh, Tk, hs)
        S = self.sinks  # positions 0..S-1 are the first S keys, in a full pass and in the cache
        # (B, nh, T, hs) @ (B, nh, hs, Tk) -> (B, nh, T, Tk)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.hs))
        # (B, nh, T, S)
        att_sink = (q_sink @ k[:, :, :S].transpose(-2, -1)) * (1.0 / math.sqrt(self.hs))
        # (T, S): seen as a sink, not in the window
        outside = kpos[None, :S] <= pos[:, None] - self.window
        att = torch.cat((torch.where(outside, att_sink, att[..., :S]), att[..., S:]), dim=-1)
        mask = attention_mask(pos, kpos, self.window, S)  # (T, Tk)
        att = att.masked_fill(~mask, float("-inf")).softmax(dim=-1)  # rows sum to 1
        return self.attn_dropout(att) @ v  # (B, nh, T, Tk) @ (B, nh, Tk, hs) -> (B, nh, T, hs)


def swiglu_hidden(n_embd):
    """SwiGLU has three matrices where gpt.py's MLP has two: a hidden size of 2/3 * 4C keeps
    the parameter count (3 * C * 8C/3 = 2 * C * 4C), rounded to a multiple of 32 for speed."""
    return 32 * round(2 * 4 * n_embd / 3 / 32)


class MLP(nn.Module):
    """Position-wise feed-forward net: SwiGLU (or gpt.py's GELU MLP with --mlp gelu)."""

    def __init__(self, config):
        super().__init__()
        self.swiglu = config.mlp == "swiglu"
        hidden = swiglu_hidden(config.n_embd) if self.swiglu else 4 * config.n_embd
        # NEW vs gpt.py: for SwiGLU c_fc makes the gate and the value in one matmul
        self.c_fc = nn.Linear(config.n_embd, 2 * hidden if self.swiglu else hidden, bias=False)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        h = self.c_fc(x)  # (B, T, C) -> (B, T, 2H) for SwiGLU, (B, T, 4C) for GELU
        if self.swiglu:
            # NEW vs gpt.py: SwiGLU (Shazeer 2020, arXiv:2002.05202, Eq. 6): silu(x W) * (x V),
            # a gated linear unit; the multiplicative gate beat GELU in the paper's tables
            gate, value = h.chunk(2, dim=-1)  # (B, T, H) each
            h = F.silu(gate) * value
        else:
            h = F.gelu(h)
        return self.dropout(self.c_proj(h))  # (B, T, H) -> (B, T, C)


class Block(nn.Module):
    """Pre-norm transformer block, as in gpt.py: the residual stream x is only ever added to."""

    def __init__(self, config, layer_idx):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, pos, rope, cache=None):
        x = x + self.attn(self.ln_1(x), pos, rope, cache)  # tokens exchange information
        x = x + self.mlp(self.ln_2(x))  # each token thinks on its own
        return x


class Llama(nn.Module):
    """Token embedding -> n_layer Blocks (RoPE inside attention) -> RMSNorm -> logits."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        modules = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))
        if config.pos == "learned":  # ablation: gpt.py's position table
            modules["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        self.transformer = nn.ModuleDict(dict(
            **modules,
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=make_norm(config),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            # NEW vs gpt.py: tying is optional (Llama unties: input and output embeddings
            # can then specialise); tied, one (V, C) parameter is counted once
            self.transformer.wte.weight = self.lm_head.weight
        # NEW vs gpt.py: the RoPE angles of the trained positions, buffers (neither trained
        # nor saved: recomputed from the shape)
        cos, sin = rope_cos_sin(torch.arange(config.block_size), config.n_embd // config.n_head,
                                config.rope_theta)
        self.register_buffer("cos", cos, persistent=False)  # (block_size, hs/2)
        self.register_buffer("sin", sin, persistent=False)
        # initialisation, GPT-2 style as in gpt.py: every weight N(0, 0.02); the projections that
        # write into the residual stream get std 0.02/sqrt(2L) (Radford et al. 2019, §2.3), so
        # the variance of the stream, a sum of 2L such writes, does not grow with depth
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def num_params(self, non_embedding=True):
        """Parameter count; non_embedding leaves out a learned position table, as Kaplan et
        al. (2020) and nanoGPT do (RoPE has no parameters)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        return n

    def rope_at(self, start, end):
        """cos, sin (T, hs/2) of positions start..end-1: the table, or, when a windowed model
        streams past block_size, computed (on the CPU, in float64, which MPS lacks)."""
        if end <= self.config.block_size:
            return self.cos[start:end], self.sin[start:end]
        cos, sin = rope_cos_sin(torch.arange(start, end), self.config.n_embd // self.config.n_head,
                                self.config.rope_theta)
        return cos.to(self.cos.device), sin.to(self.cos.device)

    def forward(self, idx, targets=None, cache=None):
        """idx (B, T) token ids -> logits (B, T, V) for every position, and the mean
        cross-entropy against targets (B, T) when given (else None). Targets equal to
        IGNORE_INDEX add no loss: sft.py masks prompt and padding tokens that way.
        NEW vs gpt.py: with a KVCache, idx holds only the new tokens, which join the cache."""
        cfg = self.config
        B, T = idx.size()
        start = 0 if cache is None else cache.seen
        if start + T > cfg.block_size and not cfg.window:
            raise ValueError(f"{start + T} positions > block_size {cfg.block_size}: crop the "
                             "context (a model with --window streams on without limit)")
        pos = torch.arange(start, start + T, device=idx.device)  # (T,) positions in the text
        if cache is not None:
            cache.advance(pos)
        x = self.transformer.wte(idx)  # (B, T, C)
        rope = None
        if cfg.pos == "learned":
            x = x + self.transformer.wpe(pos)  # (B, T, C) + (T, C)
        elif cfg.pos == "rope":
            sink_rope = None
            if cfg.sinks:  # the query's angle as the sinks see it: its slot in a rolling cache
                slot = pos.clamp(max=cfg.sinks + cfg.window - 1)  # (T,), inside the table
                sink_rope = (self.cos[slot, None], self.sin[slot, None])  # (T, 1, hs/2)
            cos, sin = self.rope_at(start, start + T)  # (T, hs/2)
            rope = ((cos[:, None], sin[:, None]), sink_rope)
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x, pos, rope, cache)
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, C) @ (C, V) -> (B, T, V)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.view(B * T, -1), targets.reshape(B * T),
                               ignore_index=IGNORE_INDEX)
        return logits, loss

    def estimate_mfu(self, fwdbwd_per_iter, dt, peak_flops):
        """Model FLOPs utilisation: achieved FLOP/s over the hardware peak. A token costs
        6N FLOPs (forward + backward through N parameters) plus 12·L·nh·hs·T for attention
        (PaLM, Chowdhery et al. 2022, Appendix B)."""
        L, nh, T = self.config.n_layer, self.config.n_head, self.config.block_size
        hs = self.config.n_embd // nh
        flops_per_token = 6 * self.num_params() + 12 * L * nh * hs * T
        return flops_per_token * T * fwdbwd_per_iter / dt / peak_flops


def prefill(model, idx, cache):
    """NEW vs gpt.py: run a prompt idx (B, T) into the cache -> logits (B, V) of its last token.

    One chunk may not wrap a rolling buffer (its first tokens would lose keys they still
    need), so what does not fit the free slots goes in one token at a time.
    """
    n = max(1, cache.capacity - cache.seen)
    logits, _ = model(idx[:, :n], cache=cache)
    for t in range(n, idx.size(1)):
        logits, _ = model(idx[:, t:t + 1], cache=cache)
    return logits[:, -1, :]


@torch.no_grad()
def stream(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, generator=None,
           kv_cache=True):
    """Yield the next token ids (B, 1) after idx (B, T0), one step at a time.

    NEW vs gpt.py: with kv_cache the prompt is prefilled into a KVCache and every step feeds
    one token. A plain cache that fills up restarts from the last block_size/2 tokens (one
    prefill per block_size/2 new tokens); a model with a window streams on in its rolling
    cache. Without the cache every step reruns the context, cropped to block_size (a windowed
    model is not cropped: its mask bounds the attention, so both ways agree at any length).
    """
    cfg = model.config
    cache = None
    for _ in range(max_new_tokens):
        if not kv_cache:
            context = idx if cfg.window else idx[:, -cfg.block_size:]  # (B, <= block_size)
            logits = model(context)[0][:, -1, :]
        elif cache is None or cache.full:
            keep = cfg.block_size if cache is None else cfg.block_size // 2
            cache = KVCache(cfg, idx.size(0))
            logits = prefill(model, idx if cfg.window else idx[:, -keep:], cache)
        else:
            logits = model(idx[:, -1:], cache=cache)[0][:, -1, :]  # (B, V)
        next_id = sample_logits(logits, temperature, top_k, top_p, generator)  # (B, 1)
        idx = torch.cat((idx, next_id), dim=1)
        yield next_id


def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, generator=None,
             kv_cache=True):
    """Extend each row of idx (B, T0) by max_new_tokens sampled tokens -> (B, T0 + new).

    Any batch size, temperature 0 = greedy; see `stream` for the cache and the context.
    """
    new = stream(model, idx, max_new_tokens, temperature, top_k, top_p, generator, kv_cache)
    return torch.cat([idx, *new], dim=1)


@torch.no_grad()
def estimate_loss(model, data, batch_size, eval_iters, seed, device, autocast):
    """Mean loss over `eval_iters` batches of each split, in eval mode (no dropout).

    The batches come from a generator seeded afresh on every call: each evaluation scores the
    same windows (curves compare like with like) and the training RNG is left untouched.
    """
    model.eval()
    out = {}
    for split, tokens in data.items():
        generator = torch.Generator().manual_seed(seed)
        losses = torch.zeros(eval_iters, device=device)
        for k in range(eval_iters):
            x, y = get_batch(tokens, model.config.block_size, batch_size, generator, device)
            with autocast:
                losses[k] = model(x, y)[1]
        out[split] = losses.mean().item()
    model.train()
    return out


def train(cfg, ckpt, device, dtype, rank, world_size):
    """gpt.py's training loop (nanoGPT's train.py); returns the final metrics (rank 0)."""
    master, ddp, device_type = rank == 0, world_size > 1, device.split(":")[0]
    torch.manual_seed(cfg.seed + rank)  # per-rank offset: each process draws its own dropout masks
    if device_type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls for any float32 work
    tokenizer, data, raw_model = prepare(cfg, ckpt, device, world_size, master)
    accum = cfg.gradient_accumulation_steps // world_size  # micro-steps per process
    # raw_model is saved, evaluated and sampled; `model` (compiled, DDP-wrapped) is trained
    model = torch.compile(raw_model) if cfg.compile else raw_model
    if ddp:
        # NEW vs gpt.py: the RoPE tables are constants, nothing to broadcast before a forward
        ids = [torch.device(device).index] if device_type == "cuda" else None
        model = DDP(model, device_ids=ids, broadcast_buffers=False)
    optimizer = make_optimizer(raw_model, cfg, device_type)
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == "float16")  # fp16: loss scaling
    autocast = torch.amp.autocast(device_type, dtype=getattr(torch, dtype),
                                  enabled=dtype != "float32")
    batches = TrainBatches(data["train"], raw_model.config.block_size, cfg.batch_size, cfg.seed,
                           device, rank, world_size)
    # best = (val loss, iter, CPU weights) of the kept model: the best evaluation's so far
    start_iter, best = restore(cfg, ckpt, optimizer, scaler, batches, master, device)
    out_dir = Path(cfg.out_dir)
    if master:  # the first write to --out-dir: every check has passed
        log = RunLog(out_dir, None if ckpt is None else start_iter, cfg.tensorboard)
    flops, metrics = peak_flops(device), {}
    X, Y = batches.next()  # the first batch; from here on the next one is fetched before backward
    t_start = t_last = time.perf_counter()
    last_timed = start_iter  # ms/iter averages over the steps since this one (evals excluded)
    for step in range(start_iter, cfg.max_iters + 1):
        # NEW vs gpt.py: --max-time ends the run like the last step (final eval, checkpoint)
        clock = run_clock(t_start, cfg, ddp, device)  # seconds since training started
        last_step = step == cfg.max_iters or (cfg.max_time > 0 and clock >= cfg.max_time)
        # evaluate and checkpoint (a resumed run has just loaded the state of step start_iter)
        resumed_here = ckpt is not None and step == start_iter
        if master and (last_step or (step % cfg.eval_interval == 0 and not resumed_here)):
            losses = estimate_loss(raw_model, data, cfg.batch_size, cfg.eval_iters, cfg.seed,
                                   device, autocast)
            # printed; stops if not finite; a new best val loss keeps a copy of the weights
            metrics, best = eval_record(step, losses, best, raw_model, t_start, out_dir)
            log.write(metrics)
            save_checkpoint(checkpoint_dict(cfg, raw_model, optimizer, scaler, step, best,
                                            batches, tokenizer, device), out_dir / "ckpt.pt")
            t_last, last_timed = time.perf_counter(), step
        if last_step:
            break
        # one optimizer step over `accum` micro-batches per process
        lr = set_lr(optimizer, step, clock, cfg)  # NEW vs gpt.py: follows the clock (--max-time)
        step_loss = torch.zeros((), device=device)
        for micro_step in range(accum):
            # DDP all-reduces gradients during backward; only the last micro-step needs that
            sync = model.no_sync() if ddp and micro_step < accum - 1 else contextlib.nullcontext()
            with sync:
                with autocast:
                    _, loss = model(X, Y)
                    loss = loss / accum  # gradients add up over micro-steps: this makes them a mean
                X, Y = batches.next()  # fetched while the device still works on the forward pass
                scaler.scale(loss).backward()
            step_loss += loss.detach()
        if cfg.grad_clip > 0 or cfg.log_grad_norms:
            scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip)
        # NEW vs gpt.py: per-layer gradient norms (before clipping) on the logged steps
        norms = (layer_grad_norms(raw_model)
                 if cfg.log_grad_norms and step % cfg.log_interval == 0 else None)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if step % cfg.log_interval == 0:
            loss_value = global_loss(step_loss, step, ddp, world_size, out_dir)  # syncs the device
            now = time.perf_counter()
            dt = (now - t_last) / (step + 1 - last_timed)
            t_last, last_timed = now, step + 1
            if master:
                log_step(log, cfg, raw_model, step, loss_value, lr, dt, now - t_start, norms,
                         flops, accum)
    if master:  # samples, figures and the `done` record
        metrics = finish(cfg, raw_model, tokenizer, device, autocast, log, metrics, best, t_start)
    return metrics


def main(argv=None):
    cfg, given = parse_config(Config, argv, __doc__.splitlines()[0])
    ckpt = None
    if cfg.resume and not cfg.sample_only:
        check_out_dir(cfg.out_dir, cfg.resume, cfg.overwrite)
        ckpt = load_checkpoint(Path(cfg.out_dir) / "ckpt.pt", ["llama.py"], RESUME_KEYS)
        cfg = resume_config(cfg, given, ckpt)  # continue with the saved settings
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = resolve_device(cfg.device)
    if device.startswith("cuda") and world_size > 1:
        device = f"cuda:{os.environ['LOCAL_RANK']}"  # torchrun starts one process per GPU
        torch.cuda.set_device(device)
    if device.startswith("cuda") and ckpt is None:
        cfg = apply_preset(cfg, GPU_PRESET, given)
    dtype = resolve_dtype(cfg.dtype, device)
    check_config(cfg, RULES, CHOICES)
    if rank == 0:
        print("config: " + " ".join(f"{k}={v!r}" for k, v in dataclasses.asdict(cfg).items()))
        print(f"device={device} dtype={dtype} compile={'on' if cfg.compile else 'off'}"
              + (f" ddp world_size={world_size}" if world_size > 1 else ""))
    if cfg.sample_only:
        return sample_only(cfg, device, dtype)
    if cfg.bench:
        return run_bench(cfg, device, dtype)
    if ckpt is None:
        check_out_dir(cfg.out_dir, cfg.resume, cfg.overwrite)
    ddp = world_size > 1  # torchrun started this process as one of world_size ranks
    if ddp:
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    try:
        metrics = train(cfg, ckpt, device, dtype, rank, world_size)
        if ddp:  # rank 0 writes samples and figures last; the others wait for it
            dist.barrier()
        return metrics
    except torch.OutOfMemoryError:
        die(f"CUDA out of memory with --batch-size {cfg.batch_size}; try --batch-size "
            f"{max(1, cfg.batch_size // 2)} (and more --gradient-accumulation-steps)")
    finally:
        if ddp:  # on every way out; joins gloo's threads, which must not outlive the interpreter
            dist.destroy_process_group()


# -------------------------------------------------------------------------------
# Appendix: a first read can stop here (copies, bookkeeping, plumbing)
# -------------------------------------------------------------------------------
# ---- Appendix: from gpt.py — tokenizers (the byte one is NEW), data, optimizer, sampling ----
def load_bpe(path):
    """A tokenizer saved by bpe.py, as a `tiktoken.Encoding`.

    bpe.py writes `<prefix>.tiktoken` (tiktoken's own rank file: base64 token bytes and rank
    per line) and `<prefix>.json` ({"pattern": str|null, "special": {str: id},
    "vocab_size": int}); `path` may name either file or the bare prefix.
    """
    import base64
    import tiktoken

    prefix = re.sub(r"\.(tiktoken|json)$", "", str(path))
    try:
        meta = json.loads(Path(prefix + ".json").read_text())
        lines = Path(prefix + ".tiktoken").read_text().splitlines()
        ranks = {base64.b64decode(tok): int(rank)
                 for tok, rank in (ln.split() for ln in lines if ln)}
    except (OSError, ValueError) as e:
        die(f"--tokenizer {path}: cannot read a bpe.py tokenizer there ({e})")
    pattern = meta["pattern"] if meta["pattern"] is not None else r"[\s\S]+"  # null = no pre-split
    return tiktoken.Encoding(name=Path(prefix).name, pat_str=pattern,
                             mergeable_ranks=ranks, special_tokens=meta["special"])


# NEW vs gpt.py: the byte tokenizer's special tokens. <|endoftext|> separates documents and
# <|pad|> fills ragged batches (sft.py); the reserved ids let later stages add tokens (chat
# roles, tool calls) without resizing the embedding of a trained model.
BYTE_SPECIAL = {"<|endoftext|>": 256, "<|pad|>": 257,
                **{f"<|reserved_{i}|>": 256 + i for i in range(2, 8)}}


class ByteTokenizer:
    """NEW vs gpt.py (instead of CharTokenizer): ids 0..255 are the UTF-8 bytes of the text,
    special tokens follow (<|endoftext|> = 256).

    Every text encodes (no vocabulary learned from the data, no unknown characters), which is
    what lets one checkpoint go from Shakespeare to sft.py's task world. On ASCII text one byte
    is one character, so losses compare with char-level ones; other scripts cost 2-4 ids per
    character. The members are those of `tiktoken.Encoding` this file uses.
    """

    name = "byte"

    def __init__(self, special=None):
        self.special = dict(BYTE_SPECIAL if special is None else special)
        self.n_vocab = 256 + len(self.special)
        self.names = {i: s for s, i in self.special.items()}

    def encode_ordinary(self, text):
        """Text -> ids; special-token strings in the text stay plain bytes, as in tiktoken."""
        return list(text.encode("utf-8"))

    def decode(self, ids):
        """Ids -> text; special tokens print as their names, broken UTF-8 as U+FFFD."""
        parts, run = [], bytearray()
        for i in ids:
            if i < 256:
                run.append(i)
            else:
                parts += [run.decode("utf-8", errors="replace"), self.names[i]]
                run = bytearray()
        return "".join(parts) + run.decode("utf-8", errors="replace")


def gpt2_tokenizer():
    """tiktoken's GPT-2 BPE (50257 tokens); its two files are fetched once into tiktoken's cache."""
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # offline with an empty cache: requests/urllib errors, not one class
        die(f"cannot load tiktoken's gpt2 encoding ({type(e).__name__}); connect once, or set "
            f"TIKTOKEN_CACHE_DIR to a folder that holds its files")


def load_tokenizer(name):
    """`--tokenizer byte|gpt2|PATH`."""
    if name == "byte":
        return ByteTokenizer()
    if name == "gpt2":
        return gpt2_tokenizer()
    return load_bpe(name)


def tokenizer_state(tokenizer):
    """The tokenizer as plain data for the checkpoint (docs/design.md section 4)."""
    if isinstance(tokenizer, ByteTokenizer):
        return {"kind": "byte", "special": dict(tokenizer.special)}
    # tiktoken has no public accessor for its ranks and pattern; these attributes are stable
    ranks = sorted(tokenizer._mergeable_ranks.items(), key=lambda item: item[1])
    return {"kind": "tiktoken", "name": tokenizer.name, "pat_str": tokenizer._pat_str,
            "ranks_b64": [base64.b64encode(token).decode("ascii") for token, _ in ranks],
            "special": dict(tokenizer._special_tokens)}


def tokenizer_from_state(state):
    """Inverse of `tokenizer_state`: no file or network needed to sample from a checkpoint."""
    if state["kind"] == "byte":
        return ByteTokenizer(state["special"])
    ranks = {base64.b64decode(token): rank for rank, token in enumerate(state["ranks_b64"])}
    return tiktoken.Encoding(name=state["name"], pat_str=state["pat_str"],
                             mergeable_ranks=ranks, special_tokens=state["special"])


def padded_vocab(n_vocab):
    """NEW vs gpt.py: the vocabulary rounded up to a multiple of 64, for faster matmuls
    (nanoGPT pads GPT-2's 50257 to 50304); the extra ids never occur in the data."""
    return 64 * math.ceil(n_vocab / 64)


def load_tokens(path, text, tokenizer):
    """Token ids of `text` (read from `path`), split 90/10 into {"train", "val"} int64 tensors.

    Tokenizing is the slow part for BPE, so the ids are cached as uint16 .bin files next to the
    text, e.g. data/tinyshakespeare.char-3f2a9c01d4e7.train.bin: the suffix hashes the text and
    the tokenizer, so an edited file or another tokenizer gets a new cache, never stale ids.
    """
    if tokenizer.n_vocab > 2**16:
        die(f"the tokenizer has {tokenizer.n_vocab} tokens; the uint16 cache holds at most 65536")
    state = json.dumps(tokenizer_state(tokenizer), sort_keys=True)
    key = hashlib.sha256(text.encode() + state.encode()).hexdigest()[:12]
    label = tokenizer.name  # NEW vs gpt.py: "byte" has a name like tiktoken's encodings
    path = Path(path)
    files = {split: path.with_name(f"{path.stem}.{label}-{key}.{split}.bin")
             for split in ("train", "val")}
    if not all(f.is_file() for f in files.values()):
        ids = np.array(tokenizer.encode_ordinary(text), dtype=np.uint16)
        n_train = int(0.9 * len(ids))
        for split, part in (("train", ids[:n_train]), ("val", ids[n_train:])):
            # one per DDP rank
            tmp = files[split].with_name(f"{files[split].name}.{os.getpid()}.tmp")
            part.tofile(tmp)
            os.replace(tmp, files[split])
    return {split: torch.from_numpy(np.fromfile(f, dtype=np.uint16).astype(np.int64))
            for split, f in files.items()}


def get_batch(data, block_size, batch_size, generator, device, rank=0, world_size=1):
    """`batch_size` random windows of `data` -> inputs x and targets y, both (B, T).

    y is x shifted one token left: position t is trained to predict token t+1. Offsets for
    all `world_size` processes are drawn and rank `rank` keeps its slice (see TrainBatches).
    """
    ix = torch.randint(len(data) - block_size, (world_size * batch_size,), generator=generator)
    ix = ix[rank * batch_size:(rank + 1) * batch_size]  # (B,)
    window = data[ix[:, None] + torch.arange(block_size + 1)]  # (B, T+1)
    x, y = window[:, :-1].contiguous(), window[:, 1:].contiguous()  # (B, T) each
    if device.startswith("cuda"):  # pinned memory makes the copy asynchronous
        return (x.pin_memory().to(device, non_blocking=True),
                y.pin_memory().to(device, non_blocking=True))
    return x.to(device), y.to(device)


class TrainBatches:
    """Training batches from one seeded generator that every DDP process shares.

    Each draw takes world_size * batch_size offsets and a process keeps its own slice, so rank
    r trains on micro-batches r, r+W, r+2W, ... of the stream one process would see: W
    processes accumulating k/W micro-batches reproduce one process accumulating k.
    `state` is the generator state before the batch handed out last. The loop always holds
    that batch unused (it fetches one ahead), so a checkpoint saves `state` and the resumed
    run draws that same batch again: resume is bit-exact.
    """

    def __init__(self, data, block_size, batch_size, seed, device, rank=0, world_size=1):
        self.data, self.block_size, self.batch_size, self.device = (
            data, block_size, batch_size, device)
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator().manual_seed(seed)
        self.state = self.generator.get_state()

    def next(self):
        self.state = self.generator.get_state()
        return get_batch(self.data, self.block_size, self.batch_size, self.generator, self.device,
                         self.rank, self.world_size)


def get_lr(step, learning_rate, min_lr, warmup_iters, lr_decay_iters):
    """Linear warmup for `warmup_iters`, cosine decay to `min_lr` at `lr_decay_iters`, then flat."""
    if step < warmup_iters:
        return learning_rate * (step + 1) / (warmup_iters + 1)
    if step >= lr_decay_iters:
        return min_lr
    ratio = (step - warmup_iters) / max(1, lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


def make_optimizer(model, cfg, device_type):
    """AdamW (Loshchilov & Hutter 2019) with weight decay on the matrices (embeddings, Linear
    weights) only; biases and LayerNorm gains are left alone, as in GPT-2 and nanoGPT."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    # the fused kernel updates every tensor in one launch (CUDA; measured no faster on CPU)
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                             fused=device_type == "cuda")


def layer_grad_norms(model):
    """NEW vs gpt.py: the L2 norm of the gradient of each block ("h.0", "h.1", ...) and of the
    embedding, final norm and head, for --log-grad-norms: a layer whose gradients vanish or
    explode shows up here long before the loss says so."""
    squares = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            parts = name.removeprefix("transformer.").split(".")
            group = ".".join(parts[:2]) if parts[0] == "h" else parts[0]
            squares[group] = squares.get(group, 0.0) + p.grad.float().pow(2).sum().item()
    return {group: round(math.sqrt(s), 6) for group, s in squares.items()}


def sample_logits(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Pick one token per row from (B, V) logits -> (B, 1) ids.

    temperature 0 = argmax (greedy). top_k keeps the k most likely tokens; top_p (nucleus,
    Holtzman et al. 2019, arXiv:1904.09751) keeps the smallest set of most likely tokens
    whose probabilities sum to at least p. Both may be combined (top-k first).
    """
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        v, _ = torch.topk(logits, top_k)  # (B, k), sorted descending
        logits = logits.masked_fill(logits < v[:, [-1]], float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)  # (B, V)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the tokens before it already reach top_p (the first always stays)
        drop = (cum - sorted_logits.softmax(-1)) >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)


def write_samples(model, tokenizer, cfg, device, out_dir):
    """Draw cfg.num_samples continuations of cfg.prompt, print them, save samples.txt.

    Returns the token ids (num_samples, T) and the decoded texts (prompt included)."""
    prompt = tokenizer.encode_ordinary(cfg.prompt)
    if not prompt:
        die("--prompt is empty; give at least one character to continue")
    idx = torch.tensor([prompt] * cfg.num_samples, device=device)  # (num_samples, T0), int64
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    ids = generate(model, idx, cfg.max_new_tokens, cfg.temperature, cfg.top_k or None, cfg.top_p,
                   generator, cfg.kv_cache)
    # NEW vs gpt.py: the padded vocabulary has ids no tokenizer knows (rare once trained)
    texts = [tokenizer.decode([i for i in row.tolist() if i < tokenizer.n_vocab]) for row in ids]
    separator = "\n" + "-" * 40 + "\n"
    print(separator.join(texts))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "samples.txt").write_text(separator.join(texts) + "\n")
    return ids, texts


# ---- Appendix: extra — int8 weight-only quantization and the generation benchmark ----
class Int8Linear(nn.Module):
    """NEW vs gpt.py: an nn.Linear with int8 weights, for inference (--quantize int8).

    Per-output-channel symmetric quantization: row j of W gets the scale s_j = max|W_j| / 127
    and stores q_j = round(W_j / s_j) in [-127, 127], so |W - s q| <= s/2 elementwise (round
    to nearest; nothing is clipped). The matmul runs on q cast to the activations' dtype and
    the scales multiply its output, x (s q)^T = (x q^T) * s column by column: the weights take
    1 byte instead of 4 and are never stored dequantized.
    """

    def __init__(self, linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # (out,)
        self.register_buffer("weight", torch.round(w / scale[:, None]).to(torch.int8))  # (out, in)
        self.register_buffer("scale", scale)

    def forward(self, x):
        # (B, T, in) -> (B, T, out)
        return F.linear(x, self.weight.to(x.dtype)) * self.scale.to(x.dtype)


def quantize_int8(model):
    """Replace every nn.Linear of `model`, in place, by an Int8Linear (embeddings and norms
    stay float; a tied LM head becomes an int8 copy beside the float embedding)."""
    for name, child in model.named_children():
        if isinstance(child, nn.Linear):
            setattr(model, name, Int8Linear(child))
        else:
            quantize_int8(child)
    return model


def model_bytes(model):
    """Bytes of the parameters and saved buffers (a tied matrix once; RoPE tables excluded)."""
    tensors = {t.data_ptr(): t for t in model.state_dict().values()}
    return sum(t.nbytes for t in tensors.values())


def state_dict_bytes(model):
    """Bytes of the model's state_dict as torch.save writes it: a weights-only checkpoint."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


def quantization_report(model, tokenizer, cfg, device, autocast):
    """NEW vs gpt.py: --quantize int8. Bytes, tokens/s and validation loss of the float model,
    then of the same model with int8 weights (quantized in place)."""
    path = resolve_data(cfg.data)
    data = load_tokens(path, path.read_text(encoding="utf-8"), tokenizer)
    prompt = data["val"][None, : model.config.block_size // 2].to(device)  # (1, T0)
    report = {"checkpoint_bytes": (Path(cfg.out_dir) / "ckpt.pt").stat().st_size}
    for kind in ("float", "int8"):
        if kind == "int8":
            quantize_int8(model)
        with autocast:
            dt = timed_generate(model, prompt, cfg.max_new_tokens, cfg, device)
            val = estimate_loss(model, {"val": data["val"]}, cfg.batch_size, cfg.eval_iters,
                                cfg.seed, device, autocast)["val"]
        report.update({f"{kind}_model_bytes": model_bytes(model), f"{kind}_weights_bytes":
                       state_dict_bytes(model),
                       f"{kind}_tokens_per_s": round(cfg.max_new_tokens / dt, 1),
                       f"{kind}_val_loss": round(val, 4)})
        print(f"{kind:5s}: parameters+buffers {model_bytes(model) / 2**20:.2f} MiB | weights file "
              f"{report[f'{kind}_weights_bytes'] / 2**20:.2f} MiB | "
              f"{cfg.max_new_tokens / dt:.1f} tok/s | val loss {val:.4f}")
    report["val_loss_change"] = round(report["int8_val_loss"] - report["float_val_loss"], 4)
    print(f"int8 changes the val loss by {report['val_loss_change']:+.4f}; the training checkpoint "
          f"(weights + AdamW moments) is {report['checkpoint_bytes'] / 2**20:.2f} MiB")
    return report


def timed_generate(model, idx, n, cfg, device, kv_cache=True):
    """Seconds to generate n tokens after idx (1, T0), sampling as the flags say."""
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    synchronize(device)
    t0 = time.perf_counter()
    generate(model, idx, n, cfg.temperature, cfg.top_k or None, cfg.top_p, generator, kv_cache)
    synchronize(device)
    return time.perf_counter() - t0


def bench(model, cfg, device, vocab_size):
    """NEW vs gpt.py: --bench. Tokens/s for --max-new-tokens (512) new tokens with the KV cache,
    without it and with a rolling cache (the model's window and sinks, else block_size/2 + 4
    sinks), the prefill time, memory, then a stream of 10 * block_size tokens through the
    rolling cache with its speed and memory at every tenth; ends with one JSON line of them."""
    config, new_tokens = model.config, cfg.max_new_tokens
    prompt = torch.randint(vocab_size, (1, config.block_size // 2),  # a random prompt: speed only
                           generator=torch.Generator().manual_seed(cfg.seed)).to(device)
    window, sinks = (config.window, config.sinks) if config.window else (config.block_size // 2, 4)
    rolling = Llama(dataclasses.replace(config, window=window, sinks=sinks))
    if isinstance(model.lm_head, Int8Linear):  # --quantize int8
        quantize_int8(rolling)
    rolling.load_state_dict(model.state_dict())  # the same weights, another attention mask
    rolling.to(device).eval()
    print(f"bench: prompt {prompt.size(1)} tokens, {new_tokens} new, batch 1, temperature "
          f"{cfg.temperature}; rolling cache: window {window} + sinks {sinks}")
    result = {}
    for name, m, kv_cache in (("cache", model, True), ("nocache", model, False),
                              ("rolling", rolling, True)):
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats(device)
        dt = timed_generate(m, prompt, new_tokens, cfg, device, kv_cache)
        result[f"tokens_per_s_{name}"] = round(new_tokens / dt, 1)
        result[f"memory_mib_{name}"] = round(memory_mib(device), 1)
        print(f"{name:8s} {new_tokens / dt:9.1f} tok/s | {dt:6.2f} s | "
              f"memory {memory_mib(device):.0f} MiB")
    result["speedup_cache"] = round(
        result["tokens_per_s_cache"] / result["tokens_per_s_nocache"], 2)
    with torch.no_grad():
        cache = KVCache(config, 1)
        synchronize(device)
        t0 = time.perf_counter()
        prefill(model, prompt, cache)
        synchronize(device)
    result["prefill_ms"] = round(1000 * (time.perf_counter() - t0), 2)
    result["kv_cache_bytes"] = cache.nbytes()
    result["rolling_cache_bytes"] = cache.nbytes() * (window + sinks) // cache.capacity
    print(f"KV cache is {result['speedup_cache']}x faster | prefill of {prompt.size(1)} tokens "
          f"{result['prefill_ms']:.1f} ms | cache {cache.nbytes() / 2**10:.0f} KiB, rolling "
          f"{result['rolling_cache_bytes'] / 2**10:.0f} KiB")
    # streaming far past block_size: speed and memory must stay flat
    n = 10 * config.block_size
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    ms, memory, t_last = [], [], time.perf_counter()
    for i, _ in enumerate(stream(rolling, prompt, n, cfg.temperature, cfg.top_k or None, cfg.top_p,
                                 generator)):
        if (i + 1) % (n // 10) == 0:
            synchronize(device)
            ms.append(round(1000 * (time.perf_counter() - t_last) / (n // 10), 3))
            memory.append(round(memory_mib(device), 1))
            t_last = time.perf_counter()
    result.update(stream_tokens=n, stream_ms_per_token=ms, stream_memory_mib=memory)
    print(f"stream of {n} tokens (10 x block_size), rolling cache, per tenth:")
    print(f"  ms/token {ms}\n  memory MiB {memory}")
    print(json.dumps(result))
    return result


def run_bench(cfg, device, dtype):
    """--bench with the checkpoint in --out-dir if there is one, else a fresh model of the
    configured size (speed does not depend on the weights)."""
    path = Path(cfg.out_dir) / "ckpt.pt"
    ckpt = (load_checkpoint(path, ["llama.py"], ("model_args", "tokenizer")) if path.is_file()
            else None)
    tokenizer = tokenizer_from_state(ckpt["tokenizer"]) if ckpt else load_tokenizer(cfg.tokenizer)
    model = build_model(cfg, ckpt, tokenizer.n_vocab)
    print(f"bench: {'checkpoint ' + str(path) if ckpt else 'a freshly initialised model'}, "
          f"{model.num_params() / 1e6:.2f}M parameters, device {device}, dtype {dtype}")
    if cfg.quantize == "int8":
        quantize_int8(model)
    autocast = torch.amp.autocast(device.split(":")[0], dtype=getattr(torch, dtype),
                                  enabled=dtype != "float32")
    with autocast:
        return bench(model.to(device).eval(), cfg, device, tokenizer.n_vocab)


# ---- Appendix: bookkeeping — setup, restore, checkpoint, clock, log, report, --sample-only ----
def prepare(cfg, ckpt, device, world_size, master):
    """Check --gradient-accumulation-steps against the processes, then -> the tokenizer (a resumed
    run keeps the checkpoint's), the --data text as {"train", "val"} tokens, the raw model."""
    if cfg.gradient_accumulation_steps % world_size:
        die(f"--gradient-accumulation-steps {cfg.gradient_accumulation_steps} must be a multiple "
            f"of the {world_size} processes")
    path = resolve_data(cfg.data)
    text = read_text(path)
    tokenizer = tokenizer_from_state(ckpt["tokenizer"]) if ckpt else load_tokenizer(cfg.tokenizer)
    data = load_tokens(path, text, tokenizer)
    model = build_model(cfg, ckpt, tokenizer.n_vocab, "model_last").to(device)  # last step's
    if len(data["val"]) <= model.config.block_size:
        die(f"--data {cfg.data}: only {len(data['val'])} validation tokens, fewer than "
            f"--block-size {model.config.block_size} + 1; use more text or a smaller --block-size")
    if master:
        print(f"data: {len(data['train']):,} train / {len(data['val']):,} val tokens, vocabulary "
              f"{tokenizer.n_vocab}; model: {model.num_params() / 1e6:.2f}M parameters "
              f"({dataclasses.asdict(model.config)})")
    return tokenizer, data, model


def restore(cfg, ckpt, optimizer, scaler, batches, master, device):
    """Load --resume's optimizer, scaler and RNG states -> (start_iter, the kept model)."""
    if ckpt is None:
        return 0, (float("inf"), 0, None)
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        batches.generator.set_state(ckpt["rng"]["data"])
        if master:  # the saved RNG states are rank 0's; other ranks keep their own seeds
            torch.set_rng_state(ckpt["rng"]["torch"])
            if device.startswith("cuda") and ckpt["rng"]["cuda"]:
                torch.cuda.set_rng_state(ckpt["rng"]["cuda"][0], device)
        best = (ckpt["best_val_loss"], ckpt.get("best_iter", ckpt["iter"]), ckpt["model"])
        return ckpt["iter"], best  # an older checkpoint without "best_iter" kept its last step
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        die(f"the checkpoint in {cfg.out_dir} cannot be resumed ({type(e).__name__}: "
            f"{str(e)[:200]})")


def checkpoint_dict(cfg, model, optimizer, scaler, step, best, batches, tokenizer, device):
    """What ckpt.pt holds (docs/design.md section 4): enough to sample and to resume bit-exact."""
    cuda_rng = [torch.cuda.get_rng_state(device)] if device.startswith("cuda") else []
    last = {} if best[1] == step else {"model_last": model.state_dict()}  # what --resume loads
    return {"script": "llama.py", "version": 1, "config": dataclasses.asdict(cfg),
            "model_args": dataclasses.asdict(model.config), "model": best[2], **last,
            "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "iter": step,
            "best_val_loss": best[0], "best_iter": best[1],
            "rng": {"torch": torch.get_rng_state(), "cuda": cuda_rng, "data": batches.state},
            "tokenizer": tokenizer_state(tokenizer)}


def run_clock(t_start, cfg, ddp, device):
    """Seconds since t_start; with DDP and --max-time one clock for all: same last step, same lr."""
    clock = time.perf_counter() - t_start
    if ddp and cfg.max_time > 0:
        shared = torch.tensor(clock, dtype=torch.float64, device=device)
        dist.all_reduce(shared, op=dist.ReduceOp.MAX)
        clock = shared.item()
    return clock


def set_lr(optimizer, step, clock, cfg):
    """The step's learning rate, set on every group. NEW vs gpt.py: under --max-time the cosine
    follows the clock too (whichever is further along), so the learning rate has decayed when
    the budget runs out (Li et al. 2020, "Budgeted training", arXiv:1905.04753)."""
    lr_decay_iters = cfg.lr_decay_iters or cfg.max_iters
    by_clock = cfg.max_time > 0 and step >= cfg.warmup_iters  # warmup always counts steps
    progress = max(step, int(lr_decay_iters * clock / cfg.max_time)) if by_clock else step
    lr = get_lr(progress, cfg.learning_rate, cfg.min_lr, cfg.warmup_iters, lr_decay_iters)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def eval_record(step, losses, best, model, t_start, out_dir):
    """The evaluation's log record, printed, and the kept model; a non-finite loss stops the run."""
    if not all(math.isfinite(v) for v in losses.values()):
        die(f"non-finite eval loss {losses} at iter {step}; the last good checkpoint in "
            f"{out_dir} is kept (try a lower --learning-rate)")
    if best[2] is None or losses["val"] < best[0]:
        best = (losses["val"], step, {k: v.detach().to("cpu", copy=True)
                                      for k, v in model.state_dict().items()})
    print(f"step {step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
    return {"iter": step, "train_loss": losses["train"], "val_loss": losses["val"],
            "best_iter": best[1], "elapsed_s": round(time.perf_counter() - t_start, 3)}, best


def global_loss(step_loss, step, ddp, world_size, out_dir):
    """The loss of the whole global batch, the same number on every rank; stops if not finite."""
    if ddp:
        dist.all_reduce(step_loss)
        step_loss /= world_size
    loss_value = step_loss.item()  # the one host-device sync of a step: timing is true here
    if not math.isfinite(loss_value):
        die(f"loss is {loss_value} at iter {step}; training stopped, the last good "
            f"checkpoint in {out_dir} is kept (try a lower --learning-rate)")
    return loss_value


def log_step(log, cfg, model, step, loss, lr, dt, elapsed, norms, flops, accum):
    """A training step's record in log.jsonl (docs/design.md section 3) and its printed line."""
    tokens_per_iter = cfg.gradient_accumulation_steps * cfg.batch_size * model.config.block_size
    record = {"iter": step, "loss": loss, "lr": lr, "ms_per_iter": round(1000 * dt, 3),
              "tokens_per_s": round(tokens_per_iter / dt, 1), "elapsed_s": round(elapsed, 3)}
    line = (f"iter {step}/{cfg.max_iters} | loss {loss:.4f} | lr {lr:.1e} | "
            f"{1000 * dt:.1f} ms | {tokens_per_iter / dt / 1e3:.1f}k tok/s | "
            f"eta {format_eta(dt * (cfg.max_iters - step - 1))}")
    if norms is not None:
        record["grad_norms"] = norms
    if flops is not None:
        record["mfu"] = model.estimate_mfu(cfg.batch_size * accum, dt, flops)
        line += f" | mfu {100 * record['mfu']:.1f}%"
    log.write(record)
    print(line)


def finish(cfg, model, tokenizer, device, autocast, log, metrics, best, t_start):
    """After training: the kept model's samples.txt and --plot figures, the `done` record."""
    model.load_state_dict(best[2])  # the last checkpoint, already written, has both models
    last = metrics["iter"]
    print(f"kept the last model (iter {last}, val loss {best[0]:.4f})" if best[1] == last else
          f"kept the model of iter {best[1]} (val loss {best[0]:.4f}); ckpt.pt also holds iter "
          f"{last}'s for --resume")
    model.eval()
    with autocast:
        write_samples(model, tokenizer, cfg, device, Path(cfg.out_dir))
    if cfg.plot:
        write_figures(Path(cfg.out_dir), model.config)
    metrics = dict(metrics, best_val_loss=best[0], params=model.num_params(),
                   elapsed_s=round(time.perf_counter() - t_start, 3))
    log.write({"event": "done", **metrics})
    return metrics


def build_model(cfg, ckpt, vocab_size, weights="model"):
    """The raw Llama: freshly initialised, or a checkpoint's `weights` (its "model" if none)."""
    if ckpt is not None:
        try:
            model = Llama(dataclasses.replace(ModelConfig(**ckpt["model_args"]),
                                              dropout=cfg.dropout))
            model.load_state_dict(ckpt.get(weights, ckpt["model"]))
        except (TypeError, KeyError, RuntimeError) as e:  # another version's model_args or weights
            die(f"the checkpoint in {cfg.out_dir} does not fit this llama.py ({type(e).__name__}: "
                f"{str(e)[:200]})")
        return model
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(ModelConfig)
              if f.name not in ("vocab_size", "norm_eps")}
    return Llama(ModelConfig(vocab_size=padded_vocab(vocab_size), **fields))


# what --resume needs from the checkpoint (load_checkpoint names the first one missing)
RESUME_KEYS = ("config", "model_args", "optimizer", "scaler", "iter", "best_val_loss", "rng",
               "tokenizer")


def sample_only(cfg, device, dtype):
    """--sample-only: continue --prompt with the checkpoint in --out-dir (--quantize int8 first
    reports what int8 weights cost and save)."""
    out_dir = Path(cfg.out_dir)
    ckpt = load_checkpoint(out_dir / "ckpt.pt", ["llama.py"], ("model_args", "tokenizer"))
    tokenizer = tokenizer_from_state(ckpt["tokenizer"])
    model = build_model(cfg, ckpt, tokenizer.n_vocab).to(device).eval()
    autocast = torch.amp.autocast(device.split(":")[0], dtype=getattr(torch, dtype),
                                  enabled=dtype != "float32")
    report = (quantization_report(model, tokenizer, cfg, device, autocast)
              if cfg.quantize == "int8" else {})
    with autocast:
        _, texts = write_samples(model, tokenizer, cfg, device, out_dir)
    return {**report, "samples": texts}


# ---- Appendix: flag rules — RULES, CHOICES, check_config ----------------------
# what each flag may be, checked by check_config before anything is written (docs/design.md section
# 6): a predicate and the text the error shows; `lambda v, c:` rules also see the other flags.
# Free text (--data, --tokenizer, --out-dir, --prompt) and --device/--dtype (resolved) aside.
RULES = {
    **dict.fromkeys(("n_layer", "n_head", "block_size", "batch_size", "gradient_accumulation_steps",
                     "eval_interval", "eval_iters", "log_interval", "num_samples",
                     "max_new_tokens"), (lambda v: v >= 1, "an integer >= 1")),
    **dict.fromkeys(("max_iters", "warmup_iters"), (lambda v: v >= 0, "an integer >= 0")),
    **dict.fromkeys(("rope_theta", "learning_rate"), (lambda v: v > 0, "a number > 0")),
    **dict.fromkeys(("beta1", "beta2"), (lambda v: 0 <= v < 1, "a number in [0, 1)")),
    "n_kv_head": (lambda v, c: v >= 0 and c.n_head % (v or c.n_head) == 0,
                  "0 (= --n-head) or a divisor of --n-head {c.n_head}"),
    "n_embd": (lambda v, c: v >= 1 and v % c.n_head == 0,
               "a positive multiple of --n-head {c.n_head}"),
    "dropout": (lambda v: 0 <= v < 1, "a probability in [0, 1)"),
    "pos": (lambda v, c: v != "rope" or (c.n_embd // c.n_head) % 2 == 0,
            "learned or none: rope turns pairs of dimensions, and the head size "
            "--n-embd/--n-head ({c.n_embd}/{c.n_head}) is odd"),
    "window": (lambda v, c: 0 <= v <= c.block_size - c.sinks and not (v and c.pos == "learned"),
               "an integer in 0..--block-size {c.block_size} - --sinks {c.sinks}, and 0 with "
               "--pos learned (a learned position table ends at block_size)"),
    "sinks": (lambda v, c: v >= 0 and (v == 0 or c.window > 0),
              "0, or an integer >= 1 with --window (without a window every position is visible)"),
    "max_time": (lambda v: v >= 0, "a number of seconds >= 0 (0 = no limit)"),
    "min_lr": (lambda v, c: 0 <= v <= c.learning_rate,
               "a number in [0, --learning-rate {c.learning_rate}]"),
    "lr_decay_iters": (lambda v: v >= 0, "an integer >= 0 (0 = --max-iters)"),
    "weight_decay": (lambda v: v >= 0, "a number >= 0"),
    "grad_clip": (lambda v: v >= 0, "a number >= 0 (0 = off)"),
    "temperature": (lambda v: v >= 0, "a number >= 0 (0 = greedy)"),
    "top_k": (lambda v: v >= 0, "an integer >= 1, or 0 (off)"),
    "top_p": (lambda v: 0 < v <= 1, "a number in (0, 1] (1 = off)"),
    "quantize": (lambda v, c: v != "int8" or c.sample_only or c.bench,
                 "none: int8 is for inference, add --sample-only or --bench"),
    "seed": (lambda v: 0 <= v < 2**63, "an integer in 0..2**63-1"),
}
CHOICES = {"norm": ("rmsnorm", "layernorm"), "pos": ("rope", "learned", "none"),
           "mlp": ("swiglu", "gelu"), "quantize": ("none", "int8")}


# -------------------------------------------------------------------------------
# Plumbing (the same in every script; tests/test_copies.py keeps the copies identical)
# -------------------------------------------------------------------------------
def die(msg):
    """A mistake of the user's: one line on stderr, exit 2, no traceback (docs/design.md 6)."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def field_help(cls):
    """Help text of each dataclass field: the trailing `# comment` on its line in the source."""
    helps = {}
    try:
        source = inspect.getsource(cls)
    except OSError:  # no source file (e.g. a class defined in an interactive session)
        return helps
    for line in source.splitlines():
        m = re.match(r"\s+(\w+)\s*:[^#]*#\s*(.*)$", line)
        if m:
            helps[m.group(1)] = m.group(2)
    return helps


def parse_config(cls, argv=None, description=None):
    """Build the CLI from a dataclass (`max_iters` -> `--max-iters`, bools get `--x/--no-x`).

    Returns (config, given): `given` is the set of field names set on the command line, so
    a GPU preset can fill in only the fields the user left alone (see `apply_preset`).
    """
    parser = argparse.ArgumentParser(description=description)
    parser.error = die  # a bad flag is a user mistake: one line, exit status 2
    hints, helps = typing.get_type_hints(cls), field_help(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if typing.get_origin(kind) in (typing.Union, types.UnionType):
            kind = next(a for a in typing.get_args(kind) if a is not type(None))  # Optional[X] -> X
        kw = dict(default=argparse.SUPPRESS, help=f"{helps.get(f.name, '')} (default: {f.default})")
        if kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = kind
        parser.add_argument("--" + f.name.replace("_", "-"), **kw)
    given = vars(parser.parse_args(argv))
    return cls(**given), set(given)


def apply_preset(cfg, preset, given):
    """Overwrite with `preset` (a dict) every field the user did not set on the command line."""
    return dataclasses.replace(cfg, **{k: v for k, v in preset.items() if k not in given})


def resolve_device(name):
    """auto = cuda, else mps, else cpu. Asking for a device that is not there is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if torch.backends.mps.is_available() else "cpu"
    if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", name):
        die(f"--device {name}: expected auto, cpu, cuda, cuda:N or mps")
    if name.startswith("cuda") and not torch.cuda.is_available():
        die(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        die("--device mps: MPS is not available on this machine; use --device cpu")
    return name


def resolve_dtype(name, device):
    """auto = bf16 on CUDA with bf16 support, fp16 (+GradScaler) on older CUDA, fp32 elsewhere."""
    if name == "auto":
        if device.startswith("cuda"):
            return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        return "float32"
    if name not in ("float32", "bfloat16", "float16"):
        die(f"--dtype {name}: expected auto, float32, bfloat16 or float16")
    if name == "float16" and not device.startswith("cuda"):
        die("--dtype float16 needs CUDA (GradScaler); use bfloat16 or float32 on this device")
    return name


def check_config(cfg, rules, choices):
    """Every flag value within its declared range (rules: name -> (predicate, allowed)) or
    among its choices, every float finite, and the cross-field rules; else one error line
    naming the flag, the value and what is allowed. Runs before anything is written.
    A predicate of two arguments, `lambda v, c: ...`, also sees the whole config (a rule
    across fields, e.g. n_embd % n_head), and its text may quote other flags as {c.name}."""
    for f in dataclasses.fields(cfg):
        v, flag = getattr(cfg, f.name), "--" + f.name.replace("_", "-")
        if isinstance(v, float) and not math.isfinite(v):
            die(f"{flag} {v}: expected a finite number")
        if f.name in rules:
            ok, allowed = rules[f.name]
            if not (ok(v, cfg) if ok.__code__.co_argcount == 2 else ok(v)):
                die(f"{flag} {v}: expected {allowed.format(c=cfg)}")
        if f.name in choices and v not in choices[f.name]:
            die(f"{flag} {v}: expected one of {', '.join(choices[f.name])}")
    if getattr(cfg, "min_lr", 0) > getattr(cfg, "learning_rate", math.inf):
        die(f"--min-lr {cfg.min_lr}: expected <= --learning-rate {cfg.learning_rate}")


def synchronize(device):
    """Wait for queued GPU work, so that wall-clock timings are honest."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def memory_mib(device):
    """NEW vs gpt.py: peak CUDA memory allocated since the last reset, or on CPU/MPS the resident
    memory of this process now (Linux /proc; elsewhere getrusage's peak)."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux


DATA_DIR = Path(__file__).resolve().parent / "data"  # downloads land here (gitignored)
DATASETS = {  # name -> (canonical URL, file name in data/, SHA-256)
    "shakespeare": (
        "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        "tinyshakespeare.txt",
        "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
    ),
    "names": (
        "https://raw.githubusercontent.com/karpathy/makemore/master/names.txt",
        "names.txt",
        "0a30b5557f192f32ab962680889aac5f6fda0f4cecf40a6d0b5694f58ea8cc4d",
    ),
}


def sha256_of(path):
    """SHA-256 hex digest of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(url, path, sha256=None, way_out="--data PATH"):
    """Fetch `url` to `path` once: into a temp file, check the SHA-256, then rename.

    An existing `path` is trusted as is. Offline or on a mismatch nothing is left behind and
    the one-line error names the URL, the file expected and the flag that avoids the download.
    """
    path = Path(path)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=30) as r, open(tmp, "wb") as f:
            shutil.copyfileobj(r, f)
    except (urllib.error.URLError, OSError) as e:
        tmp.unlink(missing_ok=True)
        die(f"could not download {url} ({getattr(e, 'reason', e)}); "
            f"put the file at {path} or pass {way_out}")
    digest = sha256_of(tmp)
    if sha256 is not None and digest != sha256:
        tmp.unlink()
        die(f"checksum mismatch for {url}: expected sha256 {sha256}, got {digest}; "
            f"nothing was saved (retry, or pass {way_out})")
    os.replace(tmp, path)
    return path


def resolve_data(name):
    """`--data NAME|PATH`: a dataset of DATASETS (downloaded once into data/) or a local file."""
    if name in DATASETS:
        url, filename, sha256 = DATASETS[name]
        return download(url, DATA_DIR / filename, sha256)
    path = Path(name)
    if not path.is_file():
        die(f"--data {name}: no such file, and not a known dataset ({', '.join(DATASETS)})")
    return path


def read_text(path, flag="--data"):
    """A UTF-8 text file as a str (newlines as open() gives them), or one line naming the file
    and the offset of the first byte that is not UTF-8."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        die(f"{flag} {path}: cannot read it ({e.strerror})")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        die(f"{flag} {path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
            f"convert it first, e.g. iconv -f latin1 -t utf-8")
    return text.replace("\r\n", "\n").replace("\r", "\n")  # universal newlines, as read_text


def check_out_dir(out_dir, resume, overwrite):
    """A fresh run never silently replaces a checkpoint; --resume needs one to exist; --out-dir
    must be (or become) a writable folder. Reads only: nothing is written here.
    resume=None: the script has no --resume, so the message offers only --overwrite."""
    out_dir = Path(out_dir)
    ckpt = out_dir / "ckpt.pt"
    existing = next(p for p in (out_dir.absolute(), *out_dir.absolute().parents) if p.exists())
    if not existing.is_dir():
        die(f"--out-dir {out_dir}: {existing} is a file, not a folder; choose another --out-dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        die(f"--out-dir {out_dir}: {existing} is not writable; choose another --out-dir")
    for own in (ckpt, out_dir / "log.jsonl"):
        if own.exists() and not own.is_file():
            die(f"{own} exists but is not a file; move it away or choose another --out-dir")
    if resume and not ckpt.is_file():
        die(f"--resume: no checkpoint at {ckpt}; start a fresh run without --resume")
    if ckpt.is_file() and not (resume or overwrite):
        choices = "" if resume is None else "--resume to continue that run or "
        die(f"{ckpt} exists: pass {choices}--overwrite to replace it")


def open_log(out_dir, resume_iter=None):
    """Create --out-dir and start its log.jsonl; call it once the config and the inputs are
    known to be good (nothing in --out-dir is touched before). The ckpt.pt.tmp of a run killed
    mid-save goes. A fresh run (resume_iter None) starts an empty log; a resumed one keeps the
    records up to its checkpoint: those of earlier steps and the evaluation at resume_iter,
    not the steps after it (the resumed run logs them again) nor a previous run's events."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "ckpt.pt.tmp").unlink(missing_ok=True)
    path, keep = out_dir / "log.jsonl", []
    if resume_iter is not None and path.is_file():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                r = json.loads(line)
            except ValueError:  # a line cut short by a kill
                continue
            it = r.get("iter") if isinstance(r, dict) else None
            if isinstance(it, int) and "event" not in r and (
                    it < resume_iter or (it == resume_iter and "loss" not in r)):
                keep.append(line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(keep))
    os.replace(tmp, path)
    return path


def checkpoint_sha256(obj, h=None):
    """SHA-256 of a checkpoint's contents: every tensor's dtype, shape and bytes, and every
    other value's repr, walked in order. save_checkpoint stores it, load_checkpoint checks it."""
    top, h = h is None, h or hashlib.sha256()
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"tensor {t.dtype} {tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(obj, dict):
        h.update(b"{")
        for k, v in obj.items():
            h.update(repr(k).encode())
            checkpoint_sha256(v, h)
    elif isinstance(obj, (list, tuple)):
        h.update(b"[")
        for v in obj:
            checkpoint_sha256(v, h)
    else:
        h.update(repr(obj).encode())
    h.update(b";")
    return h.hexdigest() if top else None


def save_checkpoint(ckpt, path):
    """Write atomically: a temp file in the same folder, then os.replace (never half-written).
    The SHA-256 of the contents goes in as "sha256", so a file damaged later is refused."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({**ckpt, "sha256": checkpoint_sha256(ckpt)}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, scripts, keys=()):
    """Load a checkpoint safely (weights_only), check it came from one of `scripts`, holds
    every one of `keys` and still has the SHA-256 it was saved with. (A checkpoint written
    before the checksum existed has no "sha256" and is loaded unchecked.)"""
    path = Path(path)
    if not path.is_file():
        die(f"no checkpoint at {path}; train one first or point --out-dir/--init-from at it")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, random bytes, pickled objects ...
        die(f"cannot read checkpoint {path} (corrupted or truncated?): {type(e).__name__}")
    if not isinstance(ckpt, dict) or "model" not in ckpt or "script" not in ckpt:
        die(f"{path} is not a checkpoint of this project (no 'script'/'model' keys)")
    if ckpt["script"] not in scripts:
        die(f"{path} was written by {ckpt['script']}; this script reads checkpoints of "
            f"{', '.join(scripts)}")
    missing = [k for k in keys if k not in ckpt]
    if missing:
        die(f"{path} has no {missing[0]!r}: not a complete {ckpt['script']} checkpoint")
    saved = ckpt.pop("sha256", None)
    if saved is not None and checkpoint_sha256(ckpt) != saved:
        die(f"{path} is corrupted: its contents no longer match the SHA-256 saved with them "
            f"(restore it from a copy, or train again)")
    return ckpt


def resume_config(cfg, given, ckpt):
    """--resume: the checkpoint's settings for every flag not given on the command line. A
    given flag may change how the run goes on (--max-iters, --learning-rate, ...) but not the
    model's shape, and --max-iters may not end before the checkpoint's iteration."""
    names = {f.name for f in dataclasses.fields(cfg)}
    cfg = apply_preset(cfg, {k: v for k, v in ckpt["config"].items() if k in names}, given)
    for name, saved in ckpt["model_args"].items():
        value = getattr(cfg, name, saved)
        if name in given and name not in ("dropout", "sdpa") and value not in (
                saved, ckpt["config"].get(name)):
            flag = "--" + name.replace("_", "-")
            die(f"{flag} {value}: the checkpoint's model has {flag} {saved}, and a resumed run "
                f"keeps its model (drop the flag, or start a fresh run)")
    if cfg.max_iters < ckpt["iter"]:
        die(f"--max-iters {cfg.max_iters}: the checkpoint is at iter {ckpt['iter']}; pass "
            f"--max-iters {ckpt['iter']} or more to continue it")
    return cfg


def append_jsonl(path, record):
    """Append one record as a line of log.jsonl, strict JSON: a non-finite number (which
    json.dumps would write as NaN or Infinity) becomes null."""
    def finite(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: finite(x) for k, x in v.items()}
        return [finite(x) for x in v] if isinstance(v, (list, tuple)) else v
    with open(path, "a") as f:
        f.write(json.dumps(finite(record), allow_nan=False) + "\n")


def format_eta(seconds):
    """Seconds as a short human duration: 95 -> '1m35s'."""
    seconds = int(max(0, seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class RunLog:
    """log.jsonl (docs/design.md section 3), mirrored to TensorBoard scalars with --tensorboard."""

    def __init__(self, out_dir, resume_iter, tensorboard):
        self.path = open_log(out_dir, resume_iter)  # a fresh log, or the resumed run's so far
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                print("--tensorboard: the tensorboard package is not installed; "
                      "logging to log.jsonl only")
            else:
                self.writer = SummaryWriter(Path(out_dir) / "tensorboard")

    def write(self, record):
        append_jsonl(self.path, record)
        if self.writer is not None:
            for name, value in record.items():
                if name != "iter" and isinstance(value, (int, float)):
                    self.writer.add_scalar(name, value, record["iter"])


# dense bf16 tensor-core peak FLOP/s from NVIDIA's data sheets, matched against the device name
# in this order ("A100" before "A10", "L40S" before "L4")
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "A10": 125e12,
                   "L40S": 362e12, "L4": 121e12}


def peak_flops(device):
    """The GPU's peak bf16 FLOP/s for MFU, or None (CPU, MPS, a GPU not in the table)."""
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def write_figures(out_dir, config=None):
    """--plot: loss.png (from log.jsonl), after --log-grad-norms grad_norms.png, and for a RoPE
    model rope.png: the rotary angles' cosines per frequency pair and position, and how the
    score q . k of one query and one key (both all ones) falls with their distance."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot: matplotlib is not installed; no figures written (pip install matplotlib)")
        return
    records = [json.loads(line)
               for line in (out_dir / "log.jsonl").read_text().splitlines() if line]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["iter"] for r in records if "loss" in r],
            [r["loss"] for r in records if "loss" in r], lw=0.5, alpha=0.5, label="train (batch)")
    evals = [r for r in records if "val_loss" in r]
    for split in ("train", "val"):
        ax.plot([r["iter"] for r in evals], [r[f"{split}_loss"] for r in evals], "o-", ms=3,
                label=f"{split} (eval)")
    ax.set(xlabel="iteration", ylabel="cross-entropy (nats/token)", title="loss")
    ax.legend()
    fig.savefig(out_dir / "loss.png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    norms = [r for r in records if "grad_norms" in r]
    if norms:
        fig, ax = plt.subplots(figsize=(7, 4))
        for group in norms[0]["grad_norms"]:
            ax.plot([r["iter"] for r in norms], [r["grad_norms"][group] for r in norms], lw=0.8,
                    label=group)
        ax.set(xlabel="iteration", ylabel="gradient L2 norm", yscale="log",
               title="gradient norm per layer")
        ax.legend(fontsize=7)
        fig.savefig(out_dir / "grad_norms.png", dpi=120, bbox_inches="tight")
        plt.close(fig)
    if config is not None and config.pos == "rope":
        hs, T = config.n_embd // config.n_head, config.block_size
        cos, sin = rope_cos_sin(torch.arange(T), hs, config.rope_theta)  # (T, hs/2) each
        # q = k = ones: q . rot(m) k summed over the pairs is 2 sum_i cos(m theta_i)
        score = 2 * cos.sum(dim=1) / hs  # (T,), 1 at distance 0
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
        im = axes[0].imshow(cos.T, aspect="auto", cmap="RdBu", vmin=-1, vmax=1)
        axes[0].set(xlabel="position m", ylabel="frequency pair i (fast -> slow)",
                    title=f"cos(m theta_i), theta={config.rope_theta:g}, head size {hs}")
        fig.colorbar(im, ax=axes[0])
        axes[1].plot(score.tolist())
        axes[1].set(xlabel="distance m between query and key", ylabel="q . k / |q||k|",
                    title="RoPE score of equal vectors by distance")
        fig.savefig(out_dir / "rope.png", dpi=110, bbox_inches="tight")
        plt.close(fig)
    print(f"wrote loss.png{' and grad_norms.png' if norms else ''}"
          f"{' and rope.png' if config is not None and config.pos == 'rope' else ''} to {out_dir}")


if __name__ == "__main__":
    main()
