"""Tests for bpe.py: byte-level BPE training, encoding, tiktoken export, GPT-2 reproduction.

Run: python -m pytest -q tests/test_bpe.py
The GPT-2 test needs tiktoken's gpt2 files in a cache: TIKTOKEN_CACHE_DIR=DIR python -m pytest
-q tests/test_bpe.py (it skips without one; tests never download).
"""
import ast
import base64
import json
import os
import random
import re
from pathlib import Path

import pytest
import tiktoken

import bpe
from bpe import GPT2_SPLIT_PATTERN, GPT4_SPLIT_PATTERN, BPETokenizer
from conftest import assert_png

ROOT = Path(__file__).resolve().parent.parent
EOT = "<|endoftext|>"
SAMPLE = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "All:\nSpeak, speak.\n\nFirst Citizen:\nYou are all resolved rather to die than to famish?\n"
    "Déjà vu: naïve café owners in Zürich — ¿qué tal? 東京タワーは高い。 emoji 🙂🚀👍🏽\n"
    "Numbers 1234567 and 3.14159, tabs\tand   runs of    spaces,\r\nCRLF lines.  \n"
    "don't won't I'M you'll WE'VE they're (x_y) [1, 2]\n"
) * 3
VARIED = [
    "", " ", "hello world", "  leading and trailing  ", "\n\n\n", "a\u00a0b\u2003c", "x" * 40,
    "Déjà vu, naïve café", "日本語のテキストです。", "🙂🙂🙂 emoji 👍🏽 family 👨‍👩‍👧",
    "tabs\t\tand\r\nCRLF\r\n",
    "'s 'S 'll 'LL", "12345678901 3.14", "     many     spaces     ", "Zürich\n\n  \n\t end  ",
    f"one{EOT}two {EOT}{EOT} three", SAMPLE[:400],
]
PATTERNS = {"gpt4": GPT4_SPLIT_PATTERN, "gpt2": GPT2_SPLIT_PATTERN, "none": None}


def trained(pattern=GPT4_SPLIT_PATTERN, vocab_size=400, text=SAMPLE):
    return BPETokenizer(pattern).train(text, vocab_size, special_tokens=(EOT,))


def random_text(rng, n):
    """n random characters: ASCII, whitespace, Latin, kana, CJK, emoji and any BMP char
    (lone surrogates excluded: they are not text and cannot be UTF-8 encoded)."""
    ranges = [(0x20, 0x7E), (0x09, 0x0D), (0xA0, 0x17F), (0x3040, 0x30FF), (0x4E00, 0x4FFF),
              (0x1F300, 0x1F64F), (0x0, 0xD7FF)]
    return "".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(n))


def bpe_loader():
    """`load_bpe` as mlp.py/gpt.py/llama.py copy it from the shared helpers (its source, run
    without importing torch), or before any of them exists the same few lines."""
    for script in ("mlp", "gpt", "llama"):
        path = ROOT / f"{script}.py"
        try:
            tree = ast.parse(path.read_text())
        except (OSError, SyntaxError):  # not written (yet)
            continue
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name == "load_bpe":
                namespace = {"json": json, "re": re, "Path": Path, "die": pytest.fail}
                exec(compile(ast.Module([node], []), str(path), "exec"), namespace)
                return namespace["load_bpe"]

    def load_bpe(prefix):
        meta = json.loads(Path(f"{prefix}.json").read_text())
        lines = Path(f"{prefix}.tiktoken").read_text().splitlines()
        ranks = {base64.b64decode(tok): int(rank)
                 for tok, rank in (ln.split() for ln in lines if ln)}
        pattern = meta["pattern"] if meta["pattern"] is not None else r"[\s\S]+"
        return tiktoken.Encoding(name="bpe", pat_str=pattern, mergeable_ranks=ranks,
                                 special_tokens=meta["special"])
    return load_bpe


def test_merge_overlapping_pairs_left_to_right():
    assert bpe.merge([97, 97, 97], (97, 97), 256) == [256, 97]
    assert bpe.merge([97, 97, 97, 97], (97, 97), 256) == [256, 256]
    assert bpe.merge([1, 2, 1, 2, 3], (1, 2), 300) == [300, 300, 3]


@pytest.mark.parametrize("naive", [False, True])
def test_tie_break_and_overlaps_worked_by_hand(naive):
    # "ab cd" splits into "ab", " cd": three pairs seen once each, so the smallest pair wins
    tok = BPETokenizer().train("ab cd", 257, naive=naive)
    assert tok.merges == {(32, 99): 256}
    # "aaaaa": (a,a) counts 4 (overlapping) -> [aa, aa, a]; then (aa,aa) and (aa,a) tie at 1
    # and the smaller (256, 97) wins -> [aa, aaa]; then (256, 257); then no pair is left
    tok = BPETokenizer().train("aaaaa", 270, naive=naive)
    assert list(tok.merges.items()) == [((97, 97), 256), ((256, 97), 257), ((256, 257), 258)]


@pytest.mark.parametrize("text", [
    pytest.param(SAMPLE, id="sample"), "aaaa aaaa aaaaaaa aa a", "abababab cdcdcd ab ab abab",
    "ab cd ef gh ij", "zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz", "random"])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_fast_trainer_equals_naive(text, pattern):
    if text == "random":
        text = random_text(random.Random(0), 400) + " the the then there " * 5
    naive = BPETokenizer(PATTERNS[pattern]).train(text, 256 + 80, naive=True)
    fast = BPETokenizer(PATTERNS[pattern]).train(text, 256 + 80)
    assert len(fast.merges) > 0
    assert list(fast.merges.items()) == list(naive.merges.items())  # same order, same ids


def test_smaller_vocab_is_a_prefix():
    big, small = trained(vocab_size=330), trained(vocab_size=300)
    assert list(big.merges.items())[:44] == list(small.merges.items())
    assert big.truncated(300).merges == small.merges
    assert big.truncated(300).encode_ordinary(SAMPLE) == small.encode_ordinary(SAMPLE)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_round_trip_random_unicode(pattern):
    tok = trained(PATTERNS[pattern])
    rng = random.Random(1)
    for n in [0, 1, 2, 5, 50, 300]:
        for _ in range(5):
            s = random_text(rng, n)
            assert tok.decode(tok.encode_ordinary(s)) == s
    assert len(tok.encode_ordinary(SAMPLE)) < len(SAMPLE.encode("utf-8")) / 2  # it compresses


@pytest.mark.parametrize("pattern", PATTERNS)
def test_tiktoken_export_gives_identical_ids(pattern):
    text = SAMPLE[:1000] + random_text(random.Random(5), 500)  # merges inside multi-byte chars too
    tok = trained(PATTERNS[pattern], vocab_size=500, text=text)
    assert len(tok.merges) == 244
    assert len(set(tok.vocab.values())) == len(tok.vocab)  # byte strings unique: ranks work
    enc = tok.to_tiktoken()
    assert enc.n_vocab == tok.n_vocab == 256 + len(tok.merges) + 1
    rng = random.Random(2)
    for s in VARIED + [random_text(rng, 200) for _ in range(20)]:
        ids = tok.encode(s, allowed_special="all")
        assert enc.encode(s, allowed_special="all") == ids
        assert enc.decode(ids) == tok.decode(ids) == s


def test_special_tokens_like_tiktoken():
    tok = trained()
    eot = tok.special[EOT]
    assert eot == 256 + len(tok.merges)  # right above the merges
    text = f"hi{EOT}there"
    with pytest.raises(ValueError, match="special token"):
        tok.encode(text)
    with pytest.raises(ValueError):  # tiktoken refuses it the same way
        tok.to_tiktoken().encode(text)
    ids = tok.encode(text, allowed_special={EOT})
    assert ids.count(eot) == 1 and ids == tok.encode(text, allowed_special="all")
    assert tok.decode(ids) == text
    plain = tok.encode_ordinary(text)  # as text: several ordinary tokens
    assert eot not in plain and tok.decode(plain) == text


def test_training_never_merges_across_special_tokens():
    text = "hello world<|endoftext|>" * 40
    cut = BPETokenizer().train(text, 300, special_tokens=(EOT,))
    uncut = BPETokenizer().train(text, 300)
    assert any(b"endoftext" in t for t in uncut.vocab.values())
    assert not any(b"endof" in t for t in cut.vocab.values())


@pytest.mark.parametrize("pattern", PATTERNS)
def test_save_load_round_trip(tmp_path, pattern):
    tok = trained(PATTERNS[pattern])
    tok.save(tmp_path / "tok")
    meta = json.loads((tmp_path / "tok.json").read_text())
    assert meta == {"pattern": PATTERNS[pattern], "special": {EOT: tok.special[EOT]},
                    "vocab_size": tok.n_vocab}
    for path in (tmp_path / "tok", tmp_path / "tok.tiktoken", str(tmp_path / "tok.json")):
        loaded = BPETokenizer.load(path)
        assert list(loaded.merges.items()) == list(tok.merges.items())
        assert loaded.special == tok.special and loaded.pattern == tok.pattern
    enc = bpe_loader()(tmp_path / "tok")  # what mlp.py/gpt.py/llama.py will read
    for s in VARIED:
        ids = tok.encode(s, allowed_special="all")
        assert loaded.encode(s, allowed_special="all") == ids
        assert enc.encode(s, allowed_special="all") == ids


def test_from_ranks_rejects_what_is_not_bpe():
    ranks = {bytes([b]): b for b in range(256)}
    with pytest.raises(ValueError, match="without gaps"):
        bpe.from_ranks({**ranks, b"ab": 300}, None, {})
    with pytest.raises(ValueError, match="not a BPE merge"):
        bpe.from_ranks({**ranks, b"abc": 256}, None, {})


def test_training_errors():
    with pytest.raises(ValueError, match="empty"):
        BPETokenizer().train("", 300)
    with pytest.raises(ValueError, match="below 256"):
        BPETokenizer().train("some text", 255)


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as e:
        bpe.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--vocab-size" in out and "--naive" in out and "--pattern" in out


@pytest.mark.parametrize("argv, message", [
    (["--vocab-size", "100"], "--vocab-size 100: expected an integer >= 256"),
    (["--pattern", "gpt3"], "--pattern gpt3"),
    (["--data", "no/such/file.txt"], "no such file")])
def test_cli_errors_are_one_line(tmp_path, capsys, argv, message):
    data = tmp_path / "t.txt"
    data.write_text(SAMPLE)
    with pytest.raises(SystemExit) as e:
        bpe.main(["--data", str(data), "--out-dir", str(tmp_path / "out"), *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_main_smoke(tmp_path, capsys):
    data = tmp_path / "t.txt"
    data.write_text(SAMPLE + random_text(random.Random(4), 3000))  # enough pairs for 600
    out = tmp_path / "out"
    metrics = bpe.main(["--data", str(data), "--vocab-size", "600", "--out-dir", str(out),
                        "--no-compare"])
    assert metrics["merges"] == 344 and metrics["same_ids"] is True
    table = metrics["table"]
    assert [r["vocab_size"] for r in table] == [256, 512, 600]
    assert table[0]["train_bytes_per_token"] == 1.0  # 256: bytes only
    tokens_per_char = [r["train_tokens_per_char"] for r in table]
    assert tokens_per_char[2] < tokens_per_char[1] < tokens_per_char[0]
    assert BPETokenizer.load(out / "tokenizer").n_vocab == 601
    assert json.loads((out / "log.jsonl").read_text().splitlines()[-1])["event"] == "done"
    assert "example: [O]" in capsys.readouterr().out


def test_cli_naive_trains_the_same_tokenizer(tmp_path):
    data = tmp_path / "t.txt"
    data.write_text(SAMPLE)
    files = []
    for flag in ("--no-naive", "--naive"):
        out = tmp_path / flag
        bpe.main(["--data", str(data), "--vocab-size", "300", "--out-dir", str(out),
                  "--no-compare", flag])
        files.append((out / "tokenizer.tiktoken").read_text())
    assert files[0] == files[1] and len(files[0].splitlines()) == 300


def test_plot_writes_a_figure(tmp_path):
    pytest.importorskip("matplotlib")
    data = tmp_path / "t.txt"
    data.write_text(SAMPLE)
    bpe.main(["--data", str(data), "--vocab-size", "300", "--out-dir", str(tmp_path),
              "--no-compare", "--plot"])
    assert_png(tmp_path / "compression.png")


def test_gpt2_reproduced_from_tiktoken_ranks():
    if not os.environ.get("TIKTOKEN_CACHE_DIR"):
        pytest.skip("set TIKTOKEN_CACHE_DIR to a tiktoken cache holding gpt2's files")
    try:
        enc = tiktoken.get_encoding("gpt2")
    except Exception as e:  # not in the cache, and no network
        pytest.skip(f"tiktoken's gpt2 files cannot be loaded: {type(e).__name__}")
    tok = bpe.gpt2_from_tiktoken(enc)
    assert len(tok.merges) == 50000 and tok.n_vocab == enc.n_vocab == 50257
    first_merge = (enc.encode_single_token(" "), enc.encode_single_token("t"))  # "Ġ t"
    assert next(iter(tok.merges.items())) == (first_merge, 256)
    rng = random.Random(3)
    for s in VARIED + [random_text(rng, 300) for _ in range(10)]:
        ids = enc.encode(s, allowed_special="all")
        assert tok.encode(s, allowed_special="all") == ids
        assert tok.decode(ids) == s
