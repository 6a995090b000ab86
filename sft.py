"""Supervised fine-tuning (SFT): teach a language model to answer instructions.

A base model continues text; an assistant answers. SFT closes that "gap" with plain next-token
prediction on (instruction, response) pairs, the loss only on the response tokens (Ouyang et
al. 2022, InstructGPT, arXiv:2203.02155; Wei et al. 2021, FLAN, arXiv:2109.01652). The pairs
come from a seeded *task world* of verifiable problems (addition, subtraction, reversing a word,
sorting letters, counting a letter, comparing two numbers), graded against gold answers with no
download; reward.py, dpo.py, ppo.py and grpo.py copy it, the prompt format, checkpoint and
evaluation. Also here: a curriculum (Bengio et al. 2009; Platanios et al. 2019,
arXiv:1903.09848), LoRA (Hu et al. 2021, arXiv:2106.09685) and classification fine-tuning (a
class head on the last token, Radford et al. 2018, "Improving Language Understanding by
Generative Pre-Training").

Run:
    python sft.py                                   # from scratch, CPU: difficulty 2
    python sft.py --curriculum                      # easy -> hard ordering instead of random
    python sft.py --no-mask-prompt                  # loss on the prompt tokens too
    python sft.py --mix ""                          # equal shares of the six families
    python sft.py --task classify                   # "is this equation correct?" yes/no
    python sft.py --think                           # count answered by a worked trace first
    python sft.py --sample-only --prompt "What is 12 + 7?"
    python sft.py --device cuda                     # GPU preset: 6 x 384, difficulty 3
    python sft.py --init-from out/llama96/ckpt.pt   # from a llama.py base (LoRA: docs/sft.md)
Result: held-out exact match 0.887 in 204-213 s on a 2-core CPU (--think: 0.970; docs/sft.md).
Simplifications: a byte tokenizer (plus the two template markers); examples padded per batch
(no packing); the evaluation batches prompts of equal token length (no padding mask in the
KV-cache decode); no chat template beyond the Alpaca-style `### Instruction:` / `### Response:`.
"""
import argparse
import contextlib
import copy
import dataclasses
import hashlib
import inspect
import json
import math
import os
import random
import re
import sys
import time
import types
import typing
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


# -------------------------------------------------------------------------------
# Config
# -------------------------------------------------------------------------------
@dataclass
class Config:
    device: str = "auto"  # auto|cpu|cuda|cuda:N|mps
    dtype: str = "auto"  # auto|float32|bfloat16|float16
    compile: bool = False  # torch.compile the model (on by default in the GPU preset)
    seed: int = 1337  # every random choice (tasks, init, batches) follows it
    out_dir: str = "out/sft"  # ckpt.pt, log.jsonl and samples.txt go here
    task: str = "generate"  # generate (SFT on the task world) | classify (class head)
    classify_task: str = "equation"  # classify: equation ("is 4 + 5 = 9 correct?") | contains
    head_only: bool = False  # classify: train the class head only (a linear probe), trunk frozen
    init_from: str = ""  # start from a llama.py (or sft.py) checkpoint; empty = from scratch
    difficulty: int = 2  # hardest task level (1-3): L-digit numbers, words of 2L+1 or 2L+2 letters
    n_train: int = 14000  # training problems generated from the task world
    n_test: int = 600  # held-out test problems (disjoint from train by hash of the prompt)
    mix: str = "add=2,sub=2"  # training shares per family (others 1); empty = equal shares
    template_tokens: bool = True  # from scratch: one token per template marker (off: 33 bytes)
    mask_prompt: bool = True  # loss only on response tokens (--no-mask-prompt: on the prompt too)
    think: bool = False  # count answered by a worked trace first (THINK_PRESET: out/sft_think)
    loss_weighting: str = "token"  # token | sqrt | example: how a long trace weighs (--think: sqrt)
    curriculum: bool = False  # sample easy -> hard (by level, then length) instead of at random
    curriculum_frac: float = 0.5  # fraction of max_iters until the whole training set is in play
    lora_rank: int = 0  # LoRA rank r on attention and MLP projections; 0 = full fine-tuning
    lora_alpha: float = 16.0  # LoRA scaling is alpha / r
    n_layer: int = 4  # transformer blocks (from scratch; with --init-from the checkpoint's shape)
    n_head: int = 4  # query heads (from scratch)
    n_kv_head: int = 2  # key/value heads, grouped-query attention (from scratch)
    n_embd: int = 128  # model width (from scratch)
    block_size: int = 96  # context length in tokens (from scratch)
    dropout: float = 0.0  # dropout probability (also replaces a --init-from checkpoint's)
    max_iters: int = 3000  # optimizer steps
    eval_interval: int = 500  # steps between evaluations (response-only loss) and checkpoints
    eval_iters: int = 8  # batches per loss estimate
    batch_size: int = 32  # examples per micro-batch
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step
    learning_rate: float = 1.5e-3  # peak learning rate (AdamW)
    min_lr: float = 7.5e-5  # floor of the cosine decay
    warmup_iters: int = 150  # linear warmup steps
    weight_decay: float = 0.1  # AdamW decoupled weight decay on matrices
    grad_clip: float = 1.0  # clip the global gradient norm (0 = off)
    eval_max_new_tokens: int = 16  # decoding budget per test problem
    eval_batch_size: int = 128  # prompts decoded together in the evaluation
    maj_k: int = 8  # at the end, k sampled answers per test problem: maj@k and pass@k (0 = off)
    maj_temperature: float = 0.7  # sampling temperature of those k answers
    resume: bool = False  # continue the run saved in --out-dir
    overwrite: bool = False  # allow replacing an existing checkpoint in --out-dir
    sample_only: bool = False  # load the checkpoint in --out-dir and only answer --prompt
    prompt: str = "What is 12 + 7?"  # instruction for --sample-only (wrapped in the template)
    num_samples: int = 1  # answers per prompt with --sample-only
    max_new_tokens: int = 32  # tokens per answer with --sample-only
    temperature: float = 0.0  # 0 = greedy; >0 samples
    top_k: typing.Optional[int] = None  # keep the k most likely tokens when sampling
    top_p: typing.Optional[float] = None  # nucleus sampling threshold
    plot: bool = False  # write accuracy_by_task.png (needs matplotlib)


# on CUDA, for every field not given: a wider model, all three levels, 14x the problems
GPU_PRESET = dict(n_layer=6, n_head=6, n_kv_head=2, n_embd=384, difficulty=3, batch_size=256,
                  n_train=200000, max_iters=3000, learning_rate=1e-3, min_lr=1e-4,
                  warmup_iters=100, eval_interval=250, eval_iters=10, compile=True)
# --think, for every field not given: its own folder, room to decode a trace, count's traces
# twice the share, each example's tokens weighted 1/sqrt(n), and 600 more steps (docs/sft.md)
THINK_PRESET = dict(out_dir="out/sft_think", eval_max_new_tokens=40, loss_weighting="sqrt",
                    mix="add=2,sub=2,count=2", max_iters=3600)
# --task classify, for every field not given (after the GPU preset): 4000 add/sub problems
# (each twice, right and near miss), which difficulty 2 has room for on both splits
CLASSIFY_PRESET = dict(n_train=8000)


# -------------------------------------------------------------------------------
# NEW vs llama.py: the task world, its prompt format and the masked labels
# -------------------------------------------------------------------------------
# The task world (docs/design.md section 7): verifiable problems generated from a seed. Every
# stage of the alignment chain copies the task world verbatim, so "accuracy" means the same
# thing in sft.py, reward.py, dpo.py, ppo.py and grpo.py.
TASK_FAMILIES = ("add", "sub", "reverse", "sort", "count", "compare")
PROMPT_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"  # Alpaca-style, Taori et al. 2023
EOT = "<|endoftext|>"  # ends every response; generation stops there
PAD = "<|pad|>"  # fills ragged batches (its targets are IGNORE_INDEX)
# NEW vs llama.py: the template's two markers as single tokens, in the ids of <|reserved_2|>
# and <|reserved_3|>, as chat models give their role markers special tokens. The text stays the
# same; a from-scratch model reads 2 ids instead of 33 bytes (an example shrinks from ~57 ids to
# ~26, so a CPU minute sees twice the problems) and an answer sits a few ids after its question.
# A llama.py base never saw these ids, so with --init-from the markers stay bytes.
TEMPLATE_TOKENS = {"### Instruction:\n": 258, "\n\n### Response:\n": 259}
IGNORE_INDEX = -100  # PyTorch's cross-entropy default: targets with this id add no loss


def format_prompt(prompt):
    """The full text the model sees before its answer, up to and including '### Response:\\n'."""
    return PROMPT_TEMPLATE.format(prompt=prompt)


def encode_prompt(tok, prompt):
    """The template around `prompt` -> ids: one id per marker when the tokenizer has the
    TEMPLATE_TOKENS (sft.py from scratch), the bytes of the markers when not (a llama.py base)."""
    return tok.encode(format_prompt(prompt), [m for m in TEMPLATE_TOKENS if m in tok.special])


def task_tokenizer(template_tokens=True):
    """A fresh byte tokenizer for the task world; with template_tokens the two markers of the
    prompt template take the ids of <|reserved_2|> and <|reserved_3|> (TEMPLATE_TOKENS)."""
    special = dict(BYTE_SPECIAL)
    if template_tokens:
        special = {name: i for name, i in special.items() if i not in TEMPLATE_TOKENS.values()}
        special.update(TEMPLATE_TOKENS)
    return ByteTokenizer(special)


def encode_example(tok, ex, mask_prompt):
    """Model input and per-position targets for prompt + answer + <|endoftext|>.

    targets[t] is the token that should follow input[t] (the ids shifted left by one). With
    mask_prompt the prompt's targets are IGNORE_INDEX: the model is not trained to write the
    instruction, only the answer and the end-of-text token that teaches it to stop.
    """
    prompt_ids = encode_prompt(tok, ex["prompt"])
    ids = prompt_ids + tok.encode_ordinary(ex["answer"]) + [tok.special[EOT]]
    targets = ids[1:]
    if mask_prompt:
        n = len(prompt_ids) - 1  # targets[n] is the first answer token: keep it and after
        targets = [IGNORE_INDEX] * n + targets[n:]
    return ids[:-1], targets


def collate(batch, pad_id):
    """Right-pad a list of (ids, targets) to the longest one -> idx, targets (B, T) tensors.

    Padding positions get IGNORE_INDEX targets (no loss); with causal attention a padding
    token sits *after* every real one, so it changes no real position's output.
    """
    T = max(len(ids) for ids, _ in batch)
    idx = torch.full((len(batch), T), pad_id, dtype=torch.long)
    tgt = torch.full((len(batch), T), IGNORE_INDEX, dtype=torch.long)
    for i, (ids, targets) in enumerate(batch):
        idx[i, :len(ids)] = torch.tensor(ids)
        tgt[i, :len(targets)] = torch.tensor(targets)
    return idx, tgt


def make_word(rng, length):
    """A pronounceable pseudo-word: consonants and vowels alternate (no word list needed)."""
    start = rng.randrange(2)
    return "".join(rng.choice("aeiou" if (i + start) % 2 else "bcdfghklmnprstvz")
                   for i in range(length))


def make_number(rng, digits):
    """A number with exactly `digits` digits (1 digit includes 0)."""
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10 ** digits - 1)


def make_task(family, rng, difficulty, think=False):
    """One problem of `family` at level `difficulty` (1 = easiest) -> {task, prompt, answer}.

    Level L means L-digit numbers (the second operand of + and - has 1..L digits) and words
    of 2L+1 or 2L+2 letters, so the knob scales every family the same way. With `think`, the
    answer of a family that needs one carries a worked trace first, '<trace> = <answer>' (the
    random draws are the same, so the problems are too; `final_answer` reads the answer).
    """
    if family in ("add", "sub"):
        a, b = make_number(rng, difficulty), make_number(rng, rng.randint(1, difficulty))
        if family == "add":
            return {"task": family, "prompt": f"What is {a} + {b}?", "answer": str(a + b)}
        a, b = max(a, b), min(a, b)  # keep the difference non-negative
        return {"task": family, "prompt": f"What is {a} - {b}?", "answer": str(a - b)}
    if family == "compare":
        a = make_number(rng, difficulty)
        b = make_number(rng, difficulty)
        while b == a:
            b = make_number(rng, difficulty)
        return {"task": family, "prompt": f"Which is larger: {a} or {b}?", "answer": str(max(a, b))}
    word = make_word(rng, 2 * difficulty + rng.randint(1, 2))
    if family == "reverse":
        return {"task": family, "prompt": f"Reverse the word: {word}", "answer": word[::-1]}
    if family == "sort":
        return {"task": family, "prompt": f"Sort the letters: {word}",
                "answer": "".join(sorted(word))}
    if family == "count":
        # half the time a letter of the word, so answers are not almost always 0
        letter = (rng.choice(word) if rng.random() < 0.5
                  else rng.choice("abcdefghijklmnopqrstuvwxyz"))
        answer = str(word.count(letter))
        if think:  # the letter, then a running tally: banana, a -> a: b0a1n1a2n2a3 = 3
            tally = "".join(f"{c}{word[:i + 1].count(letter)}" for i, c in enumerate(word))
            answer = f"{letter}: {tally} = {answer}"
        return {"task": family, "prompt": f"Count the letter {letter} in: {word}",
                "answer": answer}
    raise ValueError(f"unknown task family {family!r}; expected one of {TASK_FAMILIES}")


def task_split(prompt):
    """'test' for one prompt in five, 'train' otherwise: a hash of the text decides, so the
    two splits are disjoint by construction, whatever the seed or the order of generation."""
    return "test" if int(hashlib.sha256(prompt.encode()).hexdigest(), 16) % 5 == 0 else "train"


def make_tasks(n, split, seed, difficulty, families=TASK_FAMILIES, think=False):
    """`n` distinct problems of `split`, an equal share per family, levels from 1..difficulty.

    Rejection sampling: a generated problem is kept only if `task_split` puts it in `split`
    and its prompt is new. Each example also records its `level` (for the curriculum).
    """
    rng = random.Random(seed)
    out, seen = [], set()
    for k, family in enumerate(families):
        quota = n // len(families) + (k < n % len(families))
        for _ in range(100 * quota + 1000):  # a small task space runs out: stop, don't loop
            if quota == 0:
                break
            level = rng.randint(1, difficulty)
            ex = make_task(family, rng, level, think)
            if task_split(ex["prompt"]) == split and ex["prompt"] not in seen:
                seen.add(ex["prompt"])
                out.append(dict(ex, level=level))
                quota -= 1
        if quota:
            raise ValueError(f"too few distinct {split} problems of {family} at difficulty "
                             f"{difficulty} for n={n}")
    return out


def mix_families(mix):
    """--mix 'add=2,sub=2' -> the families tuple whose entries make_tasks shares n out to
    equally, so a family listed twice gets twice the problems (a weight of 0 drops it)."""
    weights = dict.fromkeys(TASK_FAMILIES, 1)
    for item in filter(None, mix.split(",")):
        name, _, weight = item.partition("=")
        if name not in weights or not weight.isdigit():
            die(f"--mix {mix}: expected family=weight pairs, families {', '.join(TASK_FAMILIES)}")
        weights[name] = int(weight)
    if not any(weights.values()):
        die(f"--mix {mix}: every family has weight 0")
    return tuple(f for f in TASK_FAMILIES for _ in range(weights[f]))


def final_answer(text):
    """The answer a response gives: cut at <|endoftext|>, the text after the last ' = ' (a
    worked trace ends '... = 3'); a response without a trace is all answer."""
    return text.split(EOT)[0].rsplit(" = ", 1)[-1]


def check_answer(completion, answer):
    """True when the completion's final answer is exactly the gold one: a different trace that
    reaches the right answer counts (the trace is the model's working, not the graded part)."""
    return final_answer(completion).strip() == final_answer(answer).strip()


ANSWER_SHAPES = {"add": r"\d+", "sub": r"\d+", "compare": r"\d+", "count": r"\d+",
                 "reverse": r"[a-z]+", "sort": r"[a-z]+"}  # what a well-formed answer looks like


def follows_format(completion, family):
    """Format adherence: the (final) answer has the family's shape and <|endoftext|> ends it."""
    return (EOT in completion
            and re.fullmatch(ANSWER_SHAPES[family], final_answer(completion)) is not None)


# -------------------------------------------------------------------------------
# NEW vs llama.py: LoRA
# -------------------------------------------------------------------------------
class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update (Hu et al. 2021, arXiv:2106.09685).

    h = W x + (alpha / r) B A x  (Eq. 3), with A (r, in) random and B (out, r) zero at the
    start, so the adapted model first computes exactly what the base model did. Only r*(in+out)
    numbers per matrix are trained instead of in*out.
    """

    def __init__(self, base, rank, alpha):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # the init of the reference loralib
        self.scaling = alpha / rank

    def forward(self, x):
        # (B, T, in) @ (in, r) @ (r, out): never materialise the (out, in) update
        return self.base(x) + (x @ self.lora_A.T @ self.lora_B.T) * self.scaling

    def merged(self):
        """An nn.Linear with W + (alpha/r) B A: same outputs, no extra cost at inference."""
        lin = nn.Linear(self.base.in_features, self.base.out_features, bias=False)
        lin.weight.data.copy_(self.base.weight + self.scaling * self.lora_B @ self.lora_A)
        return lin.to(self.base.weight.device)


def apply_lora(model, rank, alpha):
    """Freeze every weight, then wrap the attention and MLP projections of each block with
    LoRA adapters (trainable). Embeddings and norms stay frozen; main() unfreezes the head."""
    model.requires_grad_(False)
    for block in model.transformer.h:
        for parent in (block.attn, block.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, LoRALinear(child, rank, alpha))
    return model


def merge_lora(model):
    """Replace every LoRALinear by its merged nn.Linear, in place: the state_dict then has the
    base model's keys, so the next stage (or llama.py-format tools) can load it as is."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, name, child.merged())
    return model


# -------------------------------------------------------------------------------
# Training: batches (with a curriculum), the response loss, building the run, the loop
# -------------------------------------------------------------------------------
def competence(step, total, c0=0.1):
    """Fraction of the (easy -> hard sorted) training set in play at `step`: the square-root
    schedule of Platanios et al. 2019 (arXiv:1903.09848), from c0 to 1 at step `total`."""
    if total <= 0:
        return 1.0
    return min(1.0, math.sqrt(step * (1 - c0 ** 2) / total + c0 ** 2))


def curriculum_order(examples, encoded):
    """Indices of the examples from easy to hard: by difficulty level, then token length."""
    return sorted(range(len(examples)), key=lambda i: (examples[i]["level"], len(encoded[i][0])))


def get_batch(encoded, batch_size, generator, pool, pad_id, device):
    """Draw batch_size examples at random from the first `pool` of `encoded` and collate them.
    With the curriculum, `encoded` is sorted easy -> hard and `pool` grows with competence;
    without it, pool = everything (plain random order)."""
    ix = torch.randint(pool, (batch_size,), generator=generator).tolist()
    idx, tgt = collate([encoded[i] for i in ix], pad_id)
    return idx.to(device), tgt.to(device)


def pool_at(step, cfg, encoded):
    """How many of the (sorted) training examples the batch of `step` may come from."""
    if not cfg.curriculum:
        return len(encoded)
    c = competence(step, cfg.curriculum_frac * cfg.max_iters)
    return max(cfg.batch_size, int(c * len(encoded)))


LOSS_POWER = {"token": 0.0, "sqrt": 0.5, "example": 1.0}  # --loss-weighting -> p


def response_loss(logits, targets, weighting):
    """Cross-entropy over the response tokens, each token of an example with n of them weighted
    n**-p: p = 0 is the token mean (a 20-token trace counts 20 times a 1-token answer), p = 1 the
    per-example mean (every example counts once, so a trace token counts 1/20), sqrt between."""
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                         reduction="none").view_as(targets)  # (B, T), 0 where ignored
    mask = (targets != IGNORE_INDEX).float()
    w = mask * mask.sum(1, keepdim=True).clamp(min=1) ** -LOSS_POWER[weighting]
    return (ce * w).sum() / w.sum()


@torch.no_grad()
def estimate_loss(model, splits, eval_iters, batch_size, pad_id, device, ctx):
    """Mean masked loss over fixed batches of each split (no RNG used: resume stays exact)."""
    model.eval()
    out = {}
    for name, encoded in splits.items():
        losses = []
        for i in range(0, min(len(encoded), eval_iters * batch_size), batch_size):
            idx, tgt = collate(encoded[i:i + batch_size], pad_id)
            with ctx:
                losses.append(model(idx.to(device), tgt.to(device))[1].item())
        out[name] = sum(losses) / len(losses)
    model.train()
    return out


def build(cfg, resumed, init, device):
    """The tokenizer and the model (a resumed run's, a llama.py or sft.py one's, or from scratch),
    class head and LoRA -> tok, the model on device, model_args, (total, trainable) params."""
    ckpt_path = Path(cfg.out_dir) / "ckpt.pt"
    source, source_path = (resumed, ckpt_path) if resumed else (init, cfg.init_from)
    if source is not None:
        tok, model_args = tokenizer_from(source, source_path), source["model_args"]
        print(f"model from {source_path} ({source['script']}, iter {source['iter']}): {model_args}")
    else:
        tok = task_tokenizer(cfg.template_tokens)
        model_args = dataclasses.asdict(ModelConfig(
            vocab_size=padded_vocab(tok.n_vocab), block_size=cfg.block_size, n_layer=cfg.n_layer,
            n_head=cfg.n_head, n_embd=cfg.n_embd, n_kv_head=cfg.n_kv_head))
    model_args = dict(model_args, dropout=cfg.dropout)  # SFT's own dropout, not pretraining's
    model = build_model(model_args, "generate")
    if init is not None:
        load_weights(model, init["model"], cfg.init_from)
    if cfg.task == "classify":
        model.lm_head = build_model(model_args, "classify").lm_head
        if cfg.head_only:  # a linear probe: what the trunk already knows, read by one layer
            model.requires_grad_(False)
            model.lm_head.requires_grad_(True)
    n_total = sum(p.numel() for p in model.parameters())
    if cfg.lora_rank:
        apply_lora(model, cfg.lora_rank, cfg.lora_alpha)
        # the output head trains too (as PEFT's modules_to_save): a llama.py base has learned
        # never to predict <|endoftext|>, which adapters on the blocks alone barely undo (rank 4:
        # loss 3.5 after 1500 steps, full fine-tuning 0.9); a new class head must learn anyway
        model.lm_head.requires_grad_(True)
    if resumed is not None:
        load_weights(model, resumed.get("lora", resumed["model"]), ckpt_path)
    model.to(device)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"parameters: {n_total / 1e6:.3f}M, trainable: {n_train / 1e6:.3f}M "
          f"({100 * n_train / n_total:.2f}%)")
    return tok, model, model_args, (n_total, n_train)


def build_data(cfg, tok, block_size):
    """The task world's problems, tokenized once -> train_ex, test_ex and the encoded splits
    {"train", "val"} (the curriculum sorts the training set easy -> hard)."""
    try:
        if cfg.task == "generate":
            # the test set keeps equal shares: the accuracy is a plain mean over families
            train_ex = make_tasks(cfg.n_train, "train", cfg.seed, cfg.difficulty,
                                  mix_families(cfg.mix), cfg.think)
            test_ex = make_tasks(cfg.n_test, "test", cfg.seed + 1, cfg.difficulty,
                                 think=cfg.think)
        else:
            make = (make_classify_examples if cfg.classify_task == "equation"
                    else make_contains_examples)
            train_ex = make(cfg.n_train, "train", cfg.seed, cfg.difficulty)
            test_ex = make(cfg.n_test, "test", cfg.seed + 1, cfg.difficulty)
    except ValueError as e:
        die(f"{e}: lower --n-train/--n-test or raise --difficulty")
    if cfg.task == "generate":
        train_enc = [encode_example(tok, ex, cfg.mask_prompt) for ex in train_ex]
        # the val loss is always the response-only loss, so --no-mask-prompt stays comparable
        val_enc = [encode_example(tok, ex, True) for ex in test_ex]
    else:
        train_enc, val_enc = [[encode_classify(tok, ex) for ex in s] for s in (train_ex, test_ex)]
    longest = max(len(ids) for ids, _ in train_enc + val_enc)
    if longest > block_size:
        die(f"examples reach {longest} tokens but the context is {block_size}; "
            f"lower --difficulty or raise --block-size")
    if cfg.curriculum:
        train_enc = [train_enc[i] for i in curriculum_order(train_ex, train_enc)]
    return train_ex, test_ex, {"train": train_enc, "val": val_enc}


def train(cfg, model, splits, resumed, tok, model_args, device, dtype, ctx):
    """AdamW on the masked loss: every eval_interval steps (and at the end) the loss of both
    splits and a checkpoint, then one optimizer step and its log record -> losses, start time."""
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    # weight decay on matrices only (embeddings included, as in nanoGPT)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
         {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
        lr=cfg.learning_rate, betas=(0.9, 0.95), fused=device_type == "cuda")
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == "float16")
    data_gen, start, best_val, log_path = restore(cfg, resumed, optimizer)
    ckpt_path, train_enc, pad = Path(cfg.out_dir) / "ckpt.pt", splits["train"], tok.special[PAD]
    # the steps run the compiled model; the uncompiled one is saved, evaluated and sampled from
    compiled = torch.compile(model) if cfg.compile else model
    # the data generator's state *before* the pending batch is what a checkpoint stores, so a
    # resumed run draws that same batch again (bit-exact resume on CPU)
    data_state = data_gen.get_state()
    X, Y = get_batch(train_enc, cfg.batch_size, data_gen, pool_at(start, cfg, train_enc), pad,
                     device)
    t_start = t_last = time.time()
    for step in range(start, cfg.max_iters + 1):
        last_step = step == cfg.max_iters
        # a resumed run's evaluation at its checkpoint is in the log already (open_log)
        if (step % cfg.eval_interval == 0 or last_step) and (step > start or resumed is None
                                                            or last_step):
            losses = estimate_loss(model, splits, cfg.eval_iters, cfg.batch_size, pad, device, ctx)
            print(f"step {step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
            append_jsonl(log_path, {"iter": step, "train_loss": losses["train"],
                                    "val_loss": losses["val"], "elapsed_s": time.time() - t_start})
            best_val = min(best_val, losses["val"])
            if step > start or last_step:
                save_checkpoint(make_checkpoint(cfg, model_args, tok, model, optimizer, step,
                                                best_val, data_state, device), ckpt_path)
            t_last = time.time()  # evaluation time is not training time
        if last_step:
            break
        lr = get_lr(step, cfg.learning_rate, cfg.min_lr, cfg.warmup_iters, cfg.max_iters)
        for group in optimizer.param_groups:
            group["lr"] = lr
        n_tokens = 0
        try:
            for micro in range(cfg.gradient_accumulation_steps):
                with ctx:
                    if cfg.loss_weighting == "token":
                        _, loss = compiled(X, Y)
                    else:
                        loss = response_loss(compiled(X)[0], Y, cfg.loss_weighting)
                    # the mean of means: a micro-batch with fewer answer tokens weighs as much as
                    # one with more (exact for equal counts; nanoGPT's simplification)
                    loss = loss / cfg.gradient_accumulation_steps
                n_tokens += X.numel()
                # fetch the next batch (for this step's next micro-batch or the next step)
                data_state = data_gen.get_state()
                next_step = step + (micro + 1 == cfg.gradient_accumulation_steps)
                X, Y = get_batch(train_enc, cfg.batch_size, data_gen,
                                 pool_at(next_step, cfg, train_enc), pad, device)
                scaler.scale(loss).backward()
        except torch.OutOfMemoryError:
            die(f"CUDA out of memory at batch size {cfg.batch_size}; "
                f"try --batch-size {cfg.batch_size // 2}")
        loss_value = loss.item() * cfg.gradient_accumulation_steps
        if not math.isfinite(loss_value):
            kept = f"the last good checkpoint {ckpt_path} is kept" if ckpt_path.is_file() else \
                "no checkpoint was written"
            die(f"loss is {loss_value} at iter {step}; stopped, {kept} (try a lower "
                f"--learning-rate)")
        if cfg.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if device_type == "cuda":
            torch.cuda.synchronize()
        t_last = log_step(log_path, cfg, step, start, loss_value, lr, n_tokens, t_start, t_last)
    return losses, t_start


# -------------------------------------------------------------------------------
# Evaluation against the gold answers, and main() (its report is in the Appendix)
# -------------------------------------------------------------------------------
@torch.no_grad()
def generate_until(model, idx, max_new_tokens, stop_id, temperature=0.0, top_k=None, top_p=None,
                   generator=None):
    """`generate` that stops early once every row has emitted stop_id (an answer ends with
    <|endoftext|>); a row that stopped keeps sampling until the others do: cut it with
    `completion_text`."""
    done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
    out = [idx]
    for next_id in stream(model, idx, max_new_tokens, temperature, top_k, top_p, generator):
        out.append(next_id)  # (B, 1)
        done |= next_id.squeeze(1) == stop_id
        if done.all():
            break
    return torch.cat(out, dim=1)  # (B, T0 + new)


def completion_text(tok, ids):
    """Generated ids -> text, cut after the first <|endoftext|>; ids of the padded vocabulary
    that no token has (rare once trained) are dropped."""
    eot = tok.special[EOT]
    if eot in ids:
        ids = ids[:ids.index(eot) + 1]
    return tok.decode([i for i in ids if i < tok.n_vocab])


@torch.no_grad()
def evaluate_tasks(model, tok, examples, max_new_tokens, batch_size, device, ctx):
    """Greedy answers to the test problems -> exact-match accuracy and format adherence.

    Prompts of equal token length are decoded together, so a batch needs no padding and the
    KV cache no attention mask; each batch stops once every row has emitted <|endoftext|>.
    """
    model.eval()
    groups = defaultdict(list)
    for ex in examples:
        groups[len(encode_prompt(tok, ex["prompt"]))].append(ex)
    results = []
    for T, group in sorted(groups.items()):
        for i in range(0, len(group), batch_size):
            chunk = group[i:i + batch_size]
            idx = torch.tensor([encode_prompt(tok, ex["prompt"]) for ex in chunk], device=device)
            with ctx:
                out = generate_until(model, idx, max_new_tokens, tok.special[EOT])
            for ex, row in zip(chunk, out[:, T:].tolist()):
                results.append((ex, completion_text(tok, row)))
    model.train()
    by_task = defaultdict(list)
    for ex, completion in results:
        response = completion.split(EOT)[0]
        by_task[ex["task"]].append((check_answer(completion, ex["answer"]),
                                    follows_format(completion, ex["task"]),
                                    response.strip() == ex["answer"].strip(),  # trace and all
                                    len(tok.encode_ordinary(response))))
    per_task = [{t: sum(r[j] for r in v) / len(v) for t, v in by_task.items()} for j in range(4)]
    acc, fmt, exact, length = per_task
    return {"accuracy": sum(acc.values()) / len(acc), "accuracy_by_task": acc,
            "format_rate": sum(fmt.values()) / len(fmt), "format_by_task": fmt,
            "exact_by_task": exact, "length_by_task": length,
            "counts": {t: len(v) for t, v in by_task.items()}, "samples": results}


def main(argv=None):
    cfg, given = parse_config(Config, argv, __doc__.splitlines()[0])
    device = resolve_device(cfg.device)
    if device.startswith("cuda"):
        cfg = apply_preset(cfg, GPU_PRESET, given)
    if cfg.task == "classify":
        cfg = apply_preset(cfg, CLASSIFY_PRESET, given)
    if cfg.think:
        cfg = apply_preset(cfg, THINK_PRESET, given)
    dtype = resolve_dtype(cfg.dtype, device)
    check_config(cfg, RULES, CHOICES)
    print(" ".join(f"{k}={v}" for k, v in dataclasses.asdict(cfg).items()))
    print(f"device={device} dtype={dtype} compile={'on' if cfg.compile else 'off'}")
    torch.manual_seed(cfg.seed)
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    ctx = (torch.amp.autocast(device_type, dtype=getattr(torch, dtype)) if dtype != "float32"
           else contextlib.nullcontext())
    if cfg.sample_only:
        return sample_only(cfg, device, ctx)
    check_out_dir(Path(cfg.out_dir), cfg.resume, cfg.overwrite)
    resumed, init = load_sources(cfg)  # --resume's checkpoint, or --init-from's
    tok, model, model_args, counts = build(cfg, resumed, init, device)
    train_ex, test_ex, splits = build_data(cfg, tok, model.config.block_size)
    before = None
    if init is not None and cfg.task == "generate":
        # the "gap": a base model continues text, it does not answer (or stop)
        before = evaluate_tasks(model, tok, test_ex, cfg.eval_max_new_tokens, cfg.eval_batch_size,
                                device, ctx)
        print(f"before SFT: accuracy {before['accuracy']:.3f}, format {before['format_rate']:.3f}")
        show_samples(before, k=3)
    losses, t_start = train(cfg, model, splits, resumed, tok, model_args, device, dtype, ctx)
    merge_lora(model)  # adapters folded in: the model that was saved is the one evaluated
    wall = time.time() - t_start
    # the final evaluation against gold answers on the held-out test problems
    return report(cfg, model, tok, test_ex, splits, losses, wall, counts, before, device, ctx)


# -------------------------------------------------------------------------------
# Appendix: a first read can stop here (copies, bookkeeping, plumbing)
# -------------------------------------------------------------------------------
# ---- Appendix: from llama.py — model (unchanged), tokenizer (+ encode), get_lr, sampling ----
@dataclass
class ModelConfig:
    """The Llama's shape, saved in the checkpoint as `model_args` (see Config for the meanings)."""
    vocab_size: int  # V (the tokenizer's, padded to a multiple of 64)
    block_size: int  # T
    n_layer: int  # L
    n_head: int  # nh
    n_embd: int  # C
    n_kv_head: int = 0  # nkv (0 = n_head: multi-head attention)
    dropout: float = 0.0  # p
    tie_weights: bool = False  # LM head = token embedding
    norm: str = "rmsnorm"  # or layernorm
    pos: str = "rope"  # or learned, none
    mlp: str = "swiglu"  # or gelu
    rope_theta: float = 10000.0  # RoPE base
    window: int = 0  # sliding window W (0 = full causal attention)
    sinks: int = 0  # attention sinks S
    norm_eps: float = 1e-5  # epsilon of RMSNorm/LayerNorm

    def __post_init__(self):
        self.n_kv_head = self.n_kv_head or self.n_head


class RMSNorm(nn.Module):
    """NEW vs gpt.py: RMSNorm (Zhang & Sennrich 2019, arXiv:1910.07467), y = x / rms(x) * g.

    LayerNorm re-centres (subtracts the mean) and re-scales; RMSNorm keeps only the re-scaling,
    which the paper found carries the benefit: one reduction instead of two, and no bias.
    """

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))  # the gain g

    def forward(self, x):
        xf = x.float()  # the mean of squares in float32, also under bf16 autocast
        rms_inv = torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)  # (B, T, 1)
        return (xf * rms_inv).type_as(x) * self.weight


def make_norm(config):
    """--norm rmsnorm (Llama) or layernorm (gpt.py's, without bias like every layer here)."""
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd, config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=False)


def rope_cos_sin(pos, hs, theta):
    """cos and sin of the rotary angles pos * theta^(-2i/hs), i < hs/2 -> two (T, hs/2) tensors.

    Pair i turns by theta^(-2i/hs) radians per position: from one radian per token (i = 0) to
    a full turn every ~60k tokens (theta = 10^4), so both near and far offsets stay distinct.
    Computed in float64: 10^4 tokens into a stream float32 angles would be off by ~1e-3 rad.
    """
    # (hs/2,)
    inv_freq = theta ** (-torch.arange(0, hs, 2, dtype=torch.float64, device=pos.device) / hs)
    angles = pos.double()[:, None] * inv_freq[None, :]  # (T, 1) * (1, hs/2) -> (T, hs/2)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x, cos, sin):
    """NEW vs gpt.py: rotary position embedding (RoFormer, Su et al. 2021, arXiv:2104.09864).

    Each pair (x_i, x_{i+hs/2}) of a query or key x (..., hs) at position m is turned by the
    angle m*w_i (cos, sin: (T, hs/2), or (T, 1, hs/2) for x in (B, T, heads, hs) layout).
    Relative position falls out of the dot product: with R(a) the rotation by a,
    q_m . k_n = (R(mw) q)^T (R(nw) k) = q^T R(mw)^T R(nw) k = q^T R((n-m)w) k, because rotations
    compose and R(a)^T = R(-a). An attention score depends only on the offset n - m (Eq. 16 of
    the paper), never on where the pair sits in the text, and rotations keep norms. Which
    dimensions pair up is a convention (halves here, like GPT-NeoX and Hugging Face's Llama;
    Meta's code interleaves): Wq and Wk absorb it.
    """
    x1, x2 = x.chunk(2, dim=-1)  # (..., hs/2) each
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).type_as(x)


def attention_mask(qpos, kpos, window, sinks):
    """NEW vs gpt.py: (Tq, Tk) bool, True where a query at position qpos may see a key at kpos.

    Causal; with a window W a query sees only the last W positions (its own included) and the
    first S, the attention sinks: Xiao et al. (arXiv:2309.17453) found that softmax attention
    parks surplus weight on the first tokens, so evicting them breaks a sliding window.
    kpos = -1 marks an empty cache slot.
    """
    qpos, kpos = qpos[:, None], kpos[None, :]  # (Tq, 1), (1, Tk)
    mask = (kpos <= qpos) & (kpos >= 0)
    if window:
        mask = mask & ((kpos > qpos - window) | (kpos < sinks))
    return mask


class KVCache:
    """NEW vs gpt.py: the keys and values of every layer, preallocated, for generation.

    Each generated token then costs one forward pass of one token, instead of a pass over the
    whole context. Without a window, slot = position and the cache holds block_size positions.
    With --window W --sinks S it is a rolling buffer of S + W slots: positions 0..S-1 (the
    sinks) keep slots 0..S-1 for ever, later positions cycle through slots S..S+W-1, each
    overwriting the one that has just left every query's window, so memory and time per token
    stay constant however long the stream. `pos` (the position in each slot) feeds the masks.
    """

    def __init__(self, config, batch_size):
        self.window, self.sinks = config.window, config.sinks
        self.capacity = config.sinks + config.window if config.window else config.block_size
        self.shape = (config.n_layer, batch_size, config.n_kv_head, self.capacity,
                      config.n_embd // config.n_head)  # (L, B, nkv, slots, hs)
        self.k = self.v = None  # allocated at the first write, in the keys' dtype and device
        self.pos = None  # (slots,) position held by each slot, -1 = empty
        self.seen = 0  # positions written so far = the position of the next token
        self.slots = None  # the slots of the tokens of the current forward pass

    @property
    def full(self):
        """A plain cache cannot take another token; a rolling one never fills."""
        return not self.window and self.seen == self.capacity

    def advance(self, pos):
        """Give slots to the new positions pos (T,); called once per forward pass."""
        T = pos.numel()
        if self.pos is None:
            self.pos = torch.full((self.capacity,), -1, dtype=torch.long, device=pos.device)
        if self.seen + T <= self.capacity:
            self.slots = pos  # until the buffer wraps, slot = position
        elif self.window and T == 1:
            self.slots = self.sinks + (pos - self.sinks) % self.window  # the ring after the sinks
        else:  # a chunk that wraps would overwrite keys its own first tokens still need
            raise ValueError(f"{T} new tokens do not fit the cache ({self.seen} of {self.capacity} "
                             "slots used); feed them one at a time (see prefill)")
        self.pos.index_copy_(0, self.slots, pos)
        self.seen += T

    def update(self, layer, k, v):
        """Store a layer's new keys and values (B, nkv, T, hs) -> that layer's filled slots
        (B, nkv, n, hs) twice and the positions they hold (n,)."""
        if self.k is None:
            self.k = torch.zeros(self.shape, dtype=k.dtype, device=k.device)
            self.v = torch.zeros(self.shape, dtype=v.dtype, device=v.device)
        self.k[layer].index_copy_(2, self.slots, k)
        self.v[layer].index_copy_(2, self.slots, v)
        n = min(self.seen, self.capacity)
        return self.k[layer, :, :, :n], self.v[layer, :, :, :n], self.pos[:n]

    def nbytes(self):
        return 0 if self.k is None else self.k.nbytes + self.v.nbytes


class CausalSelfAttention(nn.Module):
    """Causal self-attention with grouped-query heads, rotary positions and an optional
    sliding window with attention sinks.

    NEW vs gpt.py: grouped-query attention (Ainslie et al. 2023, arXiv:2305.13245): only
    n_kv_head key/value heads, each shared by a group of n_head/n_kv_head query heads, so the
    KV cache shrinks by that factor at a small cost in quality; n_kv_head = n_head is gpt.py's
    multi-head attention, n_kv_head = 1 is multi-query attention (Shazeer 2019).
    """

    def __init__(self, config, layer_idx):
        super().__init__()
        self.hs = config.n_embd // config.n_head
        kv_dim = config.n_kv_head * self.hs
        # Q, K, V at once: C query columns, then kv_dim key and kv_dim value columns; no biases
        self.c_attn = nn.Linear(config.n_embd, config.n_embd + 2 * kv_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.dropout = config.dropout
        self.window, self.sinks = config.window, config.sinks
        self.layer_idx = layer_idx  # which layer of a KVCache is this one's

    def forward(self, x, pos, rope, cache=None):
        """x (B, T, C) at positions pos (T,); rope = ((cos, sin), sink (cos, sin) or None) or
        None; with a cache, the keys and values of earlier positions come from there."""
        B, T, C = x.size()
        nh, nkv = self.n_head, self.n_kv_head
        qkv = self.c_attn(x)  # (B, T, C + 2 kv_dim): nh query heads, nkv key heads, nkv value heads
        qk = qkv[..., :(nh + nkv) * self.hs].view(B, T, nh + nkv, self.hs)  # (B, T, nh+nkv, hs)
        # (B, nkv, T, hs)
        v = qkv[..., (nh + nkv) * self.hs:].view(B, T, nkv, self.hs).transpose(1, 2)
        q_sink = None
        if rope is not None:  # cos, sin: (T, 1, hs/2), broadcast over the heads
            (cos, sin), sink_rope = rope
            if sink_rope is not None:
                q_sink = apply_rope(qk[:, :, :nh], *sink_rope).transpose(1, 2)  # (B, nh, T, hs)
            qk = apply_rope(qk, cos, sin)  # queries and keys turned in one go
        q, k = qk.transpose(1, 2).split([nh, nkv], dim=1)  # (B, nh, T, hs), (B, nkv, T, hs)
        kpos = pos
        if cache is not None:
            k, v, kpos = cache.update(self.layer_idx, k, v)  # (B, nkv, Tk, hs) x2, (Tk,)
        dropout_p = self.dropout if self.training else 0.0
        if q_sink is not None:
            y = self.sink_attention(q, k, v, q_sink, pos, kpos)
        elif not self.window and (T == 1 or k.size(2) == T):
            # plain causal attention in one fused kernel (one new token sees every cached key);
            # enable_gqa lets each group of n_head/n_kv_head query heads read its shared
            # key/value head without copies
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=T > 1,
                                               enable_gqa=True)  # (B, nh, T, hs)
        else:  # a window, or T new queries after Tk - T cached positions: explicit mask
            mask = attention_mask(pos, kpos, self.window, self.sinks)  # (T, Tk)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                               enable_gqa=True)  # (B, nh, T, hs)
        # (B, T, nh, hs) -> (B, T, C): heads side by side
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))

    def sink_attention(self, q, k, v, q_sink, pos, kpos):
        """NEW vs gpt.py: window + sink attention, the sinks scored at rolling-cache offsets.

        Which positions should RoPE see once a stream outgrows block_size? StreamingLLM
        (arXiv:2309.17453, Sec. 3.2) numbers tokens by their place in the cache, not in the
        text, and so do we: with absolute positions the sinks would end up 10 * block_size
        tokens before the query, an offset no training step ever showed the model. As scores
        depend only on offsets (apply_rope), no cached key needs re-rotating: a window key is
        fewer than W positions from its query either way, and a sink key is scored against the
        query turned to its cache slot min(t, S+W-1) instead of t (q_sink), an offset of at
        most S+W-1 < block_size. Training uses the same rule, so a full forward pass and the
        rolling cache compute one function at every length (tests/test_llama.py checks it).
        """
        rep = self.n_head // self.n_kv_head
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (B, nh, Tk, hs)
        S = self.sinks  # positions 0..S-1 are the first S keys, in a full pass and in the cache
        # (B, nh, T, hs) @ (B, nh, hs, Tk) -> (B, nh, T, Tk)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.hs))
        # (B, nh, T, S)
        att_sink = (q_sink @ k[:, :, :S].transpose(-2, -1)) * (1.0 / math.sqrt(self.hs))
        # (T, S): seen as a sink, not in the window
        outside = kpos[None, :S] <= pos[:, None] - self.window
        att = torch.cat((torch.where(outside, att_sink, att[..., :S]), att[..., S:]), dim=-1)
        mask = attention_mask(pos, kpos, self.window, S)  # (T, Tk)
        att = att.masked_fill(~mask, float("-inf")).softmax(dim=-1)  # rows sum to 1
        return self.attn_dropout(att) @ v  # (B, nh, T, Tk) @ (B, nh, Tk, hs) -> (B, nh, T, hs)


def swiglu_hidden(n_embd):
    """SwiGLU has three matrices where gpt.py's MLP has two: a hidden size of 2/3 * 4C keeps
    the parameter count (3 * C * 8C/3 = 2 * C * 4C), rounded to a multiple of 32 for speed."""
    return 32 * round(2 * 4 * n_embd / 3 / 32)


class MLP(nn.Module):
    """Position-wise feed-forward net: SwiGLU (or gpt.py's GELU MLP with --mlp gelu)."""

    def __init__(self, config):
        super().__init__()
        self.swiglu = config.mlp == "swiglu"
        hidden = swiglu_hidden(config.n_embd) if self.swiglu else 4 * config.n_embd
        # NEW vs gpt.py: for SwiGLU c_fc makes the gate and the value in one matmul
        self.c_fc = nn.Linear(config.n_embd, 2 * hidden if self.swiglu else hidden, bias=False)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        h = self.c_fc(x)  # (B, T, C) -> (B, T, 2H) for SwiGLU, (B, T, 4C) for GELU
        if self.swiglu:
            # NEW vs gpt.py: SwiGLU (Shazeer 2020, arXiv:2002.05202, Eq. 6): silu(x W) * (x V),
            # a gated linear unit; the multiplicative gate beat GELU in the paper's tables
            gate, value = h.chunk(2, dim=-1)  # (B, T, H) each
            h = F.silu(gate) * value
        else:
            h = F.gelu(h)
        return self.dropout(self.c_proj(h))  # (B, T, H) -> (B, T, C)


class Block(nn.Module):
    """Pre-norm transformer block, as in gpt.py: the residual stream x is only ever added to."""

    def __init__(self, config, layer_idx):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, pos, rope, cache=None):
        x = x + self.attn(self.ln_1(x), pos, rope, cache)  # tokens exchange information
        x = x + self.mlp(self.ln_2(x))  # each token thinks on its own
        return x


class Llama(nn.Module):
    """Token embedding -> n_layer Blocks (RoPE inside attention) -> RMSNorm -> logits."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        modules = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))
        if config.pos == "learned":  # ablation: gpt.py's position table
            modules["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        self.transformer = nn.ModuleDict(dict(
            **modules,
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=make_norm(config),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            # NEW vs gpt.py: tying is optional (Llama unties: input and output embeddings
            # can then specialise); tied, one (V, C) parameter is counted once
            self.transformer.wte.weight = self.lm_head.weight
        # NEW vs gpt.py: the RoPE angles of the trained positions, buffers (neither trained
        # nor saved: recomputed from the shape)
        cos, sin = rope_cos_sin(torch.arange(config.block_size), config.n_embd // config.n_head,
                                config.rope_theta)
        self.register_buffer("cos", cos, persistent=False)  # (block_size, hs/2)
        self.register_buffer("sin", sin, persistent=False)
        # initialisation, GPT-2 style as in gpt.py: every weight N(0, 0.02); the projections that
        # write into the residual stream get std 0.02/sqrt(2L) (Radford et al. 2019, §2.3), so
        # the variance of the stream, a sum of 2L such writes, does not grow with depth
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def num_params(self, non_embedding=True):
        """Parameter count; non_embedding leaves out a learned position table, as Kaplan et
        al. (2020) and nanoGPT do (RoPE has no parameters)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        return n

    def rope_at(self, start, end):
        """cos, sin (T, hs/2) of positions start..end-1: the table, or, when a windowed model
        streams past block_size, computed (on the CPU, in float64, which MPS lacks)."""
        if end <= self.config.block_size:
            return self.cos[start:end], self.sin[start:end]
        cos, sin = rope_cos_sin(torch.arange(start, end), self.config.n_embd // self.config.n_head,
                                self.config.rope_theta)
        return cos.to(self.cos.device), sin.to(self.cos.device)

    def forward(self, idx, targets=None, cache=None):
        """idx (B, T) token ids -> logits (B, T, V) for every position, and the mean
        cross-entropy against targets (B, T) when given (else None). Targets equal to
        IGNORE_INDEX add no loss: sft.py masks prompt and padding tokens that way.
        NEW vs gpt.py: with a KVCache, idx holds only the new tokens, which join the cache."""
        cfg = self.config
        B, T = idx.size()
        start = 0 if cache is None else cache.seen
        if start + T > cfg.block_size and not cfg.window:
            raise ValueError(f"{start + T} positions > block_size {cfg.block_size}: crop the "
                             "context (a model with --window streams on without limit)")
        pos = torch.arange(start, start + T, device=idx.device)  # (T,) positions in the text
        if cache is not None:
            cache.advance(pos)
        x = self.transformer.wte(idx)  # (B, T, C)
        rope = None
        if cfg.pos == "learned":
            x = x + self.transformer.wpe(pos)  # (B, T, C) + (T, C)
        elif cfg.pos == "rope":
            sink_rope = None
            if cfg.sinks:  # the query's angle as the sinks see it: its slot in a rolling cache
                slot = pos.clamp(max=cfg.sinks + cfg.window - 1)  # (T,), inside the table
                sink_rope = (self.cos[slot, None], self.sin[slot, None])  # (T, 1, hs/2)
            cos, sin = self.rope_at(start, start + T)  # (T, hs/2)
            rope = ((cos[:, None], sin[:, None]), sink_rope)
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x, pos, rope, cache)
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, C) @ (C, V) -> (B, T, V)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.view(B * T, -1), targets.reshape(B * T),
                               ignore_index=IGNORE_INDEX)
        return logits, loss

    def estimate_mfu(self, fwdbwd_per_iter, dt, peak_flops):
        """Model FLOPs utilisation: achieved FLOP/s over the hardware peak. A token costs
        6N FLOPs (forward + backward through N parameters) plus 12·L·nh·hs·T for attention
        (PaLM, Chowdhery et al. 2022, Appendix B)."""
        L, nh, T = self.config.n_layer, self.config.n_head, self.config.block_size
        hs = self.config.n_embd // nh
        flops_per_token = 6 * self.num_params() + 12 * L * nh * hs * T
        return flops_per_token * T * fwdbwd_per_iter / dt / peak_flops


# NEW vs gpt.py: the byte tokenizer's special tokens. <|endoftext|> separates documents and
# <|pad|> fills ragged batches (sft.py); the reserved ids let later stages add tokens (chat
# roles, tool calls) without resizing the embedding of a trained model.
BYTE_SPECIAL = {"<|endoftext|>": 256, "<|pad|>": 257,
                **{f"<|reserved_{i}|>": 256 + i for i in range(2, 8)}}


class ByteTokenizer:
    """NEW vs gpt.py (instead of CharTokenizer): ids 0..255 are the UTF-8 bytes of the text,
    special tokens follow (<|endoftext|> = 256).

    Every text encodes (no vocabulary learned from the data, no unknown characters), which is
    what lets one checkpoint go from Shakespeare to sft.py's task world. On ASCII text one byte
    is one character, so losses compare with char-level ones; other scripts cost 2-4 ids per
    character. The members are those of `tiktoken.Encoding` this file uses.
    """

    name = "byte"

    def __init__(self, special=None):
        self.special = dict(BYTE_SPECIAL if special is None else special)
        self.n_vocab = 256 + len(self.special)
        self.names = {i: s for s, i in self.special.items()}

    def encode_ordinary(self, text):
        """Text -> ids; special-token strings in the text stay plain bytes, as in tiktoken."""
        return list(text.encode("utf-8"))

    def encode(self, text, allowed_special=()):
        """NEW vs llama.py: as tiktoken's `encode`, the special-token strings listed in
        allowed_special become their ids; the rest of the text is plain bytes."""
        if not allowed_special:
            return self.encode_ordinary(text)
        ids = []
        for part in re.split("(" + "|".join(map(re.escape, allowed_special)) + ")", text):
            ids += [self.special[part]] if part in allowed_special else self.encode_ordinary(part)
        return ids

    def decode(self, ids):
        """Ids -> text; special tokens print as their names, broken UTF-8 as U+FFFD."""
        parts, run = [], bytearray()
        for i in ids:
            if i < 256:
                run.append(i)
            else:
                parts += [run.decode("utf-8", errors="replace"), self.names[i]]
                run = bytearray()
        return "".join(parts) + run.decode("utf-8", errors="replace")


def padded_vocab(n_vocab):
    """NEW vs gpt.py: the vocabulary rounded up to a multiple of 64, for faster matmuls
    (nanoGPT pads GPT-2's 50257 to 50304); the extra ids never occur in the data."""
    return 64 * math.ceil(n_vocab / 64)


def get_lr(step, learning_rate, min_lr, warmup_iters, lr_decay_iters):
    """Linear warmup for `warmup_iters`, cosine decay to `min_lr` at `lr_decay_iters`, then flat."""
    if step < warmup_iters:
        return learning_rate * (step + 1) / (warmup_iters + 1)
    if step >= lr_decay_iters:
        return min_lr
    ratio = (step - warmup_iters) / max(1, lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


def sample_logits(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Pick one token per row from (B, V) logits -> (B, 1) ids.

    temperature 0 = argmax (greedy). top_k keeps the k most likely tokens; top_p (nucleus,
    Holtzman et al. 2019, arXiv:1904.09751) keeps the smallest set of most likely tokens
    whose probabilities sum to at least p. Both may be combined (top-k first).
    """
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        v, _ = torch.topk(logits, top_k)  # (B, k), sorted descending
        logits = logits.masked_fill(logits < v[:, [-1]], float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)  # (B, V)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the tokens before it already reach top_p (the first always stays)
        drop = (cum - sorted_logits.softmax(-1)) >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)


def prefill(model, idx, cache):
    """NEW vs gpt.py: run a prompt idx (B, T) into the cache -> logits (B, V) of its last token.

    One chunk may not wrap a rolling buffer (its first tokens would lose keys they still
    need), so what does not fit the free slots goes in one token at a time.
    """
    n = max(1, cache.capacity - cache.seen)
    logits, _ = model(idx[:, :n], cache=cache)
    for t in range(n, idx.size(1)):
        logits, _ = model(idx[:, t:t + 1], cache=cache)
    return logits[:, -1, :]


@torch.no_grad()
def stream(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, generator=None,
           kv_cache=True):
    """Yield the next token ids (B, 1) after idx (B, T0), one step at a time.

    NEW vs gpt.py: with kv_cache the prompt is prefilled into a KVCache and every step feeds
    one token. A plain cache that fills up restarts from the last block_size/2 tokens (one
    prefill per block_size/2 new tokens); a model with a window streams on in its rolling
    cache. Without the cache every step reruns the context, cropped to block_size (a windowed
    model is not cropped: its mask bounds the attention, so both ways agree at any length).
    """
    cfg = model.config
    cache = None
    for _ in range(max_new_tokens):
        if not kv_cache:
            context = idx if cfg.window else idx[:, -cfg.block_size:]  # (B, <= block_size)
            logits = model(context)[0][:, -1, :]
        elif cache is None or cache.full:
            keep = cfg.block_size if cache is None else cfg.block_size // 2
            cache = KVCache(cfg, idx.size(0))
            logits = prefill(model, idx if cfg.window else idx[:, -keep:], cache)
        else:
            logits = model(idx[:, -1:], cache=cache)[0][:, -1, :]  # (B, V)
        next_id = sample_logits(logits, temperature, top_k, top_p, generator)  # (B, 1)
        idx = torch.cat((idx, next_id), dim=1)
        yield next_id


def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, generator=None,
             kv_cache=True):
    """Extend each row of idx (B, T0) by max_new_tokens sampled tokens -> (B, T0 + new).

    Any batch size, temperature 0 = greedy; see `stream` for the cache and the context.
    """
    new = stream(model, idx, max_new_tokens, temperature, top_k, top_p, generator, kv_cache)
    return torch.cat([idx, *new], dim=1)


# ---- Appendix: extra — maj@k and pass@k (self-consistency), classification ----
@torch.no_grad()
def sample_answers(model, tok, examples, n, temperature, max_new_tokens, batch_size, device,
                   ctx, generator):
    """n sampled responses per problem -> a list (per example) of n response texts, each cut
    after its <|endoftext|> (a response that never stops has none).

    As in sft.py's evaluation, prompts of equal token length are decoded together (no padding,
    no attention mask in the KV cache): each prompt n times, batch_size rows at a time.
    """
    groups = defaultdict(list)
    for i, ex in enumerate(examples):
        groups[len(encode_prompt(tok, ex["prompt"]))].append(i)
    out = [None] * len(examples)
    per_batch = max(1, batch_size // n)
    for T, members in sorted(groups.items()):
        for j in range(0, len(members), per_batch):
            chunk = members[j:j + per_batch]
            ids = [encode_prompt(tok, examples[i]["prompt"]) for i in chunk]
            idx = torch.tensor(ids, device=device).repeat_interleave(n, dim=0)  # (len * n, T)
            with ctx:
                rows = generate_until(model, idx, max_new_tokens, tok.special[EOT], temperature,
                                      generator=generator)[:, T:].tolist()
            for k, i in enumerate(chunk):
                out[i] = [completion_text(tok, r) for r in rows[k * n:(k + 1) * n]]
    return out


@torch.no_grad()
def evaluate_majority(model, tok, examples, k, temperature, max_new_tokens, batch_size, device,
                      ctx, generator):
    """Self-consistency (Wang et al. 2022): k sampled responses per problem; maj@k is right
    when the most common final answer (over responses that stop) is the gold one, pass@k when
    any response is right. Ties go to the answer sampled first."""
    model.eval()
    responses = sample_answers(model, tok, examples, k, temperature, max_new_tokens, batch_size,
                               device, ctx, generator)
    model.train()
    hits = defaultdict(list)
    for ex, group in zip(examples, responses):
        votes = Counter(final_answer(r).strip() for r in group if EOT in r)
        vote = votes.most_common(1)[0][0] if votes else None
        hits[ex["task"]].append((vote == final_answer(ex["answer"]).strip(),
                                 any(check_answer(r, ex["answer"]) for r in group)))
    maj = {t: sum(m for m, _ in v) / len(v) for t, v in hits.items()}
    pas = {t: sum(p for _, p in v) / len(v) for t, v in hits.items()}
    return {"maj_k": k, "maj_at_k": sum(maj.values()) / len(maj), "maj_by_task": maj,
            "pass_at_k": sum(pas.values()) / len(pas), "pass_by_task": pas}


CLASS_NAMES = ("no", "yes")  # labels of --task classify ("is this equation correct?")


def build_model(model_args, task):
    """The llama.py model; for --task classify its LM head becomes a 2-way class head."""
    model = Llama(ModelConfig(**model_args))
    if task == "classify":
        # NEW vs llama.py: n_embd -> 2 instead of n_embd -> vocab (Radford et al. 2018, sec 3.2);
        # only the logits at the last prompt token are used (it has seen the whole input)
        model.lm_head = nn.Linear(model_args["n_embd"], len(CLASS_NAMES), bias=False)
        nn.init.normal_(model.lm_head.weight, std=0.02)
    return model


def make_classify_examples(n, split, seed, difficulty):
    """Balanced yes/no set "is this equation correct?" built from n/2 add/sub problems.

    Each problem appears twice: with its answer (label 1) and with a near miss (+-1 or +-10,
    label 0), so the class head cannot decide from the left-hand side or from implausible
    numbers: it has to check the arithmetic.
    """
    rng = random.Random(seed)
    out = []
    for ex in make_tasks(n // 2, split, seed, difficulty, families=("add", "sub")):
        wrong = max(0, int(ex["answer"]) + rng.choice((-10, -1, 1, 10)))
        wrong = wrong if str(wrong) != ex["answer"] else wrong + 1
        equation = ex["prompt"][len("What is "):-1]  # "47 + 38"
        for result, label in ((ex["answer"], 1), (wrong, 0)):
            out.append({"task": "classify", "prompt": f"Is this correct? {equation} = {result}",
                        "label": label, "level": ex["level"]})
    return out


def make_contains_examples(n, split, seed, difficulty):
    """Balanced yes/no set "does this word contain the letter x?": n distinct prompts of
    `split`, half with a letter of the word (yes), half with a letter it lacks (no)."""
    rng = random.Random(seed)
    out, seen = [], set()
    for _ in range(100 * n + 1000):
        if len(out) == n:
            return out
        level = rng.randint(1, difficulty)
        word = make_word(rng, 2 * level + rng.randint(1, 2))
        label = len(out) % 2
        letters = sorted(set(word)) if label else [c for c in "abcdefghijklmnopqrstuvwxyz"
                                                    if c not in word]
        prompt = f"Does {word} contain the letter {rng.choice(letters)}?"
        if task_split(prompt) == split and prompt not in seen:
            seen.add(prompt)
            out.append({"task": "classify", "prompt": prompt, "label": label, "level": level})
    raise ValueError(f"too few distinct {split} problems of contains at difficulty "
                     f"{difficulty} for n={n}")


def encode_classify(tok, ex):
    """Classification as the same masked loss: only the last prompt position has a target,
    the class id (read by the class head that replaces the LM head)."""
    ids = encode_prompt(tok, ex["prompt"])
    return ids, [IGNORE_INDEX] * (len(ids) - 1) + [ex["label"]]


@torch.no_grad()
def evaluate_classify(model, encoded, batch_size, pad_id, device, ctx):
    """Accuracy of the class head: argmax at the one position that has a target."""
    model.eval()
    correct = 0
    for i in range(0, len(encoded), batch_size):
        idx, tgt = collate(encoded[i:i + batch_size], pad_id)
        with ctx:
            logits, _ = model(idx.to(device))
        keep = tgt != IGNORE_INDEX  # (B, T), one True per row
        correct += (logits.argmax(-1).cpu()[keep] == tgt[keep]).sum().item()
    model.train()
    return correct / len(encoded)


# ---- Appendix: bookkeeping — restore, checkpoint, log record, report, --sample-only ----
def load_sources(cfg):
    """The checkpoints a run starts from: --resume's in --out-dir, else --init-from's, or None."""
    resumed = (load_checkpoint(Path(cfg.out_dir) / "ckpt.pt", ("sft.py",),
                               ("model", "model_args", "optimizer", "iter", "best_val_loss", "rng"))
               if cfg.resume else None)
    if resumed is not None and cfg.max_iters < resumed["iter"]:
        die(f"--max-iters {cfg.max_iters}: the checkpoint is at iter {resumed['iter']}; pass "
            f"--max-iters {resumed['iter']} or more to continue it")
    init = (load_checkpoint(cfg.init_from, ("llama.py", "sft.py"))
            if cfg.init_from and not resumed else None)
    return resumed, init


def restore(cfg, resumed, optimizer):
    """-> the batch generator, the first step, the best val loss and the log: fresh, or a resumed
    run's (its optimizer and RNG states too, so the resumed run is bit-exact on CPU)."""
    data_gen, start, best_val = torch.Generator().manual_seed(cfg.seed), 0, float("inf")
    if resumed is not None:
        optimizer.load_state_dict(resumed["optimizer"])
        start, best_val = resumed["iter"], resumed["best_val_loss"]
        torch.set_rng_state(resumed["rng"]["torch"])
        if resumed["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(resumed["rng"]["cuda"])
        data_gen.set_state(resumed["rng"]["data"])
    # the first write to --out-dir: a fresh log, or the resumed run's up to its checkpoint
    return data_gen, start, best_val, open_log(cfg.out_dir, start if resumed is not None else None)


def make_checkpoint(cfg, model_args, tok, model, optimizer, step, best_val, data_state, device):
    """What ckpt.pt holds (docs/design.md section 4), LoRA adapters folded in."""
    return {"script": "sft.py", "version": 1, "config": dataclasses.asdict(cfg),
            "model_args": model_args, "model": merged_state_dict(model),
            "optimizer": optimizer.state_dict(), "iter": step, "best_val_loss": best_val,
            "tokenizer": {"kind": "byte", "special": dict(tok.special)},
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if device.startswith("cuda") else [],
                    "data": data_state},
            # with LoRA also the frozen base + adapters, to resume
            **({"lora": model.state_dict()} if cfg.lora_rank else {})}


def log_step(log_path, cfg, step, start, loss_value, lr, n_tokens, t_start, t_last):
    """A step's log record and progress line -> the time it ended (the next step's t_last)."""
    now = time.time()
    dt = now - t_last
    append_jsonl(log_path, {"iter": step, "loss": loss_value, "lr": lr, "ms_per_iter": 1000 * dt,
                            "tokens_per_s": n_tokens / dt, "elapsed_s": now - t_start})
    eta = (now - t_start) / (step + 1 - start) * (cfg.max_iters - step - 1)
    print(f"iter {step}/{cfg.max_iters} | loss {loss_value:.4f} | lr {lr:.1e} | "
          f"{1000 * dt:.1f} ms | {n_tokens / dt / 1000:.1f}k tok/s | eta {format_eta(eta)}")
    return now


def report(cfg, model, tok, test_ex, splits, losses, wall, counts, before, device, ctx):
    """The final evaluation on the held-out test problems (exact match and format per family,
    maj@k, pass@k; --task classify: accuracy) -> the done record; samples.txt, --plot's figure."""
    out_dir, (n_total, n_train) = Path(cfg.out_dir), counts
    # the kept model is the last one: the only held-out score is the test set, which must not
    # choose it (docs/design.md section 4)
    print(f"kept the last model (iter {cfg.max_iters}): no validation split to choose another")
    done = {"event": "done", "iter": cfg.max_iters, "best_iter": cfg.max_iters,
            "val_loss": losses["val"], "trainable_params": n_train,
            "trainable_frac": n_train / n_total, "wall_s": wall}
    if cfg.task == "classify":
        done["accuracy"] = evaluate_classify(model, splits["val"], cfg.eval_batch_size,
                                             tok.special[PAD], device, ctx)
        print(f"classification accuracy ({cfg.classify_task}): {done['accuracy']:.3f} "
              f"on {len(splits['val'])} held-out examples")
    else:
        metrics = evaluate_tasks(model, tok, test_ex, cfg.eval_max_new_tokens,
                                 cfg.eval_batch_size, device, ctx)
        if cfg.maj_k:
            metrics.update(evaluate_majority(model, tok, test_ex, cfg.maj_k, cfg.maj_temperature,
                                             cfg.eval_max_new_tokens, cfg.eval_batch_size, device,
                                             ctx, torch.Generator(device).manual_seed(cfg.seed)))
        print_table(metrics)
        lines = show_samples(metrics)
        (out_dir / "samples.txt").write_text("\n".join(lines) + "\n")
        done.update({k: v for k, v in metrics.items() if k not in ("counts", "samples")})
        if before is not None:
            done.update(accuracy_before=before["accuracy"],
                        accuracy_by_task_before=before["accuracy_by_task"])
        if cfg.plot:
            plot_accuracy(metrics, out_dir / "accuracy_by_task.png")
    append_jsonl(out_dir / "log.jsonl", done)
    print(f"done in {format_eta(wall)}: accuracy {done['accuracy']:.3f}")
    return done


def print_table(metrics):
    """Per family: accuracy (final answer), format adherence, exact match of the whole response
    (trace included), its mean length in tokens, and maj@k / pass@k when sampled; then means."""
    cols = [("accuracy", "accuracy_by_task"), ("format", "format_by_task"),
            ("exact", "exact_by_task"), ("tokens", "length_by_task")]
    if "maj_by_task" in metrics:
        k = metrics["maj_k"]
        cols += [(f"maj@{k}", "maj_by_task"), (f"pass@{k}", "pass_by_task")]
    print(f"{'task':<10}{'n':>6}" + "".join(f"{name:>10}" for name, _ in cols))
    for t, n in metrics["counts"].items():
        print(f"{t:<10}{n:>6}" + "".join(f"{metrics[key][t]:>10.3f}" for _, key in cols))
    means = [sum(metrics[key].values()) / len(metrics[key]) for _, key in cols]
    print(f"{'mean':<10}{'':>6}" + "".join(f"{m:>10.3f}" for m in means))


def show_samples(metrics, k=6):
    """A few (prompt -> completion) pairs, one per family, marked right or wrong."""
    seen, lines = set(), []
    for ex, completion in metrics["samples"]:
        if ex["task"] not in seen and len(seen) < k:
            seen.add(ex["task"])
            mark = "ok " if check_answer(completion, ex["answer"]) else "BAD"
            lines.append(f"[{mark}] {ex['prompt']!r} -> {completion!r} (gold {ex['answer']!r})")
    print("\n".join(lines))
    return lines


def load_weights(model, state, path):
    """load_state_dict with a one-line error when the checkpoint does not fit the model."""
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        die(f"{path} does not fit this model ({str(e).splitlines()[1].strip()}); "
            f"was it written for another --task?")


def tokenizer_from(ckpt, path):
    """The byte tokenizer a checkpoint was trained with (the task world needs <|endoftext|>)."""
    state = ckpt.get("tokenizer", {})
    if state.get("kind") != "byte" or not {EOT, PAD} <= set(state.get("special", {})):
        die(f"{path} uses a {state.get('kind')!r} tokenizer; sft.py needs llama.py's byte "
            f"tokenizer (--tokenizer byte) with {EOT} and {PAD}")
    return ByteTokenizer(state["special"])


def merged_state_dict(model):
    """The weights to save: LoRA adapters folded into their matrices (base-model keys)."""
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        model = merge_lora(copy.deepcopy(model))
    return model.state_dict()


def sample_only(cfg, device, ctx):
    """--sample-only: answer --prompt with the checkpoint in --out-dir (or classify it)."""
    path = Path(cfg.out_dir) / "ckpt.pt"
    ckpt = load_checkpoint(path, ("sft.py",))
    tok, task = tokenizer_from(ckpt, path), ckpt["config"]["task"]
    model = build_model(ckpt["model_args"], task)
    load_weights(model, ckpt["model"], path)
    model.to(device).eval()
    ids = encode_prompt(tok, cfg.prompt)
    if len(ids) >= model.config.block_size:
        die(f"--prompt is {len(ids)} tokens; the model's context is {model.config.block_size}")
    idx = torch.tensor([ids] * cfg.num_samples, device=device)
    if task == "classify":
        with torch.no_grad(), ctx:
            probs = model(idx[:1])[0][0, -1].float().softmax(-1).tolist()
        print(" ".join(f"p({c})={p:.3f}" for c, p in zip(CLASS_NAMES, probs)))
        return {"probs": probs}
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    with ctx:
        out = generate_until(model, idx, cfg.max_new_tokens, tok.special[EOT], cfg.temperature,
                             cfg.top_k, cfg.top_p, generator)
    answers = [completion_text(tok, row).split(EOT)[0] for row in out[:, len(ids):].tolist()]
    print("\n".join(f"{format_prompt(cfg.prompt)}{a}\n---" for a in answers))
    return {"samples": answers}


# ---- Appendix: flag rules — RULES, CHOICES, check_config ----------------------
# what each flag may be, checked by check_config before anything is written (docs/design.md section
# 6): a predicate and the text the error shows; `lambda v, c:` rules also see the other flags.
# Free text (--init-from, --mix, --out-dir, --prompt) and --device/--dtype (resolved) aside.
RULES = {
    "seed": (lambda v: 0 <= v < 2**63, "an integer in 0..2**63-1"),
    "difficulty": (lambda v: 1 <= v <= 3, "1, 2 or 3"),
    **dict.fromkeys(("n_train", "n_test"),
                    (lambda v: v >= 6, "an integer >= 6 (one problem per family at least)")),
    "curriculum_frac": (lambda v: 0 < v <= 1, "a fraction in (0, 1]"),
    "lora_rank": (lambda v: v >= 0, "0 (full fine-tuning) or a positive rank"),
    **dict.fromkeys(("lora_alpha", "learning_rate"), (lambda v: v > 0, "a number > 0")),
    **dict.fromkeys(("n_layer", "n_head", "block_size", "eval_interval", "eval_iters", "batch_size",
                     "gradient_accumulation_steps", "eval_max_new_tokens", "eval_batch_size",
                     "num_samples", "max_new_tokens"), (lambda v: v >= 1, "an integer >= 1")),
    "n_kv_head": (lambda v, c: v >= 0 and c.n_head % (v or c.n_head) == 0,
                  "0 (= --n-head) or a divisor of --n-head {c.n_head}"),
    "n_embd": (lambda v, c: v >= 1 and v % c.n_head == 0 and (v // c.n_head) % 2 == 0,
               "a positive multiple of --n-head {c.n_head} with an even head size (RoPE turns "
               "pairs of dimensions)"),
    "dropout": (lambda v: 0 <= v < 1, "a probability in [0, 1)"),
    **dict.fromkeys(("max_iters", "warmup_iters"), (lambda v: v >= 0, "an integer >= 0")),
    "min_lr": (lambda v, c: 0 <= v <= c.learning_rate,
               "a number in [0, --learning-rate {c.learning_rate}]"),
    **dict.fromkeys(("weight_decay", "maj_temperature"), (lambda v: v >= 0, "a number >= 0")),
    "grad_clip": (lambda v: v >= 0, "a number >= 0 (0 = off)"),
    "maj_k": (lambda v: v >= 0, "an integer >= 0 (0 = off)"),
    "temperature": (lambda v: v >= 0, "a number >= 0 (0 = greedy)"),
    "top_k": (lambda v: v is None or v >= 1, "an integer >= 1 (leave it out for no limit)"),
    "top_p": (lambda v: v is None or 0 < v <= 1, "a number in (0, 1]"),
    "head_only": (lambda v, c: not v or c.task == "classify", "only with --task classify"),
}
CHOICES = {"task": ("generate", "classify"), "loss_weighting": ("token", "sqrt", "example"),
           "classify_task": ("equation", "contains")}


# -------------------------------------------------------------------------------
# Plumbing (the same in every script; tests/test_copies.py keeps the copies identical)
# -------------------------------------------------------------------------------
def die(msg):
    """A mistake of the user's: one line on stderr, exit 2, no traceback (docs/design.md 6)."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def field_help(cls):
    """Help text of each dataclass field: the trailing `# comment` on its line in the source."""
    helps = {}
    try:
        source = inspect.getsource(cls)
    except OSError:  # no source file (e.g. a class defined in an interactive session)
        return helps
    for line in source.splitlines():
        m = re.match(r"\s+(\w+)\s*:[^#]*#\s*(.*)$", line)
        if m:
            helps[m.group(1)] = m.group(2)
    return helps


def parse_config(cls, argv=None, description=None):
    """Build the CLI from a dataclass (`max_iters` -> `--max-iters`, bools get `--x/--no-x`).

    Returns (config, given): `given` is the set of field names set on the command line, so
    a GPU preset can fill in only the fields the user left alone (see `apply_preset`).
    """
    parser = argparse.ArgumentParser(description=description)
    parser.error = die  # a bad flag is a user mistake: one line, exit status 2
    hints, helps = typing.get_type_hints(cls), field_help(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if typing.get_origin(kind) in (typing.Union, types.UnionType):
            kind = next(a for a in typing.get_args(kind) if a is not type(None))  # Optional[X] -> X
        kw = dict(default=argparse.SUPPRESS, help=f"{helps.get(f.name, '')} (default: {f.default})")
        if kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = kind
        parser.add_argument("--" + f.name.replace("_", "-"), **kw)
    given = vars(parser.parse_args(argv))
    return cls(**given), set(given)


def apply_preset(cfg, preset, given):
    """Overwrite with `preset` (a dict) every field the user did not set on the command line."""
    return dataclasses.replace(cfg, **{k: v for k, v in preset.items() if k not in given})


def resolve_device(name):
    """auto = cuda, else mps, else cpu. Asking for a device that is not there is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if torch.backends.mps.is_available() else "cpu"
    if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", name):
        die(f"--device {name}: expected auto, cpu, cuda, cuda:N or mps")
    if name.startswith("cuda") and not torch.cuda.is_available():
        die(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        die("--device mps: MPS is not available on this machine; use --device cpu")
    return name


def resolve_dtype(name, device):
    """auto = bf16 on CUDA with bf16 support, fp16 (+GradScaler) on older CUDA, fp32 elsewhere."""
    if name == "auto":
        if device.startswith("cuda"):
            return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        return "float32"
    if name not in ("float32", "bfloat16", "float16"):
        die(f"--dtype {name}: expected auto, float32, bfloat16 or float16")
    if name == "float16" and not device.startswith("cuda"):
        die("--dtype float16 needs CUDA (GradScaler); use bfloat16 or float32 on this device")
    return name


def check_config(cfg, rules, choices):
    """Every flag value within its declared range (rules: name -> (predicate, allowed)) or
    among its choices, every float finite, and the cross-field rules; else one error line
    naming the flag, the value and what is allowed. Runs before anything is written.
    A predicate of two arguments, `lambda v, c: ...`, also sees the whole config (a rule
    across fields, e.g. n_embd % n_head), and its text may quote other flags as {c.name}."""
    for f in dataclasses.fields(cfg):
        v, flag = getattr(cfg, f.name), "--" + f.name.replace("_", "-")
        if isinstance(v, float) and not math.isfinite(v):
            die(f"{flag} {v}: expected a finite number")
        if f.name in rules:
            ok, allowed = rules[f.name]
            if not (ok(v, cfg) if ok.__code__.co_argcount == 2 else ok(v)):
                die(f"{flag} {v}: expected {allowed.format(c=cfg)}")
        if f.name in choices and v not in choices[f.name]:
            die(f"{flag} {v}: expected one of {', '.join(choices[f.name])}")
    if getattr(cfg, "min_lr", 0) > getattr(cfg, "learning_rate", math.inf):
        die(f"--min-lr {cfg.min_lr}: expected <= --learning-rate {cfg.learning_rate}")


def check_out_dir(out_dir, resume, overwrite):
    """A fresh run never silently replaces a checkpoint; --resume needs one to exist; --out-dir
    must be (or become) a writable folder. Reads only: nothing is written here.
    resume=None: the script has no --resume, so the message offers only --overwrite."""
    out_dir = Path(out_dir)
    ckpt = out_dir / "ckpt.pt"
    existing = next(p for p in (out_dir.absolute(), *out_dir.absolute().parents) if p.exists())
    if not existing.is_dir():
        die(f"--out-dir {out_dir}: {existing} is a file, not a folder; choose another --out-dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        die(f"--out-dir {out_dir}: {existing} is not writable; choose another --out-dir")
    for own in (ckpt, out_dir / "log.jsonl"):
        if own.exists() and not own.is_file():
            die(f"{own} exists but is not a file; move it away or choose another --out-dir")
    if resume and not ckpt.is_file():
        die(f"--resume: no checkpoint at {ckpt}; start a fresh run without --resume")
    if ckpt.is_file() and not (resume or overwrite):
        choices = "" if resume is None else "--resume to continue that run or "
        die(f"{ckpt} exists: pass {choices}--overwrite to replace it")


def open_log(out_dir, resume_iter=None):
    """Create --out-dir and start its log.jsonl; call it once the config and the inputs are
    known to be good (nothing in --out-dir is touched before). The ckpt.pt.tmp of a run killed
    mid-save goes. A fresh run (resume_iter None) starts an empty log; a resumed one keeps the
    records up to its checkpoint: those of earlier steps and the evaluation at resume_iter,
    not the steps after it (the resumed run logs them again) nor a previous run's events."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "ckpt.pt.tmp").unlink(missing_ok=True)
    path, keep = out_dir / "log.jsonl", []
    if resume_iter is not None and path.is_file():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                r = json.loads(line)
            except ValueError:  # a line cut short by a kill
                continue
            it = r.get("iter") if isinstance(r, dict) else None
            if isinstance(it, int) and "event" not in r and (
                    it < resume_iter or (it == resume_iter and "loss" not in r)):
                keep.append(line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(keep))
    os.replace(tmp, path)
    return path


def checkpoint_sha256(obj, h=None):
    """SHA-256 of a checkpoint's contents: every tensor's dtype, shape and bytes, and every
    other value's repr, walked in order. save_checkpoint stores it, load_checkpoint checks it."""
    top, h = h is None, h or hashlib.sha256()
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"tensor {t.dtype} {tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(obj, dict):
        h.update(b"{")
        for k, v in obj.items():
            h.update(repr(k).encode())
            checkpoint_sha256(v, h)
    elif isinstance(obj, (list, tuple)):
        h.update(b"[")
        for v in obj:
            checkpoint_sha256(v, h)
    else:
        h.update(repr(obj).encode())
    h.update(b";")
    return h.hexdigest() if top else None


def save_checkpoint(ckpt, path):
    """Write atomically: a temp file in the same folder, then os.replace (never half-written).
    The SHA-256 of the contents goes in as "sha256", so a file damaged later is refused."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({**ckpt, "sha256": checkpoint_sha256(ckpt)}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, scripts, keys=()):
    """Load a checkpoint safely (weights_only), check it came from one of `scripts`, holds
    every one of `keys` and still has the SHA-256 it was saved with. (A checkpoint written
    before the checksum existed has no "sha256" and is loaded unchecked.)"""
    path = Path(path)
    if not path.is_file():
        die(f"no checkpoint at {path}; train one first or point --out-dir/--init-from at it")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, random bytes, pickled objects ...
        die(f"cannot read checkpoint {path} (corrupted or truncated?): {type(e).__name__}")
    if not isinstance(ckpt, dict) or "model" not in ckpt or "script" not in ckpt:
        die(f"{path} is not a checkpoint of this project (no 'script'/'model' keys)")
    if ckpt["script"] not in scripts:
        die(f"{path} was written by {ckpt['script']}; this script reads checkpoints of "
            f"{', '.join(scripts)}")
    missing = [k for k in keys if k not in ckpt]
    if missing:
        die(f"{path} has no {missing[0]!r}: not a complete {ckpt['script']} checkpoint")
    saved = ckpt.pop("sha256", None)
    if saved is not None and checkpoint_sha256(ckpt) != saved:
        die(f"{path} is corrupted: its contents no longer match the SHA-256 saved with them "
            f"(restore it from a copy, or train again)")
    return ckpt


def append_jsonl(path, record):
    """Append one record as a line of log.jsonl, strict JSON: a non-finite number (which
    json.dumps would write as NaN or Infinity) becomes null."""
    def finite(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: finite(x) for k, x in v.items()}
        return [finite(x) for x in v] if isinstance(v, (list, tuple)) else v
    with open(path, "a") as f:
        f.write(json.dumps(finite(record), allow_nan=False) + "\n")


def format_eta(seconds):
    """Seconds as a short human duration: 95 -> '1m35s'."""
    seconds = int(max(0, seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def plot_accuracy(metrics, path):
    """Bar chart of accuracy per task family (needs matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot: matplotlib is not installed (pip install matplotlib); no figure written")
        return
    tasks = list(metrics["accuracy_by_task"])
    plt.figure(figsize=(6, 3))
    plt.bar(tasks, [metrics["accuracy_by_task"][t] for t in tasks])
    plt.ylabel("exact-match accuracy")
    plt.ylim(0, 1)
    plt.tight_layout()
    plt.savefig(path)
    plt.close()


if __name__ == "__main__":
    main()
