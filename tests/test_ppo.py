"""Tests for ppo.py: GAE, the clipped losses and whitening by hand, the adaptive KL, where the
score lands, the alignment pitfalls (shift, masks, pad == eos, KL sign, temperature), main.

Run: python -m pytest -q tests/test_ppo.py --durations=5
"""
import dataclasses
import json
import math

import pytest
import torch

import ppo
from conftest import assert_png

TINY = dict(vocab_size=320, block_size=96, n_layer=2, n_head=2, n_embd=32, n_kv_head=1)
NAN = float("nan")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run faster on one thread (no OpenMP hand-offs), above all on a busy CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    return ppo.Llama(ppo.ModelConfig(**TINY))


def write_sft_checkpoint(path, n_test=12, difficulty=1, seed=1):
    """A tiny sft.py-format checkpoint (random weights): what ppo.py reads from sft.py."""
    tok = ppo.task_tokenizer(True)
    ppo.save_checkpoint({"script": "sft.py", "version": 1, "iter": 0,
                         "model_args": dataclasses.asdict(ppo.ModelConfig(**TINY)),
                         "model": tiny_llama().state_dict(),
                         "config": {"seed": seed, "difficulty": difficulty, "n_test": n_test,
                                    "task": "generate"},
                         "tokenizer": {"kind": "byte", "special": dict(tok.special)},
                         "optimizer": {}, "rng": {}, "best_val_loss": 0.0}, path)
    return path


def write_rm_checkpoint(path):
    """A tiny reward.py-format checkpoint: three blocks and a random scalar head."""
    tok = ppo.task_tokenizer(True)
    args = dataclasses.asdict(ppo.ModelConfig(**dict(TINY, n_layer=3)))
    torch.manual_seed(1)
    rm = ppo.build_reward_model(args)
    torch.nn.init.normal_(rm.lm_head.weight, std=0.5)  # not all zero: scores that differ
    ppo.save_checkpoint({"script": "reward.py", "version": 1, "model_args": args,
                         "model": rm.state_dict(), "config": {},
                         "tokenizer": {"kind": "byte", "special": dict(tok.special)},
                         "reward_stats": {"mean": 0.5, "std": 2.0}}, path)
    return path


# ---- GAE, by hand ----
def test_gae_by_hand_gamma_1_and_099_with_ragged_masks_and_garbage_outside():
    # row 0: a 1-token prompt (action 0 masked), three response actions, score 1 at the last;
    # row 1: a 2-token prompt, one response action, then padding holding garbage
    mask = torch.tensor([[False, True, True, True], [False, False, True, False]])
    rewards = torch.tensor([[NAN, 0.0, 0.0, 1.0], [NAN, NAN, 0.7, NAN]])
    values = torch.tensor([[NAN, 0.5, 0.2, 0.4], [NAN, NAN, 0.3, NAN]])
    # gamma 1, lam 0.95: A3 = 1 - 0.4; A2 = (0.4 - 0.2) + 0.95 A3; A1 = (0.2 - 0.5) + 0.95 A2
    adv, ret = ppo.gae(rewards, values, mask, 1.0, 0.95)
    a3, a2 = 0.6, 0.2 + 0.95 * 0.6
    a1 = -0.3 + 0.95 * a2
    assert adv[0].tolist() == pytest.approx([0.0, a1, a2, a3])
    assert ret[0].tolist() == pytest.approx([0.0, a1 + 0.5, a2 + 0.2, 1.0])
    # row 1: one action, nothing bootstrapped from the NaN value in the padding after it
    assert adv[1].tolist() == pytest.approx([0.0, 0.0, 0.4, 0.0])
    assert ret[1].tolist() == pytest.approx([0.0, 0.0, 0.7, 0.0])
    # gamma 0.99: A2 = 0.99 * 0.4 - 0.2 + 0.99 * 0.95 * 0.6, A1 = 0.99 * 0.2 - 0.5 + 0.9405 A2
    adv, ret = ppo.gae(rewards, values, mask, 0.99, 0.95)
    a2 = 0.99 * 0.4 - 0.2 + 0.9405 * 0.6
    assert adv[0].tolist() == pytest.approx([0.0, 0.99 * 0.2 - 0.5 + 0.9405 * a2, a2, 0.6])
    assert torch.isfinite(adv).all() and torch.isfinite(ret).all()
    # lam = 1, gamma = 1: Monte Carlo, A_t = (sum of the rewards from t on) - V_t
    adv, ret = ppo.gae(rewards, values, mask, 1.0, 1.0)
    assert adv[0].tolist() == pytest.approx([0.0, 0.5, 0.8, 0.6])
    assert ret[0].tolist() == pytest.approx([0.0, 1.0, 1.0, 1.0])  # returns = the score


def test_gae_against_a_per_row_loop():
    torch.manual_seed(0)
    B, T = 5, 9
    rewards, values = torch.randn(B, T), torch.randn(B, T)
    starts, ends = [0, 2, 3, 1, 8], [9, 5, 4, 9, 9]
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        mask[b, starts[b]:ends[b]] = True
    adv, ret = ppo.gae(rewards, values, mask, 0.9, 0.8)
    for b in range(B):
        r, v = rewards[b, starts[b]:ends[b]].tolist(), values[b, starts[b]:ends[b]].tolist()
        want, last = [], 0.0
        for t in reversed(range(len(r))):
            nv = v[t + 1] if t + 1 < len(r) else 0.0
            last = r[t] + 0.9 * nv - v[t] + 0.9 * 0.8 * last
            want.insert(0, last)
        assert adv[b, starts[b]:ends[b]].tolist() == pytest.approx(want, abs=1e-6)
        assert ret[b, starts[b]:ends[b]].tolist() == pytest.approx(
            [a + x for a, x in zip(want, v)], abs=1e-6)
        assert (adv[b, ~mask[b]] == 0).all() and (ret[b, ~mask[b]] == 0).all()


# ---- the clipped losses, by hand ----
def test_ppo_loss_by_hand_clipping_in_both_directions_and_value_clipping():
    # (ratio, advantage): A > 0 clipped above, A < 0 clipped below, inside the band, then the
    # two pessimistic cases that are *not* clipped (A > 0 at ratio 0.5, A < 0 at ratio 1.5),
    # and a masked token with garbage
    ratio = torch.tensor([[1.5, 0.5, 1.1, 0.5, 1.5, 9.0]])
    adv = torch.tensor([[1.0, -1.0, -2.0, 1.0, -1.0, 5.0]])
    mask = torch.tensor([[True, True, True, True, True, False]])
    new = ratio.log().requires_grad_(True)
    old = torch.zeros(1, 6)
    values = torch.tensor([[0.5, -0.1, 0.3, 0.0, 0.0, 7.0]])
    returns = torch.tensor([[1.0, -1.0, 0.0, 0.1, 0.0, 3.0]])
    loss, stats = ppo.ppo_loss(new, old, adv, values, torch.zeros(1, 6), returns, mask,
                               clip_range=0.2, clip_range_value=0.2, vf_coef=0.1)
    # policy terms max(-A r, -A clip(r)): -1.2, 0.8, 2.2, -0.5, 1.5 -> mean 0.56
    assert stats["pg_loss"] == pytest.approx(0.56)
    assert stats["clipfrac"] == pytest.approx(2 / 5)  # the first two tokens only
    # value: V_clip = clip(V, -0.2, 0.2) (V_old = 0); max of the squared errors per token:
    # 0.64 (clipped, worse), 0.81, 0.09 (unclipped, worse), 0.01, 0 -> 0.5 * mean = 0.155
    assert stats["vf_loss"] == pytest.approx(0.155)
    assert stats["vf_clipfrac"] == pytest.approx(1 / 5)
    assert loss.item() == pytest.approx(0.56 + 0.1 * 0.155)
    r = ratio[0, :5].double()
    assert stats["approx_kl"] == pytest.approx(((r - 1) - r.log()).mean().item(), rel=1e-5)
    # gradient w.r.t. log pi: 0 where the clip is active, -A r / n elsewhere, 0 when masked
    loss.backward()
    assert new.grad[0].tolist() == pytest.approx([0.0, 0.0, 2.2 / 5, -0.5 / 5, 1.5 / 5, 0.0])


def test_ppo_loss_at_ratio_one_is_minus_mean_advantage_and_ignores_nan_padding():
    adv = torch.tensor([[0.3, -1.2, NAN], [2.0, NAN, NAN]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    lp = torch.tensor([[-1.0, -2.0, NAN], [-0.5, NAN, NAN]])
    v = torch.tensor([[0.0, 0.0, NAN], [0.0, NAN, NAN]])
    loss, stats = ppo.ppo_loss(lp, lp, adv, v, v, v, mask)
    assert loss.item() == pytest.approx(-(0.3 - 1.2 + 2.0) / 3)
    assert stats["clipfrac"] == 0.0 and stats["approx_kl"] == 0.0 and stats["ratio"] == 1.0


# ---- whitening, the adaptive KL, the running moments ----
def test_whiten_ignores_padding():
    x = torch.tensor([[1.0, 2.0, NAN], [3.0, 1e6, -1e6]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    w = ppo.whiten(x, mask)
    valid = torch.tensor([1.0, 2.0, 3.0])
    want = (valid - valid.mean()) / valid.var(unbiased=False).sqrt()
    assert w[mask].tolist() == pytest.approx(want.tolist(), abs=1e-6)
    assert (w[~mask] == 0).all()
    kept = ppo.whiten(x, mask, shift_mean=False)
    assert kept[mask].mean().item() == pytest.approx(2.0)  # only the scale changed
    assert kept[mask].tolist() == pytest.approx((want + 2.0).tolist(), abs=1e-6)
    one = ppo.whiten(x, torch.tensor([[False, True, False], [False, False, False]]))
    assert torch.equal(one, torch.zeros(2, 3))  # one token: 0, not 0/0
    with pytest.raises(ValueError):
        ppo.whiten(x, torch.zeros(2, 3, dtype=torch.bool))


def test_adaptive_kl_rule():
    ctl = ppo.AdaptiveKLController(0.1, target=6.0, horizon=10000)
    assert ctl.update(6.0, 256) == pytest.approx(0.1)  # on target: unchanged
    assert ctl.update(12.0, 256) == pytest.approx(0.1 * (1 + 0.2 * 256 / 10000))  # clipped +0.2
    beta = ctl.value
    assert ctl.update(6.6, 1000) == pytest.approx(beta * (1 + 0.1 * 0.1))  # error 0.1
    beta = ctl.value
    assert ctl.update(0.0, 500) == pytest.approx(beta * (1 - 0.2 * 0.05))  # clipped -0.2


def test_running_moments_match_the_pooled_statistics():
    torch.manual_seed(0)
    a, b = torch.randn(50) * 2 + 1, torch.randn(30) - 3
    m = ppo.RunningMoments()
    m.update(a)
    m.update(b)
    both = torch.cat((a, b)).double()
    assert m.mean == pytest.approx(both.mean().item())
    assert m.std == pytest.approx(both.var(unbiased=False).sqrt().item())
    prior = ppo.RunningMoments(1.6, 1.2, count=10)  # reward.py's stats as 10 samples
    prior.update(torch.full((10,), 3.6))
    # within-group variances 1.44 and 0, means 1.6 and 3.6 (1 from the pooled mean 2.6)
    assert prior.mean == pytest.approx(2.6) and prior.std == pytest.approx(math.sqrt(0.72 + 1))
    assert ppo.RunningMoments().std == 1.0 and ppo.RunningMoments(0, 0).std == 1e-3


# ---- rollouts: shift, masks, where the score lands, pad == eos, temperature, KL sign ----
def test_rollout_mask_and_score_land_on_the_last_real_token():
    tok = ppo.task_tokenizer(True)
    eot, pad = tok.special[ppo.EOT], tok.special[ppo.PAD]
    prompts = [[5, 6, 7], [5, 6]]
    responses = [[40, 41, eot], [42]]  # the second never stopped
    idx, mask, lengths = ppo.collate_rollouts(prompts, responses, pad)
    assert idx.tolist() == [[5, 6, 7, 40, 41, eot], [5, 6, 42, pad, pad, pad]]
    assert lengths.tolist() == [6, 3]
    # shifted frame: action t is idx[t + 1]; the response's actions only, EOT included
    assert mask.tolist() == [[False, False, True, True, True],
                             [False, True, False, False, False]]
    assert [idx[b, 1:][mask[b]].tolist() for b in range(2)] == responses
    # pad == eos changes nothing: the mask comes from the lengths, not from token ids
    _, mask_eos, _ = ppo.collate_rollouts(prompts, responses, eot)
    assert torch.equal(mask_eos, mask)
    # the score lands on the last real action (lengths - 2), never on the first pad slot
    logps = torch.randn(2, 5)
    rewards, kl = ppo.compute_rewards(torch.tensor([2.0, 3.0]), logps, logps, mask,
                                      lengths - 2, kl_coef=0.1)
    assert rewards.tolist() == [[0, 0, 0, 0, 2.0], [0, 3.0, 0, 0, 0]]
    assert (kl == 0).all()
    assert idx[0, 1 + 4].item() == eot  # row 0's scored action emits <|endoftext|>


def test_kl_penalty_sign_and_k1_per_token():
    mask = torch.tensor([[True, True, False]])
    logps = torch.tensor([[-0.5, -2.0, NAN]])
    ref = torch.tensor([[-1.0, -1.5, NAN]])
    rewards, kl = ppo.compute_rewards(torch.tensor([1.0]), logps, ref, mask,
                                      torch.tensor([1]), kl_coef=0.2)
    assert kl[0].tolist() == pytest.approx([0.5, -0.5, 0.0])  # k1 = log pi - log pi_ref
    # the penalty is subtracted: -beta k1 at each token, the score on the last
    assert rewards[0].tolist() == pytest.approx([-0.1, 0.1 + 1.0, 0.0])


def test_token_logps_shift_and_temperature():
    torch.manual_seed(0)
    logits, idx = torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5))
    for tau in (1.0, 0.7, 2.0):
        got = ppo.token_logps(logits, idx, tau)
        for b in range(2):
            for t in range(4):  # logits at t predict the token at t + 1
                want = torch.log_softmax(logits[b, t] / tau, -1)[idx[b, t + 1]]
                assert got[b, t].item() == pytest.approx(want.item(), abs=1e-6)
    ent = ppo.token_entropy(logits, 2.0)
    p = torch.softmax(logits[0, 0] / 2.0, -1)
    assert ent[0, 0].item() == pytest.approx(-(p * p.log()).sum().item(), abs=1e-6)


def test_sampled_k1_is_positive_in_expectation_and_sampling_is_seeded():
    """k1 per token can be negative; on samples of pi its mean estimates KL(pi || ref) >= 0. A
    large negative mean would mean the sampler was not plain sampling from pi at tau."""
    tok, policy, ref = ppo.task_tokenizer(True), tiny_llama(0).eval(), tiny_llama(1).eval()
    with torch.no_grad():  # sharper distributions than a random init's: a KL worth measuring
        policy.lm_head.weight.mul_(40)
        ref.lm_head.weight.mul_(40)
    examples = ppo.make_tasks(60, "train", 0, 1)

    def draw(seed):
        gen = torch.Generator().manual_seed(seed)
        return ppo.sample_responses(policy, tok, examples, 1.5, 6, 64, "cpu",
                                    torch.autocast("cpu", enabled=False), gen)

    pairs = draw(0)
    assert pairs == draw(0) and pairs != draw(1)
    idx, mask, _ = ppo.collate_rollouts([p for p, _ in pairs], [r for _, r in pairs],
                                        tok.special[ppo.PAD])
    with torch.no_grad():
        lp = ppo.token_logps(policy(idx)[0], idx, 1.5)
        lr = ppo.token_logps(ref(idx)[0], idx, 1.5)
    _, kl = ppo.compute_rewards(torch.zeros(len(pairs)), lp, lr, mask,
                                mask.sum(1) * 0, kl_coef=0.0)
    assert (kl < 0).any()  # some tokens are negative by design
    # the exact KL(pi || ref) at the sampled prefixes, which k1 estimates without bias
    with torch.no_grad():
        p = torch.log_softmax(policy(idx)[0][:, :-1] / 1.5, -1)
        q = torch.log_softmax(ref(idx)[0][:, :-1] / 1.5, -1)
    exact = torch.where(mask, (p.exp() * (p - q)).sum(-1), 0.0).sum(1).mean().item()
    estimate = kl.sum(1).mean().item()
    assert exact > 0.5 and estimate > 0 and abs(estimate - exact) < 0.5 * exact, (estimate, exact)


def test_actor_critic_shared_and_separate():
    idx = torch.randint(0, 256, (3, 10))
    for critic in ("shared", "separate"):
        policy = tiny_llama()
        ac = ppo.ActorCritic(policy, critic)
        logits, values = ac(idx)
        assert logits.shape == (3, 10, TINY["vocab_size"]) and values.shape == (3, 10)
        assert torch.equal(values, torch.zeros(3, 10))  # the head starts at zero
        assert torch.equal(logits, policy(idx)[0])
        assert not policy.lm_head._forward_hooks  # the hook is removed after each call
        # the value loss reaches the trunk through the shared head, or the critic's own
        ac.v_head.weight.data.normal_() if critic == "shared" else \
            ac.critic.lm_head.weight.data.normal_()
        ac(idx)[1].sum().backward()
        trunk = policy.transformer.h[0].mlp.c_fc.weight
        assert (trunk.grad is not None and trunk.grad.abs().sum() > 0) == (critic == "shared")
        # cropping the padding (ppo_update) leaves the valid positions' log-probs as they were
        with torch.no_grad():
            full = ppo.token_logps(ac(idx)[0], idx, 1.0)
            crop = ppo.token_logps(ac(idx[:, :6])[0], idx[:, :6], 1.0)
        assert torch.allclose(full[:, :5], crop, atol=1e-5)


# ---- main ----
FLAGS = ["--n-train", "48", "--rollout-batch", "8", "--minibatch-size", "4",
         "--max-response-tokens", "4", "--eval-max-new-tokens", "4", "--eval-interval", "2",
         "--warmup-iters", "0", "--device", "cpu", "--learning-rate", "1e-3", "--min-lr", "1e-4",
         "--eval-batch-size", "64", "--ppo-epochs", "2"]


def strict_records(path):
    def refuse(x):
        raise ValueError(f"non-finite number {x} in {path}")
    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def test_main_checker_reward_determinism_and_sample_only(tmp_path):
    sft_path = write_sft_checkpoint(tmp_path / "sft" / "ckpt.pt")
    flags = FLAGS + ["--init-from", str(sft_path), "--reward", "checker", "--max-iters", "3",
                     "--max-approx-kl", "0"]
    done = ppo.main(flags + ["--out-dir", str(tmp_path / "a")])
    for key in ("accuracy", "accuracy_by_task", "format_rate", "wall_s", "kl", "kl_coef",
                "accuracy_before", "accuracy_by_task_before"):
        assert key in done, key
    assert set(done["accuracy_by_task"]) == set(ppo.TASK_FAMILIES)
    assert done["best_iter"] == 3  # the kept model is the last: no validation split to choose
    records = strict_records(tmp_path / "a" / "log.jsonl")
    assert records[-1]["event"] == "done"
    train = [r for r in records if "loss" in r]
    assert [r["iter"] for r in train] == [0, 1, 2]
    for key in ("rm_score", "rollout_accuracy", "kl", "kl_coef", "clipfrac", "approx_kl",
                "vf_loss", "explained_variance", "entropy", "response_length",
                "rollout_tokens_per_s", "lr", "ms_per_iter", "elapsed_s"):
        assert key in train[0], key
    # the policy is the reference before the first update: k1 is exactly 0 on every token
    assert train[0]["kl"] == 0.0 and train[0]["kl_coef"] == 0.1
    assert train[0]["minibatches"] == 4  # 2 epochs x 8 / 4, no early stop
    assert train[1]["kl_coef"] != 0.1  # adaptive
    # the checker's reward is the rollouts' accuracy
    assert all(r["rm_score"] == r["rollout_accuracy"] for r in train)
    evals = [r for r in records if "accuracy" in r and "event" not in r]
    assert [r["iter"] for r in evals] == [0, 2, 3]
    assert evals[0]["accuracy"] == done["accuracy_before"]
    ckpt = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    assert ckpt["script"] == "ppo.py" and ckpt["iter"] == 3 and ckpt["critic"] == "shared"
    assert set(ckpt["model"]) == set(tiny_llama().state_dict())  # plain Llama: feeds a next stage
    assert ckpt["model_args"]["dropout"] == 0.0 and set(ckpt["value"]) == {"weight", "bias"}
    # same seed -> the same run
    ppo.main(flags + ["--out-dir", str(tmp_path / "b")])
    again = strict_records(tmp_path / "b" / "log.jsonl")
    drop = ("ms_per_iter", "tokens_per_s", "elapsed_s", "rollout_tokens_per_s", "wall_s")
    strip = [{k: v for k, v in r.items() if k not in drop} for r in records]
    assert strip == [{k: v for k, v in r.items() if k not in drop} for r in again]
    out = ppo.main(["--sample-only", "--out-dir", str(tmp_path / "a"), "--max-new-tokens", "3"])
    assert len(out["samples"]) == 1


def test_main_reward_model_separate_critic_and_plot(tmp_path):
    sft_path = write_sft_checkpoint(tmp_path / "sft.pt")
    rm_path = write_rm_checkpoint(tmp_path / "rm.pt")
    out = tmp_path / "o"
    done = ppo.main(FLAGS + ["--init-from", str(sft_path), "--reward-model", str(rm_path),
                             "--max-iters", "2", "--critic", "separate", "--plot",
                             "--families", "add,count", "--out-dir", str(out)])
    assert "rm_score_heldout" in done and done["critic"] == "separate"
    records = strict_records(out / "log.jsonl")
    train = [r for r in records if "loss" in r]
    assert train[0]["rm_score"] != train[0]["rollout_accuracy"]  # the RM's score, not the checker
    assert all("rm_score_heldout" in r for r in records if "accuracy" in r)
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["critic"] == "separate" and "lm_head.weight" in ckpt["value"]
    assert ckpt["reward_moments"]["count"] == 8 + 2 * 8  # the prior (one batch) + 2 batches
    pytest.importorskip("matplotlib")  # the README's test command installs it
    assert_png(out / "ppo.png")


class Interrupted(Exception):
    pass


@pytest.mark.parametrize("critic", ["shared", "separate"])
def test_resume_continues_bit_for_bit(tmp_path, monkeypatch, capsys, critic):
    """Killed right after the checkpoint of step 2, --resume replays steps 2-3 exactly: the
    policy, the value function, the optimizer, beta, the reward's running moments and the
    three generators all come back; the log holds each record once."""
    sft_path = write_sft_checkpoint(tmp_path / "sft.pt")
    rm_path = write_rm_checkpoint(tmp_path / "rm.pt")
    flags = FLAGS + ["--init-from", str(sft_path), "--reward-model", str(rm_path),
                     "--max-iters", "4", "--critic", critic]
    done = ppo.main(flags + ["--out-dir", str(tmp_path / "full")])
    save = ppo.save_checkpoint

    def save_then_die(ck, path):
        save(ck, path)
        if ck["iter"] == 2:
            raise Interrupted

    part = tmp_path / "part"
    monkeypatch.setattr(ppo, "save_checkpoint", save_then_die)
    with pytest.raises(Interrupted):
        ppo.main(flags + ["--out-dir", str(part)])
    monkeypatch.setattr(ppo, "save_checkpoint", save)
    with pytest.raises(SystemExit):  # it cannot end before its checkpoint
        ppo.main(flags + ["--out-dir", str(part), "--resume", "--max-iters", "1"])
    assert "--max-iters 1: the checkpoint is at iter 2" in capsys.readouterr().err
    # the run's critic and reward come from the checkpoint, whatever the flags say
    resumed = ppo.main(flags + ["--out-dir", str(part), "--resume", "--reward", "checker"])
    drop = ("ms_per_iter", "tokens_per_s", "elapsed_s", "rollout_tokens_per_s", "wall_s")

    def untimed(path):
        return [{k: v for k, v in r.items() if k not in drop} for r in strict_records(path)]

    assert untimed(part / "log.jsonl") == untimed(tmp_path / "full" / "log.jsonl")
    assert {k: v for k, v in resumed.items() if k not in drop} == \
        {k: v for k, v in done.items() if k not in drop}
    a = torch.load(tmp_path / "full" / "ckpt.pt", weights_only=True)
    b = torch.load(part / "ckpt.pt", weights_only=True)
    for key in ("model", "value"):
        assert all(torch.equal(v, b[key][k]) for k, v in a[key].items()), key
    assert a["kl_coef"] == b["kl_coef"] and a["reward_moments"] == b["reward_moments"]


def test_non_finite_loss_stops_with_one_line_naming_the_checkpoint(tmp_path, capsys):
    path = tmp_path / "ckpt.pt"
    ppo.check_finite({"loss": NAN}, True, 3, path)  # a finite step goes on
    for exists, kept in ((False, "no checkpoint was written"), (True, f"{path} is kept")):
        if exists:
            path.write_bytes(b"")
        with pytest.raises(SystemExit) as e:
            ppo.check_finite({"loss": NAN}, False, 3, path)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and "loss is nan at iter 3" in err
        assert kept in err and "--learning-rate" in err


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        ppo.main(["--help"])
    assert e.value.code == 0 and "--target-kl" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    ([], "not found: run python sft.py first"),
    (["--reward", "human"], "--reward human: expected one of rm, checker"),
    (["--critic", "none"], "--critic none: expected one of shared, separate"),
    (["--families", "add,poem"], "--families add,poem: expected all or a comma list"),
    (["--rollout-temperature", "0"], "--rollout-temperature 0.0: expected a number > 0"),
    (["--target-kl", "nan"], "--target-kl nan: expected a finite number"),
    (["--clip-range", "1.5"], "--clip-range 1.5: expected a number in (0, 1)"),
    (["--minibatch-size", "512"], "--minibatch-size 512: expected at most --rollout-batch"),
    (["--min-lr", "1"], "--min-lr"),
])
def test_mistakes_exit_2_with_one_line_and_write_nothing(tmp_path, capsys, extra, message):
    out = tmp_path / "o"
    with pytest.raises(SystemExit) as e:
        ppo.main(["--init-from", str(tmp_path / "missing.pt"), "--out-dir", str(out)] + extra)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and err.count("\n") == 1, err
    assert err.startswith("error: ") and not out.exists()


def test_missing_or_foreign_reward_model_exit_2(tmp_path, capsys):
    sft_path = write_sft_checkpoint(tmp_path / "sft.pt")
    out = tmp_path / "o"
    with pytest.raises(SystemExit) as e:
        ppo.main(["--init-from", str(sft_path), "--reward-model", str(tmp_path / "none.pt"),
                  "--out-dir", str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ")
    assert "none.pt not found: run python reward.py first" in err and not out.exists()
    with pytest.raises(SystemExit) as e:  # an sft.py checkpoint is not a reward model
        ppo.main(["--init-from", str(sft_path), "--reward-model", str(sft_path),
                  "--out-dir", str(out)])
    assert e.value.code == 2 and "written by sft.py" in capsys.readouterr().err
    (out).mkdir()
    (out / "ckpt.pt").write_bytes(b"keep me")
    with pytest.raises(SystemExit) as e:
        ppo.main(["--init-from", str(sft_path), "--reward", "checker", "--out-dir", str(out)])
    assert e.value.code == 2 and "--overwrite" in capsys.readouterr().err
    assert (out / "ckpt.pt").read_bytes() == b"keep me"
