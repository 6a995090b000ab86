"""Direct Preference Optimization (DPO): preference pairs straight into a policy update.

RLHF fits a reward model to preference pairs, then maximises that reward with RL under a KL
penalty to the SFT model. DPO (Rafailov et al. 2023, arXiv:2305.18290) skips both: the optimum
of that KL-regularised objective is pi*(y|x) = pi_ref(y|x) exp(r(x,y)/beta) / Z(x), so a reward
can be written with the policy itself, r = beta log pi(y|x)/pi_ref(y|x) + beta log Z(x), and in
the Bradley-Terry likelihood of a pair the intractable Z(x) cancels. What is left is a
classification loss on pairs (Eq. 7): -log sigmoid(beta [log pi(y_w)/pi_ref(y_w) - log
pi(y_l)/pi_ref(y_l)]), with a frozen copy of the SFT model as pi_ref. Also here: conservative
DPO (label smoothing), IPO (Azar et al. 2023, arXiv:2310.12036) and the SLiC hinge (Zhao et
al. 2023, arXiv:2305.10425); online/iterative DPO (`--rounds`: pairs resampled from the current
policy). On the task world the preference is "correct beats incorrect", so what TRL users
cannot see is measured here: does the policy get *more correct*, family by family, on the
same held-out problems and greedy decoding as sft.py?

Run:
    python sft.py                          # first: writes out/sft/ckpt.pt
    python dpo.py                          # 4 online rounds, beta 0.5, + chosen NLL (RPO)
    python dpo.py --rounds 1               # offline: pairs sampled once, before training
    python dpo.py --loss-type ipo          # or hinge; --beta 0.05/0.1/0.5; --label-smoothing 0.1
    python dpo.py --mix sort=3,compare=3   # more training problems of some families
    python dpo.py --sample-only --prompt "What is 12 + 7?"
    python dpo.py --device cuda            # GPU preset: more pairs and steps

Result: greedy accuracy 0.887 (SFT) -> 0.900 on sft.py's 600 held-out problems, 4m06s; docs/dpo.md.

Simplifications: pairs come from a checker, not from people; reference log-probs are computed
once per set of pairs (a frozen reference); one lr schedule and optimizer state over all rounds.
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
    compile: bool = False  # torch.compile the policy (on by default in the GPU preset)
    seed: int = 1337  # training pairs, sampling, batches (held-out pairs: the SFT run's seed)
    out_dir: str = "out/dpo"  # ckpt.pt, log.jsonl, samples.txt and the figure go here
    init_from: str = "out/sft/ckpt.pt"  # the sft.py checkpoint: the policy's start and pi_ref
    loss_type: str = "sigmoid"  # sigmoid (DPO) | ipo (squared, per-token log-probs) | hinge (SLiC)
    beta: float = 0.5  # strength of the implicit KL to the reference (larger = stay closer)
    label_smoothing: float = 0.0  # sigmoid only: assumed rate of flipped labels (cDPO), < 0.5
    rpo_alpha: float = 1.0  # + alpha * NLL of the chosen responses (RPO, TRL's name); 0 = off
    pairs: str = "both"  # synthetic (hand-made mistakes) | policy (the policy's own) | both
    n_train: int = 6000  # training problems for synthetic pairs (train split of the task world)
    n_policy: int = 6000  # of those, the first n_policy also get on-policy pairs (sampling costs)
    mix: str = ""  # training problems per family as sft.py's --mix (sort=2: twice the share)
    policy_samples: int = 4  # answers sampled per training problem for on-policy pairs
    policy_temperature: float = 1.0  # temperature of those samples
    policy_pairs_per_prompt: int = 2  # at most this many on-policy pairs per problem
    synthetic_per_prompt: int = 1  # hand-made mistakes per training problem
    rounds: int = 4  # online DPO: the on-policy pairs are resampled at the start of each round
    ref_update: bool = False  # at each new round the reference becomes the current policy
    lora_rank: int = 0  # LoRA rank on attention and MLP projections; 0 = full fine-tuning
    lora_alpha: float = 16.0  # LoRA scaling is alpha / r
    max_iters: int = 1200  # optimizer steps in all, split evenly between the rounds
    eval_interval: int = 50  # steps between held-out pair evaluations and checkpoints
    eval_iters: int = 8  # batches of held-out pairs per evaluation (all of them at the end)
    batch_size: int = 32  # pairs per step (64 sequences in one forward pass)
    learning_rate: float = 5e-5  # peak learning rate (AdamW)
    min_lr: float = 5e-6  # floor of the cosine decay
    warmup_iters: int = 20  # linear warmup steps
    weight_decay: float = 0.0  # AdamW decoupled weight decay on matrices (0: stay near SFT)
    grad_clip: float = 1.0  # clip the global gradient norm (0 = off)
    eval_max_new_tokens: int = 16  # decoding budget per answer (as sft.py's evaluation)
    eval_batch_size: int = 256  # sequences decoded or scored together
    resume: bool = False  # continue the run saved in --out-dir
    overwrite: bool = False  # allow replacing an existing checkpoint in --out-dir
    sample_only: bool = False  # load the policy in --out-dir and only answer --prompt
    prompt: str = "What is 12 + 7?"  # instruction for --sample-only (wrapped in the template)
    num_samples: int = 1  # answers per prompt with --sample-only
    max_new_tokens: int = 32  # tokens per answer with --sample-only
    temperature: float = 0.0  # --sample-only: 0 = greedy; > 0 samples
    plot: bool = False  # write dpo.png: rewards, preference accuracy, accuracy (needs matplotlib)


# the held-out pairs' recipe, whatever the training pairs' flags: both sources, one hand-made
# mistake per problem, up to 2 of the SFT model's own mistakes among 4 answers at temperature 1
HELDOUT_PAIRS = dict(pairs="both", synthetic_per_prompt=1, policy_samples=4,
                     policy_temperature=1.0, policy_pairs_per_prompt=2)
# on CUDA, for every field not given: more problems, samples and steps (the model is the SFT one)
GPU_PRESET = dict(n_train=20000, n_policy=20000, policy_samples=8, max_iters=3000, batch_size=64,
                  eval_interval=250, eval_iters=10, compile=True)


# -------------------------------------------------------------------------------
# NEW vs sft.py: Direct Preference Optimization (the loss, the reference, the pairs)
# -------------------------------------------------------------------------------
def sequence_logps(logits, targets):
    """log pi(response | prompt) of each row: logits (B, T, V), targets (B, T) -> the sum of the
    target tokens' log-probs (B,) and how many tokens were summed (B,), both float32.

    targets are already shifted (targets[t] is the token after input t, as sft.py's
    encode_example writes them); positions whose target is IGNORE_INDEX (the prompt, the
    padding) add nothing. The response's <|endoftext|> is a target like any other token: the
    chosen answer's stop is part of what is preferred. Masked positions may hold anything,
    even inf or NaN logits: their target is swapped for 0 before the gather and their value
    replaced by 0 with torch.where (never multiplied by a 0 mask: NaN * 0 = NaN), so nothing
    leaks into the sum. The normaliser is the caller's: DPO sums (a sequence's log-prob), IPO
    averages per token (divide by the counts).
    """
    mask = targets != IGNORE_INDEX  # (B, T): the response tokens
    safe = torch.where(mask, targets, 0)  # any valid id for the gather; the value is dropped
    logp = logits.float().log_softmax(dim=-1)  # (B, T, V) in float32, also under autocast
    picked = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)  # (B, T, 1) -> (B, T)
    picked = torch.where(mask, picked, torch.zeros_like(picked))
    return picked.sum(dim=-1), mask.sum(dim=-1).float()


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
             beta=0.1, loss_type="sigmoid", label_smoothing=0.0):
    """The DPO family of pair losses, with TRL's shapes and meanings: four (B,) tensors of
    log-probs -> (losses (B,), chosen rewards (B,), rejected rewards (B,)).

    The implicit reward of a response is beta * log pi(y|x)/pi_ref(y|x) (Rafailov et al.,
    Eq. 5 without its beta log Z(x), which cancels in a pair); logits = (pc - rc) - (pr - rr)
    is the difference of the two log-ratios, the quantity every variant pushes up:
    sigmoid: -log sigmoid(beta * logits), Eq. 7 of arXiv:2305.18290, the Bradley-Terry NLL
        of the implicit rewards. With label_smoothing = eps each label is taken to be flipped
        with probability eps (conservative DPO: Mitchell 2023, "A note on DPO with noisy
        preferences", Eq. 3): -(1 - eps) log sigmoid(beta*logits) - eps log sigmoid(-beta*
        logits), whose minimum is at a finite margin, log((1-eps)/eps)/beta, not at infinity.
    ipo: (logits - 1/(2 beta))^2, Azar et al. 2023 (arXiv:2310.12036, Eq. 17 with tau = beta):
        a regression of the log-ratio gap to a fixed target. With deterministic preferences
        (ours: the checker is never wrong) DPO's loss keeps falling as the gap grows, so
        nothing stops the policy running away from the reference; IPO's target does. The
        caller passes per-token mean log-probs, as TRL does for ipo.
    hinge: max(0, 1 - beta * logits), the rank calibration loss of SLiC-HF (Zhao et al.
        2023, arXiv:2305.10425) with margin 1/beta, on the log-ratios to the reference (as
        TRL): no gradient once a pair is separated by the margin.
    The rewards are detached (metrics only): rewards/accuracies counts chosen > rejected.
    """
    logits = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    if loss_type == "sigmoid":
        # logsigmoid is stable where log(sigmoid(x)) underflows to -inf
        losses = (-(1 - label_smoothing) * F.logsigmoid(beta * logits)
                  - label_smoothing * F.logsigmoid(-beta * logits))
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = F.relu(1 - beta * logits)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected sigmoid, ipo or hinge")
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


def frozen_copy(model):
    """The reference pi_ref: a separate deep copy of `model` (LoRA adapters merged), in eval
    mode, every parameter with requires_grad False. Never the policy object itself: with
    ref = policy the log-ratios are 0 for ever and DPO learns nothing (TRL raises when
    ref_model is model). Dropout is 0 in both (model_args), so at the first step the policy
    and the reference give the same log-probs and the sigmoid loss is ln 2 (exactly, on the
    same padded batch; see reference_logps)."""
    return merge_lora(copy.deepcopy(model)).eval().requires_grad_(False)  # no LoRA: no change


@torch.no_grad()
def reference_logps(reference, encoded, batch_size, pad_id, device, ctx, counts=False):
    """Sequence log-probs of every pair under the frozen reference -> float32 CPU tensor (N, 2),
    column 0 the chosen response, column 1 the rejected one (with counts, also their response
    tokens; evaluate_pairs scores the policy with this loop). Computed once per set of pairs
    (they never change while the reference is frozen), so a training step costs one forward
    pass of the policy instead of two models'. The training batches pad differently, so at step
    0 the policy's log-probs match these to ~1e-7, not bit for bit: the first loss is ln 2 to
    ~1e-8, and a training batch's rewards/accuracies counts float noise until the policy moves."""
    out, tokens = [torch.zeros(0, 2)], [torch.zeros(0, 2)]
    for i in range(0, len(encoded), batch_size):
        chunk = encoded[i:i + batch_size]
        idx, targets, _ = collate_pairs(chunk, pad_id)
        with ctx:
            logits = reference(idx.to(device))[0]  # (2b, T, V)
        logps, n = sequence_logps(logits, targets.to(device))  # (2b,) each
        out.append(logps.cpu().view(2, len(chunk)).T)  # (2, b) -> (b, 2)
        tokens.append(n.cpu().view(2, len(chunk)).T)
    return (torch.cat(out), torch.cat(tokens)) if counts else torch.cat(out)


def dpo_objective(logps, ref_logps, n_tokens, loss_type, beta, label_smoothing, rpo_alpha):
    """The DPO step's loss from a collate_pairs batch's log-probs: the policy's and the
    reference's sums and the token counts, each (2B,) (B chosen rows, then B rejected rows)
    -> (mean loss, stats: (B,) tensors for the metrics).

    ipo compares per-token means (sum / count), the others whole-sequence sums: the two are
    different objectives with a different effective beta (docs/alignment-pitfalls.md section 3).
    rpo_alpha > 0 adds the token-mean NLL of the chosen responses (TRL's rpo_alpha; Pang et
    al. 2024, arXiv:2404.19733): DPO only widens the gap, and both log-probs may fall while it
    does (eric-mitchell/direct-preference-optimization#32); the NLL keeps the chosen likely.
    """
    # the chosen responses' NLL per token (B chosen rows: the first half)
    nll = -logps.chunk(2)[0].sum() / n_tokens.chunk(2)[0].sum()
    if loss_type == "ipo":
        logps, ref_logps = logps / n_tokens, ref_logps / n_tokens  # counts >= 1 (encode_pairs)
    pc, pr = logps.chunk(2)  # (B,) chosen, (B,) rejected
    rc, rr = ref_logps.chunk(2)
    losses, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, rc, rr, beta, loss_type,
                                                        label_smoothing)
    loss = losses.mean() + rpo_alpha * nll if rpo_alpha else losses.mean()
    return loss, {"losses": losses.detach(), "chosen_rewards": chosen_rewards,
                  "rejected_rewards": rejected_rewards, "chosen_logps": pc.detach(),
                  "rejected_logps": pr.detach()}


def preference_metrics(stats):
    """TRL's names for the means over a batch (or the held-out pairs) of dpo_objective's stats.
    rewards/accuracies is strict: a tie (policy = reference) is not a win."""
    cr, rr = stats["chosen_rewards"], stats["rejected_rewards"]
    return {"rewards/chosen": cr.mean().item(), "rewards/rejected": rr.mean().item(),
            "rewards/accuracies": (cr > rr).float().mean().item(),
            "rewards/margins": (cr - rr).mean().item(),
            "logps/chosen": stats["chosen_logps"].mean().item(),
            "logps/rejected": stats["rejected_logps"].mean().item()}


def encode_response(tok, prompt, response):
    """Model input and per-position targets for the template + prompt + response.

    As sft.py's encode_example: targets[t] is the token after input t, and the prompt's are
    IGNORE_INDEX, so only the response is scored. The response is encoded as the policy
    wrote it: an <|endoftext|> in it becomes its token, and a response that never stopped
    (a "no_eot" mistake) gets none appended: its missing stop is the mistake.
    """
    prompt_ids = encode_prompt(tok, prompt)
    ids = prompt_ids + tok.encode(response, [EOT])
    n = len(prompt_ids) - 1  # targets[n] is the first response token: keep it and after
    return ids[:-1], [IGNORE_INDEX] * n + ids[n + 1:]


def encode_pairs(tok, pairs, block_size):
    """Pairs -> (kept pairs, [(chosen (ids, targets), rejected (ids, targets))]), tokenized once.

    A pair is dropped when a side has no response token (a sample of only unknown ids decodes
    to nothing: 0/0 for ipo's mean, no gradient at all) or does not fit the context."""
    kept, encoded = [], []
    for p in pairs:
        sides = (encode_response(tok, p["prompt"], p["chosen"]),
                 encode_response(tok, p["prompt"], p["rejected"]))
        if all(len(ids) <= block_size and any(t != IGNORE_INDEX for t in tgt)
               for ids, tgt in sides):
            kept.append(p)
            encoded.append(sides)
    return kept, encoded


def collate_pairs(batch, pad_id):
    """B encoded pairs -> idx, targets (2B, T): the B chosen rows, then the B rejected rows, so
    one forward pass scores both sides; and lengths (2B,), the real tokens per row.

    Right padding: pad ids in idx, IGNORE_INDEX in targets. Causal attention keeps the pads,
    which come after every real token, from changing a real position's output; and the mask
    comes from the lengths, never from a token id (with pad == eos a mask by id would drop
    the <|endoftext|> that ends every chosen response)."""
    rows = [c for c, _ in batch] + [r for _, r in batch]
    T = max(len(ids) for ids, _ in rows)
    idx = torch.full((len(rows), T), pad_id, dtype=torch.long)
    tgt = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    for i, (ids, targets) in enumerate(rows):
        idx[i, :len(ids)] = torch.tensor(ids)
        tgt[i, :len(targets)] = torch.tensor(targets)
    return idx, tgt, torch.tensor([len(ids) for ids, _ in rows])


def get_batch(encoded, ref_logps, batch_size, generator, pad_id, device):
    """batch_size pairs drawn at random (with replacement) -> idx, targets (2B, T) and the
    reference log-probs (2B,) on `device`, plus the real tokens in the batch."""
    ix = torch.randint(len(encoded), (batch_size,), generator=generator)
    idx, tgt, lengths = collate_pairs([encoded[i] for i in ix.tolist()], pad_id)
    ref = torch.cat((ref_logps[ix, 0], ref_logps[ix, 1]))  # (2B,) chosen, then rejected
    return idx.to(device), tgt.to(device), ref.to(device), int(lengths.sum())


def pair_set(cfg, model, tok, examples, n_policy, device, ctx, seed, block_size):
    """build_pairs, then encode_pairs -> (pairs, encoded pairs); one line when none is left."""
    pairs, _ = build_pairs(cfg, model, tok, examples, n_policy, cfg.policy_samples, device, ctx,
                           seed)
    pairs, encoded = encode_pairs(tok, pairs, block_size)
    if not pairs:
        die("the policy made no mistake to learn from: use --pairs both or synthetic")
    return pairs, encoded


def heldout_pairs(cfg, model, tok, examples, sft_seed, device, ctx, block_size):
    """The held-out pairs of sft.py's test problems, the same for every run from one checkpoint
    (HELDOUT_PAIRS, the SFT run's seed; only device and dtype change the samples), shuffled once:
    the --eval-iters batches scored in training are a sample of every family and source."""
    pairs, encoded = pair_set(dataclasses.replace(cfg, **HELDOUT_PAIRS), model, tok, examples,
                              len(examples), device, ctx, sft_seed + 1, block_size)
    order = list(range(len(pairs)))
    random.Random(sft_seed).shuffle(order)
    return [pairs[i] for i in order], [encoded[i] for i in order]


def training_pairs(cfg, run, policy, reference, rnd, pairs=None):
    """Round rnd's training pairs -> (pairs, encoded pairs, reference log-probs (N, 2)): sampled
    from `policy` (pair_set, seed --seed + 100 rnd), or on --resume the checkpoint's `pairs`,
    then scored once by the frozen reference. Round 0 and every online round take this path."""
    if pairs is None:
        pairs, encoded = pair_set(cfg, policy, run.tok, run.train_ex, run.n_policy, run.device,
                                  run.ctx, cfg.seed + 100 * rnd, run.block_size)
    else:
        pairs, encoded = encode_pairs(run.tok, pairs, run.block_size)
    policy.train()  # dropout is 0: train mode changes nothing but is honest
    return pairs, encoded, reference_logps(reference, encoded, cfg.eval_batch_size, run.pad_id,
                                           run.device, run.ctx)


# -------------------------------------------------------------------------------
# The run: build, train, evaluate
# -------------------------------------------------------------------------------
def build(cfg, device, dtype, ctx, resumed):
    """The SFT policy, its frozen reference, and what every stage reads -> (run, policy,
    reference, round 0's training pairs): the task world, the held-out pairs, LoRA."""
    t_start = time.time()
    # ---- the policy and the task world of the SFT checkpoint ----
    policy, tok, sft_ckpt = load_policy(cfg.init_from, device)
    sft_cfg = sft_ckpt["config"]
    model_args = dict(sft_ckpt["model_args"], dropout=0.0)  # dropout off in policy and reference
    block_size = model_args["block_size"]
    # the held-out set is exactly sft.py's (same seed, difficulty and count), so every stage
    # of the chain scores the same problems with the same greedy decoding
    try:
        train_ex = make_tasks(cfg.n_train, "train", cfg.seed + 2, sft_cfg["difficulty"],
                              mix_families(cfg.mix))
        test_ex = make_tasks(sft_cfg["n_test"], "test", sft_cfg["seed"] + 1, sft_cfg["difficulty"])
    except (ValueError, KeyError) as e:
        die(f"cannot build the task world of {cfg.init_from} ({e}); lower --n-train")
    random.Random(cfg.seed).shuffle(train_ex)  # make_tasks lists family by family: mix them,
    # so that the first n_policy problems (the on-policy ones) cover every family
    longest = max(len(encode_prompt(tok, ex["prompt"])) for ex in train_ex + test_ex)
    if longest + cfg.eval_max_new_tokens > block_size:
        die(f"prompts of {longest} tokens + --eval-max-new-tokens {cfg.eval_max_new_tokens} "
            f"exceed the context of {cfg.init_from} ({block_size} tokens)")
    out_dir = Path(cfg.out_dir)
    run = types.SimpleNamespace(  # what every stage reads
        tok=tok, device=device, dtype=dtype, ctx=ctx, t_start=t_start, sft_cfg=sft_cfg,
        device_type="cuda" if device.startswith("cuda") else "cpu", model_args=model_args,
        out_dir=out_dir, ckpt_path=out_dir / "ckpt.pt", log_path=out_dir / "log.jsonl",
        block_size=block_size, train_ex=train_ex, test_ex=test_ex, pad_id=tok.special[PAD],
        n_policy=0 if cfg.pairs == "synthetic" else cfg.n_policy,
        loss_kw={k: getattr(cfg, k) for k in ("loss_type", "beta", "label_smoothing", "rpo_alpha")})
    # ---- before: the SFT model's own accuracy, and pairs sampled from it ----
    t0 = time.time()
    if resumed is None:
        m = evaluate_tasks(policy, tok, test_ex, cfg.eval_max_new_tokens, cfg.eval_batch_size,
                           device, ctx)
        run.before = {k: m[k] for k in ("accuracy", "accuracy_by_task", "format_rate")}
        run.before["completions"] = {ex["prompt"]: c for ex, c in m["samples"]}
    else:
        run.before = resumed["before"]
    run.test_pairs, run.test_enc = heldout_pairs(cfg, policy, tok, test_ex, sft_cfg["seed"],
                                                 device, ctx, block_size)
    # ---- the reference: a frozen copy of the SFT model, made before any update ----
    reference = frozen_copy(policy)
    # held-out rewards are always against the SFT model (the first round's reference): one eval
    # curve across rounds, with or without --ref-update; scored in evaluate_pairs' chunks (same
    # padded batches, same floats), every held-out pair ties at step 0 (margin 0, loss ln 2)
    run.test_ref = reference_logps(reference, run.test_enc, cfg.batch_size, run.pad_id, device,
                                   ctx)
    n_total = sum(p.numel() for p in policy.parameters())
    if cfg.lora_rank:
        apply_lora(policy, cfg.lora_rank, cfg.lora_alpha)  # B = 0: still equal to the reference
    if resumed is not None:
        load_weights(policy, resumed.get("lora", resumed["model"]), run.ckpt_path)
        if "reference" in resumed:  # --ref-update moved it to the policy of a round boundary
            load_weights(reference, resumed["reference"], run.ckpt_path)
    policy.to(device)  # LoRA's adapters too
    pairs = training_pairs(cfg, run, policy, reference, 0, resumed and resumed["pairs"])
    run.n_trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    print(f"policy and reference from {cfg.init_from} (sft.py, iter {sft_ckpt.get('iter')}): "
          f"{n_total / 1e6:.3f}M parameters, {run.n_trainable / 1e6:.3f}M trainable")
    print(f"pairs: {len(pairs[0])} train ({dict(Counter(p['source'] for p in pairs[0]))}), "
          f"{len(run.test_pairs)} held out; sampling took {time.time() - t0:.1f}s; SFT greedy "
          f"accuracy {run.before['accuracy']:.3f}")
    return run, policy, reference, pairs


def train(cfg, run, policy, reference, round0, resumed):
    """The DPO loop, nanoGPT-shaped: (a new round's pairs) -> eval -> checkpoint -> step -> log.
    round0: training_pairs' (pairs, encoded, reference log-probs). Returns make_ckpt's args."""
    pairs, enc, ref = round0
    # ---- optimizer: weight decay on matrices only, as in sft.py ----
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
         {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
        lr=cfg.learning_rate, betas=(0.9, 0.95), fused=run.device_type == "cuda")
    scaler = torch.amp.GradScaler(run.device_type, enabled=run.dtype == "float16")
    start, best_val, cur_round, data_gen = restore(cfg, run, optimizer, resumed)  # or fresh
    model = torch.compile(policy) if cfg.compile else policy  # policy is saved, evaluated
    # round r trains on steps bounds[r]..bounds[r+1]-1, on pairs sampled at bounds[r]
    bounds = [r * cfg.max_iters // cfg.rounds for r in range(cfg.rounds + 1)]
    # the data generator's state *before* the pending batch is what a checkpoint stores, so a
    # resumed run draws that same batch again (bit-exact resume on CPU)
    data_state = data_gen.get_state()
    X, Y, R, n_tok = get_batch(enc, ref, cfg.batch_size, data_gen, run.pad_id, run.device)
    t_last = time.time()
    for step in range(start, cfg.max_iters + 1):
        last_step = step == cfg.max_iters
        new_round = max(r for r in range(cfg.rounds) if bounds[r] <= step)
        if not last_step and new_round > cur_round:
            # ---- a new round (online DPO): new pairs from the current policy ----
            cur_round = new_round
            m = evaluate_tasks(policy, run.tok, run.test_ex, cfg.eval_max_new_tokens,
                               cfg.eval_batch_size, run.device, run.ctx)
            if cfg.ref_update:  # iterative DPO with a moving anchor: pi_ref <- pi
                reference = frozen_copy(policy)
            pairs, enc, ref = training_pairs(cfg, run, policy, reference, cur_round)
            data_gen.set_state(data_state)  # the pending batch came from the old pairs: redraw
            X, Y, R, n_tok = get_batch(enc, ref, cfg.batch_size, data_gen, run.pad_id, run.device)
            log_round(cfg, run, step, cur_round, m, pairs)
            t_last = time.time()
        if step % cfg.eval_interval == 0 or last_step:
            ev = evaluate_pairs(policy, run.test_enc, run.test_ref, cfg.eval_iters * cfg.batch_size,
                                cfg.batch_size, run.pad_id, run.device, run.ctx, run.loss_kw)
            print(f"step {step}: val loss {ev['val_loss']:.4f}, held-out preference accuracy "
                  f"{ev['pref_accuracy']:.3f}, margin {ev['rewards/margins']:+.3f}")
            append_jsonl(run.log_path, {"iter": step, **ev, "elapsed_s": time.time() - run.t_start})
            best_val = min(best_val, ev["val_loss"])
            if step > start or last_step:
                save_checkpoint(make_ckpt(cfg, run, step, policy, reference, optimizer,
                                          best_val, cur_round, data_state, pairs), run.ckpt_path)
            t_last = time.time()  # evaluation time is not training time
        if last_step:
            break
        lr = get_lr(step, cfg.learning_rate, cfg.min_lr, cfg.warmup_iters, cfg.max_iters)
        for group in optimizer.param_groups:
            group["lr"] = lr
        try:
            with run.ctx:
                logits = model(X)[0]  # (2B, T, V): chosen rows, then rejected rows
            logps, n_resp = sequence_logps(logits, Y)  # (2B,) each
            loss, stats = dpo_objective(logps, R, n_resp, **run.loss_kw)
            batch_tokens = n_tok
            data_state = data_gen.get_state()  # before the pending batch: resume redraws it
            X, Y, R, n_tok = get_batch(enc, ref, cfg.batch_size, data_gen, run.pad_id, run.device)
            scaler.scale(loss).backward()
        except torch.OutOfMemoryError:
            die(f"CUDA out of memory at batch size {cfg.batch_size}; "
                f"try --batch-size {cfg.batch_size // 2}")
        loss_value = finite_loss(loss, step, run.ckpt_path)
        if cfg.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if run.device_type == "cuda":
            torch.cuda.synchronize()
        now = time.time()
        dt, t_last = now - t_last, now
        log_step(cfg, run, step, start, loss_value, lr, now, dt, batch_tokens, stats)
    return dict(model=policy, reference=reference, optimizer=optimizer, best_val=best_val,
                cur_round=cur_round, data_state=data_state, pairs=pairs)


@torch.no_grad()
def evaluate_pairs(model, encoded, ref_logps, n, batch_size, pad_id, device, ctx, loss_kw,
                   pairs=None, solved=None):
    """DPO loss, held-out preference accuracy and TRL's metrics over the first n held-out
    pairs (a fixed list: no RNG used, so resume stays exact) -> a dict of floats; ref_logps in
    the same chunks (build). With `pairs` (the list `encoded` came from), also the accuracy per
    family and per source; with `solved` (prompt -> is the policy's greedy answer right), per
    outcome, with the counts."""
    logps, counts = reference_logps(model, encoded[:n], batch_size, pad_id, device, ctx, True)
    # (n, 2) -> (2n,): the n chosen responses, then the n rejected ones
    loss, stats = dpo_objective(logps.T.reshape(-1), ref_logps[:len(logps)].T.reshape(-1),
                                counts.T.reshape(-1), **loss_kw)
    m = preference_metrics(stats)
    out = {"val_loss": loss.item(), "pref_accuracy": m["rewards/accuracies"], **m}
    if pairs is not None:
        wins = (stats["chosen_rewards"] > stats["rejected_rewards"]).tolist()
        keys = {"task": lambda p: p["task"], "source": lambda p: p["source"]}
        if solved is not None:
            keys["outcome"] = lambda p: "right" if solved[p["prompt"]] else "wrong"
        for name, key in keys.items():
            groups = defaultdict(list)
            for pair, win in zip(pairs, wins):
                groups[key(pair)].append(win)
            out[f"pref_accuracy_by_{name}"] = {g: sum(w) / len(w) for g, w in groups.items()}
            if name == "outcome":
                out["n_pairs_by_outcome"] = {g: len(w) for g, w in groups.items()}
    return out


def main(argv=None):
    # ---- parse: the flags, every check before anything is written ----
    cfg, given = parse_config(Config, argv, __doc__.splitlines()[0])
    device = resolve_device(cfg.device)
    if device.startswith("cuda"):
        cfg = apply_preset(cfg, GPU_PRESET, given)
    dtype = resolve_dtype(cfg.dtype, device)
    check_config(cfg, RULES, CHOICES)
    check_flags(cfg)
    print(" ".join(f"{k}={v}" for k, v in dataclasses.asdict(cfg).items()))
    print(f"device={device} dtype={dtype} compile={'on' if cfg.compile else 'off'}")
    torch.manual_seed(cfg.seed)
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    ctx = (torch.amp.autocast(device_type, dtype=getattr(torch, dtype)) if dtype != "float32"
           else contextlib.nullcontext())
    if cfg.sample_only:
        return sample_only(cfg, device, ctx)
    check_out_dir(cfg.out_dir, cfg.resume, cfg.overwrite)
    resumed, path = None, Path(cfg.out_dir) / "ckpt.pt"
    if cfg.resume:  # the run saved in --out-dir, with every key read back
        resumed = load_checkpoint(path, ("dpo.py",), ("model", "optimizer", "iter", "rng",
                                  "best_val_loss", "sft_from", "pairs", "round", "before"))
        cfg = dataclasses.replace(cfg, init_from=resumed["sft_from"])
    # ---- build, train, and after: every held-out pair, true accuracy on sft.py's problems ----
    run, policy, reference, pairs = build(cfg, device, dtype, ctx, resumed)
    state = train(cfg, run, policy, reference, pairs, resumed)
    merge_lora(policy)  # adapters folded in: the model that was saved is the one evaluated
    after = evaluate_tasks(policy, run.tok, run.test_ex, cfg.eval_max_new_tokens,
                           cfg.eval_batch_size, device, ctx)
    solved = {ex["prompt"]: check_answer(c, ex["answer"]) for ex, c in after["samples"]}
    final = evaluate_pairs(policy, run.test_enc, run.test_ref, len(run.test_enc), cfg.batch_size,
                           run.pad_id, device, ctx, run.loss_kw, run.test_pairs, solved)
    return report(cfg, run, state, after, final)


# -------------------------------------------------------------------------------
# Appendix: a first read can stop here (copies, bookkeeping, plumbing)
# -------------------------------------------------------------------------------
# ---- Appendix: from reward.py — the preference pairs, unchanged ---------------
# A preference pair: the same prompt, a chosen response and a rejected one, both as the
# policy would write them (text + <|endoftext|>). Two sources:
#   synthetic: chosen = the gold answer, rejected = a plausible mistake of the family;
#   policy:    answers sampled from the policy, judged by the checker (its real mistakes).
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


# ---- Appendix: from sft.py — llama.py's model and LoRA, sampling and evaluation, unchanged ----
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


# ---- Appendix: bookkeeping — loading, restore, checkpoint, log records, report, --sample-only ----
def tokenizer_from(ckpt, path):
    """The byte tokenizer a checkpoint was trained with (the task world needs its specials)."""
    state = ckpt.get("tokenizer", {})
    if state.get("kind") != "byte" or not {EOT, PAD} <= set(state.get("special", {})):
        die(f"{path} uses a {state.get('kind')!r} tokenizer; dpo.py needs sft.py's byte "
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
    missing file names the command that writes it. (reward.py's load_sft, with this file's
    name in the messages.)"""
    if not Path(path).is_file():
        die(f"{path} not found: run python sft.py first (or point --init-from at an sft.py "
            f"checkpoint)")
    ckpt = load_checkpoint(path, ("sft.py",), ("model_args", "config", "tokenizer"))
    if ckpt["config"].get("task", "generate") != "generate":
        die(f"{path} is a --task classify checkpoint; dpo.py needs a generating SFT model")
    tok = tokenizer_from(ckpt, path)
    policy = Llama(ModelConfig(**dict(ckpt["model_args"], dropout=0.0)))
    load_weights(policy, ckpt["model"], path)
    return policy.to(device).eval(), tok, ckpt


def restore(cfg, run, optimizer, resumed):
    """--resume: the optimizer, RNGs and log.jsonl back as the checkpoint left them (or a fresh
    log) -> the loop's first step, best val loss, round and batch generator."""
    data_gen = torch.Generator().manual_seed(cfg.seed)
    if resumed is None:
        run.out_dir.mkdir(parents=True, exist_ok=True)
        run.log_path.write_text("")
        return 0, float("inf"), 0, data_gen
    optimizer.load_state_dict(resumed["optimizer"])
    torch.set_rng_state(resumed["rng"]["torch"])
    if resumed["rng"].get("cuda"):
        torch.cuda.set_rng_state_all(resumed["rng"]["cuda"])
    data_gen.set_state(resumed["rng"]["data"])
    # drop the records past the checkpoint; a round that began at its iteration stays (it
    # is not redone)
    keep = [line for line in run.log_path.read_text().splitlines()
            if (r := json.loads(line)).get("iter", 0) < resumed["iter"]
            or (r.get("event") == "round" and r["iter"] == resumed["iter"])]
    run.log_path.write_text("".join(line + "\n" for line in keep))
    return resumed["iter"], resumed["best_val_loss"], resumed["round"], data_gen


def make_ckpt(cfg, run, step, model, reference, optimizer, best_val, cur_round, data_state, pairs):
    """The checkpoint: the policy in sft.py's format (LoRA merged) and what --resume needs."""
    ckpt = {"script": "dpo.py", "version": 1, "config": dataclasses.asdict(cfg),
            "model_args": run.model_args, "model": merged_state_dict(model),
            "optimizer": optimizer.state_dict(), "iter": step, "best_val_loss": best_val,
            "tokenizer": {"kind": "byte", "special": dict(run.tok.special)},
            "sft_from": cfg.init_from, "task_world": {k: run.sft_cfg[k] for k in
                                                      ("seed", "difficulty", "n_test")},
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if run.device_type == "cuda" else [],
                    "data": data_state},
            "round": cur_round, "pairs": pairs, "before": run.before}
    if cfg.lora_rank:
        ckpt["lora"] = model.state_dict()  # frozen base + adapters, to resume
    if cfg.ref_update and cur_round > 0:
        ckpt["reference"] = reference.state_dict()
    return ckpt


def log_round(cfg, run, step, cur_round, m, pairs):
    """A new round's line and log record: the accuracy the last round reached, the new pairs."""
    counts = Counter(p["source"] for p in pairs)
    print(f"round {cur_round + 1}/{cfg.rounds} at step {step}: accuracy {m['accuracy']:.3f} "
          f"after round {cur_round}; {len(pairs)} new pairs ({dict(counts)})")
    scores = {k: m[k] for k in ("accuracy", "accuracy_by_task", "format_rate")}
    append_jsonl(run.log_path, {"event": "round", "iter": step, "round": cur_round, **scores,
                                "n_pairs": dict(counts), "elapsed_s": time.time() - run.t_start})


def finite_loss(loss, step, ckpt_path):
    """The step's loss as a float, or one line and exit 2 when it is not finite."""
    if not math.isfinite(loss_value := loss.item()):
        kept = f"the last good checkpoint {ckpt_path} is kept" if ckpt_path.is_file() else \
            "no checkpoint was written"
        die(f"loss is {loss_value} at iter {step}; stopped, {kept} (try a lower --learning-rate)")
    return loss_value


def log_step(cfg, run, step, start, loss_value, lr, now, dt, n_tokens, stats):
    """A training step's log record and line: loss, lr, speed, TRL's metrics of the batch."""
    metrics = preference_metrics(stats)
    append_jsonl(run.log_path, {"iter": step, "loss": loss_value, "lr": lr,
                                "ms_per_iter": 1000 * dt, "tokens_per_s": n_tokens / dt,
                                "elapsed_s": now - run.t_start, **metrics})
    eta = (now - run.t_start) / (step + 1 - start) * (cfg.max_iters - step - 1)
    print(f"iter {step}/{cfg.max_iters} | loss {loss_value:.4f} | "
          f"acc {metrics['rewards/accuracies']:.2f} | margin {metrics['rewards/margins']:+.3f} | "
          f"lr {lr:.1e} | {1000 * dt:.1f} ms | {n_tokens / dt / 1000:.1f}k tok/s | "
          f"eta {format_eta(eta)}")


def report(cfg, run, state, after, final):
    """The before/after table, the changed answers (samples.txt), the last checkpoint (LoRA
    merged) and the done record, which main returns."""
    before = run.before
    print_before_after(before, after)
    print("held-out preference accuracy on the pairs of problems the policy answers "
          + ", ".join(f"{g} {a:.3f} ({final['n_pairs_by_outcome'][g]} pairs)"
                      for g, a in sorted(final["pref_accuracy_by_outcome"].items())))
    lines = changed_answers(before, after)
    print(f"{len(lines)} held-out answers changed; the first few:")
    print("\n".join(lines[:6]))
    (run.out_dir / "samples.txt").write_text("".join(line + "\n" for line in lines))
    wall = time.time() - run.t_start
    scores = ("accuracy", "accuracy_by_task", "format_rate")
    # the kept model is the last one: the only held-out score is the test set, which must not
    # choose it (docs/design.md section 4)
    print(f"kept the last model (iter {cfg.max_iters}): no validation split to choose another")
    done = {"event": "done", "iter": cfg.max_iters, "best_iter": cfg.max_iters,
            "val_loss": final["val_loss"],
            **{k: after[k] for k in scores + ("format_by_task",)},
            **{k: v for k, v in final.items() if k.startswith(("pref_accuracy", "n_pairs"))},
            **{k: v for k, v in final.items() if "/" in k},  # TRL's names, as in evaluate_pairs
            **{f"{k}_before": before[k] for k in scores}, "rounds": cfg.rounds,
            "n_train_pairs": dict(Counter(p["source"] for p in state["pairs"])),
            "n_test_pairs": len(run.test_pairs), "trainable_params": run.n_trainable,
            "wall_s": wall}
    save_checkpoint(make_ckpt(cfg, run, cfg.max_iters, **state), run.ckpt_path)
    append_jsonl(run.log_path, done)
    if cfg.plot:
        plot_dpo(run.log_path, before, after, run.out_dir / "dpo.png")
    print(f"done in {format_eta(wall)}: accuracy {after['accuracy']:.3f} (SFT "
          f"{before['accuracy']:.3f}), held-out preference accuracy {final['pref_accuracy']:.3f}")
    return done


def print_before_after(before, after):
    """The chain table's row pair: accuracy per family, mean and format, SFT then DPO."""
    fams = [t for t in TASK_FAMILIES if t in after["accuracy_by_task"]]  # the chain table's order
    print(f"{'':<6}" + "".join(f"{t:>9}" for t in fams) + f"{'mean':>9}{'format':>9}")
    for name, m in (("SFT", before), ("DPO", after)):
        print(f"{name:<6}" + "".join(f"{m['accuracy_by_task'][t]:>9.3f}" for t in fams)
              + f"{m['accuracy']:>9.3f}{m['format_rate']:>9.3f}")


def changed_answers(before, after):
    """Held-out problems whose greedy answer changed: '[ok |BAD] prompt: SFT -> DPO' lines,
    the ones DPO fixed first, then the ones it broke, then the rest."""
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


def sample_only(cfg, device, ctx):
    """--sample-only: answer --prompt with the DPO policy in --out-dir."""
    path = Path(cfg.out_dir) / "ckpt.pt"
    ckpt = load_checkpoint(path, ("dpo.py",), ("model_args", "tokenizer"))
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
# choices are in CHOICES, cross-field rules in check_flags
RULES = {
    "seed": (lambda v: 0 <= v < 2**63, "an integer in 0..2**63-1"),
    **dict.fromkeys(("beta", "policy_temperature", "lora_alpha"),
                    (lambda v: v > 0, "a number > 0")),
    "label_smoothing": (lambda v: 0 <= v < 0.5, "a number in [0, 0.5)"),
    **dict.fromkeys(("rpo_alpha", "weight_decay"), (lambda v: v >= 0, "a number >= 0")),
    "n_train": (lambda v: v >= 6, "an integer >= 6 (one problem per family at least)"),
    **dict.fromkeys(("n_policy", "max_iters", "warmup_iters"),
                    (lambda v: v >= 0, "an integer >= 0")),
    **dict.fromkeys(("policy_samples", "policy_pairs_per_prompt", "synthetic_per_prompt",
                     "rounds", "eval_interval", "eval_iters", "batch_size", "eval_max_new_tokens",
                     "eval_batch_size", "num_samples", "max_new_tokens"),
                    (lambda v: v >= 1, "an integer >= 1")),
    "lora_rank": (lambda v: v >= 0, "0 (full fine-tuning) or a positive rank"),
    "learning_rate": (lambda v: 0 < v < 1, "a number in (0, 1)"),
    "min_lr": (lambda v: v >= 0, "a number >= 0 (and <= --learning-rate)"),
    "grad_clip": (lambda v: v >= 0, "a number >= 0 (0 = off)"),
    "temperature": (lambda v: v >= 0, "a number >= 0 (0 = greedy)"),
}
CHOICES = {"pairs": ("synthetic", "policy", "both"), "loss_type": ("sigmoid", "ipo", "hinge")}


def check_flags(cfg):
    """The cross-field rules check_config cannot state: one line naming the flags, exit 2."""
    if cfg.label_smoothing and cfg.loss_type != "sigmoid":
        die(f"--label-smoothing {cfg.label_smoothing}: applies to --loss-type sigmoid only")
    if cfg.rounds > max(1, cfg.max_iters):
        die(f"--rounds {cfg.rounds}: expected at most --max-iters {cfg.max_iters} (a step a round)")
    if cfg.rounds > 1 and (cfg.pairs == "synthetic" or cfg.n_policy == 0):
        die(f"--rounds {cfg.rounds}: online rounds resample on-policy pairs; use --pairs both or "
            f"policy with --n-policy > 0 (or --rounds 1)")


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


def plot_dpo(log_path, before, after, path):
    """dpo.png: the held-out implicit rewards (chosen, rejected, margin) and the preference
    accuracy against the step (at the end, also on the pairs of problems the policy answers
    right and wrong), and true accuracy per family before and after (needs matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot: matplotlib is not installed (pip install matplotlib); no figure written")
        return
    records = [json.loads(line) for line in Path(log_path).read_text().splitlines()]
    evals = [r for r in records if "pref_accuracy" in r and "iter" in r and "event" not in r]
    steps = [r["iter"] for r in evals]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        axes[0].plot(steps, [r[key] for r in evals], marker="o", label=key)
    axes[0].set_xlabel("step")
    axes[0].set_title("held-out implicit rewards (vs SFT)")
    axes[0].legend()
    axes[1].plot(steps, [r["pref_accuracy"] for r in evals], marker="o", label="all pairs")
    done = next((r for r in reversed(records) if r.get("event") == "done"), {})
    for (outcome, acc), style in zip(sorted(done.get("pref_accuracy_by_outcome", {}).items()),
                                     ("--", ":")):
        n = done["n_pairs_by_outcome"][outcome]
        axes[1].axhline(acc, color="gray", linestyle=style,
                        label=f"end, problems answered {outcome} ({n} pairs)")
    axes[1].legend(loc="lower right")
    axes[1].set_ylim(0, 1)
    axes[1].set_xlabel("step")
    axes[1].set_title("held-out preference accuracy")
    fams = [t for t in TASK_FAMILIES if t in after["accuracy_by_task"]]
    x = torch.arange(len(fams)).float()
    axes[2].bar((x - 0.2).tolist(), [before["accuracy_by_task"][t] for t in fams], 0.4, label="SFT")
    axes[2].bar((x + 0.2).tolist(), [after["accuracy_by_task"][t] for t in fams], 0.4, label="DPO")
    axes[2].set_xticks(x.tolist(), fams)
    axes[2].set_ylim(0, 1)
    axes[2].set_title("held-out accuracy (greedy)")
    axes[2].legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
