"""Hand-written GPU kernels (Triton). Imported only through :mod:`distilqa.attention`, and only when a
model runs the ``"triton"`` attention core: importing this package needs Triton installed."""

from distilqa.kernels.flash_attention import flash_attention, interpreting

__all__ = ["flash_attention", "interpreting"]
