"""Argument validation shared by every `tq::` op.

Only metadata (shapes, dtypes, devices) is inspected, so the same checks run in eager mode
and at trace time (on fake tensors), raising TypeError / ValueError that name the argument;
the value check `storable_norms` runs only where `can_sync` allows.
"""

import torch
from torch import Tensor

from .codebook import MAX_DIM, MIN_DIM
from .packing import packed_bytes

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
NORM_DTYPES = FLOAT_DTYPES


def tensor(name: str, value, *, ndim: int | None = None, dtypes=None) -> None:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if dtypes is not None and value.dtype not in dtypes:
        wanted = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({wanted}), got {value.dtype}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(value.shape)}")


def int_range(name: str, value, low: int, high: int | None = None) -> None:
    """Refuse anything but an int (bool excluded) in [low, high] (no upper bound if high is
    None) with a ValueError naming `name`."""
    if (not isinstance(value, int) or isinstance(value, bool) or value < low
            or (high is not None and value > high)):
        wanted = (f"an int in [{low}, {high}]" if high is not None
                  else "a positive int" if low == 1 else f"an int >= {low}")
        raise ValueError(f"{name} must be {wanted}, got {value!r}")


def head_dim(name: str, value) -> None:
    int_range(name, value, MIN_DIM, MAX_DIM)


def storable_norms(name: str, norms: Tensor, norm_dtype: torch.dtype) -> None:
    """Refuse vectors whose norm norm_dtype cannot store with full relative precision.

    norms: float32 vector norms of input `name` (any shape; `norms.vector_norms`). Stored
    exactly: 0. Stored to full relative precision: [finfo(norm_dtype).tiny, finfo.max] (below,
    subnormals lose bits or round to 0; above, inf). NaN (inf or NaN in the input) is refused
    too. Reads values: callers run it only where `can_sync` allows.
    """
    info = torch.finfo(norm_dtype)
    bad = ~((norms == 0) | ((norms >= info.tiny) & (norms <= info.max)))
    if not bool(bad.any()):
        return
    if bool(norms.isnan().any()):
        raise ValueError(f"{name} has non-finite values (inf or NaN); they cannot be compressed")
    low, high = float(norms[bad].min()), float(norms[bad].max())
    wide = torch.finfo(torch.float32)
    shown = [f"{v:.3g}" if v != float("inf") else f"> {wide.max:.3g}" for v in (low, high)]
    raise ValueError(f"{name} has vectors with norms in [{shown[0]}, {shown[1]}], outside the "
                     f"range {norm_dtype} norms store with full precision ([{info.tiny:.3g}, "
                     f"{info.max:.3g}], or exactly 0); "
                     f"{_advice(norm_dtype, wide.tiny <= low and high <= wide.max)}")


def _advice(norm_dtype: torch.dtype, float32_holds: bool) -> str:
    if float32_holds and norm_dtype != torch.float32:
        return "pass norm_dtype=torch.float32"
    wide = torch.finfo(torch.float32)
    return (f"no norm dtype holds them (float32: [{wide.tiny:.3g}, {wide.max:.3g}]); rescale "
            "the input")


def can_sync(value: Tensor) -> bool:
    """Whether a check of tensor values (a host sync) may run: a plain tensor in eager mode,
    not while tracing or while a CUDA graph is being captured (a sync there is an error), nor on
    meta tensors (no values)."""
    return (type(value) is Tensor and value.device.type != "meta"
            and not torch.compiler.is_compiling()
            and not (value.is_cuda and torch.cuda.is_current_stream_capturing()))


def same_device(reference: Tensor, **tensors: Tensor | None) -> None:
    for name, value in tensors.items():
        if value is not None and value.device != reference.device:
            raise ValueError(f"{name} is on {value.device} but the input is on "
                             f"{reference.device}; move all arguments to one device")


def shape(name: str, value: Tensor, expected: tuple) -> None:
    if tuple(value.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(value.shape)}")


def quantizer(prefix: str, rotation: Tensor, centroids: Tensor, qjl: Tensor | None,
              index_bits: int, dim) -> None:
    """Rotation (D, D), centroids (2**index_bits,) or the upper half (2**(index_bits-1),) of a
    codebook symmetric about 0 (`codebook.half_table`), optional QJL matrix (M, D), all float32."""
    int_range(f"{prefix}index_bits", index_bits, 0, 8)
    if index_bits == 0 and qjl is None:
        raise ValueError(f"{prefix}index_bits=0 needs a QJL matrix ({prefix}qjl): nothing would "
                         "be stored")
    tensor(f"{prefix}rotation", rotation, ndim=2, dtypes=(torch.float32,))
    shape(f"{prefix}rotation", rotation, (dim, dim))
    tensor(f"{prefix}centroids", centroids, ndim=1, dtypes=(torch.float32,))
    if index_bits == 0 or centroids.shape[0] != 1 << (index_bits - 1):
        shape(f"{prefix}centroids", centroids, (1 << index_bits,))
    if qjl is not None:
        tensor(f"{prefix}qjl", qjl, ndim=2, dtypes=(torch.float32,))
        if qjl.shape[1] != dim:
            raise ValueError(f"{prefix}qjl must have shape (qjl_dim, {dim}), got {tuple(qjl.shape)}")


def compressed(prefix: str, lead: tuple, dim, index_bits: int, qjl: Tensor | None, indices: Tensor,
               norms: Tensor, signs: Tensor | None, residual_norms: Tensor | None) -> None:
    """Packed fields of (B, H, S) vectors: indices uint8, norms float, optional QJL fields."""
    tensor(f"{prefix}indices", indices, ndim=4, dtypes=(torch.uint8,))
    shape(f"{prefix}indices", indices, lead + (packed_bytes(dim, index_bits),))
    tensor(f"{prefix}norms", norms, ndim=4, dtypes=NORM_DTYPES)
    shape(f"{prefix}norms", norms, lead + (1,))
    if (qjl is None) != (signs is None) or (signs is None) != (residual_norms is None):
        raise ValueError(f"{prefix}signs, {prefix}residual_norms and {prefix}qjl must be given "
                         "together (Prod keys) or all be None (MSE only)")
    if signs is not None:
        tensor(f"{prefix}signs", signs, ndim=4, dtypes=(torch.uint8,))
        shape(f"{prefix}signs", signs, lead + (packed_bytes(qjl.shape[0], 1),))
        tensor(f"{prefix}residual_norms", residual_norms, ndim=4, dtypes=NORM_DTYPES)
        shape(f"{prefix}residual_norms", residual_norms, lead + (1,))


def grouped_heads(query: Tensor, kv_heads) -> None:
    if kv_heads == 0:
        raise ValueError("the compressed keys/values have 0 heads; attention needs at least 1")
    if query.shape[1] % kv_heads != 0:
        raise ValueError(f"query has {query.shape[1]} heads, which is not a multiple of the "
                         f"{kv_heads} key/value heads")
