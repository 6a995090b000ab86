"""Reward model: learn a scalar score that ranks a right answer above a wrong one.

RLHF needs a number for "how good is this response". A reward model (RM) learns it from
preference pairs (prompt, chosen, rejected): the sft.py transformer with its LM head swapped for
a scalar head, read at the last real token, trained so that r(chosen) > r(rejected). The loss
is Bradley-Terry, -log sigmoid(r_c - r_r) (Bradley & Terry 1952; Christiano et al. 2017,
arXiv:1706.03741; Ouyang et al. 2022, InstructGPT, arXiv:2203.02155, Eq. 1), optionally with
Llama 2's margin (arXiv:2307.09288, Eq. 2) or a hinge (a margin ranking loss), plus reward
centering (Eisenstein et al. 2023, arXiv:2312.09244). On the task world the pairs have a
ground truth, so the sanity checks that catch a broken RM are numbers, not impressions: pair
accuracy on held-out problems, AUC between the SFT policy's right and wrong answers, the
correlation of reward with length, padding invariance. Best-of-n sampling (keep the one of n
answers the RM scores highest, as in Llama 2's rejection sampling) shows whether the RM is worth
optimising against: ppo.py reads this file's checkpoint.

Run:
    python sft.py                       # first: writes out/sft/ckpt.pt (3.5 min on a CPU)
    python reward.py                    # RM from that checkpoint, pairs of both sources
    python reward.py --pairs synthetic  # hand-made mistakes only (or --pairs policy)
    python reward.py --loss hinge       # margin ranking loss instead of Bradley-Terry
    python reward.py --bon-beta 4       # also best-of-n by reward + 4 log pi_SFT(answer)
    python reward.py --score-only --prompt "What is 12 + 7?" --response "19<|endoftext|>"
    python reward.py --device cuda      # GPU preset: more pairs and steps
Result: held-out pair accuracy 0.822, best-of-16 0.777 < greedy SFT 0.887 (docs/reward.md).

Simplifications: the RM is the whole SFT model plus two blocks and a scalar head, trained in
full (no frozen trunk, no separate value model); pairs come from a checker, not from people, so
"preference" here means "correct beats incorrect"; the on-policy pairs are sampled once,
before training (not refreshed as the RM learns).
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
import torch.nn as nn
import torch.nn.functional as F


# -------------------------------------------------------------------------------
# Config
# -------------------------------------------------------------------------------
@dataclass
class Config:
    device: str = "auto"  # auto|cpu|cuda|cuda:N|mps
    dtype: str = "auto"  # auto|float32|bfloat16|float16
    compile: bool = False  # torch.compile the model (on by default in the GPU preset)
    seed: int = 1337  # training pairs, sampling, batches (held-out pairs: the SFT run's seed)
    out_dir: str = "out/reward"  # ckpt.pt, log.jsonl and the figures go here
    init_from: str = "out/sft/ckpt.pt"  # the sft.py checkpoint: RM backbone and policy to sample
    pairs: str = "both"  # synthetic (hand-made mistakes) | policy (the SFT policy's) | both
    n_train: int = 18000  # training problems for synthetic pairs (train split of the task world)
    n_policy: int = 4000  # of those, the first n_policy also get on-policy pairs (sampling costs)
    policy_samples: int = 4  # answers sampled per training problem for on-policy pairs
    policy_temperature: float = 1.0  # temperature of those samples (and of best-of-n)
    policy_pairs_per_prompt: int = 2  # at most this many on-policy pairs per problem
    synthetic_per_prompt: int = 1  # hand-made mistakes per training problem
    loss: str = "bt"  # bt (Bradley-Terry, -log sigmoid(r_c - r_r - m)) | hinge
    margin_weight: float = 0.0  # bt: m = weight * pair margin (how wrong the rejected is); 0 = off
    hinge_margin: float = 1.0  # hinge: the reward gap asked of every pair
    center: float = 0.01  # reward centering: + center * mean((r_c + r_r)^2)
    lm_weight: float = 0.3  # + weight * next-token loss on the chosen responses (GRM); 0 = off
    extra_layers: int = 2  # new blocks on top of the SFT trunk, identity at the start
    lora_rank: int = 0  # LoRA rank on attention and MLP projections; 0 = full fine-tuning
    lora_alpha: float = 16.0  # LoRA scaling is alpha / r
    max_iters: int = 1500  # optimizer steps
    eval_interval: int = 500  # steps between held-out pair evaluations and checkpoints
    eval_iters: int = 16  # batches of held-out pairs per evaluation
    batch_size: int = 32  # pairs per step (64 sequences in one forward pass)
    learning_rate: float = 5e-4  # peak learning rate (AdamW)
    min_lr: float = 5e-5  # floor of the cosine decay
    warmup_iters: int = 30  # linear warmup steps
    weight_decay: float = 0.1  # AdamW decoupled weight decay on matrices
    grad_clip: float = 1.0  # clip the global gradient norm (0 = off)
    best_of: str = "1,4,16"  # n of best-of-n, maj@n and pass@n on the held-out problems
    bon_beta: float = 0.0  # also best-of-n by reward + beta * log pi_SFT(answer) (0 = off)
    eval_max_new_tokens: int = 16  # decoding budget per answer (as sft.py's evaluation)
    eval_batch_size: int = 256  # sequences decoded or scored together
    resume: bool = False  # continue the run saved in --out-dir
    overwrite: bool = False  # allow replacing an existing checkpoint in --out-dir
    score_only: bool = False  # load the RM in --out-dir and only score --prompt/--response
    prompt: str = "What is 12 + 7?"  # instruction for --score-only
    response: str = "19<|endoftext|>"  # response for --score-only (end it with <|endoftext|>)
    plot: bool = False  # write reward_hist.png and best_of_n.png (needs matplotlib)


# on CUDA, for every field not given: more problems and steps (the model is the SFT one)
GPU_PRESET = dict(n_policy=18000, policy_samples=8, max_iters=6000, batch_size=64,
                  eval_interval=1000, compile=True)


# -------------------------------------------------------------------------------
# The reward model
# -------------------------------------------------------------------------------
def reward_loss(r_chosen, r_rejected, loss="bt", margin=None, hinge_margin=1.0, center=0.0):
    """Mean pairwise ranking loss of rewards r_chosen, r_rejected (N,) -> a scalar.

    bt: Bradley-Terry, P(chosen beats rejected) = sigmoid(r_c - r_r), so the negative
        log-likelihood is -log sigmoid(r_c - r_r - m) (InstructGPT Eq. 1). A margin m (N,) is
        subtracted inside the sigmoid, as in Llama 2 (Eq. 2): a pair whose rejected answer is
        far off must win by more, so the loss stays high until r_c - r_r exceeds m.
    hinge: max(0, hinge_margin + m - (r_c - r_r)), PyTorch's MarginRankingLoss with y = 1: no
        loss once the gap reaches the margin, so confident pairs stop pulling the rewards apart.
    center: + center * mean((r_c + r_r)^2) (Eisenstein et al. 2023, sec 3): the Bradley-Terry
        loss sees only differences, so the rewards may drift as a whole; this keeps their mean
        near 0, which the RL step (ppo.py) likes, at no cost to the ranking.
    """
    diff = r_chosen - r_rejected  # (N,) the reward gap each pair should make positive
    m = 0.0 if margin is None else margin
    if loss == "bt":
        losses = -F.logsigmoid(diff - m)  # logsigmoid is stable where log(sigmoid(x)) is not
    elif loss == "hinge":
        losses = F.relu(hinge_margin + m - diff)
    else:
        raise ValueError(f"unknown reward loss {loss!r}; expected bt or hinge")
    out = losses.mean()
    if center:
        out = out + center * ((r_chosen + r_rejected) ** 2).mean()
    return out


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


def rm_from_sft(model_args, sft_state):
    """The reward model initialised from an SFT state dict: the trunk's weights, the new
    scalar head at zero, and the blocks model_args has beyond the SFT model's (if any) with
    their output projections at zero, so each starts as the identity on the residual stream.

    Why extra blocks: to judge "47 + 38 = 95" the RM must compare each answer token with the
    token the SFT model would have written there. That prediction is only complete at the top
    of the SFT trunk, in the position before; comparing it with the token that follows, then
    gathering the verdicts at the last token, takes two more attention hops than the trunk
    has. Two new blocks give them (the held-out pair accuracy table of docs/reward.md measures it).
    """
    model = build_reward_model(model_args)
    missing, _ = model.load_state_dict({k: v for k, v in sft_state.items()
                                        if not k.startswith("lm_head.")}, strict=False)
    n_sft = 1 + max(int(k.split(".")[2]) for k in sft_state if k.startswith("transformer.h."))
    for block in model.transformer.h[n_sft:]:
        nn.init.zeros_(block.attn.c_proj.weight)
        nn.init.zeros_(block.mlp.c_proj.weight)
    new = {k for k in missing if not any(k.startswith(f"transformer.h.{i}.")
                                         for i in range(n_sft, model_args["n_layer"]))}
    assert new == {"lm_head.weight"}, new  # all else comes from SFT
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


# -------------------------------------------------------------------------------
# Preference pairs
# -------------------------------------------------------------------------------
# A preference pair: the same prompt, a chosen response and a rejected one, both as the
# policy would write them (text + <|endoftext|>). Two sources:
#   synthetic: chosen = the gold answer, rejected = a plausible mistake of the family;
#   policy:    answers sampled from the SFT model, judged by the checker (its real mistakes).
MISTAKES = {  # the mistakes make_mistake knows, per family
    "add": ("off_by_one", "off_by_ten", "drop_digit", "swap_digits", "no_eot"),
    "sub": ("off_by_one", "off_by_ten", "drop_digit", "swap_digits", "no_eot"),
    "compare": ("smaller", "off_by_one", "no_eot"),
    "reverse": ("swap_letters", "part_reversed", "no_eot"),
    "sort": ("swap_letters", "part_sorted", "no_eot"),
    "count": ("off_by_one", "no_eot"),
}


def acceptable(response, answer):
    """What a pair may call chosen: the checker's exact match *and* an <|endoftext|> that
    ends it (a response that never stops is rejected, whatever it says). Every rejected
    response is not acceptable; sft.py's accuracy (check_answer alone) is unchanged."""
    return EOT in response and check_answer(response, answer)


def make_mistake(kind, ex, rng):
    """A wrong answer of `kind` for problem ex (text without <|endoftext|>), or None when
    the kind does not apply (swapping the digits of a one-digit number) or happens to give
    the right answer back (swapping two equal letters)."""
    gold, prompt = ex["answer"], ex["prompt"]
    word = prompt.rsplit(" ", 1)[-1]  # the word of reverse/sort/count prompts
    out = None
    if kind == "off_by_one":
        out = str(int(gold) + rng.choice((-1, 1))) if gold != "0" else "1"
    elif kind == "off_by_ten":
        out = str(int(gold) + 10) if int(gold) < 10 else str(int(gold) + rng.choice((-10, 10)))
    elif kind == "drop_digit" and len(gold) > 1:
        i = rng.randrange(len(gold))
        out = str(int(gold[:i] + gold[i + 1:]))  # int() drops a leading zero left behind
    elif kind in ("swap_digits", "swap_letters") and len(gold) > 1:
        i = rng.randrange(len(gold) - 1)
        out = gold[:i] + gold[i + 1] + gold[i] + gold[i + 2:]
        out = None if kind == "swap_digits" and out[0] == "0" else out
    elif kind == "smaller":
        out = str(min(int(n) for n in re.findall(r"\d+", prompt)))
    elif kind == "part_reversed":  # the word as it is, or only its first k letters reversed
        k = rng.randint(2, len(word) - 1)
        out = word if rng.random() < 0.3 else word[:k][::-1] + word[k:]
    elif kind == "part_sorted":  # the word as it is, or only its first k letters sorted
        k = rng.randint(2, len(word) - 1)
        out = word if rng.random() < 0.3 else "".join(sorted(word[:k])) + word[k:]
    return None if out == gold else out


def edit_distance(a, b):
    """Levenshtein distance between two sequences (one row of the DP table at a time)."""
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


def pair_margin(rejected, answer):
    """How wrong the rejected response is, in [0, 1]: the edit distance between it and the
    gold response (<|endoftext|> counted as one symbol) over the longer of the two. A missing
    end token on a right answer, or one wrong digit of two, is 1/3; a wrong count is 1/2."""
    gold = list(answer) + [EOT]
    text, eot, _ = rejected.partition(EOT)
    got = list(text) + ([EOT] if eot else [])
    return edit_distance(got, gold) / max(len(got), len(gold))


def make_pair(ex, chosen, rejected, source):
    return {"prompt": ex["prompt"], "chosen": chosen, "rejected": rejected, "task": ex["task"],
            "margin": pair_margin(rejected, ex["answer"]), "source": source}


def synthetic_pairs(examples, per_prompt, rng):
    """`per_prompt` pairs per problem: the gold answer against a hand-made mistake, its kind
    drawn uniformly from the family's MISTAKES (tried again when it does not apply)."""
    pairs = []
    for ex in examples:
        for _ in range(per_prompt):
            rejected = ex["answer"]  # no_eot: the right text that never stops
            for _ in range(20):
                kind = rng.choice(MISTAKES[ex["task"]])
                wrong = None if kind == "no_eot" else make_mistake(kind, ex, rng)
                if kind == "no_eot" or wrong is not None:
                    rejected = ex["answer"] if wrong is None else wrong + EOT
                    break
            pairs.append(make_pair(ex, ex["answer"] + EOT, rejected, "synthetic"))
    return pairs


def policy_pairs(examples, samples, per_prompt, rng):
    """Pairs from the policy's own answers (samples[i]: the responses to examples[i]).

    Each distinct unacceptable answer (up to per_prompt of them) is rejected against an
    acceptable sample of the same prompt, or the gold answer when the policy had none.
    """
    pairs = []
    for ex, responses in zip(examples, samples):
        good = [r for r in responses if acceptable(r, ex["answer"])]
        bad = list(dict.fromkeys(r for r in responses if not acceptable(r, ex["answer"])))
        for rejected in bad[:per_prompt]:
            chosen = rng.choice(good) if good else ex["answer"] + EOT
            pairs.append(make_pair(ex, chosen, rejected, "policy"))
    return pairs


def build_pairs(cfg, policy, tok, examples, n_policy, k, device, ctx, seed):
    """Pairs of the sources --pairs asks for: synthetic ones from every problem of
    `examples`, on-policy ones from the first n_policy, k samples each (k >= policy_samples:
    the first policy_samples make the pairs; n_policy = 0: no sampling). The samples are
    drawn with their own generator (seed), so train and test pairs do not share a stream.
    Returns (pairs, samples), samples[i] the k policy answers to examples[i], i < n_policy."""
    rng, samples = random.Random(seed), []
    pairs = []
    if cfg.pairs in ("synthetic", "both"):
        pairs += synthetic_pairs(examples, cfg.synthetic_per_prompt, rng)
    if n_policy:
        gen = torch.Generator(device=device).manual_seed(seed)
        samples = sample_answers(policy, tok, examples[:n_policy], k, cfg.policy_temperature,
                                 cfg.eval_max_new_tokens, cfg.eval_batch_size, device, ctx, gen)
    if cfg.pairs in ("policy", "both"):
        pairs += policy_pairs(examples[:n_policy], [s[:cfg.policy_samples] for s in samples],
                              cfg.policy_pairs_per_prompt, rng)
    return pairs, samples


def make_data(cfg, policy, tok, sft_cfg, block_size, best_of, device, ctx):
    """Training pairs from train problems; held-out pairs and samples from sft.py's own held-out
    problems (same seed, difficulty and count: every stage of the chain scores the same ones),
    drawn with the SFT run's seed, the same for every --seed; the SFT policy's greedy score."""
    try:
        train_ex = make_tasks(cfg.n_train, "train", cfg.seed + 2, sft_cfg["difficulty"])
        test_ex = make_tasks(sft_cfg["n_test"], "test", sft_cfg["seed"] + 1, sft_cfg["difficulty"])
    except (ValueError, KeyError) as e:
        die(f"cannot build the task world of {cfg.init_from} ({e}); lower --n-train")
    random.Random(cfg.seed).shuffle(train_ex)  # make_tasks lists family by family: mix them,
    # so that the first n_policy problems (the on-policy ones) cover every family
    longest = max(len(encode_prompt(tok, ex["prompt"])) for ex in train_ex + test_ex)
    if longest + cfg.eval_max_new_tokens > block_size:
        die(f"prompts of {longest} tokens + --eval-max-new-tokens {cfg.eval_max_new_tokens} "
            f"exceed the context of {cfg.init_from} ({block_size} tokens)")
    t0 = time.time()
    n_policy = 0 if cfg.pairs == "synthetic" else cfg.n_policy
    train_pairs, _ = build_pairs(cfg, policy, tok, train_ex, n_policy, cfg.policy_samples,
                                 device, ctx, cfg.seed)
    test_pairs, test_samples = build_pairs(cfg, policy, tok, test_ex, len(test_ex),
                                           max(best_of + [cfg.policy_samples]), device, ctx,
                                           sft_cfg["seed"] + 1)
    if not train_pairs or not test_pairs:
        die("the SFT policy made no mistake to learn from: use --pairs both or synthetic")
    sample_logps = None
    if cfg.bon_beta:  # what the SFT policy believes of each held-out sample, for best_of_n_reg
        flat = [(ex["prompt"], x) for ex, xs in zip(test_ex, test_samples) for x in xs]
        sample_logps = response_logps(policy, tok, [p for p, _ in flat], [x for _, x in flat],
                                      device, cfg.eval_batch_size, ctx)
    t_pairs = time.time() - t0
    greedy = evaluate_tasks(policy, tok, test_ex, cfg.eval_max_new_tokens, cfg.eval_batch_size,
                            device, ctx)
    counts = Counter(p["source"] for p in train_pairs)
    print(f"pairs: {len(train_pairs)} train ({dict(counts)}), {len(test_pairs)} held out; "
          f"sampling took {t_pairs:.1f}s; greedy SFT accuracy {greedy['accuracy']:.3f}")
    return types.SimpleNamespace(train_pairs=train_pairs, test_pairs=test_pairs, test_ex=test_ex,
                                 test_samples=test_samples, sample_logps=sample_logps,
                                 greedy=greedy, counts=counts)


def encode_pairs(tok, pairs):
    """Pairs -> (chosen ids, rejected ids, margin, prompt length) tuples, tokenized once."""
    return [(encode_scored(tok, p["prompt"], p["chosen"]),
             encode_scored(tok, p["prompt"], p["rejected"]), p["margin"],
             len(encode_prompt(tok, p["prompt"]))) for p in pairs]


def collate_pairs(batch, pad_id):
    """B encoded pairs -> idx (2B, T) (the B chosen rows, then the B rejected rows), lengths
    (2B,), margins (B,) and the chosen rows' next-token targets (B, T) for --lm-weight: one
    forward pass scores both sides of every pair.

    targets[i, t] is the token after position t of chosen response i, IGNORE_INDEX on the
    prompt (as sft.py masks it), at the last real token and on the padding.
    """
    idx, lengths = collate_scored([c for c, _, _, _ in batch] + [r for _, r, _, _ in batch],
                                  pad_id)
    targets = torch.full((len(batch), idx.size(1)), IGNORE_INDEX, dtype=torch.long)
    for i, (chosen, _, _, n_prompt) in enumerate(batch):
        targets[i, n_prompt - 1:len(chosen) - 1] = torch.tensor(chosen[n_prompt:])
    margins = torch.tensor([m for _, _, m, _ in batch], dtype=torch.float32)
    return idx, lengths, margins, targets


def get_batch(encoded, batch_size, generator, pad_id, device):
    """batch_size pairs drawn at random (with replacement) -> collate_pairs on `device`."""
    ix = torch.randint(len(encoded), (batch_size,), generator=generator).tolist()
    return [x.to(device) for x in collate_pairs([encoded[i] for i in ix], pad_id)]


def capture_hidden(model):
    """NEW vs sft.py: a dict that a forward hook on model.lm_head fills with the head's input,
    the final-norm hidden states (2B, T, C), at every forward pass. --lm-weight reads them with
    the SFT model's LM head: the reward model keeps predicting the chosen answers, so tuning
    the trunk for a score does not erase the answer computation that judging one needs (the
    text-generation regulariser of GRM, Yang et al. 2024, arXiv:2406.10216)."""
    store = {}
    model.lm_head.register_forward_hook(lambda module, args, out: store.update(h=args[0]))
    return store


def pair_rewards(model, idx, lengths, ctx):
    """Rewards of a collate_pairs batch -> (r_chosen (B,), r_rejected (B,)) in float32."""
    with ctx:
        r = pooled_rewards(model, idx, lengths).float()  # (2B,)
    return r.chunk(2)


# -------------------------------------------------------------------------------
# Training, evaluation and main
# -------------------------------------------------------------------------------
@torch.no_grad()
def estimate_loss(model, encoded, cfg, pad_id, device, ctx):
    """Loss and pair accuracy over the first --eval-iters batches of held-out pairs (fixed:
    no RNG used, so resume stays exact)."""
    losses, wins, n = [], 0, 0
    for k in range(cfg.eval_iters):
        chunk = encoded[k * cfg.batch_size:(k + 1) * cfg.batch_size]
        if not chunk:
            break
        idx, lengths, margins, _ = collate_pairs(chunk, pad_id)
        r_c, r_r = pair_rewards(model, idx.to(device), lengths.to(device), ctx)
        losses.append(reward_loss(r_c, r_r, cfg.loss, margins.to(device) * cfg.margin_weight,
                                  cfg.hinge_margin, cfg.center).item())
        wins, n = wins + (r_c > r_r).sum().item(), n + len(chunk)
    return sum(losses) / len(losses), wins / n


def train(cfg, raw_model, lm_head, data, tok, model_args, sft_cfg, device, dtype, ctx, resumed,
          t_start):
    """Every --eval-interval steps evaluate the held-out pairs and checkpoint, then one AdamW
    step on a batch of pairs, then log -> (last val loss, what the final checkpoint needs)."""
    ckpt_path, log_path = Path(cfg.out_dir) / "ckpt.pt", Path(cfg.out_dir) / "log.jsonl"
    device_type, pad_id = "cuda" if device.startswith("cuda") else "cpu", tok.special[PAD]
    train_enc, test_enc = encode_pairs(tok, data.train_pairs), encode_pairs(tok, data.test_pairs)
    random.Random(cfg.seed).shuffle(test_enc)  # the eval batches mix families and sources
    hidden = None if lm_head is None else capture_hidden(raw_model)
    optimizer, params, data_gen, start, best_val = training_state(cfg, raw_model, lm_head,
                                                                  device_type, resumed, log_path)
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == "float16")
    model = torch.compile(raw_model) if cfg.compile else raw_model  # raw_model: saved and evaluated
    data_state = data_gen.get_state()
    X, L, M, Y = get_batch(train_enc, cfg.batch_size, data_gen, pad_id, device)
    t_train = t_last = time.time()  # the ETA counts training only, not the sampling before
    for step in range(start, cfg.max_iters + 1):
        last_step = step == cfg.max_iters
        if step % cfg.eval_interval == 0 or last_step:
            val_loss, val_acc = estimate_loss(raw_model, test_enc, cfg, pad_id, device, ctx)
            print(f"step {step}: val loss {val_loss:.4f}, held-out pair accuracy {val_acc:.3f}")
            append_jsonl(log_path, {"iter": step, "val_loss": val_loss, "pair_accuracy": val_acc,
                                    "elapsed_s": time.time() - t_start})
            best_val = min(best_val, val_loss)
            if step > start or last_step:
                save_checkpoint(make_checkpoint(cfg, model_args, tok, sft_cfg, raw_model, lm_head,
                                                optimizer, step, best_val, data_state), ckpt_path)
            t_last = time.time()  # evaluation time is not training time
        if last_step:
            break
        lr = get_lr(step, cfg.learning_rate, cfg.min_lr, cfg.warmup_iters, cfg.max_iters)
        for group in optimizer.param_groups:
            group["lr"] = lr
        try:
            r_c, r_r = pair_rewards(model, X, L, ctx)
            loss = reward_loss(r_c, r_r, margin=M * cfg.margin_weight, loss=cfg.loss,
                               hinge_margin=cfg.hinge_margin, center=cfg.center)
            if lm_head is not None:
                with ctx:
                    logits = lm_head(hidden["h"][:len(Y)])  # (B, T, C) -> (B, T, V): chosen rows
                    lm_loss = F.cross_entropy(logits.flatten(0, 1).float(), Y.flatten(),
                                              ignore_index=IGNORE_INDEX)
                loss = loss + cfg.lm_weight * lm_loss
            n_tokens = int(L.sum())
            data_state = data_gen.get_state()  # before the pending batch: resume redraws it
            X, L, M, Y = get_batch(train_enc, cfg.batch_size, data_gen, pad_id, device)
            scaler.scale(loss).backward()
        except torch.OutOfMemoryError:
            die(f"CUDA out of memory at batch size {cfg.batch_size}; "
                f"try --batch-size {cfg.batch_size // 2}")
        loss_value, batch_acc = loss.item(), (r_c > r_r).float().mean().item()
        if not math.isfinite(loss_value):
            kept = f"the last good checkpoint {ckpt_path} is kept" if ckpt_path.is_file() else \
                "no checkpoint was written"
            die(f"loss is {loss_value} at iter {step}; stopped, {kept} (try a lower "
                f"--learning-rate)")
        if cfg.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if device_type == "cuda":
            torch.cuda.synchronize()
        now = time.time()
        dt, t_last = now - t_last, now
        append_jsonl(log_path, {"iter": step, "loss": loss_value, "lr": lr,
                                "ms_per_iter": 1000 * dt, "tokens_per_s": n_tokens / dt,
                                "elapsed_s": now - t_start, "accuracy": batch_acc})
        eta = (now - t_train) / (step + 1 - start) * (cfg.max_iters - step - 1)
        print(f"iter {step}/{cfg.max_iters} | loss {loss_value:.4f} | acc {batch_acc:.2f} | "
              f"lr {lr:.1e} | {1000 * dt:.1f} ms | {n_tokens / dt / 1000:.1f}k tok/s | "
              f"eta {format_eta(eta)}")
    return val_loss, optimizer, best_val, data_state


def auc(scores, labels):
    """Area under the ROC curve: the probability that a random positive scores above a
    random negative (ties count one half), by the Mann-Whitney rank sum. None if a class is
    missing."""
    scores, labels = torch.as_tensor(scores, dtype=torch.float64), torch.as_tensor(labels)
    n_pos, n_neg = int(labels.sum()), int((~labels.bool()).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    _, inverse, counts = torch.unique(scores, return_inverse=True, return_counts=True)
    last = counts.cumsum(0).double()  # the rank (1-based) of the last score of each tie group
    ranks = (last - (counts - 1) / 2)[inverse]  # tied scores share their mean rank
    return ((ranks[labels.bool()].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)).item()


def pearson(x, y):
    """Pearson correlation of two equal-length sequences; 0 when either is constant."""
    x, y = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
    x, y = x - x.mean(), y - y.mean()
    den = (x.norm() * y.norm()).item()
    return (x @ y).item() / den if den > 0 else 0.0


def pair_table(pairs, r_c, r_r):
    """Pair accuracy (strict r_c > r_r: a tie is not a win) overall, per family and per
    source -> {"all": acc, "by_task": {...}, "by_source": {...}, "counts": {...}}."""
    wins = (r_c > r_r).tolist()
    by = defaultdict(list)
    for p, w in zip(pairs, wins):
        by[("task", p["task"])].append(w)
        by[("source", p["source"])].append(w)
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    return {"all": mean(wins), "by_task": {t: mean(by[("task", t)]) for t in TASK_FAMILIES
                                           if by[("task", t)]},
            "by_source": {s: mean(v) for (k, s), v in by.items() if k == "source"},
            "counts": {s: len(v) for (k, s), v in by.items() if k == "source"}}


def best_of_n(examples, samples, rewards, ns):
    """True accuracy per family of three ways to use n samples per problem (the first n of
    each list): best-of-n (the answer the RM scores highest), maj@n (the most common answer
    text, first seen wins a tie; Wang et al. 2022, self-consistency) and pass@n (any right:
    an oracle, the ceiling of reranking)."""
    out = {}
    for n in ns:
        hits = {k: defaultdict(list) for k in ("best_of_n", "maj_at_n", "pass_at_n", "format")}
        for ex, responses, r in zip(examples, samples, rewards):
            responses, r = responses[:n], r[:n]
            best = responses[int(torch.argmax(r))]
            votes = Counter(x.split(EOT)[0].strip() for x in responses)
            hits["best_of_n"][ex["task"]].append(check_answer(best, ex["answer"]))
            hits["maj_at_n"][ex["task"]].append(check_answer(votes.most_common(1)[0][0],
                                                             ex["answer"]))
            hits["pass_at_n"][ex["task"]].append(any(check_answer(x, ex["answer"])
                                                     for x in responses))
            hits["format"][ex["task"]].append(follows_format(best, ex["task"]))
        for k, by_task in hits.items():
            acc = {t: sum(v) / len(v) for t, v in by_task.items()}
            out.setdefault(k, {})[n] = {"mean": sum(acc.values()) / len(acc), "by_task": acc}
    return out


@torch.no_grad()
def evaluate_rm(model, tok, pairs, examples, samples, best_of, device, ctx, batch_size,
                sample_logps=None, bon_beta=0.0):
    """The sanity checks of a reward model on held-out problems (see the module docstring)
    -> a dict of metrics (pair accuracy, AUC, length correlation, padding invariance,
    reward statistics, best-of-n). With sample_logps (the SFT policy's log-prob of each
    sample, flat) and bon_beta > 0, also regularized best-of-n (Jinnai et al. 2024,
    arXiv:2404.01054): the sample with the highest reward + bon_beta * log pi_SFT, which keeps
    the pick near what the policy itself believes."""
    m, prompts = {}, [p["prompt"] for p in pairs]
    r_c = score(model, tok, prompts, [p["chosen"] for p in pairs], device, batch_size, ctx)
    r_r = score(model, tok, prompts, [p["rejected"] for p in pairs], device, batch_size, ctx)
    m["pairs"] = pair_table(pairs, r_c, r_r)
    # right padding must not move a reward: the same sequences with 7 extra pad tokens each
    seqs = [encode_scored(tok, p["prompt"], p["chosen"]) for p in pairs[:batch_size]]
    idx, lengths = collate_scored(seqs, tok.special[PAD])
    padded = torch.cat((idx, torch.full((len(seqs), 7), tok.special[PAD])), dim=1)
    with ctx:
        a = pooled_rewards(model, idx.to(device), lengths.to(device)).float()
        b = pooled_rewards(model, padded.to(device), lengths.to(device)).float()
    m["pad_invariance"] = (a - b).abs().max().item()
    # the SFT policy's own held-out samples: does the RM tell its right answers from its wrong?
    flat = [(ex, x) for ex, xs in zip(examples, samples) for x in xs]
    rewards = score(model, tok, [ex["prompt"] for ex, _ in flat], [x for _, x in flat],
                    device, batch_size, ctx)
    labels = torch.tensor([acceptable(x, ex["answer"]) for ex, x in flat])
    n_tokens = [len(tok.encode(x, [EOT])) for _, x in flat]  # response lengths
    by_task = defaultdict(list)
    for i, (ex, _) in enumerate(flat):
        by_task[ex["task"]].append(i)
    m["auc"] = auc(rewards, labels)
    m["auc_by_task"] = {t: auc(rewards[ix], labels[ix]) for t, ix in by_task.items()}
    m["length_corr_by_task"] = {t: pearson(rewards[ix], [n_tokens[i] for i in ix])
                                for t, ix in by_task.items()}
    m["length_corr"] = max(abs(c) for c in m["length_corr_by_task"].values())
    # the control: the same correlation for the true reward (the checker's 1/0). Where wrong
    # answers are longer or shorter than right ones, a perfect RM shows it too
    m["length_corr_checker_by_task"] = {t: pearson(labels[ix], [n_tokens[i] for i in ix])
                                        for t, ix in by_task.items()}
    m["sample_acceptable_rate"] = labels.float().mean().item()
    m["reward_mean"], m["reward_std"] = rewards.mean().item(), rewards.std().item()
    k = len(samples[0])
    m["best"] = best_of_n(examples, samples, rewards.view(-1, k), best_of)
    if sample_logps is not None and bon_beta > 0:
        regularized = (rewards + bon_beta * sample_logps).view(-1, k)
        m["best"]["best_of_n_reg"] = best_of_n(examples, samples, regularized,
                                               best_of)["best_of_n"]
    m["rewards"], m["labels"] = rewards, labels  # for the figure
    return m


def main(argv=None):
    cfg, given = parse_config(Config, argv, __doc__.splitlines()[0])
    device = resolve_device(cfg.device)
    if device.startswith("cuda"):
        cfg = apply_preset(cfg, GPU_PRESET, given)
    dtype = resolve_dtype(cfg.dtype, device)
    check_config(cfg, RULES, CHOICES)
    try:
        best_of = sorted({int(n) for n in cfg.best_of.split(",")})
    except ValueError:
        best_of = [0]
    if best_of[0] < 1:
        die(f"--best-of {cfg.best_of}: expected a comma-separated list of integers >= 1")
    print(" ".join(f"{k}={v}" for k, v in dataclasses.asdict(cfg).items()))
    print(f"device={device} dtype={dtype} compile={'on' if cfg.compile else 'off'}")
    torch.manual_seed(cfg.seed)
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    ctx = (torch.amp.autocast(device_type, dtype=getattr(torch, dtype)) if dtype != "float32"
           else contextlib.nullcontext())
    if cfg.score_only:
        return score_only(cfg, device, ctx)
    check_out_dir(cfg.out_dir, cfg.resume, cfg.overwrite)
    resumed = None
    if cfg.resume:
        resumed = load_checkpoint(Path(cfg.out_dir) / "ckpt.pt", ("reward.py",), (
            "model", "optimizer", "iter", "rng", "best_val_loss", "sft_from"))
        cfg = dataclasses.replace(cfg, init_from=resumed["sft_from"])
    t_start = time.time()
    # ---- the SFT policy (samples answers, frozen) and the RM (its copy with a scalar head) ----
    policy, tok, sft_ckpt = load_sft(cfg.init_from, device)
    model, model_args, lm_head, n_trainable = build_rm(cfg, sft_ckpt, resumed, device)
    # ---- pairs: train problems for training, sft.py's own held-out problems for evaluation ----
    data = make_data(cfg, policy, tok, sft_ckpt["config"], model_args["block_size"], best_of,
                     device, ctx)
    # ---- train, then the sanity checks and best-of-n on sft.py's held-out problems ----
    val_loss, optimizer, best_val, data_state = train(
        cfg, model, lm_head, data, tok, model_args, sft_ckpt["config"], device, dtype, ctx,
        resumed, t_start)
    merge_lora(model)
    m = evaluate_rm(model, tok, data.test_pairs, data.test_ex, data.test_samples, best_of, device,
                    ctx, cfg.eval_batch_size, data.sample_logps, cfg.bon_beta)
    print_report(m, data.greedy)
    ckpt = make_checkpoint(cfg, model_args, tok, sft_ckpt["config"], model, lm_head, optimizer,
                           cfg.max_iters, best_val, data_state)
    return finish(cfg, m, data, best_of, val_loss, n_trainable, t_start, ckpt)


# -------------------------------------------------------------------------------
# Appendix: a first read can stop here (copies, bookkeeping, plumbing)
# -------------------------------------------------------------------------------
# ---- Appendix: from sft.py — the model (llama.py's) and LoRA, unchanged -------
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


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update (Hu et al. 2021, arXiv:2106.09685).

    h = W x + (alpha / r) B A x  (Eq. 3), with A (r, in) random and B (out, r) zero at the
    start, so the adapted model first computes exactly what the base model did. Only r*(in+out)
    numbers per matrix are trained instead of in*out.
    """

    def __init__(self, base, rank, alpha):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # the init of the reference loralib
        self.scaling = alpha / rank

    def forward(self, x):
        # (B, T, in) @ (in, r) @ (r, out): never materialise the (out, in) update
        return self.base(x) + (x @ self.lora_A.T @ self.lora_B.T) * self.scaling

    def merged(self):
        """An nn.Linear with W + (alpha/r) B A: same outputs, no extra cost at inference."""
        lin = nn.Linear(self.base.in_features, self.base.out_features, bias=False)
        lin.weight.data.copy_(self.base.weight + self.scaling * self.lora_B @ self.lora_A)
        return lin.to(self.base.weight.device)


def apply_lora(model, rank, alpha):
    """Freeze every weight, then wrap the attention and MLP projections of each block with
    LoRA adapters (trainable). Embeddings and norms stay frozen; main() unfreezes the head."""
    model.requires_grad_(False)
    for block in model.transformer.h:
        for parent in (block.attn, block.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, LoRALinear(child, rank, alpha))
    return model


def merge_lora(model):
    """Replace every LoRALinear by its merged nn.Linear, in place: the state_dict then has the
    base model's keys, so the next stage (or llama.py-format tools) can load it as is."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, name, child.merged())
    return model


def merged_state_dict(model):
    """The weights to save: LoRA adapters folded into their matrices (base-model keys)."""
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        model = merge_lora(copy.deepcopy(model))
    return model.state_dict()


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


# ---- Appendix: from sft.py — the schedule, sampling and evaluation, unchanged ----
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


# ---- Appendix: extra — regularized best-of-n's log-probs, --score-only --------
@torch.no_grad()
def response_logps(model, tok, prompts, responses, device, batch_size=256,
                   ctx=contextlib.nullcontext()):
    """log pi(response | prompt) of a generating model, summed over the response's tokens
    (its <|endoftext|> included) -> a float32 CPU tensor (N,). Right padding and the prompt
    are masked by position, from the lengths, as in score()."""
    seqs = [encode_scored(tok, p, r) for p, r in zip(prompts, responses)]
    starts = torch.tensor([len(encode_prompt(tok, p)) for p in prompts])  # first answer token
    out = []
    for i in range(0, len(seqs), batch_size):
        idx, lengths = collate_scored(seqs[i:i + batch_size], tok.special[PAD])
        with ctx:
            logits = model(idx.to(device))[0]  # (B, T, V)
        logp = logits[:, :-1].float().log_softmax(-1).gather(
            -1, idx[:, 1:, None].to(device)).squeeze(-1).cpu()  # (B, T-1): token t+1 given <= t
        pos = torch.arange(1, idx.size(1))  # the position each entry of logp predicts
        keep = (pos >= starts[i:i + batch_size, None]) & (pos < lengths[:, None])
        out.append((logp * keep).sum(dim=1))
    return torch.cat(out) if out else torch.zeros(0)


def score_only(cfg, device, ctx):
    """--score-only: the reward of --prompt/--response under the RM in --out-dir."""
    path = Path(cfg.out_dir) / "ckpt.pt"
    if not path.is_file():
        die(f"{path} not found: train a reward model first (python reward.py)")
    ckpt = load_checkpoint(path, ("reward.py",), ("model_args", "tokenizer"))
    tok = tokenizer_from(ckpt, path)
    model = build_reward_model(ckpt["model_args"])
    load_weights(model, ckpt["model"], path)
    model.to(device).eval()
    n = len(encode_scored(tok, cfg.prompt, cfg.response))
    if n > model.config.block_size:
        die(f"--prompt + --response are {n} tokens; the model's context is "
            f"{model.config.block_size}")
    r = score(model, tok, [cfg.prompt], [cfg.response], device, ctx=ctx).item()
    stats = ckpt.get("reward_stats", {"mean": 0.0, "std": 1.0})
    z = (r - stats["mean"]) / max(stats["std"], 1e-8)
    print(f"reward {r:+.4f} (normalised {z:+.2f}, mean {stats['mean']:+.3f} "
          f"std {stats['std']:.3f} on the SFT policy's held-out answers)")
    return {"reward": r, "normalised": z}


# ---- Appendix: bookkeeping — load, build, restore, checkpoint, report, done record ----
def tokenizer_from(ckpt, path):
    """The byte tokenizer a checkpoint was trained with (the task world needs its specials)."""
    state = ckpt.get("tokenizer", {})
    if state.get("kind") != "byte" or not {EOT, PAD} <= set(state.get("special", {})):
        die(f"{path} uses a {state.get('kind')!r} tokenizer; reward.py needs sft.py's byte "
            f"tokenizer with {EOT} and {PAD}")
    return ByteTokenizer(state["special"])


def load_weights(model, state, path):
    """load_state_dict with a one-line error when the checkpoint does not fit the model."""
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:
        detail = str(e).splitlines()[1].strip() if "\n" in str(e) else str(e)
        die(f"{path} does not fit this model ({detail})")


def load_sft(path, device):
    """The sft.py checkpoint -> (policy model, tokenizer, its checkpoint dict); a missing
    file names the command that writes it."""
    if not Path(path).is_file():
        die(f"{path} not found: run python sft.py first (or point --init-from at an sft.py "
            f"checkpoint)")
    ckpt = load_checkpoint(path, ("sft.py",), ("model_args", "config", "tokenizer"))
    if ckpt["config"].get("task", "generate") != "generate":
        die(f"{path} is a --task classify checkpoint; reward.py needs a generating SFT model")
    tok = tokenizer_from(ckpt, path)
    policy = Llama(ModelConfig(**dict(ckpt["model_args"], dropout=0.0)))
    load_weights(policy, ckpt["model"], path)
    return policy.to(device).eval(), tok, ckpt


def build_rm(cfg, sft_ckpt, resumed, device):
    """The RM of --extra-layers and --lora-rank (with --resume, its saved weights), and for
    --lm-weight the SFT LM head -> (model, model_args, lm_head or None, trainable params)."""
    # NEW vs sft.py: --extra-layers blocks on top of the SFT trunk (see rm_from_sft)
    model_args = dict(sft_ckpt["model_args"], dropout=0.0,
                      n_layer=sft_ckpt["model_args"]["n_layer"] + cfg.extra_layers)
    model = rm_from_sft(model_args, sft_ckpt["model"])
    n_total = sum(p.numel() for p in model.parameters())
    if cfg.lora_rank:
        apply_lora(model, cfg.lora_rank, cfg.lora_alpha)
        model.lm_head.requires_grad_(True)  # the new scalar head always trains
    if resumed is not None:
        load_weights(model, resumed.get("lora", resumed["model"]), Path(cfg.out_dir) / "ckpt.pt")
    model.to(device).eval()  # eval mode for good: dropout is 0 anyway, the RM is deterministic
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"reward model from {cfg.init_from} (sft.py, iter {sft_ckpt.get('iter')}): "
          f"{n_total / 1e6:.3f}M parameters, {n_trainable / 1e6:.3f}M trainable")
    lm_head = None
    if cfg.lm_weight:  # the SFT model's LM head, trained along (see capture_hidden)
        lm_head = nn.Linear(model_args["n_embd"], model_args["vocab_size"], bias=False)
        lm_head.weight.data.copy_(sft_ckpt["model"]["lm_head.weight"])
        if resumed is not None:
            lm_head.load_state_dict(resumed["lm_head"])
        lm_head.to(device)
    return model, model_args, lm_head, n_trainable


def training_state(cfg, model, lm_head, device_type, resumed, log_path):
    """AdamW (weight decay on matrices only, as in sft.py) and the batch generator, fresh or as
    --resume saved them -> (optimizer, trained params, generator, first step, best val loss)."""
    params = [p for p in model.parameters() if p.requires_grad]
    params += [] if lm_head is None else list(lm_head.parameters())
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
         {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
        lr=cfg.learning_rate, betas=(0.9, 0.95), fused=device_type == "cuda")
    data_gen = torch.Generator().manual_seed(cfg.seed)
    if resumed is None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_text("")
        return optimizer, params, data_gen, 0, float("inf")
    optimizer.load_state_dict(resumed["optimizer"])
    torch.set_rng_state(resumed["rng"]["torch"])
    data_gen.set_state(resumed["rng"]["data"])
    keep = [line for line in log_path.read_text().splitlines()
            if "iter" in json.loads(line) and json.loads(line)["iter"] < resumed["iter"]]
    log_path.write_text("".join(line + "\n" for line in keep))  # drop records past the ckpt
    return optimizer, params, data_gen, resumed["iter"], resumed["best_val_loss"]


def make_checkpoint(cfg, model_args, tok, sft_cfg, model, lm_head, optimizer, step, best_val,
                    data_state):
    """The checkpoint at `step` (docs/design.md section 4); model is the uncompiled RM."""
    ckpt = {"script": "reward.py", "version": 1, "config": dataclasses.asdict(cfg),
            "model_args": model_args, "model": merged_state_dict(model),
            "optimizer": optimizer.state_dict(), "iter": step, "best_val_loss": best_val,
            "tokenizer": {"kind": "byte", "special": dict(tok.special)},
            "sft_from": cfg.init_from, "task_world": {k: sft_cfg[k] for k in
                                                      ("seed", "difficulty", "n_test")},
            "rng": {"torch": torch.get_rng_state(), "data": data_state}}
    if cfg.lora_rank:
        ckpt["lora"] = model.state_dict()  # frozen base + adapters, to resume
    if lm_head is not None:
        ckpt["lm_head"] = lm_head.state_dict()  # the auxiliary head, to resume
    return ckpt


def print_report(m, greedy):
    """The evaluation table: per family, pair accuracy and AUC, then best-of-n."""
    fams = list(m["pairs"]["by_task"])
    fmt = lambda v: f"{'-':>9}" if v is None else f"{v:>9.3f}"  # noqa: E731
    rows = [("pair accuracy", m["pairs"]["by_task"], fmt(m["pairs"]["all"])),
            ("AUC (policy)", m["auc_by_task"], fmt(m["auc"])),
            ("length corr", m["length_corr_by_task"], f"{m['length_corr']:>9.3f} (max |r|)"),
            ("  of the checker", m["length_corr_checker_by_task"], ""),
            ("greedy SFT", greedy["accuracy_by_task"], fmt(greedy["accuracy"]))]
    labels = {"best_of_n": "best-of-{}", "best_of_n_reg": "best-of-{} reg", "maj_at_n": "maj@{}",
              "pass_at_n": "pass@{}"}
    rows += [(label.format(n), row["by_task"], fmt(row["mean"]))
             for k, label in labels.items() for n, row in m["best"].get(k, {}).items()]
    print(f"{'':<18}" + "".join(f"{t:>9}" for t in fams) + f"{'all':>9}")
    for label, by_task, tail in rows:
        print(f"{label:<18}" + "".join(fmt(by_task.get(t)) for t in fams) + tail)
    src = ", ".join(f"{s} {a:.3f} (n={m['pairs']['counts'][s]})"
                    for s, a in m["pairs"]["by_source"].items())
    print(f"pair accuracy by source: {src}; padding invariance {m['pad_invariance']:.1e}; "
          f"rewards on policy samples {m['reward_mean']:+.3f} +- {m['reward_std']:.3f}")


def finish(cfg, m, data, best_of, val_loss, n_trainable, t_start, ckpt):
    """The done record (log.jsonl's last line, main's return value), the final checkpoint."""
    out_dir, top, greedy = Path(cfg.out_dir), m["best"]["best_of_n"][max(best_of)], data.greedy
    wall = time.time() - t_start
    # the kept model is the last one: the only held-out score is the test set, which must not
    # choose it (docs/design.md section 4)
    print(f"kept the last model (iter {cfg.max_iters}): no validation split to choose another")
    done = {"event": "done", "iter": cfg.max_iters, "best_iter": cfg.max_iters,
            "val_loss": val_loss,
            # the chain table's columns: the policy "SFT + best-of-N with this RM"
            "accuracy": top["mean"], "accuracy_by_task": top["by_task"],
            "format_rate": m["best"]["format"][max(best_of)]["mean"],
            "greedy_accuracy": greedy["accuracy"],
            "greedy_accuracy_by_task": greedy["accuracy_by_task"],
            "pair_accuracy": m["pairs"]["all"], "pair_accuracy_by_task": m["pairs"]["by_task"],
            "pair_accuracy_by_source": m["pairs"]["by_source"],
            **{k: m[k] for k in ("auc", "auc_by_task", "length_corr", "length_corr_by_task",
                                 "length_corr_checker_by_task", "pad_invariance", "reward_mean",
                                 "reward_std", "sample_acceptable_rate")},
            **{k: {n: v["mean"] for n, v in m["best"][k].items()}
               for k in ("best_of_n", "best_of_n_reg", "maj_at_n", "pass_at_n")
               if k in m["best"]},
            "bon_beta": cfg.bon_beta, "n_train_pairs": dict(data.counts),
            "trainable_params": n_trainable, "wall_s": wall}
    # the checkpoint ppo.py reads: the RM plus the statistics it normalises rewards with
    ckpt["reward_stats"] = {"mean": m["reward_mean"], "std": m["reward_std"]}
    save_checkpoint(ckpt, out_dir / "ckpt.pt")
    if cfg.plot:
        plot_rewards(m, data.test_ex, out_dir)
    append_jsonl(out_dir / "log.jsonl", json.loads(json.dumps(done)))  # keys n become strings
    auc_text = "-" if m["auc"] is None else f"{m['auc']:.3f}"  # None: no right (or wrong) sample
    print(f"done in {format_eta(wall)}: held-out pair accuracy {m['pairs']['all']:.3f}, "
          f"AUC {auc_text}, best-of-{max(best_of)} {top['mean']:.3f} "
          f"(greedy SFT {greedy['accuracy']:.3f})")
    return done


def plot_rewards(m, examples, out_dir):
    """reward_hist.png: rewards of the policy's right vs wrong answers, per family;
    best_of_n.png: best-of-n, maj@n and pass@n against n (needs matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot: matplotlib is not installed (pip install matplotlib); no figure written")
        return
    k = len(m["rewards"]) // len(examples)
    fams = list(m["auc_by_task"])
    fig, axes = plt.subplots(1, len(fams), figsize=(3 * len(fams), 2.6), sharey=True)
    for ax, t in zip(axes, fams):
        ix = torch.tensor([i for i, ex in enumerate(examples) for _ in range(k) if ex["task"] == t])
        r, y = m["rewards"][ix], m["labels"][ix]
        ax.hist([r[y].numpy(), r[~y].numpy()], bins=30, label=["right", "wrong"], stacked=True)
        ax.set(title=f"{t} (AUC {m['auc_by_task'][t] or 0:.2f})", xlabel="reward")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(Path(out_dir) / "reward_hist.png")
    plt.close(fig)
    plt.figure(figsize=(4.5, 3))
    for key in ("best_of_n", "maj_at_n", "pass_at_n"):
        ns = list(m["best"][key])
        plt.plot(ns, [m["best"][key][n]["mean"] for n in ns], marker="o", label=key)
    plt.xscale("log", base=2)
    plt.xlabel("n samples per problem")
    plt.ylabel("true accuracy (mean over families)")
    plt.legend()
    plt.tight_layout()
    plt.savefig(Path(out_dir) / "best_of_n.png")
    plt.close()


# ---- Appendix: flag rules — RULES, CHOICES, check_config ----------------------
# what each numeric flag may be, checked before anything is written (docs/design.md section 6);
# choices and cross-field rules are in check_config (under Plumbing)
RULES = {
    "seed": (lambda v: 0 <= v < 2**63, "an integer in 0..2**63-1"),
    "n_train": (lambda v: v >= 6, "an integer >= 6 (one problem per family at least)"),
    "extra_layers": (lambda v: 0 <= v <= 16, "an integer in 0..16"),
    "lora_rank": (lambda v: v >= 0, "0 (full fine-tuning) or a positive rank"),
    "learning_rate": (lambda v: 0 < v < 1, "a number in (0, 1)"),
    "min_lr": (lambda v: v >= 0, "a number >= 0 (and <= --learning-rate)"),
    "grad_clip": (lambda v: v >= 0, "a number >= 0 (0 = off)"),
    "bon_beta": (lambda v: v >= 0, "a number >= 0 (0 = off)"),
    **dict.fromkeys(("n_policy", "max_iters", "warmup_iters"),
                    (lambda v: v >= 0, "an integer >= 0")),
    **dict.fromkeys(("policy_samples", "policy_pairs_per_prompt", "synthetic_per_prompt",
                     "eval_interval", "eval_iters", "batch_size", "eval_max_new_tokens",
                     "eval_batch_size"), (lambda v: v >= 1, "an integer >= 1")),
    **dict.fromkeys(("policy_temperature", "hinge_margin", "lora_alpha"),
                    (lambda v: v > 0, "a number > 0")),
    **dict.fromkeys(("margin_weight", "center", "lm_weight", "weight_decay"),
                    (lambda v: v >= 0, "a number >= 0")),
}
CHOICES = {"pairs": ("synthetic", "policy", "both"), "loss": ("bt", "hinge")}


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


if __name__ == "__main__":
    main()
