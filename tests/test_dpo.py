"""Tests for dpo.py: the losses by hand, sequence log-probs, the frozen reference, the pairs, main.

Run: python -m pytest -q tests/test_dpo.py --durations=5
"""
import dataclasses
import json
import math
import random
import types

import pytest
import torch
import torch.nn.functional as F

import dpo
from conftest import assert_png

TINY = dict(vocab_size=320, block_size=96, n_layer=2, n_head=2, n_embd=32, n_kv_head=1)
IGN = dpo.IGNORE_INDEX


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run faster on one thread (no OpenMP hand-offs), above all on a busy CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    return dpo.Llama(dpo.ModelConfig(**TINY))


def write_sft_checkpoint(path, n_test=24, difficulty=1, seed=1):
    """A tiny sft.py-format checkpoint (random weights): what dpo.py reads from sft.py."""
    tok = dpo.task_tokenizer(True)
    model = tiny_llama()
    dpo.save_checkpoint({"script": "sft.py", "version": 1, "iter": 0,
                         "model_args": dataclasses.asdict(dpo.ModelConfig(**TINY)),
                         "model": model.state_dict(),
                         "config": {"seed": seed, "difficulty": difficulty, "n_test": n_test,
                                    "task": "generate"},
                         "tokenizer": {"kind": "byte", "special": dict(tok.special)},
                         "optimizer": {}, "rng": {}, "best_val_loss": 0.0}, path)
    return path


def pairs_batch(tok, n=6, seed=0):
    """A collated batch of n synthetic pairs of the task world (idx, targets (2n, T))."""
    pairs = dpo.synthetic_pairs(dpo.make_tasks(n, "train", seed, 1), 1, random.Random(seed))
    kept, enc = dpo.encode_pairs(tok, pairs, TINY["block_size"])
    assert len(kept) == n
    return kept, enc, dpo.collate_pairs(enc, tok.special[dpo.PAD])


# ---- the losses, against values worked out by hand ----
def test_dpo_loss_by_hand_for_each_loss_type():
    # pair 0: log-ratios +1 (chosen) and -1 (rejected) -> logits 2; pair 1: the reverse, -2
    pc, pr = torch.tensor([-1.0, -3.0]), torch.tensor([-3.0, -1.0])
    rc, rr = torch.tensor([-2.0, -2.0]), torch.tensor([-2.0, -2.0])
    sp = lambda x: math.log1p(math.exp(x))  # noqa: E731  softplus: -log sigmoid(-x)
    losses, cr, rj = dpo.dpo_loss(pc, pr, rc, rr, beta=0.5)
    assert losses.tolist() == pytest.approx([sp(-1.0), sp(1.0)])  # -log sigmoid(+-0.5 * 2)
    assert cr.tolist() == pytest.approx([0.5, -0.5]) and rj.tolist() == pytest.approx([-0.5, 0.5])
    # cDPO: -(1 - eps) log sigmoid(b z) - eps log sigmoid(-b z), eps = 0.2
    losses, _, _ = dpo.dpo_loss(pc, pr, rc, rr, beta=0.5, label_smoothing=0.2)
    assert losses.tolist() == pytest.approx([0.8 * sp(-1) + 0.2 * sp(1), 0.8 * sp(1) + 0.2 * sp(-1)])
    # ipo: (z - 1/(2b))^2: b = 0.5 -> target 1: (2 - 1)^2, (-2 - 1)^2; b = 0.25 -> target 2
    losses, _, _ = dpo.dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type="ipo")
    assert losses.tolist() == pytest.approx([1.0, 9.0])
    losses, _, _ = dpo.dpo_loss(pc, pr, rc, rr, beta=0.25, loss_type="ipo")
    assert losses.tolist() == pytest.approx([0.0, 16.0])
    # hinge: max(0, 1 - b z): b = 0.5 -> 0 and 2; b = 0.1 -> 0.8 and 1.2
    losses, _, _ = dpo.dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type="hinge")
    assert losses.tolist() == pytest.approx([0.0, 2.0])
    losses, _, _ = dpo.dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="hinge")
    assert losses.tolist() == pytest.approx([0.8, 1.2])
    with pytest.raises(ValueError):
        dpo.dpo_loss(pc, pr, rc, rr, loss_type="kto")


def test_policy_equal_to_reference_is_ln2_and_rewards_zero():
    lp = torch.tensor([-4.2, -0.3, -17.0])
    for ls in (0.0, 0.1):  # label smoothing or not: sigmoid(0) = 1/2 either way
        losses, cr, rj = dpo.dpo_loss(lp, lp.flip(0), lp, lp.flip(0), beta=0.1,
                                      label_smoothing=ls)
        assert torch.equal(losses, torch.full((3,), math.log(2), dtype=torch.float32))
        assert torch.equal(cr, torch.zeros(3)) and torch.equal(rj, torch.zeros(3))
    # rewards/accuracies is strict: ties are not wins
    _, stats = dpo.dpo_objective(torch.cat((lp, lp)), torch.cat((lp, lp)), torch.ones(6),
                                 "sigmoid", 0.1, 0.0, 0.0)
    assert dpo.preference_metrics(stats)["rewards/accuracies"] == 0.0


def test_loss_gradients_raise_chosen_and_lower_rejected():
    for kind in ("sigmoid", "ipo", "hinge"):
        pc, pr = torch.zeros(4, requires_grad=True), torch.zeros(4, requires_grad=True)
        losses, _, _ = dpo.dpo_loss(pc, pr, torch.zeros(4), torch.zeros(4), loss_type=kind)
        losses.sum().backward()
        assert (pc.grad < 0).all() and (pr.grad > 0).all(), kind
        # sigmoid: d/dpc of -log sigmoid(b z) at z = 0 is -b/2
        if kind == "sigmoid":
            assert pc.grad.tolist() == pytest.approx([-0.05] * 4)


def test_ipo_compares_per_token_means_and_rpo_adds_the_chosen_nll():
    # chosen: 2 tokens, sum -2 (ref -4); rejected: 4 tokens, sum -8 (ref -4)
    logps, ref = torch.tensor([-2.0, -8.0]), torch.tensor([-4.0, -4.0])
    n = torch.tensor([2.0, 4.0])
    loss, stats = dpo.dpo_objective(logps, ref, n, "ipo", 0.5, 0.0, 0.0)
    # means: chosen -1 vs ref -2 (+1), rejected -2 vs ref -1 (-1): z = 2, (2 - 1)^2 = 1
    assert loss.item() == pytest.approx(1.0)
    assert stats["chosen_logps"].tolist() == [-1.0]
    assert stats["rejected_logps"].tolist() == [-2.0]
    loss_sum, _ = dpo.dpo_objective(logps, ref, n, "sigmoid", 0.5, 0.0, 0.0)
    # sums: chosen +2, rejected -4: z = 6, -log sigmoid(0.5 * 6)
    assert loss_sum.item() == pytest.approx(math.log1p(math.exp(-3.0)))
    # rpo: + alpha * (2 / 2) (the chosen response's NLL per token), whatever the loss type
    for kind in ("sigmoid", "ipo"):
        base, _ = dpo.dpo_objective(logps, ref, n, kind, 0.5, 0.0, 0.0)
        with_nll, _ = dpo.dpo_objective(logps, ref, n, kind, 0.5, 0.0, 0.3)
        assert with_nll.item() == pytest.approx(base.item() + 0.3 * 1.0)


# ---- sequence log-probs ----
def test_sequence_logps_against_a_loop_with_garbage_at_masked_positions():
    torch.manual_seed(0)
    B, T, V = 3, 7, 11
    logits = torch.randn(B, T, V)
    targets = torch.randint(0, V, (B, T))
    targets[0, :3] = IGN  # a prompt
    targets[1, 5:] = IGN  # padding
    targets[2, :] = IGN  # nothing to score
    masked = targets == IGN
    garbage = logits.clone()
    garbage[masked] = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30] * 3)[:V]
    got, n = dpo.sequence_logps(garbage, targets)
    for b in range(B):
        want = sum(F.log_softmax(logits[b, t], -1)[targets[b, t]].item()
                   for t in range(T) if targets[b, t] != IGN)
        assert got[b].item() == pytest.approx(want, abs=1e-5)
        assert n[b].item() == (targets[b] != IGN).sum().item()
    assert torch.isfinite(got).all() and got[2].item() == 0.0
    # the gradient reaches only scored positions and is finite (large finite garbage elsewhere)
    leaf = logits.clone()
    leaf[masked] = 1e4
    leaf.requires_grad_(True)
    dpo.sequence_logps(leaf, targets)[0].sum().backward()
    assert torch.isfinite(leaf.grad).all() and (leaf.grad[masked] == 0).all()


def test_encoding_masks_the_prompt_keeps_eot_and_adds_none_to_no_eot():
    tok = dpo.task_tokenizer(True)
    eot, prompt = tok.special[dpo.EOT], dpo.encode_prompt(tok, "What is 2 + 2?")
    ids, tgt = dpo.encode_response(tok, "What is 2 + 2?", "4<|endoftext|>")
    assert ids == prompt + [ord("4")] and len(tgt) == len(ids)
    assert tgt == [IGN] * (len(prompt) - 1) + [ord("4"), eot]  # shifted: the answer, then EOT
    ids, tgt = dpo.encode_response(tok, "What is 2 + 2?", "44")  # never stopped: no EOT added
    assert tgt[-2:] == [ord("4"), ord("4")] and eot not in tgt and eot not in ids
    # a side without any response token, or one too long for the context, drops the pair
    p = {"prompt": "What is 2 + 2?", "chosen": "4<|endoftext|>", "rejected": ""}
    assert dpo.encode_pairs(tok, [p], 96) == ([], [])
    assert dpo.encode_pairs(tok, [dict(p, rejected="5" * 90)], 96) == ([], [])
    assert len(dpo.encode_pairs(tok, [dict(p, rejected="5")], 96)[0]) == 1


def test_padding_changes_no_sequence_logp():
    tok, model = dpo.task_tokenizer(True), tiny_llama().eval()
    _, enc, (idx, tgt, lengths) = pairs_batch(tok)
    assert idx.shape[0] == 12 and lengths.tolist() == [len(s[0]) for s in
                                                       [p[0] for p in enc] + [p[1] for p in enc]]
    with torch.no_grad():
        batched, _ = dpo.sequence_logps(model(idx)[0], tgt)
        rows = [side for pair in enc for side in pair]
        rows = rows[0::2] + rows[1::2]  # chosen rows, then rejected rows, as collate_pairs
        alone = torch.cat([dpo.sequence_logps(model(torch.tensor([ids]))[0],
                                              torch.tensor([t]))[0] for ids, t in rows])
    assert torch.allclose(batched, alone, atol=1e-5)


# ---- the reference ----
def test_reference_is_a_frozen_separate_copy_and_the_first_loss_is_ln2():
    tok, policy = dpo.task_tokenizer(True), tiny_llama()
    for lora in (False, True):
        if lora:
            dpo.apply_lora(policy, 2, 4.0)
        ref = dpo.frozen_copy(policy)
        assert ref is not policy and not ref.training
        assert all(not p.requires_grad for p in ref.parameters())
        assert not {id(p) for p in ref.parameters()} & {id(p) for p in policy.parameters()}
        assert not any(isinstance(m, dpo.LoRALinear) for m in ref.modules())  # merged
        _, enc, (idx, tgt, _) = pairs_batch(tok)
        ref_lp = dpo.reference_logps(ref, enc, 4, tok.special[dpo.PAD], "cpu",
                                     torch.autocast("cpu", enabled=False))
        assert ref_lp.shape == (6, 2)
        before = [p.clone() for p in ref.parameters()]
        opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
        logps, n = dpo.sequence_logps(policy(idx)[0], tgt)
        loss, _ = dpo.dpo_objective(logps, ref_lp.T.reshape(-1), n, "sigmoid", 0.1, 0.0, 0.0)
        assert loss.item() == pytest.approx(math.log(2), abs=1e-6)  # policy == reference
        loss.backward()
        opt.step()
        assert all(p.grad is None for p in ref.parameters())
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.parameters())
        assert all(torch.equal(a, b) for a, b in zip(before, ref.parameters()))
        with torch.no_grad():  # the policy moved, the reference did not
            assert not torch.allclose(policy(idx)[0], ref(idx)[0])


def test_tiny_dpo_overfit_separates_the_pairs():
    tok, policy = dpo.task_tokenizer(True), tiny_llama()
    ref = dpo.frozen_copy(policy)
    _, enc, (idx, tgt, _) = pairs_batch(tok, n=12)
    ref_lp = dpo.reference_logps(ref, enc, 64, tok.special[dpo.PAD], "cpu",
                                 torch.autocast("cpu", enabled=False)).T.reshape(-1)
    opt = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        logps, n = dpo.sequence_logps(policy(idx)[0], tgt)
        loss, stats = dpo.dpo_objective(logps, ref_lp, n, "sigmoid", 0.5, 0.0, 0.0)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)
    assert losses[-1] < 0.2 and dpo.preference_metrics(stats)["rewards/accuracies"] == 1.0
    # evaluate_pairs' split by the outcome of the policy's answer to each pair's problem: the
    # counts follow `solved`; every pair is won by the policy, and lost with the roles swapped
    pairs, pad, off = pairs_batch(tok, n=12)[0], tok.special[dpo.PAD], torch.no_grad()
    solved = {p["prompt"]: i < 5 for i, p in enumerate(pairs)}
    kw = {"loss_type": "sigmoid", "beta": 0.5, "label_smoothing": 0.0, "rpo_alpha": 0.0}
    for model, other, acc in ((policy, ref, 1.0), (ref, policy, 0.0)):
        other_lp = dpo.reference_logps(other, enc, 4, pad, "cpu", off)
        out = dpo.evaluate_pairs(model, enc, other_lp, 12, 4, pad, "cpu", off, kw, pairs, solved)
        assert out["n_pairs_by_outcome"] == {"right": 5, "wrong": 7}
        assert out["pref_accuracy_by_outcome"] == {"right": acc, "wrong": acc}


def test_reference_logps_counts_and_training_pairs():
    """reference_logps(counts=True), the loop evaluate_pairs scores the policy with, also returns
    each side's response tokens; training_pairs, the one path of round 0 and of every online
    round, samples with --seed + 100 * round, or re-encodes a checkpoint's pairs as given, and
    scores them as reference_logps does."""
    tok, model = dpo.task_tokenizer(True), tiny_llama().eval()
    pairs, enc, _ = pairs_batch(tok)
    pad, off = tok.special[dpo.PAD], torch.no_grad()
    lp, n = dpo.reference_logps(model, enc, 4, pad, "cpu", off, counts=True)
    assert torch.equal(lp, dpo.reference_logps(model, enc, 4, pad, "cpu", off))
    want = [[sum(t != IGN for t in targets) for _, targets in pair] for pair in enc]
    assert n.tolist() == want and lp.shape == n.shape == (6, 2)
    examples = dpo.make_tasks(12, "train", 0, 1)
    cfg = dataclasses.replace(dpo.Config(), eval_batch_size=16, eval_max_new_tokens=6)
    run = types.SimpleNamespace(tok=tok, block_size=TINY["block_size"], pad_id=pad, device="cpu",
                                ctx=off, train_ex=examples, n_policy=6)
    got_pairs, got_enc, got_ref = dpo.training_pairs(cfg, run, model, model, 0, pairs)
    assert got_pairs == pairs and got_enc == enc and torch.equal(got_ref, lp)
    got_pairs, got_enc, got_ref = dpo.training_pairs(cfg, run, model, model, 2)
    assert (got_pairs, got_enc) == dpo.pair_set(cfg, model, tok, examples, 6, "cpu", off,
                                                cfg.seed + 200, TINY["block_size"])
    assert torch.equal(got_ref, dpo.reference_logps(model, got_enc, 16, pad, "cpu", off))
    assert {p["source"] for p in got_pairs} == {"synthetic", "policy"}


# ---- main ----
FLAGS = ["--n-train", "48", "--n-policy", "24", "--batch-size", "8", "--eval-iters", "1",
         "--eval-max-new-tokens", "4", "--warmup-iters", "1", "--eval-interval", "2",
         "--policy-samples", "2", "--device", "cpu", "--learning-rate", "1e-3",
         "--eval-batch-size", "64"]


def strict_records(path):
    def refuse(x):
        raise ValueError(f"non-finite number {x} in {path}")
    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def losses_of(out_dir):
    return [r["loss"] for r in strict_records(out_dir / "log.jsonl") if "loss" in r]


class Interrupted(Exception):
    pass


def test_main_rounds_determinism_and_resume_across_a_round(tmp_path, monkeypatch):
    sft_path = write_sft_checkpoint(tmp_path / "sft" / "ckpt.pt")
    # --rpo-alpha 0: plain DPO, whose first loss is exactly ln 2 (the default adds the NLL)
    flags = FLAGS + ["--init-from", str(sft_path), "--max-iters", "4", "--rounds", "2",
                     "--ref-update", "--rpo-alpha", "0"]
    full = tmp_path / "full"
    done = dpo.main(flags + ["--out-dir", str(full)])
    assert done["best_iter"] == 4  # the kept model is the last: no validation split to choose
    for key in ("accuracy", "accuracy_by_task", "format_rate", "wall_s", "pref_accuracy",
                "accuracy_before", "accuracy_by_task_before", "rewards/chosen", "rewards/rejected",
                "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert key in done, key
    assert set(done["accuracy_by_task"]) == set(done["accuracy_by_task_before"]) == \
        set(dpo.TASK_FAMILIES)
    records = strict_records(full / "log.jsonl")
    assert records[-1]["event"] == "done"
    train = [r for r in records if "loss" in r]
    assert [r["iter"] for r in train] == [0, 1, 2, 3]
    assert train[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference
    assert train[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    rounds = [r for r in records if r.get("event") == "round"]
    assert [(r["iter"], r["round"]) for r in rounds] == [(2, 1)]
    # --ref-update: the reference became the policy at step 2, so step 2 is again a coin flip
    assert train[2]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    evals = [r for r in records if "val_loss" in r and "event" not in r]
    assert [r["iter"] for r in evals] == [0, 2, 4]
    # held-out pairs are scored in the chunks their reference log-probs were: exact ties at 0
    assert evals[0]["pref_accuracy"] == 0.0 and evals[0]["rewards/margins"] == 0.0
    assert evals[0]["val_loss"] == pytest.approx(math.log(2), abs=1e-7)
    ckpt = torch.load(full / "ckpt.pt", weights_only=True)
    assert ckpt["script"] == "dpo.py" and ckpt["round"] == 1 and "reference" in ckpt
    assert set(ckpt["model"]) == set(tiny_llama().state_dict())  # plain Llama: sft.py format
    for key in ("model_args", "config", "tokenizer", "optimizer", "iter", "best_val_loss", "rng",
                "sft_from"):
        assert key in ckpt, key
    assert ckpt["model_args"]["dropout"] == 0.0 and ckpt["task_world"]["n_test"] == 24
    # same seed -> same losses
    again = tmp_path / "again"
    dpo.main(flags + ["--out-dir", str(again)])
    assert losses_of(again) == losses_of(full)
    # killed right after the checkpoint of step 2 (round 2's pairs, moved reference): --resume
    # continues bit for bit, and the log holds each record once
    part = tmp_path / "part"
    save = dpo.save_checkpoint

    def save_then_die(ckpt, path):
        save(ckpt, path)
        if ckpt["iter"] == 2:
            raise Interrupted

    monkeypatch.setattr(dpo, "save_checkpoint", save_then_die)
    with pytest.raises(Interrupted):
        dpo.main(flags + ["--out-dir", str(part)])
    monkeypatch.setattr(dpo, "save_checkpoint", save)
    resumed = dpo.main(flags + ["--out-dir", str(part), "--resume"])
    assert losses_of(part) == losses_of(full)
    assert resumed["accuracy"] == done["accuracy"] and resumed["val_loss"] == done["val_loss"]
    kinds = [(r.get("event"), r["iter"], "loss" in r) for r in strict_records(part / "log.jsonl")]
    assert len(kinds) == len(set(kinds)) == len(records)
    # --sample-only answers with the saved policy
    out = dpo.main(["--sample-only", "--out-dir", str(full), "--max-new-tokens", "3"])
    assert len(out["samples"]) == 1


def test_offline_lora_ipo_synthetic_and_plot(tmp_path):
    sft_path = write_sft_checkpoint(tmp_path / "sft.pt")
    out = tmp_path / "o"
    done = dpo.main(FLAGS + ["--init-from", str(sft_path), "--max-iters", "2", "--rounds", "1",
                             "--lora-rank", "2", "--loss-type", "ipo", "--pairs", "synthetic",
                             "--mix", "add=0,sub=0,reverse=0,sort=0,compare=2", "--plot",
                             "--out-dir", str(out)])
    assert done["n_train_pairs"] == {"synthetic": 48}
    # held-out preference accuracy per family and per source: the held-out pairs cover every
    # family and both sources (--mix and --pairs shape the training pairs only), and the mean
    # lies among the parts
    by_task, by_source = done["pref_accuracy_by_task"], done["pref_accuracy_by_source"]
    assert set(by_task) == set(dpo.TASK_FAMILIES) and set(by_source) == {"synthetic", "policy"}
    for parts in (by_task, by_source):
        assert min(parts.values()) <= done["pref_accuracy"] <= max(parts.values())
    # per outcome of the policy's greedy answer: this random-weight policy answers nothing
    # right, so every held-out pair is on a problem it gets wrong
    assert done["accuracy"] == 0
    assert done["pref_accuracy_by_outcome"] == {"wrong": pytest.approx(done["pref_accuracy"])}
    assert done["n_pairs_by_outcome"] == {"wrong": done["n_test_pairs"]}
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    # --mix: compare twice, count once, the others not at all
    tasks = [p["task"] for p in ckpt["pairs"]]
    assert set(tasks) == {"compare", "count"} and tasks.count("compare") == 32
    assert set(ckpt["model"]) == set(tiny_llama().state_dict())  # adapters merged
    assert 0 < done["trainable_params"] < sum(p.numel() for p in tiny_llama().parameters())
    pytest.importorskip("matplotlib")  # the README's test command installs it
    assert_png(out / "dpo.png")


def test_heldout_pairs_ignore_the_training_flags():
    """Every run from one SFT checkpoint scores the same held-out pairs: the recipe is
    HELDOUT_PAIRS and the seed the SFT run's, whatever --pairs, the sampling flags or --seed
    say (the sweeps in the README compare preference accuracy across them)."""
    tok, model = dpo.task_tokenizer(True), tiny_llama().eval()
    examples = dpo.make_tasks(24, "test", 2, 1)
    ctx = torch.no_grad()

    def held_out(**flags):
        cfg = dataclasses.replace(dpo.Config(), **flags)
        return dpo.heldout_pairs(cfg, model, tok, examples, 1, "cpu", ctx, TINY["block_size"])

    pairs, encoded = held_out()
    assert {p["source"] for p in pairs} == {"synthetic", "policy"}
    assert sum(p["source"] == "synthetic" for p in pairs) == len(examples)
    # shuffled once: the prefix scored during training is not the first families' pairs
    head = pairs[:len(pairs) // 3]
    assert {p["source"] for p in head} == {"synthetic", "policy"}
    assert len({p["task"] for p in head}) >= 4
    for flags in ({"pairs": "synthetic"}, {"pairs": "policy", "policy_samples": 8},
                  {"synthetic_per_prompt": 3, "policy_pairs_per_prompt": 1},
                  {"policy_temperature": 0.5, "seed": 7}):
        assert held_out(**flags) == (pairs, encoded), flags
    assert dpo.heldout_pairs(dpo.Config(), model, tok, examples, 2, "cpu", ctx,
                             TINY["block_size"])[0] != pairs  # another SFT seed, other pairs


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        dpo.main(["--help"])
    assert e.value.code == 0 and "--label-smoothing" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    ([], "not found: run python sft.py first"),
    (["--beta", "nan"], "--beta nan: expected a finite number"),
    (["--beta", "-1"], "--beta -1.0: expected a number > 0"),
    (["--learning-rate", "nan"], "--learning-rate nan: expected a finite number"),
    (["--label-smoothing", "0.5"], "--label-smoothing 0.5: expected"),
    (["--label-smoothing", "0.1", "--loss-type", "ipo"], "applies to --loss-type sigmoid only"),
    (["--loss-type", "kto"], "--loss-type kto: expected one of sigmoid, ipo, hinge"),
    (["--rounds", "0"], "--rounds 0: expected"),
    (["--rounds", "3", "--pairs", "synthetic"], "online rounds resample on-policy pairs"),
    (["--rounds", "5", "--max-iters", "4"], "--rounds 5: expected at most --max-iters 4"),
    (["--batch-size", "-1"], "--batch-size -1: expected"),
    (["--min-lr", "1"], "--min-lr"),
    (["--max-iters", "x"], "--max-iters"),
])
def test_mistakes_exit_2_with_one_line_and_write_nothing(tmp_path, capsys, extra, message):
    out = tmp_path / "o"
    with pytest.raises(SystemExit) as e:
        dpo.main(["--init-from", str(tmp_path / "missing.pt"), "--out-dir", str(out)] + extra)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and err.count("\n") == 1, err
    assert err.startswith("error: ") and not out.exists()


def test_foreign_checkpoint_and_existing_run_exit_2(tmp_path, capsys):
    foreign = tmp_path / "gpt.pt"
    dpo.save_checkpoint({"script": "gpt.py", "model": {}}, foreign)
    partial = tmp_path / "partial.pt"
    dpo.save_checkpoint({"script": "sft.py", "model": {}}, partial)
    for path, message in ((foreign, "written by gpt.py"), (partial, "has no 'model_args'")):
        with pytest.raises(SystemExit) as e:
            dpo.main(["--init-from", str(path), "--out-dir", str(tmp_path / "o")])
        assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "ckpt.pt").write_bytes(b"keep me")
    with pytest.raises(SystemExit) as e:
        dpo.main(["--init-from", str(foreign), "--out-dir", str(tmp_path / "run")])
    assert e.value.code == 2 and "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "run" / "ckpt.pt").read_bytes() == b"keep me"
