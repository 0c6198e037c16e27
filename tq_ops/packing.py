"""The split-plane bit layout of b-bit codes (see ARCHITECTURE.md, "Split-plane layout").

A code of b bits is split into planes of width 4, 2, 1 (or one plane of 8), widest first.
In a plane of width w, byte k holds coordinate i * seg + k in bits [i*w, (i+1)*w), where
seg = ceil(dim / (8 // w)). Planes are concatenated along the last dimension.
"""

import torch


def plane_widths(bits: int) -> tuple[int, ...]:
    """Plane widths of a `bits`-bit code, high-order plane first: 7 -> (4, 2, 1)."""
    if not isinstance(bits, int) or isinstance(bits, bool) or not 0 <= bits <= 8:
        raise ValueError(f"bits must be an int in [0, 8], got {bits!r}")
    if bits == 8:
        return (8,)
    return tuple(w for w in (4, 2, 1) if bits & w)


def plane_segment(dim: int, width: int) -> int:
    """Bytes in one plane of `width` bits for `dim` coordinates (= coordinates per segment)."""
    per_byte = 8 // width
    return -(-dim // per_byte)


def packed_bytes(dim: int, bits: int) -> int:
    """Bytes that `dim` codes of `bits` bits occupy."""
    return sum(plane_segment(dim, w) for w in plane_widths(bits))


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes (..., dim) integer in [0, 2**bits) -> packed (..., packed_bytes(dim, bits)) uint8."""
    dim = codes.shape[-1]
    codes = codes.to(torch.int32)
    planes, shift = [], bits
    for w in plane_widths(bits):
        shift -= w
        per_byte, seg = 8 // w, plane_segment(dim, w)
        part = (codes >> shift) & ((1 << w) - 1)
        part = torch.nn.functional.pad(part, (0, per_byte * seg - dim))
        part = part.unflatten(-1, (per_byte, seg))
        lanes = torch.arange(per_byte, dtype=torch.int32, device=codes.device) * w
        planes.append((part << lanes[:, None]).sum(-2))
    if not planes:
        return codes.new_zeros(codes.shape[:-1] + (0,), dtype=torch.uint8)
    return torch.cat(planes, -1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """packed (..., packed_bytes(dim, bits)) uint8 -> codes (..., dim) int32."""
    codes = packed.new_zeros(packed.shape[:-1] + (dim,), dtype=torch.int32)
    start, shift = 0, bits
    for w in plane_widths(bits):
        shift -= w
        per_byte, seg = 8 // w, plane_segment(dim, w)
        plane = packed[..., start:start + seg].to(torch.int32)
        lanes = torch.arange(per_byte, dtype=torch.int32, device=packed.device) * w
        part = (plane.unsqueeze(-2) >> lanes[:, None]) & ((1 << w) - 1)
        codes |= part.flatten(-2)[..., :dim] << shift
        start += seg
    return codes
