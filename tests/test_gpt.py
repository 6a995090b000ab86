"""Tests for gpt.py: model, data, training loop, resume, DDP, GPT-2 weights, sampling, errors.

Run: python -m pytest -q tests/test_gpt.py --durations=5

Tiny configs (2 layers, 32 dims, block 16) on CPU with text made in tmp_path; no network.
The --sample-only --init-from test needs tiktoken's gpt2 files in its cache
(TIKTOKEN_CACHE_DIR) and skips without them.
"""
import contextlib
import dataclasses
import hashlib
import io
import json
import math
import os
import random
import struct
import subprocess
import sys
import tempfile
import types
import urllib.error
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

import gpt
from conftest import assert_png

ROOT = Path(__file__).resolve().parent.parent
TINY = gpt.ModelConfig(vocab_size=40, block_size=16, n_layer=2, n_head=2, n_embd=32)


def tiny_flags(data, out_dir, *extra):
    """CLI flags of a run that takes a fraction of a second."""
    return ["--data", str(data), "--out-dir", str(out_dir), "--device", "cpu", "--n-layer", "2",
            "--n-head", "2", "--n-embd", "32", "--block-size", "16", "--batch-size", "4",
            "--eval-iters", "2", "--warmup-iters", "2", "--num-samples", "1",
            "--max-new-tokens", "8", *extra]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy shared machine spinning
    thread pools make them up to 100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def text_file(tmp_path):
    """~6k characters of pseudo-words: a small vocabulary with structure to learn."""
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnop") for _ in range(rng.randint(2, 6))) for _ in range(50)]
    lines = [" ".join(rng.choice(words) for _ in range(10)).capitalize() + "." for _ in range(150)]
    path = tmp_path / "tiny.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def train_records(out_dir):
    records = [json.loads(line) for line in (Path(out_dir) / "log.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r]


def run_error(capsys, argv):
    """main(argv) must stop with exit status 2 and a one-line `error: ...` on stderr."""
    with pytest.raises(SystemExit) as e:
        gpt.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


# ---- model ---------------------------------------------------------------------------------
def test_shapes_and_parameter_count():
    model = gpt.GPT(TINY)
    idx = torch.randint(0, 40, (3, 16))
    logits, loss = model(idx)
    assert logits.shape == (3, 16, 40) and loss is None
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 16, 40) and loss.shape == ()
    # tied head counted once: wte (V*C) + wpe (T*C) + 2 blocks of 12*C^2 + LayerNorm gains/biases
    C = 32
    per_block = 12 * C * C + 13 * C  # Linear weights + biases (3C + C + 4C + C) + two LayerNorms (4C)
    total = 40 * C + 16 * C + 2 * per_block + 2 * C
    assert model.num_params(non_embedding=False) == total
    assert model.num_params() == total - 16 * C


def test_init_loss_is_ln_vocab():
    torch.manual_seed(0)
    model = gpt.GPT(TINY)
    idx = torch.randint(0, 40, (8, 16))
    _, loss = model(idx, torch.randint(0, 40, (8, 16)))
    assert abs(loss.item() - math.log(40)) < 0.1


@pytest.mark.parametrize("sdpa", [True, False])
def test_causality(sdpa):
    torch.manual_seed(0)
    model = gpt.GPT(dataclasses.replace(TINY, sdpa=sdpa)).eval()
    idx = torch.randint(0, 40, (1, 16))
    base, _ = model(idx)
    for t in range(15):
        changed = idx.clone()
        changed[0, t + 1] = (changed[0, t + 1] + 1) % 40
        logits, _ = model(changed)
        assert torch.equal(logits[0, : t + 1], base[0, : t + 1])  # positions <= t never see t+1
        assert not torch.allclose(logits[0, t + 1], base[0, t + 1])


@pytest.mark.parametrize("pos,gelu", [("learned", "exact"), ("sinusoidal", "tanh")])
def test_manual_attention_equals_sdpa(pos, gelu):
    torch.manual_seed(0)
    fast = gpt.GPT(dataclasses.replace(TINY, pos=pos, gelu=gelu, bias=False))
    slow = gpt.GPT(dataclasses.replace(fast.config, sdpa=False))
    slow.load_state_dict(fast.state_dict())
    idx = torch.randint(0, 40, (4, 16))
    (a, la), (b, lb) = fast(idx, idx), slow(idx, idx)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    la.backward()
    lb.backward()
    for (name, p), q in zip(fast.named_parameters(), slow.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_sinusoidal_positions_follow_the_formula():
    table = gpt.SinusoidalPositions(16, 6).weight
    p, i, scale = 5, 1, math.sqrt(6 / 2)
    assert math.isclose(table[p, 2 * i] * scale, math.sin(p / 10000 ** (2 * i / 6)), rel_tol=1e-5)
    assert math.isclose(table[p, 2 * i + 1] * scale, math.cos(p / 10000 ** (2 * i / 6)), rel_tol=1e-5)
    # unit rows: the position signal stays on the scale of the N(0, 0.02^2) token embeddings
    torch.testing.assert_close(table.norm(dim=1), torch.ones(16))
    assert "transformer.wpe.weight" not in gpt.GPT(dataclasses.replace(TINY, pos="sinusoidal")).state_dict()


def test_gradient_accumulation_equals_big_batch():
    torch.manual_seed(0)
    model = gpt.GPT(TINY)
    x, y = torch.randint(0, 40, (8, 16)), torch.randint(0, 40, (8, 16))
    model(x, y)[1].backward()
    big = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    k = 4
    for xs, ys in zip(x.chunk(k), y.chunk(k)):
        (model(xs, ys)[1] / k).backward()
    for g, p in zip(big, model.parameters()):
        torch.testing.assert_close(p.grad, g, atol=1e-6, rtol=1e-5)


def test_get_lr_schedule():
    lr = [gpt.get_lr(s, 1e-3, 1e-4, 10, 100) for s in range(120)]
    assert lr[0] < lr[5] < lr[9] < 1e-3  # linear warmup
    assert math.isclose(lr[10], 1e-3)  # peak after warmup
    assert all(a >= b for a, b in zip(lr[10:100], lr[11:101]))  # cosine decays monotonically
    assert math.isclose(lr[55], 5.5e-4) and lr[100] == lr[119] == 1e-4


def test_mfu_uses_the_gpu_peak_and_palm_flop_count(monkeypatch):
    peaks = {"NVIDIA H100 80GB HBM3": 989e12, "NVIDIA A100-SXM4-40GB": 312e12, "NVIDIA A10G": 125e12,
             "NVIDIA L40S": 362e12, "NVIDIA L4": 121e12, "Tesla T4": None}
    for name, peak in peaks.items():
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device, name=name: name)
        assert gpt.peak_flops("cuda:0") == peak
    assert gpt.peak_flops("cpu") is None
    model = gpt.GPT(TINY)
    flops_per_iter = (6 * model.num_params() + 12 * 2 * 2 * 16 * 16) * 16 * 8  # 8 sequences of T=16
    assert math.isclose(model.estimate_mfu(8, 0.5, 1e9), flops_per_iter / 0.5 / 1e9)


# ---- data ----------------------------------------------------------------------------------
def test_token_cache_is_keyed_on_text_and_tokenizer(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("hello world\n" * 50)
    tok = gpt.load_tokenizer("char", path.read_text())
    first = gpt.load_tokens(path, path.read_text(), tok)
    caches = sorted(tmp_path.glob("t.char-*.bin"))
    assert [c.name.split(".")[-2] for c in caches] == ["train", "val"]
    assert torch.equal(torch.cat([first["train"], first["val"]]),
                       torch.tensor(tok.encode_ordinary(path.read_text())))
    assert len(first["train"]) == int(0.9 * 600)
    path.write_text("hello there\n" * 50)  # same length, other text: a new cache, no stale ids
    second = gpt.load_tokens(path, path.read_text(), gpt.load_tokenizer("char", path.read_text()))
    assert len(list(tmp_path.glob("t.char-*.bin"))) == 4
    assert not torch.equal(first["train"], second["train"])


def test_batches_are_shifted_windows_and_ddp_slices_partition_the_stream():
    data = torch.arange(1000)
    g = torch.Generator().manual_seed(0)
    x, y = gpt.get_batch(data, 16, 4, g, "cpu")
    assert x.shape == y.shape == (4, 16) and torch.equal(y, x + 1)
    # one process drawing two micro-batches == two ranks drawing one each
    one = gpt.TrainBatches(data, 16, 4, seed=3, device="cpu")
    ranks = [gpt.TrainBatches(data, 16, 4, seed=3, device="cpu", rank=r, world_size=2) for r in range(2)]
    for _ in range(3):
        for r in range(2):
            assert torch.equal(one.next()[0], ranks[r].next()[0])


def test_tokenizer_state_round_trip_through_a_checkpoint(tmp_path):
    # a bpe.py-style tokenizer file (256 byte tokens + 2 merges) read by the shared load_bpe
    import base64
    ranks = [bytes([i]) for i in range(256)] + [b"ab", b"abc"]
    (tmp_path / "tok.tiktoken").write_text("".join(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(ranks)))
    (tmp_path / "tok.json").write_text(json.dumps({"pattern": None, "special": {"<|end|>": 258}, "vocab_size": 259}))
    tok = gpt.load_tokenizer(str(tmp_path / "tok"), "")
    state = gpt.tokenizer_state(tok)
    torch.save(state, tmp_path / "s.pt")
    again = gpt.tokenizer_from_state(torch.load(tmp_path / "s.pt", weights_only=True))
    assert again.encode_ordinary("abcab!") == tok.encode_ordinary("abcab!") == [257, 256, 33]
    assert again.n_vocab == 259
    char = gpt.tokenizer_from_state(gpt.tokenizer_state(gpt.CharTokenizer("abc")))
    assert char.decode(char.encode_ordinary("cab")) == "cab"


# ---- generation ----------------------------------------------------------------------------
def test_top_k_and_top_p_never_leave_the_allowed_set():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.5, -1.0, -2.0]] * 2)  # (B=2, V=6)
    probs = logits.softmax(-1)[0]
    g = torch.Generator().manual_seed(0)
    seen_k = {i for _ in range(300) for i in gpt.sample_logits(logits, 1.5, top_k=3, generator=g).flatten().tolist()}
    assert seen_k == {0, 1, 2}
    # nucleus 0.9: the smallest prefix whose mass reaches 0.9
    keep = int((probs.cumsum(0) < 0.9).sum()) + 1
    seen_p = {i for _ in range(300) for i in gpt.sample_logits(logits, 1.0, top_p=0.9, generator=g).flatten().tolist()}
    assert seen_p == set(range(keep))


def test_generate_crops_context_and_greedy_ignores_the_seed():
    torch.manual_seed(0)
    model = gpt.GPT(TINY).eval()
    idx = torch.randint(0, 40, (3, 5))
    outs = [gpt.generate(model, idx, 20, temperature=0, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    assert outs[0].shape == (3, 25) and torch.equal(outs[0], outs[1]) and torch.equal(outs[0][:, :5], idx)
    # greedy = argmax of the full forward over the last block_size tokens, row by row
    logits, _ = model(outs[0][:, 24 - 16: 24])
    assert torch.equal(logits[:, -1].argmax(-1), outs[0][:, 24])


# ---- training loop, checkpoint, resume -----------------------------------------------------
def test_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit) as e:
        gpt.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for field in dataclasses.fields(gpt.Config):
        assert "--" + field.name.replace("_", "-") in out
    assert "cosine decay reaches min_lr" in out


def test_smoke_two_steps(text_file, tmp_path, capsys):
    metrics = gpt.main(tiny_flags(text_file, tmp_path / "out", "--max-iters", "2"))
    out = capsys.readouterr().out
    assert out.startswith("config: ") and "device=cpu dtype=float32 compile=off" in out
    assert "iter 1/2 | loss " in out and " tok/s | eta " in out
    assert metrics["iter"] == 2 and math.isfinite(metrics["val_loss"])
    records = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert set(records[1]) == {"iter", "loss", "lr", "ms_per_iter", "tokens_per_s", "elapsed_s"}
    assert records[-1]["event"] == "done" and records[-1]["val_loss"] == metrics["val_loss"]
    assert (tmp_path / "out" / "samples.txt").is_file()


def test_tiny_overfit_loss_goes_down(tmp_path):
    path = tmp_path / "fox.txt"
    path.write_text("the quick brown fox jumps over the lazy dog\n" * 100)  # 28 characters
    metrics = gpt.main(tiny_flags(path, tmp_path, "--max-iters", "80", "--eval-interval", "80",
                                  "--learning-rate", "1e-2"))
    assert train_records(tmp_path)[0]["loss"] > 3.0 and metrics["val_loss"] < 0.5


def test_same_seed_same_losses(text_file, tmp_path):
    def losses(name, seed):
        gpt.main(tiny_flags(text_file, tmp_path / name, "--max-iters", "4", "--dropout", "0.1", "--seed", seed))
        return [r["loss"] for r in train_records(tmp_path / name)]
    first = losses("a", "7")
    assert losses("b", "7") == first
    assert losses("c", "8") != first


def test_resume_reproduces_the_uninterrupted_run(text_file, tmp_path):
    flags = ["--eval-interval", "3", "--lr-decay-iters", "6", "--dropout", "0.1"]
    straight = gpt.main(tiny_flags(text_file, tmp_path / "a", *flags, "--max-iters", "6"))
    gpt.main(tiny_flags(text_file, tmp_path / "b", *flags, "--max-iters", "3"))  # "interrupted" at 3
    # the other settings come back from the checkpoint's config
    resumed = gpt.main(["--resume", "--max-iters", "6", "--out-dir", str(tmp_path / "b")])
    a, b = train_records(tmp_path / "a"), train_records(tmp_path / "b")
    assert [r["iter"] for r in b] == list(range(6))
    assert [(r["loss"], r["lr"]) for r in a] == [(r["loss"], r["lr"]) for r in b]  # bit-exact
    assert resumed["val_loss"] == straight["val_loss"]


def test_checkpoint_loads_with_weights_only_and_reproduces_the_val_loss(text_file, tmp_path):
    metrics = gpt.main(tiny_flags(text_file, tmp_path, "--max-iters", "2", "--pos", "sinusoidal"))
    ckpt = torch.load(tmp_path / "ckpt.pt", map_location="cpu", weights_only=True)
    assert {"script", "version", "config", "model_args", "model", "optimizer", "iter",
            "best_val_loss", "rng", "tokenizer"} <= set(ckpt)
    assert ckpt["script"] == "gpt.py" and ckpt["iter"] == 2 and set(ckpt["rng"]) == {"torch", "cuda", "data"}
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in ckpt["model"])
    model = gpt.GPT(gpt.ModelConfig(**ckpt["model_args"]))
    model.load_state_dict(ckpt["model"])
    tokenizer = gpt.tokenizer_from_state(ckpt["tokenizer"])
    data = gpt.load_tokens(text_file, text_file.read_text(), tokenizer)
    losses = gpt.estimate_loss(model, data, 4, 2, 1337, "cpu", contextlib.nullcontext())
    assert losses["val"] == metrics["val_loss"]  # the saved weights are the trained ones, exactly


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(text_file, tmp_path, capsys):
    flags = tiny_flags(text_file, tmp_path, "--max-iters", "20", "--learning-rate", "1e30", "--warmup-iters", "0")
    err = run_error(capsys, flags)
    assert "loss is nan at iter" in err or "loss is inf at iter" in err
    assert gpt.load_checkpoint(tmp_path / "ckpt.pt", ["gpt.py"])["iter"] == 0


def test_sample_only_uses_the_checkpoint(text_file, tmp_path, capsys):
    gpt.main(tiny_flags(text_file, tmp_path, "--max-iters", "2"))
    capsys.readouterr()
    argv = ["--sample-only", "--out-dir", str(tmp_path), "--num-samples", "3", "--max-new-tokens", "30"]
    texts = gpt.main(argv + ["--prompt", "ab"])["samples"]
    assert len(texts) == 3 and all(t.startswith("ab") and len(t) == 32 for t in texts)
    assert (tmp_path / "samples.txt").read_text().startswith("ab")
    assert gpt.main(argv + ["--prompt", "ab"])["samples"] == texts  # seeded
    err = run_error(capsys, argv + ["--prompt", "Z€"])
    assert "char tokenizer has no id" in err


def fake_matplotlib():
    """Stand-ins for matplotlib and pyplot that record imshow calls and write empty PNGs."""
    shown = []

    def subplots(nrows=1, ncols=1, squeeze=True, **kwargs):
        fig = mock.MagicMock()
        fig.savefig.side_effect = lambda path, **kw: Path(path).write_bytes(b"")
        axes = np.empty((nrows, ncols), dtype=object)
        for i in range(nrows):
            for j in range(ncols):
                axes[i, j] = mock.MagicMock()
                axes[i, j].imshow.side_effect = lambda image, **kw: shown.append(np.asarray(image).shape)
        return fig, (axes.squeeze().tolist() if axes.size > 1 else axes.item()) if squeeze else axes

    pyplot = types.SimpleNamespace(subplots=subplots, close=lambda fig: None)
    return types.SimpleNamespace(use=lambda backend: None, pyplot=pyplot), shown


def test_plot_writes_the_three_figures(text_file, tmp_path, monkeypatch):
    try:
        import matplotlib  # noqa: F401
        shown = None
    except ImportError:  # not installed here: the drawing code still runs, against stand-ins
        matplotlib, shown = fake_matplotlib()
        monkeypatch.setitem(sys.modules, "matplotlib", matplotlib)
        monkeypatch.setitem(sys.modules, "matplotlib.pyplot", matplotlib.pyplot)
    gpt.main(tiny_flags(text_file, tmp_path, "--max-iters", "2", "--plot", "--max-new-tokens", "20"))
    assert all((tmp_path / f).is_file() for f in ("loss.png", "attention.png", "positions.png"))
    if shown is not None:  # 2 layers x 2 heads of (T, T) attention; (C, T) and (T, T) positions
        assert shown == [(16, 16)] * 4 + [(32, 16), (16, 16)]  # the sample cropped to T
    else:  # real matplotlib (CI installs it): real PNGs of sane size
        for f in ("loss.png", "attention.png", "positions.png"):
            assert_png(tmp_path / f)


def test_sample_only_plot_writes_the_figures_too(text_file, tmp_path, monkeypatch):
    """Training and --sample-only write samples and figures through the one write_samples."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        matplotlib, _ = fake_matplotlib()
        monkeypatch.setitem(sys.modules, "matplotlib", matplotlib)
        monkeypatch.setitem(sys.modules, "matplotlib.pyplot", matplotlib.pyplot)
    gpt.main(tiny_flags(text_file, tmp_path, "--max-iters", "2"))
    assert not any((tmp_path / f).exists() for f in ("loss.png", "attention.png", "positions.png"))
    texts = gpt.main(["--sample-only", "--out-dir", str(tmp_path), "--device", "cpu", "--plot",
                      "--num-samples", "2", "--max-new-tokens", "20"])["samples"]
    assert all((tmp_path / f).is_file() for f in ("loss.png", "attention.png", "positions.png"))
    assert (tmp_path / "samples.txt").read_text() == ("\n" + "-" * 40 + "\n").join(texts) + "\n"


def test_tensorboard_mirrors_the_log(text_file, tmp_path, monkeypatch):
    scalars = []
    writer = types.SimpleNamespace(add_scalar=lambda name, value, step: scalars.append((name, step)))
    fake = types.SimpleNamespace(SummaryWriter=lambda log_dir: writer)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    gpt.main(tiny_flags(text_file, tmp_path, "--max-iters", "2", "--tensorboard"))
    assert ("loss", 1) in scalars and ("val_loss", 2) in scalars and ("lr", 0) in scalars


def test_attention_maps_are_causal_distributions():
    torch.manual_seed(0)
    model = gpt.GPT(TINY).eval()
    maps = gpt.attention_maps(model, torch.randint(0, 40, (1, 10)))
    assert maps.shape == (2, 2, 10, 10)
    torch.testing.assert_close(maps.sum(-1), torch.ones(2, 2, 10))
    assert torch.all(maps.triu(diagonal=1) == 0)


def test_ddp_two_processes_match_one_process(text_file, tmp_path):
    flags = tiny_flags(text_file, "OUT", "--max-iters", "3", "--eval-interval", "3",
                       "--gradient-accumulation-steps", "2", "--num-samples", "1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "gpt.py"), *[str(tmp_path / "two") if f == "OUT" else f for f in flags]]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    single = gpt.main([str(tmp_path / "one") if f == "OUT" else f for f in flags])  # meanwhile
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-2000:]
    assert "ddp world_size=2" in stdout
    one, two = train_records(tmp_path / "one"), train_records(tmp_path / "two")
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-5), (a, b)
    done = json.loads((tmp_path / "two" / "log.jsonl").read_text().splitlines()[-1])
    assert math.isclose(done["val_loss"], single["val_loss"], rel_tol=1e-5)


# ---- the kept model: the weights of the best val loss (issue 27) ------------------------------
def overfit_flags(data, out_dir, *extra):
    """A run whose val loss falls to iter 40 (2.016: the letter frequencies learnt), then rises
    (2.060, 2.077, 2.115 at 80, 120, 160: the training text memorised)."""
    return ["--data", str(data), "--out-dir", str(out_dir), "--device", "cpu", "--n-layer", "2",
            "--n-head", "2", "--n-embd", "48", "--block-size", "16", "--batch-size", "32",
            "--eval-iters", "2", "--eval-interval", "40", "--learning-rate", "1e-2",
            "--warmup-iters", "2", "--lr-decay-iters", "160", "--dropout", "0",
            "--num-samples", "1", "--max-new-tokens", "8", "--prompt", "a", *extra]


def eval_records(out_dir):
    records = [json.loads(line) for line in (Path(out_dir) / "log.jsonl").read_text().splitlines()]
    return [r for r in records if "val_loss" in r and "event" not in r]


@pytest.fixture(scope="module")
def overfit(tmp_path_factory):
    """One uninterrupted 160-step run on text whose training split is one 300-character text
    repeated and whose validation split is fresh text with the same letter frequencies."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rng = random.Random(0)
    chars, w = "abcdefghij ", [30, 20, 12, 8, 6, 5, 4, 3, 2, 1, 9]
    text = "".join(rng.choices(chars, w, k=300)) * 12 + "".join(rng.choices(chars, w, k=400))
    folder = tmp_path_factory.mktemp("overfit")
    data, out = folder / "overfit.txt", folder / "straight"
    data.write_text(text)
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        done = gpt.main(overfit_flags(data, out, "--max-iters", "160"))
    torch.set_num_threads(threads)
    return types.SimpleNamespace(data=data, out=out, done=done, stdout=stdout.getvalue())


def val_loss_of(weights, ckpt, data_path):
    """The val loss of `weights` on the evaluation batches of the run that saved `ckpt`."""
    model = gpt.GPT(gpt.ModelConfig(**ckpt["model_args"]))
    model.load_state_dict(weights)
    tokenizer = gpt.tokenizer_from_state(ckpt["tokenizer"])
    data = gpt.load_tokens(data_path, data_path.read_text(), tokenizer)
    return gpt.estimate_loss(model, data, 32, 2, 1337, "cpu", contextlib.nullcontext())["val"]


def test_only_a_strictly_lower_val_loss_replaces_the_kept_copy(capsys):
    log, model = types.SimpleNamespace(write=lambda record: None), gpt.GPT(TINY)
    best = {"model": None, "best_val_loss": math.inf, "best_iter": 0}
    record, best = gpt.log_eval(log, 0, {"train": 2.0, "val": 2.0}, best, model, 0.0, "out")
    assert record["best_iter"] == 0 and best["best_val_loss"] == 2.0  # the first eval sets it
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)  # training goes on: the kept copy must not follow
    assert torch.equal(best["model"]["lm_head.weight"] + 1.0, model.lm_head.weight)
    assert all(v.device.type == "cpu" for v in best["model"].values())
    _, tie = gpt.log_eval(log, 5, {"train": 1.9, "val": 2.0}, best, model, 0.0, "out")
    assert tie is best  # equal is not better
    record, lower = gpt.log_eval(log, 10, {"train": 1.9, "val": 1.99}, best, model, 0.0, "out")
    assert record["best_iter"] == lower["best_iter"] == 10
    assert torch.equal(lower["model"]["lm_head.weight"], model.lm_head.weight)


def test_the_done_record_names_the_best_val_loss_and_its_iter(overfit):
    evals = eval_records(overfit.out)
    vals = {r["iter"]: r["val_loss"] for r in evals}
    assert list(vals) == [0, 40, 80, 120, 160]
    assert min(vals, key=vals.get) == 40 and vals[160] - vals[40] > 0.05  # best strictly inside
    assert [r["best_iter"] for r in evals] == [0, 40, 40, 40, 40]  # the first eval sets it
    done = json.loads((overfit.out / "log.jsonl").read_text().splitlines()[-1])
    assert done["event"] == "done" and done["best_iter"] == overfit.done["best_iter"] == 40
    assert done["best_val_loss"] == overfit.done["best_val_loss"] == vals[40]
    assert done["val_loss"] == vals[160]  # the last evaluation's, as before
    assert (f"kept the model of iter 40 (val loss {vals[40]:.4f}); ckpt.pt also holds iter "
            f"160's for --resume") in overfit.stdout


def test_the_checkpoint_holds_the_kept_weights_and_the_last_ones(overfit):
    ckpt = torch.load(overfit.out / "ckpt.pt", map_location="cpu", weights_only=True)
    vals = {r["iter"]: r["val_loss"] for r in eval_records(overfit.out)}
    assert ckpt["iter"] == 160 and ckpt["best_iter"] == 40 and ckpt["best_val_loss"] == vals[40]
    assert list(ckpt["model"]) == list(ckpt["model_last"])
    assert not all(torch.equal(ckpt["model"][k], ckpt["model_last"][k]) for k in ckpt["model"])
    assert val_loss_of(ckpt["model"], ckpt, overfit.data) == vals[40]  # exactly
    assert val_loss_of(ckpt["model_last"], ckpt, overfit.data) == vals[160]


def test_samples_come_from_the_kept_weights(overfit, tmp_path):
    """The end-of-run samples and --sample-only both use `model`, not `model_last`."""
    ckpt = torch.load(overfit.out / "ckpt.pt", map_location="cpu", weights_only=True)
    tokenizer = gpt.tokenizer_from_state(ckpt["tokenizer"])

    def samples(weights, num_samples, max_new_tokens):
        model = gpt.GPT(gpt.ModelConfig(**ckpt["model_args"]))
        model.load_state_dict(weights)
        cfg = gpt.Config(prompt="a", num_samples=num_samples, max_new_tokens=max_new_tokens)
        with contextlib.redirect_stdout(io.StringIO()):
            return gpt.write_samples(model, tokenizer, cfg, "cpu", tmp_path,
                                     contextlib.nullcontext())

    end_of_run = (overfit.out / "samples.txt").read_text()  # the run's: 1 sample of 8 tokens
    assert samples(ckpt["model"], 1, 8) == [end_of_run.removesuffix("\n")]
    assert samples(ckpt["model_last"], 1, 8) != [end_of_run.removesuffix("\n")]
    kept, last = samples(ckpt["model"], 3, 40), samples(ckpt["model_last"], 3, 40)
    assert kept != last  # the two models sample differently: the test can tell them apart
    argv = ["--sample-only", "--out-dir", str(overfit.out), "--device", "cpu", "--prompt", "a",
            "--num-samples", "3", "--max-new-tokens", "40"]
    with contextlib.redirect_stdout(io.StringIO()):
        assert gpt.main(argv)["samples"] == kept


def test_resume_past_the_best_repeats_the_uninterrupted_run(overfit, tmp_path):
    out = tmp_path / "resumed"
    with contextlib.redirect_stdout(io.StringIO()):
        gpt.main(overfit_flags(overfit.data, out, "--max-iters", "80"))  # "killed" at 80
        middle = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=True)
        assert middle["best_iter"] == 40 and "model_last" in middle
        done = gpt.main(["--resume", "--max-iters", "160", "--out-dir", str(out)])
    a, b = train_records(overfit.out), train_records(out)
    assert [r["iter"] for r in b] == list(range(160))
    assert [(r["loss"], r["lr"]) for r in a] == [(r["loss"], r["lr"]) for r in b]  # bit-exact
    evals = [[{k: v for k, v in r.items() if k != "elapsed_s"} for r in eval_records(d)]
             for d in (overfit.out, out)]
    assert evals[0] == evals[1]  # val losses and best_iter, eval for eval
    assert (done["best_iter"], done["best_val_loss"]) == (40, overfit.done["best_val_loss"])
    final = [torch.load(d / "ckpt.pt", map_location="cpu", weights_only=True)
             for d in (overfit.out, out)]
    assert [c["best_iter"] for c in final] == [40, 40]
    assert final[0]["best_val_loss"] == final[1]["best_val_loss"]
    for key in ("model", "model_last"):
        for name, tensor in final[0][key].items():
            assert torch.equal(tensor, final[1][key][name]), (key, name)


def test_a_checkpoint_without_best_iter_still_resumes(overfit, tmp_path):
    """An older checkpoint: `model` is the last step's, no model_last, no best_iter."""
    out = tmp_path / "old"
    out.mkdir()
    ckpt = gpt.load_checkpoint(overfit.out / "ckpt.pt", ["gpt.py"])
    ckpt["model"] = ckpt.pop("model_last")
    del ckpt["best_iter"]
    gpt.save_checkpoint(ckpt, out / "ckpt.pt")
    with contextlib.redirect_stdout(io.StringIO()):
        done = gpt.main(["--resume", "--max-iters", "160", "--out-dir", str(out)])
    assert done["val_loss"] == overfit.done["val_loss"]  # it went on from `model`, the last
    assert done["best_iter"] == 160 and done["best_val_loss"] == ckpt["best_val_loss"]
    again = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=True)
    assert again["best_iter"] == 160 and "model_last" not in again


# ---- OpenAI GPT-2 weights --------------------------------------------------------------------
def write_safetensors(path, tensors):
    """A minimal safetensors writer (the format read_safetensors documents)."""
    names = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, t in tensors.items():
        blob = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes
    Path(path).write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


def gpt2_weights(n_layer=2, n_embd=32, vocab=64, n_positions=24, prefix=""):
    """Random weights in GPT-2's Hugging Face layout: Conv1D weights are (in, out)."""
    g = torch.Generator().manual_seed(0)
    C = n_embd
    shapes = {"wte.weight": (vocab, C), "wpe.weight": (n_positions, C), "ln_f.weight": (C,), "ln_f.bias": (C,)}
    for i in range(n_layer):
        shapes.update({f"h.{i}.ln_1.weight": (C,), f"h.{i}.ln_1.bias": (C,),
                       f"h.{i}.attn.c_attn.weight": (C, 3 * C), f"h.{i}.attn.c_attn.bias": (3 * C,),
                       f"h.{i}.attn.c_proj.weight": (C, C), f"h.{i}.attn.c_proj.bias": (C,),
                       f"h.{i}.ln_2.weight": (C,), f"h.{i}.ln_2.bias": (C,),
                       f"h.{i}.mlp.c_fc.weight": (C, 4 * C), f"h.{i}.mlp.c_fc.bias": (4 * C,),
                       f"h.{i}.mlp.c_proj.weight": (4 * C, C), f"h.{i}.mlp.c_proj.bias": (C,)})
    w = {prefix + k: torch.randn(s, generator=g) * 0.2 + (1.0 if k.endswith("ln_1.weight") else 0.0)
         for k, s in shapes.items()}
    if prefix:  # files saved from GPT2LMHeadModel also hold the (tied) head
        w["lm_head.weight"] = w[prefix + "wte.weight"]
    for i in range(n_layer):  # the buffers HF files carry and the loader must ignore
        w[f"{prefix}h.{i}.attn.bias"] = torch.tril(torch.ones(n_positions, n_positions))[None, None]
        w[f"{prefix}h.{i}.attn.masked_bias"] = torch.tensor([-1e4])
    return w


def reference_gpt2_logits(w, idx, n_layer, n_head):
    """GPT-2's forward written out plainly from the HF tensors (float64, one head at a time)."""
    w = {k.removeprefix("transformer."): v.double() for k, v in w.items()}
    T = len(idx)
    C = w["wte.weight"].shape[1]
    hs = C // n_head

    def layer_norm(x, name):
        mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
        return (x - mu) / torch.sqrt(var + 1e-5) * w[name + ".weight"] + w[name + ".bias"]

    def gelu_tanh(x):
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))

    x = w["wte.weight"][idx] + w["wpe.weight"][:T]  # (T, C)
    for i in range(n_layer):
        p = f"h.{i}."
        qkv = layer_norm(x, p + "ln_1") @ w[p + "attn.c_attn.weight"] + w[p + "attn.c_attn.bias"]
        q, k, v = qkv[:, :C], qkv[:, C:2 * C], qkv[:, 2 * C:]
        heads = []
        for h in range(n_head):
            s = slice(h * hs, (h + 1) * hs)
            scores = q[:, s] @ k[:, s].T / math.sqrt(hs)
            scores = scores + torch.triu(torch.full((T, T), float("-inf"), dtype=torch.float64), 1)
            heads.append(torch.softmax(scores, -1) @ v[:, s])
        x = x + torch.cat(heads, -1) @ w[p + "attn.c_proj.weight"] + w[p + "attn.c_proj.bias"]
        hidden = gelu_tanh(layer_norm(x, p + "ln_2") @ w[p + "mlp.c_fc.weight"] + w[p + "mlp.c_fc.bias"])
        x = x + hidden @ w[p + "mlp.c_proj.weight"] + w[p + "mlp.c_proj.bias"]
    return layer_norm(x, "ln_f") @ w["wte.weight"].T  # (T, V)


def load_dir(folder):
    config, path = gpt.pretrained_config(str(folder))
    model = gpt.GPT(config).eval()
    gpt.load_gpt2_weights(model, gpt.read_safetensors(path))
    return model


def make_gpt2_dir(folder, prefix="", vocab=64):
    folder.mkdir()
    w = gpt2_weights(vocab=vocab, prefix=prefix)
    write_safetensors(folder / "model.safetensors", w)
    (folder / "config.json").write_text(json.dumps(
        {"n_layer": 2, "n_head": 4, "n_embd": 32, "n_positions": 24, "vocab_size": vocab,
         "activation_function": "gelu_new"}))
    return w


@pytest.mark.parametrize("prefix", ["", "transformer."])
def test_gpt2_safetensors_loader_matches_a_reference(tmp_path, prefix):
    w = make_gpt2_dir(tmp_path / "m", prefix)
    model = load_dir(tmp_path / "m")
    assert model.config.gelu == "tanh" and model.config.bias and model.config.block_size == 24
    idx = torch.randint(0, 64, (20,), generator=torch.Generator().manual_seed(1))
    logits, _ = model(idx[None])
    torch.testing.assert_close(logits[0].double(), reference_gpt2_logits(w, idx, 2, 4), atol=1e-4, rtol=1e-4)


def test_safetensors_reader_decodes_half_precision(tmp_path):
    t = torch.randn(3, 5)
    write_safetensors(tmp_path / "x.safetensors", {"a": t.half(), "b": t.bfloat16(), "c": t})
    got = gpt.read_safetensors(tmp_path / "x.safetensors")
    assert torch.equal(got["a"], t.half()) and torch.equal(got["b"], t.bfloat16()) and torch.equal(got["c"], t)


def test_truncated_safetensors_is_a_one_line_error(tmp_path, capsys):
    write_safetensors(tmp_path / "x.safetensors", {"a": torch.randn(100)})
    (tmp_path / "x.safetensors").write_bytes((tmp_path / "x.safetensors").read_bytes()[:-8])
    with pytest.raises(SystemExit) as e:
        gpt.read_safetensors(tmp_path / "x.safetensors")
    assert e.value.code == 2 and "truncated" in capsys.readouterr().err


def test_gpt2_loader_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    make_gpt2_dir(tmp_path / "m")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "m").eval()
    idx = torch.randint(0, 64, (2, 20))
    torch.testing.assert_close(load_dir(tmp_path / "m")(idx)[0], hf(idx).logits, atol=1e-4, rtol=1e-4)


def tiktoken_gpt2_cached():
    """Whether tiktoken can build the gpt2 encoding from its cache, without the network."""
    cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR") \
        or os.path.join(tempfile.gettempdir(), "data-gym-cache")
    urls = ["https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
            "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json"]
    return all(os.path.isfile(os.path.join(cache, hashlib.sha1(u.encode()).hexdigest())) for u in urls)


@pytest.mark.skipif(not tiktoken_gpt2_cached(), reason="tiktoken's gpt2 files are not cached (set TIKTOKEN_CACHE_DIR)")
def test_sample_only_from_gpt2_folder(tmp_path, capsys):
    make_gpt2_dir(tmp_path / "m", vocab=50257)
    argv = ["--sample-only", "--init-from", str(tmp_path / "m"), "--prompt", "Hello, world",
            "--num-samples", "2", "--max-new-tokens", "5", "--out-dir", str(tmp_path / "out"),
            "--device", "cpu", "--temperature", "0"]
    texts = gpt.main(argv)["samples"]
    out = capsys.readouterr().out
    assert len(texts) == 2 and texts[0] == texts[1] and texts[0].startswith("Hello, world") and texts[0] in out


# ---- errors (docs/design.md section 6) ---------------------------------------------------------
def test_corrupt_checkpoint_is_a_one_line_error(text_file, tmp_path, capsys):
    gpt.main(tiny_flags(text_file, tmp_path, "--max-iters", "1"))
    ckpt = tmp_path / "ckpt.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])  # truncated
    err = run_error(capsys, ["--resume", "--out-dir", str(tmp_path)])
    assert "corrupted or truncated" in err


def test_existing_checkpoint_needs_resume_or_overwrite(text_file, tmp_path, capsys):
    gpt.main(tiny_flags(text_file, tmp_path, "--max-iters", "1"))
    before = (tmp_path / "ckpt.pt").read_bytes()
    err = run_error(capsys, tiny_flags(text_file, tmp_path, "--max-iters", "1"))
    assert "--resume" in err and "--overwrite" in err
    assert (tmp_path / "ckpt.pt").read_bytes() == before
    gpt.main(tiny_flags(text_file, tmp_path, "--max-iters", "1", "--overwrite"))


def test_init_from_offline_names_the_local_folder_way_out(tmp_path, monkeypatch, capsys):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(gpt.urllib.request, "urlopen", offline)
    monkeypatch.setattr(gpt, "DATA_DIR", tmp_path)
    with pytest.raises(SystemExit) as e:
        gpt.pretrained_config("gpt2")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "openai-community/gpt2/" in err and "--init-from DIR" in err and "--data" not in err
    assert list(tmp_path.iterdir()) == []  # no partial download left behind


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_device_cuda_without_cuda_is_an_error(text_file, tmp_path, capsys):
    err = run_error(capsys, ["--device", "cuda", "--data", str(text_file), "--out-dir", str(tmp_path)])
    assert "CUDA is not available" in err


def test_bad_values_are_errors(text_file, tmp_path, capsys):
    assert "--pos" in run_error(capsys, tiny_flags(text_file, tmp_path, "--pos", "rotary"))
    assert "multiple" in run_error(capsys, tiny_flags(text_file, tmp_path, "--n-head", "3"))
    assert "--init-from" in run_error(capsys, tiny_flags(text_file, tmp_path, "--init-from", str(tmp_path / "nope")))
