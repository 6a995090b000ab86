"""Mixture of experts (MoE): llama.py with its MLP replaced by many small expert MLPs.

A dense transformer runs every parameter for every token. An MoE layer holds E expert MLPs
and a router that sends each token to only k of them (Shazeer et al. 2017, arXiv:1701.06538;
Switch Transformer, arXiv:2101.03961; Mixtral, arXiv:2401.04088): the parameter count grows
with E while the compute per token stays that of k experts. Here: top-k softmax routing with
renormalised gates and optional router noise; shared experts (DeepSeekMoE, arXiv:2401.06066);
load balancing by the Switch auxiliary loss or DeepSeek-V3's auxiliary-loss-free expert biases
(arXiv:2412.19437), and the router z-loss (ST-MoE, arXiv:2202.08906); a capacity factor with
token dropping; sorted dispatch; hybrid stacks (--dense-layers K, --moe-every N). A second
idea: multi-head latent attention (--attn mla, DeepSeek-V2, arXiv:2405.04434).

Run:
  python moe.py                                   # CPU: 4 layers x 96, 8 experts, top-2, aux-free
  python moe.py --device cuda                     # GPU: llama.py's preset, experts to match
  python moe.py --n-experts 0 --out-dir out/dense # the dense llama.py model, same script
  python moe.py --balance aux --aux-loss-coef 0.01            # Switch-Transformer balancing
  python moe.py --n-experts 16 --experts-per-token 3 --n-shared-experts 1 \
      --expert-hidden 64                          # DeepSeekMoE
  python moe.py --attn mla --kv-cache-report      # KV-cache bytes per token: MHA, GQA, MLA
  python moe.py --bench-layer                     # MoE layer vs dense MLP, forward+backward
  python moe.py --sample-only --prompt "ROMEO:"   # sample from out/moe/ckpt.pt

Result (docs/moe.md): val loss 2.060 with 8 experts top-2 vs dense 2.062, at equal tokens.
Simplifications: experts run one after another (a loop over E, no grouped-GEMM kernel); the
capacity limit applies in training only; MLA's queries are full rank and its up-projections
are not absorbed; llama.py's sliding window, int8 and ablation toggles are left out.
"""
import argparse
import base64
import contextlib
import dataclasses
import hashlib
import inspect
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


# -------------------------------------------------------------------------------
# Config
# -------------------------------------------------------------------------------
@dataclass
class Config:
    data: str = "shakespeare"  # dataset name (shakespeare, names) or path to a text file
    tokenizer: str = "byte"  # byte (UTF-8 bytes + special tokens), gpt2 (tiktoken) or a bpe.py path
    n_layer: int = 4  # transformer blocks
    n_head: int = 4  # query heads per block
    n_kv_head: int = 0  # key/value heads, each shared by n_head/n_kv_head query heads; 0 = n_head
    n_embd: int = 96  # embedding width C
    block_size: int = 64  # context length T in tokens
    dropout: float = 0.0  # dropout probability (attention, residual, embedding)
    tie_weights: bool = False  # share the token embedding with the LM head (gpt.py always does)
    rope_theta: float = 10000.0  # RoPE base: pair i turns by theta^(-2i/hs) radians per position
    # NEW vs llama.py: experts, routing, load balancing, hybrid stacks, latent attention
    n_experts: int = 8  # routed experts E per MoE layer (0 = dense: llama.py's MLP everywhere)
    experts_per_token: int = 2  # k: experts each token is routed to
    n_shared_experts: int = 0  # experts every token uses (DeepSeekMoE), of size --expert-hidden
    expert_hidden: int = 128  # one expert's SwiGLU hidden size (k * 128 = dense MLP's 256 at C=96)
    moe_every: int = 1  # after the dense layers, every N-th block is an MoE block (0 = none)
    dense_layers: int = 0  # the first K blocks keep a dense MLP
    router_noise: float = 0.0  # std of Gaussian noise on router logits in training (exploration)
    routed_scale: float = 2.0  # scales the routed experts' output (k = a dense MLP's scale at init)
    capacity_factor: float = 0.0  # expert slots = factor * N*k/E, overflow dropped (0 = no limit)
    balance: str = "aux-free"  # aux (Switch loss), aux-free (DeepSeek-V3 biases) or none
    aux_loss_coef: float = 0.01  # coefficient of the Switch load-balancing loss (--balance aux)
    z_loss_coef: float = 0.001  # coefficient of the router z-loss (ST-MoE), any --balance (0 = off)
    bias_update_rate: float = 0.01  # gamma: aux-free bias step per update (V3: 0.001, longer runs)
    attn: str = "gqa"  # gqa (llama.py's; MHA when n_kv_head = n_head) or mla (latent attention)
    kv_lora_rank: int = 64  # MLA: size d_c of the cached latent c_kv
    rope_head_dim: int = 16  # MLA: decoupled RoPE dims d_r per head (one cached key for all heads)
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
    out_dir: str = "out/moe"  # checkpoint, log.jsonl, samples.txt and figures go here
    resume: bool = False  # continue the run saved in --out-dir
    overwrite: bool = False  # let a fresh run replace an existing checkpoint in --out-dir
    sample_only: bool = False  # only sample from the checkpoint in --out-dir
    prompt: str = "\n"  # text the samples continue
    num_samples: int = 5  # samples to draw
    max_new_tokens: int = 512  # tokens per sample
    temperature: float = 0.8  # sampling temperature (0 = greedy)
    top_k: int = 200  # sample among the k most likely tokens (0 = off)
    top_p: float = 1.0  # nucleus sampling: smallest set with probability >= p (1 = off)
    kv_cache: bool = True  # generate with the KV cache (--no-kv-cache reruns the whole context)
    bench_layer: bool = False  # time one MoE layer vs the dense MLP of equal active size, and exit
    kv_cache_report: bool = False  # print KV-cache bytes per token of MHA, GQA and MLA, and exit
    device: str = "auto"  # auto, cpu, cuda, cuda:N or mps
    dtype: str = "auto"  # auto, float32, bfloat16 or float16
    compile: bool = False  # torch.compile the model (the GPU preset turns it on)
    seed: int = 1337  # seed for init, batches, dropout, router noise and sampling
    tensorboard: bool = False  # also log to TensorBoard in --out-dir/tensorboard
    plot: bool = False  # write loss.png, expert_load.png; print each expert's bytes (matplotlib)


# llama.py's GPU preset, with experts sized like it: k * expert_hidden = swiglu_hidden(384)
GPU_PRESET = dict(n_layer=6, n_head=6, n_kv_head=2, n_embd=384, block_size=256, batch_size=64,
                  dropout=0.2, max_iters=1500, learning_rate=1e-3, min_lr=1e-4, warmup_iters=100,
                  eval_interval=250, eval_iters=200, log_interval=10, compile=True,
                  expert_hidden=512)


@dataclass
class ModelConfig:
    """The model's shape, saved in the checkpoint as `model_args` (see Config for the meanings)."""
    vocab_size: int  # V (the tokenizer's, padded to a multiple of 64)
    block_size: int  # T
    n_layer: int  # L
    n_head: int  # nh
    n_embd: int  # C
    n_kv_head: int = 0  # nkv (0 = n_head: multi-head attention)
    dropout: float = 0.0  # p
    tie_weights: bool = False  # LM head = token embedding
    rope_theta: float = 10000.0  # RoPE base
    norm_eps: float = 1e-5  # epsilon of RMSNorm
    # NEW vs llama.py
    n_experts: int = 8  # E (0 = dense)
    experts_per_token: int = 2  # k
    n_shared_experts: int = 0  # always-active experts
    expert_hidden: int = 128  # hidden size of one expert
    moe_every: int = 1  # MoE block period after the dense layers
    dense_layers: int = 0  # leading dense blocks
    router_noise: float = 0.0  # std of the router-logit noise in training
    routed_scale: float = 2.0  # scale of the routed experts' output
    capacity_factor: float = 0.0  # 0 = no token dropping
    balance: str = "aux-free"  # aux, aux-free or none
    aux_loss_coef: float = 0.01  # Switch loss coefficient
    z_loss_coef: float = 0.001  # router z-loss coefficient
    attn: str = "gqa"  # gqa or mla
    kv_lora_rank: int = 64  # MLA latent size d_c
    rope_head_dim: int = 16  # MLA rotary size d_r

    def __post_init__(self):
        self.n_kv_head = self.n_kv_head or self.n_head


# -------------------------------------------------------------------------------
# Model: the MoE layer (NEW vs llama.py), then llama.py's block and model around it
# -------------------------------------------------------------------------------
class MLP(nn.Module):
    """Position-wise feed-forward net: SwiGLU (llama.py's). NEW vs llama.py: the hidden size
    is a parameter, so the same class serves as the dense MLP, an expert and the shared experts."""

    def __init__(self, config, hidden):
        super().__init__()
        # c_fc makes the gate and the value in one matmul
        self.c_fc = nn.Linear(config.n_embd, 2 * hidden, bias=False)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        h = self.c_fc(x)  # (..., C) -> (..., 2H)
        # SwiGLU (Shazeer 2020, arXiv:2002.05202, Eq. 6): silu(x W) * (x V), a gated linear unit
        gate, value = h.chunk(2, dim=-1)  # (..., H) each
        return self.dropout(self.c_proj(F.silu(gate) * value))  # (..., H) -> (..., C)


class MoE(nn.Module):
    """E SwiGLU experts and a linear router that sends each token to k of them.

    y = shared(x) + sum over the k chosen experts e of g_e(x) * expert_e(x): the router's
    softmax probabilities of the chosen experts, renormalised to sum to 1 (Mixtral; with
    k = 1 the raw probability, as in the Switch Transformer, arXiv:2101.03961 Sec. 2.1,
    since a renormalised single gate is always 1 and would give the router no gradient).
    Shared experts see every token (DeepSeekMoE, arXiv:2401.06066 Sec. 3.2): they hold what
    all tokens need, so the routed experts are free to specialise.
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.n_experts, self.k = config.n_experts, config.experts_per_token
        # (C, E): a score per expert
        self.router = nn.Linear(config.n_embd, config.n_experts, bias=False)
        self.experts = nn.ModuleList(MLP(config, config.expert_hidden)
                                     for _ in range(config.n_experts))
        # s shared experts of hidden size h are one SwiGLU MLP of hidden size s * h (an MLP is
        # a sum over its hidden units), so they run as a single dense matmul
        self.shared = (MLP(config, config.n_shared_experts * config.expert_hidden)
                       if config.n_shared_experts else None)
        # auxiliary-loss-free balancing (DeepSeek-V3, arXiv:2412.19437 Sec. 2.1.2): a bias per
        # expert that only decides which experts win, moved by a rule (end_step), not by
        # gradients; a buffer, so it is saved in the checkpoint
        self.register_buffer("expert_bias", torch.zeros(config.n_experts))
        # statistics (not saved): routed (token, expert) pairs of the current optimizer step;
        # since the last eval: pairs per expert, summed routing entropy, tokens, dropped pairs
        for name, shape in (("step_load", config.n_experts), ("load", config.n_experts),
                            ("entropy_sum", ()), ("n_tokens", ()), ("n_dropped", ())):
            self.register_buffer(name, torch.zeros(shape), persistent=False)
        # router losses of the last training forward pass (Llama.forward adds them)
        self.aux_loss = None

    def route(self, x):
        """x (N, C) -> chosen experts (N, k), gates (N, k), probabilities (N, E), logits (N, E)."""
        # (N, E); softmax in float32 ("selective precision", Switch Sec. 2.4)
        logits = self.router(x).float()
        scores = logits
        if self.training and self.config.router_noise > 0:
            # exploration: Gaussian noise on the logits lets rarely chosen experts win now and
            # then (noisy top-k gating, Shazeer et al. 2017 Eq. 4, with a fixed noise scale)
            scores = logits + self.config.router_noise * torch.randn_like(logits)
        probs = scores.softmax(dim=-1)  # (N, E)
        # the bias changes which experts are chosen, never how much they weigh (DeepSeek-V3 Eq. 16)
        idx = torch.topk(probs + self.expert_bias, self.k, dim=-1).indices  # (N, k)
        gates = probs.gather(-1, idx)  # (N, k)
        if self.k > 1:
            gates = gates / gates.sum(dim=-1, keepdim=True)
        return idx, gates, probs, logits

    def capacity(self, n_tokens):
        """Slots per expert: capacity_factor times its fair share of the N*k pairs
        (None = no limit)."""
        cf = self.config.capacity_factor
        return math.ceil(cf * n_tokens * self.k / self.n_experts) if cf > 0 else None

    def dispatch(self, x, idx, gates, capacity=None):
        """Sorted dispatch: x (N, C) -> y (N, C),
        y_n = sum over the chosen e of gate * expert_e(x_n).

        The N*k (token, expert) pairs are sorted by expert, so each expert runs once, as dense
        matmuls, on one contiguous slice of gathered tokens; index_add_ sums each token's k
        results. Why a loop over the E experts rather than one batched matmul over experts
        padded to a common length (GShard/Switch's (E, capacity, C) layout): the loop wastes no
        FLOPs on padding when the load is uneven (early training, balancing off), and E Python
        iterations cost little next to the matmuls. Returns y and the number of dropped pairs.
        """
        N, k = idx.shape
        # choice-major order (all first choices, then all second choices): with a stable sort,
        # an overfull expert keeps first choices before second ones, earlier tokens before
        # later ones, and drops the rest (GShard, arXiv:2006.16668, Algorithm 1)
        expert_of_pair = idx.t().reshape(-1)  # (k*N,) pair j is token j % N's (j // N)-th choice
        order = torch.argsort(expert_of_pair, stable=True)  # (k*N,) pairs grouped by expert
        counts = torch.bincount(expert_of_pair, minlength=self.n_experts)  # (E,)
        n_dropped = torch.zeros((), device=x.device)
        if capacity is not None:
            starts = counts.cumsum(0) - counts  # (E,) where each expert's group begins in `order`
            rank = torch.arange(k * N, device=x.device) - starts.repeat_interleave(counts)  # (k*N,)
            order = order[rank < capacity]  # (M,) the first `capacity` pairs of every expert
            n_dropped = (counts - counts.clamp(max=capacity)).sum()
            counts = counts.clamp(max=capacity)
        token = order % N  # (M,) the token of each kept pair
        x_sorted = x[token]  # (M, C): gathered, grouped by expert
        # one host sync for the slice sizes (every variable-size MoE kernel needs them)
        y_sorted = torch.cat([expert(chunk) for expert, chunk
                              in zip(self.experts, x_sorted.split(counts.tolist()))])  # (M, C)
        y_sorted = y_sorted * gates.t().reshape(-1)[order].unsqueeze(1)  # (M, C) * (M, 1)
        return torch.zeros_like(x).index_add_(0, token, y_sorted), n_dropped

    def dispatch_per_token(self, x, idx, gates):
        """What `dispatch` computes, one token and one expert at a time (no capacity limit):
        the slow, obvious reference that tests/test_moe.py compares it against."""
        return torch.stack([sum(gates[n, j] * self.experts[idx[n, j]](x[n]) for j in range(self.k))
                            for n in range(x.size(0))])  # (N, C)

    def forward(self, x):
        B, T, C = x.size()
        x = x.view(B * T, C)  # (N, C): routing is per token
        idx, gates, probs, logits = self.route(x)
        # tokens are dropped in training only: at inference every token gets its k experts,
        # so decoding with a KV cache, one token at a time, computes what a full pass does
        capacity = self.capacity(B * T) if self.training else None
        # the gates sum to 1, so k experts of hidden H/k give about 1/k of the output of a dense
        # MLP of hidden H at initialisation (std sqrt(H)/k vs sqrt(H)): the MLP path learns as
        # if scaled down. DeepSeek-V2/V3 multiply the routed output back up (their
        # routed_scaling_factor); --routed-scale k restores the dense scale, and closed the
        # gap to the dense model at equal tokens in our runs (docs/moe.md)
        y, n_dropped = self.dispatch(x, idx, gates.to(x.dtype) * self.config.routed_scale, capacity)
        if self.shared is not None:
            y = y + self.shared(x)
        if self.training:
            self.aux_loss = self.router_loss(idx, probs, logits)
            with torch.no_grad():
                self.step_load += torch.bincount(idx.flatten(), minlength=self.n_experts)
                self.entropy_sum -= (probs * probs.clamp_min(1e-12).log()).sum()
                self.n_tokens += B * T
                self.n_dropped += n_dropped
        return y.view(B, T, C)

    def router_loss(self, idx, probs, logits):
        """The training-only losses of the router, a scalar: --balance aux adds the Switch
        load-balancing loss, --z-loss-coef the router z-loss."""
        cfg = self.config
        loss = torch.zeros((), device=logits.device)
        if cfg.balance == "aux":
            # Switch Transformer, arXiv:2101.03961 Eq. 4: coef * E * sum_i f_i * P_i, with f_i
            # the fraction of the N*k pairs sent to expert i (a count, no gradient) and P_i the
            # mean router probability of expert i (the gradient's path). Lowest, 1 * coef,
            # when both are uniform (1/E each).
            f = torch.bincount(idx.flatten(), minlength=self.n_experts) / idx.numel()  # (E,)
            P = probs.mean(dim=0)  # (E,)
            loss = loss + cfg.aux_loss_coef * self.n_experts * (f * P).sum()
        if cfg.z_loss_coef > 0:
            # router z-loss, ST-MoE arXiv:2202.08906 Eq. 5: the mean squared log-partition of
            # the logits; keeps them small, so the router's softmax stays well conditioned
            loss = loss + cfg.z_loss_coef * torch.logsumexp(logits, dim=-1).square().mean()
        return loss

    @torch.no_grad()
    def end_step(self, bias_update_rate):
        """After each optimizer step: move the biases toward balance and bank the step's load.

        DeepSeek-V3 (arXiv:2412.19437 Sec. 2.1.2): b_i += gamma * sign(mean load - load_i), so
        an overloaded expert is chosen a little less often from the next step on and an idle
        one a little more. Under DDP the loads of all processes are summed first, so every
        process applies the same update.
        """
        if dist.is_initialized():
            dist.all_reduce(self.step_load)
        self.expert_bias += bias_update_rate * torch.sign(self.step_load.mean() - self.step_load)
        self.load += self.step_load
        self.step_load.zero_()

    @torch.no_grad()
    def pop_stats(self):
        """Routing since the last call: each expert's fraction of the routed pairs, the mean
        routing entropy in nats (ln E = uniform, 0 = one expert per token) and the dropped
        pairs; then reset."""
        stats = {"expert_load": (self.load / self.load.sum().clamp_min(1)).tolist(),
                 "routing_entropy": (self.entropy_sum / self.n_tokens.clamp_min(1)).item(),
                 "dropped_tokens": int(self.n_dropped.item())}
        for buffer in (self.load, self.entropy_sum, self.n_tokens, self.n_dropped):
            buffer.zero_()
        return stats


def is_moe_layer(config, layer_idx):
    """NEW vs llama.py, hybrid stacks: the first dense_layers blocks are dense, then every
    moe_every-th block is MoE (moe_every 2: MoE, dense, MoE, ...; n_experts or moe_every 0:
    none)."""
    i = layer_idx - config.dense_layers
    return config.n_experts > 0 and config.moe_every > 0 and i >= 0 and i % config.moe_every == 0


class Block(nn.Module):
    """Pre-norm transformer block, as in llama.py: the residual stream x is only ever added to."""

    def __init__(self, config, layer_idx):
        super().__init__()
        self.ln_1 = RMSNorm(config.n_embd, config.norm_eps)
        # NEW vs llama.py: --attn mla, and an MoE layer where the stack says so
        attention = MultiHeadLatentAttention if config.attn == "mla" else CausalSelfAttention
        self.attn = attention(config, layer_idx)
        self.ln_2 = RMSNorm(config.n_embd, config.norm_eps)
        moe = is_moe_layer(config, layer_idx)
        self.mlp = MoE(config) if moe else MLP(config, swiglu_hidden(config.n_embd))

    def forward(self, x, pos, rope, cache=None):
        x = x + self.attn(self.ln_1(x), pos, rope, cache)  # tokens exchange information
        x = x + self.mlp(self.ln_2(x))  # each token thinks on its own (with k of E experts)
        return x


class Llama(nn.Module):
    """Token embedding -> n_layer Blocks (RoPE inside attention) -> RMSNorm -> logits.

    llama.py's model; NEW vs llama.py: MoE blocks, whose router losses join the training
    loss, and MLA's decoupled RoPE size."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=RMSNorm(config.n_embd, config.norm_eps),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            # tying is optional (Llama unties: input and output embeddings can then
            # specialise); tied, one (V, C) parameter is counted once
            self.transformer.wte.weight = self.lm_head.weight
        # the RoPE angles of the trained positions, buffers (neither trained nor saved);
        # NEW vs llama.py: MLA rotates only its d_r decoupled dimensions
        rope_dim = config.rope_head_dim if config.attn == "mla" else config.n_embd // config.n_head
        cos, sin = rope_cos_sin(torch.arange(config.block_size), rope_dim, config.rope_theta)
        self.register_buffer("cos", cos, persistent=False)  # (block_size, rope_dim/2)
        self.register_buffer("sin", sin, persistent=False)
        # initialisation, GPT-2 style as in gpt.py: every weight N(0, 0.02); the projections that
        # write into the residual stream get std 0.02/sqrt(2L) (Radford et al. 2019, §2.3), so
        # the variance of the stream, a sum of 2L such writes, does not grow with depth (an
        # expert's c_proj too: its output is one of those writes, scaled by a gate <= 1)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def num_params(self, active=False):
        """Parameter count (RoPE has none). NEW vs llama.py: active=True counts only what one
        token uses: k of the E routed experts of each MoE layer."""
        n = sum(p.numel() for p in self.parameters())
        if active:
            for moe in self.moe_layers():
                n -= (moe.n_experts - moe.k) * sum(p.numel() for p in moe.experts[0].parameters())
        return n

    def moe_layers(self):
        """NEW vs llama.py: the MoE layers, first to last."""
        return [block.mlp for block in self.transformer.h if isinstance(block.mlp, MoE)]

    def end_step(self, bias_update_rate):
        """NEW vs llama.py: call after every optimizer step (MoE.end_step); rate 0 leaves the
        biases at 0 (--balance aux or none)."""
        for moe in self.moe_layers():
            moe.end_step(bias_update_rate)

    def forward(self, idx, targets=None, cache=None):
        """idx (B, T) token ids -> logits (B, T, V) for every position, and the mean
        cross-entropy against targets (B, T) when given (else None); in training mode plus
        the routers' losses (NEW vs llama.py). Targets equal to IGNORE_INDEX add no loss.
        With a KVCache, idx holds only the new tokens, which join the cache."""
        cfg = self.config
        B, T = idx.size()
        start = 0 if cache is None else cache.seen
        if start + T > cfg.block_size:
            raise ValueError(f"{start + T} positions > block_size {cfg.block_size}: "
                             f"crop the context")
        pos = torch.arange(start, start + T, device=idx.device)  # (T,) positions in the text
        if cache is not None:
            cache.advance(pos)
        x = self.transformer.drop(self.transformer.wte(idx))  # (B, T, C)
        # (T, 1, rope_dim/2) each
        rope = (self.cos[start:start + T, None], self.sin[start:start + T, None])
        for block in self.transformer.h:
            x = block(x, pos, rope, cache)
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, C) @ (C, V) -> (B, T, V)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.view(B * T, -1), targets.reshape(B * T),
                               ignore_index=IGNORE_INDEX)
        if self.training:  # NEW vs llama.py: evaluation (val_loss) stays pure cross-entropy
            loss = loss + sum(moe.aux_loss for moe in self.moe_layers())
        return logits, loss

    def estimate_mfu(self, fwdbwd_per_iter, dt, peak_flops):
        """Model FLOPs utilisation: achieved FLOP/s over the hardware peak. A token costs
        6N FLOPs (forward + backward through N parameters; NEW vs llama.py: the active ones)
        plus 12·L·nh·hs·T for attention (PaLM, Chowdhery et al. 2022, Appendix B)."""
        L, nh, T = self.config.n_layer, self.config.n_head, self.config.block_size
        hs = self.config.n_embd // nh
        flops_per_token = 6 * self.num_params(active=True) + 12 * L * nh * hs * T
        return flops_per_token * T * fwdbwd_per_iter / dt / peak_flops


# -------------------------------------------------------------------------------
# Training, evaluation (routing statistics, the tokens each expert prefers) and main
# -------------------------------------------------------------------------------
def train(cfg, ckpt, device, dtype, rank, world_size):
    """llama.py's loop (gpt.py's, nanoGPT's train.py) -> the final metrics (rank 0). NEW vs
    llama.py: the aux-free bias update after each step, routing statistics in the eval records."""
    master, ddp, device_type = rank == 0, world_size > 1, device.split(":")[0]
    torch.manual_seed(cfg.seed + rank)  # per-rank offset: each process draws its own dropout masks
    # raw_model is saved, evaluated and sampled; `model` (compiled, DDP-wrapped) is trained
    tokenizer, data, raw_model, model = build(cfg, ckpt, device, master, world_size)
    accum = cfg.gradient_accumulation_steps // world_size  # micro-batches per step and process
    optimizer = make_optimizer(raw_model, cfg, device_type)
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == "float16")  # loss scaling for fp16
    autocast = torch.amp.autocast(device_type, dtype=getattr(torch, dtype),
                                  enabled=dtype != "float32")
    batches = TrainBatches(data["train"], raw_model.config.block_size, cfg.batch_size, cfg.seed,
                           device, rank, world_size)
    # best = (val loss, iter, CPU weights) of the kept model: the best evaluation's so far
    start_iter, best = restore(cfg, ckpt, optimizer, scaler, batches, master, device)
    if master:  # the first write to --out-dir: every check has passed
        log = RunLog(cfg.out_dir, None if ckpt is None else start_iter, cfg.tensorboard)
    tokens_per_iter = cfg.gradient_accumulation_steps * cfg.batch_size * raw_model.config.block_size
    bias_update_rate = cfg.bias_update_rate if cfg.balance == "aux-free" else 0.0  # NEW vs llama.py
    flops, metrics = peak_flops(device), {}
    X, Y = batches.next()  # the first batch; from here on the next one is fetched before backward
    t_start = t_last = time.perf_counter()
    last_timed = start_iter  # ms/iter averages over the steps since this one (evals excluded)
    eval_seconds = 0.0  # NEW vs llama.py: for the training throughput of the final metrics
    for step in range(start_iter, cfg.max_iters + 1):
        # --max-time ends the run like the last step (final eval, checkpoint)
        out_of_time, lr = budget(step, t_start, cfg, device, ddp)
        last_step = step == cfg.max_iters or out_of_time
        # evaluate and checkpoint (a resumed run has just loaded the state of step start_iter)
        resumed_here = ckpt is not None and step == start_iter
        if master and (last_step or (step % cfg.eval_interval == 0 and not resumed_here)):
            t_eval = time.perf_counter()
            metrics, best = eval_record(raw_model, data, cfg, device, autocast, step, t_start,
                                        tokens_per_iter, best)
            log.write(metrics)
            save_checkpoint(checkpoint(cfg, raw_model, optimizer, scaler, step, best,
                                       batches, tokenizer, device), Path(cfg.out_dir) / "ckpt.pt")
            t_last, last_timed = time.perf_counter(), step
            eval_seconds += t_last - t_eval
        if last_step:
            break

        # one optimizer step over `accum` micro-batches per process
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_loss = torch.zeros((), device=device)
        for micro_step in range(accum):
            # DDP all-reduces gradients during backward; only the last micro-step needs that
            sync = model.no_sync() if ddp and micro_step < accum - 1 else contextlib.nullcontext()
            with sync:
                with autocast:
                    _, loss = model(X, Y)  # NEW vs llama.py: cross-entropy + router losses
                    loss = loss / accum  # gradients add up over micro-steps: this makes them a mean
                X, Y = batches.next()  # fetched while the device still works on the forward pass
                scaler.scale(loss).backward()
            step_loss += loss.detach()
        if cfg.grad_clip > 0:
            scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
            torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        raw_model.end_step(bias_update_rate)  # NEW vs llama.py: aux-free balancing, load statistics

        if step % cfg.log_interval == 0:
            loss_value = global_loss(step_loss, cfg, step, ddp, world_size)
            now = time.perf_counter()
            dt = (now - t_last) / (step + 1 - last_timed)
            t_last, last_timed = now, step + 1
            if master:
                log_step(log, raw_model, cfg, step, loss_value, lr, dt, now - t_start,
                         tokens_per_iter, accum, flops)
    if master:
        metrics = report(raw_model, tokenizer, data, cfg, device, autocast, log, metrics, best,
                         time.perf_counter() - t_start, eval_seconds,
                         (step - start_iter) * tokens_per_iter)
    return metrics


def routing_stats(model):
    """The routing fields of an eval record: per MoE layer each expert's fraction of the
    routed pairs and the mean routing entropy since the last eval, the dropped pairs of all
    layers, and the worst layer's max/mean expert load (1 = perfect balance, E/k = collapse
    onto k experts). Empty for a dense model or when no step ran since the last eval."""
    layers = model.moe_layers()
    if not layers or layers[0].n_tokens.item() == 0:
        return {}
    stats = [moe.pop_stats() for moe in layers]
    loads = [s["expert_load"] for s in stats]
    return {"expert_load": [[round(f, 5) for f in load] for load in loads],
            "routing_entropy": [round(s["routing_entropy"], 5) for s in stats],
            "dropped_tokens": sum(s["dropped_tokens"] for s in stats),
            "max_load_ratio": round(max(max(load) * len(load) for load in loads), 4)}


@torch.no_grad()
def expert_preferences(model, idx, tokenizer, top=8, min_count=20):
    """The tokens each expert prefers: for every MoE layer and expert, the `top` tokens of idx
    (B, T) (each seen at least min_count times) that pick that expert first most often,
    relative to how often the token occurs. Returns [layer][expert] -> list of strings."""
    first_choice = {}
    # route each MoE layer's input again, only to read the choice
    hooks = [moe.register_forward_pre_hook(
        lambda m, args, i=i: first_choice.__setitem__(i, m.route(args[0].flatten(0, 1))[0][:, 0]))
        for i, moe in enumerate(model.moe_layers())]
    model.eval()
    model(idx)
    for hook in hooks:
        hook.remove()
    tokens, V = idx.flatten(), model.config.vocab_size
    token_count = torch.bincount(tokens, minlength=V).float()  # (V,)
    prefs = []
    for i, moe in enumerate(model.moe_layers()):
        counts = torch.zeros(moe.n_experts, V, device=idx.device)
        ones = torch.ones(len(tokens), device=idx.device)
        counts.index_put_((first_choice[i], tokens), ones, accumulate=True)  # (E, V) first choices
        share = counts / token_count.clamp_min(1)  # (E, V): how often a token picks e first
        share = share.masked_fill(token_count < min_count, -1)  # too rare to rank
        prefs.append([[tokenizer.decode([t]).replace("\n", "\\n").replace(" ", "_")
                       for t in share[e].topk(top).indices.tolist() if share[e, t] > 0]
                      for e in range(moe.n_experts)])
    return prefs


def main(argv=None):
    cfg, given = parse_config(Config, argv, __doc__.splitlines()[0])
    ckpt = None
    if cfg.resume and not cfg.sample_only:
        check_out_dir(cfg.out_dir, cfg.resume, cfg.overwrite)
        ckpt = load_checkpoint(Path(cfg.out_dir) / "ckpt.pt", ["moe.py"], RESUME_KEYS)
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
    if cfg.kv_cache_report:  # NEW vs llama.py: the two measurements that need no data
        return kv_cache_report(model_config(cfg, ByteTokenizer().n_vocab), dtype)
    if cfg.bench_layer:
        autocast = torch.amp.autocast(device.split(":")[0], dtype=getattr(torch, dtype),
                                      enabled=dtype != "float32")
        return bench_layer(model_config(cfg, ByteTokenizer().n_vocab),
                           cfg.batch_size * cfg.block_size, device, autocast)
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
# ---- Appendix: from llama.py — model parts, data, optimizer, sampling (no sliding window) ----
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


def rope_cos_sin(pos, hs, theta):
    """cos and sin of the rotary angles pos * theta^(-2i/hs), i < hs/2 -> two (T, hs/2) tensors.

    Pair i turns by theta^(-2i/hs) radians per position: from one radian per token (i = 0) to
    a full turn every ~60k tokens (theta = 10^4), so both near and far offsets stay distinct.
    Computed in float64: 10^4 tokens into a stream float32 angles would be off by ~1e-3 rad.
    """
    inv_freq = theta ** (-torch.arange(0, hs, 2, dtype=torch.float64, device=pos.device)
                         / hs)  # (hs/2,)
    angles = pos.double()[:, None] * inv_freq[None, :]  # (T, 1) * (1, hs/2) -> (T, hs/2)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x, cos, sin):
    """NEW vs gpt.py: rotary position embedding (RoFormer, Su et al. 2021, arXiv:2104.09864).

    Each pair (x_i, x_{i+hs/2}) of a query or key x (..., hs) at position m is turned by the
    angle m*w_i (cos, sin: (T, hs/2), or (T, 1, hs/2) for x in (B, T, heads, hs) layout).
    Relative position falls out of the dot product: with R(a) the rotation by a,
    q_m . k_n = (R(mw) q)^T (R(nw) k) = q^T R(mw)^T R(nw) k = q^T R((n-m)w) k,
    because rotations compose and R(a)^T = R(-a). An attention score depends
    only on the offset n - m (Eq. 16 of the paper), never on where the pair sits in the text,
    and rotations keep norms. Which dimensions pair up is a convention (halves here, like
    GPT-NeoX and Hugging Face's Llama; Meta's code interleaves): Wq and Wk absorb it.
    """
    x1, x2 = x.chunk(2, dim=-1)  # (..., hs/2) each
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).type_as(x)


def attention_mask(qpos, kpos):
    """(Tq, Tk) bool, True where a query at position qpos may see a key at kpos: causal;
    kpos = -1 marks an empty cache slot."""
    qpos, kpos = qpos[:, None], kpos[None, :]  # (Tq, 1), (1, Tk)
    return (kpos <= qpos) & (kpos >= 0)


class KVCache:
    """The keys and values of every layer, preallocated, for generation.

    Each generated token then costs one forward pass of one token, instead of a pass over the
    whole context. Slot = position; the cache holds block_size positions. `pos` (the position
    in each slot) feeds the masks. NEW vs llama.py: with --attn mla a layer stores its latent
    c_kv (d_c numbers) in the `k` slots and its one shared RoPE key (d_r numbers) in the `v`
    slots, as a single "head" (see MultiHeadLatentAttention).
    """

    def __init__(self, config, batch_size):
        self.capacity = config.block_size
        if config.attn == "mla":  # (L, B, 1, slots, d_c) and (L, B, 1, slots, d_r)
            self.k_shape = (config.n_layer, batch_size, 1, self.capacity, config.kv_lora_rank)
            self.v_shape = (config.n_layer, batch_size, 1, self.capacity, config.rope_head_dim)
        else:  # (L, B, nkv, slots, hs) each
            self.k_shape = self.v_shape = (config.n_layer, batch_size, config.n_kv_head,
                                           self.capacity, config.n_embd // config.n_head)
        self.k = self.v = None  # allocated at the first write, in the keys' dtype and device
        self.pos = None  # (slots,) position held by each slot, -1 = empty
        self.seen = 0  # positions written so far = the position of the next token
        self.slots = None  # the slots of the tokens of the current forward pass

    @property
    def full(self):
        return self.seen == self.capacity

    def advance(self, pos):
        """Give slots to the new positions pos (T,); called once per forward pass."""
        if self.pos is None:
            self.pos = torch.full((self.capacity,), -1, dtype=torch.long, device=pos.device)
        if self.seen + pos.numel() > self.capacity:
            raise ValueError(f"{pos.numel()} new tokens do not fit the cache ({self.seen} of "
                             f"{self.capacity} slots used)")
        self.slots = pos
        self.pos.index_copy_(0, self.slots, pos)
        self.seen += pos.numel()

    def update(self, layer, k, v):
        """Store a layer's new keys and values (B, nkv, T, hs) -> that layer's filled slots
        (B, nkv, n, hs) twice and the positions they hold (n,)."""
        if self.k is None:
            self.k = torch.zeros(self.k_shape, dtype=k.dtype, device=k.device)
            self.v = torch.zeros(self.v_shape, dtype=v.dtype, device=v.device)
        self.k[layer].index_copy_(2, self.slots, k)
        self.v[layer].index_copy_(2, self.slots, v)
        n = self.seen
        return self.k[layer, :, :, :n], self.v[layer, :, :, :n], self.pos[:n]

    def nbytes(self):
        return 0 if self.k is None else self.k.nbytes + self.v.nbytes


class CausalSelfAttention(nn.Module):
    """Causal self-attention with grouped-query heads and rotary positions (llama.py's).

    Grouped-query attention (Ainslie et al. 2023, arXiv:2305.13245): only n_kv_head key/value
    heads, each shared by a group of n_head/n_kv_head query heads, so the KV cache shrinks by
    that factor; n_kv_head = n_head is multi-head attention.
    """

    def __init__(self, config, layer_idx):
        super().__init__()
        self.hs = config.n_embd // config.n_head
        kv_dim = config.n_kv_head * self.hs
        # Q, K, V at once: C query columns, then kv_dim key and kv_dim value columns; no biases
        self.c_attn = nn.Linear(config.n_embd, config.n_embd + 2 * kv_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.dropout = config.dropout
        self.layer_idx = layer_idx  # which layer of a KVCache is this one's

    def forward(self, x, pos, rope, cache=None):
        """x (B, T, C) at positions pos (T,), rope = (cos, sin) at those positions; with a
        cache, the keys and values of earlier positions come from there."""
        B, T, C = x.size()
        nh, nkv = self.n_head, self.n_kv_head
        qkv = self.c_attn(x)  # (B, T, C + 2 kv_dim): nh query heads, nkv key heads, nkv value heads
        qk = qkv[..., :(nh + nkv) * self.hs].view(B, T, nh + nkv, self.hs)  # (B, T, nh+nkv, hs)
        # (B, nkv, T, hs)
        v = qkv[..., (nh + nkv) * self.hs:].view(B, T, nkv, self.hs).transpose(1, 2)
        qk = apply_rope(qk, *rope)  # queries and keys turned in one go; cos, sin: (T, 1, hs/2)
        q, k = qk.transpose(1, 2).split([nh, nkv], dim=1)  # (B, nh, T, hs), (B, nkv, T, hs)
        kpos = pos
        if cache is not None:
            k, v, kpos = cache.update(self.layer_idx, k, v)  # (B, nkv, Tk, hs) x2, (Tk,)
        dropout_p = self.dropout if self.training else 0.0
        if T == 1 or k.size(2) == T:
            # plain causal attention in one fused kernel (one new token sees every cached key);
            # enable_gqa lets each group of n_head/n_kv_head query heads read its shared
            # key/value head without copies
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=T > 1,
                                               enable_gqa=True)  # (B, nh, T, hs)
        else:  # T new queries after Tk - T cached positions: explicit mask
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask(pos, kpos),
                                               dropout_p=dropout_p,
                                               enable_gqa=True)  # (B, nh, T, hs)
        # (B, T, nh, hs) -> (B, T, C): heads side by side
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


def swiglu_hidden(n_embd):
    """SwiGLU has three matrices where gpt.py's MLP has two: a hidden size of 2/3 * 4C keeps
    the parameter count (3 * C * 8C/3 = 2 * C * 4C), rounded to a multiple of 32 for speed."""
    return 32 * round(2 * 4 * n_embd / 3 / 32)


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
            # one temp file per DDP rank
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
        self.data, self.block_size = data, block_size
        self.batch_size, self.device = batch_size, device
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


def prefill(model, idx, cache):
    """Run a prompt idx (B, T) into the cache -> logits (B, V) of its last token."""
    logits, _ = model(idx, cache=cache)
    return logits[:, -1, :]


@torch.no_grad()
def stream(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, generator=None,
           kv_cache=True):
    """Yield the next token ids (B, 1) after idx (B, T0), one step at a time.

    With kv_cache the prompt is prefilled into a KVCache and every step feeds one token; a
    cache that fills up restarts from the last block_size/2 tokens (one prefill per
    block_size/2 new tokens). Without the cache every step reruns the context, cropped to
    block_size.
    """
    cfg = model.config
    cache = None
    for _ in range(max_new_tokens):
        if not kv_cache:
            logits = model(idx[:, -cfg.block_size:])[0][:, -1, :]
        elif cache is None or cache.full:
            keep = cfg.block_size if cache is None else cfg.block_size // 2
            cache = KVCache(cfg, idx.size(0))
            logits = prefill(model, idx[:, -keep:], cache)
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


def write_samples(model, tokenizer, cfg, device, out_dir):
    """Draw cfg.num_samples continuations of cfg.prompt, print them, save samples.txt.

    Returns the token ids (num_samples, T) and the decoded texts (prompt included)."""
    prompt = tokenizer.encode_ordinary(cfg.prompt)
    if not prompt:
        die("--prompt is empty; give at least one character to continue")
    # (num_samples, T0)
    idx = torch.tensor([prompt] * cfg.num_samples, dtype=torch.long, device=device)
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


# ---- Appendix: extra — multi-head latent attention (MLA), KV-cache bytes, layer benchmark ----
class MultiHeadLatentAttention(nn.Module):
    """Multi-head latent attention, MLA (DeepSeek-V2, arXiv:2405.04434, Sec. 2.1).

    Keys and values are rebuilt from one small latent per token, c_kv = W^DKV x (d_c =
    kv_lora_rank numbers, Eq. 9), by up-projections k = W^UK c_kv, v = W^UV c_kv (Eq. 10-11),
    so the KV cache holds c_kv instead of 2 * n_kv_head * hs numbers. RoPE cannot pass
    through that path: a position-dependent rotation between W^UK and the query would stop
    W^UK from being absorbed into W^Q at inference. So d_r = rope_head_dim extra
    dimensions carry the positions: a rotary query part per head and ONE rotary key shared by
    all heads, k^R = RoPE(W^KR x) (Sec. 2.1.3, Eq. 14-19), cached beside c_kv. Cache per token
    and layer: d_c + d_r numbers (kv_cache_bytes_per_token).
    Simplifications: queries are full rank (V2 also compresses them, to save activation
    memory in training), and the cache is expanded by W^UK, W^UV at every step instead of
    absorbing them into the query and output projections (the same function, more FLOPs).
    """

    def __init__(self, config, layer_idx):
        super().__init__()
        C, nh = config.n_embd, config.n_head
        self.n_head, self.hs = nh, C // nh
        self.d_c, self.d_r = config.kv_lora_rank, config.rope_head_dim
        # W^Q and W^QR: a content part and a rotary part per head
        self.c_q = nn.Linear(C, nh * (self.hs + self.d_r), bias=False)
        # W^DKV (Eq. 9) and W^KR (Eq. 15) in one matmul: the latent and the shared rotary key
        self.kv_down = nn.Linear(C, self.d_c + self.d_r, bias=False)
        # on the latent, as DeepSeek-V2's released code does
        self.kv_norm = RMSNorm(self.d_c, config.norm_eps)
        self.kv_up = nn.Linear(self.d_c, 2 * C, bias=False)  # W^UK and W^UV (Eq. 10-11)
        self.c_proj = nn.Linear(C, C, bias=False)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.dropout = config.dropout
        self.layer_idx = layer_idx

    def forward(self, x, pos, rope, cache=None):
        B, T, C = x.size()
        nh, hs, d_r = self.n_head, self.hs, self.d_r
        q = self.c_q(x).view(B, T, nh, hs + d_r)  # (B, T, nh, hs + d_r)
        q_content, q_rot = q.split([hs, d_r], dim=-1)  # (B, T, nh, hs), (B, T, nh, d_r)
        # (B, nh, T, hs + d_r)
        q = torch.cat((q_content, apply_rope(q_rot, *rope)), dim=-1).transpose(1, 2)
        c_kv, k_rot = self.kv_down(x).split([self.d_c, d_r], dim=-1)  # (B, T, d_c), (B, T, d_r)
        c_kv = self.kv_norm(c_kv).unsqueeze(1)  # (B, 1, T, d_c): one latent for all heads
        # (B, 1, T, d_r): one key for all heads
        k_rot = apply_rope(k_rot.unsqueeze(2), *rope).transpose(1, 2)
        kpos = pos
        # the cache stores only c_kv and k_rot: (B, 1, Tk, d_c), (B, 1, Tk, d_r)
        if cache is not None:
            c_kv, k_rot, kpos = cache.update(self.layer_idx, c_kv, k_rot)
        Tk = c_kv.size(2)
        # (B, 1, Tk, d_c) -> (B, nh, Tk, 2hs)
        kv = self.kv_up(c_kv).view(B, Tk, nh, 2 * hs).transpose(1, 2)
        k_content, v = kv.split(hs, dim=-1)  # (B, nh, Tk, hs) each
        k = torch.cat((k_content, k_rot.expand(B, nh, Tk, d_r)), dim=-1)  # (B, nh, Tk, hs + d_r)
        dropout_p = self.dropout if self.training else 0.0
        # softmax scale 1/sqrt(hs + d_r), the full query-key size (as in V2's code)
        if T == 1 or Tk == T:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=T > 1)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask(pos, kpos),
                                               dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, nh, T, hs) -> (B, T, C)
        return self.resid_dropout(self.c_proj(y))


def kv_cache_bytes_per_token(config, attn, bytes_per_number):
    """NEW vs llama.py: KV-cache bytes one token costs, all layers: MHA caches a key and a
    value per head (2 * nh * hs numbers per layer), GQA per key/value head (2 * nkv * hs), MLA
    its latent and shared rotary key (d_c + d_r)."""
    hs = config.n_embd // config.n_head
    per_layer = {"mha": 2 * config.n_head * hs, "gqa": 2 * config.n_kv_head * hs,
                 "mla": config.kv_lora_rank + config.rope_head_dim}[attn]
    return config.n_layer * per_layer * bytes_per_number


def kv_cache_report(mcfg, dtype):
    """--kv-cache-report: the KV-cache bytes per token of MHA, GQA (this n_kv_head) and MLA at
    this model's size and dtype (kv_cache_bytes_per_token)."""
    nbytes = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    report = {attn: kv_cache_bytes_per_token(mcfg, attn, nbytes) for attn in ("mha", "gqa", "mla")}
    print(f"KV cache per token, {mcfg.n_layer} layers, {dtype}: MHA {report['mha']} B | GQA "
          f"(n_kv_head {mcfg.n_kv_head}) {report['gqa']} B | MLA (d_c {mcfg.kv_lora_rank} + d_r "
          f"{mcfg.rope_head_dim}) {report['mla']} B = {report['mla'] / report['mha']:.1%} of MHA")
    return report


def bench_layer(mcfg, n_tokens, device, autocast, rounds=5, iters=5):
    """--bench-layer: forward+backward time of one MoE layer (training mode, router losses
    included) and of a dense SwiGLU MLP with the same active parameters per token, hidden
    (k + shared) * expert_hidden, on n_tokens random tokens. Rounds alternate the two, so both
    see the same machine load; the median round counts."""
    moe = MoE(mcfg).to(device)
    dense = MLP(mcfg, (mcfg.experts_per_token + mcfg.n_shared_experts)
                * mcfg.expert_hidden).to(device)
    x = torch.randn(1, n_tokens, mcfg.n_embd, device=device)

    def seconds(layer):
        synchronize(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            with autocast:
                loss = layer(x).float().square().mean()
                if layer is moe:
                    loss = loss + moe.aux_loss
            loss.backward()
        synchronize(device)
        return (time.perf_counter() - t0) / iters

    seconds(moe), seconds(dense)  # warm-up
    times = {"moe": [], "dense": []}
    for _ in range(rounds):
        for name, layer in (("moe", moe), ("dense", dense)):
            times[name].append(seconds(layer))
    ms = {name: 1000 * sorted(t)[len(t) // 2] for name, t in times.items()}
    result = {"tokens": n_tokens, "moe_ms": round(ms["moe"], 3), "dense_ms": round(ms["dense"], 3),
              "moe_tokens_per_s": round(1000 * n_tokens / ms["moe"], 1),
              "dense_tokens_per_s": round(1000 * n_tokens / ms["dense"], 1),
              "throughput_ratio": round(ms["dense"] / ms["moe"], 3)}
    print(f"forward+backward of {n_tokens} tokens: MoE layer (E={mcfg.n_experts}, "
          f"k={mcfg.experts_per_token}, shared={mcfg.n_shared_experts}, expert hidden "
          f"{mcfg.expert_hidden}) {ms['moe']:.2f} ms | dense MLP (hidden "
          f"{dense.c_proj.in_features}, same active parameters) {ms['dense']:.2f} ms | MoE/dense "
          f"throughput {result['throughput_ratio']:.2f}x")
    print(json.dumps(result))
    return result


# ---- Appendix: bookkeeping — build, restore, time budget, checkpoint, log records, report ----
def model_config(cfg, vocab_size):
    """The ModelConfig of the flags (the vocabulary padded as in build_model)."""
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(ModelConfig)
              if f.name not in ("vocab_size", "norm_eps")}
    return ModelConfig(vocab_size=padded_vocab(vocab_size), **fields)


# what --resume needs from the checkpoint (load_checkpoint names the first one missing)
RESUME_KEYS = ("config", "model_args", "optimizer", "scaler", "iter", "best_val_loss", "rng",
               "tokenizer")


def build_model(cfg, ckpt, device, weights="model"):
    """The tokenizer (the checkpoint's, else --tokenizer's) and the raw model on `device`: new, or
    the checkpoint's `weights` ("model_last", for --resume, is the kept "model" when absent)."""
    tokenizer = tokenizer_from_state(ckpt["tokenizer"]) if ckpt else load_tokenizer(cfg.tokenizer)
    if ckpt is None:
        return tokenizer, Llama(model_config(cfg, tokenizer.n_vocab)).to(device)
    try:
        model = Llama(dataclasses.replace(ModelConfig(**ckpt["model_args"]), dropout=cfg.dropout))
        model.load_state_dict(ckpt.get(weights, ckpt["model"]))
    except (TypeError, KeyError, RuntimeError) as e:  # another version's model_args or weights
        die(f"the checkpoint in {cfg.out_dir} does not fit this moe.py ({type(e).__name__}: "
            f"{str(e)[:200]})")
    return tokenizer, model.to(device)


def sample_only(cfg, device, dtype):
    """--sample-only: continue --prompt with the checkpoint in --out-dir."""
    out_dir = Path(cfg.out_dir)
    ckpt = load_checkpoint(out_dir / "ckpt.pt", ["moe.py"], ("model_args", "tokenizer"))
    tokenizer, model = build_model(cfg, ckpt, device)  # the kept weights
    model.eval()
    autocast = torch.amp.autocast(device.split(":")[0], dtype=getattr(torch, dtype),
                                  enabled=dtype != "float32")
    with autocast:
        _, texts = write_samples(model, tokenizer, cfg, device, out_dir)
    return {"samples": texts}


def build(cfg, ckpt, device, master, world_size):
    """--gradient-accumulation-steps checked against the processes, then the tokenizer (a resumed
    run keeps the checkpoint's), both splits' token ids, the raw model and the model that trains."""
    if cfg.gradient_accumulation_steps % world_size:
        die(f"--gradient-accumulation-steps {cfg.gradient_accumulation_steps} must be a multiple "
            f"of the {world_size} processes")
    if device.startswith("cuda"):
        torch.set_float32_matmul_precision("high")  # TF32 matmuls for any float32 work
    path = resolve_data(cfg.data)
    text = read_text(path)
    tokenizer, raw_model = build_model(cfg, ckpt, device, "model_last")  # --resume: the last step
    data = load_tokens(path, text, tokenizer)
    block_size = raw_model.config.block_size
    if len(data["val"]) <= block_size:
        die(f"--data {cfg.data}: only {len(data['val'])} validation tokens, fewer than "
            f"--block-size {block_size} + 1; use more text or a smaller --block-size")
    n_params, n_active = raw_model.num_params(), raw_model.num_params(active=True)
    if master:
        print(f"data: {len(data['train']):,} train / {len(data['val']):,} val tokens, vocabulary "
              f"{tokenizer.n_vocab}; model: {n_params / 1e6:.2f}M parameters, "
              f"{n_active / 1e6:.2f}M active per token, {len(raw_model.moe_layers())} MoE layers "
              f"({dataclasses.asdict(raw_model.config)})")
    model = torch.compile(raw_model) if cfg.compile else raw_model
    if world_size > 1:
        # the RoPE tables are constants, and the expert biases are kept equal by end_step
        model = DDP(model,
                    device_ids=[torch.device(device).index] if device.startswith("cuda") else None,
                    broadcast_buffers=False)
    return tokenizer, data, raw_model, model


def restore(cfg, ckpt, optimizer, scaler, batches, master, device):
    """--resume: the checkpoint's optimizer, scaler, RNG states -> (start_iter, best; see train)."""
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
        return ckpt["iter"], (ckpt["best_val_loss"], ckpt.get("best_iter", ckpt["iter"]),
                              ckpt["model"])  # no "best_iter": an older run's, which kept its last
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        die(f"the checkpoint in {cfg.out_dir} cannot be resumed ({type(e).__name__}: "
            f"{str(e)[:200]})")


def budget(step, t_start, cfg, device, ddp):
    """--max-time: (is the time up?, the learning rate of `step`). Under DDP the clock is the
    latest of all processes, so they agree on the last step and the learning rate. The cosine
    follows the clock too (whichever is further along), so the learning rate has decayed when
    the budget runs out (Li et al. 2020, "Budgeted training", arXiv:1905.04753)."""
    clock = time.perf_counter() - t_start  # seconds since training started
    if ddp and cfg.max_time > 0:
        shared = torch.tensor(clock, dtype=torch.float64, device=device)
        dist.all_reduce(shared, op=dist.ReduceOp.MAX)
        clock = shared.item()
    lr_decay_iters = cfg.lr_decay_iters or cfg.max_iters
    progress = step
    if cfg.max_time > 0 and step >= cfg.warmup_iters:  # warmup always counts steps
        progress = max(step, int(lr_decay_iters * clock / cfg.max_time))
    lr = get_lr(progress, cfg.learning_rate, cfg.min_lr, cfg.warmup_iters, lr_decay_iters)
    return cfg.max_time > 0 and clock >= cfg.max_time, lr


def eval_record(model, data, cfg, device, autocast, step, t_start, tokens_per_iter, best):
    """The eval record of `step`, printed: pure cross-entropy of both splits, the tokens seen
    and (NEW vs llama.py) the routing statistics, and `best`; a non-finite loss stops the run."""
    losses = estimate_loss(model, data, cfg.batch_size, cfg.eval_iters, cfg.seed, device, autocast)
    if not all(math.isfinite(v) for v in losses.values()):
        die(f"non-finite eval loss {losses} at iter {step}; the last good checkpoint in "
            f"{Path(cfg.out_dir)} is kept (try a lower --learning-rate)")
    if best[2] is None or losses["val"] < best[0]:  # first eval or strictly lower: keep a copy
        best = (losses["val"], step, {k: v.detach().to("cpu", copy=True)
                                      for k, v in model.state_dict().items()})
    elapsed = time.perf_counter() - t_start
    routing = routing_stats(model)  # NEW vs llama.py
    print(f"step {step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
          + (f", max/mean expert load {routing['max_load_ratio']:.2f}, dropped "
             f"{routing['dropped_tokens']}" if routing else ""))
    return {"iter": step, "train_loss": losses["train"], "val_loss": losses["val"],
            "best_iter": best[1], "elapsed_s": round(elapsed, 3),
            "tokens_seen": step * tokens_per_iter, **routing}, best


def checkpoint(cfg, model, optimizer, scaler, step, best, batches, tokenizer, device):
    """What ckpt.pt holds (docs/design.md section 4): all that a bit-exact resume needs; "model"
    is the kept model, "model_last" (only when they differ) the last step's weights."""
    cuda_rng = [torch.cuda.get_rng_state(device)] if device.startswith("cuda") else []
    last = {} if best[1] == step else {"model_last": model.state_dict()}
    return {"script": "moe.py", "version": 1, "config": dataclasses.asdict(cfg),
            "model_args": dataclasses.asdict(model.config), "model": best[2], **last,
            "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "iter": step,
            "best_val_loss": best[0], "best_iter": best[1],
            "rng": {"torch": torch.get_rng_state(), "cuda": cuda_rng, "data": batches.state},
            "tokenizer": tokenizer_state(tokenizer)}


def global_loss(step_loss, cfg, step, ddp, world_size):
    """The loss of the global batch, the same on every rank: the step's one host-device sync."""
    if ddp:
        dist.all_reduce(step_loss)
        step_loss /= world_size
    loss_value = step_loss.item()
    if not math.isfinite(loss_value):
        die(f"loss is {loss_value} at iter {step}; training stopped, the last good "
            f"checkpoint in {Path(cfg.out_dir)} is kept (try a lower --learning-rate)")
    return loss_value


def log_step(log, model, cfg, step, loss_value, lr, dt, elapsed, tokens_per_iter, accum, flops):
    """The training record of `step` (dt: seconds per step) into log.jsonl, and its line."""
    record = {"iter": step, "loss": loss_value, "lr": lr, "ms_per_iter": round(1000 * dt, 3),
              "tokens_per_s": round(tokens_per_iter / dt, 1), "elapsed_s": round(elapsed, 3)}
    line = (f"iter {step}/{cfg.max_iters} | loss {loss_value:.4f} | lr {lr:.1e} | "
            f"{1000 * dt:.1f} ms | {tokens_per_iter / dt / 1e3:.1f}k tok/s | "
            f"eta {format_eta(dt * (cfg.max_iters - step - 1))}")
    if flops is not None:
        record["mfu"] = model.estimate_mfu(cfg.batch_size * accum, dt, flops)
        line += f" | mfu {100 * record['mfu']:.1f}%"
    log.write(record)
    print(line)


def report(model, tokenizer, data, cfg, device, autocast, log, metrics, best, elapsed,
           eval_seconds, n_tokens):
    """After training: samples.txt, --plot's figures and (NEW vs llama.py) the tokens each
    expert prefers; the final metrics (n_tokens: trained in this run), logged as the done record."""
    out_dir, step, (val, it, weights) = Path(cfg.out_dir), metrics["iter"], best
    model.load_state_dict(weights)  # the kept model, now that ckpt.pt holds the last one too
    print(f"kept the model of iter {it} (val loss {val:.4f}); ckpt.pt also holds iter {step}'s "
          f"for --resume" if it != step else f"kept the last model (iter {it}, val loss {val:.4f})")
    model.eval()
    with autocast:
        write_samples(model, tokenizer, cfg, device, out_dir)
    if cfg.plot:
        prefs = None
        if model.moe_layers():  # NEW vs llama.py: the tokens each expert prefers
            generator = torch.Generator().manual_seed(cfg.seed)
            idx = get_batch(data["val"], model.config.block_size, 4 * cfg.batch_size, generator,
                            device)[0]  # (4B, T)
            prefs = expert_preferences(model, idx, tokenizer)
            for layer, experts in enumerate(prefs):
                print(f"MoE layer {layer}, tokens each expert prefers: "
                      + " | ".join(f"{e}: {' '.join(p)}" for e, p in enumerate(experts)))
        write_figures(out_dir, prefs)
    train_seconds = max(elapsed - eval_seconds, 1e-9)  # NEW vs llama.py: evals excluded
    metrics = dict(metrics, best_val_loss=val, params=model.num_params(),
                   active_params=model.num_params(active=True),
                   tokens_per_s=round(n_tokens / train_seconds, 1), elapsed_s=round(elapsed, 3))
    log.write({"event": "done", **metrics})
    return metrics


# ---- Appendix: flag rules — RULES, CHOICES, check_config ----------------------
# what each flag may be, checked by check_config before anything is written (docs/design.md
# section 6): a predicate and the text the error shows; `lambda v, c:` rules also see the other
# flags. Free text (--data, --tokenizer, --out-dir, --prompt) and --device/--dtype (resolved)
# aside. The rules many flags share come first, one entry for all of them.
RULES = {
    **dict.fromkeys(["n_layer", "n_head", "block_size", "expert_hidden", "kv_lora_rank",
                     "batch_size", "gradient_accumulation_steps", "eval_interval", "eval_iters",
                     "log_interval", "num_samples", "max_new_tokens"],
                    (lambda v: v >= 1, "an integer >= 1")),
    **dict.fromkeys(["n_shared_experts", "dense_layers", "max_iters", "warmup_iters"],
                    (lambda v: v >= 0, "an integer >= 0")),
    **dict.fromkeys(["rope_theta", "routed_scale", "learning_rate"],
                    (lambda v: v > 0, "a number > 0")),
    **dict.fromkeys(["aux_loss_coef", "bias_update_rate", "weight_decay"],
                    (lambda v: v >= 0, "a number >= 0")),
    **dict.fromkeys(["beta1", "beta2"], (lambda v: 0 <= v < 1, "a number in [0, 1)")),
    "n_kv_head": (lambda v, c: v >= 0 and c.n_head % (v or c.n_head) == 0,
                  "0 (= --n-head) or a divisor of --n-head {c.n_head}"),
    "n_embd": (lambda v, c: v >= 1 and v % c.n_head == 0 and (v // c.n_head) % 2 == 0,
               "a positive multiple of --n-head {c.n_head} with an even head size (RoPE turns "
               "pairs of dimensions)"),
    "dropout": (lambda v: 0 <= v < 1, "a probability in [0, 1)"),
    "n_experts": (lambda v: v >= 0, "an integer >= 0 (0 = dense)"),
    "experts_per_token": (lambda v, c: c.n_experts == 0 or 1 <= v <= c.n_experts,
                          "an integer in 1..--n-experts {c.n_experts}"),
    "moe_every": (lambda v: v >= 0, "an integer >= 0 (0 = no MoE block)"),
    "router_noise": (lambda v: v >= 0, "a standard deviation >= 0"),
    "capacity_factor": (lambda v: v >= 0, "a number >= 0 (0 = no limit)"),
    "z_loss_coef": (lambda v: v >= 0, "a number >= 0 (0 = off)"),
    "rope_head_dim": (lambda v: v >= 0 and v % 2 == 0,
                      "an even integer >= 0 (RoPE turns pairs of dimensions)"),
    "max_time": (lambda v: v >= 0, "a number of seconds >= 0 (0 = no limit)"),
    "min_lr": (lambda v, c: 0 <= v <= c.learning_rate,
               "a number in [0, --learning-rate {c.learning_rate}]"),
    "lr_decay_iters": (lambda v: v >= 0, "an integer >= 0 (0 = --max-iters)"),
    "grad_clip": (lambda v: v >= 0, "a number >= 0 (0 = off)"),
    "temperature": (lambda v: v >= 0, "a number >= 0 (0 = greedy)"),
    "top_k": (lambda v: v >= 0, "an integer >= 1, or 0 (off)"),
    "top_p": (lambda v: 0 < v <= 1, "a number in (0, 1] (1 = off)"),
    "bench_layer": (lambda v, c: not v or c.n_experts > 0,
                    "off with --n-experts 0 (it times an MoE layer)"),
    "seed": (lambda v: 0 <= v < 2**63, "an integer in 0..2**63-1"),
}
CHOICES = {"balance": ("aux", "aux-free", "none"), "attn": ("gqa", "mla")}


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


def synchronize(device):
    """Wait for queued GPU work, so that wall-clock timings are honest."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


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


def write_figures(out_dir, prefs=None):
    """--plot: loss.png (from log.jsonl) and, for an MoE model (NEW vs llama.py),
    expert_load.png: a heatmap per MoE layer of each expert's share of the routed tokens at
    every eval, each row labelled with the tokens the expert prefers (expert_preferences)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot: matplotlib is not installed; no figures written (pip install matplotlib)")
        return
    records = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()
               if line]
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
    loads = [r for r in records if "expert_load" in r]
    if loads and prefs:
        fig, axes = plt.subplots(1, len(prefs), figsize=(4.5 * len(prefs), 4), squeeze=False)
        for layer, ax in enumerate(axes[0]):
            heat = np.array([r["expert_load"][layer] for r in loads]).T  # (E, evals)
            im = ax.imshow(heat, aspect="auto", cmap="viridis", vmin=0)
            ax.set_xticks(range(len(loads)), [r["iter"] for r in loads], rotation=90, fontsize=6)
            ax.set_yticks(range(len(heat)),
                          [f"{e}: {' '.join(p[:5])}" for e, p in enumerate(prefs[layer])],
                          fontsize=7)
            ax.set(xlabel="iteration", title=f"MoE layer {layer}: share of routed tokens")
            fig.colorbar(im, ax=ax)
        fig.savefig(out_dir / "expert_load.png", dpi=120, bbox_inches="tight")
        plt.close(fig)
    print(f"wrote loss.png{' and expert_load.png' if loads and prefs else ''} to {out_dir}")


if __name__ == "__main__":
    main()
