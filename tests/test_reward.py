"""Tests for reward.py: the loss, pooling at the last real token, the pairs, the metrics, main.

Run: python -m pytest -q tests/test_reward.py --durations=5
"""
import dataclasses
import itertools
import json
import math
import random

import numpy as np
import pytest
import torch

import reward
from conftest import assert_png

TINY = dict(vocab_size=320, block_size=96, n_layer=2, n_head=2, n_embd=32, n_kv_head=1)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run faster on one thread (no OpenMP hand-offs), above all on a busy CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_rm(seed=0):
    """A tiny reward model whose scalar head is random (zero-init would make every reward 0)."""
    torch.manual_seed(seed)
    model = reward.build_reward_model(dict(TINY))
    torch.nn.init.normal_(model.lm_head.weight, std=1.0)
    return model.eval()


def write_sft_checkpoint(path, n_test=24, difficulty=1, seed=1):
    """A tiny sft.py-format checkpoint (random weights): what reward.py reads from sft.py."""
    torch.manual_seed(0)
    tok = reward.task_tokenizer(True)
    cfg = reward.ModelConfig(**TINY)
    model = reward.Llama(cfg)
    reward.save_checkpoint({"script": "sft.py", "version": 1, "iter": 0,
                            "model_args": dataclasses.asdict(cfg), "model": model.state_dict(),
                            "config": {"seed": seed, "difficulty": difficulty, "n_test": n_test,
                                       "task": "generate"},
                            "tokenizer": {"kind": "byte", "special": dict(tok.special)},
                            "optimizer": {}, "rng": {}, "best_val_loss": 0.0}, path)
    return path


# ---- the loss, against values worked out by hand ----
def test_bt_loss_equal_rewards_is_ln2_and_margin_shifts_it():
    r = torch.tensor([0.3, -1.2, 2.0])
    assert reward.reward_loss(r, r).item() == pytest.approx(math.log(2))
    # a gap of 1 with margin 1 is a coin flip again; a gap of 0 with margin 0.5 costs log(1+e^0.5)
    assert reward.reward_loss(torch.tensor([1.0]), torch.tensor([0.0]),
                              margin=torch.tensor([1.0])).item() == pytest.approx(math.log(2))
    assert reward.reward_loss(torch.tensor([0.0]), torch.tensor([0.0]),
                              margin=torch.tensor([0.5])).item() == pytest.approx(
        math.log(1 + math.exp(0.5)))
    # the right sign: chosen far above rejected is cheap, the reverse is expensive
    assert reward.reward_loss(torch.tensor([5.0]), torch.tensor([0.0])).item() == pytest.approx(
        math.log(1 + math.exp(-5)))
    assert reward.reward_loss(torch.tensor([0.0]), torch.tensor([5.0])).item() == pytest.approx(
        math.log(1 + math.exp(5)))


def test_hinge_and_center_by_hand():
    r_c, r_r = torch.tensor([2.0, 0.5, -1.0]), torch.zeros(3)
    # max(0, 1 - gap) for gaps 2, 0.5, -1: 0, 0.5, 2 -> mean 5/6
    assert reward.reward_loss(r_c, r_r, loss="hinge").item() == pytest.approx(5 / 6)
    assert reward.reward_loss(r_c, r_r, loss="hinge", hinge_margin=3.0).item() == pytest.approx(
        (1 + 2.5 + 4) / 3)
    # centering adds c * mean((r_c + r_r)^2): here (4 + 0.25 + 1) / 3
    base = reward.reward_loss(r_c, r_r).item()
    assert reward.reward_loss(r_c, r_r, center=0.1).item() == pytest.approx(base + 0.1 * 5.25 / 3)
    with pytest.raises(ValueError):
        reward.reward_loss(r_c, r_r, loss="nope")


def test_loss_gradient_pushes_chosen_up_and_rejected_down():
    r_c, r_r = torch.zeros(4, requires_grad=True), torch.zeros(4, requires_grad=True)
    for kind in ("bt", "hinge"):
        r_c.grad = r_r.grad = None
        reward.reward_loss(r_c, r_r, loss=kind).backward()
        assert (r_c.grad < 0).all() and (r_r.grad > 0).all()


# ---- pooling: the last real token, whatever follows it ----
def test_pooling_reads_the_last_real_token_and_ignores_padding():
    model, tok = tiny_rm(), reward.task_tokenizer(True)
    seqs = [reward.encode_scored(tok, "What is 1 + 2?", "3<|endoftext|>"),
            reward.encode_scored(tok, "Reverse the word: abc", "cba<|endoftext|>"),
            reward.encode_scored(tok, "Count the letter a in: banana", "3")]
    idx, lengths = reward.collate_scored(seqs, tok.special[reward.PAD])
    with torch.no_grad():
        values = model(idx)[0].squeeze(-1)  # (B, T)
        pooled = reward.pooled_rewards(model, idx, lengths)
        assert torch.equal(pooled, values[torch.arange(3), lengths - 1])
        assert idx[0, lengths[0] - 1] == tok.special[reward.EOT]  # the reward sits on the EOT
        # each sequence alone (no padding at all) scores the same
        alone = torch.cat([reward.pooled_rewards(model, torch.tensor([s]), torch.tensor([len(s)]))
                           for s in seqs])
        assert torch.allclose(pooled, alone, atol=1e-5)
        # anything after the end changes nothing: more pads, or EOT ids as padding (pad == eos),
        # or random garbage ids
        for filler in (tok.special[reward.PAD], tok.special[reward.EOT], None):
            extra = (torch.randint(0, 256, (3, 9)) if filler is None
                     else torch.full((3, 9), filler))
            padded = torch.cat((idx, extra), dim=1)
            assert torch.allclose(reward.pooled_rewards(model, padded, lengths), pooled, atol=1e-5)


def test_score_batches_agree_and_too_long_raises():
    model, tok = tiny_rm(), reward.task_tokenizer(True)
    prompts = [f"What is {a} + {b}?" for a, b in itertools.product(range(5), range(3))]
    responses = [f"{a + b}<|endoftext|>" for a, b in itertools.product(range(5), range(3))]
    full = reward.score(model, tok, prompts, responses, "cpu")
    small = reward.score(model, tok, prompts, responses, "cpu", batch_size=4)
    assert full.shape == (15,) and torch.allclose(full, small, atol=1e-5)
    with pytest.raises(ValueError, match="context"):
        reward.score(model, tok, ["x" * 200], ["1<|endoftext|>"], "cpu")


def test_response_logps_against_a_loop_over_each_sequence():
    """Sum of log pi(answer token | everything before it), answer tokens only (the prompt and
    the right padding masked), in any batch size; checked one sequence at a time, unpadded."""
    torch.manual_seed(0)
    policy, tok = reward.Llama(reward.ModelConfig(**TINY)).eval(), reward.task_tokenizer(True)
    prompts = ["What is 3 + 4?", "Reverse the word: abc", "Which is larger: 10 or 7?"] * 2
    responses = ["7<|endoftext|>", "cba<|endoftext|>", "10", "8<|endoftext|>", "c", "107"]
    got = reward.response_logps(policy, tok, prompts, responses, "cpu", batch_size=4)
    for k, (p, r) in enumerate(zip(prompts, responses)):
        ids = reward.encode_scored(tok, p, r)
        start = len(reward.encode_prompt(tok, p))
        with torch.no_grad():
            logp = policy(torch.tensor([ids]))[0][0].log_softmax(-1)
        want = sum(logp[t - 1, ids[t]].item() for t in range(start, len(ids)))
        assert got[k].item() == pytest.approx(want, abs=1e-4), (p, r)
    assert torch.allclose(got, reward.response_logps(policy, tok, prompts, responses, "cpu"),
                          atol=1e-5)


def test_zero_init_head_starts_every_pair_at_ln2():
    model, tok = reward.build_reward_model(dict(TINY)), reward.task_tokenizer(True)
    r = reward.score(model, tok, ["What is 1 + 1?", "Sort the letters: cab"],
                     ["2<|endoftext|>", "abc<|endoftext|>"], "cpu")
    assert torch.equal(r, torch.zeros(2))
    assert all(m.p == 0 for m in model.modules() if isinstance(m, torch.nn.Dropout))


def test_rm_from_sft_starts_as_the_sft_trunk_with_a_new_head():
    torch.manual_seed(0)
    sft_model = reward.Llama(reward.ModelConfig(**TINY))
    rm = reward.rm_from_sft(dict(TINY, n_layer=TINY["n_layer"] + 2), sft_model.state_dict())
    assert torch.equal(rm.lm_head.weight, torch.zeros(1, TINY["n_embd"]))
    torch.nn.init.normal_(rm.lm_head.weight)
    sft_model.lm_head = rm.lm_head  # the same scalar head on the SFT trunk alone
    idx = torch.randint(0, 256, (3, 20))
    with torch.no_grad():  # the two new blocks are the identity at the start
        assert torch.allclose(rm(idx)[0], sft_model(idx)[0], atol=1e-5)


# ---- the pairs ----
def test_synthetic_pairs_reject_only_wrong_answers_and_cover_every_mistake():
    examples = [dict(reward.make_task(f, random.Random(i), lvl), level=lvl)
                for i, (f, lvl) in enumerate(itertools.product(reward.TASK_FAMILIES * 40, (1, 2, 3)))]
    pairs = reward.synthetic_pairs(examples, 2, random.Random(0))
    assert len(pairs) == 2 * len(examples)
    kinds_seen = set()
    for ex, p in zip([e for e in examples for _ in range(2)], pairs):
        assert p["prompt"] == ex["prompt"] and p["task"] == ex["task"]
        assert reward.acceptable(p["chosen"], ex["answer"])
        assert not reward.acceptable(p["rejected"], ex["answer"])
        assert 0 < p["margin"] <= 1
        if reward.EOT not in p["rejected"]:
            kinds_seen.add((ex["task"], "no_eot"))
    assert {t for t, _ in kinds_seen} == set(reward.TASK_FAMILIES)
    # each kind of mistake is wrong whenever it applies
    rng = random.Random(1)
    for ex in examples:
        for kind in reward.MISTAKES[ex["task"]]:
            wrong = reward.make_mistake(kind, ex, rng)
            if kind == "no_eot":
                assert wrong is None
            elif wrong is not None:
                assert wrong != ex["answer"] and not reward.check_answer(wrong, ex["answer"])


def test_margin_by_hand():
    assert reward.pair_margin("85", "85") == pytest.approx(1 / 3)  # right text, never stops
    assert reward.pair_margin("95<|endoftext|>", "85") == pytest.approx(1 / 3)
    assert reward.pair_margin("2<|endoftext|>", "3") == pytest.approx(1 / 2)
    assert reward.pair_margin("3<|endoftext|>", "3") == 0
    assert reward.edit_distance("kitten", "sitting") == 3


def test_policy_pairs_use_the_policy_mistakes():
    ex = {"task": "add", "prompt": "What is 2 + 2?", "answer": "4"}
    samples = [["4<|endoftext|>", "5<|endoftext|>", "5<|endoftext|>", "4"]]
    pairs = reward.policy_pairs([ex], samples, 5, random.Random(0))
    # distinct wrong answers: "5" and "4" without an end token; chosen = the correct sample
    assert [p["rejected"] for p in pairs] == ["5<|endoftext|>", "4"]
    assert all(p["chosen"] == "4<|endoftext|>" and p["source"] == "policy" for p in pairs)
    # no correct sample: the gold answer is chosen; per_prompt caps the pairs
    pairs = reward.policy_pairs([ex], [["7<|endoftext|>", "8<|endoftext|>"]], 1, random.Random(0))
    assert len(pairs) == 1 and pairs[0]["chosen"] == "4<|endoftext|>"


def test_pairs_of_train_and_test_problems_are_disjoint():
    train = reward.make_tasks(120, "train", 3, 2)
    test = reward.make_tasks(60, "test", 4, 2)
    tp = reward.synthetic_pairs(train, 1, random.Random(0))
    vp = reward.synthetic_pairs(test, 1, random.Random(0))
    assert not {p["prompt"] for p in tp} & {p["prompt"] for p in vp}
    assert all(reward.task_split(p["prompt"]) == "train" for p in tp)
    assert all(reward.task_split(p["prompt"]) == "test" for p in vp)


def test_collate_pairs_targets_are_the_chosen_response_shifted():
    tok = reward.task_tokenizer(True)
    pairs = [{"prompt": "What is 12 + 7?", "chosen": "19<|endoftext|>", "rejected": "18",
              "margin": 0.5},
             {"prompt": "Sort the letters: cab", "chosen": "abc<|endoftext|>",
              "rejected": "acb<|endoftext|>", "margin": 0.5}]
    idx, lengths, margins, targets = reward.collate_pairs(reward.encode_pairs(tok, pairs), 257)
    assert idx.shape[0] == 4 and targets.shape == (2, idx.size(1))
    for i, p in enumerate(pairs):
        n = len(reward.encode_prompt(tok, p["prompt"]))
        kept = targets[i] != reward.IGNORE_INDEX
        # the answer and its <|endoftext|>, predicted from the position before each
        assert tok.decode(targets[i][kept].tolist()) == p["chosen"]
        assert kept.nonzero().min() == n - 1 and kept.nonzero().max() == lengths[i] - 2
    assert lengths[3] == lengths[1] and lengths[2] == lengths[0] - 1  # "18": no end token


# ---- metrics ----
def test_auc_and_pearson_against_brute_force():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 6, 200).astype(float)  # many ties
    labels = rng.random(200) < 0.4
    pos, neg = scores[labels], scores[~labels]
    brute = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert reward.auc(torch.tensor(scores), torch.tensor(labels)) == pytest.approx(brute)
    assert reward.auc(torch.tensor([1.0, 2.0]), torch.tensor([True, True])) is None
    x, y = rng.normal(size=50), rng.normal(size=50)
    assert reward.pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1])
    assert reward.pearson([1, 1, 1], [1, 2, 3]) == 0.0


def test_best_of_n_maj_and_pass_by_hand():
    examples = [{"task": "add", "prompt": "What is 2 + 2?", "answer": "4"},
                {"task": "count", "prompt": "Count the letter a in: aa", "answer": "2"}]
    samples = [["5<|endoftext|>", "4<|endoftext|>", "5<|endoftext|>", "4<|endoftext|>"],
               ["1<|endoftext|>", "1<|endoftext|>", "2<|endoftext|>", "3<|endoftext|>"]]
    rewards = torch.tensor([[0.0, 1.0, 0.5, 0.2], [0.0, 0.1, 0.9, 0.3]])
    out = reward.best_of_n(examples, samples, rewards, [1, 2, 4])
    assert out["best_of_n"][1]["by_task"] == {"add": 0.0, "count": 0.0}
    assert out["best_of_n"][2]["by_task"] == {"add": 1.0, "count": 0.0}
    assert out["best_of_n"][4]["mean"] == 1.0
    assert out["maj_at_n"][4]["by_task"] == {"add": 0.0, "count": 0.0}  # 5 first of a 2-2 tie; 1
    assert out["pass_at_n"][2]["by_task"] == {"add": 1.0, "count": 0.0}
    assert out["pass_at_n"][4]["mean"] == 1.0


def test_print_report_rows_and_missing_values(capsys):
    """One row per metric and per n, a column per family with pairs; a family without an AUC
    (no right or no wrong sample) shows '-', as does a missing pooled AUC."""
    best = {"mean": 0.5, "by_task": {"add": 1.0, "count": 0.0}}
    m = {"pairs": {"all": 0.75, "by_task": {"add": 1.0, "count": 0.5},
                   "by_source": {"synthetic": 0.75}, "counts": {"synthetic": 4}},
         "auc": None, "auc_by_task": {"add": 0.9, "count": None},
         "length_corr": 0.3, "length_corr_by_task": {"add": 0.3, "count": -0.1},
         "length_corr_checker_by_task": {"add": 0.2, "count": 0.0},
         "pad_invariance": 1e-7, "reward_mean": 0.1, "reward_std": 0.2,
         "best": {"best_of_n": {1: best, 4: best}, "maj_at_n": {4: best}, "pass_at_n": {4: best}}}
    reward.print_report(m, {"accuracy": 0.5, "accuracy_by_task": {"add": 1.0, "count": 0.0}})
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["add", "count", "all"]
    assert lines[1] == f"{'pair accuracy':<18}{1:>9.3f}{0.5:>9.3f}{0.75:>9.3f}"
    assert lines[2] == f"{'AUC (policy)':<18}{0.9:>9.3f}{'-':>9}{'-':>9}"
    assert lines[3].endswith("0.300 (max |r|)") and lines[4].startswith("  of the checker")
    assert [line[:18].strip() for line in lines[5:10]] == ["greedy SFT", "best-of-1", "best-of-4",
                                                           "maj@4", "pass@4"]
    assert lines[10].startswith("pair accuracy by source: synthetic 0.750 (n=4)")


def test_tiny_overfit_ranks_the_training_pairs():
    tok, model = reward.task_tokenizer(True), reward.build_reward_model(dict(TINY))
    pairs = reward.synthetic_pairs(reward.make_tasks(12, "train", 0, 1), 1, random.Random(0))
    idx, lengths, _, _ = reward.collate_pairs(reward.encode_pairs(tok, pairs), tok.special[reward.PAD])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(80):
        r_c, r_r = reward.pair_rewards(model, idx, lengths, torch.autocast("cpu", enabled=False))
        loss = reward.reward_loss(r_c, r_r)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)
    assert losses[-1] < 0.1 and (r_c > r_r).all()


# ---- main ----
FLAGS = ["--n-train", "60", "--batch-size", "8", "--eval-iters", "1", "--best-of", "1,2",
         "--eval-max-new-tokens", "4", "--warmup-iters", "1", "--eval-interval", "2",
         "--policy-samples", "2", "--device", "cpu", "--learning-rate", "1e-3"]


def losses_of(out_dir):
    return [r["loss"] for r in map(json.loads, (out_dir / "log.jsonl").read_text().splitlines())
            if "loss" in r]


def strict_records(path):
    def refuse(x):
        raise ValueError(f"non-finite number {x} in {path}")
    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def test_main_end_to_end_resume_determinism_and_score_only(tmp_path):
    sft_path = write_sft_checkpoint(tmp_path / "sft" / "ckpt.pt")
    flags = FLAGS + ["--init-from", str(sft_path)]
    full = tmp_path / "full"
    done = reward.main(flags + ["--max-iters", "4", "--out-dir", str(full)])
    assert done["best_iter"] == 4  # the kept model is the last: no validation split to choose
    for key in ("accuracy", "accuracy_by_task", "format_rate", "wall_s", "pair_accuracy", "auc",
                "length_corr", "best_of_n", "maj_at_n", "pass_at_n", "greedy_accuracy",
                "pad_invariance", "reward_mean", "reward_std"):
        assert key in done, key
    assert set(done["accuracy_by_task"]) == set(reward.TASK_FAMILIES)
    assert done["pad_invariance"] < 1e-5
    assert set(done["length_corr_checker_by_task"]) == set(done["length_corr_by_task"])
    assert all(-1 <= c <= 1 for c in done["length_corr_checker_by_task"].values())
    records = strict_records(full / "log.jsonl")
    assert records[-1]["event"] == "done" and set(records[-1]["best_of_n"]) == {"1", "2"}
    ckpt = torch.load(full / "ckpt.pt", weights_only=True)
    assert ckpt["script"] == "reward.py" and ckpt["model"]["lm_head.weight"].shape == (1, 32)
    assert set(ckpt["reward_stats"]) == {"mean", "std"} and ckpt["task_world"]["n_test"] == 24
    # same seed -> same losses; stop at 2 and resume to 4 -> the same losses, bit for bit
    again = tmp_path / "again"
    reward.main(flags + ["--max-iters", "4", "--out-dir", str(again)])
    assert losses_of(again) == losses_of(full)
    part = tmp_path / "part"
    reward.main(flags + ["--max-iters", "2", "--out-dir", str(part)])
    reward.main(flags + ["--max-iters", "4", "--out-dir", str(part), "--resume"])
    assert losses_of(part) == losses_of(full)
    iters = [r["iter"] for r in strict_records(part / "log.jsonl") if "loss" in r]
    assert iters == sorted(set(iters))  # the resumed log holds each iteration once
    out = reward.main(["--score-only", "--out-dir", str(full), "--prompt", "What is 1 + 1?",
                       "--response", "2<|endoftext|>"])
    assert math.isfinite(out["reward"])


def test_held_out_pairs_and_samples_do_not_follow_the_seed(tmp_path, monkeypatch):
    """--seed draws other training pairs; the held-out pairs and samples come from the SFT
    run's seed, so runs with different seeds are scored on the same ones."""
    sft_path = write_sft_checkpoint(tmp_path / "sft.pt")
    built = []

    def recording(cfg, policy, tok, examples, n_policy, k, device, ctx, seed):
        pairs, samples = build_pairs(cfg, policy, tok, examples, n_policy, k, device, ctx, seed)
        built.append((pairs, samples))
        return pairs, samples

    build_pairs = reward.build_pairs
    monkeypatch.setattr(reward, "build_pairs", recording)
    for seed in ("1", "5"):
        reward.main(FLAGS + ["--init-from", str(sft_path), "--max-iters", "1", "--seed", seed,
                             "--out-dir", str(tmp_path / seed)])
    (train_a, _), (test_a, samples_a), (train_b, _), (test_b, samples_b) = built  # per run:
    # the training pairs first, then the held-out ones
    assert train_a != train_b
    assert test_a == test_b and samples_a == samples_b


def test_lora_and_hinge_run(tmp_path):
    sft_path = write_sft_checkpoint(tmp_path / "sft.pt")
    done = reward.main(FLAGS + ["--init-from", str(sft_path), "--max-iters", "2", "--lora-rank",
                                "2", "--loss", "hinge", "--pairs", "synthetic", "--plot",
                                "--lm-weight", "0.5", "--bon-beta", "0.5",
                                "--out-dir", str(tmp_path / "o")])
    # regularized best-of-n: with one sample there is nothing to choose, so it is best-of-1
    reg = done["best_of_n_reg"]
    assert set(reg) == {1, 2} and reg[1] == done["best_of_n"][1] and 0 <= reg[2] <= 1
    assert done["bon_beta"] == 0.5
    ckpt = torch.load(tmp_path / "o" / "ckpt.pt", weights_only=True)
    # the SFT trunk's 2 blocks + the 2 --extra-layers blocks, adapters merged: plain Llama keys
    rm_args = dict(TINY, n_layer=TINY["n_layer"] + 2)
    assert ckpt["model_args"]["n_layer"] == 4
    assert set(ckpt["model"]) == set(reward.build_reward_model(rm_args).state_dict())
    assert done["n_train_pairs"] == {"synthetic": 60}
    pytest.importorskip("matplotlib")  # the README's test command installs it
    for name in ("reward_hist.png", "best_of_n.png"):
        assert_png(tmp_path / "o" / name)


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        reward.main(["--help"])
    assert e.value.code == 0 and "--best-of" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    ([], "run python sft.py first"),
    (["--learning-rate", "nan"], "--learning-rate nan: expected a finite number"),
    (["--learning-rate", "-1"], "--learning-rate -1.0: expected"),
    (["--loss", "mse"], "--loss mse: expected one of bt, hinge"),
    (["--pairs", "all"], "--pairs all: expected one of"),
    (["--batch-size", "0"], "--batch-size 0: expected"),
    (["--best-of", "4,x"], "--best-of 4,x: expected"),
    (["--min-lr", "1"], "--min-lr"),
])
def test_mistakes_exit_2_with_one_line_and_write_nothing(tmp_path, capsys, extra, message):
    out = tmp_path / "o"
    with pytest.raises(SystemExit) as e:
        reward.main(["--init-from", str(tmp_path / "missing.pt"), "--out-dir", str(out)] + extra)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and err.count("\n") == 1
    assert not out.exists()


def test_foreign_checkpoint_exits_2(tmp_path, capsys):
    foreign = tmp_path / "gpt.pt"
    reward.save_checkpoint({"script": "gpt.py", "model": {}}, foreign)
    partial = tmp_path / "partial.pt"
    reward.save_checkpoint({"script": "sft.py", "model": {}}, partial)
    for path, message in ((foreign, "written by gpt.py"), (partial, "has no 'model_args'")):
        with pytest.raises(SystemExit) as e:
            reward.main(["--init-from", str(path), "--out-dir", str(tmp_path / "o")])
        assert e.value.code == 2 and message in capsys.readouterr().err
