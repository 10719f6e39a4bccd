"""Import torchvision on CPU torch, where the PyPI wheel's C++ ops cannot load.

transformers' torch image and video processors (the Qwen-VL ones, the fast CLIP/SigLIP ones: what
vLLM and most deployments run, with their own resize numerics) need ``torchvision.transforms.v2``,
which is pure torch. The PyPI torchvision wheel is built against CUDA torch: on CPU torch its
``_C`` extension (nms, roi_align, ...) does not load, which torchvision tolerates, except that
``torchvision._meta_registrations`` then registers fake kernels for ``torchvision::nms`` and
``torchvision::qnms`` without checking the ops exist, and the import fails ("operator
torchvision::nms does not exist"). On exactly that failure we define those two schemas
(no kernels: calling ``torchvision.ops.nms`` stays an error) and import again. Where the ops load
(a matching torchvision build) nothing is touched.
"""

from __future__ import annotations

import sys

_SCHEMAS = ("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
            "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
_library = None  # the schema fragment, kept alive for the process


def ensure_torchvision() -> bool:
    """Import torchvision (True), or return False where it is not installed."""
    global _library
    try:
        import torchvision  # noqa: F401
        return True
    except ModuleNotFoundError:
        return False
    except RuntimeError as exc:
        if "torchvision::nms does not exist" not in str(exc):
            raise
    import torch

    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]  # the half-imported package
    _library = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _SCHEMAS:
        _library.define(schema)
    import torchvision  # noqa: F401,F811
    return True
