"""Byte-level BPE tokenizer: train it, encode/decode, save it for tiktoken, reproduce GPT-2's.

Byte pair encoding (Sennrich et al. 2016, arXiv:1508.07909) starts from the 256 byte values
and repeatedly merges the most frequent adjacent pair of tokens into a new token. GPT-2
(Radford et al. 2019, "Language Models are Unsupervised Multitask Learners", section 2.2)
runs it on UTF-8 bytes, so any string can be encoded, after a regex has cut the text into
chunks (words, numbers, punctuation, whitespace) that merges never cross. This file trains
such a tokenizer with a fast incremental trainer (checked against the textbook loop),
exports it as a plain `tiktoken.Encoding` and rebuilds GPT-2's from tiktoken's ranks.

Run:
    python bpe.py                          # tinyshakespeare, vocab 1024, GPT-4 split
    python bpe.py --vocab-size 4096 --plot # longer compression table + figure
    python bpe.py --naive                  # the textbook trainer (about 1 s per merge here)
    TIKTOKEN_CACHE_DIR=DIR python bpe.py   # + tiktoken's gpt2/cl100k rows, GPT-2 rebuilt
No --device: it is pure Python on the CPU. It saves out/bpe/tokenizer.tiktoken (tiktoken's
rank file) + tokenizer.json, which mlp.py/gpt.py/llama.py read with `load_bpe`.

Result: vocab 512 on tinyshakespeare in 0.36 s on 2 CPU cores (minbpe: 128 s); docs/bpe.md.

Simplifications: pure Python; ties between equally frequent pairs go to the smallest
(left id, right id); `pattern=None` (no split) makes the text one chunk, fine for short
strings but quadratic for files, so the CLI offers gpt4/gpt2 only. See also minbpe, tiktoken.
"""
import argparse
import base64
import collections
import dataclasses
import hashlib
import heapq
import inspect
import itertools
import json
import math
import os
import re
import shutil
import sys
import time
import types
import typing
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import regex
import tiktoken


# -------------------------------------------------------------------------------
# Config
# -------------------------------------------------------------------------------
@dataclass
class Config:
    data: str = "shakespeare"  # dataset name (shakespeare, names) or path of a UTF-8 text file
    vocab_size: int = 1024  # 256 byte tokens + merges (special tokens come on top)
    pattern: str = "gpt4"  # pre-tokenizer split: gpt4 (cl100k_base regex) or gpt2
    special: str = "<|endoftext|>"  # comma-separated special tokens, ids right after the merges
    naive: bool = False  # train with the slow textbook loop (recounts all pairs every merge)
    compare: bool = True  # add tiktoken's gpt2/cl100k_base rows to the table when they load
    example: str = "O Romeo, wherefore art thou?\n  1597: café ☕"  # text shown cut into tokens
    out_dir: str = "out/bpe"  # tokenizer.tiktoken, tokenizer.json, log.jsonl (and the figure)
    plot: bool = False  # write compression.png (tokens per character vs vocab size)


# -------------------------------------------------------------------------------
# Tokenizer
# -------------------------------------------------------------------------------
# The pre-tokenizer regexes, exactly as tiktoken writes them (so that to_tiktoken() splits the
# same way): GPT-2's (r50k_base) and GPT-4's (cl100k_base). GPT-4's matches contractions in
# any case ('S, 'LL), cuts numbers into at most 3 digits, attaches one leading non-letter
# ("(", "_", a space) to the following word and keeps newlines apart from other whitespace.
GPT2_SPLIT_PATTERN = (r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++"""
                      r"""|\s++$|\s+(?!\S)|\s""")
GPT4_SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+"""
                      r"""| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")
SPLIT_PATTERNS = {"gpt4": GPT4_SPLIT_PATTERN, "gpt2": GPT2_SPLIT_PATTERN}


# The "model" of a tokenizer is its merge list. Both trainers below take pre-tokenized chunks
# as UTF-8 bytes (so ids 0-255 are the raw bytes), return {(left_id, right_id): new_id} in
# merge order with new ids 256, 257, ..., and break ties the same way: the highest count
# wins, then the smallest pair (left id first). They stop early when no pair is left.


def merge(ids, pair, new_id):
    """Replace every occurrence of `pair` in `ids`, left to right, by `new_id`.

    Left to right matters for overlapping pairs: merging (a, a) in "aaa" gives [aa, a].
    """
    out, i, n = [], 0, len(ids)
    while i < n:
        if i + 1 < n and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def train_naive(chunks, num_merges):
    """The textbook loop (Sennrich et al. 2016, Algorithm 1): recount every pair of every
    chunk, merge the best pair everywhere, repeat. O(corpus length) per merge."""
    words = [list(chunk) for chunk in chunks]
    merges = {}
    for new_id in range(256, 256 + num_merges):
        stats = collections.Counter(pair for w in words for pair in zip(w, w[1:]))
        if not stats:
            break
        best = min(stats, key=lambda pair: (-stats[pair], pair))  # most frequent, then smallest
        merges[best] = new_id
        words = [merge(w, best, new_id) for w in words]
    return merges


def train_fast(chunk_counts, num_merges):
    """Same merges as `train_naive`, but each merge only touches the chunks that contain it.

    - Each distinct chunk is stored once with its frequency (tinyshakespeare: 263k chunks,
      15k distinct), so a pair's count is a sum of chunk frequencies.
    - `where[pair]` holds the chunks the pair occurs in, so a merge rewrites just those.
    - Only the neighbours of a merged occurrence change: in "x a b y", merging (a, b) into
      z removes (x, a), (a, b), (b, y) and adds (x, z), (z, y). Summed over the chunk these
      deltas give exactly the recount that train_naive does, overlaps included.
    - A heap of (-count, pair) picks the best pair; when a count changes a new entry is
      pushed and the old one is skipped when popped (lazy deletion). Its tuple order is the
      shared tie-break: highest count, then smallest pair.
    """
    words = [list(chunk) for chunk in chunk_counts]
    freqs = list(chunk_counts.values())
    counts = collections.defaultdict(int)  # pair -> occurrences in the corpus
    where = collections.defaultdict(set)  # pair -> ids of chunks that contain (or once did) it
    for i, (w, f) in enumerate(zip(words, freqs)):
        for pair in zip(w, w[1:]):
            counts[pair] += f
            where[pair].add(i)
    heap = [(-c, pair) for pair, c in counts.items()]
    heapq.heapify(heap)
    merges = {}
    while heap and len(merges) < num_merges:
        neg_count, best = heapq.heappop(heap)
        if counts.get(best) != -neg_count:
            continue  # stale: the count changed after this entry was pushed
        new_id = 256 + len(merges)
        merges[best] = new_id
        a, b = best
        delta = collections.defaultdict(int)  # pair -> change of its count by this merge
        for i in where.pop(best):
            w, f = words[i], freqs[i]
            out, j, n = [], 0, len(w)
            while j < n:
                if w[j] == a and j + 1 < n and w[j + 1] == b:
                    delta[best] -= f
                    if out:  # left neighbour: already rewritten, so "a b a b" -> (z, z)
                        left = out[-1]
                        delta[left, a] -= f
                        delta[left, new_id] += f
                        where[left, new_id].add(i)
                    if j + 2 < n:  # right neighbour: still the original token
                        right = w[j + 2]
                        delta[b, right] -= f
                        delta[new_id, right] += f
                        where[new_id, right].add(i)
                    out.append(new_id)
                    j += 2
                else:
                    out.append(w[j])
                    j += 1
            words[i] = out
        for pair, d in delta.items():
            if d:
                c = counts[pair] + d
                if c:
                    counts[pair] = c
                    heapq.heappush(heap, (-c, pair))
                else:
                    del counts[pair]  # includes `best` itself: no occurrence is left
    return merges


def special_regex(tokens):
    """A regex matching any of the special `tokens` (longest first, so none hides another)."""
    return "|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True))


class BPETokenizer:
    """Byte-level BPE over regex chunks, with tiktoken-style special tokens.

    `BPETokenizer()` splits like GPT-4 (cl100k_base); pass GPT2_SPLIT_PATTERN, any regex,
    or None (no split). State: `merges` {(left_id, right_id): new_id} in merge order,
    `special` {token: id}, `vocab` {id: bytes}, `byte_ids` (byte value -> id: the identity
    for a trained tokenizer, a permutation for GPT-2's ranks).
    """

    def __init__(self, pattern=GPT4_SPLIT_PATTERN):
        self.pattern = pattern
        self._split = regex.compile(pattern).findall if pattern is not None else None
        self._set_vocab({}, {}, range(256))

    def _set_vocab(self, merges, special, byte_ids):
        self.merges = dict(merges)
        self.special = dict(special)
        self.byte_ids = list(byte_ids)  # byte value -> its id
        self.vocab = {i: bytes([b]) for b, i in enumerate(self.byte_ids)}
        for (left, right), i in self.merges.items():
            self.vocab[i] = self.vocab[left] + self.vocab[right]
        self._decoder = {**self.vocab, **{i: s.encode("utf-8") for s, i in self.special.items()}}

    @property
    def n_vocab(self):
        """Number of ids, special tokens included (the size of a model's embedding table)."""
        return len(self._decoder)

    def _chunks(self, text):
        if self._split is None:
            return [text] if text else []
        return self._split(text)

    def train(self, text, vocab_size, special_tokens=(), naive=False):
        """Learn vocab_size - 256 merges from `text`; special tokens get the next ids.

        Occurrences of the special tokens in `text` are cut out first, so no merge spans them.
        """
        if vocab_size < 256:
            raise ValueError(f"vocab size {vocab_size} is below 256: the 256 byte values "
                             f"are the first tokens, merges come on top")
        if not text:
            raise ValueError("cannot train a tokenizer on empty text")
        parts = re.split(special_regex(special_tokens), text) if special_tokens else [text]
        chunks = [chunk for part in parts for chunk in self._chunks(part)]
        if naive:
            merges = train_naive([c.encode("utf-8") for c in chunks], vocab_size - 256)
        else:
            distinct = collections.Counter(chunks)  # str keys: counting before encoding is faster
            merges = train_fast({c.encode("utf-8"): n for c, n in distinct.items()},
                                vocab_size - 256)
        first = 256 + len(merges)
        special = {s: first + k for k, s in enumerate(dict.fromkeys(special_tokens))}  # no repeats
        self._set_vocab(merges, special, range(256))
        return self

    def _encode_chunk(self, data):
        """BPE on one chunk's bytes: merge the adjacent pair learned first (lowest id), the
        leftmost one on a tie, until no adjacent pair is a merge. One occurrence at a time is
        enough: a merge only creates pairs with later ids, so the next occurrence of the same
        pair comes next, left to right, as in `merge` (and as tiktoken does it)."""
        ids = [self.byte_ids[b] for b in data]
        while len(ids) >= 2:
            found = [(self.merges[p], k) for k, p in enumerate(zip(ids, ids[1:]))
                     if p in self.merges]  # (id of the merge, position)
            if not found:
                break
            new_id, k = min(found)
            ids[k:k + 2] = [new_id]
        return ids

    def encode_ordinary(self, text):
        """Text -> ids, special tokens treated as plain text (tiktoken's encode_ordinary)."""
        chunks = self._chunks(text)
        # a chunk that repeats ("the", " and") is merged once: 263k chunks of tinyshakespeare
        # are only 15k distinct ones
        cache = {chunk: self._encode_chunk(chunk.encode("utf-8")) for chunk in set(chunks)}
        return [i for chunk in chunks for i in cache[chunk]]

    def encode(self, text, allowed_special=()):
        """Text -> ids, like tiktoken: special tokens in `allowed_special` (a set, or "all")
        become their ids; any other special token in the text raises ValueError, because
        text from a user must not be able to inject, say, an end-of-text token."""
        known = set(self.special)
        allowed = known if allowed_special == "all" else known & set(allowed_special)
        disallowed = known - allowed
        found = re.search(special_regex(disallowed), text) if disallowed else None
        if found:
            raise ValueError(f"the text contains the special token {found.group()!r}: pass "
                             f"allowed_special={{{found.group()!r}}} (or 'all') to encode it as "
                             f"a special token, or use encode_ordinary() to encode it as text")
        if not allowed:
            return self.encode_ordinary(text)
        ids = []
        parts = re.split(f"({special_regex(allowed)})", text)  # odd parts are the specials
        for k, part in enumerate(parts):
            if k % 2:
                ids.append(self.special[part])
            else:
                ids.extend(self.encode_ordinary(part))
        return ids

    def decode(self, ids):
        """Ids -> text; bytes that are not valid UTF-8 (a cut multi-byte char) become U+FFFD."""
        return b"".join(self._decoder[i] for i in ids).decode("utf-8", errors="replace")

    def truncated(self, vocab_size):
        """The tokenizer of a smaller vocab: BPE merges are greedy, so it is a prefix of ours."""
        small = BPETokenizer(self.pattern)
        small._set_vocab(itertools.islice(self.merges.items(), vocab_size - 256), {}, self.byte_ids)
        return small

    def to_tiktoken(self, name="bpe"):
        """The same tokenizer as a plain `tiktoken.Encoding` (Rust, several times faster).

        tiktoken ranks token *byte strings*: inside a chunk it keeps merging the adjacent
        pair whose concatenation has the lowest rank. With rank = id = merge order this
        applies our merges in the same order, because training never creates two tokens with
        the same bytes (BPE is deterministic inside a chunk, so equal bytes get equal merge
        histories). tests/test_bpe.py checks the ids are identical.
        """
        pattern = self.pattern if self.pattern is not None else r"[\s\S]+"  # as load_bpe reads null
        return tiktoken.Encoding(name=name, pat_str=pattern, special_tokens=self.special,
                                 mergeable_ranks={token: i for i, token in self.vocab.items()})

    def save(self, prefix):
        """Write <prefix>.tiktoken (tiktoken's rank file: base64 bytes and rank = id per line)
        and <prefix>.json ({"pattern", "special", "vocab_size": ids incl. special tokens}),
        the format `load_bpe` in mlp.py/gpt.py/llama.py reads."""
        prefix = Path(prefix)
        ranks = "".join(f"{base64.b64encode(token).decode()} {i}\n"
                        for i, token in sorted(self.vocab.items()))
        meta = {"pattern": self.pattern, "special": self.special, "vocab_size": self.n_vocab}
        write_atomic(prefix.with_name(prefix.name + ".tiktoken"), ranks)
        write_atomic(prefix.with_name(prefix.name + ".json"), json.dumps(meta, indent=1) + "\n")

    @classmethod
    def load(cls, path):
        """Read what `save` wrote; `path` is the prefix or either file."""
        prefix = re.sub(r"\.(tiktoken|json)$", "", str(path))
        meta = json.loads(Path(prefix + ".json").read_text())
        lines = Path(prefix + ".tiktoken").read_text().splitlines()
        ranks = {base64.b64decode(token): int(rank)
                 for token, rank in (ln.split() for ln in lines if ln)}
        return from_ranks(ranks, meta["pattern"], meta["special"])


# -------------------------------------------------------------------------------
# Evaluation
# -------------------------------------------------------------------------------
def compression(encode, train_text, val_text):
    """Tokens per character and UTF-8 bytes per token of `encode` on both splits."""
    row = {}
    for split, text in (("train", train_text), ("val", val_text)):
        n = max(1, len(encode(text)))
        row[f"{split}_tokens_per_char"] = n / max(1, len(text))
        row[f"{split}_bytes_per_token"] = len(text.encode("utf-8")) / n
    return row


def compression_table(tok, train_text, val_text, references):
    """One row per vocab size 256, 512, 1024, ... up to ours (one training: merges of a
    smaller vocab are a prefix), then one per tiktoken reference encoding."""
    top = 256 + len(tok.merges)
    sizes = [v for v in (256 << k for k in range(32)) if v < top] + [top]
    encoders = [(f"bpe {v}", v, tok.truncated(v).to_tiktoken()) for v in sizes]  # = ours, faster
    encoders += [(name, enc.n_vocab, enc) for name, enc in references.items()]
    return [{"name": name, "vocab_size": v,
             **compression(enc.encode_ordinary, train_text, val_text)} for name, v, enc in encoders]


# -------------------------------------------------------------------------------
# Main
# -------------------------------------------------------------------------------
def main(argv=None):
    cfg, _ = parse_config(Config, argv, __doc__.splitlines()[0])
    print("config: " + " ".join(f"{k}={v!r}" for k, v in dataclasses.asdict(cfg).items()))
    check_config(cfg, RULES, CHOICES)
    check_out_dir(cfg.out_dir, None, True)  # a folder we can write to (bpe.py has no ckpt.pt)
    path = resolve_data(cfg.data)
    text = read_text(path)
    n = int(0.9 * len(text))  # first 90 percent train, the rest val
    train_text, val_text = text[:n], text[n:]
    print(f"data: {path} | {len(text):,} chars | train {len(train_text):,} | val {len(val_text):,}")
    tok = BPETokenizer(SPLIT_PATTERNS[cfg.pattern])
    special = [s for s in cfg.special.split(",") if s]
    try:
        _, train_s = timed(tok.train, train_text, cfg.vocab_size, special, cfg.naive)
    except ValueError as e:
        die(str(e))
    train_mb = len(train_text.encode("utf-8")) / 1e6
    print(f"trained {len(tok.merges)} merges in {train_s:.2f} s "
          f"({'naive' if cfg.naive else 'fast'} trainer, {train_mb / train_s:.2f} MB/s)")
    if len(tok.merges) < cfg.vocab_size - 256:
        print(f"(stopped early: after {len(tok.merges)} merges every chunk is a single token)")
    out_dir = Path(cfg.out_dir)
    tok.save(out_dir / "tokenizer")
    print(f"saved {out_dir / 'tokenizer'}.tiktoken and .json ({tok.n_vocab} ids)")
    metrics = {"merges": len(tok.merges), "n_vocab": tok.n_vocab, "train_s": train_s,
               "train_mb_per_s": train_mb / train_s, **encode_speed(tok, text)}
    references = tiktoken_references() if cfg.compare else {}
    if "gpt2" in references:
        metrics["gpt2_same_ids"] = rebuild_gpt2(references["gpt2"], val_text)
    rows = metrics["table"] = compression_table(tok, train_text, val_text, references)
    print_table(rows)
    print("example: " + show_tokens(tok, cfg.example, sys.stdout.isatty()))
    if cfg.plot:
        plot_compression(rows, out_dir / "compression.png")
    open_log(out_dir)  # a fresh run starts a fresh log
    append_jsonl(out_dir / "log.jsonl", {"event": "done", **metrics})
    return metrics


# -------------------------------------------------------------------------------
# Appendix: a first read can stop here (copies, bookkeeping, plumbing)
# -------------------------------------------------------------------------------
# ---- Appendix: extra — GPT-2's merges rebuilt from tiktoken's ranks -----------
def from_ranks(ranks, pattern, special):
    """A BPETokenizer rebuilt from tiktoken ranks {token bytes: rank} (e.g. GPT-2's): the token
    of rank r >= 256 was made by merging two tokens of lower rank; which two is what BPE does to
    its bytes with the merges of rank < r: it must stop at 2 parts. (GPT-2's single bytes have
    ranks 0-255 in another order: `byte_ids` keeps it.)"""
    by_rank = sorted(ranks, key=ranks.get)
    if [ranks[t] for t in by_rank] != list(range(len(ranks))):
        raise ValueError("ranks must be 0, 1, 2, ... without gaps")
    if set(by_rank[:256]) != {bytes([b]) for b in range(256)}:
        raise ValueError("the 256 lowest ranks must be the 256 single bytes")
    tok = BPETokenizer(pattern)
    tok._set_vocab({}, {}, [ranks[bytes([b])] for b in range(256)])
    for rank, token in enumerate(by_rank[256:], start=256):
        parts = tok._encode_chunk(token)  # tok.merges holds exactly the ranks below
        if len(parts) != 2:
            raise ValueError(f"token {token!r} (rank {rank}) is not a BPE merge of two "
                             f"lower-ranked tokens (it splits into {len(parts)})")
        tok.merges[tuple(parts)] = rank
    tok._set_vocab(tok.merges, special, tok.byte_ids)
    return tok


def gpt2_from_tiktoken(enc):
    """GPT-2's tokenizer as a BPETokenizer: its 50,000 merges recovered from tiktoken's ranks."""
    ranks = {enc.decode_single_token_bytes(r): r for r in range(enc.n_vocab) if r != enc.eot_token}
    return from_ranks(ranks, GPT2_SPLIT_PATTERN, {"<|endoftext|>": enc.eot_token})


def rebuild_gpt2(enc, val_text):
    """GPT-2 rebuilt from `enc`'s ranks (timed): do its ids equal tiktoken's on val?"""
    gpt2, rebuild_s = timed(gpt2_from_tiktoken, enc)
    same = (gpt2.encode(val_text, allowed_special="all")
            == enc.encode(val_text, allowed_special="all"))
    print(f"gpt2 rebuilt from tiktoken's ranks: {len(gpt2.merges)} merges in "
          f"{rebuild_s:.1f} s | identical ids on val: {same}")
    return same


# ---- Appendix: bookkeeping — speed, references, the report --------------------
def encode_speed(tok, text):
    """Throughput on the whole file; the two encoders must agree id for id."""
    ids, ours_s = timed(tok.encode_ordinary, text)
    tiktoken_ids, tiktoken_s = timed(tok.to_tiktoken().encode_ordinary, text)
    same_ids = tiktoken_ids == ids
    mb = len(text.encode("utf-8")) / 1e6
    print(f"encode {mb:.2f} MB: ours {mb / ours_s:.2f} MB/s | "
          f"to_tiktoken {mb / tiktoken_s:.2f} MB/s | identical ids: {same_ids}")
    return {"encode_mb_per_s": mb / ours_s, "tiktoken_mb_per_s": mb / tiktoken_s,
            "same_ids": same_ids}


def tiktoken_references(names=("gpt2", "cl100k_base")):
    """tiktoken's own encodings; offline only from its cache (TIKTOKEN_CACHE_DIR), else skipped."""
    found = {}
    for name in names:
        try:
            found[name] = tiktoken.get_encoding(name)
        except Exception as e:  # tiktoken raises whatever its HTTP client raises
            print(f"({name} skipped: cannot load it offline: {type(e).__name__})")
    return found


def print_table(rows):
    print(f"{'tokenizer':>12} | {'vocab':>6} | train tok/char | train B/tok | "
          f"val tok/char | val B/tok")
    for r in rows:
        print(f"{r['name']:>12} | {r['vocab_size']:>6} | {r['train_tokens_per_char']:14.3f} | "
              f"{r['train_bytes_per_token']:11.2f} | {r['val_tokens_per_char']:12.3f} | "
              f"{r['val_bytes_per_token']:9.2f}")


def show_tokens(tok, text, color):
    """The text cut into its tokens: [To][ be][,] ... coloured in a terminal."""
    pieces = []
    for k, i in enumerate(tok.encode(text, allowed_special="all")):
        piece = "[" + tok.decode([i]).replace("\n", "\\n") + "]"
        pieces.append(f"\x1b[30;{41 + k % 6}m{piece}\x1b[0m" if color else piece)
    return "".join(pieces)


# ---- Appendix: flag rules — RULES, CHOICES, check_config ----------------------
# what each flag may be (docs/design.md section 6); --data, --special, --example, --out-dir: free
RULES = {"vocab_size": (lambda v: v >= 256, "an integer >= 256 (the 256 byte tokens + merges)")}
CHOICES = {"pattern": ("gpt4", "gpt2")}


# -------------------------------------------------------------------------------
# Plumbing (the same in every script; tests/test_copies.py keeps the copies identical)
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


def write_atomic(path, text):
    """Write a text file via a temp file and os.replace, so it is never left half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


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


def timed(fn, *args):
    """(fn(*args), wall seconds it took)."""
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def plot_compression(rows, path):
    """tokens per character vs vocab size, train and val (matplotlib, when installed)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot: matplotlib is not installed (pip install matplotlib); no figure written")
        return
    ours = [r for r in rows if r["name"].startswith("bpe")]
    fig, ax = plt.subplots(figsize=(6, 4))
    for split in ("train", "val"):
        ax.plot([r["vocab_size"] for r in ours], [r[f"{split}_tokens_per_char"] for r in ours],
                marker="o", label=split)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("vocab size")
    ax.set_ylabel("tokens per character")
    ax.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
