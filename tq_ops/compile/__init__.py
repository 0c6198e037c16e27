"""torch.compile integration: the FX attention pass and the "turboquant" backend.

    torch.compile(model, backend="turboquant")                       # defaults
    torch.compile(model, backend=tq_ops.backend(k_bits=4, v_bits=3))  # explicit settings
    torch.compile(model, options={"pre_grad_custom_pass": TurboQuantPass()})  # Inductor hook

Importing this module registers the backend name "turboquant" with Dynamo.
"""

import torch

from ..quantizer import DEFAULT_KEY_QUANTIZER
from .passes import (
    RewrittenSite,
    TurboQuantBackend,
    TurboQuantConfig,
    TurboQuantPass,
    backend,
    rewrite_attention,
    site_quantizers,
)

BACKEND_NAME = "turboquant"

if BACKEND_NAME not in torch._dynamo.list_backends(exclude_tags=()):
    torch._dynamo.register_backend(TurboQuantBackend(), name=BACKEND_NAME)

__all__ = ["BACKEND_NAME", "DEFAULT_KEY_QUANTIZER", "RewrittenSite", "TurboQuantBackend",
           "TurboQuantConfig", "TurboQuantPass", "backend", "rewrite_attention",
           "site_quantizers"]
