"""Group Relative Policy Optimization (GRPO): RL with verifiable rewards, no value network.

PPO needs a learned critic to tell a good token from a lucky one. GRPO (Shao et al. 2024,
DeepSeekMath, arXiv:2402.03300) drops it: it samples a group of G answers per prompt, scores
each with a verifiable reward (here the task world's checker: 1 right, 0 wrong) and gives every
token of answer i its reward relative to its group, A_i = (r_i - mean(r)) / (std(r) + 1e-4).
The loss is PPO's clipped surrogate per token plus beta times a k3 estimate of KL(pi || pi_ref)
to the frozen SFT model, in the loss rather than the reward (grpo_loss), averaged per answer
and then over answers (grpo), over all tokens (dapo, Yu et al. 2025, arXiv:2503.14476) or over
a constant (dr_grpo, Liu et al. 2025, arXiv:2503.20783, who also drop the std: --scale none).
A group of equal rewards has A = 0 and teaches nothing; DAPO's dynamic sampling refills the
batch with groups that differ. GRPO starts from sft.py's model (or thinking: sft.py --think).

Run:
    python sft.py && python grpo.py                          # from the direct-answer model
    python sft.py --think && python grpo.py --init-from out/sft_think/ckpt.pt
    python grpo.py --loss-type dr_grpo --scale none          # or dapo; --no-dynamic-sampling
    torchrun --standalone --nproc_per_node 2 grpo.py         # each rank samples its share
    python grpo.py --sample-only --prompt "Count the letter a in: banana"

Result (2-core CPU): from the thinking model, held-out pass@1 0.970 -> 0.973 (docs/grpo.md).
Simplifications: one optimizer step per pass (--num-iterations); pi_ref is the SFT model; no LoRA.
"""
import argparse
import contextlib
import copy
import dataclasses
import hashlib
import inspect
import json
import math
import os
import random
import re
import sys
import time
import types
import typing
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
# the collectives' module: importing it before a process group exists makes
# destroy_process_group join gloo's threads (gpt.py explains the SIGABRT it avoids)
import torch.distributed.nn  # noqa: F401
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP


# -------------------------------------------------------------------------------
# Config
# -------------------------------------------------------------------------------
@dataclass
class Config:
    device: str = "auto"  # auto|cpu|cuda|cuda:N|mps
    dtype: str = "auto"  # auto|float32|bfloat16|float16
    compile: bool = False  # torch.compile the policy (on by default in the GPU preset)
    seed: int = 1337  # every random choice (prompts, samples) follows it
    out_dir: str = "out/grpo"  # ckpt.pt, log.jsonl, samples.txt and the figure go here
    init_from: str = "out/sft/ckpt.pt"  # the sft.py checkpoint: the policy's start and pi_ref
    group_size: int = 8  # G: answers sampled per prompt (a group)
    prompts_per_step: int = 16  # groups per step (G x this answers), shared out between ranks
    rollout_temperature: float = 1.0  # sampling temperature, also applied to every log-prob
    max_completion_length: int = 0  # tokens per sampled answer; 0 = the SFT model's eval budget
    format_reward: float = 0.0  # + this when the answer has its family's shape and stops
    scale: str = "group"  # advantage scale: group std (TRL), batch std, none (Dr. GRPO)
    loss_type: str = "grpo"  # grpo (per answer, then mean) | dapo (token mean) | dr_grpo
    beta: float = 0.04  # weight of the k3 KL to the reference in the loss (0: no reference)
    eps_low: float = 0.2  # the ratio is clipped to [1 - eps_low, 1 + eps_high]
    eps_high: float = 0.2  # DAPO's clip-higher raises this (e.g. 0.28)
    num_iterations: int = 1  # mu: updates per batch of answers (the clip acts when > 1)
    dynamic_sampling: bool = True  # DAPO: refill the batch with groups whose rewards differ
    max_resample: int = 3  # with --dynamic-sampling: extra batches of prompts tried per step
    mix: str = ""  # training prompts per family as sft.py's --mix (count=3: thrice the share)
    n_train: int = 6000  # training prompts (the train split of the SFT model's task world)
    max_iters: int = 200  # steps: one batch of answers each
    eval_interval: int = 50  # steps between greedy held-out evaluations and checkpoints
    learning_rate: float = 2e-5  # peak learning rate (AdamW)
    min_lr: float = 2e-6  # floor of the cosine decay
    warmup_iters: int = 10  # linear warmup steps
    weight_decay: float = 0.0  # AdamW decoupled weight decay on matrices (0: stay near SFT)
    grad_clip: float = 1.0  # clip the global gradient norm (0 = off)
    eval_batch_size: int = 256  # sequences decoded together in evaluations
    maj_k: int = 8  # before and after: k samples per held-out problem, maj@k and pass@k (0 off)
    maj_temperature: float = 0.7  # their temperature
    resume: bool = False  # continue the run saved in --out-dir
    overwrite: bool = False  # allow replacing an existing checkpoint in --out-dir
    sample_only: bool = False  # load the policy in --out-dir and only answer --prompt
    prompt: str = "What is 12 + 7?"  # instruction for --sample-only (wrapped in the template)
    num_samples: int = 1  # answers per prompt with --sample-only
    max_new_tokens: int = 40  # tokens per answer with --sample-only
    temperature: float = 0.0  # --sample-only: 0 = greedy; > 0 samples
    plot: bool = False  # write grpo.png: rewards, KL, held-out accuracy (needs matplotlib)


# on CUDA, for every field not given: more groups per step and more steps
GPU_PRESET = dict(prompts_per_step=64, max_iters=1000, eval_interval=100, compile=True)


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


# -------------------------------------------------------------------------------
# Group Relative Policy Optimization (NEW vs ppo.py: a group baseline, no critic)
# -------------------------------------------------------------------------------
def group_advantages(rewards, group_size, scale="group"):
    """rewards (N,) of N / group_size groups, each group's answers adjacent -> advantages (N,).

    Every answer is compared with the others to its prompt: A = r - mean(group r), then
    group: divided by the group's std + 1e-4 (unbiased, n - 1, as TRL; the 1e-4 outside the
    sqrt); batch: by the std of all N rewards + 1e-4 (TRL's scale_rewards="batch");
    none: not divided (Dr. GRPO: the std makes a nearly solved or nearly hopeless prompt
    weigh as much as an open one, a difficulty bias). A group of equal rewards gets A = 0
    exactly: no signal, whatever the scale. Never shuffle answers before this: a group must
    stay together (and, across processes, be gathered before it is normalised).
    """
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    r = rewards.float().view(-1, group_size)  # (groups, G)
    adv = r - r.mean(dim=1, keepdim=True)
    if scale == "group":
        adv = adv / (r.std(dim=1, keepdim=True) + 1e-4)
    elif scale == "batch":
        adv = adv / (r.std() + 1e-4)
    elif scale != "none":
        raise ValueError(f"unknown scale {scale!r}; expected group, batch or none")
    return adv.flatten()


def token_logps(logits, targets, temperature=1.0):
    """Per-token log pi(target) of the answers at the sampling temperature -> (logps, entropy),
    both (B, T) float32, 0 where the target is IGNORE_INDEX (prompt, padding).

    The logits are divided by the temperature the answers were sampled at, for the policy,
    the old policy and the reference alike: log-probs at another temperature are those of
    another distribution (the ratio and the KL would be off-policy from the first step).
    targets are already shifted (targets[t] follows input t). Masked positions may hold
    anything, even inf: their value is replaced with torch.where, never multiplied by a 0.
    The entropy (of the whole next-token distribution, a metric) carries no gradient.
    """
    mask = targets != IGNORE_INDEX
    safe = torch.where(mask, targets, 0)  # any valid id for the gather; the value is dropped
    logp = (logits.float() / temperature).log_softmax(dim=-1)  # (B, T, V)
    picked = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)  # (B, T)
    with torch.no_grad():
        entropy = -(logp.exp() * logp).sum(dim=-1)  # (B, T)
    zero = torch.zeros_like(picked)
    return torch.where(mask, picked, zero), torch.where(mask, entropy, zero)


def grpo_loss(logps, old_logps, ref_logps, advantages, mask, beta=0.04, eps_low=0.2,
              eps_high=0.2, loss_type="grpo", max_completion_length=None):
    """The GRPO objective over a batch of answers -> (loss, stats).

    logps, old_logps, ref_logps: (B, T) per-token log-probs of the sampled tokens under the
    policy being trained, the policy that sampled them, and the frozen reference (None when
    beta = 0); advantages (B,), one per answer; mask (B, T), True on the answer's tokens up to
    and including its first <|endoftext|>. Per token:
        -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A) + beta k3,   rho = exp(logp - old)
    the same pessimistic min for both signs of A (a max where A < 0 would be the optimistic
    bound, letting the ratio run). k3 = exp(ref - logp) - (ref - logp) - 1 (Schulman's
    estimator of KL(pi || ref) from samples of pi, the direction DeepSeek and TRL use) is >= 0
    and 0 where pi = ref. Aggregation: grpo, each answer's token mean, then the mean over
    answers (a short answer's tokens weigh more: the length bias Dr. GRPO points out); dapo,
    the mean over all tokens of the batch; dr_grpo, the sum over sequences x
    max_completion_length (a constant). With old = logps.detach() (one update per batch) the
    ratio is 1, and with beta = 0 the grpo loss is -mean(A) = 0 for whole groups, while its
    gradient is not: watch the reward, not this loss.
    """
    m = mask.bool()
    ratio = torch.exp(torch.where(m, logps - old_logps, 0.0))  # 1 where masked
    A = advantages.float().unsqueeze(1)  # (B, 1): the answer's advantage on each of its tokens
    surrogate = torch.min(ratio * A, ratio.clamp(1 - eps_low, 1 + eps_high) * A)
    per_token = -surrogate
    kl = None
    if ref_logps is not None:
        d = torch.where(m, ref_logps - logps, 0.0)
        kl = torch.exp(d) - d - 1  # (B, T), >= 0
        if beta:
            per_token = per_token + beta * kl
    per_token = torch.where(m, per_token, 0.0)
    n_tokens = m.sum(dim=1).clamp(min=1)  # (B,)
    if loss_type == "grpo":
        loss = (per_token.sum(dim=1) / n_tokens).mean()
    elif loss_type == "dapo":
        loss = per_token.sum() / m.sum().clamp(min=1)
    elif loss_type == "dr_grpo":
        if not max_completion_length:
            raise ValueError("dr_grpo needs max_completion_length")
        loss = per_token.sum() / (m.size(0) * max_completion_length)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected grpo, dapo or dr_grpo")
    with torch.no_grad():
        n = m.sum().clamp(min=1)
        # clipped tokens, by the side that binds: the ratio fell below 1 - eps_low where A < 0,
        # or rose above 1 + eps_high where A > 0 (elsewhere the min picks the unclipped term)
        low = ((ratio < 1 - eps_low) & (A < 0) & m).sum() / n
        high = ((ratio > 1 + eps_high) & (A > 0) & m).sum() / n
        stats = {"clip_ratio/low_mean": low.item(), "clip_ratio/high_mean": high.item(),
                 "clip_ratio/region_mean": (low + high).item()}
        if kl is not None:
            stats["kl"] = (torch.where(m, kl, 0.0).sum() / n).item()
    return loss, stats


def task_rewards(examples, completions, format_weight):
    """The verifiable reward of each answer: 1 when the checker accepts its final answer, 0
    otherwise, + format_weight when it has its family's shape and ends with <|endoftext|>
    -> (rewards (N,) float32, correct (N,) bool). examples[i] is the problem of completions[i]."""
    correct = torch.tensor([check_answer(c, ex["answer"])
                            for ex, c in zip(examples, completions)])
    shaped = torch.tensor([follows_format(c, ex["task"]) for ex, c in zip(examples, completions)])
    return correct.float() + format_weight * shaped.float(), correct


@torch.no_grad()
def sample_groups(model, tok, examples, group_size, temperature, max_new_tokens, uniforms,
                  device, ctx):
    """group_size answers to each of `examples` -> a list of id lists, entry i * G + g the g-th
    answer to examples[i], cut after its first <|endoftext|> (an answer that never stops keeps
    all max_new_tokens tokens).

    Sampling by the inverse CDF: the next token is the first whose cumulative probability (at
    the temperature) passes u = uniforms[row, t], one fixed number per answer and step drawn
    before the rollout. An answer depends only on its own row of uniforms, not on which rows
    share its batch, so 2 processes that each sample half of the prompts draw exactly the
    answers 1 process draws (tests/test_grpo.py checks it under torchrun). Prompts of equal
    token length decode together, with the KV cache and no padding, as in sft.py's evaluation.
    """
    eot = tok.special[EOT]
    rows = [None] * (len(examples) * group_size)
    groups = defaultdict(list)
    for i, ex in enumerate(examples):
        groups[len(encode_prompt(tok, ex["prompt"]))].append(i)
    for T, members in sorted(groups.items()):
        idx = torch.tensor([encode_prompt(tok, examples[i]["prompt"]) for i in members],
                           device=device).repeat_interleave(group_size, dim=0)  # (n, T)
        row_ids = [i * group_size + g for i in members for g in range(group_size)]
        u = uniforms[row_ids].to(device)  # (n, max_new_tokens)
        cache = KVCache(model.config, idx.size(0))
        with ctx:
            logits = prefill(model, idx, cache)  # (n, V)
        new, done = [], torch.zeros(idx.size(0), dtype=torch.bool, device=device)
        for t in range(max_new_tokens):
            cdf = (logits.float() / temperature).softmax(dim=-1).cumsum(dim=-1)  # (n, V)
            next_id = torch.searchsorted(cdf, u[:, t:t + 1].contiguous(), right=True)  # cdf > u
            next_id = next_id.clamp(max=cdf.size(-1) - 1)  # u above a rounded-down total
            new.append(next_id)
            done |= next_id.squeeze(1) == eot
            if done.all() or t == max_new_tokens - 1:
                break
            with ctx:
                logits = model(next_id, cache=cache)[0][:, -1, :]
        for r, ids in zip(row_ids, torch.cat(new, dim=1).tolist()):
            rows[r] = ids[:ids.index(eot) + 1] if eot in ids else ids
    return rows


def encode_rollout(prompt_ids, answer_ids):
    """Model input and targets for prompt + a sampled answer: targets[t] is the token after
    input t, IGNORE_INDEX on the prompt, so exactly the answer's tokens (its <|endoftext|>
    included, nothing after it) are scored. Built from lengths, never from a token id."""
    ids = prompt_ids + answer_ids
    n = len(prompt_ids) - 1  # targets[n] is the first answer token
    return ids[:-1], [IGNORE_INDEX] * n + ids[n + 1:]



def rollout(cfg, model, tok, examples, max_len, generator, rank, world_size, device, ctx):
    """One batch of groups for this process: its share of the step's prompts, group_size
    answers each, rewarded by the checker -> dict of encoded answers and per-answer data.

    The step's prompts and uniforms are drawn for every process from the same generator, and
    each process keeps its slice (rank r: prompts [r P/W, (r+1) P/W)), so the union over ranks
    is one process's batch. With --dynamic-sampling, groups whose rewards are all equal are
    dropped and more prompts are drawn (up to max_resample more times) until the share is
    full; a share still short is topped up with dropped groups (A = 0: no gradient). Each
    process refills its own share, so under DDP the batch is no longer one process's.
    """
    share = cfg.prompts_per_step // world_size
    kept, spare, n_drawn = [], [], 0
    for attempt in range(1 + (cfg.max_resample if cfg.dynamic_sampling else 0)):
        pick = torch.randint(len(examples), (cfg.prompts_per_step,), generator=generator)
        u = torch.rand(cfg.prompts_per_step * cfg.group_size, max_len, generator=generator)
        mine = pick[rank * share:(rank + 1) * share].tolist()
        rows = u[rank * share * cfg.group_size:(rank + 1) * share * cfg.group_size]
        exs = [examples[i] for i in mine]
        answers = sample_groups(model, tok, exs, cfg.group_size, cfg.rollout_temperature,
                                max_len, rows, device, ctx)
        n_drawn += len(exs)
        for i, ex in enumerate(exs):
            group = answers[i * cfg.group_size:(i + 1) * cfg.group_size]
            texts = [completion_text(tok, a) for a in group]
            rewards, correct = task_rewards([ex] * len(group), texts, cfg.format_reward)
            item = (ex, group, texts, rewards, correct)
            (kept if not cfg.dynamic_sampling or rewards.std() > 0 else spare).append(item)
        if len(kept) >= share:
            break
    kept = (kept + spare)[:share]
    ex_rows = [ex for ex, group, *_ in kept for _ in group]
    encoded = [encode_rollout(encode_prompt(tok, ex["prompt"]), a)
               for ex, group, *_ in kept for a in group]
    return {"examples": ex_rows, "encoded": encoded,
            "texts": [t for _, _, texts, _, _ in kept for t in texts],
            "rewards": torch.cat([r for *_, r, _ in kept]),
            "correct": torch.cat([c for *_, c in kept]), "prompts_drawn": n_drawn}


# -------------------------------------------------------------------------------
# Training: the policy and its data, the step, the loop, evaluation, main
# -------------------------------------------------------------------------------
def load_sft(cfg, device):
    """The sft.py checkpoint GRPO starts from -> (its policy with dropout 0, tokenizer, the
    checkpoint dict, training prompts, held-out problems, answer budget in tokens); a missing
    file names the command that writes it. The held-out set is exactly sft.py's (same seed,
    difficulty and count): every stage of the chain scores the same problems the same way."""
    if not Path(cfg.init_from).is_file():
        die(f"{cfg.init_from} not found: run python sft.py first (or python sft.py --think, or "
            f"point --init-from at an sft.py checkpoint)")
    ckpt = load_checkpoint(cfg.init_from, ("sft.py",), ("model_args", "config", "tokenizer"))
    sft_cfg = ckpt["config"]
    if sft_cfg.get("task", "generate") != "generate":
        die(f"{cfg.init_from} is a --task classify checkpoint; grpo.py needs a generating SFT "
            f"model")
    policy, tok = policy_from(ckpt, cfg.init_from, device)
    think = sft_cfg.get("think", False)  # a thinking model: answers carry their traces
    max_len = cfg.max_completion_length or sft_cfg.get("eval_max_new_tokens", 16)
    try:
        train_ex = make_tasks(cfg.n_train, "train", cfg.seed + 2, sft_cfg["difficulty"],
                              mix_families(cfg.mix), think)
        test_ex = make_tasks(sft_cfg["n_test"], "test", sft_cfg["seed"] + 1,
                             sft_cfg["difficulty"], think=think)
    except (ValueError, KeyError) as e:
        die(f"cannot build the task world of {cfg.init_from} ({e}); lower --n-train")
    longest = max(len(encode_prompt(tok, ex["prompt"])) for ex in train_ex + test_ex)
    block_size = ckpt["model_args"]["block_size"]
    if longest + max_len > block_size:
        die(f"prompts of {longest} tokens + {max_len} answer tokens exceed the context of "
            f"{cfg.init_from} ({block_size} tokens); lower --max-completion-length")
    return policy, tok, ckpt, train_ex, test_ex, max_len


def grpo_step(cfg, model, raw_model, reference, optimizer, scaler, params, lr, idx, tgt, mask,
              advantages, share, max_len, ctx):
    """num_iterations updates on one batch at learning rate lr -> the last one's (loss, stats,
    entropy, grad_norm); pi_ref's log-probs (and pi_old's, when > 1) are taken once, first."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    with torch.no_grad(), ctx:
        ref_logps = (token_logps(reference(idx)[0], tgt, cfg.rollout_temperature)[0]
                     if reference is not None else None)
        old_logps = (token_logps(raw_model(idx)[0], tgt, cfg.rollout_temperature)[0]
                     if cfg.num_iterations > 1 else None)
    for it in range(cfg.num_iterations):
        with ctx:
            logits = model(idx)[0]
        logps, entropy = token_logps(logits, tgt, cfg.rollout_temperature)
        # one update per batch: the sampling policy is this one (ratio 1, no clipping)
        old = logps.detach() if old_logps is None else old_logps
        loss, stats = grpo_loss(logps, old, ref_logps, advantages, mask, cfg.beta,
                                cfg.eps_low, cfg.eps_high, cfg.loss_type, max_len)
        scaler.scale(loss * share).backward()
        if cfg.grad_clip > 0:
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip).item()
        else:
            grad_norm = math.sqrt(sum(p.grad.pow(2).sum().item() for p in params
                                      if p.grad is not None))
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    return loss, stats, entropy, grad_norm


def gathered(x, world_size):
    """The concatenation over all processes of an equal-sized tensor x (x itself without DDP)."""
    if world_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x)
    return torch.cat(parts)


def train(cfg, device, device_type, dtype, ctx, rank, world_size):
    """The GRPO loop: rollout, rewards, group advantages, updates; evaluations on rank 0."""
    master, out_dir = rank == 0, Path(cfg.out_dir)
    ckpt_path, log_path = out_dir / "ckpt.pt", out_dir / "log.jsonl"
    resumed = None
    if cfg.resume:
        resumed = load_checkpoint(ckpt_path, ("grpo.py",), ("model", "optimizer", "iter",
                                                            "sft_from", "before"))
        cfg = dataclasses.replace(cfg, init_from=resumed["sft_from"])
    t_start = time.time()
    torch.manual_seed(cfg.seed)
    policy, tok, sft_ckpt, train_ex, test_ex, max_len = load_sft(cfg, device)
    # pi_ref: a frozen deep copy, never the policy itself (KL 0 for ever); none with beta = 0
    reference = copy.deepcopy(policy).eval().requires_grad_(False) if cfg.beta else None
    policy.train()  # dropout is 0: train mode changes nothing but is honest
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
         {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
        lr=cfg.learning_rate, betas=(0.9, 0.95), fused=device_type == "cuda")
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == "float16")
    # the first step (0, or the resumed run's) and `before`: the SFT model's scores (rank 0)
    start, before = start_run(cfg, resumed, policy, optimizer, tok, test_ex, max_len, sft_ckpt,
                              params, reference, master, device, ctx)
    model = torch.compile(policy) if cfg.compile else policy  # policy: saved, sampled, scored
    if world_size > 1:
        model = DDP(model, device_ids=[torch.device(device).index] if device_type == "cuda"
                    else None)
    t_last = time.time()
    for step in range(start, cfg.max_iters + 1):
        last_step = step == cfg.max_iters
        if master and (step % cfg.eval_interval == 0 or last_step) and (step > start or
                                                                         step == 0):
            m = (before if step == 0 else
                 evaluate(cfg, policy, tok, test_ex, max_len, device, ctx, with_maj=False))
            print(f"step {step}: held-out pass@1 {m['accuracy']:.3f} "
                  + " ".join(f"{t} {a:.2f}" for t, a in m["accuracy_by_task"].items()))
            record = {k: m[k] for k in ("accuracy", "accuracy_by_task", "format_rate")}
            append_jsonl(log_path, {"iter": step, **record, "elapsed_s": time.time() - t_start})
            if step > start:
                save_checkpoint(make_ckpt(cfg, step, policy, optimizer, tok, sft_ckpt, before),
                                ckpt_path)
            t_last = time.time()  # evaluation time is not training time
        if last_step:
            break
        # ---- rollout: G answers to each of this process's prompts, at the temperature ----
        t0 = time.time()
        step_gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)  # resume-exact
        policy.eval()
        batch = rollout(cfg, policy, tok, train_ex, max_len, step_gen, rank, world_size,
                        device, ctx)
        policy.train()
        t_rollout = time.time() - t0
        # ---- advantages over whole groups, gathered from every process first ----
        rewards = gathered(batch["rewards"].to(device), world_size)
        n = len(batch["encoded"])  # this process's answers: its slice of the advantages
        advantages = group_advantages(rewards, cfg.group_size, cfg.scale)[rank * n:(rank + 1) * n]
        # ---- the update: num_iterations passes of the GRPO loss over the batch ----
        idx, tgt = (x.to(device) for x in collate(batch["encoded"], tok.special[PAD]))
        mask = tgt != IGNORE_INDEX
        # dapo averages over all answer tokens of all processes; DDP averages the processes'
        # gradients, so each one's token mean is rescaled by its share of the tokens
        n_global = gathered(mask.sum().view(1), world_size).sum()
        share = (mask.sum() * world_size / n_global).item() if cfg.loss_type == "dapo" else 1.0
        lr = get_lr(step, cfg.learning_rate, cfg.min_lr, cfg.warmup_iters, cfg.max_iters)
        loss, stats, entropy, grad_norm = grpo_step(cfg, model, policy, reference, optimizer,
                                                    scaler, params, lr, idx, tgt, mask,
                                                    advantages, share, max_len, ctx)
        t_last = log_step(cfg, step, start, lr, loss.item() * share, stats, entropy, mask, batch,
                          rewards, grad_norm, t_start, t_last, t_rollout, rank, world_size, device)
    if not master:  # after: rank 0 scores the same held-out problems, greedy and maj@k
        return None
    after = evaluate(cfg, policy, tok, test_ex, max_len, device, ctx, with_maj=True)
    return report(cfg, policy, optimizer, tok, sft_ckpt, before, after, t_start)


def evaluate(cfg, model, tok, test_ex, max_len, device, ctx, with_maj):
    """Greedy accuracy (pass@1, as sft.py) on the held-out problems, and maj@k / pass@k."""
    m = evaluate_tasks(model, tok, test_ex, max_len, cfg.eval_batch_size, device, ctx)
    out = {k: m[k] for k in ("accuracy", "accuracy_by_task", "format_rate", "length_by_task")}
    out["completions"] = {ex["prompt"]: c for ex, c in m["samples"]}
    if with_maj and cfg.maj_k:
        gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
        out.update(evaluate_majority(model, tok, test_ex, cfg.maj_k, cfg.maj_temperature,
                                     max_len, cfg.eval_batch_size, device, ctx, gen))
    return out


def main(argv=None):
    cfg, given = parse_config(Config, argv, __doc__.splitlines()[0])
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = resolve_device(cfg.device)
    if device.startswith("cuda") and world_size > 1:
        device = f"cuda:{os.environ['LOCAL_RANK']}"  # torchrun starts one process per GPU
        torch.cuda.set_device(device)
    if device.startswith("cuda"):
        cfg = apply_preset(cfg, GPU_PRESET, given)
    dtype = resolve_dtype(cfg.dtype, device)
    check_config(cfg, RULES, CHOICES)
    if cfg.prompts_per_step % world_size:
        die(f"--prompts-per-step {cfg.prompts_per_step}: expected a multiple of the "
            f"{world_size} processes (each samples whole groups)")
    if rank == 0:
        print(" ".join(f"{k}={v}" for k, v in dataclasses.asdict(cfg).items()))
        print(f"device={device} dtype={dtype} compile={'on' if cfg.compile else 'off'}"
              + (f" ddp world_size={world_size}" if world_size > 1 else ""))
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    ctx = (torch.amp.autocast(device_type, dtype=getattr(torch, dtype)) if dtype != "float32"
           else contextlib.nullcontext())
    if cfg.sample_only:
        return sample_only(cfg, device, ctx)
    check_out_dir(Path(cfg.out_dir), cfg.resume, cfg.overwrite)
    ddp = world_size > 1
    if ddp:
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    try:
        done = train(cfg, device, device_type, dtype, ctx, rank, world_size)
        if ddp:  # rank 0 evaluates and writes last; the others wait for it
            dist.barrier()
        return done
    except torch.OutOfMemoryError:
        die(f"CUDA out of memory with --prompts-per-step {cfg.prompts_per_step}; try "
            f"--prompts-per-step {max(1, cfg.prompts_per_step // 2)}")
    finally:
        if ddp:  # on every way out; joins gloo's threads, which must not outlive the interpreter
            dist.destroy_process_group()


# -------------------------------------------------------------------------------
# Appendix: a first read can stop here (copies, bookkeeping, plumbing)
# -------------------------------------------------------------------------------
# ---- Appendix: from sft.py — the task world, the model, sampling and evaluation, unchanged ----
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

    def encode(self, text, allowed_special=()):
        """NEW vs llama.py: as tiktoken's `encode`, the special-token strings listed in
        allowed_special become their ids; the rest of the text is plain bytes."""
        if not allowed_special:
            return self.encode_ordinary(text)
        ids = []
        for part in re.split("(" + "|".join(map(re.escape, allowed_special)) + ")", text):
            ids += [self.special[part]] if part in allowed_special else self.encode_ordinary(part)
        return ids

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


TASK_FAMILIES = ("add", "sub", "reverse", "sort", "count", "compare")
# Alpaca-style (Taori et al. 2023)
PROMPT_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"
EOT = "<|endoftext|>"  # ends every response; generation stops there
PAD = "<|pad|>"  # fills ragged batches (its targets are IGNORE_INDEX)
TEMPLATE_TOKENS = {"### Instruction:\n": 258, "\n\n### Response:\n": 259}


def make_word(rng, length):
    """A pronounceable pseudo-word: consonants and vowels alternate (no word list needed)."""
    start = rng.randrange(2)
    return "".join(rng.choice("aeiou" if (i + start) % 2 else "bcdfghklmnprstvz")
                   for i in range(length))


def make_number(rng, digits):
    """A number with exactly `digits` digits (1 digit includes 0)."""
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10 ** digits - 1)


def make_task(family, rng, difficulty, think=False):
    """One problem of `family` at level `difficulty` (1 = easiest) -> {task, prompt, answer}.

    Level L means L-digit numbers (the second operand of + and - has 1..L digits) and words
    of 2L+1 or 2L+2 letters, so the knob scales every family the same way. With `think`, the
    answer of a family that needs one carries a worked trace first, '<trace> = <answer>' (the
    random draws are the same, so the problems are too; `final_answer` reads the answer).
    """
    if family in ("add", "sub"):
        a, b = make_number(rng, difficulty), make_number(rng, rng.randint(1, difficulty))
        if family == "add":
            return {"task": family, "prompt": f"What is {a} + {b}?", "answer": str(a + b)}
        a, b = max(a, b), min(a, b)  # keep the difference non-negative
        return {"task": family, "prompt": f"What is {a} - {b}?", "answer": str(a - b)}
    if family == "compare":
        a = make_number(rng, difficulty)
        b = make_number(rng, difficulty)
        while b == a:
            b = make_number(rng, difficulty)
        return {"task": family, "prompt": f"Which is larger: {a} or {b}?", "answer": str(max(a, b))}
    word = make_word(rng, 2 * difficulty + rng.randint(1, 2))
    if family == "reverse":
        return {"task": family, "prompt": f"Reverse the word: {word}", "answer": word[::-1]}
    if family == "sort":
        return {"task": family, "prompt": f"Sort the letters: {word}",
                "answer": "".join(sorted(word))}
    if family == "count":
        # half the time a letter of the word, so answers are not almost always 0
        letter = (rng.choice(word) if rng.random() < 0.5
                  else rng.choice("abcdefghijklmnopqrstuvwxyz"))
        answer = str(word.count(letter))
        if think:  # the letter, then a running tally: banana, a -> a: b0a1n1a2n2a3 = 3
            tally = "".join(f"{c}{word[:i + 1].count(letter)}" for i, c in enumerate(word))
            answer = f"{letter}: {tally} = {answer}"
        return {"task": family, "prompt": f"Count the letter {letter} in: {word}",
                "answer": answer}
    raise ValueError(f"unknown task family {family!r}; expected one of {TASK_FAMILIES}")


def task_split(prompt):
    """'test' for one prompt in five, 'train' otherwise: a hash of the text decides, so the
    two splits are disjoint by construction, whatever the seed or the order of generation."""
    return "test" if int(hashlib.sha256(prompt.encode()).hexdigest(), 16) % 5 == 0 else "train"


def make_tasks(n, split, seed, difficulty, families=TASK_FAMILIES, think=False):
    """`n` distinct problems of `split`, an equal share per family, levels from 1..difficulty.

    Rejection sampling: a generated problem is kept only if `task_split` puts it in `split`
    and its prompt is new. Each example also records its `level` (for the curriculum).
    """
    rng = random.Random(seed)
    out, seen = [], set()
    for k, family in enumerate(families):
        quota = n // len(families) + (k < n % len(families))
        for _ in range(100 * quota + 1000):  # a small task space runs out: stop, don't loop
            if quota == 0:
                break
            level = rng.randint(1, difficulty)
            ex = make_task(family, rng, level, think)
            if task_split(ex["prompt"]) == split and ex["prompt"] not in seen:
                seen.add(ex["prompt"])
                out.append(dict(ex, level=level))
                quota -= 1
        if quota:
            raise ValueError(f"too few distinct {split} problems of {family} at difficulty "
                             f"{difficulty} for n={n}")
    return out


def format_prompt(prompt):
    """The full text the model sees before its answer, up to and including '### Response:\\n'."""
    return PROMPT_TEMPLATE.format(prompt=prompt)


def encode_prompt(tok, prompt):
    """The template around `prompt` -> ids: one id per marker when the tokenizer has the
    TEMPLATE_TOKENS (sft.py from scratch), the bytes of the markers when not (a llama.py base)."""
    return tok.encode(format_prompt(prompt), [m for m in TEMPLATE_TOKENS if m in tok.special])


def task_tokenizer(template_tokens=True):
    """A fresh byte tokenizer for the task world; with template_tokens the two markers of the
    prompt template take the ids of <|reserved_2|> and <|reserved_3|> (TEMPLATE_TOKENS)."""
    special = dict(BYTE_SPECIAL)
    if template_tokens:
        special = {name: i for name, i in special.items() if i not in TEMPLATE_TOKENS.values()}
        special.update(TEMPLATE_TOKENS)
    return ByteTokenizer(special)


def final_answer(text):
    """The answer a response gives: cut at <|endoftext|>, the text after the last ' = ' (a
    worked trace ends '... = 3'); a response without a trace is all answer."""
    return text.split(EOT)[0].rsplit(" = ", 1)[-1]


def check_answer(completion, answer):
    """True when the completion's final answer is exactly the gold one: a different trace that
    reaches the right answer counts (the trace is the model's working, not the graded part)."""
    return final_answer(completion).strip() == final_answer(answer).strip()


ANSWER_SHAPES = {"add": r"\d+", "sub": r"\d+", "compare": r"\d+", "count": r"\d+",
                 "reverse": r"[a-z]+", "sort": r"[a-z]+"}  # what a well-formed answer looks like


def follows_format(completion, family):
    """Format adherence: the (final) answer has the family's shape and <|endoftext|> ends it."""
    return (EOT in completion
            and re.fullmatch(ANSWER_SHAPES[family], final_answer(completion)) is not None)


def mix_families(mix):
    """--mix 'add=2,sub=2' -> the families tuple whose entries make_tasks shares n out to
    equally, so a family listed twice gets twice the problems (a weight of 0 drops it)."""
    weights = dict.fromkeys(TASK_FAMILIES, 1)
    for item in filter(None, mix.split(",")):
        name, _, weight = item.partition("=")
        if name not in weights or not weight.isdigit():
            die(f"--mix {mix}: expected family=weight pairs, families {', '.join(TASK_FAMILIES)}")
        weights[name] = int(weight)
    if not any(weights.values()):
        die(f"--mix {mix}: every family has weight 0")
    return tuple(f for f in TASK_FAMILIES for _ in range(weights[f]))


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
    # (hs/2,)
    inv_freq = theta ** (-torch.arange(0, hs, 2, dtype=torch.float64, device=pos.device) / hs)
    angles = pos.double()[:, None] * inv_freq[None, :]  # (T, 1) * (1, hs/2) -> (T, hs/2)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x, cos, sin):
    """NEW vs gpt.py: rotary position embedding (RoFormer, Su et al. 2021, arXiv:2104.09864).

    Each pair (x_i, x_{i+hs/2}) of a query or key x (..., hs) at position m is turned by the
    angle m*w_i (cos, sin: (T, hs/2), or (T, 1, hs/2) for x in (B, T, heads, hs) layout).
    Relative position falls out of the dot product: with R(a) the rotation by a,
    q_m . k_n = (R(mw) q)^T (R(nw) k) = q^T R(mw)^T R(nw) k = q^T R((n-m)w) k, because rotations
    compose and R(a)^T = R(-a). An attention score depends only on the offset n - m (Eq. 16 of
    the paper), never on where the pair sits in the text, and rotations keep norms. Which
    dimensions pair up is a convention (halves here, like GPT-NeoX and Hugging Face's Llama;
    Meta's code interleaves): Wq and Wk absorb it.
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


def collate(batch, pad_id):
    """Right-pad a list of (ids, targets) to the longest one -> idx, targets (B, T) tensors.

    Padding positions get IGNORE_INDEX targets (no loss); with causal attention a padding
    token sits *after* every real one, so it changes no real position's output.
    """
    T = max(len(ids) for ids, _ in batch)
    idx = torch.full((len(batch), T), pad_id, dtype=torch.long)
    tgt = torch.full((len(batch), T), IGNORE_INDEX, dtype=torch.long)
    for i, (ids, targets) in enumerate(batch):
        idx[i, :len(ids)] = torch.tensor(ids)
        tgt[i, :len(targets)] = torch.tensor(targets)
    return idx, tgt


def get_lr(step, learning_rate, min_lr, warmup_iters, lr_decay_iters):
    """Linear warmup for `warmup_iters`, cosine decay to `min_lr` at `lr_decay_iters`, then flat."""
    if step < warmup_iters:
        return learning_rate * (step + 1) / (warmup_iters + 1)
    if step >= lr_decay_iters:
        return min_lr
    ratio = (step - warmup_iters) / max(1, lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


@torch.no_grad()
def evaluate_tasks(model, tok, examples, max_new_tokens, batch_size, device, ctx):
    """Greedy answers to the test problems -> exact-match accuracy and format adherence.

    Prompts of equal token length are decoded together, so a batch needs no padding and the
    KV cache no attention mask; each batch stops once every row has emitted <|endoftext|>.
    """
    model.eval()
    groups = defaultdict(list)
    for ex in examples:
        groups[len(encode_prompt(tok, ex["prompt"]))].append(ex)
    results = []
    for T, group in sorted(groups.items()):
        for i in range(0, len(group), batch_size):
            chunk = group[i:i + batch_size]
            idx = torch.tensor([encode_prompt(tok, ex["prompt"]) for ex in chunk], device=device)
            with ctx:
                out = generate_until(model, idx, max_new_tokens, tok.special[EOT])
            for ex, row in zip(chunk, out[:, T:].tolist()):
                results.append((ex, completion_text(tok, row)))
    model.train()
    by_task = defaultdict(list)
    for ex, completion in results:
        response = completion.split(EOT)[0]
        by_task[ex["task"]].append((check_answer(completion, ex["answer"]),
                                    follows_format(completion, ex["task"]),
                                    response.strip() == ex["answer"].strip(),  # trace and all
                                    len(tok.encode_ordinary(response))))
    per_task = [{t: sum(r[j] for r in v) / len(v) for t, v in by_task.items()} for j in range(4)]
    acc, fmt, exact, length = per_task
    return {"accuracy": sum(acc.values()) / len(acc), "accuracy_by_task": acc,
            "format_rate": sum(fmt.values()) / len(fmt), "format_by_task": fmt,
            "exact_by_task": exact, "length_by_task": length,
            "counts": {t: len(v) for t, v in by_task.items()}, "samples": results}


@torch.no_grad()
def evaluate_majority(model, tok, examples, k, temperature, max_new_tokens, batch_size, device,
                      ctx, generator):
    """Self-consistency (Wang et al. 2022): k sampled responses per problem; maj@k is right
    when the most common final answer (over responses that stop) is the gold one, pass@k when
    any response is right. Ties go to the answer sampled first."""
    model.eval()
    responses = sample_answers(model, tok, examples, k, temperature, max_new_tokens, batch_size,
                               device, ctx, generator)
    model.train()
    hits = defaultdict(list)
    for ex, group in zip(examples, responses):
        votes = Counter(final_answer(r).strip() for r in group if EOT in r)
        vote = votes.most_common(1)[0][0] if votes else None
        hits[ex["task"]].append((vote == final_answer(ex["answer"]).strip(),
                                 any(check_answer(r, ex["answer"]) for r in group)))
    maj = {t: sum(m for m, _ in v) / len(v) for t, v in hits.items()}
    pas = {t: sum(p for _, p in v) / len(v) for t, v in hits.items()}
    return {"maj_k": k, "maj_at_k": sum(maj.values()) / len(maj), "maj_by_task": maj,
            "pass_at_k": sum(pas.values()) / len(pas), "pass_by_task": pas}


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


@torch.no_grad()
def generate_until(model, idx, max_new_tokens, stop_id, temperature=0.0, top_k=None, top_p=None,
                   generator=None):
    """`generate` that stops early once every row has emitted stop_id (an answer ends with
    <|endoftext|>); a row that stopped keeps sampling until the others do: cut it with
    `completion_text`."""
    done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
    out = [idx]
    for next_id in stream(model, idx, max_new_tokens, temperature, top_k, top_p, generator):
        out.append(next_id)  # (B, 1)
        done |= next_id.squeeze(1) == stop_id
        if done.all():
            break
    return torch.cat(out, dim=1)  # (B, T0 + new)


def completion_text(tok, ids):
    """Generated ids -> text, cut after the first <|endoftext|>; ids of the padded vocabulary
    that no token has (rare once trained) are dropped."""
    eot = tok.special[EOT]
    if eot in ids:
        ids = ids[:ids.index(eot) + 1]
    return tok.decode([i for i in ids if i < tok.n_vocab])


@torch.no_grad()
def sample_answers(model, tok, examples, n, temperature, max_new_tokens, batch_size, device,
                   ctx, generator):
    """n sampled responses per problem -> a list (per example) of n response texts, each cut
    after its <|endoftext|> (a response that never stops has none).

    As in sft.py's evaluation, prompts of equal token length are decoded together (no padding,
    no attention mask in the KV cache): each prompt n times, batch_size rows at a time.
    """
    groups = defaultdict(list)
    for i, ex in enumerate(examples):
        groups[len(encode_prompt(tok, ex["prompt"]))].append(i)
    out = [None] * len(examples)
    per_batch = max(1, batch_size // n)
    for T, members in sorted(groups.items()):
        for j in range(0, len(members), per_batch):
            chunk = members[j:j + per_batch]
            ids = [encode_prompt(tok, examples[i]["prompt"]) for i in chunk]
            idx = torch.tensor(ids, device=device).repeat_interleave(n, dim=0)  # (len * n, T)
            with ctx:
                rows = generate_until(model, idx, max_new_tokens, tok.special[EOT], temperature,
                                      generator=generator)[:, T:].tolist()
            for k, i in enumerate(chunk):
                out[i] = [completion_text(tok, r) for r in rows[k * n:(k + 1) * n]]
    return out


# ---- Appendix: bookkeeping — loading, restore, checkpoint, log record, report, --sample-only ----
def policy_from(ckpt, path, device):
    """A checkpoint's Llama (dropout 0, eval mode) and the byte tokenizer it was trained with
    (the task world needs its specials) -> (model, tok)."""
    state = ckpt.get("tokenizer", {})
    if state.get("kind") != "byte" or not {EOT, PAD} <= set(state.get("special", {})):
        die(f"{path} uses a {state.get('kind')!r} tokenizer; grpo.py needs sft.py's byte "
            f"tokenizer with {EOT} and {PAD}")
    tok = ByteTokenizer(state["special"])
    model = Llama(ModelConfig(**dict(ckpt["model_args"], dropout=0.0)))
    load_weights(model, ckpt["model"], path)
    return model.to(device).eval(), tok


def load_weights(model, state, path):
    """load_state_dict with a one-line error when the checkpoint does not fit the model."""
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:
        detail = str(e).splitlines()[1].strip() if "\n" in str(e) else str(e)
        die(f"{path} does not fit this model ({detail})")


def start_run(cfg, resumed, policy, optimizer, tok, test_ex, max_len, sft_ckpt, params,
              reference, master, device, ctx):
    """-> (first step, `before`): on --resume the saved policy, optimizer and `before`, else
    rank 0 measures `before`; then rank 0 opens the log and says where the policy comes from."""
    start, before = 0, None
    if resumed is not None:
        before = resumed["before"]
        load_weights(policy, resumed["model"], Path(cfg.out_dir) / "ckpt.pt")
        optimizer.load_state_dict(resumed["optimizer"])
        start = resumed["iter"]
        if cfg.max_iters < start:
            die(f"--max-iters {cfg.max_iters}: the checkpoint is at iter {start}; pass "
                f"--max-iters {start} or more to continue it")
    elif master:
        before = evaluate(cfg, policy, tok, test_ex, max_len, device, ctx, with_maj=True)
    if master:
        open_log(Path(cfg.out_dir), start if resumed is not None else None)
        print(f"policy{' and reference' if reference else ''} from {cfg.init_from} (sft.py"
              f"{', think' if sft_ckpt['config'].get('think', False) else ''}, iter "
              f"{sft_ckpt.get('iter')}): {sum(p.numel() for p in params) / 1e6:.3f}M "
              f"parameters; SFT pass@1 {before['accuracy']:.3f}"
              + (f", maj@{cfg.maj_k} {before['maj_at_k']:.3f}" if "maj_at_k" in before else ""))
    return start, before


def make_ckpt(cfg, step, model, optimizer, tok, sft_ckpt, before):
    """The checkpoint at `step` (docs/design.md section 4); dropout off (ratio 1 at first)."""
    sft_cfg = sft_ckpt["config"]
    return {"script": "grpo.py", "version": 1,
            "config": dataclasses.asdict(cfg),
            "model_args": dict(sft_ckpt["model_args"], dropout=0.0), "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "iter": step, "best_val_loss": None,
            "tokenizer": {"kind": "byte", "special": dict(tok.special)},
            "sft_from": cfg.init_from, "task_world": {"think": sft_cfg.get("think", False), **{
                k: sft_cfg[k] for k in ("seed", "difficulty", "n_test")}},
            "rng": {"torch": torch.get_rng_state()}, "before": before}


def log_step(cfg, step, start, lr, loss, stats, entropy, mask, batch, rewards, grad_norm,
             t_start, t_last, t_rollout, rank, world_size, device):
    """The step's record, its processes' shares summed (the loss as DDP averages it, token means
    by token counts), logged on rank 0 -> the time it was taken; a non-finite loss stops the run."""
    correct = gathered(batch["correct"].float().to(device), world_size)
    n_tok, stat_keys = mask.sum().item(), sorted(stats)
    totals = torch.tensor([loss, n_tok, entropy.sum().item(), batch["prompts_drawn"]]
                          + [stats[k] * n_tok for k in stat_keys], dtype=torch.float64,
                          device=device)
    if world_size > 1:
        dist.all_reduce(totals)
    loss_value = totals[0].item() / world_size
    stats = {k: (totals[4 + i] / totals[1]).item() for i, k in enumerate(stat_keys)}
    if not math.isfinite(loss_value):
        ckpt_path = Path(cfg.out_dir) / "ckpt.pt"
        kept = f"the last good checkpoint {ckpt_path} is kept" if ckpt_path.is_file() else \
            "no checkpoint was written"
        die(f"loss is {loss_value} at iter {step}; stopped, {kept} (try a lower "
            f"--learning-rate)")
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    now = time.time()
    dt = now - t_last
    n_answer_tokens = sum(sum(t != IGNORE_INDEX for t in tgt) for _, tgt in batch["encoded"])
    zero_std = (rewards.view(-1, cfg.group_size).std(dim=1) == 0).float().mean().item()
    record = {"iter": step, "loss": loss_value, "lr": lr, "ms_per_iter": 1000 * dt,
              "tokens_per_s": mask.numel() * world_size / dt, "elapsed_s": now - t_start,
              "reward": rewards.mean().item(), "reward_std": rewards.std().item(),
              "rollout_accuracy": correct.mean().item(), "frac_reward_zero_std": zero_std,
              "entropy": (totals[2] / totals[1]).item(),
              "completion_length": totals[1].item() / rewards.numel(),
              "rollout_tokens_per_s": n_answer_tokens * world_size / t_rollout,
              "prompts_drawn": int(totals[3].item()), "grad_norm": grad_norm, **stats}
    if rank == 0:
        append_jsonl(Path(cfg.out_dir) / "log.jsonl", record)
        eta = (now - t_start) / (step + 1 - start) * (cfg.max_iters - step - 1)
        print(f"iter {step}/{cfg.max_iters} | reward {record['reward']:.3f} | rollout acc "
              f"{record['rollout_accuracy']:.3f} | zero-std {zero_std:.2f} | kl "
              f"{stats.get('kl', 0.0):.4f} | len {record['completion_length']:.1f} | "
              f"{1000 * dt:.0f} ms | eta {format_eta(eta)}")
    return now


def report(cfg, model, optimizer, tok, sft_ckpt, before, after, t_start):
    """The end: before/after table, changed answers (samples.txt), checkpoint, done record."""
    out_dir = Path(cfg.out_dir)
    ckpt_path, log_path = out_dir / "ckpt.pt", out_dir / "log.jsonl"
    k = before.get("maj_k")  # per family: pass@1 and maj@k before and after, then the means
    print(f"{'task':<10}{'pass@1':>9}{'after':>8}" + (f"{f'maj@{k}':>9}{'after':>8}" if k else ""))
    for t in before["accuracy_by_task"]:
        line = f"{t:<10}{before['accuracy_by_task'][t]:>9.3f}{after['accuracy_by_task'][t]:>8.3f}"
        if k:
            line += f"{before['maj_by_task'][t]:>9.3f}{after['maj_by_task'][t]:>8.3f}"
        print(line)
    line = f"{'mean':<10}{before['accuracy']:>9.3f}{after['accuracy']:>8.3f}"
    print(line + (f"{before['maj_at_k']:>9.3f}{after['maj_at_k']:>8.3f}" if k else ""))
    changed = [f"{p!r}: {before['completions'][p]!r} -> {c!r}"
               for p, c in after["completions"].items() if c != before["completions"].get(p)]
    print(f"{len(changed)} held-out answers changed; the first few:")
    print("\n".join(changed[:6]))
    (out_dir / "samples.txt").write_text("".join(line + "\n" for line in changed))
    wall = time.time() - t_start
    # the kept model is the last one: the only held-out score is the test set, which must not
    # choose it (docs/design.md section 4)
    print(f"kept the last model (iter {cfg.max_iters}): no validation split to choose another")
    done = {"event": "done", "iter": cfg.max_iters, "best_iter": cfg.max_iters,
            "accuracy": after["accuracy"],
            "accuracy_by_task": after["accuracy_by_task"], "format_rate": after["format_rate"],
            "accuracy_before": before["accuracy"],
            "accuracy_by_task_before": before["accuracy_by_task"],
            "length_by_task": after["length_by_task"],
            "think": sft_ckpt["config"].get("think", False), "wall_s": wall}
    for key in ("maj_k", "maj_at_k", "maj_by_task", "pass_at_k", "pass_by_task"):
        if key in after:
            done[key], done[key + "_before"] = after[key], before[key]
    save_checkpoint(make_ckpt(cfg, cfg.max_iters, model, optimizer, tok, sft_ckpt, before),
                    ckpt_path)
    append_jsonl(log_path, done)
    if cfg.plot:
        plot_grpo(log_path, before, after, out_dir / "grpo.png")
    print(f"done in {format_eta(wall)}: pass@1 {after['accuracy']:.3f} (SFT "
          f"{before['accuracy']:.3f})" + (f", maj@{cfg.maj_k} {after['maj_at_k']:.3f} (SFT "
                                          f"{before['maj_at_k']:.3f})" if cfg.maj_k else ""))
    return done


def sample_only(cfg, device, ctx):
    """--sample-only: answer --prompt with the GRPO policy in --out-dir."""
    path = Path(cfg.out_dir) / "ckpt.pt"
    model, tok = policy_from(load_checkpoint(path, ("grpo.py",), ("model_args", "tokenizer")),
                             path, device)
    ids = encode_prompt(tok, cfg.prompt)
    if len(ids) >= model.config.block_size:
        die(f"--prompt is {len(ids)} tokens; the model's context is {model.config.block_size}")
    idx = torch.tensor([ids] * cfg.num_samples, device=device)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    with ctx:
        out = generate_until(model, idx, cfg.max_new_tokens, tok.special[EOT], cfg.temperature,
                             generator=generator)
    answers = [completion_text(tok, row).split(EOT)[0] for row in out[:, len(ids):].tolist()]
    for a in answers:
        print(f"{format_prompt(cfg.prompt)}{a}\n---")
    return {"samples": answers}


# ---- Appendix: flag rules — RULES, CHOICES, check_config ----------------------
# what each numeric flag may be, checked before anything is written (docs/design.md section 6);
# choices are in CHOICES, cross-field rules in main
RULES = {
    "seed": (lambda v: 0 <= v < 2**63, "an integer in 0..2**63-1"),
    "group_size": (lambda v: v >= 2, "an integer >= 2 (a group needs a baseline)"),
    "prompts_per_step": (lambda v: v >= 1, "an integer >= 1"),
    "rollout_temperature": (lambda v: v > 0, "a number > 0"),
    "max_completion_length": (lambda v: v >= 0, "an integer >= 0 (0 = the SFT model's)"),
    "format_reward": (lambda v: v >= 0, "a number >= 0"),
    "beta": (lambda v: v >= 0, "a number >= 0"),
    "eps_low": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "eps_high": (lambda v: v >= 0, "a number >= 0"),
    "num_iterations": (lambda v: v >= 1, "an integer >= 1"),
    "max_resample": (lambda v: v >= 0, "an integer >= 0"),
    "n_train": (lambda v: v >= 6, "an integer >= 6 (one problem per family at least)"),
    "max_iters": (lambda v: v >= 0, "an integer >= 0"),
    "eval_interval": (lambda v: v >= 1, "an integer >= 1"),
    "learning_rate": (lambda v: 0 < v < 1, "a number in (0, 1)"),
    "min_lr": (lambda v: v >= 0, "a number >= 0 (and <= --learning-rate)"),
    "warmup_iters": (lambda v: v >= 0, "an integer >= 0"),
    "weight_decay": (lambda v: v >= 0, "a number >= 0"),
    "grad_clip": (lambda v: v >= 0, "a number >= 0 (0 = off)"),
    "eval_batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "maj_k": (lambda v: v >= 0, "an integer >= 0 (0 = off)"),
    "maj_temperature": (lambda v: v > 0, "a number > 0"),
    "num_samples": (lambda v: v >= 1, "an integer >= 1"),
    "max_new_tokens": (lambda v: v >= 1, "an integer >= 1"),
    "temperature": (lambda v: v >= 0, "a number >= 0 (0 = greedy)"),
}
CHOICES = {"scale": ("group", "batch", "none"), "loss_type": ("grpo", "dapo", "dr_grpo")}


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


def plot_grpo(log_path, before, after, path):
    """grpo.png: the rollouts' reward and accuracy with the greedy held-out accuracy against
    the step, the KL to the reference, and pass@1 / maj@k per family before and after (needs
    matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot: matplotlib is not installed (pip install matplotlib); no figure written")
        return
    records = [json.loads(line) for line in Path(log_path).read_text().splitlines()]
    train = [r for r in records if "reward" in r]
    evals = [r for r in records if "accuracy" in r and "event" not in r]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    axes[0].plot([r["iter"] for r in train], [r["reward"] for r in train], label="reward",
                 alpha=0.6)
    axes[0].plot([r["iter"] for r in train], [r["rollout_accuracy"] for r in train],
                 label="rollout accuracy", alpha=0.6)
    axes[0].plot([r["iter"] for r in evals], [r["accuracy"] for r in evals], marker="o",
                 label="held-out pass@1 (greedy)")
    axes[0].set_xlabel("step")
    axes[0].legend()
    axes[1].plot([r["iter"] for r in train], [r.get("kl", 0.0) for r in train])
    axes[1].set_xlabel("step")
    axes[1].set_title("KL to the reference (k3, per token)")
    fams = [t for t in TASK_FAMILIES if t in after["accuracy_by_task"]]
    x = torch.arange(len(fams)).float()
    bars = [("SFT pass@1", before["accuracy_by_task"]), ("GRPO pass@1", after["accuracy_by_task"])]
    if "maj_by_task" in after:
        bars += [("SFT maj@k", before["maj_by_task"]), ("GRPO maj@k", after["maj_by_task"])]
    w = 0.8 / len(bars)
    for j, (label, acc) in enumerate(bars):
        axes[2].bar((x - 0.4 + w * (j + 0.5)).tolist(), [acc[t] for t in fams], w, label=label)
    axes[2].set_xticks(x.tolist(), fams)
    axes[2].set_ylim(0, 1)
    axes[2].set_title("held-out accuracy")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
