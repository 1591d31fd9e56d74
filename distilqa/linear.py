"""Which GEMM library runs the model's ``nn.Linear`` layers.

PyTorch sends a float32 ``nn.Linear`` on the CPU to MKL's sgemm. On some machines oneDNN's GEMM is
much faster at this model's shapes (AMD EPYC Zen 5: about 2.2x; measured in
``benchmarks/results``), with the same weights and the same float32 arithmetic up to rounding order.
The backend is a property of each ``nn.Linear`` module, not a second model: the module keeps its
class's parameters, its state dict and its autograd (training always runs ``F.linear``), and
:func:`set_linear_backend` switches it back and forth.

    "aten"    F.linear, PyTorch's default (MKL for float32 on the CPU)
    "onednn"  oneDNN's GEMM (``torch.ops.mkldnn._linear_pointwise``) for float32 and bfloat16 CPU
              inference, with the work that follows a GEMM done as it writes its output ("post-ops"):
              the feed-forward activation fused into ``lin1``, and the residual connection's add into
              ``out_lin`` and ``lin2`` (:func:`linear_add`); weights kept in oneDNN's own layout
              (:func:`packed_weight`) and the feed-forward run in cache-sized chunks (FFN_CHUNK_BYTES)
    "auto"    whichever of the two is measured faster here for the model's dtype, on a feed-forward
              block of the model's own shape run as each backend runs it
    "onednn-int8"  int8 inference with the same post-ops: oneDNN's int8 GEMM
              (``torch.ops.onednn.qlinear_pointwise``) on each weight quantised per output channel, each
              input quantised per call; the parameters stay float32. Approximate, like every int8 path
"""

from __future__ import annotations

import functools
import warnings
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distilqa.hardware import cpu_info, median_seconds

LINEAR_BACKENDS = ("aten", "onednn")


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def onednn_int8_available() -> bool:
    """oneDNN's int8 GEMM with post-ops, on a CPU that multiplies int8 natively (AVX512-VNNI or AMX-INT8):
    without them oneDNN's unsigned-by-signed 8-bit products can saturate."""
    isa = cpu_info()["isa"]
    native = isa["avx512_vnni"] or isa["amx_int8"]
    return native and onednn_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")


# Activations oneDNN can apply to a GEMM's output as it is written (a "post-op"): name -> (the module
# it replaces, the algorithm argument of _linear_pointwise, the same function unfused).
POST_OPS: dict[str, tuple[type[nn.Module], str, Callable[[Tensor], Tensor]]] = {
    "gelu": (nn.GELU, "none", F.gelu),  # "none": the exact erf GELU, as nn.GELU() computes it
    "relu": (nn.ReLU, "", F.relu),
}


class OneDNNLinear(nn.Linear):
    """``nn.Linear`` whose float32 and bfloat16 CPU inference runs oneDNN's GEMM, with the activation
    that follows it fused in when ``post_op`` names one, and a ``residual`` added as the output is
    written when one is given. Anything else runs ``F.linear``, the activation and the add as usual,
    so the module stays a drop-in: training with gradients, other devices, inside torch.compile."""

    post_op = "none"  # or a key of POST_OPS, set by set_linear_backend on a layer whose activation it took
    fuse_residual = True  # linear_add passes the residual in (False: set_linear_backend(fuse_post_ops=False))
    dtypes = (torch.float32, torch.bfloat16)  # what runs on oneDNN; anything else runs F.linear
    packs_inference_weights = False  # an inference tensor has no version to follow: oneDNN reorders it per call

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        """x (..., in) -> (..., out); residual (..., out), added to the output when given."""
        fused, onednn = POST_OPS.get(self.post_op), self._runs_onednn(x)  # checked once per call
        if onednn and residual is None:
            return self._gemm(x, fused[1] if fused else "")
        if onednn and not fused and residual.dtype == x.dtype and residual.shape == (*x.shape[:-1], self.out_features):
            return self._gemm(x, "", residual)  # oneDNN's binary post-op adds the residual as the GEMM writes
        y = F.linear(x, self.weight, self.bias)  # (..., out)
        y = fused[2](y) if fused else y
        return y if residual is None else y + residual

    def _gemm(self, x: Tensor, algorithm: str, residual: Tensor | None = None) -> Tensor:
        if residual is None:
            return torch.ops.mkldnn._linear_pointwise(x, packed_weight(self), self.bias, self.post_op, [], algorithm)
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, packed_weight(self), self.bias, "add")

    def _pack(self, weight: Tensor) -> Tensor:  # see packed_weight
        return torch.ops.mkldnn._reorder_linear_weight(weight, None)

    def _runs_onednn(self, x: Tensor) -> bool:
        return (
            x.device.type == "cpu"
            and x.shape[-1] > 0  # oneDNN refuses an empty reduction (a layer whose inputs were all pruned)
            and x.dtype in self.dtypes
            and self.weight.dtype == x.dtype
            and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))
            and not torch.compiler.is_compiling()  # inside torch.compile, inductor picks the GEMM
        )


class OneDNNInt8Linear(OneDNNLinear):
    """:class:`OneDNNLinear` whose float32 CPU inference multiplies in int8: the weight quantised
    symmetrically per output channel (once per change of the weight, like the reordered copy), the input
    asymmetrically per tensor on each call, the product with its bias, activation or residual add
    written in float32. Anything else (training, other dtypes) runs the float32 layer it still is."""

    dtypes = (torch.float32,)
    packs_inference_weights = True  # the int8 GEMM reads only quantised, prepacked weights

    def _gemm(self, x: Tensor, algorithm: str, residual: Tensor | None = None) -> Tensor:
        weight, weight_scales, weight_zero_points = packed_weight(self)
        with warnings.catch_warnings():  # torch marks quantised tensors deprecated; this one lives for one call
            warnings.simplefilter("ignore", UserWarning)
            quantized = torch.quantize_per_tensor_dynamic(x, torch.quint8, False)  # min/max of x -> uint8
        # its bytes as a plain uint8 tensor, shared: int_repr() would copy them, which took as long as the
        # quantising itself or longer (measured at 3072 x 3072)
        qx = x.new_empty(0, dtype=torch.uint8).set_(
            quantized.untyped_storage(), quantized.storage_offset(), quantized.size(), quantized.stride()
        )
        scale, zero_point = quantized.q_scale(), quantized.q_zero_point()
        weight_args = (weight, weight_scales, weight_zero_points)
        if residual is None:
            return torch.ops.onednn.qlinear_pointwise(
                qx, scale, zero_point, *weight_args, self.bias, 1.0, 0, torch.float32, self.post_op, [], algorithm
            )
        return torch.ops.onednn.qlinear_pointwise.binary(
            qx, scale, zero_point, *weight_args, residual, self.bias, 1.0, 0, torch.float32, 1.0, 0, "add", 1.0,
            "none", [], "",
        )  # fmt: skip

    def _pack(self, weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        scales = (weight.abs().amax(dim=1) / 127).clamp_min(1e-12)  # (out,): int8 in [-127, 127]
        quantized = torch.round(weight / scales[:, None]).to(torch.int8)  # (out, in)
        zero_points = torch.zeros_like(scales, dtype=torch.int64)
        return torch.ops.onednn.qlinear_prepack(quantized, None), scales, zero_points


# oneDNN's GEMM reads its weight in a blocked layout of its own, and reorders a plain weight into it on
# every call: up to a fifth of the GEMM's time at this model's shapes. So each layer keeps the reordered
# copy beside its weight (outside the state dict, freed with the layer), made again whenever the weight
# changes as PyTorch sees it: a new tensor, new storage, or an in-place change counted in its _version
# (load_state_dict, optimizer steps, edits under torch.no_grad()). Writes through ``weight.data``
# bypass that count: call set_linear_backend again after them. Same values, so same results bit for bit.
_PACKED_WEIGHTS: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, object]] = weakref.WeakKeyDictionary()


def packed_weight(layer: OneDNNLinear) -> Tensor | tuple[Tensor, ...]:
    """``layer.weight`` as the layer's oneDNN GEMM reads it (``layer._pack``: reordered into oneDNN's own
    layout, the same values; or quantised to int8 with its scales), made once per change of the weight."""
    weight = layer.weight.detach()
    if weight.is_inference() and not layer.packs_inference_weights:
        return weight
    key = (type(layer), weight.data_ptr(), weight._version if not weight.is_inference() else None, weight.dtype)
    cached = _PACKED_WEIGHTS.get(layer)
    if cached is None or cached[0] != key:
        cached = key, layer._pack(weight)
        _PACKED_WEIGHTS[layer] = cached
    return cached[1]


def linear_add(layer: nn.Module, x: Tensor, residual: Tensor | None = None, dropout: nn.Module | None = None) -> Tensor:
    """``dropout(layer(x)) + residual`` (each of the two optional): a sub-layer's last projection and
    the residual connection around it, (..., in) -> (..., out). A :class:`OneDNNLinear` adds the
    residual inside its GEMM when there is no dropout to apply between the two (inference); any other
    layer computes it as written, in that order (the reference's: bit for bit on "aten")."""
    inactive = dropout is None or not dropout.training or dropout.p == 0.0
    if residual is not None and inactive and isinstance(layer, OneDNNLinear) and layer.fuse_residual:
        return layer(x, residual)
    y = layer(x) if dropout is None else dropout(layer(x))
    return y if residual is None else y + residual


# oneDNN runs a feed-forward block this many bytes of hidden activations at a time (1,024 tokens in float32
# at the published size): lin2 then reads what lin1 wrote while it is still in the CPU's last-level cache.
# Same result; 12% faster at 8 x 384 tokens on an AMD EPYC (32 MiB L3), neutral for a single window.
FFN_CHUNK_BYTES = 12 << 20

BACKEND_CLASSES: dict[str, type[nn.Linear]] = {
    "aten": nn.Linear,
    "onednn": OneDNNLinear,
    "onednn-int8": OneDNNInt8Linear,
}


def set_linear_backend(module: nn.Module, backend: str = "auto", fuse_post_ops: bool = True) -> str:
    """Make every ``nn.Linear`` inside ``module`` run on ``backend`` (see the module docstring) and
    return the backend chosen. The modules keep their identity and parameters: only their class
    changes, between ``nn.Linear`` and its subclass :class:`OneDNNLinear` (the technique
    ``torch.nn.utils.parametrize`` uses).

    With "onednn" and ``fuse_post_ops``, a feed-forward block's activation (a module with ``lin1``
    and an ``activation`` of a kind in POST_OPS) becomes ``lin1``'s post-op, and the block's
    ``activation`` an ``nn.Identity`` in its place: the model's repr shows the fusion, its state dict
    is unchanged, and any other backend puts the activation module back. The residual adds of
    :func:`linear_add` run inside the GEMM too; ``fuse_post_ops=False`` runs both after it."""
    if backend == "auto":
        dtypes = {layer.weight.dtype for layer in module.modules() if type(layer) in BACKEND_CLASSES.values()}
        backend = fastest_linear_backend(dtypes.pop()) if len(dtypes) == 1 else "aten"
    if backend not in BACKEND_CLASSES:
        raise ValueError(f"unknown linear backend {backend!r}; expected 'auto' or one of {', '.join(BACKEND_CLASSES)}")
    if backend == "onednn" and not onednn_available():
        raise ValueError("linear backend 'onednn' needs a PyTorch built with oneDNN (mkldnn)")
    if backend == "onednn-int8" and not onednn_int8_available():
        raise ValueError("linear backend 'onednn-int8' needs oneDNN's int8 GEMM and a CPU with AVX512-VNNI or AMX-INT8")
    onednn = issubclass(BACKEND_CLASSES[backend], OneDNNLinear)
    for block in _feed_forward_blocks(module):  # undo first: the activation module back after lin1, unchunked
        if isinstance(block.lin1, OneDNNLinear) and block.lin1.post_op in POST_OPS:
            block.activation = POST_OPS[block.lin1.post_op][0]()
            del block.lin1.post_op
        if hasattr(block, "chunk_tokens"):
            block.chunk_tokens = 0
    for layer in module.modules():
        if type(layer) in BACKEND_CLASSES.values():  # exact types: never touch a quantised or custom linear
            layer.__class__ = BACKEND_CLASSES[backend]
            layer.__dict__.pop("fuse_residual", None)
            _PACKED_WEIGHTS.pop(layer, None)
            if onednn and not fuse_post_ops:
                layer.fuse_residual = False
    if onednn and fuse_post_ops:
        for block in _feed_forward_blocks(module):
            if hasattr(block, "chunk_tokens"):  # bound the (tokens, hidden) activations: see FFN_CHUNK_BYTES
                block.chunk_tokens = FFN_CHUNK_BYTES // (block.lin1.out_features * block.lin1.weight.element_size())
            name = next((n for n, (kind, _, _) in POST_OPS.items() if type(block.activation) is kind), None)
            if (
                isinstance(block.lin1, OneDNNLinear)
                and name
                and getattr(block.activation, "approximate", "none") == "none"
            ):
                block.lin1.post_op, block.activation = name, nn.Identity()
    return backend


def _feed_forward_blocks(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(getattr(m, "lin1", None), nn.Linear) and hasattr(m, "activation")]


def linear_backend(module: nn.Module) -> str:
    """The backend of the ``nn.Linear`` layers in ``module``: one name, or "mixed"."""
    names = {name for layer in module.modules() for name, cls in BACKEND_CLASSES.items() if type(layer) is cls}
    return names.pop() if len(names) == 1 else "mixed"


def gemm_throughput(
    dtype: torch.dtype = torch.float32,
    backends: tuple[str, ...] = LINEAR_BACKENDS,
    tokens: int = 256,
    dim: int = 768,
    hidden: int = 3072,
) -> dict[str, float]:
    """GFLOP/s of each backend on the CPU running a feed-forward block's GEMMs as the model runs them on
    it, (tokens, dim) -> lin1 and GELU -> lin2 plus the residual: the median of 5 calls, the backends
    taking turns (:func:`~distilqa.hardware.median_seconds`)."""
    x = torch.randn(tokens, dim, dtype=dtype)
    runs = {}
    for backend in backends:
        block = nn.Module()
        block.lin1, block.activation, block.lin2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)
        block.requires_grad_(False).to(dtype)
        set_linear_backend(block, backend)
        runs[backend] = lambda b=block: linear_add(b.lin2, b.activation(b.lin1(x)), x)
    with torch.inference_mode():
        seconds = median_seconds(runs)
    return {backend: 2 * 2 * tokens * dim * hidden / s / 1e9 for backend, s in seconds.items()}


@functools.cache
def fastest_linear_backend(dtype: torch.dtype = torch.float32) -> str:
    """The CPU backend measured fastest for ``dtype`` on this machine (a few tenths of a second, once per
    process and dtype); "aten" for a dtype oneDNN does not run here."""
    if not onednn_available() or dtype not in (torch.float32, torch.bfloat16):
        return "aten"
    measured = gemm_throughput(dtype)
    # oneDNN only when clearly faster (beyond the few percent an interleaved measurement varies): at a tie
    # keep PyTorch's default. (On an AMD EPYC, Zen 5: 2.3-2.6x in float32, 1.1-1.2x in bfloat16.)
    return "onednn" if measured["onednn"] > 1.05 * measured["aten"] else "aten"


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
