"""An MLP language model (Bengio et al. 2003) and a GRU, on characters or BPE tokens.

Bengio, Ducharme, Vincent & Jauvin, "A Neural Probabilistic Language Model" (JMLR 2003):
look up an embedding for each of the last `block_size` tokens, concatenate them, one tanh
hidden layer, a softmax over the vocabulary: a fixed context. `--model gru` instead reads its
window one token at a time into a gated recurrent state (Cho et al. 2014, arXiv:1406.1078)
and learns from every position of it: recurrence vs fixed context, same data, loop and loss.
makemore part 2 (and makemore.py's MLP/GRU) in one file. Data: `--data names` (one name a
line; a boundary token, id 0, marks each start and end), `--data shakespeare` (one stream,
sliding windows) or a path; `--tokenizer PATH` reads the tokens of a bpe.py tokenizer.

Run:
    python mlp.py                    # names, CPU, 20k steps: test loss 1.98
    python mlp.py --model gru        # the GRU, same CPU time: test loss 1.99
    python mlp.py --data shakespeare --tokenizer out/bpe/tokenizer --overwrite
    python mlp.py --device cuda      # bigger batch and hidden layer (GPU_PRESET)
    python mlp.py --sample-only --temperature 0.8 --top-p 0.95

Result (names, 2-core CPU): test loss 1.9837 in 75 s (makemore's MLP: 2.03 after 3 min), the
GRU 1.9882; more in docs/mlp.md. Simplifications: no direct embedding->output connections
(Bengio's W x term); no batch norm (a careful init instead, makemore part 3); resuming a
`--max-time` run is not bit-exact (its LR follows the clock).
"""
import argparse
import base64
import dataclasses
import hashlib
import importlib.util
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
from typing import NamedTuple, Optional

import tiktoken
import torch
import torch.nn as nn
import torch.nn.functional as F


# -------------------------------------------------------------------------------
# Config
# -------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    model: str = "mlp"  # mlp (Bengio et al. 2003) or gru (Cho et al. 2014)
    vocab_size: int = 27  # number of token ids (set from the tokenizer)
    block_size: int = 5  # context length in tokens
    n_embd: int = 32  # embedding dimensions per token
    n_hidden: int = 512  # MLP hidden units / GRU state size
    dropout: float = 0.0  # dropout on the hidden layer, before the output layer


@dataclass
class Config:
    data: str = "names"  # dataset (names, shakespeare) or path to a UTF-8 text file
    format: str = "auto"  # lines (one item a line) | text (one stream) | auto (guess)
    tokenizer: str = ""  # bpe.py tokenizer prefix (<prefix>.tiktoken + .json); empty = chars
    model: str = "mlp"  # mlp (fixed context, Bengio et al. 2003) or gru (recurrent)
    block_size: int = 5  # context length in tokens (gru: 16)
    n_embd: int = 32  # embedding dimensions per token
    n_hidden: int = 512  # MLP hidden units / GRU state size (gru: 128)
    dropout: float = 0.2  # dropout on the hidden layer (gru: 0.1)
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    compile: Optional[bool] = None  # torch.compile; unset = on for CUDA, off for CPU and MPS
    seed: int = 1337  # init, batches, dropout and sampling follow it
    out_dir: str = "out/mlp"  # checkpoint, log.jsonl, samples.txt, figures (gru: out/mlp-gru)
    max_iters: int = 20000  # optimizer steps (gru: 6000)
    max_time: float = 0.0  # training budget in seconds, evals included; 0 = no limit
    eval_interval: int = 2000  # estimate train/val loss and save the checkpoint every N steps
    eval_iters: int = 20  # batches per split for that estimate
    final_eval_max: int = 50000  # final val/test loss over at most this many windows
    log_interval: int = 500  # print and log a training record every N steps
    batch_size: int = 128  # windows per step (gru: 32; a GRU window scores all its targets)
    learning_rate: float = 5e-3  # peak AdamW learning rate
    min_lr: float = 5e-5  # the cosine decay ends here
    warmup_iters: int = 100  # linear warmup steps
    weight_decay: float = 0.01  # AdamW decoupled weight decay
    grad_clip: float = 1.0  # clip the gradient norm to this; 0 = off
    resume: bool = False  # continue the run saved in --out-dir
    overwrite: bool = False  # allow a fresh run to replace the checkpoint in --out-dir
    sample_only: bool = False  # load the checkpoint in --out-dir and only generate
    prompt: str = ""  # start of every sample (lines: the first letters of each item)
    num_samples: int = 10  # samples to print
    max_new_tokens: int = 200  # tokens per sample (lines: a sample stops at the boundary)
    temperature: float = 1.0  # sampling temperature; 0 = greedy
    top_k: Optional[int] = None  # sample among the k most likely tokens only
    top_p: Optional[float] = None  # nucleus sampling: the smallest set with probability >= p
    plot: bool = False  # write embeddings.png (PCA) and loss.png to --out-dir (matplotlib)


GPU_PRESET = dict(batch_size=1024, n_hidden=1024, max_iters=30000, eval_interval=5000)  # CUDA
# -------------------------------------------------------------------------------
# Model
# -------------------------------------------------------------------------------
class LanguageModel(nn.Module):
    """What both models share: token embeddings in, next-token logits out.

    forward(idx (B, T), targets (B,) or None) -> (logits (B, V), loss): the prediction for the
    token that follows each context row. Subclasses turn the embeddings into a (B, H) summary.
    A model with `every_target` also takes targets (B, T), one after every prefix of the row,
    and then returns logits (B, T, V).
    """

    every_target = False

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)  # C in Bengio et al.
        self.drop = nn.Dropout(config.dropout)
        self.lm_head = nn.Linear(config.n_hidden, config.vocab_size)

    def init_weights(self):
        # Embeddings ~ N(0, 1) (nn.Embedding's default). The output layer starts near zero, so
        # the first prediction is close to uniform and the loss at init is ln(vocab_size)
        # instead of a confidently wrong guess (makemore part 3, "fixing the initial loss").
        nn.init.normal_(self.wte.weight)
        nn.init.normal_(self.lm_head.weight, std=0.01)
        nn.init.zeros_(self.lm_head.bias)

    def readout(self, h, targets):
        logits = self.lm_head(self.drop(h))  # (B, [T,] H) @ (H, V) -> (B, [T,] V)
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(),
                                       ignore_index=IGNORE_INDEX)


class MLP(LanguageModel):
    """Bengio et al. 2003, Eq. 1 without the direct connections: y = b + U tanh(d + H x),
    x = the concatenated embeddings of the context."""

    def __init__(self, config):
        super().__init__(config)
        self.fc = nn.Linear(config.block_size * config.n_embd, config.n_hidden)  # H, d
        self.init_weights()
        # Kaiming init with tanh's gain 5/3 (He et al. 2015; makemore part 3): with N(0, 1)
        # embeddings the pre-activations have std 5/3, tanh starts in its bent range, neither
        # mostly saturated (dead gradients) nor linear.
        nn.init.kaiming_normal_(self.fc.weight, nonlinearity="tanh")
        nn.init.zeros_(self.fc.bias)

    def forward(self, idx, targets=None):
        B, T = idx.shape
        x = self.wte(idx).view(B, T * self.config.n_embd)  # (B, T, C) -> (B, T*C): concatenate
        h = torch.tanh(self.fc(x))  # (B, T*C) @ (T*C, H) -> (B, H)
        return self.readout(h, targets)


def build_model(config):
    return {"mlp": MLP, "gru": GRU}[config.model](config)


# -------------------------------------------------------------------------------
# Data
# -------------------------------------------------------------------------------
IGNORE_INDEX = -100  # PyTorch's cross-entropy default: targets with this id add no loss
SPLIT_SEED = 42  # the train/val/test split ignores --seed, so every seed is scored alike


def load_data(cfg, tok):
    """Read --data and split it 80/10/10 -> (format, tokenizer, {name: Split}).

    A split is one token stream plus the positions p it is scored on: tokens[p] is predicted
    from the `block_size` tokens before it. Lines (names) are shuffled with a fixed seed and
    split by item; text is split into three contiguous pieces and every position of a piece
    past its first `block_size` tokens is a target (sliding windows).
    """
    text = read_text(resolve_data(cfg.data))
    if not text.strip():
        die(f"--data {cfg.data} is empty")
    fmt = guess_format(text) if cfg.format == "auto" else cfg.format
    items = [ln.strip() for ln in text.splitlines() if ln.strip()] if fmt == "lines" else None
    if tok is None:  # characters: the vocabulary is every character the data uses
        tok = Tokenizer.from_chars("".join(items) if items is not None else text)
    if items is not None:
        order = torch.randperm(len(items), generator=torch.Generator().manual_seed(SPLIT_SEED))
        parts = order.tensor_split([int(0.8 * len(items)), int(0.9 * len(items))])
        splits = [lines_split([tok.encode(items[i]) for i in part.tolist()], cfg.block_size,
                              tok.boundary) for part in parts]
    else:
        ids = torch.tensor(tok.encode(text))
        parts = ids.tensor_split([int(0.8 * len(ids)), int(0.9 * len(ids))])
        splits = [make_split(part, range(cfg.block_size, len(part)),
                             range(cfg.block_size, len(part))) for part in parts]
    if min(len(split.targets) for split in splits) == 0:
        die(f"--data {cfg.data}: too small to split 80/10/10 with --block-size {cfg.block_size}")
    return fmt, tok, dict(zip(("train", "val", "test"), splits))


def examples(split, positions, block_size, every_target, device):
    """The windows that end before `positions` (N,): contexts x (N, T) and what follows them.

    y (N,) is the token at each position; with every_target, y (N, T) is the token after
    every prefix of the window (x shifted by one), IGNORE_INDEX where that is no target (the
    padding between lines), so a recurrent model learns from all T steps it computes anyway.
    """
    x = split.tokens[positions[:, None] + torch.arange(-block_size, 0)]  # (N, T)
    if every_target:
        pos = positions[:, None] + torch.arange(1 - block_size, 1)  # (N, T)
        y = torch.where(split.is_target[pos], split.tokens[pos], IGNORE_INDEX)
    else:
        y = split.tokens[positions]
    return x.to(device), y.to(device)


def get_batch(split, block_size, batch_size, every_target, generator, device):
    """A random batch of windows, drawn with `generator`."""
    pool = split.pool(every_target)
    pick = torch.randint(len(pool), (batch_size,), generator=generator)
    return examples(split, pool[pick], block_size, every_target, device)


# -------------------------------------------------------------------------------
# Training
# -------------------------------------------------------------------------------
def get_lr(step, learning_rate, min_lr, warmup_iters, lr_decay_iters):
    """Linear warmup for `warmup_iters`, cosine decay to `min_lr` at `lr_decay_iters`, then flat."""
    if step < warmup_iters:
        return learning_rate * (step + 1) / (warmup_iters + 1)
    if step >= lr_decay_iters:
        return min_lr
    ratio = (step - warmup_iters) / max(1, lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


@torch.no_grad()
def evaluate(model, split, positions, cfg, device, ctx):
    """Mean cross-entropy (nats per target) of the windows ending at `positions`."""
    model.eval()
    total, count = 0.0, 0
    for chunk in positions.split(cfg.batch_size):
        x, y = examples(split, chunk, model.config.block_size, model.every_target, device)
        with ctx:
            _, loss = model(x, y)
        n = (y != IGNORE_INDEX).sum().item()
        total, count = total + loss.item() * n, count + n
    model.train()
    return total / count


def estimate_losses(model, splits, cfg, device, ctx):
    """Train/val loss on `eval_iters` batches: the same random windows at every eval."""
    generator = torch.Generator().manual_seed(cfg.seed)
    losses = {}
    for name in ("train", "val"):
        pool = splits[name].pool(model.every_target)
        pick = torch.randint(len(pool), (cfg.eval_iters * cfg.batch_size,), generator=generator)
        losses[name] = evaluate(model, splits[name], pool[pick], cfg, device, ctx)
    return losses


def train(cfg, out_dir, device, dtype, use_compile):
    """Train (or resume), evaluate on val/test, sample; returns the final metrics."""
    device_type = device.split(":")[0]
    ctx = torch.amp.autocast(device_type, dtype=getattr(torch, dtype), enabled=dtype != "float32")
    torch.manual_seed(cfg.seed)
    ckpt_path, log_path = out_dir / "ckpt.pt", out_dir / "log.jsonl"
    ckpt = load_checkpoint(ckpt_path, ["mlp.py"], RESUME_KEYS) if cfg.resume else None
    tok = Tokenizer.from_bpe(load_bpe(cfg.tokenizer)) if cfg.tokenizer else None
    fmt, tok, splits = load_data(cfg, tok)
    cfg = dataclasses.replace(cfg, format=fmt)  # the checkpoint records what auto chose
    mc = ModelConfig(model=cfg.model, vocab_size=tok.vocab_size, block_size=cfg.block_size,
                     n_embd=cfg.n_embd, n_hidden=cfg.n_hidden, dropout=cfg.dropout)
    print(f"data={cfg.data} format={fmt} vocab={tok.vocab_size} "
          + " ".join(f"{k}={len(split.targets):,}" for k, split in splits.items()) + " targets")
    model = build_model(mc).to(device)
    print(f"model={mc.model} parameters={sum(p.numel() for p in model.parameters()):,}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate,
                                  weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == "float16")
    data_gen = torch.Generator().manual_seed(cfg.seed)  # the only source of training batches
    start_iter, best, t_origin = restore(ckpt, ckpt_path, model, optimizer, data_gen, mc, tok,
                                         cfg.max_iters)  # best: the kept model (val, iter, state)
    # the first write to --out-dir, every check passed: a fresh log, or the resumed run's so far
    open_log(out_dir, start_iter if ckpt is not None else None)
    model_ = torch.compile(model) if use_compile else model  # `model` stays raw for saving
    data_state = data_gen.get_state()  # the state that draws the batch now in hand
    x, y = get_batch(splits["train"], cfg.block_size, cfg.batch_size, model.every_target,
                     data_gen, device)
    t_log, iters_timed, targets_timed, step = time.time(), 0, 0, start_iter
    for step in range(start_iter, cfg.max_iters + 1):
        elapsed = time.time() - t_origin  # wall seconds of the whole run, across resumes
        last_step = step == cfg.max_iters or (cfg.max_time > 0 and elapsed >= cfg.max_time)
        # a resumed run has just loaded the checkpoint of start_iter: no second eval there
        resumed_here = ckpt is not None and step == start_iter
        if (step % cfg.eval_interval == 0 and not resumed_here) or last_step:
            losses = estimate_losses(model_, splits, cfg, device, ctx)
            print(f"step {step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
            if best[2] is None or losses["val"] < best[0]:  # keep the best val loss's weights
                best = (losses["val"], step, {k: v.to("cpu", copy=True)
                                              for k, v in model.state_dict().items()})
            append_jsonl(log_path, {"iter": step, "train_loss": losses["train"],
                                    "val_loss": losses["val"], "best_iter": best[1],
                                    "elapsed_s": elapsed})
            save_run(ckpt_path, cfg, mc, model, optimizer, step, best, data_state, tok,
                     time.time() - t_origin)
            t_log, iters_timed, targets_timed = time.time(), 0, 0  # evals are not timed
        if last_step:
            break
        # With --max-time the cosine also follows the clock (whichever is further along), so
        # the LR has decayed when the time is up (budgeted training, Li et al. 2020). Warmup
        # always counts steps: it is there for the first updates, however slow they are.
        progress = step
        if cfg.max_time > 0 and step >= cfg.warmup_iters:
            progress = max(step, int(cfg.max_iters * (time.time() - t_origin) / cfg.max_time))
        lr = get_lr(progress, cfg.learning_rate, cfg.min_lr, cfg.warmup_iters, cfg.max_iters)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with ctx:
            _, loss = model_(x, y)
        targets_timed += (y != IGNORE_INDEX).sum()  # a tensor: no device sync here
        # the next batch is drawn before backward (overlaps on an accelerator)
        data_state = data_gen.get_state()
        x, y = get_batch(splits["train"], cfg.block_size, cfg.batch_size, model.every_target,
                         data_gen, device)
        scaler.scale(loss).backward()
        if cfg.grad_clip > 0:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        lossf = loss.item()
        if not math.isfinite(lossf):
            die(f"loss is {lossf} at iter {step}; stopped, the last good checkpoint "
                f"{ckpt_path} is kept (try a lower --learning-rate)")
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        iters_timed += 1
        if step % cfg.log_interval == 0:
            log_step(log_path, cfg, step, lossf, lr, t_log, iters_timed, targets_timed, t_origin)
            t_log, iters_timed, targets_timed = time.time(), 0, 0
    return finish(model, tok, fmt, splits, cfg, step, best, t_origin, out_dir, device, ctx)


# -------------------------------------------------------------------------------
# Generation & evaluation
# -------------------------------------------------------------------------------
@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Extend every row of idx (B, T) by max_new_tokens sampled tokens -> (B, T + max_new_tokens).

    Both models see only the last block_size tokens, the context they were trained on (the
    MLP needs all of them: T >= block_size).
    """
    for _ in range(max_new_tokens):
        logits, _ = model(idx[:, -model.config.block_size:])  # (B, V)
        idx = torch.cat([idx, sample_logits(logits, temperature, top_k, top_p, generator)], dim=1)
    return idx


# -------------------------------------------------------------------------------
# Main
# -------------------------------------------------------------------------------
def main(argv=None):
    cfg, given = parse_config(Config, argv, __doc__.splitlines()[0])
    if cfg.model == "gru":
        cfg = apply_preset(cfg, GRU_DEFAULTS, given)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    if device.startswith("cuda"):
        cfg = apply_preset(cfg, GPU_PRESET, given)
    check_config(cfg, RULES, CHOICES)
    out_dir = Path(cfg.out_dir)
    if cfg.sample_only:
        return sample_only(cfg, out_dir, device)
    check_out_dir(out_dir, cfg.resume, cfg.overwrite)
    use_compile = device.startswith("cuda") if cfg.compile is None else cfg.compile
    print(" ".join(f"{k}={v!r}" for k, v in dataclasses.asdict(cfg).items()))
    print(f"device={device} dtype={dtype} compile={'on' if use_compile else 'off'}")
    try:
        return train(cfg, out_dir, device, dtype, use_compile)
    except torch.OutOfMemoryError:
        die(f"CUDA out of memory with --batch-size {cfg.batch_size}; "
            f"try --batch-size {max(1, cfg.batch_size // 2)}")


# -------------------------------------------------------------------------------
# Appendix: a first read can stop here (copies, bookkeeping, plumbing)
# -------------------------------------------------------------------------------
# ---- Appendix: extra — the GRU, a recurrent context (makemore's RNN) ----------
# The GRU reads its context step by step, so a longer context costs time, not parameters: 16
# tokens hold the longest name (15 letters) and its end. They replace the MLP's defaults.
GRU_DEFAULTS = dict(block_size=16, n_hidden=128, dropout=0.1, batch_size=32, max_iters=6000,
                    out_dir="out/mlp-gru")


class GRU(LanguageModel):
    """A gated recurrent unit (Cho et al. 2014, arXiv:1406.1078, Eqs. 5-8) run over the context.

    Per step, with x the token's embedding and h the previous state:
        z  = sigmoid(W_z x + U_z h + b_z)            update gate
        r  = sigmoid(W_r x + U_r h + b_r)            reset gate
        h~ = tanh(W x + b + r * (U h + b_u))         candidate state
        h' = (1 - z) * h + z * h~
    Two conventions, said out loud: z weights the *new* candidate, as in Chung et al. 2014
    (arXiv:1412.3555); Cho's paper and PyTorch write h' = z * h + (1 - z) * h~ (their z is our
    1 - z). And the reset gate scales U h after the matmul (PyTorch/cuDNN) rather than h
    before it (Cho's Eq. 8): then one (B, H) @ (H, 3H) matmul per step serves all three gates.

    The states of all T steps are computed anyway, so training reads out every one of them
    (`every_target`, a char-RNN's loss) instead of only the last like the MLP: T targets for
    the price of one window.
    """

    every_target = True

    def __init__(self, config):
        super().__init__(config)
        H = config.n_hidden
        self.w_x = nn.Linear(config.n_embd, 3 * H)  # [W_z; W_r; W] and their biases
        self.w_h = nn.Linear(H, 3 * H)  # [U_z; U_r; U] and their biases
        self.init_weights()
        # uniform(+-1/sqrt(fan_in)) on both sides, PyTorch's nn.GRU default
        for lin in (self.w_x, self.w_h):
            nn.init.uniform_(lin.weight, -lin.in_features ** -0.5, lin.in_features ** -0.5)
            nn.init.zeros_(lin.bias)

    def cell(self, gx, h):
        """One step: gx = W x + b for all gates (B, 3H), h (B, H) -> the next state (B, H)."""
        gz, gr, gn = gx.chunk(3, dim=-1)
        hz, hr, hn = self.w_h(h).chunk(3, dim=-1)  # (B, H) @ (H, 3H) -> 3 x (B, H)
        z = torch.sigmoid(gz + hz)
        r = torch.sigmoid(gr + hr)
        candidate = torch.tanh(gn + r * hn)
        return h + z * (candidate - h)  # = (1 - z) * h + z * candidate

    def forward(self, idx, targets=None):
        B, T = idx.shape
        gx = self.w_x(self.wte(idx))  # (B, T, C) @ (C, 3H) -> (B, T, 3H): inputs of all steps
        h = gx.new_zeros(B, self.config.n_hidden)  # h_0 = 0
        states = []
        for t in range(T):  # the recurrence: step t needs h from step t-1
            h = self.cell(gx[:, t], h)
            states.append(h)
        if targets is not None and targets.dim() == 2:  # a target after every prefix
            return self.readout(torch.stack(states, dim=1), targets)  # (B, T, H)
        return self.readout(h, targets)


# ---- Appendix: from gpt.py — sampling, unchanged ------------------------------
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


# ---- Appendix: data formats and tokenizers (characters or a bpe.py file) ----
class Split(NamedTuple):
    """One of train/val/test: a token stream and the positions it is scored on."""

    tokens: torch.Tensor  # (N,) the stream
    targets: torch.Tensor  # positions p with tokens[p] predicted from tokens[p-block_size:p]
    ends: torch.Tensor  # where the windows end that score every position (lines: item ends)
    is_target: torch.Tensor  # (N,) bool, True at `targets`

    def pool(self, every_target):
        return self.ends if every_target else self.targets


def make_split(tokens, targets, ends):
    # dtype long: an empty list (a split of too little data) would become a float tensor
    tokens, targets = (torch.as_tensor(t, dtype=torch.long) for t in (tokens, targets))
    is_target = torch.zeros(len(tokens), dtype=torch.bool)
    is_target[targets] = True
    return Split(tokens, targets, torch.as_tensor(ends, dtype=torch.long), is_target)


def lines_split(items, block_size, boundary):
    """Items (lists of ids) -> a Split with every context inside one item. Each item is laid
    down after `block_size` boundary tokens, so its first context is all boundary (makemore pads
    with '.'); its targets are its own tokens plus the boundary that follows it (the next item's
    padding), which teaches the model to stop. For a model that scores every position, one
    window per item: it starts at the boundary just before the item, so it sees each target
    once (items up to block_size - 1 tokens) and nothing of what follows. (A window that
    *ended* at the item's end would give the length away in its count of leading boundaries.)
    """
    tokens, targets, ends = [], [], []
    for ids in items:
        tokens += [boundary] * block_size
        start = len(tokens)
        targets += range(start, start + len(ids) + 1)
        ends.append(start - 1 + block_size)  # the window is tokens[start - 1:end]
        tokens += ids
    tokens += [boundary] * block_size  # the last item's closing boundary and window
    return make_split(tokens, targets, ends)


def guess_format(text):
    """lines when nearly every line is one short word (a list of names), else text."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    words = sum(len(ln.split()) == 1 and len(ln) <= 32 for ln in lines)
    return "lines" if lines and words >= 0.9 * len(lines) else "text"


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


class Tokenizer:
    """Characters or a bpe.py tokenizer, built from the plain data the checkpoint keeps.
    `boundary` marks where a line (a name) starts and ends: the newline, id 0, for characters;
    the first special token (e.g. <|endoftext|>) for BPE."""

    def __init__(self, state):
        self.state = state  # {"kind": "char", "chars"} or {"kind": "tiktoken", ...}
        if state["kind"] == "char":
            self.itos = state["chars"]
            self.stoi = {c: i for i, c in enumerate(self.itos)}
            self.vocab_size, self.boundary = len(self.itos), 0
        else:
            ranks = {base64.b64decode(t): rank for rank, t in enumerate(state["ranks_b64"])}
            self.enc = tiktoken.Encoding(name=state["name"], pat_str=state["pat_str"],
                                         mergeable_ranks=ranks, special_tokens=state["special"])
            if not state["special"]:
                die("--tokenizer: this tokenizer has no special token (e.g. <|endoftext|>), "
                    "which mlp.py needs to mark line boundaries and to start samples")
            self.vocab_size, self.boundary = self.enc.n_vocab, next(iter(state["special"].values()))

    @classmethod
    def from_chars(cls, text):
        # the newline goes first so that it is id 0 whatever else the text holds
        return cls({"kind": "char", "chars": "\n" + "".join(sorted(set(text) - {"\n"}))})

    @classmethod
    def from_bpe(cls, enc):
        # tiktoken keeps the ranks in _mergeable_ranks (its README reads it the same way)
        ranked = sorted(enc._mergeable_ranks.items(), key=lambda kv: kv[1])
        return cls({"kind": "tiktoken", "name": enc.name, "pat_str": enc._pat_str,
                    "ranks_b64": [base64.b64encode(b).decode() for b, _ in ranked],
                    "special": dict(enc._special_tokens)})

    def encode(self, text):
        if self.state["kind"] != "char":
            return self.enc.encode_ordinary(text)
        unknown = sorted(set(text) - set(self.stoi))
        if unknown:
            die(f"characters {unknown} are not in the vocabulary of this run; leave them out")
        return [self.stoi[c] for c in text]

    def decode(self, ids):
        if self.state["kind"] != "char":
            return self.enc.decode(ids)
        return "".join(self.itos[i] for i in ids)


# ---- Appendix: bookkeeping — resume, checkpoint, log record, final report -----
RESUME_KEYS = ("config", "model_args", "optimizer", "iter", "best_val_loss", "rng", "tokenizer",
               "elapsed_s")


def restore(ckpt, ckpt_path, model, optimizer, data_gen, mc, tok, max_iters):
    """Resume -> (start_iter, (best val loss, its iter, kept weights), t_origin moved back)."""
    if ckpt is None:
        return 0, (float("inf"), 0, None), time.time()
    if max_iters < ckpt["iter"]:
        die(f"--max-iters {max_iters}: the checkpoint is at iter {ckpt['iter']}; pass "
            f"--max-iters {ckpt['iter']} or more to continue it")
    if ckpt["model_args"] != dataclasses.asdict(mc) or ckpt["tokenizer"] != tok.state:
        die(f"{ckpt_path} was trained with another model or data ({ckpt['model_args']}); "
            "resume with the flags of that run")
    load_weights(model, ckpt.get("model_last", ckpt["model"]), ckpt_path)
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
        start_iter, best_val, elapsed_before = (ckpt[k] for k in ("iter", "best_val_loss",
                                                                  "elapsed_s"))
        best = (best_val, ckpt.get("best_iter", start_iter), ckpt["model"])
        # the RNG states go last: building the model above drew from the global generator
        torch.set_rng_state(ckpt["rng"]["torch"])
        if ckpt["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
        data_gen.set_state(ckpt["rng"]["data"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        die(f"{ckpt_path} cannot be resumed ({type(e).__name__}: {str(e)[:200]})")
    print(f"resumed from {ckpt_path} at iter {start_iter}")
    return start_iter, best, time.time() - elapsed_before


def save_run(path, cfg, mc, model, optimizer, step, best, data_state, tok, elapsed):
    """Everything --resume needs (`data_state` draws the batch in hand); `model` is the kept
    model, `model_last` (when another) the last step's, for --resume (docs/design.md 4)."""
    last = {} if best[1] == step else {"model_last": model.state_dict()}
    save_checkpoint({
        "script": "mlp.py", "version": 1, "config": dataclasses.asdict(cfg),
        "model_args": dataclasses.asdict(mc), "model": best[2], **last, "best_iter": best[1],
        "optimizer": optimizer.state_dict(), "iter": step, "best_val_loss": best[0],
        "rng": {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if model.lm_head.weight.is_cuda else [],
                "data": data_state},
        "tokenizer": tok.state, "elapsed_s": elapsed,
    }, path)


def log_step(log_path, cfg, step, lossf, lr, t_log, iters_timed, targets_timed, t_origin):
    """One training record, printed and in log.jsonl: the steps since t_log, timed."""
    if targets_timed.is_cuda:  # a tensor on the device: wait for it before reading the clock
        torch.cuda.synchronize()
    ms = (time.time() - t_log) * 1000 / iters_timed
    tokens_per_s = float(targets_timed) / (time.time() - t_log)  # targets predicted
    eta = (cfg.max_iters - step) * ms / 1000  # with --max-time: whichever ends first
    eta = min(eta, cfg.max_time - (time.time() - t_origin)) if cfg.max_time > 0 else eta
    print(f"iter {step}/{cfg.max_iters} | loss {lossf:.4f} | lr {lr:.1e} | {ms:.1f} ms | "
          f"{tokens_per_s / 1000:.1f}k tok/s | eta {format_eta(eta)}")
    append_jsonl(log_path, {"iter": step, "loss": lossf, "lr": lr, "ms_per_iter": ms,
                            "tokens_per_s": tokens_per_s, "elapsed_s": time.time() - t_origin})


def final_losses(model, splits, cfg, device, ctx):
    """Val/test loss over every window, or over `final_eval_max` evenly spaced ones. Lines:
    every target once (GRU: of items up to block_size - 1 tokens). Text, GRU: the windows
    overlap, each position counts with every context length from 1 to block_size."""
    losses = {}
    for name in ("val", "test"):
        pool = splits[name].pool(model.every_target)
        if len(pool) > cfg.final_eval_max:
            pool = pool[torch.linspace(0, len(pool) - 1, cfg.final_eval_max).long()]
        losses[name] = evaluate(model, splits[name], pool, cfg, device, ctx)
    return losses


def finish(model, tok, fmt, splits, cfg, step, best, t_origin, out_dir, device, ctx):
    """The kept model's val/test loss on the whole splits, samples, figures, the done record."""
    train_s = time.time() - t_origin
    model.load_state_dict(best[2])
    print(f"kept the model of iter {best[1]} (val loss {best[0]:.4f})"
          + ("" if best[1] == step else f"; ckpt.pt also holds iter {step}'s for --resume"))
    final = final_losses(model, splits, cfg, device, ctx)
    print(f"final: val loss {final['val']:.4f} | test loss {final['test']:.4f} | "
          f"{step} iters in {format_eta(train_s)}")
    samples = make_samples(model, tok, fmt, cfg, device)
    print(join_samples(samples, fmt), end="")
    (out_dir / "samples.txt").write_text(join_samples(samples, fmt))
    if cfg.plot:
        plot_run(model, tok, out_dir / "log.jsonl", out_dir)
    done = {"event": "done", "model": model.config.model, "test_loss": final["test"],
            "val_loss": final["val"], "best_val_loss": best[0], "best_iter": best[1], "iters": step,
            "train_s": train_s, "elapsed_s": time.time() - t_origin,
            "parameters": sum(p.numel() for p in model.parameters())}
    append_jsonl(out_dir / "log.jsonl", done)
    return done


def make_samples(model, tok, fmt, cfg, device):
    """`cfg.num_samples` texts: names cut at their closing boundary, or text continuations."""
    prompt = tok.encode(cfg.prompt)
    # start as lines start in training: after block_size boundaries (MLP) or one (GRU windows)
    pad = 1 if model.every_target else model.config.block_size
    start = torch.tensor([[tok.boundary] * pad + prompt] * cfg.num_samples, device=device)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    model.eval()
    out = generate(model, start, cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p,
                   generator)
    samples = []
    for row in out[:, pad:].tolist():
        if fmt == "lines" and tok.boundary in row[len(prompt):]:  # per-row stop
            row = row[:row.index(tok.boundary, len(prompt))]
        samples.append(tok.decode(row))
    return samples


def join_samples(samples, fmt):
    """One name a line; text samples, which hold newlines of their own, between rules."""
    return "".join(s + ("\n" if fmt == "lines" else "\n" + "-" * 40 + "\n") for s in samples)


def sample_only(cfg, out_dir, device):
    """--sample-only: rebuild tokenizer and model from the checkpoint and print samples."""
    path = out_dir / "ckpt.pt"
    ckpt = load_checkpoint(path, ["mlp.py"], ("config", "model_args", "tokenizer"))
    try:
        tok, mc = Tokenizer(ckpt["tokenizer"]), ModelConfig(**ckpt["model_args"])
    except (KeyError, TypeError) as e:  # another version's tokenizer or model_args
        die(f"{path} does not fit this mlp.py ({type(e).__name__}: {e})")
    model = build_model(mc).to(device)
    load_weights(model, ckpt["model"], path)
    samples = make_samples(model, tok, ckpt["config"]["format"], cfg, device)
    print(join_samples(samples, ckpt["config"]["format"]), end="")
    return {"samples": samples}


# ---- Appendix: flag rules — RULES, CHOICES, check_config ----------------------
# what each flag may be (docs/design.md section 6); `lambda v, c:` rules see the other flags
RULES = {
    **dict.fromkeys(("block_size", "n_embd", "n_hidden", "eval_interval", "eval_iters",
                     "final_eval_max", "log_interval", "batch_size", "num_samples",
                     "max_new_tokens"), (lambda v: v >= 1, "an integer >= 1")),
    **dict.fromkeys(("max_iters", "warmup_iters"), (lambda v: v >= 0, "an integer >= 0")),
    "dropout": (lambda v: 0 <= v < 1, "a probability in [0, 1)"),
    "seed": (lambda v: 0 <= v < 2**63, "an integer in 0..2**63-1"),
    "max_time": (lambda v: v >= 0, "a number of seconds >= 0 (0 = no limit)"),
    "learning_rate": (lambda v: v > 0, "a number > 0"),
    "min_lr": (lambda v, c: 0 <= v <= c.learning_rate,
               "a number in [0, --learning-rate {c.learning_rate}]"),
    "weight_decay": (lambda v: v >= 0, "a number >= 0"),
    "grad_clip": (lambda v: v >= 0, "a number >= 0 (0 = off)"),
    "temperature": (lambda v: v >= 0, "a number >= 0 (0 = greedy)"),
    "top_k": (lambda v: v is None or v >= 1, "an integer >= 1 (leave it out for no limit)"),
    "top_p": (lambda v: v is None or 0 < v <= 1, "a number in (0, 1]"),
    "plot": (lambda v: not v or importlib.util.find_spec("matplotlib") is not None,
             "--no-plot: it needs matplotlib (pip install matplotlib)"),
}
CHOICES = {"model": ("mlp", "gru"), "format": ("auto", "lines", "text")}


# -------------------------------------------------------------------------------
# Plumbing (the same in every script; tests/test_copies.py keeps the copies identical)
# -------------------------------------------------------------------------------
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


def plot_run(model, tok, log_path, out_dir):
    """embeddings.png: the token embeddings projected on their top-2 principal components;
    loss.png: the training and validation loss from log.jsonl."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no window
    import matplotlib.pyplot as plt

    emb = model.wte.weight.detach().float().cpu()  # (V, C)
    # PCA = SVD of the centred matrix; rows of U * S are the coordinates on the components
    U, S, _ = torch.linalg.svd(emb - emb.mean(0), full_matrices=False)
    xy = U[:, :2] * S[:2]  # (V, 2)
    fig, ax = plt.subplots(figsize=(8, 8))
    ax.scatter(xy[:, 0], xy[:, 1], s=200 if len(xy) <= 100 else 4)
    if len(xy) <= 100:  # a label per token is readable for characters, not for BPE
        for i, (px, py) in enumerate(xy.tolist()):
            ax.text(px, py, repr(tok.decode([i]))[1:-1], ha="center", va="center", color="white")
    ax.set(title="token embeddings, first two principal components", xlabel="PC1", ylabel="PC2")
    fig.savefig(out_dir / "embeddings.png", dpi=100)
    records = [json.loads(ln) for ln in log_path.read_text().splitlines()]
    fig, ax = plt.subplots(figsize=(8, 5))
    train = [(r["iter"], r["loss"]) for r in records if "loss" in r]
    val = [(r["iter"], r["val_loss"]) for r in records if "val_loss" in r]
    for points, label in ((train, "train (batch)"), (val, "val")):
        if points:
            ax.plot(*zip(*points), label=label)
    ax.set(xlabel="iteration", ylabel="loss (nats/token)", title="loss")
    ax.legend()
    fig.savefig(out_dir / "loss.png", dpi=100)
    plt.close("all")
    print(f"wrote {out_dir / 'embeddings.png'} and {out_dir / 'loss.png'}")


if __name__ == "__main__":
    main()
