"""Tests of bigram.py: the counts model, the neural bigram, sampling, checkpoints, the CLI.

Run: python -m pytest -q tests/test_bigram.py

Offline and tiny: every corpus is written into tmp_path by the test itself.
"""
import json
import math
import random
import sys

import pytest
import torch

import bigram
from conftest import assert_png

NAMES = ["emma", "olivia", "ava", "isabella", "sophia", "mia", "amelia", "harper", "evelyn",
         "abigail", "emily", "ella", "elizabeth", "camila", "luna", "sofia", "avery", "mila",
         "aria", "scarlett", "penelope", "layla", "chloe", "victoria", "madison", "eleanor",
         "grace", "nora", "riley", "zoey", "hannah", "hazel", "lily", "ellie", "violet",
         "lillian", "zoe", "stella", "aurora", "natalie"]


@pytest.fixture
def names_file(tmp_path):
    path = tmp_path / "names.txt"
    path.write_text("\n".join(NAMES) + "\n")
    return path


@pytest.fixture(autouse=True)
def one_thread():
    """Tensors this small gain nothing from threads; on a busy CPU, syncing them costs most."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run(args, out_dir, data):
    """main() on tiny data, a fresh out_dir each call."""
    return bigram.main(["--data", str(data), "--out-dir", str(out_dir), *args])


def one_line_error(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_shapes():
    x, y = torch.tensor([0, 1, 2, 1]), torch.tensor([1, 2, 0, 0])
    for model in (bigram.CountsBigram(3, 1.0).fit(x, y), bigram.NeuralBigram(3)):
        logits, loss = model(x, y)
        assert logits.shape == (4, 3) and loss.shape == ()
        assert model(x)[1] is None
        out = bigram.generate(model, torch.zeros(5, 2, dtype=torch.long), 7,
                              generator=torch.Generator().manual_seed(0))
        assert out.shape == (5, 9) and out.max() < 3


def test_generate_stops_each_row_at_the_stop_token():
    x, y = torch.tensor([0, 1, 1, 2]), torch.tensor([1, 1, 2, 0])  # 0 -> 1, 1 -> {1, 2}, 2 -> 0
    model = bigram.CountsBigram(3, 0.0).fit(x, y)
    out = bigram.generate(model, torch.zeros(8, 1, dtype=torch.long), 100,
                          generator=torch.Generator().manual_seed(0), stop=0)
    assert out.shape[1] < 101  # every row reached 0 long before 100 tokens
    for row in out[:, 1:].tolist():
        first = row.index(0)
        assert all(t == 0 for t in row[first:]) and 0 not in row[:first]


def test_get_batch_full_or_seeded_random():
    x, y = torch.arange(100), torch.arange(100) + 1
    assert bigram.get_batch(x, y, 100, None) == (x, y)  # the whole set: full-batch descent

    def batch(seed):
        return bigram.get_batch(x, y, 16, torch.Generator().manual_seed(seed))

    xb, yb = batch(0)
    assert xb.shape == (16,) and torch.equal(yb, xb + 1)  # pairs stay pairs
    assert torch.equal(xb, batch(0)[0]) and not torch.equal(xb, batch(1)[0])


def test_prompt_starts_every_sample(capsys):
    x, y = bigram.bigrams(".ava.ama.emma.", {c: i for i, c in enumerate(".aemv")})
    model = bigram.CountsBigram(5, 0.1).fit(x, y)
    texts = bigram.sample_texts(model, ".aemv", "lines", bigram.Config(prompt="em", num_samples=4))
    assert len(texts) == 4 and all(t.startswith("em") for t in texts)
    with pytest.raises(SystemExit) as e:
        bigram.sample_texts(model, ".aemv", "lines", bigram.Config(prompt="zed"))
    assert e.value.code == 2 and "--prompt" in one_line_error(capsys)


def test_init_loss_is_ln_vocab():
    x, y = torch.randint(0, 27, (100,)), torch.randint(0, 27, (100,))
    _, loss = bigram.NeuralBigram(27)(x, y)
    assert loss.item() == pytest.approx(math.log(27), abs=1e-6)


def test_counts_nll_matches_hand_computation():
    # words a, ab, b -> stream ".a.ab.b." -> bigrams .a a. .a ab b. .b b.
    stoi = {".": 0, "a": 1, "b": 2}
    x, y = bigram.bigrams(".a.ab.b.", stoi)
    assert len(x) == 7
    # add-1 rows: '.' -> (. 0+1, a 2+1, b 1+1)/6, 'a' -> (1+1, 0+1, 1+1)/5, 'b' -> (2+1, 1, 1)/5
    by_hand = -(2 * math.log(3 / 6) + math.log(2 / 6) + 2 * math.log(2 / 5) + 2 * math.log(3 / 5)) / 7
    assert bigram.evaluate(bigram.CountsBigram(3, 1.0).fit(x, y), x, y) == pytest.approx(by_hand)
    # raw counts (k = 0): '.' -> (0, 2/3, 1/3), 'a' -> (1/2, 0, 1/2), 'b' -> (1, 0, 0)
    raw = -(2 * math.log(2 / 3) + math.log(1 / 3) + 2 * math.log(1 / 2)) / 7
    assert bigram.evaluate(bigram.CountsBigram(3, 0.0).fit(x, y), x, y) == pytest.approx(raw)


def test_smoothing_penalty_has_the_counts_table_as_minimum():
    torch.manual_seed(0)
    x, y = torch.randint(0, 5, (50,)), torch.randint(0, 5, (50,))
    counts = bigram.CountsBigram(5, 2.0).fit(x, y)
    neural = bigram.NeuralBigram(5)
    neural.W.data.copy_(counts.table())  # the counts log-probabilities as logits
    (neural(x, y)[1] + neural.smoothing_penalty(2.0, len(x))).backward()
    assert neural.W.grad.abs().max() < 1e-6  # a stationary point of a convex objective


def test_counts_and_neural_agree_after_training(tmp_path, names_file):
    m = run(["--max-iters", "200", "--eval-interval", "200"], tmp_path / "out", names_file)
    for split in ("train_loss", "val_loss", "test_loss"):
        assert m["neural"][split] == pytest.approx(m["counts"][split], abs=1e-4), split
    assert m["counts"]["train_loss"] < math.log(len(set("".join(NAMES))) + 1)


def test_same_seed_same_losses_and_samples(tmp_path, names_file):
    def losses_and_samples(out, seed):
        m = run(["--max-iters", "5", "--eval-interval", "2", "--batch-size", "64", "--seed", seed],
                out, names_file)
        log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        return [(r.get("loss"), r.get("val_loss")) for r in log], m["samples"]

    a = losses_and_samples(tmp_path / "a", "3")
    assert a == losses_and_samples(tmp_path / "b", "3")
    c = losses_and_samples(tmp_path / "c", "4")  # the seed drives batches and sampling
    assert a[0] != c[0] and a[1] != c[1]


def test_temperature_zero_ignores_the_seed(names_file):
    x, y = bigram.bigrams(".ava.ama.emma.", {c: i for i, c in enumerate(".aemv")})
    model = bigram.CountsBigram(5, 0.1).fit(x, y)
    cfg = bigram.Config(temperature=0.0, num_samples=3, max_new_tokens=12)
    greedy = bigram.sample_texts(model, ".aemv", "lines", cfg)
    assert greedy == bigram.sample_texts(model, ".aemv", "lines", bigram.Config(
        temperature=0.0, num_samples=3, max_new_tokens=12, seed=99))
    assert greedy == ["a"] * 3  # '.' -> 'a' (2 of 3 starts), then 'a' -> '.' (3 of 5)


def test_checkpoint_round_trip_and_sample_only(tmp_path, names_file, capsys):
    out = tmp_path / "out"
    m = run(["--max-iters", "3"], out, names_file)
    ckpt = bigram.load_checkpoint(out / "ckpt.pt", ["bigram.py"])
    chars = ckpt["tokenizer"]["chars"]
    assert ckpt["tokenizer"]["kind"] == "char" and chars[0] == bigram.BOUNDARY
    assert ckpt["config"]["format"] == "lines" and ckpt["iter"] == 3
    # the saved tensors reproduce the final test losses
    cfg = bigram.Config(data=str(names_file))
    _, chars2, parts = bigram.load_corpus(cfg)
    assert chars2 == chars
    test = bigram.bigrams(parts[2], {c: i for i, c in enumerate(chars)})
    counts = bigram.CountsBigram(len(chars), 1.0)
    counts.load_state_dict({"counts": ckpt["model"]["counts"]})
    neural = bigram.NeuralBigram(len(chars))
    neural.load_state_dict({"W": ckpt["model"]["W"]})
    assert bigram.evaluate(counts, *test) == m["counts"]["test_loss"]
    assert bigram.evaluate(neural, *test) == m["neural"]["test_loss"]
    # --sample-only reads the checkpoint and samples exactly what the training run sampled
    assert bigram.main(["--sample-only", "--out-dir", str(out)])["samples"] == m["samples"]


def test_help_and_smoke(tmp_path, names_file, capsys):
    with pytest.raises(SystemExit) as e:
        bigram.main(["--help"])
    assert e.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps long help lines
    for flag in ("--data", "--format", "--smoothing", "--max-iters", "--sample-only", "--plot",
                 "--no-plot", "--top-p", "rerun takes seconds"):
        assert flag in help_text
    out = tmp_path / "out"
    m = run(["--max-iters", "2", "--eval-interval", "1"], out, names_file)
    assert set(m) == {"counts", "neural", "samples"} and len(m["samples"]["neural"]) == 10
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert {"iter", "loss", "lr", "ms_per_iter", "tokens_per_s", "elapsed_s",
            "train_loss", "val_loss"} <= set(log[0])
    assert [r.get("event") for r in log[-2:]] == ["done", "done"]
    assert [r["model"] for r in log[-2:]] == ["counts", "neural"]
    assert log[-1]["perplexity"] == pytest.approx(math.exp(log[-1]["test_loss"]))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # a fresh run never replaces a checkpoint silently
        run(["--max-iters", "2"], out, names_file)
    assert e.value.code == 2 and "--overwrite" in one_line_error(capsys)


def test_smoothing_zero_logs_null_not_infinity(tmp_path, names_file, capsys):
    """Raw counts give an unseen val/test bigram probability 0: an infinite loss, printed as
    inf but logged as null, so that log.jsonl stays strict JSON."""
    def reject(constant):
        raise ValueError(f"log.jsonl holds {constant}, which strict JSON parsers reject")

    out = tmp_path / "out"
    m = run(["--smoothing", "0", "--max-iters", "2", "--eval-interval", "1",
             "--num-samples", "2"], out, names_file)
    # val has a bigram unseen in train: log(0). test has a character that never comes first in
    # a train bigram: its row of counts is all zeros, 0/0 = nan. Neither is a number in JSON
    assert math.isinf(m["counts"]["val_loss"]) and math.isnan(m["counts"]["test_loss"])
    assert " inf " in capsys.readouterr().out
    log = [json.loads(line, parse_constant=reject)
           for line in (out / "log.jsonl").read_text().splitlines()]
    done = {r["model"]: r for r in log if r.get("event") == "done"}
    assert done["counts"]["val_loss"] is None and done["counts"]["test_loss"] is None
    assert done["counts"]["perplexity"] is None
    assert done["counts"]["train_loss"] == m["counts"]["train_loss"]  # finite values stay
    assert done["neural"]["test_loss"] == m["neural"]["test_loss"]


def test_corrupted_checkpoint_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "ckpt.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(SystemExit) as e:
        bigram.main(["--sample-only", "--out-dir", str(tmp_path)])
    assert e.value.code == 2 and "corrupted" in one_line_error(capsys)


def test_format_detection(tmp_path, capsys):
    assert bigram.detect_format("emma\nolivia\nava\n") == "lines"
    assert bigram.detect_format("First Citizen:\nBefore we proceed.\n") == "text"  # has '.'
    assert bigram.detect_format("a" * 51 + "\nbob\n") == "text"  # a line too long for an item
    path = tmp_path / "prose.txt"
    path.write_text("Some prose. More of it.\n" * 10)
    with pytest.raises(SystemExit) as e:
        bigram.load_corpus(bigram.Config(data=str(path), format="lines"))
    assert e.value.code == 2 and "boundary" in one_line_error(capsys)


def test_split_is_80_10_10_and_fixed(tmp_path, names_file):
    fmt, chars, parts = bigram.load_corpus(bigram.Config(data=str(names_file)))
    items = [p.strip(".").split(".") for p in parts]
    assert fmt == "lines" and [len(i) for i in items] == [32, 4, 4]
    assert sorted(sum(items, [])) == sorted(NAMES)
    shuffled = NAMES[:]
    random.Random(42).shuffle(shuffled)  # makemore's split, independent of --seed
    assert items[0] == shuffled[:32]
    text = tmp_path / "text.txt"
    text.write_text("".join(chr(ord("a") + i % 26) for i in range(100)) + ". ")
    fmt, _, parts = bigram.load_corpus(bigram.Config(data=str(text)))
    assert fmt == "text" and [len(p) for p in parts] == [81, 10, 11]
    assert "".join(parts) == text.read_text()  # contiguous chunks, in order


def test_too_small_corpus_is_an_error(tmp_path, capsys):
    path = tmp_path / "three.txt"
    path.write_text("a\nab\nb\n")
    with pytest.raises(SystemExit) as e:
        bigram.load_corpus(bigram.Config(data=str(path)))
    assert e.value.code == 2 and "too few" in one_line_error(capsys)


def test_plot_without_matplotlib_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    bigram.plot_counts(torch.ones(3, 3), ".ab", tmp_path / "c.png")
    assert "matplotlib is not installed" in capsys.readouterr().err
    assert not (tmp_path / "c.png").exists()


def test_plot_writes_png(tmp_path, names_file):
    pytest.importorskip("matplotlib")
    run(["--max-iters", "2", "--plot"], tmp_path / "out", names_file)
    assert_png(tmp_path / "out" / "bigram_counts.png")


def test_the_neural_model_of_the_best_val_loss_is_kept(names_file, tmp_path):
    """--smoothing 0 overfits: val falls while the common bigrams are learned, then rises as the
    unseen ones are pushed towards probability 0. The checkpoint, the final table and the
    samples use the weights of the best evaluation (docs/design.md section 4)."""
    out = tmp_path / "out"
    m = run(["--smoothing", "0", "--learning-rate", "0.05", "--max-iters", "100",
             "--eval-interval", "10", "--num-samples", "3"], out, names_file)
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_loss" in r and "event" not in r]
    best = min(evals, key=lambda r: r["val_loss"])
    assert 0 < best["iter"] < 100 and evals[-1]["val_loss"] > best["val_loss"] + 0.03
    assert m["neural"]["best_iter"] == best["iter"]
    assert m["neural"]["val_loss"] == pytest.approx(best["val_loss"], abs=1e-6)
    done = [r for r in records if r.get("event") == "done" and r["model"] == "neural"]
    assert done[0]["best_iter"] == best["iter"]
    ckpt = bigram.load_checkpoint(out / "ckpt.pt", ["bigram.py"])
    assert ckpt["best_iter"] == best["iter"] and ckpt["best_val_loss"] == best["val_loss"]
    assert bigram.main(["--sample-only", "--out-dir", str(out), "--num-samples", "3"])[
        "samples"] == m["samples"]
