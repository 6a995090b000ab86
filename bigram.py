"""Bigram character language model: counting vs. a one-layer neural net (makemore part 1).

A bigram model predicts the next character from the previous one alone, so the whole model is
a (V, V) table: row `prev` gives P(next | prev). Two ways to fill that table, side by side:
  counts  count every bigram of the training split and normalise each row, with add-k
          smoothing so that no bigram gets probability 0 (closed form, nothing to train);
  neural  free logits W (V, V), logits = W[prev] (= one_hot(prev) @ W), trained with Adam on
          the cross-entropy plus a penalty that is *exactly* add-k smoothing, so it converges
          to the counts table: both maximise the same penalised likelihood.
With `--format lines` (names) every item is wrapped in the boundary token '.' (".emma."), so
the model also learns how names start and end; `--format text` (Shakespeare) is one stream.

Run:
  python bigram.py                                  # names: both models, 10 samples each
  python bigram.py --data shakespeare               # continuous text, a 300-character sample
  python bigram.py --sample-only --temperature 0.5  # sample again from out/bigram/ckpt.pt
  python bigram.py --device cuda                    # runs on a GPU too, for no gain at V x V

Result (names, 6.8 s on a 2-core CPU): test NLL 2.4584 counts, 2.4585 neural (docs/bigram.md).
References: Karpathy, makemore and "The spelled-out intro to language modeling"; Jurafsky &
Martin, Speech and Language Processing, 3rd ed., ch. 3 (n-grams, Laplace smoothing).
"""
import argparse
import dataclasses
import hashlib
import inspect
import json
import math
import os
import random
import re
import shutil
import sys
import time
import types
import typing
import urllib.error
import urllib.request
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


# -------------------------------------------------------------------------------
# Config
# -------------------------------------------------------------------------------
@dataclasses.dataclass
class Config:
    data: str = "names"  # names, shakespeare, or a path to a text file
    format: str = "auto"  # lines | text | auto: lines if no '.' and no line over 50 characters
    smoothing: float = 1.0  # add-k smoothing: k fake counts of every bigram (0 = raw counts)
    max_iters: int = 100  # gradient steps of the neural bigram
    batch_size: int = 65536  # random training bigrams per step (all of them when there are fewer)
    learning_rate: float = 0.5  # Adam's peak learning rate (cosine decay to a tenth of it)
    eval_interval: int = 20  # steps between evaluations (and log lines) of the neural bigram
    seed: int = 1337  # batches and sampling (the split is fixed, the neural init is zeros)
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16 (autocast of the neural bigram)
    out_dir: str = "out/bigram"  # ckpt.pt, log.jsonl and bigram_counts.png go here
    overwrite: bool = False  # replace an existing ckpt.pt (no --resume here: a rerun takes seconds)
    sample_only: bool = False  # load out_dir/ckpt.pt and only sample
    prompt: str = ""  # start of every sample
    num_samples: int | None = None  # samples per model (default: 10 for lines, 1 for text)
    max_new_tokens: int = 300  # characters per sample (a name also stops at its closing '.')
    temperature: float = 1.0  # 0 = greedy, <1 sharper, >1 flatter
    top_k: int | None = None  # sample among the k most likely characters only (0 = all)
    top_p: float | None = None  # nucleus sampling: the most likely characters up to this mass
    plot: bool = False  # write the count matrix as a heatmap to out_dir (needs matplotlib)


GPU_PRESET = {"max_iters": 1000, "eval_interval": 100}  # GPU steps are cheap: a closer match


# -------------------------------------------------------------------------------
# Model
# -------------------------------------------------------------------------------
class Bigram(nn.Module):
    """Both models are a (V, V) table of logits, `table()`: row `prev` scores every next token."""

    def forward(self, idx, targets=None):
        logits = self.table()[idx]  # (N,) -> (N, V): a row lookup = one_hot(idx) @ table
        loss = None if targets is None else F.cross_entropy(logits, targets)  # mean NLL
        return logits, loss


class CountsBigram(Bigram):
    """P(next | prev) = (N[prev, next] + k) / sum_j (N[prev, j] + k): maximum likelihood with
    add-k smoothing (Laplace for k = 1); without it an unseen bigram costs an infinite loss."""

    def __init__(self, vocab_size, smoothing):
        super().__init__()
        self.smoothing = smoothing
        self.register_buffer("counts", torch.zeros(vocab_size, vocab_size))  # N, (V, V)

    def fit(self, x, y):
        ones = torch.ones(len(x), device=x.device)
        self.counts.zero_().index_put_((x, y), ones, accumulate=True)  # N[x_i, y_i] += 1
        return self

    def table(self):
        p = self.counts + self.smoothing
        # log-probabilities serve as logits (softmax(log p) = p): loss and sampler treat both alike
        return (p / p.sum(dim=1, keepdim=True)).log()


class NeuralBigram(Bigram):
    """The same table as free parameters W, learned by gradient descent: a one-layer network
    whose input is the one-hot previous character and whose output is the next one's logits."""

    def __init__(self, vocab_size):
        super().__init__()
        # zero init: every row starts uniform, so the loss at step 0 is exactly ln(V)
        self.W = nn.Parameter(torch.zeros(vocab_size, vocab_size))

    def table(self):
        return self.W

    def smoothing_penalty(self, k, n):
        """Add-k smoothing as a regulariser: k fake observations of every bigram next to the n
        real ones. mean NLL + penalty = (1/n) sum_ij (N_ij + k)(-log p_ij), minimised exactly at
        p_ij = (N_ij + k) / sum_j (N_ij + k), the counts model. makemore's 0.01 * (W**2).mean()
        also pulls the rows towards uniform, but only approximates a given k."""
        return -k / n * F.log_softmax(self.W, dim=-1).sum()


# -------------------------------------------------------------------------------
# Data
# -------------------------------------------------------------------------------
DATA_DIR = Path(__file__).resolve().parent / "data"  # downloads land here (gitignored)
DATASETS = {  # name -> (canonical URL, file name in data/, SHA-256)
    "shakespeare": (
        "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        "tinyshakespeare.txt",
        "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
    ),
    "names": (
        "https://raw.githubusercontent.com/karpathy/makemore/master/names.txt",
        "names.txt",
        "0a30b5557f192f32ab962680889aac5f6fda0f4cecf40a6d0b5694f58ea8cc4d",
    ),
}
BOUNDARY = "."  # --format lines: token 0, marks both the start and the end of every item
SPLIT_SEED = 42  # items are shuffled with random.seed(42) as in makemore, whatever --seed says


def detect_format(text):
    """--format auto: `lines` when the file reads like a list of items (names, words): no '.'
    (the boundary token) and no line longer than 50 characters; `text` otherwise."""
    short = max(map(len, text.splitlines()), default=0) <= 50
    return "lines" if BOUNDARY not in text and short else "text"


def split_corpus(text, fmt):
    """Train/val/test = 80/10/10 %, as strings. Lines: whole items, shuffled with SPLIT_SEED and
    joined as '.emma.ava.' (one '.' ends a name and starts the next, so each item yields its
    len + 1 bigrams). Text: contiguous chunks (shuffling would leak neighbouring text)."""
    if fmt == "lines":
        items = [line.strip() for line in text.splitlines() if line.strip()]
        random.Random(SPLIT_SEED).shuffle(items)
    else:
        items = text
    n1, n2 = int(0.8 * len(items)), int(0.9 * len(items))
    parts = [items[:n1], items[n1:n2], items[n2:]]
    if not all(parts):
        die(f"--data: {len(items)} {'items' if fmt == 'lines' else 'characters'} are too few "
            f"for an 80/10/10 split (val or test would be empty)")
    if fmt == "lines":
        parts = [BOUNDARY + BOUNDARY.join(p) + BOUNDARY for p in parts]
    return parts


def load_corpus(cfg):
    """-> (format, chars, [train, val, test] strings). The vocabulary comes from the whole file,
    so val/test never meet an unknown character; for lines, '.' is token 0."""
    text = read_text(resolve_data(cfg.data))
    if not text.strip():
        die(f"--data {cfg.data} is empty")
    fmt = detect_format(text) if cfg.format == "auto" else cfg.format
    if fmt == "lines" and BOUNDARY in text:
        die(f"--format lines: {cfg.data} contains '{BOUNDARY}' (the boundary token); "
            f"use --format text")
    parts = split_corpus(text, fmt)
    chars = sorted(set("".join(parts)) - {BOUNDARY}) if fmt == "lines" else sorted(set(text))
    return fmt, (BOUNDARY if fmt == "lines" else "") + "".join(chars), parts


def bigrams(s, stoi, device="cpu"):
    """A string as (x, y) id tensors, (N,) each: y[i] is the character after x[i]."""
    ids = torch.tensor([stoi[c] for c in s], device=device)
    return ids[:-1], ids[1:]


def get_batch(x, y, batch_size, generator):
    """batch_size random bigrams (with replacement); all of them if there are no more."""
    if batch_size >= len(x):
        return x, y  # full-batch gradient descent
    ix = torch.randint(len(x), (batch_size,), generator=generator, device=x.device)  # (B,)
    return x[ix], y[ix]


# -------------------------------------------------------------------------------
# Training
# -------------------------------------------------------------------------------
def get_lr(step, learning_rate, min_lr, warmup_iters, lr_decay_iters):
    """Linear warmup for `warmup_iters`, cosine decay to `min_lr` at `lr_decay_iters`, then flat."""
    if step < warmup_iters:
        return learning_rate * (step + 1) / (warmup_iters + 1)
    if step >= lr_decay_iters:
        return min_lr
    ratio = (step - warmup_iters) / max(1, lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


@torch.no_grad()
def evaluate(model, x, y):
    """Mean negative log-likelihood (nats per character) of all the bigrams (x, y)."""
    return model(x, y)[1].item()


def train(model, train_set, val_set, cfg, device, dtype, log_path, t0):
    """Adam on the cross-entropy + the add-k penalty; one log.jsonl record per step. Adam rather
    than makemore's plain SGD (lr 50): a row's gradient scales with how often its character
    occurs, so rare rows barely move under SGD, while Adam normalises every parameter's step."""
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate)
    generator = torch.Generator(device).manual_seed(cfg.seed)  # batches follow --seed
    # W[idx] is a lookup and cross-entropy runs in float32 under autocast, so mixed precision
    # changes nothing for a bigram; the context and scaler are gpt.py's loop, kept identical
    ctx = torch.autocast(device.split(":")[0], getattr(torch, dtype), enabled=dtype != "float32")
    scaler = torch.amp.GradScaler(enabled=dtype == "float16")
    best = (float("inf"), 0, None)  # the kept model: its val loss, iter and weights
    for step in range(cfg.max_iters + 1):
        last_step = step == cfg.max_iters
        record = {"iter": step}
        if step % cfg.eval_interval == 0 or last_step:
            record.update(train_loss=evaluate(model, *train_set),
                          val_loss=evaluate(model, *val_set))
            if best[2] is None or record["val_loss"] < best[0]:  # docs/design.md section 4
                best = (record["val_loss"], step, model.W.detach().clone())
        if last_step:
            append_jsonl(log_path, {**record, "elapsed_s": time.time() - t0})
            break
        t = time.time()
        lr = get_lr(step, cfg.learning_rate, cfg.learning_rate / 10, 0, cfg.max_iters)
        optimizer.param_groups[0]["lr"] = lr  # one group: W
        with ctx:
            _, loss = model(*get_batch(*train_set, cfg.batch_size, generator))
            # the batch mean estimates the mean over the whole training set, so the penalty keeps
            # n = all training bigrams; the logged `loss` includes it (~0.02 nats on names)
            loss = loss + model.smoothing_penalty(cfg.smoothing, len(train_set[0]))
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        loss = loss.item()  # waits for the device, so the timing below is honest
        if not math.isfinite(loss):
            die(f"loss is {loss} at iter {step}; lower --learning-rate (no checkpoint was written)")
        dt = time.time() - t
        tokens_per_s = min(cfg.batch_size, len(train_set[0])) / dt
        record.update(loss=loss, lr=lr, ms_per_iter=1000 * dt, tokens_per_s=tokens_per_s,
                      elapsed_s=time.time() - t0)
        append_jsonl(log_path, record)
        if "val_loss" in record:  # print at the eval interval only; log.jsonl has every step
            print(f"iter {step}/{cfg.max_iters} | loss {loss:.4f} | "
                  f"train {record['train_loss']:.4f} | val {record['val_loss']:.4f} | "
                  f"lr {lr:.1e} | {1000 * dt:.1f} ms | {tokens_per_s / 1e3:.1f}k tok/s | "
                  f"eta {format_eta((cfg.max_iters - step) * dt)}")
    model.W.data.copy_(best[2])  # what the report, the checkpoint and the samples use
    return best[:2]


# -------------------------------------------------------------------------------
# Generation & evaluation
# -------------------------------------------------------------------------------
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
    return torch.multinomial(probs, num_samples=1, generator=generator)


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, generator=None,
             stop=None):
    """Extend idx (B, T) by up to max_new_tokens sampled tokens. A row that has sampled the
    token `stop` repeats it, and generation ends early once every row has stopped."""
    stopped = torch.zeros(idx.size(0), 1, dtype=torch.bool, device=idx.device)  # (B, 1)
    for _ in range(max_new_tokens):
        logits, _ = model(idx[:, -1])  # (B, V): a bigram's context is cropped to one token
        idx_next = sample_logits(logits, temperature, top_k, top_p, generator)  # (B, 1)
        if stop is not None:
            idx_next = idx_next.masked_fill(stopped, stop)
            stopped |= idx_next == stop
        idx = torch.cat((idx, idx_next), dim=1)
        if stopped.all():
            break
    return idx


def sample_texts(model, chars, fmt, cfg, device="cpu"):
    """cfg.num_samples strings from `model`, seeded by cfg.seed. Lines start after a '.' and
    end at the next one; text starts from the prompt, or from token 0 ('\\n' in Shakespeare)."""
    stoi = {c: i for i, c in enumerate(chars)}
    unknown = sorted(set(cfg.prompt) - set(stoi))
    if unknown:
        die(f"--prompt: {unknown} not in the vocabulary of this model")
    ids = [stoi[c] for c in cfg.prompt]
    if fmt == "lines" or not ids:
        ids = [0] + ids
    n = cfg.num_samples if cfg.num_samples is not None else (10 if fmt == "lines" else 1)
    generator = torch.Generator(device).manual_seed(cfg.seed)
    idx = torch.tensor([ids] * n, device=device)  # (B, T)
    out = generate(model, idx, cfg.max_new_tokens, cfg.temperature, cfg.top_k or None, cfg.top_p,
                   generator, stop=0 if fmt == "lines" else None)  # a name ends at its closing '.'
    texts = ["".join(chars[i] for i in row) for row in out.tolist()]
    return [t[1:].split(BOUNDARY)[0] for t in texts] if fmt == "lines" else texts


# -------------------------------------------------------------------------------
# Main
# -------------------------------------------------------------------------------
def main(argv=None):
    cfg, given = parse_config(Config, argv, __doc__.splitlines()[0])
    device = resolve_device(cfg.device)
    if device.startswith("cuda"):
        cfg = apply_preset(cfg, GPU_PRESET, given)
    dtype = resolve_dtype(cfg.dtype, device)
    check_config(cfg, RULES, CHOICES)
    print(f"{cfg}\ndevice={device} dtype={dtype} compile=off")
    out_dir, t0 = Path(cfg.out_dir), time.time()
    if cfg.sample_only:  # both models, the vocabulary and the format from the checkpoint
        return {"samples": print_samples(*load_models(out_dir / "ckpt.pt", device), cfg, device)}
    check_out_dir(out_dir, None, cfg.overwrite)  # bigram.py has no --resume
    fmt, chars, parts = load_corpus(cfg)
    log_path = open_log(out_dir)  # the first write to --out-dir: every check has passed
    cfg = dataclasses.replace(cfg, format=fmt)  # the checkpoint records what auto chose
    splits = [bigrams(p, {c: i for i, c in enumerate(chars)}, device) for p in parts]
    print(f"{fmt}: {len(chars)} characters in the vocabulary, "
          f"{' / '.join(str(len(x)) for x, _ in splits)} train / val / test bigrams")
    # counts: one pass over the training bigrams, no optimisation at all
    models = {"counts": CountsBigram(len(chars), cfg.smoothing).to(device).fit(*splits[0])}
    # neural: the same table learned by gradient descent
    models["neural"] = NeuralBigram(len(chars)).to(device)
    best_val, best_iter = train(models["neural"], *splits[:2], cfg, device, dtype, log_path, t0)
    print(f"kept the neural model of iter {best_iter} (val loss {best_val:.4f})")
    metrics = report(models, splits, log_path, {"neural": {"best_iter": best_iter}})
    # no optimizer or RNG state: nothing resumes from this checkpoint (see --overwrite)
    save_checkpoint({"script": "bigram.py", "version": 1, "config": dataclasses.asdict(cfg),
                     "model_args": {"vocab_size": len(chars), "smoothing": cfg.smoothing},
                     "model": {**models["counts"].state_dict(), **models["neural"].state_dict()},
                     "iter": cfg.max_iters, "best_val_loss": best_val, "best_iter": best_iter,
                     "tokenizer": {"kind": "char", "chars": chars}}, out_dir / "ckpt.pt")
    if cfg.plot:
        plot_counts(models["counts"].counts, chars, out_dir / "bigram_counts.png")
    metrics["samples"] = print_samples(models, chars, fmt, cfg, device)
    print(f"done in {time.time() - t0:.1f}s; checkpoint and log in {out_dir}")
    return metrics


# -------------------------------------------------------------------------------
# Appendix: a first read can stop here (copies, bookkeeping, plumbing)
# -------------------------------------------------------------------------------
# ---- Appendix: bookkeeping — the final table, the checkpoint, samples ---------
def report(models, splits, log_path, extra):
    """Train / val / test loss and test perplexity of each model (+ `extra` fields), logged."""
    print("model    train   val     test    test perplexity")
    metrics = {}
    for name, m in models.items():
        train_loss, val_loss, test_loss = (evaluate(m, *s) for s in splits)
        # exp of a diverged loss (a huge --learning-rate) would overflow a float: inf instead
        perplexity = math.exp(test_loss) if test_loss < 700 else math.inf
        metrics[name] = dict(test_loss=test_loss, val_loss=val_loss, train_loss=train_loss,
                             perplexity=perplexity, **extra.get(name, {}))
        print(f"{name:<8} {train_loss:<7.4f} {val_loss:<7.4f} {test_loss:<7.4f} {perplexity:.2f}")
        # --smoothing 0: an unseen val/test bigram costs log(0), an infinite loss. The console
        # says inf; log.jsonl writes null (append_jsonl), as strict JSON has no Infinity or NaN
        append_jsonl(log_path, {"event": "done", "model": name, **metrics[name]})
    return metrics


def load_models(path, device):
    """Both models, the vocabulary and the data format back from a bigram.py checkpoint."""
    ckpt = load_checkpoint(path, ["bigram.py"], ("config", "model_args", "tokenizer"))
    try:
        chars, args = ckpt["tokenizer"]["chars"], ckpt["model_args"]
        models = {"counts": CountsBigram(args["vocab_size"], args["smoothing"]).to(device),
                  "neural": NeuralBigram(args["vocab_size"]).to(device)}
        for m in models.values():  # load_state_dict copies into the tensors on `device`
            m.load_state_dict({k: ckpt["model"][k] for k in m.state_dict()})
    except (KeyError, TypeError, RuntimeError) as e:  # another version's checkpoint
        die(f"{path} does not fit this bigram.py ({type(e).__name__}: {str(e)[:200]})")
    return models, chars, ckpt["config"]["format"]


def print_samples(models, chars, fmt, cfg, device):
    """The same seed for both models: near-identical tables give near-identical samples."""
    samples = {name: sample_texts(m, chars, fmt, cfg, device) for name, m in models.items()}
    for name, texts in samples.items():
        print(f"--- samples ({name}, temperature {cfg.temperature}) ---")
        print("\n".join(texts))
    return samples


# ---- Appendix: flag rules — RULES, CHOICES, check_config ----------------------
# what each flag may be (docs/design.md section 6): a predicate and the text the error shows
RULES = {
    "smoothing": (lambda v: v >= 0, "a number >= 0 (0 = raw counts)"),
    "max_iters": (lambda v: v >= 0, "an integer >= 0"),
    **dict.fromkeys(("batch_size", "eval_interval", "max_new_tokens"),
                    (lambda v: v >= 1, "an integer >= 1")),
    "learning_rate": (lambda v: v > 0, "a number > 0"),
    "seed": (lambda v: 0 <= v < 2**63, "an integer in 0..2**63-1"),
    "num_samples": (lambda v: v is None or v >= 1, "an integer >= 1"),
    "temperature": (lambda v: v >= 0, "a number >= 0 (0 = greedy)"),
    "top_k": (lambda v: v is None or v >= 0, "an integer >= 1, or 0 (all)"),
    "top_p": (lambda v: v is None or 0 < v <= 1, "a number in (0, 1]"),
}
CHOICES = {"format": ("auto", "lines", "text")}


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


def sha256_of(path):
    """SHA-256 hex digest of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(url, path, sha256=None, way_out="--data PATH"):
    """Fetch `url` to `path` once: into a temp file, check the SHA-256, then rename.

    An existing `path` is trusted as is. Offline or on a mismatch nothing is left behind and
    the one-line error names the URL, the file expected and the flag that avoids the download.
    """
    path = Path(path)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=30) as r, open(tmp, "wb") as f:
            shutil.copyfileobj(r, f)
    except (urllib.error.URLError, OSError) as e:
        tmp.unlink(missing_ok=True)
        die(f"could not download {url} ({getattr(e, 'reason', e)}); "
            f"put the file at {path} or pass {way_out}")
    digest = sha256_of(tmp)
    if sha256 is not None and digest != sha256:
        tmp.unlink()
        die(f"checksum mismatch for {url}: expected sha256 {sha256}, got {digest}; "
            f"nothing was saved (retry, or pass {way_out})")
    os.replace(tmp, path)
    return path


def resolve_data(name):
    """`--data NAME|PATH`: a dataset of DATASETS (downloaded once into data/) or a local file."""
    if name in DATASETS:
        url, filename, sha256 = DATASETS[name]
        return download(url, DATA_DIR / filename, sha256)
    path = Path(name)
    if not path.is_file():
        die(f"--data {name}: no such file, and not a known dataset ({', '.join(DATASETS)})")
    return path


def read_text(path, flag="--data"):
    """A UTF-8 text file as a str (newlines as open() gives them), or one line naming the file
    and the offset of the first byte that is not UTF-8."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        die(f"{flag} {path}: cannot read it ({e.strerror})")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        die(f"{flag} {path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
            f"convert it first, e.g. iconv -f latin1 -t utf-8")
    return text.replace("\r\n", "\n").replace("\r", "\n")  # universal newlines, as read_text


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


def plot_counts(counts, chars, path):
    """The bigram count matrix as a heatmap (makemore's figure): rows = previous character."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no window
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot: matplotlib is not installed (pip install matplotlib); no figure written",
              file=sys.stderr)
        return
    labels = [repr(c)[1:-1] for c in chars]  # '\n' shows as \n
    size = max(6, 0.4 * len(chars))
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(counts.cpu().numpy(), cmap="Blues")
    ax.set_xticks(range(len(chars)), labels)
    ax.set_yticks(range(len(chars)), labels)
    ax.set_xlabel("next character")
    ax.set_ylabel("previous character")
    if len(chars) <= 32:  # room to write the count in each cell
        for i, row in enumerate(counts.tolist()):
            for j, c in enumerate(row):
                ax.text(j, i, f"{c:.0f}", ha="center", va="center", fontsize=6, color="gray")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
