"""Tests of the shared helpers (config CLI, device/dtype, download, sampling, LR, checkpoints).

Run: python -m pytest -q tests/test_common.py

The helpers are imported from bigram.py; tests/test_copies.py makes sure every other script
holds the same source. The download tests talk to a local http.server on 127.0.0.1 only.
"""
import dataclasses
import functools
import hashlib
import http.server
import json
import math
import socket
import threading
import typing

import pytest
import torch

import bigram


def one_line_error(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def exits_2(capsys, fn, *args):
    """Run fn(*args), expect die(): exit status 2 and one `error:` line; return that line."""
    with pytest.raises(SystemExit) as e:
        fn(*args)
    assert e.value.code == 2
    return one_line_error(capsys)


# ---- download / resolve_data ----
class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep stderr for the errors under test
        pass


@pytest.fixture
def server(tmp_path):
    """Serve tmp_path/www on 127.0.0.1 in a thread; yields the base URL."""
    root = tmp_path / "www"
    root.mkdir()
    (root / "data.txt").write_bytes(b"emma\nolivia\n")
    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def test_download_saves_and_verifies(server, tmp_path):
    target = tmp_path / "data" / "names.txt"
    sha = hashlib.sha256(b"emma\nolivia\n").hexdigest()
    assert bigram.download(f"{server}/data.txt", target, sha) == target
    assert target.read_bytes() == b"emma\nolivia\n" and bigram.sha256_of(target) == sha
    assert not target.with_name("names.txt.part").exists()
    # an existing file is trusted: no request is made (this URL would fail)
    assert bigram.download("http://127.0.0.1:9/none", target, sha) == target


def test_download_checksum_mismatch_leaves_nothing(server, tmp_path, capsys):
    target = tmp_path / "names.txt"
    msg = exits_2(capsys, bigram.download, f"{server}/data.txt", target, "0" * 64)
    assert "checksum mismatch" in msg and "--data" in msg
    assert not target.exists() and not target.with_name("names.txt.part").exists()


def test_download_unreachable_names_url_and_data_flag(tmp_path, capsys):
    with socket.socket() as s:  # a port that was free a moment ago: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/names.txt"
    msg = exits_2(capsys, bigram.download, url, tmp_path / "names.txt", None)
    assert url in msg and "--data" in msg
    assert list(tmp_path.iterdir()) == []


def test_resolve_data_missing_path(tmp_path, capsys):
    msg = exits_2(capsys, bigram.resolve_data, str(tmp_path / "nope.txt"))
    assert "nope.txt" in msg and "names" in msg
    (tmp_path / "here.txt").write_text("x")
    assert bigram.resolve_data(str(tmp_path / "here.txt")) == tmp_path / "here.txt"


# ---- get_lr ----
def test_get_lr_warmup_cosine_and_floor():
    lr = functools.partial(bigram.get_lr, learning_rate=1.0, min_lr=0.1, warmup_iters=10,
                           lr_decay_iters=110)
    assert lr(0) == pytest.approx(1 / 11) and lr(9) == pytest.approx(10 / 11)  # linear warmup
    assert lr(10) == pytest.approx(1.0)  # peak right after warmup
    assert lr(60) == pytest.approx(0.55, abs=1e-12)  # cosine midpoint: (max + min) / 2
    assert lr(110) == lr(500) == 0.1  # min_lr after the decay
    decay = [lr(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))


# ---- parse_config / apply_preset ----
@dataclasses.dataclass
class DemoConfig:
    max_iters: int = 10  # how many optimiser steps
    use_bias: bool = True  # add a bias to every linear layer
    top_k: typing.Optional[int] = None  # keep only the k most likely tokens
    name: str = "run"  # a label for the run


def test_parse_config_flags_and_given():
    cfg, given = bigram.parse_config(DemoConfig, [])
    assert cfg == DemoConfig() and given == set()
    cfg, given = bigram.parse_config(
        DemoConfig, ["--max-iters", "5", "--no-use-bias", "--top-k", "3"])
    assert cfg == DemoConfig(max_iters=5, use_bias=False, top_k=3, name="run")
    assert isinstance(cfg.top_k, int) and given == {"max_iters", "use_bias", "top_k"}


@pytest.mark.parametrize("argv", [["--max_iters", "5"], ["--max-iters", "five"], ["--nope"]])
def test_parse_config_bad_flag_exits_2(argv, capsys):
    exits_2(capsys, bigram.parse_config, DemoConfig, argv)


def test_parse_config_help_lists_every_field_with_its_comment(capsys):
    with pytest.raises(SystemExit) as e:
        bigram.parse_config(DemoConfig, ["--help"], "demo description")
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps long lines
    assert "demo description" in out
    for flag, comment in [("--max-iters", "how many optimiser steps"),
                          ("--use-bias", "add a bias to every linear layer"), ("--no-use-bias", ""),
                          ("--top-k", "keep only the k most likely tokens"),
                          ("--name", "a label for the run")]:
        assert flag in out and comment in out


def test_apply_preset_only_touches_fields_not_given():
    cfg, given = bigram.parse_config(DemoConfig, ["--max-iters", "7"])
    cfg = bigram.apply_preset(cfg, {"max_iters": 5000, "name": "gpu"}, given)
    assert cfg.max_iters == 7 and cfg.name == "gpu" and cfg.use_bias is True


# ---- device / dtype ----
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_resolve_device_cuda_without_cuda(capsys):
    assert "--device cpu" in exits_2(capsys, bigram.resolve_device, "cuda")


def test_resolve_device_names(capsys):
    assert bigram.resolve_device("cpu") == "cpu"
    assert bigram.resolve_device("auto") in ("cpu", "cuda", "mps")
    exits_2(capsys, bigram.resolve_device, "tpu")


def test_resolve_dtype(capsys):
    assert bigram.resolve_dtype("auto", "cpu") == "float32"
    assert bigram.resolve_dtype("bfloat16", "cpu") == "bfloat16"
    assert "CUDA" in exits_2(capsys, bigram.resolve_dtype, "float16", "cpu")
    exits_2(capsys, bigram.resolve_dtype, "int8", "cpu")


# ---- sample_logits ----
def test_sample_logits_temperature_zero_is_argmax():
    logits = torch.randn(6, 11, generator=torch.Generator().manual_seed(0))
    ids = bigram.sample_logits(logits, temperature=0)
    assert ids.shape == (6, 1) and torch.equal(ids[:, 0], logits.argmax(-1))


def test_sample_logits_top_k_stays_in_the_k_largest():
    logits = torch.randn(1, 20, generator=torch.Generator().manual_seed(1)).expand(4000, 20)
    ids = bigram.sample_logits(logits, top_k=3, generator=torch.Generator().manual_seed(2))
    assert set(ids.flatten().tolist()) == set(logits[0].topk(3).indices.tolist())


@pytest.mark.parametrize("top_p, nucleus", [(0.4, {1}), (0.7, {1, 3}), (0.9, {0, 1, 3}),
                                            (1.0, {0, 1, 2, 3})])
def test_sample_logits_top_p_keeps_exactly_the_nucleus(top_p, nucleus):
    # probabilities 0.5 (id 1), 0.3 (id 3), 0.15 (id 0), 0.05 (id 2): the nucleus for p is the
    # shortest run of the most likely ids whose mass reaches p
    logits = torch.tensor([0.15, 0.5, 0.05, 0.3]).log().expand(4000, 4)
    ids = bigram.sample_logits(logits, top_p=top_p, generator=torch.Generator().manual_seed(0))
    assert set(ids.flatten().tolist()) == nucleus


def test_sample_logits_generator_determinism():
    logits = torch.zeros(100, 10)

    def draw(seed):
        return bigram.sample_logits(logits, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(draw(5), draw(5)) and not torch.equal(draw(5), draw(6))


# ---- checkpoints ----
def test_save_checkpoint_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    bigram.save_checkpoint({"script": "bigram.py", "model": {"w": torch.ones(2)}}, path)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no ckpt.pt.tmp left behind
    before = path.read_bytes()

    def failing_save(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(RuntimeError):
        bigram.save_checkpoint({"script": "bigram.py", "model": {"w": torch.zeros(2)}}, path)
    assert path.read_bytes() == before


def test_load_checkpoint_round_trip_and_errors(tmp_path, capsys):
    good = tmp_path / "good.pt"
    bigram.save_checkpoint({"script": "bigram.py", "model": {"w": torch.arange(1000.0)}}, good)
    assert torch.equal(bigram.load_checkpoint(good, ["bigram.py"])["model"]["w"],
                       torch.arange(1000.0))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00\x01 definitely not a zip file")
    assert "corrupted" in exits_2(capsys, bigram.load_checkpoint, garbage, ["bigram.py"])
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert "corrupted" in exits_2(capsys, bigram.load_checkpoint, truncated, ["bigram.py"])
    other = tmp_path / "other.pt"
    bigram.save_checkpoint({"script": "gpt.py", "model": {}}, other)
    assert "gpt.py" in exits_2(capsys, bigram.load_checkpoint, other, ["bigram.py"])
    keyless = tmp_path / "keyless.pt"
    torch.save({"weights": torch.ones(1)}, keyless)
    assert "not a checkpoint" in exits_2(capsys, bigram.load_checkpoint, keyless, ["bigram.py"])
    exits_2(capsys, bigram.load_checkpoint, tmp_path / "missing.pt", ["bigram.py"])


def test_check_out_dir(tmp_path, capsys):
    bigram.check_out_dir(tmp_path, resume=False, overwrite=False)  # empty folder: fine
    assert "--resume" in exits_2(capsys, bigram.check_out_dir, tmp_path, True, False)
    (tmp_path / "ckpt.pt").write_bytes(b"x")
    assert "--resume to continue" in exits_2(capsys, bigram.check_out_dir, tmp_path, False, False)
    # a script without --resume (resume=None) offers only --overwrite
    assert "--resume" not in exits_2(capsys, bigram.check_out_dir, tmp_path, None, False)
    assert "--overwrite" in exits_2(capsys, bigram.check_out_dir, tmp_path, None, False)
    bigram.check_out_dir(tmp_path, resume=False, overwrite=True)
    bigram.check_out_dir(tmp_path, resume=True, overwrite=False)


# ---- small formatting helpers ----
def test_append_jsonl(tmp_path):
    path = tmp_path / "log.jsonl"
    bigram.append_jsonl(path, {"iter": 0, "loss": math.log(27)})
    bigram.append_jsonl(path, {"event": "done"})
    lines = path.read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"iter": 0, "loss": math.log(27)},
                                                    {"event": "done"}]


def test_format_eta():
    assert [bigram.format_eta(s) for s in (-3, 0, 59.9, 60, 95, 3725)] == [
        "0s", "0s", "59s", "1m00s", "1m35s", "62m05s"]
