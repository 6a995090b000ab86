"""Tests for sft.py: task world, label masking, LoRA, curriculum, classification, main.

Run: python -m pytest -q tests/test_sft.py --durations=5
"""
import contextlib
import json
import math
import random
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import sft
from conftest import assert_png

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(vocab_size=320, block_size=96, n_layer=2, n_head=2, n_embd=32, n_kv_head=1)
TINY_FLAGS = ["--n-layer", "2", "--n-head", "2", "--n-kv-head", "1", "--n-embd", "32",
              "--batch-size", "8", "--eval-iters", "1", "--n-train", "120", "--n-test", "12",
              "--eval-max-new-tokens", "4", "--warmup-iters", "1", "--device", "cpu",
              "--maj-k", "0"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run faster on one thread (no OpenMP hand-offs), above all on a busy CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_model(seed=0, task="generate"):
    torch.manual_seed(seed)
    return sft.build_model(dict(TINY), task)


def worked_answer(prompt):
    """Solve a task-world prompt independently of make_task (regexes on the text)."""
    if m := re.fullmatch(r"What is (\d+) ([+-]) (\d+)\?", prompt):
        a, op, b = int(m[1]), m[2], int(m[3])
        return str(a + b if op == "+" else a - b)
    if m := re.fullmatch(r"Which is larger: (\d+) or (\d+)\?", prompt):
        return str(max(int(m[1]), int(m[2])))
    if m := re.fullmatch(r"Reverse the word: ([a-z]+)", prompt):
        return m[1][::-1]
    if m := re.fullmatch(r"Sort the letters: ([a-z]+)", prompt):
        return "".join(sorted(m[1]))
    if m := re.fullmatch(r"Count the letter ([a-z]) in: ([a-z]+)", prompt):
        return str(m[2].count(m[1]))
    raise AssertionError(f"unexpected prompt {prompt!r}")


# ---- task world ----
def test_every_family_answers_correctly_at_every_level():
    rng = random.Random(0)
    for family in sft.TASK_FAMILIES:
        for level in (1, 2, 3):
            for _ in range(30):
                ex = sft.make_task(family, rng, level)
                assert set(ex) == {"task", "prompt", "answer"} and ex["task"] == family
                assert ex["answer"] == worked_answer(ex["prompt"])
                assert sft.check_answer(ex["answer"] + sft.EOT, ex["answer"])


def test_difficulty_scales_numbers_and_words():
    rng = random.Random(1)
    for level in (1, 2, 3):
        nums = [int(x) for _ in range(50) for x in
                re.findall(r"\d+", sft.make_task("compare", rng, level)["prompt"])]
        assert max(nums) < 10 ** level and (level == 1 or min(nums) >= 10 ** (level - 1))
        words = [sft.make_task("reverse", rng, level)["answer"] for _ in range(50)]
        assert {len(w) for w in words} == {2 * level + 1, 2 * level + 2}


def test_train_and_test_are_disjoint():
    train = sft.make_tasks(600, "train", 0, 3)
    test = sft.make_tasks(300, "test", 0, 3)
    assert len(train) == 600 and len(test) == 300
    assert all(sft.task_split(ex["prompt"]) == "train" for ex in train)
    assert all(sft.task_split(ex["prompt"]) == "test" for ex in test)
    assert not {ex["prompt"] for ex in train} & {ex["prompt"] for ex in test}
    assert len({ex["prompt"] for ex in train}) == 600  # deduplicated
    assert [sum(ex["task"] == t for ex in test) for t in sft.TASK_FAMILIES] == [50] * 6


def test_generator_is_deterministic():
    assert sft.make_tasks(60, "train", 7, 3) == sft.make_tasks(60, "train", 7, 3)
    assert sft.make_tasks(60, "train", 7, 3) != sft.make_tasks(60, "train", 8, 3)


def test_small_task_space_raises_instead_of_looping():
    with pytest.raises(ValueError, match="too few distinct"):
        sft.make_tasks(30, "test", 0, 1, families=("add",))  # 100 one-digit sums, ~20 in test


def test_mix_weights_the_training_families():
    families = sft.mix_families("add=3,count=0")
    assert families.count("add") == 3 and "count" not in families and len(families) == 7
    train = sft.make_tasks(140, "train", 0, 2, families)
    assert [sum(ex["task"] == t for ex in train) for t in sft.TASK_FAMILIES] == [60, 20, 20, 20, 0, 20]
    assert sft.mix_families("") == sft.TASK_FAMILIES
    for bad in ("add=x", "mul=2", "add=0,sub=0,reverse=0,sort=0,count=0,compare=0"):
        with pytest.raises(SystemExit) as e:
            sft.mix_families(bad)
        assert e.value.code == 2


def test_default_configs_have_enough_distinct_problems():
    """`python sft.py` and `python sft.py --task classify` must not run out of problems."""
    cfg = sft.Config()
    train = sft.make_tasks(cfg.n_train, "train", cfg.seed, cfg.difficulty, sft.mix_families(cfg.mix))
    assert len(train) == cfg.n_train
    assert len(sft.make_tasks(cfg.n_test, "test", cfg.seed + 1, cfg.difficulty)) == cfg.n_test
    n_classify = sft.CLASSIFY_PRESET.get("n_train", cfg.n_train)
    difficulty = sft.CLASSIFY_PRESET.get("difficulty", cfg.difficulty)
    assert len(sft.make_classify_examples(n_classify, "train", cfg.seed, difficulty)) == n_classify
    assert len(sft.make_classify_examples(cfg.n_test, "test", cfg.seed, difficulty)) == cfg.n_test


def test_check_answer_and_format():
    assert sft.check_answer(" 85 <|endoftext|>junk", "85")
    assert sft.check_answer("85", "85")  # no end token: still the right answer
    assert not sft.check_answer("851<|endoftext|>", "85")
    assert not sft.check_answer("<|endoftext|>85", "85")
    assert sft.follows_format("85<|endoftext|>", "add")
    assert not sft.follows_format("85", "add")  # never stopped
    assert not sft.follows_format("abc<|endoftext|>", "add")
    assert not sft.follows_format(" 85<|endoftext|>", "add")
    assert sft.follows_format("cba<|endoftext|>", "reverse")
    assert sft.format_prompt("What is 1 + 2?") == "### Instruction:\nWhat is 1 + 2?\n\n### Response:\n"


# ---- worked traces (--think) ----
def worked_trace(prompt):
    """The response of a thinking model, written independently of make_task: count's letter,
    then a running tally (each letter of the word and the matches up to it), then the answer;
    the plain answer elsewhere."""
    m = re.fullmatch(r"Count the letter ([a-z]) in: ([a-z]+)", prompt)
    if m is None:
        return worked_answer(prompt)
    letter, word, n, steps = m[1], m[2], 0, []
    for c in word:
        n += c == letter
        steps.append(c + str(n))
    return letter + ": " + "".join(steps) + " = " + str(n)


def test_think_traces_are_correct_for_every_family_and_level():
    for family in sft.TASK_FAMILIES:
        for level in (1, 2, 3):
            for seed in range(30):
                ex = sft.make_task(family, random.Random(seed), level, think=True)
                plain = sft.make_task(family, random.Random(seed), level)
                assert ex["prompt"] == plain["prompt"]  # the same draws: the same problem
                assert ex["answer"] == worked_trace(ex["prompt"])
                assert sft.final_answer(ex["answer"]) == plain["answer"]
                assert sft.check_answer(ex["answer"] + sft.EOT, plain["answer"])
                assert sft.check_answer(plain["answer"] + sft.EOT, ex["answer"])
    assert sft.make_task("count", random.Random(0), 2, think=True)["answer"].count(" = ") == 1
    # the same held-out problems with and without traces (the chain compares on them)
    a = sft.make_tasks(60, "test", 5, 2)
    b = sft.make_tasks(60, "test", 5, 2, think=True)
    assert [x["prompt"] for x in a] == [x["prompt"] for x in b]


def test_checker_grades_the_final_answer_after_the_last_equals():
    assert sft.check_answer("x1 y1 = 1<|endoftext|>", "b0 a1 = 1")  # another trace, right answer
    assert not sft.check_answer("b0 a1 = 2<|endoftext|>", "b0 a1 = 1")
    assert not sft.check_answer("b0 a1 = 1 = 2<|endoftext|>", "1")  # the last ' = ' counts
    assert sft.check_answer("b1 = 1 <|endoftext|>= 7", "1")  # nothing after the end token
    assert sft.final_answer("85<|endoftext|>") == "85"  # no trace: the whole response
    assert sft.follows_format("b0 a1 = 1<|endoftext|>", "count")
    assert not sft.follows_format("b0 a1 = x<|endoftext|>", "count")
    assert not sft.follows_format("b0 a1 = 1", "count")  # never stopped


def test_the_trace_is_part_of_the_trained_response():
    tok = sft.task_tokenizer()
    ex = sft.make_task("count", random.Random(3), 2, think=True)
    ids, targets = sft.encode_example(tok, ex, mask_prompt=True)
    kept = [t for t in targets if t != sft.IGNORE_INDEX]
    assert kept == tok.encode_ordinary(ex["answer"]) + [tok.special[sft.EOT]]
    assert " = " in ex["answer"] and len(kept) > 10


def test_loss_weighting_by_hand():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 7)
    ign = sft.IGNORE_INDEX
    targets = torch.tensor([[ign, 3, ign, ign], [ign, 1, 2, 5]])  # 1 and 3 response tokens
    ce = -F.log_softmax(logits, dim=-1)
    a = ce[0, 1, 3]
    b = [ce[1, 1, 1], ce[1, 2, 2], ce[1, 3, 5]]
    token = (a + sum(b)) / 4
    example = (a + sum(b) / 3) / 2
    sqrt = (a + sum(b) / 3 ** 0.5) / (1 + 3 / 3 ** 0.5)  # weights 1 and 1/sqrt(3) per token
    torch.testing.assert_close(sft.response_loss(logits, targets, "token"), token)
    torch.testing.assert_close(sft.response_loss(logits, targets, "example"), example)
    torch.testing.assert_close(sft.response_loss(logits, targets, "sqrt"), sqrt)
    # the token mean is the model's own loss
    model_loss = F.cross_entropy(logits.view(8, 7), targets.view(8), ignore_index=ign)
    torch.testing.assert_close(sft.response_loss(logits, targets, "token"), model_loss)


def test_think_run_reports_traces_and_majority(tmp_path):
    flags = [f for f in TINY_FLAGS] + ["--think", "--max-iters", "3", "--eval-interval", "3",
                                       "--maj-k", "2", "--loss-weighting", "sqrt"]
    flags[flags.index("--eval-max-new-tokens") + 1] = "8"
    one = sft.main(flags + ["--out-dir", str(tmp_path / "a")])
    two = sft.main(flags + ["--out-dir", str(tmp_path / "b")])
    assert losses_of(tmp_path / "a") == losses_of(tmp_path / "b")  # deterministic
    for key in ("exact_by_task", "length_by_task", "maj_by_task", "pass_by_task"):
        assert set(one[key]) == set(sft.TASK_FAMILIES)
    assert one["maj_k"] == 2 and 0 <= one["maj_at_k"] <= one["pass_at_k"] <= 1
    assert one["accuracy"] == two["accuracy"]
    cfg = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)["config"]
    assert cfg["think"] and cfg["loss_weighting"] == "sqrt"
    # the evaluation budget of the think preset (40) applies only where not given
    assert cfg["eval_max_new_tokens"] == 8


def test_majority_vote_by_hand(monkeypatch):
    exs = [{"task": "count", "prompt": "p1", "answer": "a1 = 1"},
           {"task": "add", "prompt": "p2", "answer": "5"}]
    eot = sft.EOT
    samples = [["x1 = 1" + eot, "y = 2" + eot, "z = 1" + eot, "2"],  # 1 wins 2-1 (unstopped "2"
               ["4" + eot, "6" + eot, "5", "6" + eot]]  # is not a vote); 6 wins, 5 never stops
    monkeypatch.setattr(sft, "sample_answers", lambda *a, **k: samples)
    out = sft.evaluate_majority(tiny_model(), None, exs, 4, 1.0, 4, 8, "cpu", None, None)
    assert out["maj_by_task"] == {"count": 1.0, "add": 0.0}
    assert out["pass_by_task"] == {"count": 1.0, "add": 1.0}  # "5" is right, though unstopped
    assert out["maj_at_k"] == 0.5 and out["pass_at_k"] == 1.0


# ---- label masking and collate ----
def test_collate_pads_right_and_masks_padding():
    tok = sft.ByteTokenizer()
    exs = sft.make_tasks(6, "train", 0, 3)
    batch = [sft.encode_example(tok, ex, True) for ex in exs]
    idx, tgt = sft.collate(batch, tok.special[sft.PAD])
    T = max(len(ids) for ids, _ in batch)
    assert idx.shape == tgt.shape == (6, T)
    for i, (ids, targets) in enumerate(batch):
        assert idx[i, :len(ids)].tolist() == ids and tgt[i, :len(ids)].tolist() == targets
        assert (idx[i, len(ids):] == tok.special[sft.PAD]).all()
        assert (tgt[i, len(ids):] == sft.IGNORE_INDEX).all()
    # causal attention: right padding leaves every real position's logits unchanged
    model = tiny_model().eval()
    with torch.no_grad():
        padded = model(idx)[0]
        for i, (ids, _) in enumerate(batch):
            alone = model(torch.tensor([ids]))[0][0]
            torch.testing.assert_close(padded[i, :len(ids)], alone, atol=1e-5, rtol=1e-4)


def test_only_response_tokens_carry_the_loss():
    tok = sft.ByteTokenizer()
    ex = {"task": "add", "prompt": "What is 47 + 38?", "answer": "85"}
    ids, targets = sft.encode_example(tok, ex, mask_prompt=True)
    kept = [t for t in targets if t != sft.IGNORE_INDEX]
    assert kept == tok.encode_ordinary("85") + [tok.special[sft.EOT]]  # answer + end token
    full = tok.encode_ordinary(sft.format_prompt(ex["prompt"]) + "85") + [tok.special[sft.EOT]]
    assert ids == full[:-1] and sft.encode_example(tok, ex, False)[1] == full[1:]
    # the model's loss equals a masked mean worked out by hand over the response tokens only
    batch = [(ids, targets), sft.encode_example(tok, sft.make_tasks(1, "train", 3, 3)[0], True)]
    idx, tgt = sft.collate(batch, tok.special[sft.PAD])
    model = tiny_model()
    logits, loss = model(idx, tgt)
    logp = F.log_softmax(logits, dim=-1)
    terms = [-logp[b, t, tgt[b, t]] for b in range(2) for t in range(idx.size(1))
             if tgt[b, t] != sft.IGNORE_INDEX]
    assert len(terms) == 3 + len(batch[1][1]) - batch[1][1].count(sft.IGNORE_INDEX)
    torch.testing.assert_close(loss, torch.stack(terms).mean())


def test_template_tokens_encode_the_same_text_in_fewer_ids():
    tok, plain = sft.task_tokenizer(), sft.task_tokenizer(template_tokens=False)
    assert plain.special == sft.BYTE_SPECIAL  # llama.py's tokenizer
    prompt = "Reverse the word: bevak"
    ids = sft.encode_prompt(tok, prompt)
    assert ids == [258] + list(prompt.encode()) + [259]  # one id per marker
    assert sft.encode_prompt(plain, prompt) == plain.encode_ordinary(sft.format_prompt(prompt))
    assert tok.decode(ids) == plain.decode(sft.encode_prompt(plain, prompt)) == sft.format_prompt(prompt)
    # the markers are special only where the caller allows it (tiktoken's rule)
    assert tok.encode_ordinary(sft.format_prompt(prompt)) == sft.encode_prompt(plain, prompt)
    assert tok.special[sft.EOT] == 256 and tok.special[sft.PAD] == 257 and tok.n_vocab == plain.n_vocab
    ex = {"task": "reverse", "prompt": prompt, "answer": "kaveb"}
    ids, targets = sft.encode_example(tok, ex, True)
    assert len(ids) == len(sft.encode_example(plain, ex, True)[0]) - 31
    assert [t for t in targets if t != sft.IGNORE_INDEX] == list(b"kaveb") + [256]


# ---- LoRA ----
def test_lora_zero_init_freezes_base_and_merges_exactly():
    model = tiny_model()
    idx = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        base = model(idx)[0]
    sft.apply_lora(model, rank=4, alpha=8)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    wrapped = [m for m in model.modules() if isinstance(m, sft.LoRALinear)]
    assert len(wrapped) == 4 * TINY["n_layer"]  # attention c_attn, c_proj; MLP c_fc, c_proj
    assert sum(p.numel() for n, p in model.named_parameters() if n in trainable) == sum(
        4 * (m.base.in_features + m.base.out_features) for m in wrapped)
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], base)  # B = 0: the base model's outputs
    # one training step moves only the adapters; then merged == adapter model
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(idx, idx)[1].backward()
    opt.step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    with torch.no_grad():
        adapted = model(idx)[0]
        assert not torch.allclose(adapted, base)
        state = sft.merged_state_dict(model)
        sft.merge_lora(model)
        torch.testing.assert_close(model(idx)[0], adapted, atol=1e-5, rtol=1e-4)
    assert not any(isinstance(m, sft.LoRALinear) for m in model.modules())
    assert set(state) == set(tiny_model().state_dict())  # llama.py's keys


# ---- curriculum ----
def test_curriculum_orders_easy_to_hard_and_grows_the_pool():
    tok = sft.ByteTokenizer()
    exs = sft.make_tasks(120, "train", 0, 3)
    enc = [sft.encode_example(tok, ex, True) for ex in exs]
    keys = [(exs[i]["level"], len(enc[i][0])) for i in sft.curriculum_order(exs, enc)]
    assert keys == sorted(keys) and keys[0][0] == 1 and keys[-1][0] == 3
    assert sft.competence(0, 100) == pytest.approx(0.1)
    assert sft.competence(100, 100) == sft.competence(500, 100) == 1.0
    cs = [sft.competence(s, 100) for s in range(101)]
    assert all(a <= b for a, b in zip(cs, cs[1:]))
    gen = torch.Generator().manual_seed(0)
    marked = [([i], [i]) for i in range(100)]  # an example's id is its index
    idx, _ = sft.get_batch(marked, 64, gen, 10, 0, "cpu")
    assert idx.max() < 10  # drawn from the easiest 10 only


def test_pool_at_follows_competence_only_with_the_curriculum():
    encoded = [([0], [0])] * 1000
    cfg = sft.Config(batch_size=32, max_iters=100, curriculum_frac=0.5)
    assert sft.pool_at(0, cfg, encoded) == 1000  # no curriculum: everything, from step 0
    cfg.curriculum = True
    assert sft.pool_at(0, cfg, encoded) == 100  # competence 0.1 of 1000
    assert sft.pool_at(50, cfg, encoded) == sft.pool_at(90, cfg, encoded) == 1000
    assert sft.pool_at(0, cfg, encoded[:200]) == 32  # never below one batch


def test_estimate_loss_reads_fixed_chunks_of_each_split():
    """eval_iters chunks of batch_size from the start of each split (a short split: all of it)."""
    model = tiny_model()
    tok = sft.task_tokenizer()
    enc = [sft.encode_example(tok, ex, True) for ex in sft.make_tasks(5, "test", 0, 1)]
    ctx, pad = contextlib.nullcontext(), tok.special[sft.PAD]

    def mean_loss(chunks):
        return sum(model(*sft.collate(c, pad))[1].item() for c in chunks) / len(chunks)

    with torch.no_grad():
        out = sft.estimate_loss(model, {"a": enc, "b": enc[:2]}, 4, 2, pad, "cpu", ctx)
        assert out["a"] == pytest.approx(mean_loss([enc[0:2], enc[2:4], enc[4:5]]))
        assert out["b"] == pytest.approx(mean_loss([enc[0:2]]))
        one = sft.estimate_loss(model, {"a": enc}, 1, 2, pad, "cpu", ctx)["a"]
        assert one == pytest.approx(mean_loss([enc[0:2]]))


# ---- classification ----
def test_classification_head_and_data():
    exs = sft.make_classify_examples(40, "train", 0, 2)
    assert sum(ex["label"] for ex in exs) == 20  # balanced
    for ex in exs:
        m = re.fullmatch(r"Is this correct\? (\d+) ([+-]) (\d+) = (\d+)", ex["prompt"])
        a, b, c = int(m[1]), int(m[3]), int(m[4])
        assert ex["label"] == int((a + b if m[2] == "+" else a - b) == c)
    tok = sft.ByteTokenizer()
    batch = [sft.encode_classify(tok, ex) for ex in exs[:4]]
    idx, tgt = sft.collate(batch, tok.special[sft.PAD])
    assert ((tgt != sft.IGNORE_INDEX).sum(1) == 1).all()  # one target per row: the last token
    model = tiny_model(task="classify")
    logits, loss = model(idx, tgt)
    assert logits.shape == (4, idx.size(1), 2) and loss.item() == pytest.approx(math.log(2), abs=0.1)
    acc = sft.evaluate_classify(model, batch, 2, tok.special[sft.PAD], "cpu", contextlib.nullcontext())
    assert acc in (0.0, 0.25, 0.5, 0.75, 1.0)


# ---- generation and evaluation ----
def test_generate_until_matches_generate_and_evaluation_counts():
    model = tiny_model().eval()
    idx = torch.randint(0, 256, (3, 10))
    full = sft.generate(model, idx, 8, temperature=0.0)
    early = sft.generate_until(model, idx, 8, stop_id=int(full[0, 12]))
    assert torch.equal(early, full[:, :early.size(1)]) and early.size(1) <= 18
    tok = sft.ByteTokenizer()
    exs = sft.make_tasks(12, "test", 0, 3)
    m = sft.evaluate_tasks(model, tok, exs, 4, 5, "cpu", contextlib.nullcontext())
    assert m["counts"] == {t: 2 for t in sft.TASK_FAMILIES} and len(m["samples"]) == 12
    assert 0.0 <= m["accuracy"] <= 1.0 and 0.0 <= m["format_rate"] <= 1.0


# ---- main: smoke, resume, sample-only, init-from, errors ----
def losses_of(out_dir):
    return [r["loss"] for r in map(json.loads, (out_dir / "log.jsonl").read_text().splitlines())
            if "loss" in r]


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        sft.main(["--help"])
    assert e.value.code == 0 and "--lora-rank" in capsys.readouterr().out


def test_main_smoke_resume_and_sample_only(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    flags = TINY_FLAGS + ["--mix", "add=2", "--eval-interval", "2"]
    done = sft.main(flags + ["--max-iters", "4", "--out-dir", str(full)])
    assert set(done["accuracy_by_task"]) == set(sft.TASK_FAMILIES)
    assert done["best_iter"] == 4  # the kept model is the last: no validation split to choose
    last = json.loads((full / "log.jsonl").read_text().splitlines()[-1])
    assert last["event"] == "done" and "accuracy" in last and "accuracy_by_task" in last
    special = torch.load(full / "ckpt.pt", weights_only=True)["tokenizer"]["special"]
    assert {k: special[k] for k in sft.TEMPLATE_TOKENS} == sft.TEMPLATE_TOKENS  # saved for the next stage
    # stop at 2, resume to 4: the same losses, bit for bit (batches + RNG restored)
    sft.main(flags + ["--max-iters", "2", "--out-dir", str(part)])
    sft.main(flags + ["--max-iters", "4", "--out-dir", str(part), "--resume"])
    assert losses_of(part) == losses_of(full)
    records = [json.loads(line) for line in (part / "log.jsonl").read_text().splitlines()]
    evals = [r["iter"] for r in records if "val_loss" in r and "event" not in r]
    assert evals == [0, 2, 4]  # the evaluation at the checkpoint once, not redone on resume
    assert [r["iter"] for r in records if "loss" in r] == [0, 1, 2, 3]
    out = sft.main(["--sample-only", "--out-dir", str(full), "--prompt", "What is 1 + 1?",
                    "--num-samples", "2", "--max-new-tokens", "3"])
    assert len(out["samples"]) == 2


def test_lora_run_saves_merged_llama_keys_and_resumes(tmp_path):
    flags = TINY_FLAGS + ["--lora-rank", "2", "--eval-interval", "2", "--out-dir", str(tmp_path)]
    sft.main(flags + ["--max-iters", "2"])
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert set(ckpt["model"]) == set(tiny_model().state_dict())
    assert any(k.endswith("lora_A") for k in ckpt["lora"])
    done = sft.main(flags + ["--max-iters", "3", "--resume"])
    # trainable: the adapters and the output head (it must learn to say <|endoftext|>), nothing else
    model = sft.apply_lora(tiny_model(), 2, 16.0)
    adapters = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    assert adapters > 0 and done["trainable_params"] == adapters + model.lm_head.weight.numel()


def test_plot_writes_accuracy_by_task_png(tmp_path):
    pytest.importorskip("matplotlib")
    sft.main(TINY_FLAGS + ["--max-iters", "1", "--out-dir", str(tmp_path), "--plot"])
    assert_png(tmp_path / "accuracy_by_task.png")


def test_classify_main(tmp_path):
    done = sft.main(TINY_FLAGS + ["--task", "classify", "--max-iters", "2", "--difficulty", "2",
                                  "--out-dir", str(tmp_path)])
    assert 0.0 <= done["accuracy"] <= 1.0
    out = sft.main(["--sample-only", "--out-dir", str(tmp_path), "--prompt", "Is this correct? 1 + 1 = 2"])
    assert sum(out["probs"]) == pytest.approx(1.0)


def test_contains_examples_are_balanced_right_and_disjoint():
    train = sft.make_contains_examples(200, "train", 3, 2)
    test = sft.make_contains_examples(60, "test", 4, 2)
    assert sum(ex["label"] for ex in train) == 100 and len({ex["prompt"] for ex in train}) == 200
    assert not {ex["prompt"] for ex in train} & {ex["prompt"] for ex in test}
    for ex in train + test:
        m = re.fullmatch(r"Does ([a-z]+) contain the letter ([a-z])\?", ex["prompt"])
        assert ex["label"] == int(m[2] in m[1])


def test_head_only_trains_the_class_head_alone(tmp_path, capsys):
    base = tmp_path / "base"
    sft.main(TINY_FLAGS + ["--max-iters", "2", "--out-dir", str(base)])
    flags = TINY_FLAGS + ["--task", "classify", "--classify-task", "contains", "--max-iters", "3",
                          "--init-from", str(base / "ckpt.pt"), "--head-only"]
    done = sft.main(flags + ["--out-dir", str(tmp_path / "probe")])
    assert done["trainable_params"] == 2 * 32  # the 2-way head on a 32-wide trunk, no bias
    before = torch.load(base / "ckpt.pt", weights_only=True)["model"]
    after = torch.load(tmp_path / "probe" / "ckpt.pt", weights_only=True)["model"]
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith("lm_head"))
    with pytest.raises(SystemExit) as e:  # a probe needs a class head
        sft.main(TINY_FLAGS + ["--head-only", "--out-dir", str(tmp_path / "bad")])
    assert e.value.code == 2 and "--head-only" in capsys.readouterr().err


def test_init_from_a_llama_checkpoint(tmp_path, capsys):
    if not (ROOT / "llama.py").is_file():
        pytest.skip("llama.py not written yet")
    import llama

    torch.manual_seed(0)
    tok = llama.ByteTokenizer()
    cfg = llama.ModelConfig(vocab_size=llama.padded_vocab(tok.n_vocab), block_size=96, n_layer=2,
                            n_head=2, n_embd=32, n_kv_head=1)
    model = llama.Llama(cfg)
    path = tmp_path / "llama" / "ckpt.pt"
    sft.save_checkpoint({"script": "llama.py", "version": 1, "config": {}, "iter": 7,
                         "model_args": __import__("dataclasses").asdict(cfg),
                         "model": model.state_dict(), "optimizer": {}, "best_val_loss": 0.0,
                         "rng": {}, "tokenizer": llama.tokenizer_state(tok)}, path)
    done = sft.main(TINY_FLAGS + ["--max-iters", "1", "--eval-interval", "1", "--init-from",
                                  str(path), "--out-dir", str(tmp_path / "sft")])
    assert "before SFT: accuracy" in capsys.readouterr().out and "accuracy_before" in done


def test_foreign_or_corrupt_checkpoint_exits_2(tmp_path, capsys):
    foreign = tmp_path / "gpt.pt"
    sft.save_checkpoint({"script": "gpt.py", "model": {}}, foreign)
    corrupt = tmp_path / "bad.pt"
    corrupt.write_bytes(b"not a checkpoint")
    for path in (foreign, corrupt):
        with pytest.raises(SystemExit) as e:
            sft.main(TINY_FLAGS + ["--init-from", str(path), "--out-dir", str(tmp_path / "o")])
        assert e.value.code == 2
    err = capsys.readouterr().err
    assert "written by gpt.py" in err and "corrupted or truncated" in err
    assert not (tmp_path / "o" / "ckpt.pt").exists()
