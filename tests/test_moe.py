"""Tests of moe.py: routing, sorted dispatch vs a per-token loop, balancing, capacity, MLA,
the kept model (the best evaluation's) and --resume.

Run: python -m pytest -q tests/test_moe.py --durations=5
"""
import json
import math

import pytest
import torch

import moe
from conftest import assert_png

TINY = dict(vocab_size=320, block_size=16, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
            n_experts=4, experts_per_token=2, expert_hidden=16, balance="aux", z_loss_coef=0.0,
            kv_lora_rank=8, rope_head_dim=4)
TINY_FLAGS = ["--n-layer", "2", "--n-head", "4", "--n-kv-head", "2", "--n-embd", "32",
              "--n-experts", "4", "--expert-hidden", "16", "--block-size", "16", "--batch-size", "4",
              "--eval-iters", "2", "--max-new-tokens", "8", "--num-samples", "2", "--device", "cpu"]


def tiny_config(**overrides):
    return moe.ModelConfig(**{**TINY, **overrides})


def tiny_moe(seed=0, **overrides):
    torch.manual_seed(seed)
    layer = moe.MoE(tiny_config(**overrides))
    for p in layer.parameters():  # bigger than the 0.02 init, so that routing is not a tie
        torch.nn.init.normal_(p, std=0.5)
    return layer


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 60)
    return path


def test_gates_sum_to_one_over_the_top_k():
    layer = tiny_moe(n_experts=6, experts_per_token=3)
    idx, gates, probs, _ = layer.route(torch.randn(10, 32))
    assert idx.shape == gates.shape == (10, 3)
    torch.testing.assert_close(gates.sum(-1), torch.ones(10))
    # the chosen experts are the k most probable ones (bias 0), gates in the same order
    torch.testing.assert_close(probs.topk(3, dim=-1).indices, idx)
    assert (gates[:, :-1] >= gates[:, 1:]).all()
    # an aux-free bias changes which experts are chosen, not how their gates are computed
    layer.expert_bias[5] = 10.0
    idx, gates, probs, _ = layer.route(torch.randn(10, 32))
    assert (idx[:, 0] == 5).all()
    torch.testing.assert_close(gates, probs.gather(-1, idx) / probs.gather(-1, idx).sum(-1, keepdim=True))
    # k = 1: the gate is the raw probability (renormalised it would be 1, with no gradient)
    layer = tiny_moe(n_experts=6, experts_per_token=1)
    idx, gates, probs, _ = layer.route(torch.randn(10, 32))
    torch.testing.assert_close(gates, probs.max(-1, keepdim=True).values)


def test_sorted_dispatch_matches_per_token_loop_outputs_and_gradients():
    layer = tiny_moe(n_experts=5, experts_per_token=2).double()  # float64: summation order is moot
    x = torch.randn(12, 32, dtype=torch.float64, requires_grad=True)
    idx, gates, _, _ = layer.route(x)
    assert len(idx.unique()) > 2  # several experts really are in use
    fast, n_dropped = layer.dispatch(x, idx, gates)
    params = [x] + list(layer.parameters())  # the router's weights get gradients via the gates
    grads_fast = torch.autograd.grad(fast.square().sum(), params, allow_unused=True, retain_graph=True)
    slow = layer.dispatch_per_token(x, idx, gates)
    grads_slow = torch.autograd.grad(slow.square().sum(), params, allow_unused=True)
    torch.testing.assert_close(fast, slow)
    assert n_dropped.item() == 0
    for g_fast, g_slow in zip(grads_fast, grads_slow):
        if g_fast is None:  # an expert no token chose has no gradient in either version
            assert g_slow is None
        else:
            torch.testing.assert_close(g_fast, g_slow)


def test_switch_aux_loss_known_values():
    layer = tiny_moe(n_experts=4, experts_per_token=2, aux_loss_coef=0.01)
    N, E = 8, 4
    logits = torch.zeros(N, E)
    # perfectly uniform: every probability 1/E and every expert gets N*k/E pairs -> 1 * coef
    uniform_idx = torch.stack([torch.arange(N) % E, (torch.arange(N) + 1) % E], dim=1)
    loss = layer.router_loss(uniform_idx, logits.softmax(-1), logits)
    assert loss.item() == pytest.approx(0.01, rel=1e-6)
    # collapse onto experts 0 and 1 (all the probability, both slots of every token):
    # E * (0.5*0.5 + 0.5*0.5) * coef = 2 * coef
    probs = torch.tensor([[0.5, 0.5, 0.0, 0.0]]).expand(N, E)
    collapsed_idx = torch.tensor([[0, 1]]).expand(N, 2)
    loss = layer.router_loss(collapsed_idx, probs, logits)
    assert loss.item() == pytest.approx(0.01 * 4 * 0.5, rel=1e-6)


def test_capacity_drops_exactly_the_overflow():
    layer = tiny_moe(n_experts=3, experts_per_token=2, capacity_factor=1.0)
    assert layer.capacity(3) == 2  # ceil(1.0 * 3 tokens * 2 / 3 experts)
    x = torch.randn(3, 32)
    # expert 0 is wanted by all three tokens: tokens 1 and 2 as first choice, token 0 as second
    # choice; first choices have priority, so the pair (token 0, expert 0) is the one dropped
    idx = torch.tensor([[1, 0], [0, 1], [0, 2]])
    gates = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.8, 0.2]])
    y, n_dropped = layer.dispatch(x, idx, gates, capacity=layer.capacity(3))
    assert n_dropped.item() == 1
    e = layer.experts
    expected = torch.stack([0.6 * e[1](x[0]),
                            0.7 * e[0](x[1]) + 0.3 * e[1](x[1]),
                            0.8 * e[0](x[2]) + 0.2 * e[2](x[2])])
    torch.testing.assert_close(y, expected)
    # without a capacity nothing is dropped
    assert layer.dispatch(x, idx, gates)[1].item() == 0


def test_training_forward_counts_dropped_tokens_and_load():
    layer = tiny_moe(n_experts=4, experts_per_token=1, capacity_factor=1.0)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0] = 1.0  # every token with a positive sum goes to expert 0
    x = torch.rand(1, 8, 32)  # positive entries: all 8 tokens choose expert 0, capacity 2
    layer.train()
    layer(x)
    layer.end_step(0.0)
    stats = layer.pop_stats()
    assert stats["dropped_tokens"] == 6
    assert stats["expert_load"] == [1.0, 0.0, 0.0, 0.0]
    assert layer.pop_stats()["dropped_tokens"] == 0  # reset after reading


def test_aux_free_bias_moves_toward_balance():
    layer = tiny_moe(n_experts=4, experts_per_token=1)
    with torch.no_grad():
        layer.router.weight.normal_(std=0.1)
        layer.router.weight[0] += 0.1  # expert 0 is the first choice of nearly every token
    layer.train()
    generator = torch.Generator().manual_seed(0)

    def step_ratio():  # max/mean expert load of one step on a fresh batch, then the update
        layer(torch.randn(1, 256, 32, generator=generator) + 1)
        load = layer.step_load.clone()
        layer.end_step(0.005)
        return (load.max() / load.mean()).item()

    ratios = [step_ratio() for _ in range(200)]
    assert ratios[0] > 3.5  # 4 = everything on one expert
    assert sum(ratios[-20:]) / 20 < 2.0  # sign updates keep jittering around balance
    assert layer.expert_bias.argmin() == 0  # the overloaded expert got the lowest bias


def test_hybrid_stack_layout():
    model = moe.Llama(tiny_config(n_layer=6, dense_layers=1, moe_every=2))
    kinds = ["moe" if isinstance(b.mlp, moe.MoE) else "dense" for b in model.transformer.h]
    assert kinds == ["dense", "moe", "dense", "moe", "dense", "moe"]
    assert not moe.Llama(tiny_config(n_experts=0)).moe_layers()


@pytest.mark.parametrize("attn,n_kv_head", [("mla", 2), ("gqa", 2), ("gqa", 4)])
def test_cache_size_matches_kv_cache_bytes_per_token(attn, n_kv_head):
    config = tiny_config(attn=attn, n_kv_head=n_kv_head)
    model = moe.Llama(config).eval()
    B, T = 3, 10
    cache = moe.KVCache(config, B)
    logits, _ = model(torch.randint(0, 256, (B, T)), cache=cache)
    assert logits.shape == (B, T, 320)
    kind = "mla" if attn == "mla" else ("mha" if n_kv_head == config.n_head else "gqa")
    # the cache is preallocated for block_size positions
    assert cache.nbytes() == B * config.block_size * moe.kv_cache_bytes_per_token(config, kind, 4)
    # MLA caches d_c + d_r = 8 + 4 numbers per token and layer; MHA 2 * 32
    assert moe.kv_cache_bytes_per_token(config, "mla", 4) == 2 * 12 * 4
    assert moe.kv_cache_bytes_per_token(config, "mha", 4) == 2 * 64 * 4


@pytest.mark.parametrize("attn", ["mla", "gqa"])
def test_cached_decoding_matches_full_forward(attn):
    torch.manual_seed(0)
    model = moe.Llama(tiny_config(attn=attn)).eval()
    idx = torch.randint(0, 256, (2, 12))
    full, _ = model(idx)
    cache = moe.KVCache(model.config, 2)
    steps = [model(idx[:, :5], cache=cache)[0]]  # prefill 5 tokens, then one at a time
    steps += [model(idx[:, t:t + 1], cache=cache)[0] for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_init_loss_is_log_vocab():
    torch.manual_seed(0)
    model = moe.Llama(tiny_config()).eval()
    idx = torch.randint(0, 256, (8, 16))
    _, loss = model(idx, idx)
    assert abs(loss.item() - math.log(320)) < 0.1  # the byte vocabulary, padded to 320


def losses(log_path):
    return [r["loss"] for r in map(json.loads, log_path.read_text().splitlines()) if "loss" in r]


def test_same_seed_same_losses_and_bit_exact_resume(text_file, tmp_path):
    # constant LR (min_lr = learning_rate, no warmup), so a 3-step run is the first half of a
    # 6-step run; router noise (global RNG) and aux-free biases (a buffer) must come back too
    flags = TINY_FLAGS + ["--data", str(text_file), "--eval-interval", "3", "--router-noise", "0.5",
                          "--balance", "aux-free", "--warmup-iters", "0", "--min-lr", "1e-3",
                          "--learning-rate", "1e-3"]
    moe.main(flags + ["--max-iters", "6", "--out-dir", str(tmp_path / "full")])
    moe.main(flags + ["--max-iters", "3", "--out-dir", str(tmp_path / "half")])
    half = losses(tmp_path / "half" / "log.jsonl")
    full = losses(tmp_path / "full" / "log.jsonl")
    assert len(full) == 6 and half == full[:3]  # same seed, same losses
    moe.main(flags + ["--max-iters", "6", "--out-dir", str(tmp_path / "half"), "--resume"])
    assert losses(tmp_path / "half" / "log.jsonl") == full


def test_max_time_warmup_counts_steps_then_the_cosine_follows_the_clock(text_file, tmp_path,
                                                                       monkeypatch):
    clock = iter(range(0, 10**7, 5))  # a fake clock: every reading is five seconds later
    monkeypatch.setattr(moe.time, "perf_counter", lambda: float(next(clock)))
    moe.main(TINY_FLAGS + ["--data", str(text_file), "--out-dir", str(tmp_path / "out"),
                           "--max-iters", "1000", "--max-time", "300", "--warmup-iters", "3",
                           "--eval-interval", "1000", "--log-interval", "1"])
    lrs = [r["lr"] for r in map(json.loads, (tmp_path / "out" / "log.jsonl").read_text().splitlines())
           if "lr" in r]
    assert 5 < len(lrs) < 1000  # stopped by the clock
    peak = lrs[0] * 4  # warmup by steps: peak * (s + 1) / 4
    assert lrs[1] == pytest.approx(peak / 2) and lrs[2] == pytest.approx(3 * peak / 4)
    assert lrs[-1] < 0.5 * peak  # then the cosine runs over 300 "seconds", not 1000 steps


def test_budget_time_up_and_the_lr_of_steps_or_clock(monkeypatch):
    """budget() (the loop's --max-time bookkeeping): time is up at --max-time seconds; after
    warmup the cosine is at the step or at the clock's share of the budget, whichever is further."""
    monkeypatch.setattr(moe.time, "perf_counter", lambda: 30.0)  # 30 s after t_start = 0
    cfg = moe.Config(max_iters=100, warmup_iters=10, max_time=60.0)

    def lr_at(step):
        return moe.get_lr(step, cfg.learning_rate, cfg.min_lr, cfg.warmup_iters, cfg.max_iters)

    assert moe.budget(20, 0.0, cfg, "cpu", False) == (False, lr_at(50))  # half the time: step 50
    assert moe.budget(80, 0.0, cfg, "cpu", False) == (False, lr_at(80))  # the steps are ahead
    assert moe.budget(5, 0.0, cfg, "cpu", False) == (False, lr_at(5))  # warmup counts steps
    assert moe.budget(20, -30.0, cfg, "cpu", False)[0]  # 60 s: time is up
    no_limit = moe.Config(max_iters=100, warmup_iters=10)
    assert moe.budget(20, -1e6, no_limit, "cpu", False) == (False, lr_at(20))


def test_dense_path_is_llama_py(text_file, tmp_path):
    """--n-experts 0 is llama.py's model and loop: the same losses, bit for bit (a copy that
    drifted from llama.py fails here)."""
    llama = pytest.importorskip("llama")
    flags = TINY_FLAGS[:8] + TINY_FLAGS[12:] + ["--data", str(text_file), "--max-iters", "2"]
    llama.main(flags + ["--out-dir", str(tmp_path / "llama")])
    moe.main(flags + ["--out-dir", str(tmp_path / "dense"), "--n-experts", "0"])
    assert losses(tmp_path / "dense" / "log.jsonl") == losses(tmp_path / "llama" / "log.jsonl")


def test_main_smoke_writes_routing_stats_and_samples(text_file, tmp_path, capsys):
    out = tmp_path / "run"
    metrics = moe.main(TINY_FLAGS + ["--data", str(text_file), "--max-iters", "2", "--out-dir", str(out),
                                     "--dense-layers", "1", "--capacity-factor", "1.0"])
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_loss" in r and "event" not in r]
    assert len(evals[-1]["expert_load"]) == 1 and len(evals[-1]["expert_load"][0]) == 4
    assert sum(evals[-1]["expert_load"][0]) == pytest.approx(1.0, abs=1e-4)  # rounded to 5 digits
    assert {"routing_entropy", "dropped_tokens", "max_load_ratio"} <= evals[-1].keys()
    assert records[-1]["event"] == "done" and math.isfinite(metrics["val_loss"])
    assert metrics["params"] > metrics["active_params"]  # 2 of 4 experts run per token
    samples = moe.main(["--sample-only", "--out-dir", str(out), "--max-new-tokens", "20",
                        "--prompt", "First", "--num-samples", "1", "--device", "cpu"])["samples"]
    assert len(samples) == 1 and samples[0].startswith("First")


def test_plot_writes_loss_and_expert_load_pngs(text_file, tmp_path, capsys):
    """--plot prints each expert's preferred tokens, then draws loss.png and expert_load.png
    (one heatmap per MoE layer: 2 here); without matplotlib it says so and draws nothing."""
    try:
        import matplotlib  # noqa: F401
        have_matplotlib = True
    except ImportError:
        have_matplotlib = False
    out = tmp_path / "run"
    moe.main(TINY_FLAGS + ["--data", str(text_file), "--max-iters", "2", "--eval-interval", "1",
                           "--out-dir", str(out), "--plot"])
    printed = capsys.readouterr().out
    assert "MoE layer 0, tokens each expert prefers: 0:" in printed
    assert "MoE layer 1, tokens each expert prefers: 0:" in printed
    if have_matplotlib:
        assert_png(out / "loss.png")
        width, height = assert_png(out / "expert_load.png")
        assert width > height  # two heatmaps side by side
    else:
        assert "matplotlib is not installed" in printed
        assert not (out / "loss.png").exists() and not (out / "expert_load.png").exists()


def test_help_and_bad_flag(capsys):
    with pytest.raises(SystemExit) as e:
        moe.main(["--help"])
    assert e.value.code == 0 and "--balance" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        moe.main(["--balance", "sometimes"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == "error: --balance sometimes: expected one of aux, aux-free, none"


def test_kv_cache_report_and_bench_layer_flags(capsys):
    report = moe.main(TINY_FLAGS + ["--kv-cache-report", "--attn", "mla"])
    assert report == {"mha": 2 * 2 * 32 * 4, "gqa": 2 * 2 * 16 * 4, "mla": 2 * (64 + 16) * 4}
    bench = moe.main(TINY_FLAGS + ["--bench-layer"])
    assert bench["moe_ms"] > 0 and bench["dense_ms"] > 0
    assert "MoE/dense throughput" in capsys.readouterr().out


# ---- the kept model (issue 27): ckpt.pt's "model" is the best evaluation's, --resume the last --
# the training split is one 300-character text repeated, the validation split fresh text with the
# same letter frequencies: val falls while the model learns the frequencies (best at step 40,
# 2.03), then rises while it memorises the training text (2.15 at 80, 2.21 at 120)
OVERFIT_FLAGS = ["--n-layer", "2", "--n-head", "2", "--n-embd", "48", "--block-size", "16",
                 "--batch-size", "32", "--eval-iters", "2", "--eval-interval", "40",
                 "--learning-rate", "1e-2", "--warmup-iters", "2", "--dropout", "0",
                 "--n-experts", "4", "--expert-hidden", "32", "--lr-decay-iters", "120",
                 "--num-samples", "2", "--max-new-tokens", "64", "--device", "cpu"]


def records(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def overfit(tmp_path_factory):
    """The data file and the uninterrupted 120-step run that passes its best at step 40."""
    import random
    root = tmp_path_factory.mktemp("overfit")
    rng = random.Random(0)
    chars, w = "abcdefghij ", [30, 20, 12, 8, 6, 5, 4, 3, 2, 1, 9]
    text = "".join(rng.choices(chars, w, k=300)) * 12 + "".join(rng.choices(chars, w, k=400))
    (root / "overfit.txt").write_text(text)
    flags = OVERFIT_FLAGS + ["--data", str(root / "overfit.txt")]
    metrics = moe.main(flags + ["--max-iters", "120", "--out-dir", str(root / "full")])
    return flags, root, metrics


def model_of(ckpt, weights):
    model = moe.Llama(moe.ModelConfig(**ckpt["model_args"]))
    model.load_state_dict(ckpt[weights])
    return model


def test_ckpt_model_is_the_best_evaluation_and_model_last_the_last(overfit):
    flags, root, metrics = overfit
    evals = [r for r in records(root / "full") if "val_loss" in r and "event" not in r]
    assert [r["iter"] for r in evals] == [0, 40, 80, 120]
    val = {r["iter"]: r["val_loss"] for r in evals}
    assert val[40] < min(val[0], val[80], val[120]) - 0.05  # strictly inside, a clear margin
    assert [r["best_iter"] for r in evals] == [0, 40, 40, 40]
    done = records(root / "full")[-1]
    assert done["event"] == "done" and done["best_iter"] == metrics["best_iter"] == 40
    assert done["best_val_loss"] == val[40]
    ckpt = torch.load(root / "full" / "ckpt.pt", weights_only=True)
    assert ckpt["iter"] == 120 and ckpt["best_iter"] == 40 and ckpt["best_val_loss"] == val[40]
    # re-evaluated on the same batches: "model" is step 40's model, "model_last" step 120's
    data = moe.load_tokens(root / "overfit.txt", (root / "overfit.txt").read_text(),
                           moe.ByteTokenizer())
    autocast = torch.amp.autocast("cpu", enabled=False)
    cfg = moe.Config(**ckpt["config"])
    for weights, step in (("model", 40), ("model_last", 120)):
        again = moe.estimate_loss(model_of(ckpt, weights), data, cfg.batch_size, cfg.eval_iters,
                                  cfg.seed, "cpu", autocast)
        assert again["val"] == val[step]  # the same batches, the same float
    assert any(not torch.equal(ckpt["model"][k], ckpt["model_last"][k]) for k in ckpt["model"])


def test_samples_come_from_the_kept_model(overfit, tmp_path):
    """The end-of-run samples.txt and --sample-only both sample the kept weights (step 40's),
    not the last step's."""
    flags, root, _ = overfit
    ckpt = torch.load(root / "full" / "ckpt.pt", weights_only=True)
    cfg = moe.Config(**{**ckpt["config"], "out_dir": str(tmp_path)})
    kept = moe.write_samples(model_of(ckpt, "model").eval(), moe.ByteTokenizer(), cfg, "cpu",
                             tmp_path / "kept")[1]
    last = moe.write_samples(model_of(ckpt, "model_last").eval(), moe.ByteTokenizer(), cfg, "cpu",
                             tmp_path / "last")[1]
    assert kept != last  # the two models do sample differently
    at_the_end = (root / "full" / "samples.txt").read_text()
    assert at_the_end == (tmp_path / "kept" / "samples.txt").read_text()
    sampled = moe.main(["--sample-only", "--out-dir", str(root / "full"), "--device", "cpu",
                        "--num-samples", "2", "--max-new-tokens", "64"])["samples"]
    assert sampled == kept


def test_resume_continues_the_last_state_and_keeps_the_best(overfit, tmp_path):
    """Stopped at step 80 (past the best, so ckpt.pt holds both models) and resumed to 120: the
    same training losses, the same final checkpoint (model, model_last, best_iter) and done
    record as the uninterrupted run."""
    flags, root, _ = overfit
    out = tmp_path / "half"
    moe.main(flags + ["--max-iters", "80", "--out-dir", str(out)])
    half = torch.load(out / "ckpt.pt", weights_only=True)
    assert half["best_iter"] == 40 and "model_last" in half
    moe.main(flags + ["--max-iters", "120", "--out-dir", str(out), "--resume"])
    assert losses(out / "log.jsonl") == losses(root / "full" / "log.jsonl")
    full = torch.load(root / "full" / "ckpt.pt", weights_only=True)
    resumed = torch.load(out / "ckpt.pt", weights_only=True)
    for key in ("iter", "best_iter", "best_val_loss"):
        assert resumed[key] == full[key]
    for weights in ("model", "model_last"):
        assert resumed[weights].keys() == full[weights].keys()
        assert all(torch.equal(resumed[weights][k], full[weights][k]) for k in full[weights])
    timing = {"elapsed_s", "tokens_per_s"}
    done = [{k: v for k, v in r[-1].items() if k not in timing}
            for r in (records(out), records(root / "full"))]
    assert done[0] == done[1]


def test_resume_of_a_checkpoint_without_best_iter(text_file, tmp_path):
    """An older checkpoint (no "best_iter", no "model_last": its "model" is the last step's)
    still resumes from its step, which counts as the kept model's."""
    flags = TINY_FLAGS + ["--data", str(text_file), "--eval-interval", "2", "--lr-decay-iters", "3",
                          "--out-dir", str(tmp_path / "old")]
    moe.main(flags + ["--max-iters", "2"])
    path = tmp_path / "old" / "ckpt.pt"
    ckpt = torch.load(path, weights_only=True)
    ckpt["model"] = ckpt.pop("model_last", ckpt["model"])  # as an older moe.py wrote it
    for key in ("sha256", "best_iter"):
        del ckpt[key]
    moe.save_checkpoint(ckpt, path)
    metrics = moe.main(flags + ["--max-iters", "3", "--resume"])
    assert metrics["best_iter"] in (2, 3) and [r["iter"] for r in records(tmp_path / "old")
                                               if "loss" in r] == [0, 1, 2]
