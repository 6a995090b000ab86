"""The `--device cuda` path of every script: a few steps each on the GPU (bf16 autocast where the
GPU has it, torch.compile on and off), generation with the KV cache equal to the cache-free path,
resume, and the alignment chain end to end. Skipped where CUDA is absent (CI, the 2-core CPU).

Run on a GPU machine: python -m pytest -q tests/test_cuda.py

Every run gives each flag the GPU preset would otherwise raise (model size, steps, batch), so a
test takes seconds; compile adds its warm-up. The checks are what must hold on any GPU: finite
losses, a checkpoint of float32 weights without compile prefixes, a resumed run that continues
from its step, and cache = no cache under greedy decoding.
"""
import json
import math

import pytest
import torch

import bigram
import dpo
import gpt
import grpo
import llama
import mlp
import moe
import ppo
import reward
import sft

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TEXT = "".join(f"{i} little pigs, let me come in! Not by the hair of my chinny chin chin.\n"
               for i in range(200))
NAMES = "\n".join(["emma", "olivia", "ava", "isabella", "sophia", "mia", "amelia", "harper",
                   "evelyn", "abigail", "emily", "ella", "elizabeth", "camila", "luna"] * 20)
COMPILE = ["--compile", "--no-compile"]


def records(out_dir):
    return [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]


def train_iters(out_dir):
    return [r["iter"] for r in records(out_dir) if "loss" in r]


def assert_plain_float32_checkpoint(path):
    """What a CUDA run saves: the raw model's float32 weights (bf16 is only the autocast)."""
    state = torch.load(path, weights_only=True)["model"]
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in state)
    floats = [v for v in state.values() if torch.is_floating_point(v)]
    assert floats and all(v.dtype == torch.float32 for v in floats)
    assert all(torch.isfinite(v).all() for v in floats)


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    return path


# ---- bigram.py, mlp.py -----------------------------------------------------------------------
def test_bigram_cuda(tmp_path):
    data = tmp_path / "names.txt"
    data.write_text(NAMES)
    m = bigram.main(["--data", str(data), "--out-dir", str(tmp_path / "out"), "--device", "cuda",
                     "--max-iters", "20", "--eval-interval", "10", "--num-samples", "2"])
    assert math.isfinite(m["neural"]["test_loss"])
    assert abs(m["neural"]["test_loss"] - m["counts"]["test_loss"]) < 1.0


@pytest.mark.parametrize("compile_flag", COMPILE)
def test_mlp_cuda_and_resume(tmp_path, compile_flag):
    data = tmp_path / "names.txt"
    data.write_text(NAMES)
    flags = ["--data", str(data), "--device", "cuda", compile_flag, "--block-size", "4",
             "--n-embd", "8", "--n-hidden", "32", "--batch-size", "16", "--eval-iters", "2",
             "--eval-interval", "5", "--log-interval", "1", "--num-samples", "2"]
    out = tmp_path / "out"
    mlp.main(flags + ["--out-dir", str(out), "--max-iters", "5"])
    done = mlp.main(flags + ["--out-dir", str(out), "--resume", "--max-iters", "10"])
    assert math.isfinite(done["test_loss"]) and train_iters(out) == list(range(10))
    assert_plain_float32_checkpoint(out / "ckpt.pt")


# ---- gpt.py, llama.py, moe.py ----------------------------------------------------------------
def lm_flags(data, out_dir, *extra):
    return ["--data", str(data), "--out-dir", str(out_dir), "--device", "cuda", "--n-layer", "2",
            "--n-head", "2", "--n-embd", "32", "--block-size", "16", "--batch-size", "4",
            "--eval-iters", "2", "--eval-interval", "3", "--warmup-iters", "2",
            "--log-interval", "1", "--dropout", "0.0", "--num-samples", "1",
            "--max-new-tokens", "8", *extra]


@pytest.mark.parametrize("script", [gpt, llama, moe], ids=["gpt", "llama", "moe"])
@pytest.mark.parametrize("compile_flag", COMPILE)
def test_language_model_cuda_and_resume(script, compile_flag, text_file, tmp_path):
    extra = ["--n-kv-head", "1"] if script is not gpt else []
    if script is moe:
        extra += ["--n-experts", "4", "--expert-hidden", "16"]
    out = tmp_path / "out"
    script.main(lm_flags(text_file, out, compile_flag, *extra, "--max-iters", "3"))
    done = script.main(lm_flags(text_file, out, compile_flag, *extra, "--max-iters", "6",
                                "--resume"))
    assert train_iters(out) == list(range(6))
    losses = [r["val_loss"] for r in records(out) if "val_loss" in r]
    assert losses and all(math.isfinite(v) for v in losses)
    assert math.isfinite(done["val_loss"])
    assert_plain_float32_checkpoint(out / "ckpt.pt")
    samples = script.main(["--out-dir", str(out), "--sample-only", "--device", "cuda",
                           "--num-samples", "1", "--max-new-tokens", "8"])
    assert samples


def test_gpt_bf16_autocast_matches_float32(text_file, tmp_path):
    """The same tiny run in bf16 autocast and in float32 starts from the same loss."""
    first = {}
    for dtype in ("bfloat16", "float32"):
        if dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
            pytest.skip("this GPU has no bf16")
        out = tmp_path / dtype
        gpt.main(lm_flags(text_file, out, "--no-compile", "--dtype", dtype, "--max-iters", "2"))
        first[dtype] = [r["loss"] for r in records(out) if "loss" in r][0]
    assert first["bfloat16"] == pytest.approx(first["float32"], abs=0.05)


def tiny_lm(script, **kw):
    torch.manual_seed(0)
    base = dict(vocab_size=320, block_size=16, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)
    if script is moe:
        base.update(n_experts=4, experts_per_token=2, expert_hidden=16)
    return script.Llama(script.ModelConfig(**base, **kw)).cuda().eval()


@pytest.mark.parametrize("script", [llama, moe], ids=["llama", "moe"])
def test_kv_cache_generation_equals_recompute_on_cuda(script):
    """Within the context (4 + 12 tokens) and, with a sliding window and sinks, for three
    contexts' worth: the rolling cache must give the same greedy tokens as recomputing."""
    prompt = torch.randint(256, (3, 4), device="cuda")
    model = tiny_lm(script)
    with_cache = script.generate(model, prompt, 12, temperature=0, kv_cache=True)
    assert torch.equal(with_cache, script.generate(model, prompt, 12, temperature=0,
                                                   kv_cache=False))
    if script is llama:
        model = tiny_lm(script, window=6, sinks=2)
        with_cache = script.generate(model, prompt, 45, temperature=0, kv_cache=True)
        assert torch.equal(with_cache, script.generate(model, prompt, 45, temperature=0,
                                                       kv_cache=False))


# ---- the alignment chain: sft.py -> reward.py, dpo.py, ppo.py, grpo.py -----------------------
CHAIN = ["--device", "cuda", "--warmup-iters", "1", "--eval-interval", "2",
         "--eval-batch-size", "64"]
ANSWER = ["--eval-max-new-tokens", "4"]  # grpo.py's answers are --max-new-tokens long


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """A tiny SFT model trained on the GPU, and a reward model from it: what the stages read."""
    root = tmp_path_factory.mktemp("chain")
    sft.main(CHAIN + ANSWER + [
        "--out-dir", str(root / "sft"), "--n-layer", "2", "--n-head", "2", "--n-kv-head", "1",
        "--n-embd", "32", "--difficulty", "1", "--batch-size", "8", "--eval-iters", "1",
        "--n-train", "120", "--n-test", "12", "--max-iters", "4", "--maj-k", "0", "--no-compile"])
    reward.main(CHAIN + ANSWER + [
        "--out-dir", str(root / "reward"), "--init-from", str(root / "sft" / "ckpt.pt"),
        "--n-train", "60", "--n-policy", "12", "--batch-size", "8", "--eval-iters", "1",
        "--best-of", "1,2", "--policy-samples", "2", "--max-iters", "4", "--no-compile"])
    return root


def test_sft_and_reward_on_cuda(chain):
    for stage in ("sft", "reward"):
        done = records(chain / stage)[-1]
        assert done["event"] == "done" and math.isfinite(done["accuracy"])
        assert_plain_float32_checkpoint(chain / stage / "ckpt.pt")


@pytest.mark.parametrize("compile_flag", COMPILE)
def test_dpo_on_cuda(chain, tmp_path, compile_flag):
    done = dpo.main(CHAIN + ANSWER + [
        compile_flag, "--init-from", str(chain / "sft" / "ckpt.pt"), "--out-dir",
        str(tmp_path / "dpo"), "--n-train", "48", "--n-policy", "24", "--batch-size", "8",
        "--eval-iters", "1", "--policy-samples", "2", "--max-iters", "4"])
    assert math.isfinite(done["accuracy"]) and math.isfinite(done["pref_accuracy"])


@pytest.mark.parametrize("reward_flags", [["--reward", "checker", "--critic", "separate"],
                                          ["--reward-model", "RM"]], ids=["checker", "rm"])
def test_ppo_on_cuda_and_resume(chain, tmp_path, reward_flags):
    reward_flags = [str(chain / "reward" / "ckpt.pt") if f == "RM" else f for f in reward_flags]
    flags = CHAIN + ANSWER + reward_flags + [
        "--init-from", str(chain / "sft" / "ckpt.pt"), "--n-train", "48", "--rollout-batch", "8",
        "--minibatch-size", "4", "--max-response-tokens", "4", "--no-compile",
        "--out-dir", str(tmp_path / "ppo")]
    ppo.main(flags + ["--max-iters", "2"])
    done = ppo.main(flags + ["--resume", "--max-iters", "4"])
    assert math.isfinite(done["accuracy"]) and math.isfinite(done["kl"])


@pytest.mark.parametrize("compile_flag", COMPILE)
def test_grpo_on_cuda_and_resume(chain, tmp_path, compile_flag):
    flags = CHAIN + [
        compile_flag, "--init-from", str(chain / "sft" / "ckpt.pt"), "--max-new-tokens", "4",
        "--n-train", "30", "--maj-k", "2", "--prompts-per-step", "2", "--group-size", "4",
        "--out-dir", str(tmp_path / "grpo")]
    grpo.main(flags + ["--max-iters", "2"])
    done = grpo.main(flags + ["--resume", "--max-iters", "4"])
    assert math.isfinite(done["accuracy"])
    assert_plain_float32_checkpoint(tmp_path / "grpo" / "ckpt.pt")
