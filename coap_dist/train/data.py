"""Token data for the training app.

Two sources, chosen by the ``data`` config group:

* ``shakespeare`` (default): the corpus shipped in ``coap_dist/data/shakespeare.tar.gz``,
  tokenized as raw bytes (token id = byte value, vocabulary 256). The works named in
  ``data.val_docs`` are held out whole as the fixed validation split; the others, joined by a
  blank line in sorted file order, are the training stream.
* ``memmap``: your own pre-tokenized data, two flat binary files of token ids with no header
  (a ``numpy.memmap``), one for training and one for validation. Write them with any
  tokenizer, e.g.::

      ids = np.concatenate([tokenizer.encode(doc) + [eos] for doc in docs]).astype(np.uint16)
      out = np.memmap("train.bin", dtype=np.uint16, mode="w+", shape=ids.shape)
      out[:] = ids
      out.flush()

  then train with ``data=memmap data.train_path=train.bin data.val_path=val.bin
  data.dtype=uint16 data.vocab_size=32000 model=60m``. Files are opened read-only and never
  loaded whole, so they may be larger than memory.

Batches are a pure function of ``(seed, step)``: the global batch of step ``s`` is
``batch_size`` windows of ``seq_len + 1`` tokens at offsets drawn from
``numpy.random.default_rng([seed, s])``, and rank ``r`` of ``W`` takes rows
``[r * batch_size / W, (r + 1) * batch_size / W)``. So a run on any number of ranks sees the
same global batches as a single-process run, and a resumed run needs only the step number to
continue the data stream exactly.
"""

from __future__ import annotations

import functools
import io
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from coap_dist.data import shakespeare_archive
from coap_dist.train.config import ConfigError, DataConfig

SCAN_CHUNK = 1 << 24
"""Token ids read at a time by :func:`load_memmap`'s vocabulary check."""


@functools.lru_cache(maxsize=1)
def shakespeare_documents() -> dict[str, bytes]:
    """All works of the packaged corpus: ``{file name: ASCII text}``, in sorted order."""
    with shakespeare_archive().open("rb") as f:
        archive = io.BytesIO(f.read())
    docs: dict[str, bytes] = {}
    with tarfile.open(fileobj=archive, mode="r:gz") as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            handle = tar.extractfile(member)
            if handle is not None:
                docs[member.name] = handle.read()
    return docs


def load_shakespeare(val_docs: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Byte-token streams ``(train, val)`` (uint8, 1-D) with ``val_docs`` held out."""
    docs = shakespeare_documents()
    unknown = sorted(set(val_docs) - set(docs))
    if unknown:
        raise ConfigError(f"data.val_docs names unknown works {unknown}; choose from {list(docs)}")
    train = b"\n\n".join(text for name, text in docs.items() if name not in val_docs)
    val = b"\n\n".join(docs[name] for name in val_docs)
    return np.frombuffer(train, dtype=np.uint8), np.frombuffer(val, dtype=np.uint8)


def load_memmap(path: str, dtype: str, vocab_size: int, field: str) -> np.ndarray:
    """Open a flat token-id file read-only; ``field`` names the config key in errors."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"{field} is not a file: {str(file)!r}")
    itemsize = np.dtype(dtype).itemsize
    if file.stat().st_size == 0:
        raise ConfigError(f"{field}: {str(file)!r} is empty (0 bytes); write the token ids first")
    if file.stat().st_size % itemsize:
        raise ConfigError(
            f"{field}: size {file.stat().st_size} bytes is not a multiple of data.dtype={dtype}"
        )
    tokens = np.memmap(file, dtype=dtype, mode="r")
    # Every id is checked once, in chunks (one read of the file, about a second per GB): an id
    # past the vocabulary anywhere would stop the run at the step that samples it.
    lo, hi = 0, 0
    for start in range(0, len(tokens), SCAN_CHUNK):
        chunk = np.asarray(tokens[start : start + SCAN_CHUNK])
        lo, hi = min(lo, int(chunk.min())), max(hi, int(chunk.max()))
    if hi >= vocab_size or lo < 0:
        raise ConfigError(
            f"{field} holds token ids in [{lo}, {hi}], outside [0, data.vocab_size="
            f"{vocab_size}); check data.dtype and data.vocab_size"
        )
    head = np.asarray(tokens[: 1 << 20])
    # A file of ids twice as wide read with this dtype (little-endian) alternates low and
    # high halves; the high halves of real ids are tiny, so the odd positions stay far
    # below the even ones, which no real token stream does over this many tokens.
    if head.size >= 1024 and itemsize < 8:
        even, odd = int(head[0::2].max()), int(head[1::2].max())
        if even >= 16 and odd * 16 < even:
            raise ConfigError(
                f"{field}: the ids at odd positions (max {odd}) are far below those at even "
                f"positions (max {even}), as when a file of {2 * itemsize}-byte ids is read "
                f"with data.dtype={dtype}; set data.dtype to the dtype the file was written with"
            )
    return tokens


def check_streams(train: np.ndarray, val: np.ndarray, seq_len: int) -> None:
    """Raise ConfigError if a stream is too short for one window of ``seq_len`` + 1 tokens
    (checked before the model is built: a short validation file would otherwise stop the
    run at its first evaluation)."""
    for what, tokens, need in (("training", train, seq_len + 2), ("validation", val, seq_len + 1)):
        if len(tokens) < need:
            raise ConfigError(
                f"the {what} stream has {len(tokens)} tokens, too few for seq_len={seq_len} "
                f"(it needs {need}); lower seq_len or give a longer "
                f"data.{'train' if what == 'training' else 'val'}_path"
            )


def load_tokens(cfg: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """The ``(train, val)`` token streams of the configured source."""
    if cfg.name == "shakespeare":
        return load_shakespeare(cfg.val_docs)
    assert cfg.train_path is not None and cfg.val_path is not None
    train = load_memmap(cfg.train_path, cfg.dtype, cfg.vocab_size, "data.train_path")
    val = load_memmap(cfg.val_path, cfg.dtype, cfg.vocab_size, "data.val_path")
    return train, val


def _windows(
    tokens: np.ndarray, offsets: np.ndarray, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs ``x[b] = tokens[o_b : o_b + T]`` and targets ``y[b] = tokens[o_b + 1 : o_b + T + 1]``,
    both int64 of shape (len(offsets), T)."""
    rows = np.stack([np.asarray(tokens[o : o + seq_len + 1]) for o in offsets.tolist()])
    block = torch.from_numpy(rows.astype(np.int64))
    return block[:, :-1], block[:, 1:]


class Batches:
    """Training batches as a pure function of the step (see the module docstring).

    Args:
        tokens: 1-D token stream.
        seq_len: tokens per sequence T.
        global_batch: sequences per step over all ranks B (divisible by ``world_size``).
        seed: data seed.
        rank, world_size: this process's slice of the global batch.
        micro_batches: the slice is cut into this many equal micro-batches (gradient
            accumulation), in order.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        *,
        seq_len: int,
        global_batch: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        micro_batches: int = 1,
    ) -> None:
        if len(tokens) < seq_len + 2:
            raise ConfigError(
                f"the training stream has {len(tokens)} tokens, too few for seq_len={seq_len}"
            )
        if global_batch % world_size:
            raise ConfigError(
                f"batch_size ({global_batch}) must be divisible by the number of processes "
                f"({world_size})"
            )
        if (global_batch // world_size) % micro_batches:
            raise ConfigError(
                f"batch_size ({global_batch}) must be divisible by the number of processes x "
                f"grad_accum ({world_size} x {micro_batches})"
            )
        self.micro_batches = micro_batches
        self.tokens = tokens
        self.seq_len = seq_len
        self.global_batch = global_batch
        self.seed = seed
        self.local_batch = global_batch // world_size
        self.local_start = rank * self.local_batch

    def offsets(self, step: int) -> np.ndarray:
        """Window starts of the global batch of ``step``, shape (B,)."""
        rng = np.random.default_rng([self.seed, step])
        return rng.integers(0, len(self.tokens) - self.seq_len, size=self.global_batch)

    def get(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's micro-batches ``[(inputs, targets), ...]`` of ``step``, each
        (B / (W A), T) int64, A = ``micro_batches``; together the rows (B / W) of this rank."""
        local = self.offsets(step)[self.local_start : self.local_start + self.local_batch]
        x, y = _windows(self.tokens, local, self.seq_len)
        return list(zip(x.chunk(self.micro_batches), y.chunk(self.micro_batches), strict=True))


def eval_batches(
    tokens: np.ndarray,
    *,
    seq_len: int,
    global_batch: int,
    n_batches: int,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The fixed validation set: ``n_batches * global_batch`` windows at evenly spaced offsets
    over the whole stream (the same on every run), this rank's slice of each batch."""
    count = n_batches * global_batch
    last = len(tokens) - seq_len - 1
    if last < 0:
        raise ConfigError(
            f"the validation stream has {len(tokens)} tokens, too few for seq_len={seq_len}"
        )
    offsets = np.linspace(0, last, num=count).astype(np.int64).reshape(n_batches, global_batch)
    local = global_batch // world_size
    for row in offsets:
        yield _windows(tokens, row[rank * local : (rank + 1) * local], seq_len)
