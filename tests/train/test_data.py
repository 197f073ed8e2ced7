"""The packaged corpus, its fixed split, deterministic batches and the memmap loader."""

from __future__ import annotations

import hashlib
import re
from importlib import resources

import numpy as np
import pytest
import torch

from coap_dist.data import shakespeare_archive
from coap_dist.train.config import ConfigError, DataConfig
from coap_dist.train.data import (
    Batches,
    check_streams,
    eval_batches,
    load_memmap,
    load_shakespeare,
    load_tokens,
    shakespeare_documents,
)

VAL = ("macbeth_gut.txt", "twelfth_night_gut.txt")


def test_archive_matches_its_provenance() -> None:
    provenance = resources.files("coap_dist.data").joinpath("PROVENANCE.md").read_text()
    blob = shakespeare_archive().read_bytes()
    assert hashlib.sha256(blob).hexdigest() in provenance
    assert 0.9e6 < len(blob) < 1.2e6  # "a compressed ~1 MB subset"
    docs = shakespeare_documents()
    listed = re.findall(r"^\| `(\w+\.txt)` \| .+ \| ([\d,]+) \|", provenance, flags=re.M)
    assert {name: int(size.replace(",", "")) for name, size in listed} == {
        name: len(text) for name, text in docs.items()
    }
    assert len(docs) == 21
    for text in docs.values():
        text.decode("ascii")
        assert b"Gutenberg" not in text  # headers and licence footers were stripped upstream


def test_split_holds_out_whole_works() -> None:
    train, val = load_shakespeare(VAL)
    docs = shakespeare_documents()
    assert train.dtype == val.dtype == np.uint8
    assert len(val) == sum(len(docs[d]) for d in VAL) + 2 * (len(VAL) - 1)
    assert len(train) + len(val) == sum(len(t) for t in docs.values()) + 2 * (len(docs) - 2)
    probe = docs["macbeth_gut.txt"][5000:5200]
    assert probe in val.tobytes()
    assert probe not in train.tobytes()
    with pytest.raises(ConfigError, match=r"data\.val_docs names unknown works"):
        load_shakespeare(("hamlet.txt",))


def test_batches_are_a_pure_function_of_seed_and_step() -> None:
    tokens = np.arange(10_000, dtype=np.int64) % 251
    one = Batches(tokens, seq_len=16, global_batch=8, seed=3)
    ((x, y),) = one.get(5)
    assert x.shape == y.shape == (8, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
    assert torch.equal(one.get(5)[0][0], x)
    assert not torch.equal(one.get(6)[0][0], x)
    assert not torch.equal(Batches(tokens, seq_len=16, global_batch=8, seed=4).get(5)[0][0], x)
    # Two ranks see the two halves of the same global batch, each as 2 micro-batches.
    parts = [
        micro[0]
        for r in (0, 1)
        for micro in Batches(
            tokens, seq_len=16, global_batch=8, seed=3, rank=r, world_size=2, micro_batches=2
        ).get(5)
    ]
    assert [p.shape[0] for p in parts] == [2, 2, 2, 2]
    assert torch.equal(torch.cat(parts), x)
    with pytest.raises(ConfigError, match=r"batch_size \(8\) must be divisible"):
        Batches(tokens, seq_len=16, global_batch=8, seed=3, rank=0, world_size=3)
    with pytest.raises(ConfigError, match=r"processes x grad_accum \(2 x 3\)"):
        Batches(tokens, seq_len=16, global_batch=8, seed=3, world_size=2, micro_batches=3)


def test_eval_batches_are_fixed_and_cover_the_stream() -> None:
    tokens = np.arange(1000, dtype=np.int64)
    batches = list(eval_batches(tokens, seq_len=10, global_batch=4, n_batches=3))
    again = list(eval_batches(tokens, seq_len=10, global_batch=4, n_batches=3))
    assert len(batches) == 3
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again, strict=True))
    starts = torch.cat([x[:, 0] for x, _ in batches])
    assert starts[0] == 0 and starts[-1] == 1000 - 11
    halves = [
        list(eval_batches(tokens, seq_len=10, global_batch=4, n_batches=3, rank=r, world_size=2))
        for r in (0, 1)
    ]
    assert torch.equal(torch.cat([halves[0][1][0], halves[1][1][0]]), batches[1][0])


def test_memmap_loader_reads_user_token_files(tmp_path) -> None:
    ids = (np.arange(5000) * 7 % 1000).astype(np.uint16)
    for name, part in (("train.bin", ids[:4000]), ("val.bin", ids[4000:])):
        out = np.memmap(tmp_path / name, dtype=np.uint16, mode="w+", shape=part.shape)
        out[:] = part
        out.flush()
    cfg = DataConfig(
        name="memmap",
        train_path=str(tmp_path / "train.bin"),
        val_path=str(tmp_path / "val.bin"),
        dtype="uint16",
        vocab_size=1000,
    )
    train, val = load_tokens(cfg)
    assert isinstance(train, np.memmap) and len(train) == 4000 and len(val) == 1000
    ((x, y),) = Batches(train, seq_len=8, global_batch=2, seed=0).get(1)
    assert int(x.max()) < 1000 and torch.equal(x[:, 1:], y[:, :-1])
    with pytest.raises(ConfigError, match=r"data.train_path holds token ids in \[0, 999\]"):
        load_memmap(str(tmp_path / "train.bin"), "uint16", 500, "data.train_path")
    # An id past the vocabulary anywhere in the file, here past the first 2^20 ids.
    late = np.memmap(tmp_path / "late.bin", dtype=np.uint16, mode="w+", shape=(3 << 20,))
    late[:] = 7
    late[-1] = 1000
    late.flush()
    with pytest.raises(ConfigError, match=r"late_path holds token ids in \[0, 1000\], outside"):
        load_memmap(str(tmp_path / "late.bin"), "uint16", 1000, "data.late_path")
    # Streams too short for one window: refused before the model is built (the validation
    # stream used to be read at the first evaluation only).
    check_streams(train, val, seq_len=999)
    with pytest.raises(ConfigError, match=r"validation stream has 1000 tokens, too few for seq"):
        check_streams(train, val, seq_len=1000)
    with pytest.raises(ConfigError, match=r"training stream has 4000 tokens.*data\.train_path"):
        check_streams(train, val, seq_len=3999)
    with pytest.raises(ConfigError, match=r"not a multiple of data\.dtype=uint32"):
        (tmp_path / "odd.bin").write_bytes(b"\0" * 6)
        load_memmap(str(tmp_path / "odd.bin"), "uint32", 10, "data.train_path")
    with pytest.raises(ConfigError, match=r"data\.train_path: .* is empty \(0 bytes\)"):
        (tmp_path / "empty.bin").write_bytes(b"")
        load_memmap(str(tmp_path / "empty.bin"), "uint16", 10, "data.train_path")
    with pytest.raises(ConfigError, match=r"data\.val_path is not a file"):
        load_memmap(str(tmp_path / "missing.bin"), "uint16", 10, "data.val_path")
    # A file read with a narrower dtype than it was written with: its ids' high halves show
    # (uint16 ids as uint8, int32 ids as uint16), or the vocabulary does not fit the dtype.
    with pytest.raises(ConfigError, match=r"file of 2-byte ids is read with data\.dtype=uint8"):
        load_memmap(str(tmp_path / "train.bin"), "uint8", 256, "data.train_path")
    wide = np.memmap(tmp_path / "wide.bin", dtype=np.int32, mode="w+", shape=(4000,))
    wide[:] = ids[:4000]
    wide.flush()
    with pytest.raises(ConfigError, match=r"file of 4-byte ids is read with data\.dtype=uint16"):
        load_memmap(str(tmp_path / "wide.bin"), "uint16", 1000, "data.train_path")
    assert len(load_memmap(str(tmp_path / "wide.bin"), "int32", 1000, "data.train_path")) == 4000
    with pytest.raises(ConfigError, match=r"data\.vocab_size=32000 does not fit data\.dtype=uint8"):
        DataConfig(name="memmap", train_path="a", val_path="b", dtype="uint8", vocab_size=32000)
