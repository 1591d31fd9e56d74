"""Which GEMM library runs the model's ``nn.Linear`` layers.

PyTorch sends a float32 ``nn.Linear`` on the CPU to MKL's sgemm. On some machines oneDNN's GEMM is
much faster at this model's shapes (AMD EPYC Zen 5: about 2.2x; measured in
``benchmarks/results``), with the same weights and the same float32 arithmetic up to rounding order.
The backend is a property of each ``nn.Linear`` module, not a second model: the module keeps its
class's parameters, its state dict and its autograd (training always runs ``F.linear``), and
:func:`set_linear_backend` switches it back and forth.

    "aten"    F.linear, PyTorch's default (MKL for float32 on the CPU)
    "onednn"  oneDNN's fp32 GEMM (``torch.ops.mkldnn._linear_pointwise``) for float32 CPU inference,
              with the feed-forward activation fused into ``lin1`` as a post-op
    "auto"    whichever of the two is measured faster here, at the model's own shape
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LINEAR_BACKENDS = ("aten", "onednn")


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


# Activations oneDNN can apply to a GEMM's output as it is written (a "post-op"): name -> (the module
# it replaces, the algorithm argument of _linear_pointwise, the same function unfused).
POST_OPS: dict[str, tuple[type[nn.Module], str, Callable[[Tensor], Tensor]]] = {
    "gelu": (nn.GELU, "none", F.gelu),  # "none": the exact erf GELU, as nn.GELU() computes it
    "relu": (nn.ReLU, "", F.relu),
}


class OneDNNLinear(nn.Linear):
    """``nn.Linear`` whose float32 CPU inference runs oneDNN's GEMM, with the activation that follows
    it fused in when ``post_op`` names one. Anything else runs ``F.linear`` and the activation as
    usual, so the module stays a drop-in: training with gradients, other devices, inside
    torch.compile, and bfloat16 (where ``F.linear`` already calls oneDNN, and measured faster than
    ``_linear_pointwise``: benchmarks/results)."""

    post_op = "none"  # or a key of POST_OPS, set by set_linear_backend on a layer whose activation it took

    def forward(self, x: Tensor) -> Tensor:
        if (
            x.device.type == "cpu"
            and x.dtype == torch.float32
            and self.weight.dtype == torch.float32
            and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))
            and not torch.compiler.is_compiling()  # inside torch.compile, inductor picks the GEMM
        ):
            algorithm = POST_OPS[self.post_op][1] if self.post_op in POST_OPS else ""
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, self.post_op, [], algorithm)
        y = F.linear(x, self.weight, self.bias)  # (..., out)
        return POST_OPS[self.post_op][2](y) if self.post_op in POST_OPS else y


BACKEND_CLASSES: dict[str, type[nn.Linear]] = {"aten": nn.Linear, "onednn": OneDNNLinear}


def set_linear_backend(module: nn.Module, backend: str = "auto", fuse_activations: bool = True) -> str:
    """Make every ``nn.Linear`` inside ``module`` run on ``backend`` (see the module docstring) and
    return the backend chosen. The modules keep their identity and parameters: only their class
    changes, between ``nn.Linear`` and its subclass :class:`OneDNNLinear` (the technique
    ``torch.nn.utils.parametrize`` uses).

    With "onednn" and ``fuse_activations``, a feed-forward block's activation (a module with ``lin1``
    and an ``activation`` of a kind in POST_OPS) becomes ``lin1``'s post-op, and the block's
    ``activation`` an ``nn.Identity`` in its place: the model's repr shows the fusion, its state dict
    is unchanged, and any other backend puts the activation module back."""
    if backend == "auto":
        backend = fastest_linear_backend()
    if backend not in LINEAR_BACKENDS:
        raise ValueError(f"unknown linear backend {backend!r}; expected 'auto' or one of {', '.join(LINEAR_BACKENDS)}")
    if backend == "onednn" and not onednn_available():
        raise ValueError("linear backend 'onednn' needs a PyTorch built with oneDNN (mkldnn)")
    for block in _feed_forward_blocks(module):  # unfuse first: the activation module back after lin1
        if isinstance(block.lin1, OneDNNLinear) and block.lin1.post_op in POST_OPS:
            block.activation = POST_OPS[block.lin1.post_op][0]()
            del block.lin1.post_op
    for layer in module.modules():
        if type(layer) in BACKEND_CLASSES.values():  # exact types: never touch a quantised or custom linear
            layer.__class__ = BACKEND_CLASSES[backend]
    if backend == "onednn" and fuse_activations:
        for block in _feed_forward_blocks(module):
            name = next((n for n, (kind, _, _) in POST_OPS.items() if type(block.activation) is kind), None)
            if type(block.lin1) is OneDNNLinear and name and getattr(block.activation, "approximate", "none") == "none":
                block.lin1.post_op, block.activation = name, nn.Identity()
    return backend


def _feed_forward_blocks(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(getattr(m, "lin1", None), nn.Linear) and hasattr(m, "activation")]


def linear_backend(module: nn.Module) -> str:
    """The backend of the ``nn.Linear`` layers in ``module``: one name, or "mixed"."""
    names = {name for layer in module.modules() for name, cls in BACKEND_CLASSES.items() if type(layer) is cls}
    return names.pop() if len(names) == 1 else "mixed"


def gemm_throughput(backend: str, tokens: int = 384, dim: int = 768, out: int = 768, repeat: int = 5) -> float:
    """Float32 GFLOP/s of one backend on the CPU for (tokens, dim) x (dim, out), best of ``repeat``."""
    layer = nn.Linear(dim, out).requires_grad_(False)
    set_linear_backend(layer, backend)
    x = torch.randn(tokens, dim)
    with torch.inference_mode():
        layer(x)  # warm-up: first-call set-up and page faults
        best = float("inf")
        for _ in range(repeat):
            began = time.perf_counter()
            layer(x)
            best = min(best, time.perf_counter() - began)
    return 2 * tokens * dim * out / best / 1e9


@functools.cache
def fastest_linear_backend() -> str:
    """The float32 CPU backend measured fastest on this machine (about 20 ms, once per process)."""
    if not onednn_available():
        return "aten"
    measured = {backend: gemm_throughput(backend) for backend in LINEAR_BACKENDS}
    # oneDNN only when clearly faster: at a tie keep PyTorch's default.
    return "onednn" if measured["onednn"] > 1.1 * measured["aten"] else "aten"


def quantize_int8(module: nn.Module) -> None:
    """Replace every ``nn.Linear`` inside ``module``, in place, by PyTorch's dynamically quantised
    linear layer (int8 weights per tensor, activations quantised per call; CPU, float32 models).
    Faster and approximate: measure the deviation for your inputs (the benchmarks report it)."""
    import warnings

    set_linear_backend(module, "aten")  # quantize_dynamic matches the exact class nn.Linear
    with warnings.catch_warnings():  # torch marks torch.ao.quantization deprecated (torchao is its successor); it works
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.ao.quantization.quantize_dynamic(module, {nn.Linear}, dtype=torch.qint8, inplace=True)
