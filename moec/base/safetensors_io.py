"""Safetensors files written and read one tensor at a time, with plain file reads: safetensors' save_file
takes every tensor at once (casting a model's weights to the dtype they are stored in would hold a second copy
of all of them), and its safe_open maps the file, so every tensor read stays in the process's resident memory
until the file is closed (a 14 GB checkpoint read tensor by tensor shows as 14 GB more RSS)."""
import json
from pathlib import Path

import torch

DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}
BY_NAME = {name: dtype for dtype, name in DTYPES.items()}  # a header's dtype name -> the torch dtype


def save(tensors: dict[str, torch.Tensor], path: Path, dtypes: dict | None = None, fetch=None) -> None:
    """Write tensors (each cast to dtypes[name] where given, as it is written) to path. fetch: name -> the
    value of a tensor that tensors holds on the meta device (for its shape), called as it is written."""
    dtypes = dtypes or {}
    names = sorted(tensors)
    header, offset = {}, 0
    for n in names:
        t, dtype = tensors[n], dtypes.get(n, tensors[n].dtype)
        size = t.numel() * dtype.itemsize
        header[n] = {"dtype": DTYPES[dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for n in names:
            t = fetch(n) if tensors[n].is_meta and fetch is not None else tensors[n]
            if tuple(t.shape) != tuple(tensors[n].shape):
                raise ValueError(f"{n} is {tuple(t.shape)}, written as {tuple(tensors[n].shape)}")
            t = t.detach().to(dtypes.get(n, tensors[n].dtype)).contiguous().reshape(-1)
            f.write(t.view(torch.uint8).numpy().data if t.numel() else b"")


class Reader:
    """The tensors of a safetensors file by name: shapes and dtypes from its header, a tensor read when asked."""

    def __init__(self, path):
        self.path = str(path)
        with open(self.path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        self.start = 8 + n
        self.entries = {k: (BY_NAME[v["dtype"]], tuple(v["shape"]), v["data_offsets"]) for k, v in header.items()}

    def keys(self):
        return self.entries.keys()

    def shape(self, name: str) -> tuple:
        return self.entries[name][1]

    def dtype(self, name: str) -> torch.dtype:
        return self.entries[name][0]

    def get(self, name: str) -> torch.Tensor:
        dtype, shape, (a, b) = self.entries[name]
        t = torch.empty(shape, dtype=dtype)
        with open(self.path, "rb") as f:
            f.seek(self.start + a)
            if b > a:
                f.readinto(t.reshape(-1).view(torch.uint8).numpy().data)
        return t
