"""Hostile input (issue 18): every mistake ends in one `error:` line, nothing is damaged.

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_bad_input.py

A matrix over the scripts x the ways a user can get things wrong: bad data files, damaged or
foreign checkpoints, flag values out of range (training and sampling flags), --out-dir that
cannot be one, a bad value after --overwrite, and the strictness of log.jsonl. Each case
asserts exit status 2, exactly one line on stderr starting with `error: `, no traceback, and
that the files already there (an old ckpt.pt and log.jsonl) are byte for byte unchanged.
The cases run in-process (`main(argv)`) and fail before any training, so the whole matrix
takes seconds; one subprocess checks the real command line. Removing a script's validation
(a RULES entry, the check_config call) makes its cases fail: they then crash or exit 0.
"""
import dataclasses
import importlib
import json
import math
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
NAMES = ["emma", "olivia", "ava", "isabella", "sophia", "mia", "amelia", "harper", "evelyn",
         "abigail", "emily", "ella", "elizabeth", "camila", "luna", "sofia", "avery", "mila"] * 4
TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"
        * 40)
MODEL = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "8",
         "--batch-size", "2", "--eval-iters", "1", "--eval-interval", "1", "--num-samples", "1",
         "--max-new-tokens", "4", "--device", "cpu"]
# a tiny valid run of each script; DATA is replaced by a file of the kind the script reads
BASE = {
    "bigram": ["--data", "NAMES", "--max-iters", "1", "--device", "cpu"],
    "mlp": ["--data", "NAMES", "--max-iters", "1", "--eval-iters", "1", "--eval-interval", "1",
            "--final-eval-max", "20", "--num-samples", "1", "--device", "cpu"],
    "bpe": ["--data", "TEXT", "--vocab-size", "260", "--no-compare"],
    "gpt": ["--data", "TEXT", "--max-iters", "2", *MODEL],
    "llama": ["--data", "TEXT", "--max-iters", "2", *MODEL],
    "moe": ["--data", "TEXT", "--max-iters", "2", "--n-experts", "2", "--experts-per-token", "1",
            "--expert-hidden", "16", *MODEL],
    "sft": ["--n-layer", "1", "--n-head", "2", "--n-kv-head", "1", "--n-embd", "16",
            "--batch-size", "4", "--eval-iters", "1", "--n-train", "24", "--n-test", "6",
            "--eval-max-new-tokens", "2", "--max-iters", "1", "--maj-k", "0", "--device", "cpu"],
    "reward": ["--device", "cpu"],
    "dpo": ["--device", "cpu"],
    "ppo": ["--device", "cpu"],
    "grpo": ["--device", "cpu"],
}
SCRIPTS = list(BASE)
TRAINERS = ["bigram", "mlp", "gpt", "llama", "moe"]  # the ones a case here can train in seconds
RESUMABLE = ["mlp", "gpt", "llama", "moe"]
READS_DATA = ["bigram", "mlp", "bpe", "gpt", "llama", "moe"]
OVERWRITE = [s for s in SCRIPTS if s != "bpe"]  # bpe.py has no checkpoint and no --overwrite
SAMPLERS = ["bigram", "mlp", "gpt", "llama", "moe", "sft"]

# (script(s), flags, the flag the error must name); the value is out of range, not finite,
# or breaks a rule across flags. "TRAIN" = every script with that flag.
TRAINING = ["mlp", "gpt", "llama", "moe", "sft"]
FLAG_CASES = [
    (TRAINING + ["bigram", "reward", "dpo"], ["--learning-rate", "nan"], "--learning-rate"),
    (TRAINING + ["bigram", "reward", "dpo"], ["--learning-rate", "-1"], "--learning-rate"),
    (TRAINING + ["bigram"], ["--learning-rate", "inf"], "--learning-rate"),
    (TRAINING + ["bigram", "reward", "dpo"], ["--max-iters", "-1"], "--max-iters"),
    (TRAINING + ["bigram", "reward", "dpo"], ["--batch-size", "0"], "--batch-size"),
    (TRAINING + ["bigram", "reward", "dpo"], ["--batch-size", "-4"], "--batch-size"),
    (TRAINING + ["bigram", "reward", "dpo"], ["--eval-interval", "0"], "--eval-interval"),
    (TRAINING + ["reward", "dpo"], ["--eval-iters", "0"], "--eval-iters"),
    (TRAINING + ["reward", "dpo"], ["--warmup-iters", "-5"], "--warmup-iters"),
    (TRAINING + ["reward", "dpo"], ["--grad-clip", "-1"], "--grad-clip"),
    (TRAINING + ["reward", "dpo"], ["--min-lr", "0.5"], "--min-lr"),
    (TRAINING + ["bigram", "reward", "dpo"], ["--seed", "-1"], "--seed"),
    (["mlp", "gpt", "llama", "moe", "sft"], ["--dropout", "1.5"], "--dropout"),
    (["gpt", "llama", "moe"], ["--beta2", "2"], "--beta2"),
    (["gpt", "llama", "moe"], ["--beta1", "nan"], "--beta1"),
    (["gpt", "llama", "moe", "sft"], ["--n-head", "0"], "--n-head"),
    (["gpt", "llama", "moe", "sft"], ["--n-head", "3"], "--n-embd"),  # 16 % 3
    (["gpt", "llama", "moe", "sft", "mlp"], ["--block-size", "0"], "--block-size"),
    (["gpt", "llama", "moe", "sft"], ["--gradient-accumulation-steps", "0"],
     "--gradient-accumulation-steps"),
    (["gpt", "llama", "moe", "mlp"], ["--log-interval", "0"], "--log-interval"),
    (["llama", "moe", "mlp"], ["--max-time", "-1"], "--max-time"),
    (["gpt", "llama", "moe"], ["--lr-decay-iters", "-1"], "--lr-decay-iters"),
    (["llama", "moe", "sft"], ["--n-kv-head", "-1"], "--n-kv-head"),
    (["llama", "moe"], ["--rope-theta", "0"], "--rope-theta"),
    (["llama"], ["--window", "99"], "--window"),
    (["llama"], ["--sinks", "2"], "--sinks"),
    (["llama"], ["--quantize", "int8"], "--quantize"),
    (["llama"], ["--norm", "batchnorm"], "--norm"),
    (["moe"], ["--capacity-factor", "-1"], "--capacity-factor"),
    (["moe"], ["--experts-per-token", "3"], "--experts-per-token"),
    (["moe"], ["--router-noise", "nan"], "--router-noise"),
    (["moe"], ["--balance", "sometimes"], "--balance"),
    (["gpt"], ["--pos", "rotary"], "--pos"),
    (["gpt"], ["--init-from", "gpt5"], "--init-from"),
    (["mlp"], ["--model", "lstm"], "--model"),
    (["mlp"], ["--final-eval-max", "0"], "--final-eval-max"),
    (["mlp", "bigram"], ["--format", "csv"], "--format"),
    (["bigram"], ["--smoothing", "-1"], "--smoothing"),
    (["bpe"], ["--vocab-size", "100"], "--vocab-size"),
    (["bpe"], ["--pattern", "gpt3"], "--pattern"),
    (["sft"], ["--curriculum-frac", "2"], "--curriculum-frac"),
    (["sft", "reward", "dpo"], ["--n-train", "0"], "--n-train"),
    (["sft"], ["--n-test", "0"], "--n-test"),
    (["sft", "reward", "dpo"], ["--eval-batch-size", "0"], "--eval-batch-size"),
    (["sft"], ["--difficulty", "4"], "--difficulty"),
    (["sft"], ["--task", "translate"], "--task"),
    (["sft", "reward", "dpo"], ["--lora-rank", "-2"], "--lora-rank"),
    (["reward"], ["--loss", "mse"], "--loss"),
    (["dpo"], ["--beta", "0"], "--beta"),
    (["dpo"], ["--label-smoothing", "0.7"], "--label-smoothing"),
    # sampling
    (SAMPLERS + ["dpo"], ["--temperature", "nan"], "--temperature"),
    (SAMPLERS + ["dpo"], ["--temperature", "-1"], "--temperature"),
    (SAMPLERS + ["dpo"], ["--temperature", "inf"], "--temperature"),
    (SAMPLERS, ["--top-p", "0"], "--top-p"),
    (SAMPLERS, ["--top-p", "-0.5"], "--top-p"),
    (SAMPLERS, ["--top-p", "1.5"], "--top-p"),
    (SAMPLERS, ["--top-p", "nan"], "--top-p"),
    (SAMPLERS, ["--top-k", "-3"], "--top-k"),
    (["mlp", "sft"], ["--top-k", "0"], "--top-k"),  # no "0 = off" in these two: a mistake
    (SAMPLERS + ["dpo"], ["--num-samples", "0"], "--num-samples"),
    (SAMPLERS + ["dpo"], ["--num-samples", "-2"], "--num-samples"),
    (SAMPLERS + ["dpo"], ["--max-new-tokens", "-1"], "--max-new-tokens"),
    (SAMPLERS + ["dpo"], ["--max-new-tokens", "0"], "--max-new-tokens"),
]
# ppo.py and grpo.py: every case of dpo.py's whose flag they have too, and their own
FIELDS = {s: {f.name for f in dataclasses.fields(importlib.import_module(s).Config)}
          for s in ("ppo", "grpo")}
FLAG_CASES += [([s], flags, flag) for scripts, flags, flag in FLAG_CASES if "dpo" in scripts
               for s in FIELDS if flags[0][2:].replace("-", "_") in FIELDS[s]
               and (s, flags[0]) != ("grpo", "--beta")]  # grpo: beta 0 = no reference, valid
FLAG_CASES += [
    (["grpo"], ["--group-size", "1"], "--group-size"),
    (["grpo"], ["--loss-type", "ppo"], "--loss-type"),
    (["grpo"], ["--scale", "std"], "--scale"),
    (["grpo"], ["--eps-low", "1.5"], "--eps-low"),
    (["grpo"], ["--rollout-temperature", "0"], "--rollout-temperature"),
    (["grpo"], ["--prompts-per-step", "0"], "--prompts-per-step"),
    (["ppo"], ["--reward", "human"], "--reward"),
    (["ppo"], ["--families", "add,poetry"], "--families"),
]
FLAG_MATRIX = [(s, flags, flag) for scripts, flags, flag in FLAG_CASES for s in scripts]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run faster on one thread (no OpenMP hand-offs), above all on a busy CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def module(script):
    return importlib.import_module(script)


def argv_for(script, tmp_path, *extra, out="out"):
    """The script's tiny run with its data written into tmp_path, --out-dir tmp_path/out."""
    files = {"NAMES": ("names.txt", "\n".join(NAMES) + "\n"), "TEXT": ("text.txt", TEXT)}
    argv = []
    for a in BASE[script]:
        if a in files:
            name, content = files[a]
            (tmp_path / name).write_text(content)
            a = str(tmp_path / name)
        argv.append(a)
    return argv + ["--out-dir", str(tmp_path / out), *extra]


def with_flag(argv, flag, value):
    """argv with `flag value` replacing the script's own value of that flag (or appended)."""
    argv = list(argv)
    if flag in argv:
        argv[argv.index(flag) + 1] = value
        return argv
    return argv + [flag, value]


def snapshot(root):
    return {p: p.read_bytes() for p in Path(root).rglob("*") if p.is_file()}


def fails(capsys, script, argv):
    """Run main(argv): exit 2 and exactly one `error: ` line on stderr, no traceback."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        module(script).main(argv)
    out = capsys.readouterr()
    lines = out.err.splitlines()
    assert e.value.code == 2, f"{script} {argv}: exit {e.value.code}\n{out.err}"
    assert len(lines) == 1 and lines[0].startswith("error: "), f"{script} {argv}:\n{out.err}"
    assert "Traceback" not in out.out + out.err
    return lines[0]


def old_run(tmp_path, out="out"):
    """An out-dir holding an earlier run's files, which no failed run may touch."""
    out_dir = tmp_path / out
    out_dir.mkdir(parents=True)
    (out_dir / "ckpt.pt").write_bytes(b"the old checkpoint")
    (out_dir / "log.jsonl").write_text('{"iter": 0, "loss": 1.0}\n')
    return out_dir


# ---- flags: out of range, not finite, or breaking a cross-field rule; after --overwrite ----
@pytest.mark.parametrize("script, flags, flag", FLAG_MATRIX,
                         ids=[f"{s}{''.join(f)}" for s, f, _ in FLAG_MATRIX])
def test_bad_flag_value_is_one_line_and_damages_nothing(tmp_path, capsys, script, flags, flag):
    out_dir = old_run(tmp_path)
    argv = argv_for(script, tmp_path, *(["--overwrite"] if script in OVERWRITE else []))
    argv = with_flag(argv, flags[0], flags[1])
    before = snapshot(tmp_path)
    line = fails(capsys, script, argv)
    assert line.startswith(f"error: {flag} "), line
    assert snapshot(tmp_path) == before  # the old ckpt.pt and log.jsonl survive --overwrite
    assert not (out_dir / "ckpt.pt.tmp").exists()


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_field_declares_what_it_allows(script):
    """Each numeric flag has a rule, each word flag its choices; only free text is left out."""
    m = module(script)
    free = {"data", "tokenizer", "out_dir", "prompt", "device", "dtype", "init_from", "mix",
            "special", "example", "best_of", "response", "reward_model"}
    hints = typing.get_type_hints(m.Config)
    for f in dataclasses.fields(m.Config):
        kind = next((a for a in typing.get_args(hints[f.name]) if a is not type(None)),
                    hints[f.name])
        if kind is bool or f.name in free:
            continue
        assert f.name in m.RULES or f.name in m.CHOICES, f"{script}: --{f.name} is not checked"
    assert set(m.RULES) | set(m.CHOICES) <= {f.name for f in dataclasses.fields(m.Config)}


@pytest.mark.parametrize("script", SCRIPTS)
def test_defaults_pass_their_own_rules(script):
    m = module(script)
    m.check_config(m.Config(), m.RULES, m.CHOICES)  # no SystemExit


# ---- data: not UTF-8, empty, too small, not a file ----
DATA_CASES = {
    "latin1": b"caf\xe9 ol\xe9, na\xefve\n" * 50,
    "binary": bytes(range(256)) * 8,
    "empty": b"",
    "tiny": b"abcdefghij",
}


@pytest.mark.parametrize("script", READS_DATA)
@pytest.mark.parametrize("case", [*DATA_CASES, "folder", "missing"])
def test_bad_data_is_one_line_and_writes_nothing(tmp_path, capsys, script, case):
    if (script, case) == ("bpe", "tiny"):
        pytest.skip("bpe.py learns a tokenizer from 10 bytes as well (4 merges): not a mistake")
    data = tmp_path / "data.txt"
    if case == "folder":
        data.mkdir()
    elif case != "missing":
        data.write_bytes(DATA_CASES[case])
    out_dir = old_run(tmp_path)
    extra = ["--overwrite"] if script in OVERWRITE else []
    argv = with_flag(argv_for(script, tmp_path, *extra), "--data", str(data))
    before = {p: b for p, b in snapshot(tmp_path).items()}
    line = fails(capsys, script, argv)
    if case in ("latin1", "binary"):
        assert "not UTF-8" in line and str(data) in line and "offset" in line
    after = snapshot(tmp_path)
    assert all(after.get(p) == b for p, b in before.items())  # nothing overwritten
    assert sorted(out_dir.iterdir()) == sorted([out_dir / "ckpt.pt", out_dir / "log.jsonl"])


# ---- output location ----
@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("case", ["out-dir is a file", "out-dir under a file", "ckpt.pt folder"])
def test_out_dir_that_cannot_be_one(tmp_path, capsys, script, case):
    if case == "ckpt.pt folder":
        if script == "bpe":
            pytest.skip("bpe.py writes no ckpt.pt")
        (tmp_path / "out" / "ckpt.pt").mkdir(parents=True)
        out = "out"
    else:
        (tmp_path / "f").write_text("a file of the user's")
        out = "f" if case == "out-dir is a file" else "f/sub"
    extra = ["--overwrite"] if script in OVERWRITE else []
    before = snapshot(tmp_path)
    argv = argv_for(script, tmp_path, *extra, out=out)
    before = snapshot(tmp_path)
    line = fails(capsys, script, argv)
    assert "not a folder" in line or "not a file" in line
    assert snapshot(tmp_path) == before


# ---- checkpoints ----
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One real two-step checkpoint per script that has a checkpoint to damage."""
    root = tmp_path_factory.mktemp("trained")
    ckpts = {}
    for script in TRAINERS:
        d = root / script
        d.mkdir()
        module(script).main(with_flag(argv_for(script, d), "--max-iters", "2"))
        ckpts[script] = d / "out" / "ckpt.pt"
    return ckpts


def damaged(path, how, script):
    """A copy of the checkpoint bytes, damaged one way."""
    raw = path.read_bytes()
    if how == "flipped":  # 2,000 bytes in the middle inverted
        mid = len(raw) // 2
        return raw[:mid] + bytes(b ^ 0xFF for b in raw[mid:mid + 2000]) + raw[mid + 2000:]
    if how == "truncated":
        return raw[: len(raw) // 3]
    ckpt = torch.load(path, weights_only=True)
    if how == "weight changed":  # in place, as a bad disk would: the checksum is now wrong
        next(iter(ckpt["model"].values())).view(-1)[0] += 1.0
    elif how == "missing keys":
        ckpt = {"script": f"{script}.py", "model": {}}
    elif how == "other script":
        ckpt["script"] = "bigram.py" if script != "bigram" else "gpt.py"
        ckpt.pop("sha256")
    import io
    buffer = io.BytesIO()
    torch.save(ckpt, buffer)
    return buffer.getvalue()


CKPT_CASES = ["flipped", "truncated", "weight changed", "missing keys", "other script"]


@pytest.mark.parametrize("script", TRAINERS)
@pytest.mark.parametrize("how", CKPT_CASES)
@pytest.mark.parametrize("mode", ["--sample-only", "--resume"])
def test_damaged_checkpoint_is_one_line(tmp_path, capsys, trained, script, how, mode):
    if mode == "--resume" and script not in RESUMABLE:
        pytest.skip(f"{script}.py has no --resume")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "ckpt.pt").write_bytes(damaged(trained[script], how, script))
    (out_dir / "log.jsonl").write_text('{"iter": 0, "loss": 1.0}\n')
    argv = argv_for(script, tmp_path, mode)
    if mode == "--resume":
        argv = with_flag(argv, "--max-iters", "4")
    before = snapshot(tmp_path)
    line = fails(capsys, script, argv)
    if how == "weight changed":
        assert "corrupted" in line and "SHA-256" in line
    if how == "missing keys":
        assert "has no '" in line
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("script", RESUMABLE)
def test_resume_cannot_end_before_the_checkpoint(tmp_path, capsys, trained, script):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "ckpt.pt").write_bytes(trained[script].read_bytes())  # at iter 2
    argv = with_flag(argv_for(script, tmp_path, "--resume"), "--max-iters", "1")
    before = snapshot(tmp_path)
    assert "--max-iters 1: the checkpoint is at iter 2" in fails(capsys, script, argv)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("script", ["gpt", "llama", "moe"])
def test_resume_cannot_change_the_model(tmp_path, capsys, trained, script):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "ckpt.pt").write_bytes(trained[script].read_bytes())
    argv = with_flag(argv_for(script, tmp_path, "--resume"), "--n-embd", "32")
    assert fails(capsys, script, argv).startswith("error: --n-embd 32: the checkpoint's model")


@pytest.mark.parametrize("script", TRAINERS)
def test_a_sound_checkpoint_still_loads(trained, script):
    ckpt = module(script).load_checkpoint(trained[script], [f"{script}.py"], ("model", "config"))
    assert "sha256" not in ckpt and ckpt["script"] == f"{script}.py"


# ---- logs: strict JSON, and a resumed log without the killed run's extra records ----
def strict(path):
    def refuse(x):
        raise ValueError(f"non-finite number {x} in {path}")
    return [json.loads(line, parse_constant=refuse) for line in Path(path).read_text().splitlines()]


@pytest.mark.parametrize("script", SCRIPTS)
def test_append_jsonl_is_strict_json(tmp_path, script):
    path = tmp_path / "log.jsonl"
    module(script).append_jsonl(path, {"iter": 1, "loss": math.nan,
                                       "by": {"a": math.inf, "b": [1.5, -math.inf]}})
    assert strict(path) == [{"iter": 1, "loss": None, "by": {"a": None, "b": [1.5, None]}}]


def test_infinite_loss_is_null_in_the_log(tmp_path, capsys):
    """bigram --smoothing 0: val/test bigrams never seen in training cost an infinite loss."""
    data = tmp_path / "text.txt"
    data.write_text("abcabcabcabc" * 20 + "xyz" * 10)
    module("bigram").main(["--data", str(data), "--format", "text", "--smoothing", "0",
                           "--max-iters", "1", "--out-dir", str(tmp_path / "out"),
                           "--device", "cpu"])
    done = [r for r in strict(tmp_path / "out" / "log.jsonl") if r.get("event") == "done"]
    assert done[0]["test_loss"] is None and done[0]["perplexity"] is None


def test_huge_learning_rate_does_not_overflow(tmp_path, capsys):
    m = module("bigram").main(with_flag(argv_for("bigram", tmp_path), "--learning-rate", "1e6"))
    assert m["neural"]["perplexity"] > 0  # possibly inf, never an OverflowError
    strict(tmp_path / "out" / "log.jsonl")


@pytest.mark.parametrize("script", ["bigram", "mlp", "gpt", "llama", "moe"])
def test_open_log_trims_a_resumed_log_and_removes_a_stale_tmp(tmp_path, script):
    out = tmp_path / "out"
    out.mkdir()
    (out / "ckpt.pt.tmp").write_bytes(b"half a checkpoint")
    records = [{"iter": 0, "train_loss": 3.0, "val_loss": 3.1}, {"iter": 0, "loss": 3.0},
               {"iter": 1, "loss": 2.9}, {"iter": 2, "train_loss": 2.8, "val_loss": 2.9},
               {"iter": 2, "loss": 2.8}, {"iter": 3, "loss": 2.7}, {"event": "done", "iter": 4}]
    (out / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"iter": 4')
    module(script).open_log(out, 2)  # the checkpoint of iter 2 was saved after its eval
    assert strict(out / "log.jsonl") == records[:4]
    assert not (out / "ckpt.pt.tmp").exists()
    module(script).open_log(out)  # a fresh run
    assert (out / "log.jsonl").read_text() == ""


# ---- the real command line: one subprocess (the rest runs in-process) ----
def test_command_line_bad_value_is_one_line(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(ROOT / "gpt.py"), "--learning-rate", "nan",
                        "--out-dir", str(tmp_path / "out")], capture_output=True, text=True,
                       env=env, cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and r.stderr == "error: --learning-rate nan: expected a finite number\n"
    assert not (tmp_path / "out").exists()
