"""Checks an agent's update must pass before the coordinator aggregates it.

An update is the agent's locally trained weights, tensor for tensor in the order of the
global weights it started from (the ``reference``). :func:`validate_update` refuses, with a
:class:`~protocol.errors.ProtocolError` whose ``reason`` names the check, an update that:

``wrong_count``     holds a different number of tensors than the reference
``wrong_shape``     holds a tensor whose shape differs from the reference's (index and both
                    shapes are in the message)
``wrong_dtype``     holds something that is not a floating-point array
``not_finite``      holds NaN or infinite values (the tensor index is in the message)
``norm_too_large``  moved too far: the L2 norm of its delta (weights - reference, over all
                    tensors at once) is above ``max_norm``, or above ``max_relative_norm``
                    times the reference's own norm

The reason travels unchanged into the event that tells the agent why its update was refused.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from protocol.errors import ConfigError, ProtocolError

__all__ = ["DEFAULT_MAX_RELATIVE_NORM", "update_norm", "validate_update"]

# A delta a hundred times the size of the whole model is no training step; it is a broken
# or hostile agent, and one such update would dominate any mean.
DEFAULT_MAX_RELATIVE_NORM = 100.0
# Keeps the relative bound meaningful for an all-zero reference (a freshly zeroed model).
_REFERENCE_NORM_FLOOR = 1e-12


def validate_update(
    weights: Sequence[np.ndarray],
    *,
    reference: Sequence[np.ndarray],
    max_norm: float | None = None,
    max_relative_norm: float | None = DEFAULT_MAX_RELATIVE_NORM,
) -> None:
    """Raise :class:`ProtocolError` (see the module docstring for reasons) unless valid.

    ``max_norm`` and ``max_relative_norm`` are independent bounds on the delta's L2 norm;
    ``None`` switches one off. A bound that is not a positive finite number is a
    :class:`ConfigError`.
    """
    _check_limit("max_norm", max_norm)
    _check_limit("max_relative_norm", max_relative_norm)
    _check_structure(weights, reference)
    for index, tensor in enumerate(weights):
        finite = np.isfinite(tensor)
        if not finite.all():
            bad = int(finite.size - np.count_nonzero(finite))
            raise ProtocolError(
                f"tensor {index} holds {bad} NaN or infinite value(s)", reason="not_finite"
            )
    if max_norm is None and max_relative_norm is None:
        return
    norm = _delta_norm(weights, reference)
    if max_norm is not None and norm > max_norm:
        raise ProtocolError(
            f"update delta norm {norm:.6g} exceeds max_norm {max_norm:.6g}",
            reason="norm_too_large",
        )
    if max_relative_norm is not None:
        reference_norm = _norm(reference)
        limit = max_relative_norm * (reference_norm + _REFERENCE_NORM_FLOOR)
        if norm > limit:
            raise ProtocolError(
                f"update delta norm {norm:.6g} exceeds {max_relative_norm:.6g} x the global "
                f"weights' norm {reference_norm:.6g} (limit {limit:.6g})",
                reason="norm_too_large",
            )


def update_norm(weights: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> float:
    """L2 norm of ``weights - reference`` over all tensors at once, computed in float64.

    Raises :class:`ProtocolError` (``wrong_count``, ``wrong_shape``, ``wrong_dtype``) when the
    two do not line up. Non-finite values give ``inf`` or ``nan``, never a warning.
    """
    _check_structure(weights, reference)
    return _delta_norm(weights, reference)


def _check_limit(name: str, value: float | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, not {value!r}", reason="bad_limit")
    if value <= 0:
        raise ConfigError(f"{name} must be positive, not {value!r}", reason="bad_limit")


def _check_structure(weights: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> None:
    if len(weights) != len(reference):
        raise ProtocolError(
            f"update holds {len(weights)} tensor(s), the model has {len(reference)}",
            reason="wrong_count",
        )
    for index, (tensor, expected) in enumerate(zip(weights, reference, strict=True)):
        if not isinstance(tensor, np.ndarray):
            raise ProtocolError(
                f"tensor {index} is a {type(tensor).__name__}, not an array", reason="wrong_dtype"
            )
        expected_shape = np.shape(expected)
        if tensor.shape != expected_shape:
            raise ProtocolError(
                f"tensor {index} has shape {tensor.shape}, the model has {expected_shape}",
                reason="wrong_shape",
            )
        if not np.issubdtype(tensor.dtype, np.floating):
            raise ProtocolError(
                f"tensor {index} has dtype {tensor.dtype}, expected a floating-point dtype",
                reason="wrong_dtype",
            )


def _delta_norm(weights: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> float:
    total = 0.0
    # Squares of huge float64 values overflow to inf, which is the right answer for a bound
    # check; it must not surface as a warning.
    with np.errstate(over="ignore", invalid="ignore"):
        for tensor, expected in zip(weights, reference, strict=True):
            delta = np.subtract(tensor, expected, dtype=np.float64).ravel()
            total += float(np.dot(delta, delta))
    return math.sqrt(total)


def _norm(tensors: Sequence[np.ndarray]) -> float:
    total = 0.0
    with np.errstate(over="ignore", invalid="ignore"):
        for tensor in tensors:
            flat = np.asarray(tensor, dtype=np.float64).ravel()
            total += float(np.dot(flat, flat))
    return math.sqrt(total)
