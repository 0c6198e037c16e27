"""The packed form of keys and values as it travels through tq_ops: `PackedKeys`, `PackedValues`.

Each tuple holds what decoding needs, the per-token fields (B, H, S, .) and the quantizer's
constants, in the order of the ops' schemas: `*keys` are the arguments of `tq::decompress` and
`tq::scores` after the query, `*keys, *values` the first ones of `tq::read_cache`;
`ops.attention_args` builds `tq::attention`'s. The fields and the constants stay together
because every reader needs both, and a layer's constants are shared tensors (no copy). The
storage layout is in ARCHITECTURE.md.
"""

from typing import NamedTuple

from torch import Tensor


class PackedKeys(NamedTuple):
    """Compressed vectors (MSE or Prod) and the constants that decode them.

    indices: uint8 (B, H, S, packed_bytes(D, index_bits)); norms: (B, H, S, 1) in the norm
    dtype; signs: uint8 (B, H, S, packed_bytes(M, 1)) and residual_norms (B, H, S, 1), Prod only
    (else None); rotation: float32 (D, D); centroids: float32 (2**index_bits,), or the upper
    half (2**(index_bits-1),) of a symmetric codebook (`codebook.half_table`); qjl: float32
    (M, D), Prod only (else None); index_bits: bits per stored code.
    """

    indices: Tensor
    norms: Tensor
    signs: Tensor | None
    residual_norms: Tensor | None
    rotation: Tensor
    centroids: Tensor
    qjl: Tensor | None
    index_bits: int


class PackedValues(NamedTuple):
    """Compressed values (MSE: no QJL fields) and the constants that decode them.

    indices: uint8 (B, H, S, packed_bytes(D, index_bits)); norms: (B, H, S, 1) in the norm
    dtype; rotation: float32 (D, D); centroids: float32, as in `PackedKeys`; index_bits: bits
    per stored code.
    """

    indices: Tensor
    norms: Tensor
    rotation: Tensor
    centroids: Tensor
    index_bits: int

    def as_keys(self) -> PackedKeys:
        """The same vectors as `PackedKeys` without QJL fields (to decompress or score them)."""
        return PackedKeys(self.indices, self.norms, None, None, self.rotation, self.centroids,
                          None, self.index_bits)


class ExactTokens(NamedTuple):
    """Tokens that attention reads in full precision instead of their compressed copies (a
    cache's attention sinks and recent window).

    keys (B, Hkv, sinks + ring, Dk) and values (B, Hkv, sinks + ring, Dv), one float dtype:
    slot j < sinks holds position j, slot sinks + (j - sinks) % ring the position j >= sinks
    (a ring); start int (B,): position j of batch row b is read exact iff j < sinks or
    start[b] <= j (< its kv_lens), and compressed otherwise. The holder keeps every exact
    position's slot current: kv_lens[b] - start[b] <= ring.
    """

    keys: Tensor
    values: Tensor
    start: Tensor
    sinks: int


def named(kind: type, arguments: dict, prefix: str = ""):
    """A `kind` (PackedKeys or PackedValues) from an op call's arguments by name:
    `{prefix}indices`, `{prefix}norms`, ...; an absent optional field is None."""
    return kind(*(arguments.get(prefix + name) for name in kind._fields))
