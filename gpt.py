"""GPT: a decoder-only transformer language model, trained from scratch or from OpenAI's GPT-2.

Tokens are embedded, given a position (learned or sinusoidal), and pass through n_layer pre-LN
blocks of causal multi-head self-attention and a 4x MLP; a final LayerNorm and a linear head tied
to the token embedding predict the next token (Radford et al. 2018/2019, "Language Models are
Unsupervised Multitask Learners"; Vaswani et al. 2017, arXiv:1706.03762). One file holds what
nanoGPT splits over model.py, train.py and sample.py, and loads OpenAI's GPT-2 weights.

Run:
  python gpt.py                                  # CPU: nanoGPT's README recipe, char-level
  python gpt.py --device cuda                    # GPU: nanoGPT's shakespeare_char config
  torchrun --standalone --nproc_per_node 8 gpt.py --device cuda --gradient-accumulation-steps 8
  python gpt.py --sample-only --prompt "ROMEO:"  # sample from out/gpt/ckpt.pt
  python gpt.py --sample-only --init-from gpt2 --prompt "Hello, I'm a language model,"
  # fine-tune GPT-2 (124M) on Shakespeare with its own tokenizer (--init-from implies it):
  python gpt.py --init-from gpt2 --block-size 256 --max-iters 20 --learning-rate 3e-5 --min-lr 3e-6
  python gpt.py --resume --max-iters 4000        # continue a run with its saved settings

Result: CPU default, val loss 1.903 at iter 2000 in 2m14s (nanoGPT: 1.8857); see docs/gpt.md.

Simplifications: one text file per run (no sharded corpora), the vocabulary is not padded to
a multiple of 64, evaluation runs on rank 0 only, and the KV cache is left to llama.py.
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
import struct
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
    tokenizer: str = "char"  # char (one id per char), gpt2 (tiktoken) or a bpe.py tokenizer path
    init_from: str = "scratch"  # scratch, gpt2, gpt2-medium, gpt2-large, gpt2-xl or an HF folder
    n_layer: int = 4  # transformer blocks
    n_head: int = 4  # attention heads per block
    n_embd: int = 128  # embedding width C
    block_size: int = 64  # context length T in tokens
    dropout: float = 0.0  # dropout probability (attention, residual, embedding)
    bias: bool = False  # biases in Linear and LayerNorm layers (GPT-2 has them)
    pos: str = "learned"  # position embedding: learned (GPT-2) or sinusoidal (Vaswani et al.)
    gelu: str = "exact"  # GELU form: exact (erf) or tanh (GPT-2's approximation)
    sdpa: bool = True  # F.scaled_dot_product_attention; --no-sdpa runs the written-out attention
    batch_size: int = 12  # sequences per micro-batch and process
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step, over all processes
    max_iters: int = 2000  # optimizer steps
    learning_rate: float = 1e-3  # peak learning rate
    min_lr: float = 1e-4  # learning rate at the end of the cosine decay
    warmup_iters: int = 100  # steps of linear warmup
    lr_decay_iters: int = 0  # step where the cosine decay reaches min_lr (0 = max_iters)
    weight_decay: float = 0.1  # AdamW decoupled weight decay on matrices
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.99  # AdamW beta2
    grad_clip: float = 1.0  # clip the global gradient norm to this (0 = off)
    eval_interval: int = 250  # evaluate and checkpoint every N steps (and at the last step)
    eval_iters: int = 20  # batches per split in each evaluation
    log_interval: int = 1  # print and log the training loss every N steps
    out_dir: str = "out/gpt"  # checkpoint, log.jsonl, samples.txt and figures go here
    resume: bool = False  # continue the run saved in --out-dir
    overwrite: bool = False  # let a fresh run replace an existing checkpoint in --out-dir
    sample_only: bool = False  # only sample from the checkpoint (or from --init-from weights)
    prompt: str = "\n"  # text the samples continue
    num_samples: int = 5  # samples to draw
    max_new_tokens: int = 500  # tokens per sample
    temperature: float = 0.8  # sampling temperature (0 = greedy)
    top_k: int = 200  # sample among the k most likely tokens (0 = off)
    top_p: float = 1.0  # nucleus sampling: smallest set with probability >= p (1 = off)
    device: str = "auto"  # auto, cpu, cuda, cuda:N or mps
    dtype: str = "auto"  # auto, float32, bfloat16 or float16
    compile: bool = False  # torch.compile the model (the GPU preset turns it on)
    seed: int = 1337  # seed for init, batches, dropout and sampling
    tensorboard: bool = False  # also log to TensorBoard in --out-dir/tensorboard
    plot: bool = False  # write loss, attention and position-embedding figures (matplotlib)


# nanoGPT's config/train_shakespeare_char.py: applied on CUDA to every field not given (runs
# from scratch only; a resumed run keeps its saved config, --init-from runs size their own)
GPU_PRESET = dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=64, dropout=0.2,
                  max_iters=5000, eval_iters=200, log_interval=10, compile=True)

# what --resume needs from the checkpoint (load_checkpoint names the first one missing)
RESUME_KEYS = ("config", "model_args", "optimizer", "scaler", "iter", "best_val_loss", "rng",
               "tokenizer")


@dataclass
class ModelConfig:
    """The GPT's shape, saved in the checkpoint as `model_args` (see Config for the meanings)."""
    vocab_size: int  # V, token ids 0..V-1
    block_size: int  # T, the longest context
    n_layer: int  # L, transformer blocks
    n_head: int  # nh, heads of width hs = C / nh
    n_embd: int  # C, residual stream width
    dropout: float = 0.0  # dropout probability
    bias: bool = True  # biases in Linear and LayerNorm
    pos: str = "learned"  # learned | sinusoidal
    gelu: str = "exact"  # exact | tanh
    sdpa: bool = True  # fused attention kernel, else written out


# -------------------------------------------------------------------------------
# Model
# -------------------------------------------------------------------------------
class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which position t sees only positions <= t.

    Each head h projects x to queries, keys and values and mixes the values with weights
    softmax(q·k / sqrt(hs)) (Vaswani et al. 2017, Eq. 1); nh heads of width hs = C / nh run
    side by side and c_proj mixes their outputs.
    """

    def __init__(self, config):
        super().__init__()
        # Q, K, V at once
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.sdpa = config.sdpa

    def forward(self, x):
        B, T, C = x.size()
        hs = C // self.n_head
        q, k, v = self.c_attn(x).split(C, dim=2)  # (B, T, C) each
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        if self.sdpa:
            # the same computation in one fused kernel (FlashAttention on GPU, Dao et al. 2022,
            # arXiv:2205.14135): the (T, T) weights are never stored, so memory is O(T)
            y = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        else:
            # (B, nh, T, hs) @ (B, nh, hs, T) -> (B, nh, T, T): how much query t attends to key s
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs))
            # the causal mask: -inf above the diagonal becomes weight 0 after the softmax
            future = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(diagonal=1)  # (T, T)
            att = att.masked_fill(future, float("-inf")).softmax(dim=-1)  # rows sum to 1
            att = self.attn_dropout(att)  # its input is what --plot draws (a forward hook reads it)
            y = att @ v  # (B, nh, T, T) @ (B, nh, T, hs) -> (B, nh, T, hs)
        # heads side by side
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, nh, hs) -> (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward net: C -> 4C -> GELU -> C (GELU: Hendrycks & Gimpel 2016)."""

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        # GPT-2 was trained with the tanh approximation; matching its logits needs the same form
        self.gelu = nn.GELU(approximate="tanh" if config.gelu == "tanh" else "none")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        # (B, T, C) -> (B, T, 4C) -> (B, T, C)
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LN transformer block (GPT-2 moved LayerNorm to each sub-block's input, Radford et al.
    2019, §2.3): the residual stream x is only ever added to, which keeps deep stacks trainable."""

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))  # tokens exchange information
        x = x + self.mlp(self.ln_2(x))  # each token thinks on its own
        return x


class SinusoidalPositions(nn.Module):
    """Fixed position codes (Vaswani et al. 2017, §3.5): PE[p, 2i] = sin(p / 10000^(2i/C)),
    PE[p, 2i+1] = cos(p / 10000^(2i/C)), divided by sqrt(C/2) so that every row has norm 1.

    Vaswani et al. add the raw table (entries of size ~1) to embeddings they scale up by
    sqrt(C). GPT-2's token embeddings are N(0, 0.02^2) and not scaled, so the raw table would
    be ~35x the token signal at the first LayerNorm: on the CPU recipe that trains to val 2.33.
    With unit rows (entries ~1/sqrt(C)) it does as well as the learned table (docs/gpt.md).
    Called like nn.Embedding; `weight` is a buffer, so it is neither trained nor saved (it is
    recomputed from the shape)."""

    def __init__(self, block_size, n_embd):
        super().__init__()
        position = torch.arange(block_size).unsqueeze(1)  # (T, 1)
        inv_freq = torch.exp(
            torch.arange(0, n_embd, 2) * (-math.log(10000.0) / n_embd))  # (ceil(C/2),)
        weight = torch.zeros(block_size, n_embd)
        weight[:, 0::2] = torch.sin(position * inv_freq)  # (T, ceil(C/2))
        weight[:, 1::2] = torch.cos(position * inv_freq[: n_embd // 2])  # (T, floor(C/2))
        # each (sin, cos) pair has squared norm 1, so a row has norm sqrt(C/2) before this
        self.register_buffer("weight", weight / math.sqrt(n_embd / 2), persistent=False)

    def forward(self, pos):
        return self.weight[pos]


class GPT(nn.Module):
    """Token + position embedding -> n_layer Blocks -> LayerNorm -> logits over the vocabulary."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        if config.pos == "learned":
            wpe = nn.Embedding(config.block_size, config.n_embd)
        else:
            wpe = SinusoidalPositions(config.block_size, config.n_embd)
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=wpe,
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # weight tying (Press & Wolf 2017, arXiv:1608.05859): the output layer reuses the token
        # embedding matrix; one (V, C) parameter, counted once
        self.transformer.wte.weight = self.lm_head.weight
        # initialisation, GPT-2 style: every weight N(0, 0.02), biases 0; the projections that
        # write into the residual stream get std 0.02/sqrt(2L) (Radford et al. 2019, §2.3), so
        # the variance of the stream, a sum of 2L such writes, does not grow with depth
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def num_params(self, non_embedding=True):
        """Parameter count; non_embedding leaves out the position table, as Kaplan et al. (2020)
        and nanoGPT do (the token embedding stays: tied, it is also the output layer)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= sum(p.numel() for p in self.transformer.wpe.parameters())
        return n

    def forward(self, idx, targets=None):
        """idx (B, T) token ids -> logits (B, T, V) for every position, and the mean
        cross-entropy against targets (B, T) when given (else None)."""
        B, T = idx.size()
        assert T <= self.config.block_size, (
            f"sequence of {T} tokens > block_size {self.config.block_size}")
        pos = torch.arange(T, device=idx.device)  # (T,)
        x = self.transformer.drop(
            self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, C) @ (C, V) -> (B, T, V)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.view(B * T, -1), targets.reshape(B * T))
        return logits, loss

    def estimate_mfu(self, fwdbwd_per_iter, dt, peak):
        """Model FLOPs utilisation: achieved FLOP/s over the hardware peak. A token costs
        6N FLOPs (forward + backward through N parameters) plus 12·L·nh·hs·T for attention
        (PaLM, Chowdhery et al. 2022, Appendix B)."""
        L, nh, T = self.config.n_layer, self.config.n_head, self.config.block_size
        hs = self.config.n_embd // nh
        flops_per_token = 6 * self.num_params() + 12 * L * nh * hs * T
        return flops_per_token * T * fwdbwd_per_iter / dt / peak


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Extend each row of idx (B, T0) by max_new_tokens sampled tokens -> (B, T0 + new).

    Without a KV cache every step reruns the (cropped) context: O(T^2) work, plain to read.
    """
    for _ in range(max_new_tokens):
        context = idx[:, -model.config.block_size:]  # (B, <= block_size)
        logits, _ = model(context)  # (B, T, V)
        next_id = sample_logits(logits[:, -1, :], temperature, top_k, top_p, generator)  # (B, 1)
        idx = torch.cat((idx, next_id), dim=1)
    return idx


# -------------------------------------------------------------------------------
# Data
# -------------------------------------------------------------------------------
class CharTokenizer:
    """nanoGPT's shakespeare_char tokenizer: one id per distinct character, in sorted order.

    It has the three members of `tiktoken.Encoding` this file uses (encode_ordinary, decode,
    n_vocab), so the rest of the file treats both kinds alike.
    """

    def __init__(self, chars):
        self.chars = chars
        self.n_vocab = len(chars)
        self.stoi = {c: i for i, c in enumerate(chars)}

    def encode_ordinary(self, text):
        unknown = sorted(set(text) - self.stoi.keys())
        if unknown:
            die(f"the char tokenizer has no id for {''.join(unknown)!r} (characters that are "
                f"not in the training text); change the prompt")
        return [self.stoi[c] for c in text]

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids)


def load_tokenizer(name, text):
    """`--tokenizer char|gpt2|PATH`; the char vocabulary is the set of characters in `text`."""
    if name == "char":
        return CharTokenizer("".join(sorted(set(text))))
    if name == "gpt2":
        return gpt2_tokenizer()
    return load_bpe(name)


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
    label = "char" if isinstance(tokenizer, CharTokenizer) else tokenizer.name
    path = Path(path)
    files = {split: path.with_name(f"{path.stem}.{label}-{key}.{split}.bin")
             for split in ("train", "val")}
    if not all(f.is_file() for f in files.values()):
        ids = np.array(tokenizer.encode_ordinary(text), dtype=np.uint16)
        n_train = int(0.9 * len(ids))
        for split, part in (("train", ids[:n_train]), ("val", ids[n_train:])):
            tmp = Path(f"{files[split]}.{os.getpid()}.tmp")  # one per DDP rank
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


# -------------------------------------------------------------------------------
# Training and main
# -------------------------------------------------------------------------------
def make_optimizer(model, cfg, device_type):
    """AdamW (Loshchilov & Hutter 2019) with weight decay on the matrices (embeddings, Linear
    weights) only; biases and LayerNorm gains are left alone, as in GPT-2 and nanoGPT."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    # the fused kernel updates all tensors in one pass: one launch on CUDA, and on a 2-core CPU
    # 0.9 ms instead of 3.8 ms a step for the default model (MPS keeps the default loop)
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                             fused=device_type in ("cuda", "cpu"))


@torch.no_grad()
def estimate_loss(model, data, batch_size, eval_iters, seed, device, autocast):
    """Mean loss over `eval_iters` batches of each split, in eval mode (no dropout).

    The batches come from a generator seeded afresh on every call: each evaluation scores the
    same windows (curves compare like with like) and the training RNG is left untouched.
    """
    model.eval()
    out = {}
    for split, tokens in data.items():
        # seed + 1: the train-split estimate does not replay the training stream's first batches
        generator = torch.Generator().manual_seed(seed + 1)
        losses = torch.zeros(eval_iters, device=device)
        for k in range(eval_iters):
            x, y = get_batch(tokens, model.config.block_size, batch_size, generator, device)
            with autocast:
                losses[k] = model(x, y)[1]
        out[split] = losses.mean().item()
    model.train()
    return out


def train(cfg, given, ckpt, device, dtype, rank, world_size):
    """The training loop of nanoGPT's train.py; returns the final metrics (rank 0)."""
    master, ddp, device_type = rank == 0, world_size > 1, device.split(":")[0]
    if cfg.gradient_accumulation_steps % world_size:
        die(f"--gradient-accumulation-steps {cfg.gradient_accumulation_steps} must be a multiple "
            f"of the {world_size} processes")
    accum = cfg.gradient_accumulation_steps // world_size  # micro-steps per process
    torch.manual_seed(cfg.seed + rank)  # per-rank offset: each process draws its own dropout masks
    if device_type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls for any float32 work
    tokenizer, data, raw_model = load_data_and_model(cfg, given, ckpt, device, master)
    # raw_model is saved, evaluated and sampled; `model` (compiled, DDP-wrapped) is trained
    model = torch.compile(raw_model) if cfg.compile else raw_model
    if ddp:
        model = DDP(model,
                    device_ids=[torch.device(device).index] if device_type == "cuda" else None)
    optimizer = make_optimizer(raw_model, cfg, device_type)
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == "float16")  # fp16: loss scaling
    autocast = torch.amp.autocast(device_type, dtype=getattr(torch, dtype),
                                  enabled=dtype != "float32")
    batches = TrainBatches(data["train"], raw_model.config.block_size, cfg.batch_size, cfg.seed,
                           device, rank, world_size)
    start_iter, best = restore(ckpt, cfg, raw_model, optimizer, scaler, batches, master, device)
    out_dir = Path(cfg.out_dir)
    if master:  # the first write to --out-dir: every check has passed
        log = RunLog(out_dir, None if ckpt is None else start_iter, cfg.tensorboard)
    lr_decay_iters = cfg.lr_decay_iters or cfg.max_iters
    metrics = {}
    X, Y = batches.next()  # the first batch; from here on the next one is fetched before backward
    t_start = t_last = time.perf_counter()
    last_timed = start_iter  # ms/iter averages over the steps since this one (evals excluded)
    for step in range(start_iter, cfg.max_iters + 1):
        last_step = step == cfg.max_iters
        # evaluate and checkpoint (a resumed run has just loaded the state of step start_iter)
        resumed_here = ckpt is not None and step == start_iter
        if master and (last_step or (step % cfg.eval_interval == 0 and not resumed_here)):
            losses = estimate_loss(raw_model, data, cfg.batch_size, cfg.eval_iters, cfg.seed,
                                   device, autocast)
            metrics, best = log_eval(log, step, losses, best, raw_model, t_start, out_dir)
            save_checkpoint(checkpoint(cfg, raw_model, optimizer, scaler, step, best, batches,
                                       tokenizer, device), out_dir / "ckpt.pt")
            t_last, last_timed = time.perf_counter(), step
        if last_step:
            break
        # one optimizer step over `accum` micro-batches per process
        lr = get_lr(step, cfg.learning_rate, cfg.min_lr, cfg.warmup_iters, lr_decay_iters)
        for group in optimizer.param_groups:
            group["lr"] = lr
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
        if cfg.grad_clip > 0:
            scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
            torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

        if step % cfg.log_interval == 0:
            lossf = global_loss(step_loss, world_size, step, out_dir)  # a float, as in nanoGPT
            now = time.perf_counter()
            dt = (now - t_last) / (step + 1 - last_timed)
            t_last, last_timed = now, step + 1
            if master:
                log_step(log, raw_model, cfg, accum, step, lossf, lr, dt, now - t_start, device)
    if master:
        use_kept(raw_model, best, step)  # the samples and figures come from the kept weights
        write_samples(raw_model, tokenizer, cfg, device, out_dir, autocast)
        metrics = dict(metrics, best_val_loss=best["best_val_loss"], params=raw_model.num_params(),
                       elapsed_s=round(time.perf_counter() - t_start, 3))
        log.write({"event": "done", **metrics})
    return metrics


def sample_only(cfg, given, device, dtype):
    """--sample-only: continue --prompt with the --out-dir checkpoint or the --init-from weights."""
    out_dir = Path(cfg.out_dir)
    ckpt = (None if cfg.init_from != "scratch" else
            load_checkpoint(out_dir / "ckpt.pt", ["gpt.py"], ("model_args", "tokenizer")))
    tokenizer = gpt2_tokenizer() if ckpt is None else tokenizer_from_state(ckpt["tokenizer"])
    model = build_model(cfg, given, ckpt, tokenizer.n_vocab).to(device).eval()
    autocast = torch.amp.autocast(device.split(":")[0], dtype=getattr(torch, dtype),
                                  enabled=dtype != "float32")
    return {"samples": write_samples(model, tokenizer, cfg, device, out_dir, autocast)}


def main(argv=None):
    """Parse the flags, then train (or only sample); returns the final metrics."""
    cfg, given = parse_config(Config, argv, __doc__.splitlines()[0])
    ckpt = None
    if cfg.resume and not cfg.sample_only:
        check_out_dir(cfg.out_dir, cfg.resume, cfg.overwrite)
        ckpt = load_checkpoint(Path(cfg.out_dir) / "ckpt.pt", ["gpt.py"], RESUME_KEYS)
        cfg = resume_config(cfg, given, ckpt)  # continue with the saved settings
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = resolve_device(cfg.device)
    if device.startswith("cuda") and world_size > 1:
        device = f"cuda:{os.environ['LOCAL_RANK']}"  # torchrun starts one process per GPU
        torch.cuda.set_device(device)
    if device.startswith("cuda") and ckpt is None and cfg.init_from == "scratch":
        cfg = apply_preset(cfg, GPU_PRESET, given)
    dtype = resolve_dtype(cfg.dtype, device)
    check_config(cfg, RULES, CHOICES)
    if rank == 0:
        print("config: " + " ".join(f"{k}={v!r}" for k, v in dataclasses.asdict(cfg).items()))
        print(f"device={device} dtype={dtype} compile={'on' if cfg.compile else 'off'}"
              + (f" ddp world_size={world_size}" if world_size > 1 else ""))
    if cfg.sample_only:
        return sample_only(cfg, given, device, dtype)
    if ckpt is None:
        check_out_dir(cfg.out_dir, cfg.resume, cfg.overwrite)
    ddp = world_size > 1  # torchrun started this process as one of world_size ranks
    if ddp:
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    try:
        metrics = train(cfg, given, ckpt, device, dtype, rank, world_size)
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
# ---- Appendix: from mlp.py — load_bpe, get_lr and sampling, unchanged ---------
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


def get_lr(step, learning_rate, min_lr, warmup_iters, lr_decay_iters):
    """Linear warmup for `warmup_iters`, cosine decay to `min_lr` at `lr_decay_iters`, then flat."""
    if step < warmup_iters:
        return learning_rate * (step + 1) / (warmup_iters + 1)
    if step >= lr_decay_iters:
        return min_lr
    ratio = (step - warmup_iters) / max(1, lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


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


# ---- Appendix: extra — OpenAI's GPT-2 weights (--init-from NAME|DIR) ----------
# OpenAI's GPT-2 sizes (Radford et al. 2019, Table 2); what all share is in pretrained_config
GPT2_SIZES = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}


def pretrained_config(init_from):
    """`--init-from NAME|DIR` -> (ModelConfig, path of model.safetensors).

    A NAME is downloaded once from Hugging Face into data/; a DIR is in Hugging Face's layout
    (config.json with n_layer, n_head, n_embd, n_positions, vocab_size + model.safetensors).
    """
    if init_from in GPT2_SIZES:
        hf = dict(GPT2_SIZES[init_from], n_positions=1024, vocab_size=50257)
        url = f"https://huggingface.co/openai-community/{init_from}/resolve/main/model.safetensors"
        path = download(url, DATA_DIR / f"{init_from}.safetensors",
                        way_out="--init-from DIR (a folder with config.json and model.safetensors)")
    else:  # a folder (check_config made sure it has a config.json)
        hf = json.loads((Path(init_from) / "config.json").read_text())
        path = Path(init_from) / "model.safetensors"
    try:
        config = ModelConfig(vocab_size=hf["vocab_size"], block_size=hf["n_positions"],
                             n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"],
                             bias=True, pos="learned", gelu="tanh")
    except KeyError as e:
        die(f"--init-from {init_from}: config.json lacks {e}")
    return config, path


def load_gpt2_weights(model, tensors):
    """Copy GPT-2 weights (Hugging Face names, with or without the `transformer.` prefix) into
    `model`, whose names are the same. HF's GPT-2 keeps c_attn, c_proj and c_fc in Conv1D
    layers with weight (in, out), the transpose of nn.Linear's (out, in)."""
    ours = model.state_dict()
    loaded = set()
    for name, tensor in tensors.items():
        key = "transformer." + name.removeprefix("transformer.")
        # the causal-mask buffers and the output layer (tied to wte) carry no new weights
        if key.endswith((".attn.bias", ".attn.masked_bias")) or name == "lm_head.weight":
            continue
        if key not in ours:
            die(f"unexpected tensor {name} in the GPT-2 weights")
        if key.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            tensor = tensor.t()  # Conv1D (in, out) -> Linear (out, in)
        if key == "transformer.wpe.weight":  # a shorter context keeps the first positions
            tensor = tensor[: model.config.block_size]
        if tensor.shape != ours[key].shape:
            die(f"GPT-2 tensor {name} has shape {tuple(tensor.shape)}, "
                f"the model expects {tuple(ours[key].shape)}")
        ours[key].copy_(tensor)
        loaded.add(key)
    missing = sorted(set(ours) - loaded - {"lm_head.weight"})
    if missing:
        die(f"the GPT-2 weights lack {len(missing)} tensors, e.g. {missing[0]}")


# ---- Appendix: bookkeeping — data and model, restore, checkpoint, log records, samples ----
def load_data_and_model(cfg, given, ckpt, device, master):
    """The tokenizer (a resumed run keeps its own, --init-from implies gpt2), the token ids of
    --data ({"train", "val"}) and the raw GPT on `device`; rank 0 prints their sizes."""
    path = resolve_data(cfg.data)
    text = read_text(path)
    tokenizer = (tokenizer_from_state(ckpt["tokenizer"]) if ckpt is not None else
                 load_tokenizer("gpt2" if cfg.init_from != "scratch" else cfg.tokenizer, text))
    data = load_tokens(path, text, tokenizer)
    model = build_model(cfg, given, ckpt, tokenizer.n_vocab).to(device)
    if len(data["val"]) <= model.config.block_size:
        die(f"--data {cfg.data}: only {len(data['val'])} validation tokens, fewer than "
            f"--block-size {model.config.block_size} + 1; use more text or a smaller --block-size")
    if master:
        print(f"data: {len(data['train']):,} train / {len(data['val']):,} val tokens, vocabulary "
              f"{tokenizer.n_vocab}; model: {model.num_params() / 1e6:.2f}M parameters "
              f"({dataclasses.asdict(model.config)})")
    return tokenizer, data, model


def gpt2_tokenizer():
    """tiktoken's GPT-2 BPE (50257 tokens); its two files are fetched once into tiktoken's cache."""
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # offline with an empty cache: requests/urllib errors, not one class
        die(f"cannot load tiktoken's gpt2 encoding ({type(e).__name__}); connect once, or set "
            f"TIKTOKEN_CACHE_DIR to a folder that holds its files")


def tokenizer_state(tokenizer):
    """The tokenizer as plain data for the checkpoint (docs/design.md section 4)."""
    if isinstance(tokenizer, CharTokenizer):
        return {"kind": "char", "chars": tokenizer.chars}
    # tiktoken has no public accessor for its ranks and pattern; these attributes are stable
    ranks = sorted(tokenizer._mergeable_ranks.items(), key=lambda item: item[1])
    return {"kind": "tiktoken", "name": tokenizer.name, "pat_str": tokenizer._pat_str,
            "ranks_b64": [base64.b64encode(token).decode("ascii") for token, _ in ranks],
            "special": dict(tokenizer._special_tokens)}


def tokenizer_from_state(state):
    """Inverse of `tokenizer_state`: no file or network needed to sample from a checkpoint."""
    if state["kind"] == "char":
        return CharTokenizer(state["chars"])
    ranks = {base64.b64decode(token): rank for rank, token in enumerate(state["ranks_b64"])}
    return tiktoken.Encoding(name=state["name"], pat_str=state["pat_str"],
                             mergeable_ranks=ranks, special_tokens=state["special"])


def build_model(cfg, given, ckpt, vocab_size):
    """The raw GPT: from a checkpoint, from GPT-2 weights (--init-from) or freshly initialised."""
    if ckpt is not None:
        try:
            config = ModelConfig(**ckpt["model_args"])
        except TypeError as e:  # another version's model_args
            die(f"the checkpoint in {cfg.out_dir} does not fit this gpt.py ({e})")
        model = GPT(dataclasses.replace(config, dropout=cfg.dropout, sdpa=cfg.sdpa))
        load_weights(model, ckpt["model"], Path(cfg.out_dir) / "ckpt.pt")
        return model
    if cfg.init_from != "scratch":
        config, path = pretrained_config(cfg.init_from)
        if vocab_size > config.vocab_size:
            die(f"--init-from {cfg.init_from}: its {config.vocab_size}-token vocabulary is smaller "
                f"than the gpt2 tokenizer's {vocab_size}")
        # a --block-size given on the command line crops the 1024 positions (cheaper fine-tuning)
        block_size = (min(cfg.block_size, config.block_size) if "block_size" in given
                      else config.block_size)
        model = GPT(dataclasses.replace(config, block_size=block_size, dropout=cfg.dropout,
                                        sdpa=cfg.sdpa))
        load_gpt2_weights(model, read_safetensors(path))
        return model
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(ModelConfig)
              if f.name != "vocab_size"}
    return GPT(ModelConfig(vocab_size=vocab_size, **fields))


def restore(ckpt, cfg, model, optimizer, scaler, batches, master, device):
    """--resume: the last step's weights, the saved optimizer, scaler, data and RNG states ->
    (iter, kept model): load_checkpoint made sure of all keys but best_iter (older runs lack it)."""
    if ckpt is None:  # val loss inf: the first evaluation sets the kept model (see log_eval)
        return 0, {"model": None, "best_val_loss": float("inf"), "best_iter": 0}
    try:
        model.load_state_dict(ckpt.get("model_last", ckpt["model"]))  # build_model loaded "model"
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        batches.generator.set_state(ckpt["rng"]["data"])
        if master:  # the saved RNG states are rank 0's; other ranks keep their own seeds
            torch.set_rng_state(ckpt["rng"]["torch"])
            if device.split(":")[0] == "cuda" and ckpt["rng"]["cuda"]:
                torch.cuda.set_rng_state(ckpt["rng"]["cuda"][0], device)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        die(f"the checkpoint in {cfg.out_dir} cannot be resumed ({type(e).__name__}: "
            f"{str(e)[:200]})")
    return ckpt["iter"], {"model": ckpt["model"], "best_val_loss": ckpt["best_val_loss"],
                          "best_iter": ckpt.get("best_iter", ckpt["iter"])}


def checkpoint(cfg, model, optimizer, scaler, step, best, batches, tokenizer, device):
    """What ckpt.pt holds (docs/design.md section 4): the kept weights (`model`, from best_iter),
    the last step's where they differ (`model_last`), and all else a bit-exact --resume needs."""
    last = {} if best["best_iter"] == step else {"model_last": model.state_dict()}
    return {"script": "gpt.py", "version": 1, "config": dataclasses.asdict(cfg),
            "model_args": dataclasses.asdict(model.config), **best, **last,
            "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "iter": step,
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": [torch.cuda.get_rng_state(device)] if device.startswith("cuda") else [],
                    "data": batches.state},
            "tokenizer": tokenizer_state(tokenizer)}


def log_eval(log, step, losses, best, model, t_start, out_dir):
    """An evaluation: stop on a non-finite loss, else print and log it, keeping a new best."""
    if not all(math.isfinite(v) for v in losses.values()):
        die(f"non-finite eval loss {losses} at iter {step}; the last good checkpoint in "
            f"{out_dir} is kept (try a lower --learning-rate)")
    if losses["val"] < best["best_val_loss"]:  # a CPU copy of the raw model: training goes on
        state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        best = {"model": state, "best_val_loss": losses["val"], "best_iter": step}
    metrics = {"iter": step, "train_loss": losses["train"], "val_loss": losses["val"],
               "best_iter": best["best_iter"], "elapsed_s": round(time.perf_counter() - t_start, 3)}
    print(f"step {step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
    log.write(metrics)
    return metrics, best


def use_kept(model, best, step):
    """After the last checkpoint: the kept weights go into `model` for the samples and figures."""
    model.load_state_dict(best["model"])
    print(f"kept the model of iter {best['best_iter']} (val loss {best['best_val_loss']:.4f})"
          + ("" if best["best_iter"] == step else
             f"; ckpt.pt also holds iter {step}'s for --resume"))


def global_loss(step_loss, world_size, step, out_dir):
    """The step's loss as a float, a non-finite one stopping the run (on every rank)."""
    if world_size > 1:  # the loss of the whole global batch, the same number on every rank
        dist.all_reduce(step_loss)
        step_loss /= world_size
    loss_value = step_loss.item()  # the one host-device sync of a step: timing is true here
    if not math.isfinite(loss_value):
        die(f"loss is {loss_value} at iter {step}; training stopped, the last good "
            f"checkpoint in {out_dir} is kept (try a lower --learning-rate)")
    return loss_value


def log_step(log, model, cfg, accum, step, loss_value, lr, dt, elapsed, device):
    """A training step's log record and console line (MFU on a GPU of known peak FLOP/s)."""
    flops = peak_flops(device)
    tokens_per_iter = cfg.gradient_accumulation_steps * cfg.batch_size * model.config.block_size
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


def write_samples(model, tokenizer, cfg, device, out_dir, autocast):
    """cfg.num_samples continuations of cfg.prompt, printed and saved (+ figures with --plot)."""
    model.eval()
    prompt = tokenizer.encode_ordinary(cfg.prompt)
    if not prompt:
        die("--prompt is empty; give at least one character to continue")
    idx = torch.tensor([prompt] * cfg.num_samples, device=device)  # (num_samples, T0), int64
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    with autocast:
        ids = generate(model, idx, cfg.max_new_tokens, cfg.temperature, cfg.top_k or None,
                       cfg.top_p, generator)
    texts = [tokenizer.decode(row.tolist()) for row in ids]
    joined = ("\n" + "-" * 40 + "\n").join(texts)
    print(joined)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "samples.txt").write_text(joined + "\n")
    if cfg.plot:
        write_figures(model, tokenizer, ids[0, : min(48, model.config.block_size)], out_dir)
    return texts


# ---- Appendix: flag rules — RULES, CHOICES, check_config ----------------------
# what each flag may be (check_config, docs/design.md section 6); free text (--data, --tokenizer,
# --out-dir, --prompt) and --device/--dtype (resolve_device, resolve_dtype check them) aside
RULES = {
    **dict.fromkeys(("n_layer", "n_head", "block_size", "batch_size", "gradient_accumulation_steps",
                     "eval_interval", "eval_iters", "log_interval", "num_samples",
                     "max_new_tokens"), (lambda v: v >= 1, "an integer >= 1")),
    **dict.fromkeys(("max_iters", "warmup_iters"), (lambda v: v >= 0, "an integer >= 0")),
    **dict.fromkeys(("beta1", "beta2"), (lambda v: 0 <= v < 1, "a number in [0, 1)")),
    "init_from": (lambda v: v in ("scratch", *GPT2_SIZES) or Path(v, "config.json").is_file(),
                  "scratch, gpt2, gpt2-medium, gpt2-large, gpt2-xl or a folder with "
                  "config.json and model.safetensors"),
    "n_embd": (lambda v, c: v >= 1 and v % c.n_head == 0,
               "a positive multiple of --n-head {c.n_head}"),
    "dropout": (lambda v: 0 <= v < 1, "a probability in [0, 1)"),
    "learning_rate": (lambda v: v > 0, "a number > 0"),
    "min_lr": (lambda v, c: 0 <= v <= c.learning_rate,
               "a number in [0, --learning-rate {c.learning_rate}]"),
    "lr_decay_iters": (lambda v: v >= 0, "an integer >= 0 (0 = --max-iters)"),
    "weight_decay": (lambda v: v >= 0, "a number >= 0"),
    "grad_clip": (lambda v: v >= 0, "a number >= 0 (0 = off)"),
    "temperature": (lambda v: v >= 0, "a number >= 0 (0 = greedy)"),
    "top_k": (lambda v: v >= 0, "an integer >= 1, or 0 (off)"),
    "top_p": (lambda v: 0 < v <= 1, "a number in (0, 1] (1 = off)"),
    "seed": (lambda v: 0 <= v < 2**63, "an integer in 0..2**63-1"),
}
CHOICES = {"pos": ("learned", "sinusoidal"), "gelu": ("exact", "tanh")}


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


def load_weights(model, state, path):
    """load_state_dict with a one-line error when the checkpoint does not fit the model."""
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:
        detail = str(e).splitlines()[1].strip() if "\n" in str(e) else str(e)
        die(f"{path} does not fit this model ({detail})")


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


SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def read_safetensors(path):
    """name -> tensor of a .safetensors file: an 8-byte little-endian header length N, N bytes
    of JSON {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}},
    then the raw little-endian tensor bytes (offsets count from the end of the header)."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
            # writable, so torch.frombuffer can share it without a copy
            buffer = bytearray(f.read())
    except (OSError, struct.error, ValueError) as e:
        die(f"cannot read {path} as a safetensors file ({e})")
    tensors = {}
    header.pop("__metadata__", None)
    for name, info in header.items():
        if info["dtype"] not in SAFETENSORS_DTYPES:
            die(f"{path}: tensor {name} has dtype {info['dtype']}; "
                f"supported: {', '.join(SAFETENSORS_DTYPES)}")
        dtype = SAFETENSORS_DTYPES[info["dtype"]]
        begin, end = info["data_offsets"]
        if end > len(buffer):
            die(f"{path} is truncated: tensor {name} ends at byte {end} of {len(buffer)}")
        flat = torch.frombuffer(buffer, dtype=dtype, count=(end - begin) // dtype.itemsize,
                                offset=begin)
        tensors[name] = flat.view(info["shape"])
    return tensors


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
                print("--tensorboard: the tensorboard package is not installed; logging to "
                      "log.jsonl only")
            else:
                self.writer = SummaryWriter(Path(out_dir) / "tensorboard")

    def write(self, record):
        append_jsonl(self.path, record)
        if self.writer is not None:
            for name, value in record.items():
                if name != "iter" and isinstance(value, (int, float)):
                    self.writer.add_scalar(name, value, record["iter"])


@torch.no_grad()
def attention_maps(model, idx):
    """Attention weights (L, nh, T, T) of `model` on one sequence idx (1, T).

    The fused kernel never materialises the weights, so a copy of the model runs the written-out
    path and a forward hook reads the softmax output where it enters attn_dropout.
    """
    manual = GPT(dataclasses.replace(model.config, sdpa=False)).to(idx.device).eval()
    manual.load_state_dict(model.state_dict())
    maps = []
    hooks = [block.attn.attn_dropout.register_forward_hook(
        lambda m, args, out: maps.append(args[0][0])) for block in manual.transformer.h]
    manual(idx)
    for hook in hooks:
        hook.remove()
    return torch.stack(maps).float().cpu()


def write_figures(model, tokenizer, ids, out_dir):
    """--plot: loss.png (from log.jsonl), attention.png (every head on the token ids `ids`),
    positions.png (the position-embedding table and its cosine similarities)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot: matplotlib is not installed; no figures written (pip install matplotlib)")
        return
    log_path = out_dir / "log.jsonl"
    if log_path.is_file():
        records = [json.loads(line) for line in log_path.read_text().splitlines() if line]
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot([r["iter"] for r in records if "loss" in r],
                [r["loss"] for r in records if "loss" in r],
                lw=0.5, alpha=0.5, label="train (batch)")
        evals = [r for r in records if "val_loss" in r]
        for split in ("train", "val"):
            ax.plot([r["iter"] for r in evals], [r[f"{split}_loss"] for r in evals], "o-", ms=3,
                    label=f"{split} (eval)")
        ax.set(xlabel="iteration", ylabel="cross-entropy (nats/token)", title="loss")
        ax.legend()
        fig.savefig(out_dir / "loss.png", dpi=120, bbox_inches="tight")
        plt.close(fig)
    maps = attention_maps(model, ids[None, :])  # (L, nh, T, T)
    labels = [repr(tokenizer.decode([i]))[1:-1] for i in ids.tolist()]
    L, nh = maps.shape[:2]
    fig, axes = plt.subplots(L, nh, figsize=(2.2 * nh, 2.2 * L), squeeze=False)
    for layer in range(L):
        for head in range(nh):
            ax = axes[layer][head]
            ax.imshow(maps[layer, head], cmap="viridis", vmin=0, vmax=1)
            ax.set_title(f"layer {layer} head {head}", fontsize=7)
            ax.set_xticks(range(len(labels)), labels, fontsize=4, rotation=90)
            ax.set_yticks(range(len(labels)), labels, fontsize=4)
    fig.suptitle("attention weights (row: query position, column: key position)")
    fig.savefig(out_dir / "attention.png", dpi=150, bbox_inches="tight")
    plt.close(fig)
    table = model.transformer.wpe.weight.detach().float().cpu()  # (T, C)
    unit = F.normalize(table, dim=1)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.imshow(table.T, aspect="auto", cmap="RdBu")
    left.set(xlabel="position", ylabel="embedding dimension",
             title=f"{model.config.pos} position embeddings")
    right.imshow(unit @ unit.T, cmap="viridis")  # (T, C) @ (C, T) -> (T, T)
    right.set(xlabel="position", ylabel="position", title="cosine similarity between positions")
    fig.savefig(out_dir / "positions.png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote loss.png, attention.png and positions.png to {out_dir}")


if __name__ == "__main__":
    main()
