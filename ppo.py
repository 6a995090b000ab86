"""RLHF with PPO: a policy with a value head, a reward model, and a KL leash to the SFT model.

The InstructGPT loop (Ouyang et al. 2022, arXiv:2203.02155; Ziegler et al. 2019,
arXiv:1909.08593), with PPO (Schulman et al. 2017, arXiv:1707.06347): sample prompts -> the
policy answers (batched sampling with the KV cache) -> the reward model scores each answer at
its last token -> every token pays beta * (log pi - log pi_ref), the k1 estimate of the KL to
the frozen SFT model -> GAE (Schulman et al. 2015, arXiv:1506.02438) turns those per-token
rewards and a value head's estimates into advantages -> a few epochs of clipped policy and
value updates on the batch. beta adapts toward a target KL (Ziegler et al., Sec. 2.2). What
real RLHF cannot see is measured here: the task world has a checker, so the reward model's
score and the true accuracy are logged side by side; when the policy learns to please the RM
instead of being right, the curves part (`--plot`). `--reward checker` optimises the checker
itself (1 right, 0 wrong), the verifiable reward grpo.py uses.

Run:
    python sft.py && python reward.py       # first: out/sft/ckpt.pt and out/reward/ckpt.pt
    python ppo.py                           # PPO against the reward model
    python ppo.py --reward checker          # PPO against the task world's checker
    python ppo.py --critic separate         # the value function on its own copy of the trunk
    python ppo.py --plot                    # ppo.png: RM score and true accuracy vs step
    python ppo.py --resume                  # continue a killed run from out/ppo/ckpt.pt
    python ppo.py --sample-only --prompt "What is 12 + 7?"
    python ppo.py --device cuda             # GPU preset: bigger rollout batches, more steps

Result: the RM is exploited (accuracy 0.887 -> 0.795); --reward checker 0.895 (docs/ppo.md).
Simplifications: one response per prompt; the reward model is frozen; one learning rate for
the policy and the value head.
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
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


# -------------------------------------------------------------------------------
# Config
# -------------------------------------------------------------------------------
@dataclass
class Config:
    device: str = "auto"  # auto|cpu|cuda|cuda:N|mps
    dtype: str = "auto"  # auto|float32|bfloat16|float16
    compile: bool = False  # torch.compile the training forward pass (on in the GPU preset)
    seed: int = 1337  # every random choice (prompts, sampling, minibatches) follows it
    out_dir: str = "out/ppo"  # ckpt.pt, log.jsonl, samples.txt and ppo.png go here
    init_from: str = "out/sft/ckpt.pt"  # the sft.py checkpoint: the policy's start and pi_ref
    reward: str = "rm"  # rm (the reward model's score) | checker (1 right, 0 wrong)
    reward_model: str = "out/reward/ckpt.pt"  # the reward.py checkpoint read by --reward rm
    critic: str = "shared"  # shared (value head on the policy's trunk) | separate (own trunk)
    families: str = "all"  # families of the training prompts: all, or a list like sort,count
    n_train: int = 20000  # training problems (train split of the task world), cycled through
    max_iters: int = 120  # PPO steps: one rollout batch and its updates each
    rollout_batch: int = 256  # prompts per step (one sampled response each)
    rollout_temperature: float = 1.0  # tau: sampling temperature, also of every log-prob
    max_response_tokens: int = 16  # a response that has not stopped by then is cut there
    missing_eot_penalty: float = 1.0  # subtracted from the score of a response that never stops
    normalize_reward: bool = True  # score -> (score - running mean) / running std
    init_kl_coef: float = 0.1  # beta at the start: each token's reward -= beta * k1
    adaptive_kl: bool = True  # adapt beta toward --target-kl (Ziegler et al. 2019); else fixed
    target_kl: float = 0.3  # nats per response (summed k1) that the adaptive beta aims at
    kl_horizon: int = 10000  # the adaptive beta's horizon, in responses
    gamma: float = 1.0  # discount per token
    lam: float = 0.95  # GAE lambda (1 = Monte Carlo returns, 0 = one-step TD)
    ppo_epochs: int = 2  # passes over each rollout batch
    minibatch_size: int = 64  # responses per gradient step
    clip_range: float = 0.2  # epsilon of the clipped surrogate (the policy ratio)
    clip_range_value: float = 0.2  # epsilon of the clipped value loss
    vf_coef: float = 0.1  # weight of the value loss
    max_approx_kl: float = 0.05  # end a step's epochs once a minibatch's approx-KL passes it; 0 off
    learning_rate: float = 3e-5  # peak learning rate (AdamW)
    min_lr: float = 3e-6  # floor of the cosine decay
    warmup_iters: int = 5  # linear warmup steps
    weight_decay: float = 0.0  # AdamW decoupled weight decay on matrices (0: stay near SFT)
    grad_clip: float = 1.0  # clip the global gradient norm (0 = off)
    eval_interval: int = 20  # steps between held-out greedy evaluations and checkpoints
    eval_max_new_tokens: int = 16  # decoding budget per answer (as sft.py's evaluation)
    eval_batch_size: int = 256  # sequences decoded or scored together
    resume: bool = False  # continue the run saved in --out-dir
    overwrite: bool = False  # allow replacing an existing checkpoint in --out-dir
    sample_only: bool = False  # load the policy in --out-dir and only answer --prompt
    prompt: str = "What is 12 + 7?"  # instruction for --sample-only (wrapped in the template)
    num_samples: int = 1  # answers per prompt with --sample-only
    max_new_tokens: int = 32  # tokens per answer with --sample-only
    temperature: float = 0.0  # --sample-only: 0 = greedy; > 0 samples
    plot: bool = False  # write ppo.png: RM score and true accuracy vs step (needs matplotlib)


# on CUDA, for every field not given: bigger rollout batches and more steps (same model)
GPU_PRESET = dict(rollout_batch=1024, minibatch_size=256, max_iters=300, eval_interval=25,
                  compile=True)


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
# PPO for RLHF
# -------------------------------------------------------------------------------
# A rollout batch is right-padded ids idx (B, T): prompt, response, padding. Every per-token
# quantity lives in the *shifted* frame (B, T-1): position t is the action idx[:, t+1] taken
# in the state idx[:, :t+1]; its log-prob comes from logits[:, t] and its value V(s_t) from
# the value head at position t. `mask` (B, T-1) is True on the response's actions, from the
# first response token up to and including <|endoftext|> (or the last token of a response
# that never stopped). It is built from the lengths, never by looking for a pad id.
def masked_mean(x, mask):
    """Mean of x over the True positions of mask (a token mean over the whole batch). Masked
    positions may hold anything, NaN included: torch.where drops them (NaN * 0 is NaN)."""
    return torch.where(mask, x, 0.0).sum() / mask.sum().clamp(min=1)


def whiten(x, mask, shift_mean=True):
    """(x - mean) / std over the valid tokens of the batch; padding is neither counted nor
    changed (it comes back 0). shift_mean=False adds the mean back (only the scale changes).

    Population variance (divide by n, not n - 1), so one valid token is not 0/0: it whitens
    to 0. No valid token at all raises: there is nothing to normalise by.
    """
    n = mask.sum()
    if n == 0:
        raise ValueError("whiten: the mask has no valid token")
    mean = torch.where(mask, x, 0.0).sum() / n
    var = torch.where(mask, (x - mean) ** 2, 0.0).sum() / n
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return torch.where(mask, out, 0.0)


@torch.no_grad()
def gae(rewards, values, mask, gamma, lam):
    """Generalised advantage estimation (Schulman et al. 2015, Eq. 16) -> (advantages,
    returns), each (B, T-1), 0 outside the mask.

    delta_t = r_t + gamma V(s_{t+1}) - V(s_t);  A_t = delta_t + gamma lam A_{t+1}.
    After the last action of a response (its <|endoftext|>) the episode is over: V = 0 there
    and nothing is carried back from the padding (no bootstrapping past the end). Positions
    before the response (the prompt) come out 0 too. Returns are A + V from the *raw*
    advantages: the value head's targets must not be whitened (whiten the advantages after).
    """
    rewards = torch.where(mask, rewards, 0.0)
    values = torch.where(mask, values, 0.0)  # V(s) = 0 outside the response
    B, T = rewards.shape
    adv = torch.zeros_like(rewards)
    last = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)  # A_{t+1}
    for t in reversed(range(T)):
        if t + 1 < T:
            next_value, live = values[:, t + 1], mask[:, t + 1].to(rewards.dtype)
        else:
            next_value, live = torch.zeros_like(last), torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * live * last  # the sum stops where the response ended
        adv[:, t] = last
    adv = torch.where(mask, adv, 0.0)
    return adv, torch.where(mask, adv + values, 0.0)


def ppo_loss(new_logps, old_logps, advantages, values, old_values, returns, mask,
             clip_range=0.2, clip_range_value=0.2, vf_coef=0.1):
    """The PPO objective on one minibatch; every argument (B, T-1), mask bool -> (loss, stats).

    Policy: -min(ratio A, clip(ratio, 1 - eps, 1 + eps) A), ratio = pi/pi_old (Schulman et al.
    2017, Eq. 7), the same expression for both signs of A: with A > 0 the gain stops once
    ratio > 1 + eps, with A < 0 once ratio < 1 - eps; the other side is never clipped (the
    pessimistic bound). Value: 0.5 max((V - R)^2, (V_clip - R)^2) with V_clip = V_old +
    clip(V - V_old, -eps_v, eps_v), the clipped value loss of OpenAI's baselines, so one
    rollout's noisy returns cannot drag the value head far in one step. Both are token means
    over the minibatch's valid tokens (all responses' tokens pooled; the normaliser).
    stats (floats): pg_loss, vf_loss, clipfrac (tokens whose clipped term was the one taken),
    vf_clipfrac, approx_kl (mean of (r - 1) - log r, Schulman's k3, >= 0), ratio (its mean).
    """
    log_ratio = torch.where(mask, new_logps - old_logps, 0.0)
    ratio = log_ratio.exp()
    pg1 = -advantages * ratio
    pg2 = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    pg_loss = masked_mean(torch.max(pg1, pg2), mask)
    v_clipped = old_values + (values - old_values).clamp(-clip_range_value, clip_range_value)
    vf1, vf2 = (values - returns) ** 2, (v_clipped - returns) ** 2
    vf_loss = 0.5 * masked_mean(torch.max(vf1, vf2), mask)
    loss = pg_loss + vf_coef * vf_loss
    with torch.no_grad():
        stats = {"pg_loss": pg_loss.item(), "vf_loss": vf_loss.item(),
                 "clipfrac": masked_mean((pg2 > pg1).float(), mask).item(),
                 "vf_clipfrac": masked_mean((vf2 > vf1).float(), mask).item(),
                 "approx_kl": masked_mean(ratio - 1 - log_ratio, mask).item(),
                 "ratio": masked_mean(ratio, mask).item()}
    return loss, stats


class AdaptiveKLController:
    """beta that follows a target KL (Ziegler et al. 2019, Sec. 2.2): after each batch,
    e = clip(KL / target - 1, -0.2, 0.2) and beta <- beta (1 + e n_steps / horizon), with KL
    the mean over the batch of each response's *summed* k1 (nats per response, not per token)
    and n_steps the responses in the batch. The step is small on purpose: at most
    0.2 n_steps / horizon of beta per batch."""

    def __init__(self, init_kl_coef, target, horizon):
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current_kl, n_steps):
        error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_steps / self.horizon
        return self.value


class RunningMoments:
    """Mean and standard deviation of every score seen so far, merged batch by batch (Chan et
    al.'s parallel update), to normalise the reward: the RM's scale is arbitrary (a
    Bradley-Terry model fixes rewards only up to a constant) and it would otherwise set how
    much the KL penalty weighs. reward.py saves the mean and std of its scores on the SFT
    policy's answers (reward_stats): they are the prior, counted as `count` samples."""

    def __init__(self, mean=0.0, std=1.0, count=0):
        self.mean, self.var, self.count = float(mean), float(std) ** 2, int(count)

    @property
    def std(self):
        return max(math.sqrt(self.var), 1e-3)  # a batch of equal scores must not divide by 0

    def update(self, x):
        n = x.numel()
        mean, var = x.double().mean().item(), x.double().var(unbiased=False).item()
        total = self.count + n
        delta = mean - self.mean
        self.var = (self.var * self.count + var * n + delta ** 2 * self.count * n / total) / total
        self.mean += delta * n / total
        self.count = total


def token_logps(logits, idx, temperature):
    """log pi(idx[:, t+1] | idx[:, :t+1]) at temperature tau: logits (B, T, V), idx (B, T) ->
    (B, T-1) float32. The logits are divided by the sampling temperature here as in
    sample_logits, for the rollout, the reference and every PPO epoch alike: the ratio and
    the KL compare the distribution the responses were really drawn from."""
    logp = (logits[:, :-1].float() / temperature).log_softmax(dim=-1)  # (B, T-1, V)
    return logp.gather(-1, idx[:, 1:].unsqueeze(-1)).squeeze(-1)  # (B, T-1, 1) -> (B, T-1)


def token_entropy(logits, temperature):
    """Entropy of the sampling distribution at each action position: (B, T, V) -> (B, T-1)."""
    logp = (logits[:, :-1].float() / temperature).log_softmax(dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def compute_rewards(scores, logps, ref_logps, mask, last, kl_coef):
    """Per-token rewards (B, T-1) and the k1 KL per token (B, T-1).

    Every action pays -beta (log pi - log pi_ref), k1, an unbiased estimate of KL(pi || pi_ref)
    on samples of pi, negative on some tokens by design; the sequence's score is added at its
    last action `last` (B,), the one that emits <|endoftext|> (the last real token, lengths - 2
    in this frame): the score lands on a real token, never on the first pad slot. The sign is
    stored as it is used: the penalty is subtracted (docs/alignment-pitfalls.md section 4).
    """
    kl = torch.where(mask, logps - ref_logps, 0.0)  # k1 per token
    rewards = -kl_coef * kl
    rewards[torch.arange(rewards.size(0), device=rewards.device), last] += scores
    return rewards, kl


class ActorCritic(nn.Module):
    """The policy (sft.py's Llama, trained) and a value function V(s_t) at every position.

    shared (default): a scalar head on the policy's final hidden state (the input of its LM
    head, read with a forward hook): one trunk, the value loss (times vf_coef) shapes it too.
    separate: the value function gets its own copy of the SFT trunk with a scalar head in
    place of the LM head (InstructGPT's separate value model; twice the compute).
    The head starts at zero (V = 0 everywhere), with a bias for the returns' mean. Dropout is
    0 in every model here: with dropout the first PPO epoch would already see ratio != 1.
    """

    def __init__(self, policy, critic="shared"):
        super().__init__()
        self.policy = policy
        head = nn.Linear(policy.config.n_embd, 1, bias=True)  # NEW vs sft.py: (C, 1)
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        if critic == "shared":
            self.v_head, self.critic = head, None
        else:
            self.critic = copy.deepcopy(policy)
            self.critic.lm_head = head  # the trunk's hidden states -> one value per position

    def value_state(self):
        """The value function's weights (saved next to the policy's)."""
        return (self.critic if self.critic is not None else self.v_head).state_dict()

    def load_value_state(self, state):
        (self.critic if self.critic is not None else self.v_head).load_state_dict(state)

    def forward(self, idx):
        """idx (B, T) -> the policy's logits (B, T, V) and the values (B, T) in float32."""
        if self.critic is not None:
            return self.policy(idx)[0], self.critic(idx)[0].squeeze(-1).float()
        hidden = {}
        hook = self.policy.lm_head.register_forward_hook(
            lambda module, args, out: hidden.update(h=args[0]))  # (B, T, C) after ln_f
        try:
            logits = self.policy(idx)[0]
        finally:
            hook.remove()
        return logits, self.v_head(hidden["h"]).squeeze(-1).float()  # (B, T, 1) -> (B, T)


def frozen_copy(model):
    """The reference pi_ref: a separate deep copy of the SFT model, in eval mode, every
    parameter with requires_grad False (never the policy object itself: the KL would be 0
    for ever). Dropout is 0 in both, so at the first step log pi = log pi_ref exactly."""
    return copy.deepcopy(model).eval().requires_grad_(False)


# -------------------------------------------------------------------------------
# Data: the task world's problems, rollouts, experience
# -------------------------------------------------------------------------------
def parse_families(spec):
    """--families: 'all' or a comma list of task families -> a tuple in TASK_FAMILIES order."""
    if spec == "all":
        return TASK_FAMILIES
    names = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n not in TASK_FAMILIES]
    if unknown or not names:
        die(f"--families {spec}: expected all or a comma list of {', '.join(TASK_FAMILIES)}")
    return tuple(f for f in TASK_FAMILIES if f in names)


def task_world(cfg, tok, sft_cfg, families, block_size):
    """The training and the held-out problems -> (train_ex, test_ex), each fits the context."""
    try:
        train_ex = make_tasks(cfg.n_train, "train", cfg.seed + 2, sft_cfg["difficulty"],
                              families)
        # the held-out set is exactly sft.py's (same seed, difficulty and count), so every
        # stage of the chain scores the same problems with the same greedy decoding
        test_ex = make_tasks(sft_cfg["n_test"], "test", sft_cfg["seed"] + 1, sft_cfg["difficulty"])
    except (ValueError, KeyError) as e:
        die(f"cannot build the task world of {cfg.init_from} ({e}); lower --n-train")
    random.Random(cfg.seed).shuffle(train_ex)  # make_tasks lists family by family: mix them
    longest = max(len(encode_prompt(tok, ex["prompt"])) for ex in train_ex + test_ex)
    budget = max(cfg.max_response_tokens, cfg.eval_max_new_tokens)
    if longest + budget > block_size:
        die(f"prompts of {longest} tokens + {budget} response tokens exceed the context of "
            f"{cfg.init_from} ({block_size} tokens)")
    return train_ex, test_ex


@torch.no_grad()
def sample_responses(policy, tok, examples, temperature, max_new_tokens, batch_size, device, ctx,
                     generator):
    """One response per problem, sampled at `temperature` with the KV cache -> a list of
    (prompt ids, response ids), the response cut after its first <|endoftext|> (a response
    that never stopped keeps all max_new_tokens). Plain sampling, no top-k/top-p: the
    log-probs PPO computes are then those of the distribution that drew the tokens (a
    truncated sampler makes k1 negative and the update off-policy).

    As sft.py's evaluation, prompts of equal token length are decoded together, so a batch
    needs no padding and the KV cache no attention mask.
    """
    eot = tok.special[EOT]
    groups = defaultdict(list)
    for i, ex in enumerate(examples):
        groups[len(encode_prompt(tok, ex["prompt"]))].append(i)
    out = [None] * len(examples)
    for T, members in sorted(groups.items()):
        for j in range(0, len(members), batch_size):
            chunk = members[j:j + batch_size]
            prompts = [encode_prompt(tok, examples[i]["prompt"]) for i in chunk]
            with ctx:
                rows = generate_until(policy, torch.tensor(prompts, device=device),
                                      max_new_tokens, eot, temperature,
                                      generator=generator)[:, T:].tolist()
            for i, p, r in zip(chunk, prompts, rows):
                out[i] = (p, r[:r.index(eot) + 1] if eot in r else r)
    return out


def collate_rollouts(prompts, responses, pad_id):
    """Prompt and response id lists -> idx (B, T) right-padded with pad_id, the action mask
    (B, T-1) and lengths (B,), the real tokens per row.

    In the shifted frame the response of a row with a prompt of P tokens and R response tokens
    occupies actions P-1 .. P+R-2 (logits[:, P-1] predicts the first response token). The mask
    comes from those lengths, so a pad id equal to the <|endoftext|> id would change nothing:
    the stop token is an action like any other (docs/alignment-pitfalls.md section 4, pad == eos).
    """
    idx, lengths = collate_scored([p + r for p, r in zip(prompts, responses)], pad_id)
    plen = torch.tensor([len(p) for p in prompts])  # (B,)
    pos = torch.arange(idx.size(1) - 1)[None, :]  # (1, T-1)
    mask = (pos >= plen[:, None] - 1) & (pos < lengths[:, None] - 1)  # (B, T-1)
    return idx, mask, lengths


@torch.no_grad()
def make_experience(model, reference, rm, tok, examples, cfg, kl_coef, moments, device, ctx,
                    generator):
    """One rollout batch -> the tensors PPO trains on and the step's metrics.

    Sample one response per problem with the current policy, then one forward pass of the
    policy (old log-probs, values), of the frozen reference (reference log-probs) and of the
    reward model (score at the last real token), all on the same padded batch at the same
    temperature; rewards = normalised score at the last action - beta k1 at every action;
    advantages by GAE, whitened over the batch's valid tokens; returns from the raw ones.
    """
    t0 = time.time()
    pairs = sample_responses(model.policy, tok, examples, cfg.rollout_temperature,
                             cfg.max_response_tokens, cfg.eval_batch_size, device, ctx, generator)
    t_sample = time.time() - t0
    prompts, responses = [p for p, _ in pairs], [r for _, r in pairs]
    idx, mask, lengths = collate_rollouts(prompts, responses, tok.special[PAD])
    idx, mask, lengths = idx.to(device), mask.to(device), lengths.to(device)
    with ctx:
        logits, values = model(idx)
        ref_logits = reference(idx)[0]
    logps = token_logps(logits, idx, cfg.rollout_temperature)  # (B, T-1)
    ref_logps = token_logps(ref_logits, idx, cfg.rollout_temperature)
    values = values[:, :-1]  # V(s_t) for the action at t
    entropy = masked_mean(token_entropy(logits, cfg.rollout_temperature), mask).item()
    eot = tok.special[EOT]
    texts = [completion_text(tok, r) for r in responses]
    correct = torch.tensor([check_answer(t, ex["answer"]) for t, ex in zip(texts, examples)],
                           dtype=torch.float32)
    stopped = torch.tensor([eot in r for r in responses])
    if rm is not None:
        with ctx:
            raw = pooled_rewards(rm, idx, lengths).float().cpu()  # (B,) at lengths - 1
    else:
        raw = correct.clone()  # the checker: 1 right, 0 wrong
    scores = raw
    if cfg.normalize_reward:
        moments.update(raw)
        scores = (raw - moments.mean) / moments.std
    scores = scores - cfg.missing_eot_penalty * (~stopped).float()
    rewards, kl = compute_rewards(scores.to(device), logps, ref_logps, mask, lengths - 2,
                                  kl_coef)
    advantages, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
    advantages = whiten(advantages, mask)
    valid_returns, valid_values = returns[mask], values[mask]
    var_returns = valid_returns.var(unbiased=False)
    explained = (1 - (valid_returns - valid_values).var(unbiased=False) / var_returns).item() \
        if var_returns > 0 else 0.0
    n_tokens = int(mask.sum())
    metrics = {"rm_score": raw.mean().item(), "score_norm": scores.mean().item(),
               "rollout_accuracy": correct.mean().item(), "kl": kl.sum(1).mean().item(),
               "kl_per_token": (kl.sum() / n_tokens).item(), "kl_coef": kl_coef,
               "entropy": entropy, "response_length": n_tokens / len(examples),
               "no_eot_rate": 1 - stopped.float().mean().item(),
               "explained_variance": explained, "value_mean": valid_values.mean().item(),
               "return_mean": valid_returns.mean().item(),
               "rollout_tokens_per_s": n_tokens / max(t_sample, 1e-9)}
    exp = {"idx": idx, "mask": mask, "lengths": lengths, "logps": logps, "values": values,
           "advantages": advantages, "returns": returns, "scores": raw, "correct": correct,
           "texts": texts}
    return exp, metrics


# -------------------------------------------------------------------------------
# Training and evaluation
# -------------------------------------------------------------------------------
def ppo_update(model, optimizer, scaler, params, exp, cfg, generator, ctx):
    """ppo_epochs passes over the rollout batch in shuffled minibatches, one clipped PPO step
    each -> (mean stats over the minibatches, minibatches done, finite). The epochs end early
    once a minibatch's approx-KL to the rollout policy passes --max-approx-kl: the ratio
    clip bounds each token, this bounds the batch (OpenAI baselines' target_kl)."""
    B = exp["idx"].size(0)
    totals, n_mb = defaultdict(float), 0
    for _ in range(cfg.ppo_epochs):
        perm = torch.randperm(B, generator=generator).to(exp["idx"].device)
        for i in range(0, B, cfg.minibatch_size):
            mb = perm[i:i + cfg.minibatch_size]
            T = int(exp["lengths"][mb].max())  # crop to the longest row: only padding goes
            idx = exp["idx"][mb, :T]
            with ctx:
                logits, values = model(idx)
            new_logps = token_logps(logits, idx, cfg.rollout_temperature)
            old = {k: exp[k][mb, :T - 1] for k in ("logps", "advantages", "values", "returns",
                                                   "mask")}
            loss, stats = ppo_loss(new_logps, old["logps"], old["advantages"], values[:, :-1],
                                   old["values"], old["returns"], old["mask"], cfg.clip_range,
                                   cfg.clip_range_value, cfg.vf_coef)
            if not math.isfinite(loss.item()):
                return dict(totals, loss=loss.item()), n_mb, False
            scaler.scale(loss).backward()
            if cfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            totals["loss"] += loss.item()
            for k, v in stats.items():
                totals[k] += v
            n_mb += 1
            if cfg.max_approx_kl and stats["approx_kl"] > cfg.max_approx_kl:
                return {k: v / n_mb for k, v in totals.items()}, n_mb, True
    return {k: v / n_mb for k, v in totals.items()}, n_mb, True


def evaluate(model, rm, tok, examples, cfg, device, ctx):
    """Held-out greedy accuracy per family (sft.py's set and decoding) and, with a reward
    model, its mean score of those same greedy answers: the two curves of ppo.png."""
    m = evaluate_tasks(model.policy, tok, examples, cfg.eval_max_new_tokens, cfg.eval_batch_size,
                       device, ctx)
    if rm is not None:
        scores = score(rm, tok, [ex["prompt"] for ex, _ in m["samples"]],
                       [c for _, c in m["samples"]], device, cfg.eval_batch_size, ctx)
        m["rm_score_heldout"] = scores.mean().item()
    return m


def train(cfg, model, reference, rm, tok, train_ex, test_ex, moments, sft_ckpt, resumed, device,
          dtype, ctx, t_start):
    """The loop, nanoGPT's shape: evaluate and checkpoint every eval_interval steps; a step is one
    rollout batch and its PPO updates -> (final checkpoint, last evaluation, batch, experience)."""
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    ckpt_path = Path(cfg.out_dir) / "ckpt.pt"
    # ---- optimizer: weight decay on matrices only, as in sft.py ----
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
         {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
        lr=cfg.learning_rate, betas=(0.9, 0.95), fused=device_type == "cuda")
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == "float16")
    kl_ctl = AdaptiveKLController(cfg.init_kl_coef, cfg.target_kl, cfg.kl_horizon)
    sample_gen = torch.Generator(device=device).manual_seed(cfg.seed)  # the rollouts' sampling
    batch_gen = torch.Generator().manual_seed(cfg.seed + 1)  # the minibatches' shuffling
    gens = (sample_gen, batch_gen)
    before, ev, exp, batch, kl, first = None, None, None, [], 0.0, 0
    if resumed is not None:  # every state the next step reads, as it was saved
        before, kl, first = restore(resumed, ckpt_path, model, optimizer, kl_ctl, moments, gens)
    train_model = torch.compile(model) if cfg.compile else model
    # the first write to --out-dir: a fresh log, or the resumed one up to its checkpoint
    log_path = open_log(cfg.out_dir, first if resumed is not None else None)
    t_last = time.time()
    for step in range(first, cfg.max_iters + 1):
        last_step = step == cfg.max_iters
        # a resumed run's first step was evaluated (and logged) before its checkpoint
        if (step % cfg.eval_interval == 0 or last_step) and (step > first or resumed is None):
            ev = evaluate(model, rm, tok, test_ex, cfg, device, ctx)
            if before is None:  # step 0: the SFT model itself
                before = {k: ev[k] for k in ("accuracy", "accuracy_by_task", "format_rate")}
                before["completions"] = {ex["prompt"]: c for ex, c in ev["samples"]}
            log_eval(log_path, step, ev, t_start)
            if step > 0:
                save_checkpoint(checkpoint_dict(cfg, step, model, optimizer, tok, sft_ckpt,
                                                kl_ctl, kl, before, moments, gens), ckpt_path)
            t_last = time.time()  # evaluation time is not training time
        if last_step:
            break
        lr = get_lr(step, cfg.learning_rate, cfg.min_lr, cfg.warmup_iters, cfg.max_iters)
        for group in optimizer.param_groups:
            group["lr"] = lr
        start = step * cfg.rollout_batch
        batch = [train_ex[(start + i) % len(train_ex)] for i in range(cfg.rollout_batch)]
        exp, m = make_experience(model, reference, rm, tok, batch, cfg, kl_ctl.value, moments,
                                 device, ctx, sample_gen)
        try:
            stats, n_mb, finite = ppo_update(train_model, optimizer, scaler, params, exp, cfg,
                                             batch_gen, ctx)
        except torch.OutOfMemoryError:
            die(f"CUDA out of memory at rollout batch {cfg.rollout_batch}; try "
                f"--minibatch-size {max(1, cfg.minibatch_size // 2)}")
        check_finite(stats, finite, step, ckpt_path)
        kl = m["kl"]
        if cfg.adaptive_kl:
            kl_ctl.update(kl, cfg.rollout_batch)
        if device_type == "cuda":
            torch.cuda.synchronize()
        now = time.time()
        dt, t_last = now - t_last, now
        log_step(cfg, log_path, step, first, lr, m, stats, n_mb, int(exp["mask"].sum()), dt,
                 now - t_start)
    # ---- after: true accuracy on sft.py's held-out problems (the last evaluation) ----
    after = ev if ev is not None else evaluate(model, rm, tok, test_ex, cfg, device, ctx)
    final = checkpoint_dict(cfg, cfg.max_iters, model, optimizer, tok, sft_ckpt, kl_ctl, kl,
                            before, moments, gens)
    return final, after, exp, batch


def main(argv=None):
    """parse -> build (policy, reference, reward, task world) -> train -> report."""
    cfg, given = parse_config(Config, argv, __doc__.splitlines()[0])
    device = resolve_device(cfg.device)
    if device.startswith("cuda"):
        cfg = apply_preset(cfg, GPU_PRESET, given)
    dtype = resolve_dtype(cfg.dtype, device)
    check_config(cfg, RULES, CHOICES)
    families = parse_families(cfg.families)
    if cfg.minibatch_size > cfg.rollout_batch:
        die(f"--minibatch-size {cfg.minibatch_size}: expected at most --rollout-batch "
            f"{cfg.rollout_batch}")
    print(" ".join(f"{k}={v}" for k, v in dataclasses.asdict(cfg).items()))
    print(f"device={device} dtype={dtype} compile={'on' if cfg.compile else 'off'}")
    torch.manual_seed(cfg.seed)
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    ctx = (torch.amp.autocast(device_type, dtype=getattr(torch, dtype)) if dtype != "float32"
           else contextlib.nullcontext())
    if cfg.sample_only:
        return sample_only(cfg, device, ctx)
    check_out_dir(cfg.out_dir, cfg.resume, cfg.overwrite)
    cfg, resumed = load_resumed(cfg) if cfg.resume else (cfg, None)
    t_start = time.time()
    # ---- the policy, the frozen reference, the reward, the task world of the SFT checkpoint ----
    policy, tok, sft_ckpt = load_policy(cfg.init_from, device)
    rm, moments = None, RunningMoments()
    if cfg.reward == "rm":
        rm, stats = load_reward_model(cfg.reward_model, tok, device)
        if stats:  # the RM's scores of the SFT policy's answers: the prior of the running stats
            moments = RunningMoments(stats["mean"], stats["std"], cfg.rollout_batch)
    train_ex, test_ex = task_world(cfg, tok, sft_ckpt["config"], families,
                                   sft_ckpt["model_args"]["block_size"])
    reference = frozen_copy(policy)
    model = ActorCritic(policy, cfg.critic).to(device).train()  # dropout 0: train = eval
    n_params = sum(p.numel() for p in model.parameters())
    print(f"policy and reference from {cfg.init_from} (sft.py, iter {sft_ckpt.get('iter')}); "
          f"critic {cfg.critic}; {n_params / 1e6:.3f}M trainable parameters; reward "
          f"{cfg.reward_model if rm is not None else 'the checker'}")
    # ---- PPO, then the SFT-vs-PPO report, samples.txt, the final checkpoint ----
    final, after, exp, batch = train(cfg, model, reference, rm, tok, train_ex, test_ex, moments,
                                     sft_ckpt, resumed, device, dtype, ctx, t_start)
    return report(cfg, final, after, exp, batch, t_start)


# -------------------------------------------------------------------------------
# Appendix: a first read can stop here (copies, bookkeeping, plumbing)
# -------------------------------------------------------------------------------
# ---- Appendix: from sft.py — llama.py's model, sampling, evaluation, LR schedule, unchanged ----
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


def get_lr(step, learning_rate, min_lr, warmup_iters, lr_decay_iters):
    """Linear warmup for `warmup_iters`, cosine decay to `min_lr` at `lr_decay_iters`, then flat."""
    if step < warmup_iters:
        return learning_rate * (step + 1) / (warmup_iters + 1)
    if step >= lr_decay_iters:
        return min_lr
    ratio = (step - warmup_iters) / max(1, lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


# ---- Appendix: from sft.py — the task world, unchanged ------------------------
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


# ---- Appendix: from reward.py — the reward model and its scoring, unchanged ----
def build_reward_model(model_args):
    """The sft.py Llama with its LM head (C -> V) replaced by a scalar head (C -> 1).

    The head reads the residual stream after the final norm; zero-initialised, so every
    sequence starts at reward 0 and the first loss is exactly ln 2 (a fair coin per pair).
    Dropout is off (model_args["dropout"] = 0): a reward must be a function of the text, not
    of a dropout mask (TRL disables it too).
    """
    model = Llama(ModelConfig(**dict(model_args, dropout=0.0)))
    model.lm_head = nn.Linear(model_args["n_embd"], 1, bias=False)  # NEW vs sft.py: (C, 1)
    nn.init.zeros_(model.lm_head.weight)
    return model


def pooled_rewards(model, idx, lengths):
    """Rewards of right-padded sequences idx (B, T) with `lengths` real tokens -> (B,).

    The head runs at every position; the reward is read at position lengths - 1, the last
    real token (the response's <|endoftext|>), the one that has seen the whole prompt and
    response. It is picked by the lengths, never by searching for a pad id: with pad == eos
    that search stops at the first <|endoftext|> (docs/alignment-pitfalls.md section 2). Causal
    attention keeps the padding, which sits after every real token, from changing the value.
    """
    values = model(idx)[0].squeeze(-1)  # (B, T, 1) -> (B, T): a reward at every prefix
    return values[torch.arange(idx.size(0), device=idx.device), lengths - 1]  # (B,)


def encode_scored(tok, prompt, response):
    """Prompt (wrapped in the template) + response text -> ids; an <|endoftext|> written in
    the response becomes its token, as the policy emitted it."""
    return encode_prompt(tok, prompt) + tok.encode(response, [EOT])


def collate_scored(seqs, pad_id):
    """Right-pad id lists -> idx (B, T) and lengths (B,), the number of real tokens per row."""
    T = max(len(s) for s in seqs)
    idx = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        idx[i, :len(s)] = torch.tensor(s)
    return idx, torch.tensor([len(s) for s in seqs])


@torch.no_grad()
def score(model, tok, prompts, responses, device, batch_size=256, ctx=contextlib.nullcontext()):
    """Rewards of (prompt, response) texts -> a float32 CPU tensor (N,), in batches.

    The API ppo.py copies: prompts are instructions (the template is added here), responses
    the text the policy wrote, ending with <|endoftext|> when it stopped.
    """
    seqs = [encode_scored(tok, p, r) for p, r in zip(prompts, responses)]
    too_long = [len(s) for s in seqs if len(s) > model.config.block_size]
    if too_long:
        raise ValueError(f"a scored sequence has {max(too_long)} tokens; the model's context "
                         f"is {model.config.block_size}")
    out = []
    for i in range(0, len(seqs), batch_size):
        idx, lengths = collate_scored(seqs[i:i + batch_size], tok.special[PAD])
        with ctx:
            out.append(pooled_rewards(model, idx.to(device), lengths.to(device)).float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


# ---- Appendix: bookkeeping — loading, restore, checkpoint, log records, report ----
def tokenizer_from(ckpt, path):
    """The byte tokenizer a checkpoint was trained with (the task world needs its specials)."""
    state = ckpt.get("tokenizer", {})
    if state.get("kind") != "byte" or not {EOT, PAD} <= set(state.get("special", {})):
        die(f"{path} uses a {state.get('kind')!r} tokenizer; ppo.py needs sft.py's byte "
            f"tokenizer with {EOT} and {PAD}")
    return ByteTokenizer(state["special"])


def load_weights(model, state, path):
    """load_state_dict with a one-line error when the checkpoint does not fit the model."""
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:
        detail = str(e).splitlines()[1].strip() if "\n" in str(e) else str(e)
        die(f"{path} does not fit this model ({detail})")


def load_policy(path, device):
    """The sft.py checkpoint -> (its model with dropout 0, tokenizer, its checkpoint dict); a
    missing file names the command that writes it."""
    if not Path(path).is_file():
        die(f"{path} not found: run python sft.py first (or point --init-from at an sft.py "
            f"checkpoint)")
    ckpt = load_checkpoint(path, ("sft.py",), ("model_args", "config", "tokenizer"))
    if ckpt["config"].get("task", "generate") != "generate":
        die(f"{path} is a --task classify checkpoint; ppo.py needs a generating SFT model")
    tok = tokenizer_from(ckpt, path)
    policy = Llama(ModelConfig(**dict(ckpt["model_args"], dropout=0.0)))
    load_weights(policy, ckpt["model"], path)
    return policy.to(device).eval(), tok, ckpt


def load_reward_model(path, tok, device):
    """The reward.py checkpoint -> (frozen reward model, its reward_stats or None); a missing
    file names the command that writes it."""
    if not Path(path).is_file():
        die(f"{path} not found: run python reward.py first (or point --reward-model at a "
            f"reward.py checkpoint, or use --reward checker)")
    ckpt = load_checkpoint(path, ("reward.py",), ("model_args", "tokenizer"))
    if tokenizer_from(ckpt, path).special != tok.special:
        die(f"{path} has another tokenizer than the policy's: train it from the same sft.py "
            f"checkpoint")
    rm = build_reward_model(ckpt["model_args"])
    load_weights(rm, ckpt["model"], path)
    return rm.to(device).eval().requires_grad_(False), ckpt.get("reward_stats")


def load_resumed(cfg):
    """--resume: the checkpoint in --out-dir, and cfg with the run's own policy, reward and
    critic, whatever the flags say -> (cfg, checkpoint)."""
    resumed = load_checkpoint(Path(cfg.out_dir) / "ckpt.pt", ("ppo.py",), (
        "model", "value", "optimizer", "iter", "before", "kl_coef", "reward_moments", "rng"))
    cfg = dataclasses.replace(cfg, **{k: resumed["config"][k] for k in (
        "init_from", "reward", "reward_model", "critic")})
    if cfg.max_iters < resumed["iter"]:
        die(f"--max-iters {cfg.max_iters}: the checkpoint is at iter {resumed['iter']}; "
            f"pass --max-iters {resumed['iter']} or more to continue it")
    return cfg, resumed


def restore(resumed, path, model, optimizer, kl_ctl, moments, gens):
    """--resume: every state the next step reads, as it was saved -> (before, kl, first step)."""
    load_weights(model.policy, resumed["model"], path)
    model.load_value_state(resumed["value"])
    optimizer.load_state_dict(resumed["optimizer"])
    kl_ctl.value = resumed["kl_coef"]
    moments.mean, moments.var, moments.count = (resumed["reward_moments"][k] for k in
                                                ("mean", "var", "count"))
    torch.set_rng_state(resumed["rng"]["torch"])
    for gen, key in zip(gens, ("sample", "batch")):  # the rollouts' and the minibatches'
        gen.set_state(resumed["rng"][key])
    return resumed["before"], resumed.get("kl", 0.0), resumed["iter"]


def checkpoint_dict(cfg, step, model, optimizer, tok, sft_ckpt, kl_ctl, kl, before, moments,
                    gens):
    """ckpt.pt: the policy as a plain Llama (a next stage reads it), the value function, and
    every state --resume needs to replay the next steps bit for bit (docs/design.md section 4)."""
    return {"script": "ppo.py", "version": 1, "config": dataclasses.asdict(cfg),
            "model_args": dict(sft_ckpt["model_args"], dropout=0.0),  # dropout off everywhere
            "model": model.policy.state_dict(), "value": model.value_state(), "critic": cfg.critic,
            "optimizer": optimizer.state_dict(), "iter": step,
            "tokenizer": {"kind": "byte", "special": dict(tok.special)},
            "sft_from": cfg.init_from, "kl_coef": kl_ctl.value, "kl": kl, "before": before,
            "reward_moments": {"mean": moments.mean, "std": moments.std,
                               "var": moments.var, "count": moments.count},
            "task_world": {k: sft_ckpt["config"][k] for k in ("seed", "difficulty", "n_test")},
            "rng": {"torch": torch.get_rng_state(), "sample": gens[0].get_state(),
                    "batch": gens[1].get_state()}}


def log_eval(log_path, step, ev, t_start):
    """An evaluation's record in log.jsonl and its line on stdout."""
    rec = {"iter": step, "accuracy": ev["accuracy"], "accuracy_by_task": ev["accuracy_by_task"],
           "format_rate": ev["format_rate"], "elapsed_s": time.time() - t_start}
    held = ""
    if "rm_score_heldout" in ev:  # a reward model's score of the same greedy answers
        rec["rm_score_heldout"] = ev["rm_score_heldout"]
        held = f", RM score {ev['rm_score_heldout']:+.3f}"
    append_jsonl(log_path, rec)
    print(f"step {step}: held-out accuracy {ev['accuracy']:.3f} "
          + " ".join(f"{t} {a:.2f}" for t, a in ev["accuracy_by_task"].items()) + held)


def check_finite(stats, finite, step, ckpt_path):
    """A non-finite loss stops the run with one line saying whether a good checkpoint is left."""
    if not finite:
        kept = f"the last good checkpoint {ckpt_path} is kept" if ckpt_path.is_file() else \
            "no checkpoint was written"
        die(f"loss is {stats['loss']} at iter {step}; stopped, {kept} (try a lower "
            f"--learning-rate)")


def log_step(cfg, log_path, step, first, lr, m, stats, n_mb, n_tokens, dt, elapsed):
    """A PPO step's record in log.jsonl (rollout metrics m, update stats) and its line."""
    append_jsonl(log_path, {"iter": step, "loss": stats["loss"], "lr": lr,
                            "ms_per_iter": 1000 * dt, "tokens_per_s": n_tokens / dt,
                            "elapsed_s": elapsed, **m, **stats, "minibatches": n_mb})
    eta = elapsed / (step + 1 - first) * (cfg.max_iters - step - 1)
    print(f"iter {step}/{cfg.max_iters} | score {m['rm_score']:+.3f} | acc "
          f"{m['rollout_accuracy']:.3f} | kl {m['kl']:.3f} | beta {m['kl_coef']:.3f} | clip "
          f"{stats['clipfrac']:.3f} | akl {stats['approx_kl']:.4f} | vloss {stats['vf_loss']:.3f} "
          f"| ev {m['explained_variance']:+.2f} | ent {m['entropy']:.2f} | len "
          f"{m['response_length']:.1f} | {m['rollout_tokens_per_s'] / 1000:.1f}k tok/s | "
          f"{1000 * dt:.0f} ms | eta {format_eta(eta)}")


def changed_answers(before, after):
    """Held-out problems whose greedy answer changed: '[ok |BAD] prompt: SFT -> PPO' lines,
    the ones PPO fixed first, then the ones it broke, then the rest."""
    lines = []
    for ex, completion in after["samples"]:
        old = before["completions"].get(ex["prompt"])
        if old is None or old == completion:
            continue
        was, now = check_answer(old, ex["answer"]), check_answer(completion, ex["answer"])
        rank = 0 if now and not was else 1 if was and not now else 2
        lines.append((rank, f"[{'ok ' if now else 'BAD'}] {ex['prompt']!r}: {old!r} -> "
                            f"{completion!r} (gold {ex['answer']!r})"))
    return [line for _, line in sorted(lines, key=lambda x: x[0])]


def favourite_mistakes(examples, exp, k=12):
    """The wrong rollout answers the reward scored highest: where the RM is being exploited."""
    wrong = [i for i in range(len(examples)) if not exp["correct"][i]]
    wrong.sort(key=lambda i: -exp["scores"][i].item())
    return [f"{exp['scores'][i].item():+.2f} {examples[i]['prompt']!r}: {exp['texts'][i]!r} "
            f"(gold {examples[i]['answer']!r})" for i in wrong[:k]]


def report(cfg, final, after, exp, batch, t_start):
    """The SFT-vs-PPO table, the held-out answers that changed and the reward's favourite
    mistakes (samples.txt), then the final checkpoint and the done record -> that record."""
    out_dir, before, rm_on = Path(cfg.out_dir), final["before"], cfg.reward == "rm"
    fams = [t for t in TASK_FAMILIES if t in after["accuracy_by_task"]]  # the chain table's rows
    print(f"{'':<6}" + "".join(f"{t:>9}" for t in fams) + f"{'mean':>9}{'format':>9}")
    for name, m in (("SFT", before), ("PPO", after)):
        print(f"{name:<6}" + "".join(f"{m['accuracy_by_task'][t]:>9.3f}" for t in fams)
              + f"{m['accuracy']:>9.3f}{m['format_rate']:>9.3f}")
    lines = changed_answers(before, after)
    print(f"{len(lines)} held-out answers changed; the first few:")
    print("\n".join(lines[:6]))
    text = "\n".join(["# held-out greedy answers that changed (SFT -> PPO)", *lines]) + "\n"
    if exp is not None:
        text += (f"\n# the last rollout batch's wrong answers with the highest "
                 f"{'RM' if rm_on else 'checker'} score\n")
        text += "".join(line + "\n" for line in favourite_mistakes(batch, exp))
    (out_dir / "samples.txt").write_text(text)
    wall = time.time() - t_start
    headline = ("accuracy", "accuracy_by_task", "format_rate")
    # the kept model is the last one: the only held-out score is the test set, which must not
    # choose it (docs/design.md section 4)
    print(f"kept the last model (iter {cfg.max_iters}): no validation split to choose another")
    done = {"event": "done", "iter": cfg.max_iters, "best_iter": cfg.max_iters,
            **{k: after[k] for k in headline},
            "format_by_task": after["format_by_task"], "kl": final["kl"],
            "kl_coef": final["kl_coef"], "reward": cfg.reward, "critic": cfg.critic,
            **{f"{k}_before": before[k] for k in headline}, "wall_s": wall}
    if rm_on:
        done["rm_score_heldout"] = after["rm_score_heldout"]
    save_checkpoint(final, out_dir / "ckpt.pt")
    append_jsonl(out_dir / "log.jsonl", done)
    if cfg.plot:
        plot_ppo(out_dir / "log.jsonl", out_dir / "ppo.png")
    print(f"done in {format_eta(wall)}: accuracy {after['accuracy']:.3f} (SFT "
          f"{before['accuracy']:.3f}), KL {final['kl']:.3f} nats per response")
    return done


def sample_only(cfg, device, ctx):
    """--sample-only: answer --prompt with the PPO policy in --out-dir."""
    path = Path(cfg.out_dir) / "ckpt.pt"
    ckpt = load_checkpoint(path, ("ppo.py",), ("model_args", "tokenizer"))
    tok = tokenizer_from(ckpt, path)
    model = Llama(ModelConfig(**ckpt["model_args"]))
    load_weights(model, ckpt["model"], path)
    model.to(device).eval()
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
    "families": (lambda v: v == "all" or set(v.split(",")) <= set(TASK_FAMILIES),
                 "all or a comma list of add, sub, reverse, sort, count, compare"),
    "n_train": (lambda v: v >= 6, "an integer >= 6 (one problem per family at least)"),
    "max_iters": (lambda v: v >= 0, "an integer >= 0"),
    "rollout_batch": (lambda v: v >= 2, "an integer >= 2"),
    "rollout_temperature": (lambda v: v > 0, "a number > 0 (PPO needs a sampling policy)"),
    "max_response_tokens": (lambda v: v >= 1, "an integer >= 1"),
    "missing_eot_penalty": (lambda v: v >= 0, "a number >= 0"),
    "init_kl_coef": (lambda v: v >= 0, "a number >= 0"),
    "target_kl": (lambda v: v > 0, "a number > 0"),
    "kl_horizon": (lambda v: v >= 1, "an integer >= 1"),
    "gamma": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "lam": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "ppo_epochs": (lambda v: v >= 1, "an integer >= 1"),
    "minibatch_size": (lambda v: v >= 1, "an integer >= 1 (and <= --rollout-batch)"),
    "clip_range": (lambda v: 0 < v < 1, "a number in (0, 1)"),
    "clip_range_value": (lambda v: v > 0, "a number > 0"),
    "vf_coef": (lambda v: v >= 0, "a number >= 0"),
    "max_approx_kl": (lambda v: v >= 0, "a number >= 0 (0 = off)"),
    "learning_rate": (lambda v: 0 < v < 1, "a number in (0, 1)"),
    "min_lr": (lambda v: v >= 0, "a number >= 0 (and <= --learning-rate)"),
    "warmup_iters": (lambda v: v >= 0, "an integer >= 0"),
    "weight_decay": (lambda v: v >= 0, "a number >= 0"),
    "grad_clip": (lambda v: v >= 0, "a number >= 0 (0 = off)"),
    "eval_interval": (lambda v: v >= 1, "an integer >= 1"),
    "eval_max_new_tokens": (lambda v: v >= 1, "an integer >= 1"),
    "eval_batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "num_samples": (lambda v: v >= 1, "an integer >= 1"),
    "max_new_tokens": (lambda v: v >= 1, "an integer >= 1"),
    "temperature": (lambda v: v >= 0, "a number >= 0 (0 = greedy)"),
}
CHOICES = {"reward": ("rm", "checker"), "critic": ("shared", "separate")}


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


def plot_ppo(log_path, path):
    """ppo.png: left, the reward model's mean score of the held-out greedy answers and their
    true accuracy against the step, on two axes of one panel (reward hacking: the curves
    part); right, the KL to the reference and beta (needs matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot: matplotlib is not installed (pip install matplotlib); no figure written")
        return
    records = [json.loads(line) for line in Path(log_path).read_text().splitlines()]
    evals = [r for r in records if "accuracy" in r and "event" not in r]
    train = [r for r in records if "loss" in r]
    fig, (ax, ax_kl) = plt.subplots(1, 2, figsize=(12, 4))
    steps = [r["iter"] for r in evals]
    if evals and "rm_score_heldout" in evals[0]:
        ax.plot(steps, [r["rm_score_heldout"] for r in evals], "o-", color="tab:red",
                label="RM score, held-out greedy answers")
    ax.plot([r["iter"] for r in train], [r["rm_score"] for r in train], color="tab:orange",
            alpha=0.5, label="reward of the rollouts (raw)")
    ax.set_xlabel("PPO step")
    ax.set_ylabel("reward")
    ax.legend(loc="upper left", fontsize=8)
    acc = ax.twinx()
    acc.plot(steps, [r["accuracy"] for r in evals], "s-", color="tab:blue",
             label="true accuracy, held-out greedy")
    acc.set_ylabel("true accuracy")
    acc.legend(loc="lower right", fontsize=8)
    ax.set_title("reward vs true accuracy")
    ax_kl.plot([r["iter"] for r in train], [r["kl"] for r in train], label="KL (nats/response)")
    ax_kl.plot([r["iter"] for r in train], [r["kl_coef"] for r in train], label="beta")
    ax_kl.set_xlabel("PPO step")
    ax_kl.set_title("KL to the SFT model")
    ax_kl.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
