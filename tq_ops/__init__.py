"""tq-ops: TurboQuant KV-cache compression as `torch.library` ops (namespace `tq`).

Importing it registers the `torch.ops.tq.*` ops and the "turboquant" torch.compile backend.
`TurboQuantCache` needs the optional `transformers` extra (`pip install tq-ops[hf]`).
"""

from . import ops  # noqa: F401  registers torch.ops.tq.*
from .codebook import lloyd_max, mse_distortion
from .compile import (RewrittenSite, TurboQuantConfig, TurboQuantPass, backend,
                      rewrite_attention)
from .compressors import (CompressedKeys, CompressedValues, TurboQuantCompressorMSE,
                          TurboQuantCompressorV2)
from .packing import packed_bytes
from .quantizer import TurboQuantMSE, TurboQuantProd

__all__ = [
    "CompressedKeys", "CompressedValues", "RewrittenSite", "TurboQuantCache",
    "TurboQuantCompressorMSE", "TurboQuantCompressorV2", "TurboQuantConfig", "TurboQuantMSE",
    "TurboQuantPass", "TurboQuantProd", "backend", "lloyd_max", "mse_distortion",
    "packed_bytes", "rewrite_attention",
]


def __getattr__(name: str):
    if name == "TurboQuantCache":  # imported on first use: transformers is optional
        from .cache import TurboQuantCache
        return TurboQuantCache
    raise AttributeError(f"module 'tq_ops' has no attribute {name!r}")
