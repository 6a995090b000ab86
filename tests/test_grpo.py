"""Tests for grpo.py: advantages and the loss by hand, masking, the sampler, rewards, main, DDP.

Run: python -m pytest -q tests/test_grpo.py --durations=5
"""
import contextlib
import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import grpo
from conftest import assert_png

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(vocab_size=320, block_size=96, n_layer=2, n_head=2, n_embd=32, n_kv_head=1)
IGN = grpo.IGNORE_INDEX
LN2 = math.log(2)
NO_CTX = contextlib.nullcontext()
TIMING = {"ms_per_iter", "tokens_per_s", "elapsed_s", "rollout_tokens_per_s", "wall_s"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run faster on one thread (no OpenMP hand-offs), above all on a busy CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    return grpo.Llama(grpo.ModelConfig(**TINY))


def eot_id():
    return grpo.task_tokenizer(True).special[grpo.EOT]


def write_sft_checkpoint(path, n_test=12, eval_max_new_tokens=6, think=False):
    """A tiny sft.py-format checkpoint: random weights, except that every token embedding
    shares one large direction (dim 0) and the head reads it to push every token down but
    the digits and <|endoftext|>. Sampled answers are then short numbers, some right, most
    well formed, so the rewards of a group differ (a plain random model scores 0 everywhere
    and GRPO would have no signal to test)."""
    tok = grpo.task_tokenizer(True)
    model = tiny_llama()
    with torch.no_grad():
        model.transformer.wte.weight[:, 0] = 10.0  # the stream ~ +sqrt(C) e0 after the norm
        model.lm_head.weight[:, 0] = -3.0  # logit ~ -17 for every token ...
        model.lm_head.weight[list(range(ord("0"), ord("9") + 1)), 0] = 0.0  # ... but digits (0)
        model.lm_head.weight[tok.special[grpo.EOT], 0] = 0.3  # and EOT (~ +1.7)
    grpo.save_checkpoint({"script": "sft.py", "version": 1, "iter": 0,
                          "model_args": dataclasses.asdict(grpo.ModelConfig(**TINY)),
                          "model": model.state_dict(),
                          "config": {"seed": 1, "difficulty": 1, "n_test": n_test,
                                     "task": "generate", "think": think,
                                     "eval_max_new_tokens": eval_max_new_tokens},
                          "tokenizer": {"kind": "byte", "special": dict(tok.special)},
                          "optimizer": {}, "rng": {}, "best_val_loss": 0.0}, path)
    return path


# ---- group advantages, by hand ----
# two groups of G = 4: a = [1, 0, 0, 0], b = [0, 0, 0, 2]
#   a: mean 1/4, r - mean = [3/4, -1/4, -1/4, -1/4], sum of squares 9/16 + 3/16 = 3/4,
#      unbiased variance 3/4 / 3 = 1/4, std 1/2 (the population std would be sqrt(3/16))
#   b: mean 1/2, r - mean = [-1/2, -1/2, -1/2, 3/2], sum of squares 3/4 + 9/4 = 3, variance 1
#   batch: mean 3/8, r - 3/8 = [5/8, -3/8 (x6), 13/8], sum of squares (25 + 54 + 169)/64 = 31/8,
#      unbiased variance 31/8 / 7 = 31/56
REWARDS = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0])
CENTRED = [0.75, -0.25, -0.25, -0.25, -0.5, -0.5, -0.5, 1.5]


def test_group_advantages_by_hand_for_each_scale():
    got = grpo.group_advantages(REWARDS, 4, "group")
    want = [c / 0.5001 for c in CENTRED[:4]] + [c / 1.0001 for c in CENTRED[4:]]  # +1e-4 outside
    assert got.tolist() == pytest.approx(want, rel=1e-6)
    assert got[0].item() == pytest.approx(1.49970006, rel=1e-7)  # not 0.75/sqrt(3/16) = 1.732
    got = grpo.group_advantages(REWARDS, 4, "batch")
    assert got.tolist() == pytest.approx([c / (math.sqrt(31 / 56) + 1e-4) for c in CENTRED],
                                         rel=1e-6)
    assert grpo.group_advantages(REWARDS, 4, "none").tolist() == CENTRED  # Dr. GRPO: exact
    assert grpo.group_advantages(REWARDS, 4).tolist() == pytest.approx(want, rel=1e-6)  # default


def test_equal_rewards_get_exactly_zero_and_groups_must_divide():
    rewards = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0,  0.3, 0.3, 0.3, 0.3])
    for scale in ("group", "batch", "none"):
        adv = grpo.group_advantages(rewards, 4, scale)
        assert torch.equal(adv[:4], torch.zeros(4)) and torch.equal(adv[8:], torch.zeros(4))
        assert (adv[4:8] != 0).all()
    # every group all-equal: no signal anywhere, and no 0/0
    assert torch.equal(grpo.group_advantages(torch.ones(6), 3, "group"), torch.zeros(6))
    with pytest.raises(ValueError, match="groups of 4"):
        grpo.group_advantages(torch.ones(7), 4)
    with pytest.raises(ValueError, match="unknown scale"):
        grpo.group_advantages(torch.ones(8), 4, "population")


# ---- the loss, by hand ----
# B = 2 answers, T = 3, ragged: answer 0 has 2 tokens (its third position is padding),
# answer 1 has 3. A = [+1, -1]. Ratios pi/pi_old: answer 0 [1.5, 0.5], answer 1 [0.5, 1.5, 1.0].
# eps_low = eps_high = 0.2, per-token loss -min(r A, clip(r, 0.8, 1.2) A):
#   (0, 0) A>0 r=1.5: min(1.5, 1.2) = 1.2 -> -1.2  (clipped high)
#   (0, 1) A>0 r=0.5: min(0.5, 0.8) = 0.5 -> -0.5  (below 1 - eps with A > 0: not clipped)
#   (1, 0) A<0 r=0.5: min(-0.5, -0.8) = -0.8 -> 0.8  (clipped low)
#   (1, 1) A<0 r=1.5: min(-1.5, -1.2) = -1.5 -> 1.5  (the pessimistic min: NOT clipped)
#   (1, 2) A<0 r=1.0: -> 1.0
# grpo: answer means -1.7/2 = -0.85 and 3.3/3 = 1.1, mean 0.125
# dapo: token sum 1.6 over 5 tokens = 0.32;  dr_grpo (max length 4): 1.6 / (2 * 4) = 0.2
MASK = torch.tensor([[True, True, False], [True, True, True]])
OLD = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -1.5, -3.0]])
RATIO = torch.tensor([[1.5, 0.5, 1.0], [0.5, 1.5, 1.0]])
ADV = torch.tensor([1.0, -1.0])


def clip_case(garbage=False):
    logps = (OLD + RATIO.log()).clone()
    old, ref = OLD.clone(), OLD.clone()
    if garbage:  # anything at the masked position: a leak would show as nan/inf
        logps[0, 2], old[0, 2], ref[0, 2] = float("nan"), float("inf"), -float("inf")
    return logps.requires_grad_(True), old, ref


@pytest.mark.parametrize("loss_type, want", [("grpo", 0.125), ("dapo", 0.32),
                                              ("dr_grpo", 0.2)])
def test_grpo_loss_by_hand_for_each_loss_type_with_clipping_both_ways(loss_type, want):
    logps, old, _ = clip_case()
    loss, stats = grpo.grpo_loss(logps, old, None, ADV, MASK, beta=0.0, loss_type=loss_type,
                                 max_completion_length=4)
    assert loss.item() == pytest.approx(want, abs=1e-6)
    # clipped tokens: (1, 0) on the low side (A < 0), (0, 0) on the high side (A > 0); 5 tokens
    assert stats["clip_ratio/low_mean"] == pytest.approx(0.2)
    assert stats["clip_ratio/high_mean"] == pytest.approx(0.2)
    assert stats["clip_ratio/region_mean"] == pytest.approx(0.4)
    assert "kl" not in stats  # no reference given
    loss.backward()
    g = logps.grad
    # clipped tokens and padding carry no gradient; d(-r A)/dlogp = -r A elsewhere, times the
    # aggregation weight: grpo 1/(2 n_i), dapo 1/5, dr_grpo 1/8
    w = {"grpo": [[1 / 4, 1 / 4], [1 / 6, 1 / 6, 1 / 6]], "dapo": [[0.2] * 2, [0.2] * 3],
         "dr_grpo": [[1 / 8] * 2, [1 / 8] * 3]}[loss_type]
    assert g[0, 0] == 0 and g[1, 0] == 0 and g[0, 2] == 0
    assert g[0, 1].item() == pytest.approx(-0.5 * w[0][1])  # -r A = -0.5
    assert g[1, 1].item() == pytest.approx(1.5 * w[1][1])  # -r A = +1.5: the ratio is pushed down
    assert g[1, 2].item() == pytest.approx(1.0 * w[1][2])


def test_clip_higher_and_dr_grpo_needs_a_length():
    logps, old, _ = clip_case()
    # eps_high 0.6: (0, 0) at 1.5 < 1.6 is no longer clipped: -1.5; answer 0 mean -1, answer 1
    # still 1.1 (eps_low 0.2) -> grpo (-1 + 1.1) / 2 = 0.05, no high clipping
    loss, stats = grpo.grpo_loss(logps, old, None, ADV, MASK, beta=0.0, eps_high=0.6)
    assert loss.item() == pytest.approx(0.05, abs=1e-6)
    assert stats["clip_ratio/high_mean"] == 0.0
    assert stats["clip_ratio/low_mean"] == pytest.approx(0.2)
    # eps_low 0.6: the floor is 0.4 and (1, 0) at 0.5 is above it: unclipped, -r A = 0.5;
    # answer 1 (0.5 + 1.5 + 1) / 3 = 1 -> grpo (-0.85 + 1) / 2 = 0.075
    loss, stats = grpo.grpo_loss(logps, old, None, ADV, MASK, beta=0.0, eps_low=0.6)
    assert loss.item() == pytest.approx(0.075, abs=1e-6)
    assert stats["clip_ratio/low_mean"] == 0.0
    with pytest.raises(ValueError, match="max_completion_length"):
        grpo.grpo_loss(logps, old, None, ADV, MASK, loss_type="dr_grpo")
    with pytest.raises(ValueError, match="unknown loss_type"):
        grpo.grpo_loss(logps, old, None, ADV, MASK, loss_type="bnpo")


# the k3 KL with A = 0 (ratio 1, so only beta * k3 is left), d = ref - logp:
#   answer 0: d = [ln 2, -ln 2]: k3 = e^d - d - 1 = [2 - ln2 - 1, 1/2 + ln2 - 1]
#             = [1 - ln2, ln2 - 1/2], sum 1/2, mean 1/4
#   answer 1: d = [0, 0, ln 2]: k3 = [0, 0, 1 - ln2], mean (1 - ln2)/3   (the flipped direction,
#             e^-d + d - 1, would give ln2 - 1/2 there)
#   per-token KL stat: (1/2 + 1 - ln2) / 5;  grpo loss beta (1/4 + (1 - ln2)/3) / 2
KL_D = torch.tensor([[LN2, -LN2, 0.0], [0.0, 0.0, LN2]])


def test_k3_kl_by_hand_beta_weighting_and_zero_at_the_reference():
    logps = OLD.clone().requires_grad_(True)
    ref = OLD + KL_D
    zero_adv = torch.zeros(2)
    loss, stats = grpo.grpo_loss(logps, OLD, ref, zero_adv, MASK, beta=0.1)
    assert stats["kl"] == pytest.approx((1.5 - LN2) / 5, rel=1e-6)  # 0.16137
    assert loss.item() == pytest.approx(0.1 * (0.25 + (1 - LN2) / 3) / 2, rel=1e-6)  # 0.017614
    loss2, _ = grpo.grpo_loss(logps, OLD, ref, zero_adv, MASK, beta=0.2)
    assert loss2.item() == pytest.approx(2 * loss.item(), rel=1e-6)
    # beta = 0: the KL is still measured, but is not in the loss
    loss0, stats0 = grpo.grpo_loss(logps, OLD, ref, zero_adv, MASK, beta=0.0)
    assert loss0.item() == 0.0 and stats0["kl"] == stats["kl"]
    # with a real advantage the KL term adds beta * its aggregate on top of the surrogate
    lp = clip_case()[0]
    base, _ = grpo.grpo_loss(lp, OLD, None, ADV, MASK, beta=0.0)
    with_kl, _ = grpo.grpo_loss(lp, OLD, lp.detach() + KL_D, ADV, MASK, beta=0.1)
    assert with_kl.item() == pytest.approx(base.item() + loss.item(), abs=1e-6)
    # k3's gradient: d/dlogp [e^d - d - 1] = 1 - e^d (times beta/(2 n_i)): 1 - 2 = -1 at d = ln2
    loss.backward()
    assert logps.grad[0, 0].item() == pytest.approx(0.1 * -1.0 / 4, rel=1e-6)
    assert logps.grad[0, 1].item() == pytest.approx(0.1 * 0.5 / 4, rel=1e-6)  # 1 - 1/2
    assert logps.grad[1, 0].item() == 0.0  # d = 0: k3 is flat at its minimum
    # policy == reference: exactly 0, for any loss type
    for loss_type in ("grpo", "dapo", "dr_grpo"):
        l, s = grpo.grpo_loss(logps, OLD, OLD.clone(), zero_adv, MASK, beta=0.5,
                              loss_type=loss_type, max_completion_length=3)
        assert l.item() == 0.0 and s["kl"] == 0.0


def test_k3_is_nonnegative_token_by_token():
    torch.manual_seed(0)
    logps, ref = 3 * torch.randn(4, 5), 3 * torch.randn(4, 5)
    for b in range(4):
        for t in range(5):
            one = torch.zeros(4, 5, dtype=torch.bool)
            one[b, t] = True
            loss, stats = grpo.grpo_loss(logps, logps, ref, torch.zeros(4), one, beta=1.0,
                                         loss_type="dapo")
            d = (ref[b, t] - logps[b, t]).item()
            assert stats["kl"] >= 0 and loss.item() >= 0
            assert stats["kl"] == pytest.approx(math.exp(d) - d - 1, rel=1e-5)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_garbage_at_masked_positions_changes_nothing(loss_type):
    kw = dict(beta=0.1, loss_type=loss_type, max_completion_length=3)
    clean_lp, old, ref = clip_case()
    ref = ref + KL_D
    loss, stats = grpo.grpo_loss(clean_lp, old, ref, ADV, MASK, **kw)
    loss.backward()
    dirty_lp, dirty_old, dirty_ref = clip_case(garbage=True)
    dirty_ref = dirty_ref + KL_D
    dirty_loss, dirty_stats = grpo.grpo_loss(dirty_lp, dirty_old, dirty_ref, ADV, MASK, **kw)
    dirty_loss.backward()
    assert math.isfinite(dirty_loss.item()) and torch.isfinite(dirty_lp.grad).all()
    assert dirty_loss.item() == loss.item() and dirty_stats == stats
    assert torch.equal(dirty_lp.grad, clean_lp.grad)
    # a huge but finite value too
    huge_lp, huge_old, huge_ref = clip_case()
    with torch.no_grad():
        huge_lp[0, 2], huge_old[0, 2], huge_ref[0, 2] = 1e30, -1e30, 1e30
    assert grpo.grpo_loss(huge_lp, huge_old, huge_ref + KL_D, ADV, MASK, **kw)[0].item() == \
        loss.item()


# ---- token log-probs ----
def test_token_logps_divide_by_the_temperature_and_mask():
    torch.manual_seed(0)
    logits = 3 * torch.randn(2, 5, 11)
    targets = torch.randint(0, 11, (2, 5))
    targets[0, :2] = IGN  # a prompt
    targets[1, 4:] = IGN  # padding
    for T in (1.0, 0.7, 2.0):
        logps, entropy = grpo.token_logps(logits, targets, T)
        manual = F.log_softmax(logits / T, dim=-1)
        for b in range(2):
            for t in range(5):
                if targets[b, t] == IGN:
                    assert logps[b, t] == 0 and entropy[b, t] == 0
                else:
                    assert logps[b, t].item() == pytest.approx(manual[b, t, targets[b, t]].item(),
                                                               abs=1e-6)
                    ent = -(manual[b, t].exp() * manual[b, t]).sum().item()
                    assert entropy[b, t].item() == pytest.approx(ent, abs=1e-5)
    # at T != 1 the log-probs are those of another distribution
    assert not torch.allclose(grpo.token_logps(logits, targets, 0.7)[0],
                              grpo.token_logps(logits, targets, 1.0)[0])


# ---- rollouts through a tiny model: masking, the first step, padding ----
def rollout_batch(tok, n_prompts=2, group_size=4, seed=0):
    """Encoded answers of random lengths (1..5 tokens, then EOT) to n_prompts prompts."""
    gen = torch.Generator().manual_seed(seed)
    exs = grpo.make_tasks(n_prompts, "train", seed, 2)
    encoded = []
    for ex in exs:
        for _ in range(group_size):
            n = int(torch.randint(1, 6, (1,), generator=gen))
            answer = torch.randint(0, 256, (n,), generator=gen).tolist() + [tok.special[grpo.EOT]]
            encoded.append(grpo.encode_rollout(grpo.encode_prompt(tok, ex["prompt"]), answer))
    return encoded


def test_encode_rollout_and_collate_score_exactly_the_answer_up_to_eot():
    eot, pad = eot_id(), grpo.task_tokenizer(True).special[grpo.PAD]
    # prompt [10, 11, 12], answer [55, 56, EOT]: inputs stop before EOT; targets start at the
    # first answer token (predicted at the prompt's last position)
    ids, tgt = grpo.encode_rollout([10, 11, 12], [55, 56, eot])
    assert ids == [10, 11, 12, 55, 56] and tgt == [IGN, IGN, 55, 56, eot]
    ids2, tgt2 = grpo.encode_rollout([10, 11], [eot])  # an empty answer: just the EOT
    assert ids2 == [10, 11] and tgt2 == [IGN, eot]
    # pad == eot would mask the EOT if masks came from ids; here both come from lengths
    ids3, tgt3 = grpo.encode_rollout([10, 11], [pad, eot])
    assert tgt3 == [IGN, pad, eot]
    idx, targets = grpo.collate([(ids, tgt), (ids2, tgt2)], pad)
    assert idx.tolist() == [[10, 11, 12, 55, 56], [10, 11, pad, pad, pad]]
    assert targets.tolist() == [[IGN, IGN, 55, 56, eot], [IGN, eot, IGN, IGN, IGN]]
    assert (targets != IGN).sum(1).tolist() == [3, 1]  # answer tokens, EOT included


def test_first_step_loss_is_zero_with_a_gradient_and_equal_rewards_give_none():
    tok, model = grpo.task_tokenizer(True), tiny_llama()
    encoded = rollout_batch(tok)
    idx, tgt = grpo.collate(encoded, tok.special[grpo.PAD])
    mask = tgt != IGN
    lengths = mask.sum(1).float()
    assert len(set(lengths.tolist())) > 1  # ragged answers
    for rewards, has_signal in (([1.0, 0, 0, 1, 0, 0, 1, 0], True),
                                ([1.0, 1, 1, 1, 0, 0, 0, 0], False)):
        adv = grpo.group_advantages(torch.tensor(rewards), 4)
        for loss_type in ("grpo", "dapo", "dr_grpo"):
            model.zero_grad(set_to_none=True)
            logps, _ = grpo.token_logps(model(idx)[0], tgt, 0.9)
            loss, stats = grpo.grpo_loss(logps, logps.detach(), None, adv, mask, beta=0.0,
                                         loss_type=loss_type, max_completion_length=6)
            loss.backward()
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            assert grads and stats["clip_ratio/region_mean"] == 0.0  # ratio 1 everywhere
            if loss_type == "grpo":  # -mean_i A_i = 0 for whole groups
                assert abs(loss.item()) < 1e-7
            elif loss_type == "dapo":  # -sum_i A_i |o_i| / sum_i |o_i|: not 0
                want = -(adv * lengths).sum().item() / lengths.sum().item()
                assert loss.item() == pytest.approx(want, abs=1e-6)
            else:  # -sum_i A_i |o_i| / (B * 6)
                assert loss.item() == pytest.approx(-(adv * lengths).sum().item() / 48, abs=1e-6)
            if has_signal:
                assert any(g.abs().sum() > 0 for g in grads), loss_type
            else:  # every group all-equal: A = 0, no gradient at all (beta 0)
                assert all(torch.equal(g, torch.zeros_like(g)) for g in grads), loss_type


def test_padding_changes_no_log_prob_and_no_loss():
    tok, model = grpo.task_tokenizer(True), tiny_llama().eval()
    encoded = rollout_batch(tok, n_prompts=2, group_size=3, seed=1)
    pad = tok.special[grpo.PAD]
    adv = grpo.group_advantages(torch.tensor([1.0, 0, 0, 0, 1, 1]), 3)
    with torch.no_grad():
        idx, tgt = grpo.collate(encoded, pad)
        assert (idx == pad).any()  # some rows are padded
        batched, _ = grpo.token_logps(model(idx)[0], tgt)
        # more padding (a wider batch) changes nothing either
        wide_idx = torch.cat((idx, torch.full((idx.size(0), 7), pad)), dim=1)
        wide_tgt = torch.cat((tgt, torch.full((tgt.size(0), 7), IGN)), dim=1)
        wide, _ = grpo.token_logps(model(wide_idx)[0], wide_tgt)
        assert torch.allclose(wide[:, :idx.size(1)], batched, atol=1e-5)
        assert (wide[:, idx.size(1):] == 0).all()
        losses = []
        for i, (ids, t) in enumerate(encoded):  # each answer alone, no padding
            alone, _ = grpo.token_logps(model(torch.tensor([ids]))[0], torch.tensor([t]))
            n = len(ids)
            assert torch.allclose(alone[0], batched[i, :n], atol=1e-5)
            assert (batched[i, n:] == 0).all()
            losses.append(grpo.grpo_loss(alone, alone - 0.1, None, adv[i:i + 1],
                                         torch.tensor([t]) != IGN, beta=0.0)[0].item())
        whole, _ = grpo.grpo_loss(batched, batched - 0.1, None, adv, tgt != IGN, beta=0.0)
        assert whole.item() == pytest.approx(sum(losses) / len(losses), abs=1e-6)


# ---- the sampler ----
class NextTokenTable(torch.nn.Module):
    """A stand-in policy whose next-token logits depend only on the last token: table[id]."""

    def __init__(self, table):
        super().__init__()
        self.table = table  # (V, V)
        self.config = grpo.ModelConfig(**TINY)

    def forward(self, idx, targets=None, cache=None):
        return self.table[idx], None  # (B, T, V)


def table_model(moves):
    """moves: {token: [next tokens, equally likely]}; every other token -> itself."""
    V = TINY["vocab_size"]
    table = torch.full((V, V), -1e4)
    table[torch.arange(V), torch.arange(V)] = 0.0
    for tok, nxt in moves.items():
        table[tok] = -1e4
        table[tok, nxt] = 0.0
    return NextTokenTable(table)


def test_sample_groups_cut_after_the_first_eot():
    tok, eot = grpo.task_tokenizer(True), eot_id()
    response = tok.special["\n\n### Response:\n"]  # the prompt's last token
    seven, nine, a = ord("7"), ord("9"), ord("a")
    # after the prompt: '7' or 'a' (1/2 each); '7' -> EOT -> '9' -> '9' ...; 'a' -> 'a' ...
    model = table_model({response: [seven, a], seven: [eot], eot: [nine]})
    ex = {"prompt": "What is 3 + 4?", "answer": "7", "task": "add"}
    u = torch.tensor([[0.3] * 5, [0.7] * 5, [0.49] * 5])  # cdf: 0.5 at '7', 1 at 'a'
    rows = grpo.sample_groups(model, tok, [ex], 3, 1.0, 5, u, "cpu", NO_CTX)
    assert rows == [[seven, eot], [a] * 5, [seven, eot]]  # nothing after EOT; 'a...' never stops
    texts = [grpo.completion_text(tok, r) for r in rows]
    assert texts[0] == "7<|endoftext|>"
    enc = [grpo.encode_rollout(grpo.encode_prompt(tok, ex["prompt"]), r) for r in rows]
    _, tgt = grpo.collate(enc, tok.special[grpo.PAD])
    assert (tgt != IGN).sum(1).tolist() == [2, 5, 2]  # the mask ends at the EOT
    assert tgt[0][tgt[0] != IGN].tolist() == [seven, eot]


def test_sample_groups_picks_the_only_likely_token_for_any_uniform():
    tok = grpo.task_tokenizer(True)
    five = ord("5")
    V = TINY["vocab_size"]
    table = torch.full((V, V), -1e4)
    table[:, five] = 0.0  # all the mass on '5' after any token
    exs = [{"prompt": "What is 2 + 3?", "answer": "5", "task": "add"}]
    u = torch.tensor([[0.0, 0.5, 1 - 2 ** -24, 0.999]] * 4)
    for temperature in (1.0, 0.3):
        rows = grpo.sample_groups(NextTokenTable(table), tok, exs, 4, temperature, 4, u, "cpu",
                                  NO_CTX)
        assert rows == [[five] * 4] * 4


def test_inverse_cdf_sampler_is_batch_invariant():
    tok, model = grpo.task_tokenizer(True), tiny_llama().eval()
    exs = grpo.make_tasks(6, "train", 3, 2)
    assert len({len(grpo.encode_prompt(tok, ex["prompt"])) for ex in exs}) > 1
    G, n_new = 3, 8
    u = torch.rand(len(exs) * G, n_new, generator=torch.Generator().manual_seed(0))
    together = grpo.sample_groups(model, tok, exs, G, 1.0, n_new, u, "cpu", NO_CTX)
    assert len(together) == len(exs) * G and len({tuple(r) for r in together}) > G
    for i, ex in enumerate(exs):
        alone = grpo.sample_groups(model, tok, [ex], G, 1.0, n_new, u[i * G:(i + 1) * G], "cpu",
                                   NO_CTX)
        assert alone == together[i * G:(i + 1) * G], i
    # the same uniforms, the same answers; other uniforms, other answers
    assert grpo.sample_groups(model, tok, exs, G, 1.0, n_new, u, "cpu", NO_CTX) == together
    assert grpo.sample_groups(model, tok, exs, G, 1.0, n_new, 1 - u, "cpu", NO_CTX) != together


def test_rollout_shares_keep_whole_groups_and_add_up_to_one_process(tmp_path):
    tok = grpo.task_tokenizer(True)
    policy = grpo.Llama(grpo.ModelConfig(**TINY))
    policy.load_state_dict(weights(write_sft_checkpoint(tmp_path / "sft.pt")))
    policy.eval()
    train_ex = grpo.make_tasks(30, "train", 5, 1)
    cfg = grpo.Config(prompts_per_step=4, group_size=3, format_reward=0.5,
                      dynamic_sampling=False)

    def batch(rank, world_size):
        gen = torch.Generator().manual_seed(7)
        return grpo.rollout(cfg, policy, tok, train_ex, 6, gen, rank, world_size, "cpu", NO_CTX)

    one = batch(0, 1)
    assert len(one["texts"]) == 12 and one["prompts_drawn"] == 4
    for i in range(4):  # answers of one prompt stay adjacent (never shuffled before advantages)
        assert len({ex["prompt"] for ex in one["examples"][3 * i:3 * i + 3]}) == 1
    r0, r1 = batch(0, 2), batch(1, 2)
    assert r0["texts"] + r1["texts"] == one["texts"]
    assert r0["encoded"] + r1["encoded"] == one["encoded"]
    assert torch.equal(torch.cat((r0["rewards"], r1["rewards"])), one["rewards"])
    # the rewards: 1 per right answer + 0.5 per well-formed one
    for ex, text, r, c in zip(one["examples"], one["texts"], one["rewards"], one["correct"]):
        assert r.item() == c.item() + 0.5 * grpo.follows_format(text, ex["task"])


# ---- rewards ----
def test_task_rewards_checker_and_format():
    add = {"task": "add", "prompt": "What is 5 + 7?", "answer": "12"}
    rev = {"task": "reverse", "prompt": "Reverse the word: bad", "answer": "dab"}
    count = {"task": "count", "prompt": "Count the letter a in: ba", "answer": "b0 a1 = 1"}
    cases = [  # (example, completion, correct, well formed)
        (add, "12<|endoftext|>", True, True),
        (add, "12", True, False),  # right but never stopped
        (add, "13<|endoftext|>", False, True),
        (add, "1 2<|endoftext|>", False, False),
        (rev, "dab<|endoftext|>", True, True),
        (rev, "12<|endoftext|>", False, False),  # digits are not a word
        (count, "b0 a1 = 1<|endoftext|>", True, True),  # the final answer after ' = ' is graded
        (count, "b0 a0 = 1<|endoftext|>", True, True),  # another trace, the right answer
        (count, "b0 a1 = 2<|endoftext|>", False, True),
        (count, "b0 a1 = 1<|endoftext|> = 2", True, True),  # nothing after EOT counts
        (count, "b0 a1 = x<|endoftext|>", False, False),
    ]
    exs, texts = [c[0] for c in cases], [c[1] for c in cases]
    rewards, correct = grpo.task_rewards(exs, texts, 0.0)
    assert correct.tolist() == [c[2] for c in cases]
    assert rewards.dtype == torch.float32 and rewards.tolist() == [float(c[2]) for c in cases]
    rewards, _ = grpo.task_rewards(exs, texts, 0.5)
    assert rewards.tolist() == [c[2] + 0.5 * c[3] for c in cases]


# ---- main ----
FLAGS = ["--device", "cpu", "--n-train", "30", "--maj-k", "2", "--prompts-per-step", "2",
         "--group-size", "4", "--format-reward", "0.5", "--learning-rate", "3e-3",
         "--warmup-iters", "0", "--eval-interval", "2", "--eval-batch-size", "64",
         "--no-dynamic-sampling"]


def strict_records(path):
    def refuse(x):
        raise ValueError(f"non-finite number {x} in {path}")
    return [json.loads(line, parse_constant=refuse) for line in Path(path).read_text().splitlines()]


def untimed(records):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def train_records(out_dir):
    return [r for r in strict_records(out_dir / "log.jsonl") if "reward" in r]


def weights(path):
    return torch.load(path, weights_only=True)["model"]


class Interrupted(Exception):
    pass


def test_main_end_to_end_plot_determinism_and_resume(tmp_path, monkeypatch):
    sft_path = write_sft_checkpoint(tmp_path / "sft" / "ckpt.pt")
    flags = FLAGS + ["--init-from", str(sft_path), "--max-iters", "4"]
    full = tmp_path / "full"
    done = grpo.main(flags + ["--out-dir", str(full), "--plot"])
    for key in ("accuracy", "accuracy_by_task", "accuracy_before", "accuracy_by_task_before",
                "format_rate", "length_by_task", "maj_k", "maj_at_k", "maj_by_task", "pass_at_k",
                "pass_by_task", "maj_at_k_before", "pass_at_k_before", "think", "wall_s"):
        assert key in done, key
    assert set(done["accuracy_by_task"]) == set(done["maj_by_task"]) == set(grpo.TASK_FAMILIES)
    assert done["maj_k"] == 2 and done["think"] is False and done["iter"] == 4
    assert done["best_iter"] == 4  # the kept model is the last: no validation split to choose
    assert 0 <= done["maj_at_k"] <= done["pass_at_k"] <= 1  # a majority right is one right
    records = strict_records(full / "log.jsonl")
    assert records[-1] == dict(done, wall_s=records[-1]["wall_s"])
    train = [r for r in records if "reward" in r]
    assert [r["iter"] for r in train] == [0, 1, 2, 3]
    assert [r["iter"] for r in records if "accuracy" in r and "event" not in r] == [0, 2, 4]
    for r in train:
        for key in ("loss", "lr", "reward", "reward_std", "rollout_accuracy",
                    "frac_reward_zero_std", "entropy", "completion_length", "kl", "grad_norm",
                    "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
                    "rollout_tokens_per_s", "prompts_drawn"):
            assert key in r, key
        assert r["kl"] >= 0 and 1 <= r["completion_length"] <= 6
        assert r["clip_ratio/region_mean"] == 0.0  # one update per batch: the ratio is 1
    assert train[0]["kl"] == 0.0  # the policy is the reference at the first step
    assert abs(train[0]["loss"]) < 1e-7  # grpo, ratio 1 and KL 0: -mean(A) = 0
    # the test checkpoint gives GRPO something to learn from: rewards differ within a group
    assert any(r["frac_reward_zero_std"] < 1 and r["grad_norm"] > 0 for r in train)
    assert train[-1]["kl"] > 0
    ckpt = torch.load(full / "ckpt.pt", weights_only=True)
    assert ckpt["script"] == "grpo.py" and ckpt["iter"] == 4
    for key in ("model_args", "config", "tokenizer", "optimizer", "sft_from", "before",
                "task_world"):
        assert key in ckpt, key
    assert set(ckpt["model"]) == set(tiny_llama().state_dict())  # plain Llama: sft.py format
    assert ckpt["task_world"]["n_test"] == 12
    sft_w = weights(sft_path)
    assert any(not torch.equal(sft_w[k], v) for k, v in ckpt["model"].items())  # it moved
    pytest.importorskip("matplotlib")
    assert_png(full / "grpo.png")
    # the same seed: the same log, record for record (timings aside), the same weights
    again = tmp_path / "again"
    grpo.main(flags + ["--out-dir", str(again)])
    assert untimed(strict_records(again / "log.jsonl")) == untimed(records)
    assert all(torch.equal(v, weights(again / "ckpt.pt")[k]) for k, v in ckpt["model"].items())
    # killed right after the checkpoint of step 2: --resume continues bit for bit, and the log
    # holds each record once
    part = tmp_path / "part"
    save = grpo.save_checkpoint

    def save_then_die(ck, path):
        save(ck, path)
        if ck["iter"] == 2:
            raise Interrupted

    monkeypatch.setattr(grpo, "save_checkpoint", save_then_die)
    with pytest.raises(Interrupted):
        grpo.main(flags + ["--out-dir", str(part)])
    monkeypatch.setattr(grpo, "save_checkpoint", save)
    resumed = grpo.main(flags + ["--out-dir", str(part), "--resume"])
    assert untimed(train_records(part)) == untimed(train)
    assert resumed["accuracy"] == done["accuracy"] and resumed["maj_at_k"] == done["maj_at_k"]
    assert all(torch.equal(v, weights(part / "ckpt.pt")[k]) for k, v in ckpt["model"].items())
    part_records = strict_records(part / "log.jsonl")
    kinds = [("loss" in r, r["iter"]) for r in part_records]
    assert kinds == [("loss" in r, r["iter"]) for r in records]  # the eval at 2 included
    assert untimed(part_records) == untimed(records)


@pytest.mark.parametrize("extra", [["--loss-type", "dapo"],
                                   ["--loss-type", "dr_grpo", "--scale", "none"],
                                   ["--scale", "batch", "--num-iterations", "2"],
                                   ["--dynamic-sampling", "--max-resample", "2"],
                                   ["--beta", "0"]])
def test_main_variants(tmp_path, extra):
    sft_path = write_sft_checkpoint(tmp_path / "sft.pt")
    out = tmp_path / "o"
    done = grpo.main(FLAGS + ["--init-from", str(sft_path), "--max-iters", "3", "--maj-k", "0",
                              "--out-dir", str(out)] + extra)
    assert "accuracy" in done and "maj_at_k" not in done  # --maj-k 0: no maj@k
    train = train_records(out)
    assert [r["iter"] for r in train] == [0, 1, 2]
    assert all(math.isfinite(r["loss"]) for r in train)
    assert any(r["grad_norm"] > 0 for r in train)
    if "--beta" in extra:  # no reference: no KL measured; all-equal groups give no gradient
        assert all("kl" not in r for r in train)
        assert abs(train[0]["loss"]) < 1e-7
        assert all(r["grad_norm"] == 0 for r in train if r["frac_reward_zero_std"] == 1)
    if "--dynamic-sampling" in extra:
        # a step keeps drawing prompts until every group has signal, or gives up after
        # max_resample more draws
        for r in train:
            assert r["prompts_drawn"] in (2, 4, 6)
            assert r["frac_reward_zero_std"] == 0 or r["prompts_drawn"] == 6, r
        assert any(r["prompts_drawn"] > 2 for r in train)
    if "--num-iterations" in extra:  # the logged pass is the second: the policy has moved
        assert train[0]["kl"] > 0 and abs(train[0]["loss"]) > 1e-7


def test_sample_only_answers_with_the_saved_policy(tmp_path, capsys):
    """--sample-only loads the GRPO checkpoint (policy_from, as the SFT one) and answers greedily:
    the same answer for every sample, the one the policy decodes itself."""
    out = tmp_path / "o"
    grpo.main(FLAGS + ["--init-from", str(write_sft_checkpoint(tmp_path / "sft.pt")),
                       "--max-iters", "1", "--maj-k", "0", "--out-dir", str(out)])
    capsys.readouterr()
    got = grpo.main(["--device", "cpu", "--sample-only", "--out-dir", str(out),
                     "--num-samples", "2", "--max-new-tokens", "6", "--prompt", "What is 3 + 4?"])
    printed = capsys.readouterr().out
    ckpt = grpo.load_checkpoint(out / "ckpt.pt", ("grpo.py",))
    model, tok = grpo.policy_from(ckpt, out / "ckpt.pt", "cpu")
    assert not model.training and model.config.dropout == 0.0
    assert all(torch.equal(v, ckpt["model"][k]) for k, v in model.state_dict().items())
    ids = grpo.encode_prompt(tok, "What is 3 + 4?")
    row = grpo.generate_until(model, torch.tensor([ids]), 6, tok.special[grpo.EOT])[0, len(ids):]
    want = grpo.completion_text(tok, row.tolist()).split(grpo.EOT)[0]
    assert got["samples"] == [want, want]
    assert printed.count(grpo.format_prompt("What is 3 + 4?") + want + "\n---") == 2


def test_missing_init_from_names_sft_py(tmp_path, capsys):
    out = tmp_path / "o"
    with pytest.raises(SystemExit) as e:
        grpo.main(["--init-from", str(tmp_path / "missing.pt"), "--out-dir", str(out),
                   "--device", "cpu"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert "python sft.py" in err and not out.exists()


def test_ddp_two_processes_match_one_process(tmp_path):
    sft_path = write_sft_checkpoint(tmp_path / "sft.pt")
    # dapo: each process's token mean is rescaled by its share of the step's tokens, the one
    # loss type where the processes' average is not the mean of their losses as they stand
    flags = FLAGS + ["--init-from", str(sft_path), "--max-iters", "3", "--eval-interval", "3",
                     "--loss-type", "dapo"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "grpo.py"), *flags, "--out-dir", str(tmp_path / "two")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    single = grpo.main(flags + ["--out-dir", str(tmp_path / "one")])  # meanwhile
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-2000:]
    assert "ddp world_size=2" in stdout
    one, two = train_records(tmp_path / "one"), train_records(tmp_path / "two")
    assert len(one) == len(two) == 3
    assert any(r["frac_reward_zero_std"] < 1 for r in one)  # a real update to compare
    # the same update: the same weights after 3 steps, the same held-out answers
    w1, w2 = weights(tmp_path / "one" / "ckpt.pt"), weights(tmp_path / "two" / "ckpt.pt")
    assert all(torch.allclose(w1[k], w2[k], rtol=1e-5, atol=1e-6) for k in w1)
    done = strict_records(tmp_path / "two" / "log.jsonl")[-1]
    assert done["event"] == "done"
    assert done["accuracy"] == single["accuracy"]
    assert done["accuracy_by_task"] == single["accuracy_by_task"]
    # the same log: every per-step metric is over the whole step's batch, not rank 0's share
    differ = [(a["iter"], key, a[key], b[key]) for a, b in zip(one, two)
              for key in ("reward", "reward_std", "rollout_accuracy", "frac_reward_zero_std", "lr",
                          "grad_norm", "loss", "kl", "entropy", "completion_length",
                          "clip_ratio/low_mean", "clip_ratio/high_mean", "prompts_drawn")
              if not math.isclose(a[key], b[key], rel_tol=1e-5, abs_tol=1e-7)]
    assert not differ, f"(iter, metric, 1 process, 2 processes): {differ}"
