"""The one tensor codec: ``torch.Tensor`` <-> ``anagram.v1.Tensor`` (row-major, little-endian)."""

from __future__ import annotations

import math
import sys

import torch

from anagram.v1 import anagram_pb2 as pb

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "uint8": torch.uint8,
    "int8": torch.int8,
    "int32": torch.int32,
    "int64": torch.int64,
    "bool": torch.bool,
}
NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
MAX_DIMS = 8  # no tensor of the contract has more; torch refuses absurd shapes with a RuntimeError
MAX_DIM_SIZE = 2**31 - 1  # per dimension (a message cannot carry more bytes than this anyway)

# The wire is little-endian; torch.frombuffer reads native order.
assert sys.byteorder == "little", "the tensor codec assumes a little-endian host"


class CodecError(ValueError):
    """A Tensor message that does not describe a tensor; the message says what is wrong."""


def encode(tensor: torch.Tensor) -> pb.Tensor:
    """Any CPU or GPU tensor -> Tensor message (copied to contiguous CPU memory)."""
    if tensor.dtype not in NAMES:
        raise CodecError(f"dtype {tensor.dtype} cannot travel: use one of {', '.join(DTYPES)}")
    flat = tensor.detach().to("cpu").contiguous()
    data = flat.view(-1).view(torch.uint8).numpy().tobytes() if flat.numel() else b""
    return pb.Tensor(dtype=NAMES[tensor.dtype], shape=list(flat.shape), data=data)


def decode(message: pb.Tensor, field: str = "tensor") -> torch.Tensor:
    """Tensor message -> CPU tensor (a private copy). ``field`` names it in error messages."""
    if not is_set(message):
        raise CodecError(f"{field} is missing: fill in its dtype, shape and data")
    if message.dtype not in DTYPES:
        raise CodecError(
            f"{field}.dtype={message.dtype!r} is not supported: use one of {', '.join(DTYPES)}"
        )
    dtype = DTYPES[message.dtype]
    shape = list(message.shape)
    if len(shape) > MAX_DIMS:
        raise CodecError(f"{field} has {len(shape)} dimensions: tensors have at most {MAX_DIMS}")
    if any(d < 0 for d in shape):
        raise CodecError(f"{field}.shape={shape} has a negative dimension")
    if any(d > MAX_DIM_SIZE for d in shape):
        raise CodecError(f"{field}.shape={shape} has a dimension above {MAX_DIM_SIZE}: no message "
                         "is that large")
    count = math.prod(shape)
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(message.data) != count * itemsize:
        raise CodecError(
            f"{field} has {len(message.data)} bytes of data, but shape {shape} in {message.dtype} "
            f"needs {count * itemsize}"
        )
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(message.data), dtype=dtype).reshape(shape)


def is_set(message: pb.Tensor) -> bool:
    """Whether an optional Tensor field was filled in (any of its dtype, shape or data)."""
    return bool(message.dtype) or len(message.shape) > 0 or bool(message.data)
