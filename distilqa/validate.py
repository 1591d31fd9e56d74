"""Checks of user-given values, one helper each, with messages that say what is wrong and what to do.

Torch-free and importing nothing from distilqa: the bottom layer, used by config, pipeline, serve,
train, heads, bulk and the CLI alike.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def positive_int(name: str, value: Any) -> int:
    """``value`` if it is an int >= 1 (bools refused), else ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def at_least(name: str, value: Any, minimum: int) -> int:
    """``value`` if it is an int >= ``minimum`` (bools refused), else ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def positive_number(name: str, value: Any) -> float:
    """``value`` if it is a real number > 0, else ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return value


def one_of(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """``value`` if it is one of ``choices``, else ValueError listing them."""
    choices = list(choices)
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(repr(c) for c in choices)}")
    return value


def check_model_inputs(input_ids: Any, attention_mask: Any, window_lengths: Any, max_positions: int) -> None:
    """The model's input contract, as one ValueError naming what is wrong: ``input_ids`` an integer
    tensor (batch, seq) of at most ``max_positions`` tokens per sequence; ``attention_mask`` None or
    of the same shape; or packed windows: one row (1, sum(window_lengths)) and no attention_mask."""
    if input_ids.dim() != 2 or input_ids.dtype.is_floating_point:
        raise ValueError(
            f"input_ids must be an integer tensor (batch, seq), got {input_ids.dtype} {tuple(input_ids.shape)}"
        )
    if window_lengths is not None:
        total = sum(window_lengths)
        if input_ids.size(0) != 1 or total != input_ids.size(1) or attention_mask is not None:
            raise ValueError(
                "packed windows are one row (1, seq) with seq = sum(window_lengths) and no attention_mask; "
                f"got input_ids {tuple(input_ids.shape)} for lengths summing to {total}"
            )
        longest = max(window_lengths)
    else:
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}"
            )
        longest = input_ids.size(1)
    if longest > max_positions:
        raise ValueError(
            f"a sequence of {longest} tokens is longer than the model's {max_positions} positions; "
            "split it into windows"
        )
