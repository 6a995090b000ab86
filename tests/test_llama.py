"""Tests of llama.py: the model, RoPE, GQA, KV and rolling caches, int8, training runs.

Run: python -m pytest -q tests/test_llama.py --durations=5

Tiny configs (2 layers, 32 dims, block 16), CPU, offline, seeded; data is made in tmp_path.
"""
import dataclasses
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import llama
from conftest import assert_png

ROOT = Path(__file__).resolve().parent.parent

TEXT = "".join(f"{i} little pigs, let me come in! Not by the hair of my chinny chin chin. ü\n"
               for i in range(120))


def tiny(**kw):
    """A 2-layer, 32-dim model config with a byte vocabulary padded to 320."""
    base = dict(vocab_size=320, block_size=16, n_layer=2, n_head=4, n_embd=32, n_kv_head=2)
    return llama.ModelConfig(**{**base, **kw})


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    return llama.Llama(tiny(**kw)).eval()


def run_args(tmp_path, *extra):
    """A tiny training run of main() on TEXT written to tmp_path."""
    data = tmp_path / "text.txt"
    if not data.exists():
        data.write_text(TEXT)
    return ["--data", str(data), "--out-dir", str(tmp_path / "out"), "--device", "cpu",
            "--n-layer", "2", "--n-head", "4", "--n-kv-head", "2", "--n-embd", "32",
            "--block-size", "16", "--batch-size", "4", "--eval-iters", "2",
            "--max-new-tokens", "8", "--num-samples", "2", *extra]


def losses_of(log_path):
    return [r["loss"] for r in map(json.loads, log_path.read_text().splitlines()) if "loss" in r]


@pytest.mark.parametrize("kw", [{}, dict(norm="layernorm"), dict(pos="learned"), dict(pos="none"),
                                dict(mlp="gelu"), dict(tie_weights=True), dict(window=5, sinks=2)])
def test_shapes_and_init_loss(kw):
    model = tiny_model(**kw)
    idx, targets = torch.randint(256, (2, 3, 16))  # targets unlike inputs (a tied head favours them)
    logits, loss = model(idx, targets)
    assert logits.shape == (3, 16, 320)
    assert model(idx)[1] is None
    # small N(0, 0.02) weights: near-uniform predictions over the padded vocabulary
    assert abs(loss.item() - math.log(320)) < 0.1


def test_ignore_index_masks_targets():
    model = tiny_model()
    idx = torch.randint(256, (2, 16))
    targets = idx.clone()
    targets[:, :10] = llama.IGNORE_INDEX  # e.g. the prompt tokens in sft.py
    logits, loss = model(idx, targets)
    expected = F.cross_entropy(logits[:, 10:].reshape(-1, 320), idx[:, 10:].reshape(-1))
    assert torch.allclose(loss, expected, atol=1e-6)


def test_swiglu_is_parameter_matched():
    count = {m: sum(p.numel() for p in llama.MLP(tiny(n_embd=128, mlp=m)).parameters())
             for m in ("swiglu", "gelu")}
    assert abs(count["swiglu"] / count["gelu"] - 1) < 0.05  # 352 hidden vs 341.3 exact


def test_tied_weights_share_one_matrix():
    model = tiny_model(tie_weights=True)
    assert model.lm_head.weight is model.transformer.wte.weight
    untied = tiny_model()
    assert untied.num_params() - model.num_params() == 320 * 32


def test_rope_preserves_norms_and_depends_on_offset_only():
    hs = 16
    cos, sin = llama.rope_cos_sin(torch.arange(64), hs, 10000.0)
    q, k = torch.randn(1, 1, 1, hs), torch.randn(1, 1, 1, hs)

    def rot(x, p):
        return llama.apply_rope(x, cos[p:p + 1], sin[p:p + 1])

    assert torch.allclose(rot(q, 37).norm(), q.norm(), atol=1e-5)
    score = (rot(q, 9) * rot(k, 4)).sum()  # offset 5
    assert torch.allclose(score, (rot(q, 50) * rot(k, 45)).sum(), atol=1e-4)
    assert torch.allclose(score, (rot(q, 5) * rot(k, 0)).sum(), atol=1e-4)
    assert not torch.allclose(score, (rot(q, 9) * rot(k, 3)).sum(), atol=1e-3)  # offset matters


def test_rope_table_continues_past_block_size():
    model = tiny_model()
    table, computed = model.rope_at(0, 16), model.rope_at(0, 40)  # computed when streaming
    assert computed[0].shape == (40, 4)
    assert all(torch.allclose(t, c[:16], atol=1e-6) for t, c in zip(table, computed))


@pytest.mark.parametrize("n_kv_head", [1, 2, 4])
def test_gqa_equals_explicit_repeat_reference(n_kv_head):
    """n_kv_head = 4 = n_head is plain multi-head attention; fewer heads share keys/values."""
    config = tiny(n_kv_head=n_kv_head)
    torch.manual_seed(0)
    attn = llama.CausalSelfAttention(config, 0).eval()
    x = torch.randn(2, 16, 32)
    pos = torch.arange(16)
    cos, sin = llama.rope_cos_sin(pos, 8, 10000.0)
    y = attn(x, pos, ((cos[:, None], sin[:, None]), None))  # (T, 1, hs/2) tables
    # reference: separate projections, each K/V head repeated for its group, written-out softmax
    w_q, w_k, w_v = attn.c_attn.weight.split([32, 8 * n_kv_head, 8 * n_kv_head])
    q = (x @ w_q.T).view(2, 16, 4, 8).transpose(1, 2)
    k = (x @ w_k.T).view(2, 16, n_kv_head, 8).transpose(1, 2)
    v = (x @ w_v.T).view(2, 16, n_kv_head, 8).transpose(1, 2)
    q, k = llama.apply_rope(q, cos, sin), llama.apply_rope(k, cos, sin)
    k, v = (t.repeat_interleave(4 // n_kv_head, dim=1) for t in (k, v))
    att = (q @ k.transpose(-2, -1)) / math.sqrt(8)
    att = att.masked_fill(torch.ones(16, 16, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
    ref = attn.c_proj((att @ v).transpose(1, 2).reshape(2, 16, 32))
    assert torch.allclose(y, ref, atol=1e-5)


def test_kv_cache_equals_recompute():
    model = tiny_model()
    prompt = torch.randint(256, (3, 4))  # batch of 3
    with_cache = llama.generate(model, prompt, 12, temperature=0, kv_cache=True)
    without = llama.generate(model, prompt, 12, temperature=0, kv_cache=False)
    assert torch.equal(with_cache, without)
    seq = torch.randint(256, (3, 16))
    full, _ = model(seq)
    cache = llama.KVCache(model.config, 3)
    chunks = [model(seq[:, :5], cache=cache)[0]] + [model(seq[:, t:t + 1], cache=cache)[0] for t in range(5, 16)]
    assert torch.allclose(torch.cat(chunks, dim=1), full, atol=1e-5)
    assert cache.full


def test_full_cache_restarts_from_half_block():
    model = tiny_model()
    out = llama.generate(model, torch.randint(256, (2, 4)), 30, temperature=0)  # past block 16
    assert out.shape == (2, 34)


def test_rolling_cache_equals_masked_full_forward():
    """Token by token through the S+W-slot rolling cache = one full pass with the window+sink
    mask, for a sequence that fits and for 3 x block_size (where the ring has wrapped often)."""
    model = tiny_model(window=5, sinks=2)
    for T in (16, 48):
        seq = torch.randint(256, (2, T))
        full, _ = model(seq)
        cache = llama.KVCache(model.config, 2)
        steps = torch.cat([model(seq[:, t:t + 1], cache=cache)[0] for t in range(T)], dim=1)
        assert torch.allclose(steps, full, atol=1e-5)
        assert cache.k.shape[3] == 7  # memory fixed at S + W slots
        cache = llama.KVCache(model.config, 2)
        assert torch.allclose(llama.prefill(model, seq, cache), full[:, -1], atol=1e-5)


def test_rolling_generation_matches_recompute_past_block():
    model = tiny_model(window=6, sinks=2)
    prompt = torch.randint(256, (2, 3))
    with_cache = llama.generate(model, prompt, 45, temperature=0)  # ~3 x block_size
    without = llama.generate(model, prompt, 45, temperature=0, kv_cache=False)
    assert torch.equal(with_cache, without)


def test_sinks_see_positions_of_the_rolling_cache():
    """Past S+W tokens a sink sits S+W-1-s positions before the query, however long the text:
    the logits of the last token depend on the sink tokens but not on how far back they are."""
    model = tiny_model(window=4, sinks=2)
    seq = torch.randint(256, (1, 30))
    last = model(seq)[0][:, -1]
    assert not torch.allclose(last, model(seq[:, 2:])[0][:, -1], atol=1e-3)  # other sinks
    # 1 layer: the last token's output depends only on its own window and the sinks
    one = tiny_model(window=4, sinks=2, n_layer=1)
    short = torch.cat((seq[:, :2], seq[:, -4:]), dim=1)  # sinks + window, 6 tokens
    assert torch.allclose(one(seq)[0][:, -1], one(short)[0][:, -1], atol=1e-5)


def test_int8_quantization_error_bound():
    model = tiny_model()
    idx = torch.randint(256, (2, 16))
    ref, _ = model(idx)
    weights = {n: m.weight.detach().clone() for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear)}
    float_bytes = llama.model_bytes(model)
    llama.quantize_int8(model)
    for name, w in weights.items():
        q = model.get_submodule(name)
        assert isinstance(q, llama.Int8Linear) and q.weight.dtype == torch.int8
        err = (w - q.weight.float() * q.scale[:, None]).abs()
        assert (err <= q.scale[:, None] / 2 + 1e-7).all()
    out, _ = model(idx)
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()
    assert llama.model_bytes(model) < 0.6 * float_bytes


def test_byte_tokenizer_round_trip_and_state():
    tok = llama.ByteTokenizer()
    text = "ROMEO: ¿qué? 名前 \U0001F600 <|endoftext|>"
    ids = tok.encode_ordinary(text)
    assert max(ids) < 256 and tok.decode(ids) == text  # special strings stay plain bytes
    assert tok.decode([72, 105, 256]) == "Hi<|endoftext|>"
    again = llama.tokenizer_from_state(llama.tokenizer_state(tok))
    assert again.special == tok.special and again.n_vocab == 264
    assert llama.padded_vocab(tok.n_vocab) == 320


def test_gradient_accumulation_equals_bigger_batch():
    model = tiny_model()
    idx = torch.randint(256, (4, 17))
    x, y = idx[:, :-1], idx[:, 1:]
    model(x, y)[1].backward()
    big = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    for part in (slice(0, 2), slice(2, 4)):
        (model(x[part], y[part])[1] / 2).backward()
    assert all(torch.allclose(a, p.grad, atol=1e-6) for a, p in zip(big, model.parameters()))


def test_tiny_overfit():
    model = tiny_model().train()
    idx = torch.randint(256, (2, 17))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(25):
        loss = model(idx[:, :-1], idx[:, 1:])[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5


def test_help_exits_zero(capsys):
    with pytest.raises(SystemExit) as e:
        llama.main(["--help"])
    assert e.value.code == 0
    assert "--n-kv-head" in capsys.readouterr().out


def test_two_step_smoke_and_log(tmp_path):
    metrics = llama.main(run_args(tmp_path, "--max-iters", "2", "--eval-interval", "1",
                                  "--log-grad-norms"))
    out = tmp_path / "out"
    assert metrics["iter"] == 2 and math.isfinite(metrics["val_loss"])
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert records[-1]["event"] == "done"
    steps = [r for r in records if "loss" in r]
    assert {"iter", "loss", "lr", "ms_per_iter", "tokens_per_s", "elapsed_s"} <= steps[0].keys()
    assert set(steps[0]["grad_norms"]) == {"wte", "h.0", "h.1", "ln_f", "lm_head"}
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["script"] == "llama.py" and ckpt["tokenizer"]["kind"] == "byte"
    assert ckpt["model_args"]["n_kv_head"] == 2 and ckpt["iter"] == 2
    assert (out / "samples.txt").is_file()


def test_same_seed_same_losses(tmp_path):
    runs = []
    for name in ("a", "b"):
        llama.main(run_args(tmp_path, "--max-iters", "3", "--eval-interval", "3",
                            "--out-dir", str(tmp_path / name), "--dropout", "0.1"))
        runs.append(losses_of(tmp_path / name / "log.jsonl"))
    assert runs[0] == runs[1] and len(runs[0]) == 3


def test_resume_is_bit_exact(tmp_path):
    common = ("--eval-interval", "3", "--lr-decay-iters", "6", "--warmup-iters", "2",
              "--dropout", "0.1")
    llama.main(run_args(tmp_path, "--max-iters", "6", "--out-dir", str(tmp_path / "full"), *common))
    llama.main(run_args(tmp_path, "--max-iters", "3", "--out-dir", str(tmp_path / "half"), *common))
    llama.main(run_args(tmp_path, "--max-iters", "6", "--out-dir", str(tmp_path / "half"), "--resume",
                        *common))
    assert losses_of(tmp_path / "half" / "log.jsonl") == losses_of(tmp_path / "full" / "log.jsonl")


def test_max_time_stops_with_final_eval(tmp_path):
    metrics = llama.main(run_args(tmp_path, "--max-iters", "1000", "--max-time", "0.01"))
    assert metrics["iter"] < 1000 and "val_loss" in metrics


def test_max_time_warmup_counts_steps_then_the_cosine_follows_the_clock(tmp_path, monkeypatch):
    clock = iter(range(0, 10**7, 5))  # a fake clock: every reading is five seconds later
    monkeypatch.setattr(llama.time, "perf_counter", lambda: float(next(clock)))
    llama.main(run_args(tmp_path, "--max-iters", "1000", "--max-time", "300", "--warmup-iters", "3",
                        "--eval-interval", "1000", "--log-interval", "1"))
    lrs = [r["lr"] for r in map(json.loads, (tmp_path / "out" / "log.jsonl").read_text().splitlines())
           if "lr" in r]
    assert 5 < len(lrs) < 1000  # stopped by the clock
    # warmup by steps (peak * (s + 1) / 4), although the clock is already far along
    peak = lrs[0] * 4
    assert lrs[1] == pytest.approx(peak / 2) and lrs[2] == pytest.approx(3 * peak / 4)
    assert lrs[-1] < 0.5 * peak  # then the cosine runs over 300 "seconds", not 1000 steps


def test_set_lr_sets_every_group_warms_up_by_steps_then_follows_the_clock():
    cfg = llama.Config(max_iters=100, warmup_iters=10, max_time=60.0)
    params = [torch.zeros(1, requires_grad=True) for _ in range(2)]
    opt = torch.optim.SGD([{"params": params[:1]}, {"params": params[1:]}], lr=1.0)

    def expected(progress, c=cfg):
        return llama.get_lr(progress, c.learning_rate, c.min_lr, c.warmup_iters, c.max_iters)

    assert llama.set_lr(opt, 5, 59.0, cfg) == expected(5)  # warmup: steps, whatever the clock
    assert [g["lr"] for g in opt.param_groups] == [expected(5)] * 2
    assert llama.set_lr(opt, 20, 30.0, cfg) == expected(50)  # half the budget: step 50 of 100
    assert llama.set_lr(opt, 70, 30.0, cfg) == expected(70)  # the steps are further along
    no_budget = dataclasses.replace(cfg, max_time=0.0)
    assert llama.set_lr(opt, 20, 30.0, no_budget) == expected(20, no_budget)


def test_sample_only_int8_and_bench(tmp_path, capsys):
    llama.main(run_args(tmp_path, "--max-iters", "2", "--eval-interval", "2"))
    report = llama.main(run_args(tmp_path, "--sample-only", "--quantize", "int8"))
    assert report["int8_model_bytes"] < report["float_model_bytes"]
    assert abs(report["val_loss_change"]) < 0.05 and len(report["samples"]) == 2
    result = llama.main(run_args(tmp_path, "--bench", "--temperature", "0"))
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last == result and result["stream_tokens"] == 160
    assert {"tokens_per_s_cache", "tokens_per_s_nocache", "tokens_per_s_rolling"} <= last.keys()


def test_corrupt_checkpoint_exits_2(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "ckpt.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit) as e:
        llama.main(run_args(tmp_path, "--sample-only"))
    assert e.value.code == 2
    assert capsys.readouterr().err.startswith("error: cannot read checkpoint")


def test_bad_flag_combination_exits_2(tmp_path):
    with pytest.raises(SystemExit) as e:
        llama.main(run_args(tmp_path, "--window", "8", "--pos", "learned"))
    assert e.value.code == 2


def test_plot_writes_figures(tmp_path):
    pytest.importorskip("matplotlib")
    llama.main(run_args(tmp_path, "--max-iters", "2", "--eval-interval", "1", "--log-grad-norms", "--plot"))
    for name in ("loss.png", "grad_norms.png", "rope.png"):
        assert_png(tmp_path / "out" / name)


def test_ddp_two_processes_match_one_process(tmp_path):
    """torchrun with 2 gloo processes accumulating 1 micro-batch each == 1 process accumulating 2."""
    def args(out):
        return [a.replace(str(tmp_path / "out"), str(tmp_path / out)) for a in run_args(
            tmp_path, "--max-iters", "3", "--eval-interval", "3", "--gradient-accumulation-steps", "2")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "llama.py"), *args("two")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    single = llama.main(args("one"))  # runs while the two processes start
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-2000:]
    assert "ddp world_size=2" in stdout
    one, two = losses_of(tmp_path / "one" / "log.jsonl"), losses_of(tmp_path / "two" / "log.jsonl")
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        assert math.isclose(a, b, rel_tol=1e-5), (one, two)
    done = json.loads((tmp_path / "two" / "log.jsonl").read_text().splitlines()[-1])
    assert math.isclose(done["val_loss"], single["val_loss"], rel_tol=1e-5)


# ---- issue 27: keep the best model. A tiny run that overfits: the training split is one
# 300-character text repeated, the validation split fresh text with the same letter frequencies,
# so val falls while the model learns the frequencies (best at 40), then rises while it
# memorises the training text: val 5.80, 2.03 (40), 2.21, 2.22 at 0, 40, 80, 120.
def overfit_args(base, out, *extra):
    data = base / "overfit.txt"
    if not data.exists():
        rng, chars, w = random.Random(0), "abcdefghij ", [30, 20, 12, 8, 6, 5, 4, 3, 2, 1, 9]
        data.write_text("".join(rng.choices(chars, w, k=300)) * 12
                        + "".join(rng.choices(chars, w, k=400)))
    return ["--data", str(data), "--out-dir", str(base / out), "--device", "cpu",
            "--n-layer", "2", "--n-head", "2", "--n-embd", "48", "--block-size", "16",
            "--batch-size", "32", "--eval-iters", "2", "--eval-interval", "40",
            "--learning-rate", "1e-2", "--warmup-iters", "2", "--lr-decay-iters", "120",
            "--dropout", "0", "--num-samples", "2", "--max-new-tokens", "16", *extra]


@pytest.fixture(scope="module")
def overfit(tmp_path_factory):
    """The uninterrupted 120-step run -> (its base folder, its out folder, its done record)."""
    base = tmp_path_factory.mktemp("overfit")
    done = llama.main(overfit_args(base, "full", "--max-iters", "120"))
    return base, base / "full", done


def val_loss_of(weights, ckpt, data_path):
    """llama.py's own estimate_loss on the val batches of every evaluation of the run."""
    model = llama.Llama(llama.ModelConfig(**ckpt["model_args"]))
    model.load_state_dict(weights)
    data = llama.load_tokens(data_path, data_path.read_text(), llama.ByteTokenizer())
    autocast = torch.amp.autocast("cpu", dtype=torch.float32, enabled=False)  # train()'s
    return llama.estimate_loss(model, {"val": data["val"]}, 32, 2, 1337, "cpu", autocast)["val"]


def test_keeps_the_model_of_the_best_val_loss(overfit):
    base, out, done = overfit
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    evals = {r["iter"]: r for r in records if "val_loss" in r and "event" not in r}
    assert list(evals) == [0, 40, 80, 120]
    best = min(evals, key=lambda i: evals[i]["val_loss"])
    assert best == 40  # strictly inside the run, by a clear margin over every other eval
    assert all(evals[i]["val_loss"] > evals[40]["val_loss"] + 0.1 for i in evals if i != 40)
    assert [r["best_iter"] for r in evals.values()] == [0, 40, 40, 40]
    assert records[-1]["event"] == "done" and records[-1] == {"event": "done", **done}
    assert done["best_iter"] == 40 and done["best_val_loss"] == evals[40]["val_loss"]
    assert done["val_loss"] == evals[120]["val_loss"]  # the last evaluation's, as before
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["iter"] == 120 and ckpt["best_iter"] == 40
    assert ckpt["best_val_loss"] == evals[40]["val_loss"]
    # "model" is the kept model (it scores the best val loss again), "model_last" the last step's
    assert val_loss_of(ckpt["model"], ckpt, base / "overfit.txt") == evals[40]["val_loss"]
    assert val_loss_of(ckpt["model_last"], ckpt, base / "overfit.txt") == evals[120]["val_loss"]
    assert not torch.equal(ckpt["model"]["lm_head.weight"], ckpt["model_last"]["lm_head.weight"])


def test_samples_come_from_the_kept_model(overfit, tmp_path):
    base, out, _ = overfit
    end_of_run = (out / "samples.txt").read_text()  # before --sample-only writes its own
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    cfg = llama.parse_config(llama.Config, overfit_args(base, "full"))[0]
    texts = {}
    for key in ("model", "model_last"):
        model = llama.Llama(llama.ModelConfig(**ckpt["model_args"])).eval()
        model.load_state_dict(ckpt[key])
        texts[key] = llama.write_samples(model, llama.ByteTokenizer(), cfg, "cpu",
                                         tmp_path / key)[1]
    assert texts["model"] != texts["model_last"]  # the check can tell the two apart
    report = llama.main(overfit_args(base, "full", "--sample-only"))
    assert report["samples"] == texts["model"]  # --sample-only: the kept model
    assert end_of_run == (tmp_path / "model" / "samples.txt").read_text()  # the end of the run too


def test_resume_past_the_best_repeats_the_run(overfit):
    base, out, _ = overfit
    llama.main(overfit_args(base, "half", "--max-iters", "80"))  # "killed" at 80, past the best
    half = torch.load(base / "half" / "ckpt.pt", weights_only=True)
    assert half["iter"] == 80 and half["best_iter"] == 40 and "model_last" in half
    done = llama.main(overfit_args(base, "half", "--resume", "--max-iters", "120"))
    assert losses_of(base / "half" / "log.jsonl") == losses_of(out / "log.jsonl")
    resumed = torch.load(base / "half" / "ckpt.pt", weights_only=True)
    full = torch.load(out / "ckpt.pt", weights_only=True)
    for key in ("model", "model_last"):
        assert resumed[key].keys() == full[key].keys()
        assert all(torch.equal(resumed[key][k], full[key][k]) for k in full[key])
    assert (resumed["best_iter"], resumed["best_val_loss"]) == (40, full["best_val_loss"])
    assert done["best_iter"] == 40 and done["best_val_loss"] == full["best_val_loss"]


def test_checkpoint_without_best_iter_still_resumes(tmp_path):
    """A checkpoint of before issue 27 (no best_iter, no model_last): best_iter = its iter."""
    llama.main(run_args(tmp_path, "--max-iters", "2", "--eval-interval", "2"))
    path = tmp_path / "out" / "ckpt.pt"
    ckpt = llama.load_checkpoint(path, ["llama.py"])
    del ckpt["best_iter"]
    llama.save_checkpoint(ckpt, path)
    done = llama.main(run_args(tmp_path, "--resume", "--max-iters", "3"))
    assert done["best_iter"] in (2, 3) and done["iter"] == 3


def test_a_new_best_is_strictly_lower(tmp_path):
    """The first evaluation always sets the kept model; a tie keeps the earlier one."""
    model, t0 = tiny_model(), llama.time.perf_counter()
    record, best = llama.eval_record(0, {"train": 3.0, "val": 3.0}, (float("inf"), 0, None), model,
                                     t0, tmp_path)
    assert best[:2] == (3.0, 0) and record["best_iter"] == 0
    assert best[2]["lm_head.weight"].data_ptr() != model.lm_head.weight.data_ptr()  # a copy
    assert llama.eval_record(5, {"train": 2.0, "val": 3.0}, best, model, t0, tmp_path)[1] is best
    record, best = llama.eval_record(9, {"train": 2.0, "val": 2.9}, best, model, t0, tmp_path)
    assert best[:2] == (2.9, 9) and record["best_iter"] == 9
