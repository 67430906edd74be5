"""Token streams for training: the embedded text, a user's text file, or a
pre-tokenised .bin of token ids, split into a training and a held-out part.

Text is tokenised as bytes (ids 0..255), so any model with a vocabulary of at
least 256 trains on it without a tokenizer. A .bin holds raw little-endian
token ids and is memory-mapped; its dtype is given by --data-dtype (uint16
fits vocabularies up to 65536, uint32 beyond), since a headerless file cannot
say it itself.

A step's global batch is a pure function of (seed, split, step): resuming at
step N reads exactly the batches an uninterrupted run would have read, so the
data position is the step counter and nothing else needs saving. Each
data-parallel rank reads its share of it, the same share of every micro-batch,
so the global batch and its micro-batches are the same at any data-parallel
width: a run resumed under another plan reads what it would have read.
Validation batches leave the seed out, so runs of different seeds are measured
on the same ones.
"""
import gzip
import hashlib
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from moec.base.errors import MoecError

EMBEDDED = "kjv.txt.gz"  # see moec/data/README.md
BIN_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


def _embedded() -> np.ndarray:
    raw = gzip.decompress(resources.files("moec").joinpath("data", EMBEDDED).read_bytes())
    return np.frombuffer(raw, dtype=np.uint8)


def load_tokens(path: str | None, dtype: str = "uint16") -> np.ndarray:
    """All token ids of the data set as a 1-D array (memory-mapped for .bin)."""
    if path is None:
        return _embedded()
    p = Path(path)
    if not p.is_file():
        raise MoecError(f"--data {path}: no such file")
    try:
        if p.suffix == ".bin":
            if dtype not in BIN_DTYPES:
                raise MoecError(f"--data-dtype {dtype}: expected one of {', '.join(BIN_DTYPES)}")
            itemsize = np.dtype(BIN_DTYPES[dtype]).itemsize
            if p.stat().st_size % itemsize:
                raise MoecError(f"--data {path}: {p.stat().st_size} bytes is not a whole number of {dtype} "
                                f"token ids; is --data-dtype right?")
            return np.memmap(p, dtype=BIN_DTYPES[dtype], mode="r")
        return np.frombuffer(p.read_bytes(), dtype=np.uint8)
    except OSError as e:
        raise MoecError(f"--data {path}: cannot read it ({e.strerror or e})") from e


class TokenData:
    """Random windows of seq_len + 1 tokens; the last val_fraction of the stream is held out."""

    def __init__(self, tokens: np.ndarray, seq_len: int, val_fraction: float = 0.05, seed: int = 0):
        n_val = int(len(tokens) * val_fraction)
        self.splits = {"train": tokens[:len(tokens) - n_val], "val": tokens[len(tokens) - n_val:]}
        for name, part in self.splits.items():
            if len(part) <= seq_len + 1 and (name == "train" or val_fraction > 0):
                raise MoecError(f"the data's {name} split has {len(part)} tokens, too few for --seq-len {seq_len}; "
                                f"use more data or a shorter --seq-len")
        self.seq_len, self.seed = seq_len, seed
        self.max_token = int(tokens.max()) if len(tokens) else 0

    def batch(self, split: str, step: int, batch_size: int, rank: int = 0, world: int = 1, micro_batches: int = 1):
        """(inputs, targets), each [batch_size, seq_len] int64: this rank's share of the step's global batch of
        batch_size * world sequences, as micro_batches equal micro-batches, each of them this rank's share
        of the global batch's micro-batch."""
        if batch_size % micro_batches:
            raise ValueError(f"{batch_size} sequences do not split into {micro_batches} equal micro-batches")
        data = self.splits[split]
        # the held-out batches are the same whatever --seed: runs of different seeds are compared on them
        seed = self.seed if split == "train" else 0
        key = hashlib.blake2b(f"{seed}/{split}/{step}".encode(), digest_size=8).digest()
        g = torch.Generator().manual_seed(int.from_bytes(key, "little"))
        starts = torch.randint(0, len(data) - self.seq_len - 1, (batch_size * world,), generator=g)
        starts = starts.view(micro_batches, world, -1)[:, rank].flatten().tolist()  # [micro, rank, row]
        rows = np.stack([np.asarray(data[s:s + self.seq_len + 1], dtype=np.int64) for s in starts])
        rows = torch.from_numpy(rows)
        return rows[:, :-1], rows[:, 1:]


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch tensor on the device. To a GPU through pinned memory, without blocking: a copy from pageable
    memory makes the host wait for the GPU's queue to drain."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
