"""Tests for mlp.py: the Bengio MLP and the GRU language models, their data, loop and sampling.

Run: python -m pytest -q tests/test_mlp.py

Tiny models on tiny data made in tmp_path, CPU, seeded; no network, no data/ folder.
"""
import base64
import dataclasses
import json
import math
import random

import pytest
import torch
import torch.nn as nn

import mlp
from conftest import assert_png

TINY = ["--block-size", "4", "--n-embd", "8", "--n-hidden", "32", "--batch-size", "16",
        "--eval-iters", "2", "--log-interval", "1", "--device", "cpu"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and a thread pool on a busy machine can be
    slower by 10x; the setting is restored for the other test files."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def names_file(tmp_path):
    rng = random.Random(0)
    words = ["".join(rng.choices("abcdefghij", k=rng.randint(3, 8))) for _ in range(300)]
    path = tmp_path / "names.txt"
    path.write_text("\n".join(words) + "\n")
    return path


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("the cat sat on the mat, and then the cat ran off.\n" * 60)
    return path


def run(tmp_path, data, *args, out="out"):
    """main() on tiny settings; returns (done record, log records)."""
    out_dir = tmp_path / out
    done = mlp.main(["--data", str(data), "--out-dir", str(out_dir), *TINY, *args])
    records = [json.loads(ln) for ln in (out_dir / "log.jsonl").read_text().splitlines()]
    return done, records


def tiny_model(kind, vocab_size=11, block_size=5, dropout=0.0):
    torch.manual_seed(0)
    mc = mlp.ModelConfig(model=kind, vocab_size=vocab_size, block_size=block_size, n_embd=8,
                         n_hidden=16, dropout=dropout)
    return mlp.build_model(mc)


@pytest.mark.parametrize("kind", ["mlp", "gru"])
def test_shapes_and_init_loss(kind):
    model = tiny_model(kind, vocab_size=27)
    idx = torch.randint(27, (64, 5))
    logits, loss = model(idx, torch.randint(27, (64,)))
    assert logits.shape == (64, 27) and loss.shape == ()
    assert model(idx)[1] is None
    # the small output layer makes the first prediction nearly uniform: loss ~ ln(V)
    assert abs(loss.item() - math.log(27)) < 0.02


def test_gru_cell_matches_torch_grucell():
    """Our GRU step vs torch.nn.GRUCell with copied weights, over a whole sequence.

    PyTorch stacks the gates as (r, z, n) and updates h' = (1 - z) * n + z * h; ours are
    (z, r, n) with h' = (1 - z) * h + z * n, so our z is PyTorch's 1 - z: sigmoid(-a) = 1 -
    sigmoid(a), hence the update-gate weights and biases are copied with their sign flipped.
    """
    model = tiny_model("gru")
    cell = nn.GRUCell(8, 16)
    with torch.no_grad():
        for ours, w_pt in ((model.w_x, cell.weight_ih), (model.w_h, cell.weight_hh)):
            r, z, n = w_pt.chunk(3)
            ours.weight.copy_(torch.cat([-z, r, n]))
        for ours, b_pt in ((model.w_x, cell.bias_ih), (model.w_h, cell.bias_hh)):
            r, z, n = b_pt.chunk(3)
            ours.bias.copy_(torch.cat([-z, r, n]))
    idx = torch.randint(11, (4, 5))
    emb = model.wte(idx)
    h_ours = torch.zeros(4, 16)
    h_ref = torch.zeros(4, 16)
    for t in range(5):
        h_ours = model.cell(model.w_x(emb[:, t]), h_ours)
        h_ref = cell(emb[:, t], h_ref)
        assert torch.allclose(h_ours, h_ref, rtol=1e-5, atol=1e-6)
    # forward() runs the same recurrence and reads out the last state
    assert torch.allclose(model(idx)[0], model.lm_head(h_ref), rtol=1e-5, atol=1e-6)


def test_sample_logits_top_k_top_p_stay_in_allowed_set():
    logits = torch.tensor([[3.0, 2.5, 2.0, 0.0, -1.0, -2.0]]).repeat(500, 1)
    gen = torch.Generator().manual_seed(0)
    top2 = mlp.sample_logits(logits, top_k=2, generator=gen)
    assert set(top2.flatten().tolist()) == {0, 1}
    # probabilities ~ .46 .28 .17 .02 ...: the nucleus for p=0.7 is {0, 1}, for p=0.8 {0, 1, 2}
    assert set(mlp.sample_logits(logits, top_p=0.7, generator=gen).flatten().tolist()) == {0, 1}
    assert set(mlp.sample_logits(logits, top_p=0.8, generator=gen).flatten().tolist()) == {0, 1, 2}
    assert set(mlp.sample_logits(logits, temperature=0).flatten().tolist()) == {0}


def test_lines_split_pads_each_item_with_the_boundary():
    split = mlp.lines_split([[5, 6], [7]], block_size=3, boundary=0)
    assert split.tokens.tolist() == [0, 0, 0, 5, 6, 0, 0, 0, 7, 0, 0, 0]
    x, y = mlp.examples(split, split.targets, 3, False, "cpu")
    # makemore part 2: "..." -> 5, "..5" -> 6, ".56" -> end; then the next item from "..."
    assert x.tolist() == [[0, 0, 0], [0, 0, 5], [0, 5, 6], [0, 0, 0], [0, 0, 7]]
    assert y.tolist() == [5, 6, 0, 7, 0]
    # every target: one window per item from the boundary before it; the item's length is
    # not given away (both windows start with one boundary), what follows it is ignored
    x, y = mlp.examples(split, split.ends, 3, True, "cpu")
    assert x.tolist() == [[0, 5, 6], [0, 7, 0]]
    assert y.tolist() == [[5, 6, 0], [7, 0, mlp.IGNORE_INDEX]]


def test_gru_every_target_loss_equals_prefix_by_prefix_loss():
    """Reading out all T states at once == running the GRU on each prefix separately."""
    model = tiny_model("gru")
    idx = torch.randint(11, (3, 5))
    y = torch.randint(11, (3, 5))
    y[0, :2] = mlp.IGNORE_INDEX
    _, loss = model(idx, y)
    nll = [nn.functional.cross_entropy(model(idx[:, :t + 1])[0], y[:, t], reduction="sum",
                                       ignore_index=mlp.IGNORE_INDEX) for t in range(5)]
    assert torch.allclose(loss, sum(nll) / 13, rtol=1e-5, atol=1e-6)


def test_guess_format():
    assert mlp.guess_format("emma\nolivia\nava\n") == "lines"
    prose = "First Citizen:\nBefore we proceed any further, hear me speak.\n"
    assert mlp.guess_format(prose) == "text"


def test_get_lr_warmup_cosine_floor():
    assert mlp.get_lr(0, 1.0, 0.1, 10, 110) == pytest.approx(1 / 11)
    assert mlp.get_lr(10, 1.0, 0.1, 10, 110) == pytest.approx(1.0)
    assert mlp.get_lr(60, 1.0, 0.1, 10, 110) == pytest.approx(0.55)
    assert mlp.get_lr(500, 1.0, 0.1, 10, 110) == 0.1


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        mlp.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--block-size" in out and "--top-p" in out and "--max-time" in out


@pytest.mark.parametrize("kind", ["mlp", "gru"])
def test_smoke_two_steps_lines_then_sample_only(tmp_path, names_file, kind, capsys):
    done, records = run(tmp_path, names_file, "--model", kind, "--max-iters", "2")
    assert done["event"] == "done" and done["model"] == kind and records[-1] == done
    assert math.isfinite(done["test_loss"])
    assert [r["iter"] for r in records if "loss" in r] == [0, 1]
    assert {"lr", "ms_per_iter", "tokens_per_s", "elapsed_s"} <= records[1].keys()
    ckpt = mlp.load_checkpoint(tmp_path / "out" / "ckpt.pt", ["mlp.py"])
    assert ckpt["config"]["format"] == "lines" and ckpt["iter"] == 2
    assert ckpt["tokenizer"] == {"kind": "char", "chars": "\nabcdefghij"}
    # the checkpoint regenerates exactly the samples written at the end of training
    written = (tmp_path / "out" / "samples.txt").read_text().splitlines()
    again = mlp.main(["--sample-only", "--out-dir", str(tmp_path / "out"), "--device", "cpu"])
    assert again["samples"] == written and len(written) == 10
    assert all("\n" not in s for s in written)


def test_gru_defaults_apply_unless_given(tmp_path, names_file, capsys):
    run(tmp_path, names_file, "--model", "gru", "--max-iters", "0", "--n-hidden", "24")
    args = mlp.load_checkpoint(tmp_path / "out" / "ckpt.pt", ["mlp.py"])["model_args"]
    assert args["n_hidden"] == 24  # given on the command line
    assert args["block_size"] == 4  # given (TINY), although GRU_DEFAULTS has 16
    mlp.main(["--data", str(names_file), "--model", "gru", "--max-iters", "0", "--eval-iters", "1",
              "--out-dir", str(tmp_path / "g"), "--n-hidden", "8", "--device", "cpu"])
    args = mlp.load_checkpoint(tmp_path / "g" / "ckpt.pt", ["mlp.py"])["model_args"]
    assert args["block_size"] == mlp.GRU_DEFAULTS["block_size"]


def test_text_format_and_overfit(tmp_path, text_file, capsys):
    done, records = run(tmp_path, text_file, "--max-iters", "150", "--eval-interval", "150",
                        "--learning-rate", "1e-2")
    evals = [r for r in records if "train_loss" in r]
    assert evals[0]["iter"] == 0 and evals[-1]["iter"] == 150
    # one sentence repeated: the loss must fall far below its value at init
    assert evals[-1]["train_loss"] < 0.5 * evals[0]["train_loss"]
    ckpt = mlp.load_checkpoint(tmp_path / "out" / "ckpt.pt", ["mlp.py"])
    assert ckpt["config"]["format"] == "text"


def test_same_seed_same_losses(tmp_path, names_file, capsys):
    runs = [run(tmp_path, names_file, "--max-iters", "5", "--dropout", "0.1", out=o)[1]
            for o in ("a", "b")]
    losses = [[r["loss"] for r in rec if "loss" in r] for rec in runs]
    assert len(losses[0]) == 5 and losses[0] == losses[1]
    other = run(tmp_path, names_file, "--max-iters", "5", "--seed", "7", out="c")[1]
    assert [r["loss"] for r in other if "loss" in r] != losses[0]


def test_checkpoint_round_trip_identical_logits(tmp_path):
    model = tiny_model("gru")
    idx = torch.randint(11, (3, 5))
    mlp.save_checkpoint({"script": "mlp.py", "model_args": dataclasses.asdict(model.config),
                         "model": model.state_dict()}, tmp_path / "ckpt.pt")
    ckpt = mlp.load_checkpoint(tmp_path / "ckpt.pt", ["mlp.py"])
    loaded = mlp.build_model(mlp.ModelConfig(**ckpt["model_args"]))
    loaded.load_state_dict(ckpt["model"])
    assert torch.equal(loaded(idx)[0], model(idx)[0])


@pytest.mark.parametrize("kind", ["mlp", "gru"])
def test_kill_and_resume_is_bit_exact(tmp_path, names_file, monkeypatch, kind, capsys):
    args = ["--model", kind, "--max-iters", "8", "--eval-interval", "4", "--dropout", "0.2"]
    done_a, full = run(tmp_path, names_file, *args, out="a")

    real_get_lr = mlp.get_lr

    def killed_at_6(step, *a):  # dies mid-run, after the checkpoint of iter 4
        if step == 6:
            raise KeyboardInterrupt
        return real_get_lr(step, *a)

    monkeypatch.setattr(mlp, "get_lr", killed_at_6)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, names_file, *args, out="b")
    monkeypatch.setattr(mlp, "get_lr", real_get_lr)
    done_b, resumed = run(tmp_path, names_file, *args, "--resume", out="b")

    expected = {r["iter"]: r["loss"] for r in full if "loss" in r}
    got = [(r["iter"], r["loss"]) for r in resumed if "loss" in r]
    assert [i for i, _ in got] == list(range(8))  # the killed run's iters 4 and 5 are dropped
    assert all(loss == expected[i] for i, loss in got)
    assert done_b["test_loss"] == done_a["test_loss"]


def test_resume_with_other_model_flags_is_an_error(tmp_path, names_file, capsys):
    run(tmp_path, names_file, "--max-iters", "0")
    with pytest.raises(SystemExit) as e:
        run(tmp_path, names_file, "--max-iters", "2", "--n-hidden", "64", "--resume")
    assert e.value.code == 2 and "resume with the flags" in capsys.readouterr().err


def test_corrupted_checkpoint_one_line_error(tmp_path, names_file, capsys):
    run(tmp_path, names_file, "--max-iters", "0")
    ckpt = tmp_path / "out" / "ckpt.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:200])  # truncated
    capsys.readouterr()
    for extra in (["--resume", "--max-iters", "2"], ["--sample-only"]):
        with pytest.raises(SystemExit) as e:
            run(tmp_path, names_file, *extra)
        err = capsys.readouterr().err
        assert e.value.code == 2
        assert err.startswith("error: cannot read checkpoint") and err.count("\n") == 1


def test_existing_checkpoint_needs_resume_or_overwrite(tmp_path, names_file, capsys):
    run(tmp_path, names_file, "--max-iters", "0")
    with pytest.raises(SystemExit) as e:
        run(tmp_path, names_file, "--max-iters", "0")
    assert e.value.code == 2 and "--overwrite" in capsys.readouterr().err
    run(tmp_path, names_file, "--max-iters", "0", "--overwrite")


def write_tiny_bpe(prefix):
    """A bpe.py-format tokenizer: 256 single bytes, then merges in rank order, one special."""
    merges = [b"th", b"he", b"the", b"at", b"the "]
    tokens = [bytes([i]) for i in range(256)] + merges
    lines = [f"{base64.b64encode(t).decode()} {rank}" for rank, t in enumerate(tokens)]
    (prefix.parent / (prefix.name + ".tiktoken")).write_text("\n".join(lines) + "\n")
    meta = {"pattern": None, "special": {"<|endoftext|>": len(tokens)},
            "vocab_size": len(tokens) + 1}
    (prefix.parent / (prefix.name + ".json")).write_text(json.dumps(meta))
    return len(tokens) + 1


def test_bpe_tokenizer_path(tmp_path, text_file, names_file, capsys):
    vocab = write_tiny_bpe(tmp_path / "tiny")
    tok = mlp.Tokenizer.from_bpe(mlp.load_bpe(tmp_path / "tiny.tiktoken"))
    assert tok.vocab_size == vocab and tok.boundary == vocab - 1
    ids = tok.encode("the cat sat")
    assert ids[0] == 260 and tok.decode(ids) == "the cat sat"  # "the " merged to one token
    # the checkpoint's plain-data state rebuilds the same tokenizer
    assert mlp.Tokenizer(tok.state).encode("the cat sat") == ids
    done, _ = run(tmp_path, text_file, "--tokenizer", str(tmp_path / "tiny"), "--max-iters", "2")
    ckpt = mlp.load_checkpoint(tmp_path / "out" / "ckpt.pt", ["mlp.py"])
    assert ckpt["model_args"]["vocab_size"] == vocab and ckpt["tokenizer"]["kind"] == "tiktoken"
    # lines mode: each name is closed by the special token
    run(tmp_path, names_file, "--tokenizer", str(tmp_path / "tiny"), "--max-iters", "2", out="n")
    samples = mlp.main(["--sample-only", "--out-dir", str(tmp_path / "n"), "--device", "cpu"])
    assert len(samples["samples"]) == 10
    assert not any("<|endoftext|>" in s for s in samples["samples"])


def test_plot_writes_pngs_or_says_matplotlib_is_missing(tmp_path, names_file, capsys):
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with pytest.raises(SystemExit) as e:
            run(tmp_path, names_file, "--max-iters", "2", "--plot")
        assert e.value.code == 2 and "matplotlib" in capsys.readouterr().err
        assert not (tmp_path / "out").exists()  # refused before any work
    else:
        run(tmp_path, names_file, "--max-iters", "2", "--plot")
        assert_png(tmp_path / "out" / "embeddings.png")
        assert_png(tmp_path / "out" / "loss.png")


def test_max_time_stops_early_and_decays_the_lr_by_the_clock(tmp_path, names_file, monkeypatch,
                                                             capsys):
    clock = iter(range(10**6))  # a fake clock: every reading is one second later
    monkeypatch.setattr(mlp.time, "time", lambda: float(next(clock)))
    done, records = run(tmp_path, names_file, "--max-iters", "1000", "--max-time", "60",
                        "--warmup-iters", "0", "--eval-interval", "1000")
    assert 0 < done["iters"] < 1000 and math.isfinite(done["test_loss"])
    steps = [r for r in records if "lr" in r]
    # the cosine runs over 60 "seconds" rather than 1000 steps: far lower than by step count
    cfg = mlp.Config()
    by_step = mlp.get_lr(steps[-1]["iter"], cfg.learning_rate, cfg.min_lr, 0, 1000)
    assert steps[-1]["lr"] < 0.5 * by_step


def test_max_time_warmup_counts_steps(tmp_path, names_file, monkeypatch):
    clock = iter(range(0, 10**7, 5))  # a fake clock that runs far ahead of the steps
    monkeypatch.setattr(mlp.time, "time", lambda: float(next(clock)))
    _, records = run(tmp_path, names_file, "--max-iters", "1000", "--max-time", "300",
                     "--warmup-iters", "3", "--eval-interval", "1000", "--log-interval", "1")
    lrs = [r["lr"] for r in records if "lr" in r]
    peak = lrs[0] * 4  # warmup by steps: peak * (s + 1) / 4
    assert lrs[1] == pytest.approx(peak / 2) and lrs[2] == pytest.approx(3 * peak / 4)


# ---- the kept model: the weights of the best val loss (docs/design.md section 4) ------------
OVERFIT = ["--format", "text", "--block-size", "8", "--n-embd", "8", "--n-hidden", "64",
           "--dropout", "0", "--batch-size", "64", "--eval-iters", "4", "--eval-interval", "25",
           "--max-iters", "100", "--learning-rate", "3e-3", "--warmup-iters", "2",
           "--log-interval", "1000", "--num-samples", "2", "--max-new-tokens", "8"]


@pytest.fixture
def overfit_file(tmp_path):
    """The training split is one 300-character text repeated, val and test fresh text with the
    same letter frequencies: val falls while the frequencies are learned, then rises as the
    training text is memorised."""
    rng = random.Random(0)
    chars, w = "abcdefghij ", [30, 20, 12, 8, 6, 5, 4, 3, 2, 1, 9]
    path = tmp_path / "overfit.txt"
    path.write_text("".join(rng.choices(chars, w, k=300)) * 12 + "".join(rng.choices(chars, w, k=900)))
    return path


def test_the_best_val_model_is_kept_and_resume_continues_the_last(tmp_path, overfit_file,
                                                                 monkeypatch):
    done, records = run(tmp_path, overfit_file, *OVERFIT, out="a")
    evals = [r for r in records if "val_loss" in r and "event" not in r]
    best = min(evals, key=lambda r: r["val_loss"])
    assert 0 < best["iter"] < 100 and evals[-1]["val_loss"] > best["val_loss"] + 0.05
    assert done["best_iter"] == best["iter"] and done["best_val_loss"] == best["val_loss"]
    assert evals[-1]["best_iter"] == best["iter"]
    ckpt = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    assert ckpt["best_iter"] == best["iter"] and ckpt["iter"] == 100
    # `model` is the kept model: it scores the best val loss again; `model_last` the last one
    cfg = mlp.Config(**ckpt["config"])
    tok = mlp.Tokenizer(ckpt["tokenizer"])
    _, _, splits = mlp.load_data(cfg, tok)
    model = mlp.build_model(mlp.ModelConfig(**ckpt["model_args"]))
    for key, val in (("model", best["val_loss"]), ("model_last", evals[-1]["val_loss"])):
        model.load_state_dict(ckpt[key])
        torch.manual_seed(0)
        losses = mlp.estimate_losses(model, splits, cfg, "cpu", torch.autocast("cpu", enabled=False))
        assert losses["val"] == pytest.approx(val, abs=1e-6)
    # the end-of-run samples and --sample-only both come from the kept model
    again = mlp.main(["--sample-only", "--out-dir", str(tmp_path / "a"), "--num-samples", "2",
                      "--max-new-tokens", "8", "--device", "cpu"])
    assert mlp.join_samples(again["samples"], "text") == (tmp_path / "a" / "samples.txt").read_text()
    # killed after the checkpoint of iter 75 (kept: iter 25), resumed: the same run and files
    real_get_lr = mlp.get_lr

    def killed_at_80(step, *a):
        if step == 80:
            raise KeyboardInterrupt
        return real_get_lr(step, *a)

    monkeypatch.setattr(mlp, "get_lr", killed_at_80)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, overfit_file, *OVERFIT, out="b")
    monkeypatch.setattr(mlp, "get_lr", real_get_lr)
    done_b, records_b = run(tmp_path, overfit_file, *OVERFIT, "--resume", out="b")
    untimed = [{k: v for k, v in r.items() if not k.endswith("_s") and k != "ms_per_iter"
                and k != "tokens_per_s"} for r in records]
    assert [{k: v for k, v in r.items() if not k.endswith("_s") and k != "ms_per_iter"
             and k != "tokens_per_s"} for r in records_b] == untimed
    ckpt_b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    for key in ("model", "model_last"):
        assert all(torch.equal(ckpt[key][k], ckpt_b[key][k]) for k in ckpt[key])
    assert ckpt_b["best_iter"] == ckpt["best_iter"]
