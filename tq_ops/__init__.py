"""tq-ops: TurboQuant KV-cache compression as `torch.library` ops (namespace `tq`)."""

from . import ops  # noqa: F401  registers torch.ops.tq.*
from .codebook import lloyd_max, mse_distortion
from .compressors import (CompressedKeys, CompressedValues, TurboQuantCompressorMSE,
                          TurboQuantCompressorV2)
from .packing import packed_bytes
from .quantizer import TurboQuantMSE, TurboQuantProd

__all__ = [
    "CompressedKeys", "CompressedValues", "TurboQuantCompressorMSE", "TurboQuantCompressorV2",
    "TurboQuantMSE", "TurboQuantProd", "lloyd_max", "mse_distortion", "packed_bytes",
]
