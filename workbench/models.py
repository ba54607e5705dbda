"""Model zoo for the workbench: a configurable MLP, a small CNN and logistic regression.

Models are small on purpose so runs finish in seconds on a CPU, and the MLP exposes
the knobs teaching scenarios need (very deep sigmoid stacks, tiny init, negative
bias init for dead ReLUs, dropout, normalisation layers).

Construction draws from the global torch RNG and never seeds it: call
``torch.manual_seed(s)`` before :func:`build_model` for a reproducible init.
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any

import torch
from torch import nn

__all__ = ["MODELS", "ACTIVATIONS", "NORMS", "INITS", "MLP", "CNN", "LogReg", "build_model", "describe_models"]

MODELS: tuple[str, ...] = ("mlp", "cnn", "logreg")
"""Names accepted by :func:`build_model`."""

ACTIVATIONS: tuple[str, ...] = ("relu", "leaky_relu", "gelu", "silu", "tanh", "sigmoid")
NORMS: tuple[str, ...] = ("none", "batch", "layer")
INITS: tuple[str, ...] = ("default", "xavier", "kaiming", "small")

_OPTIONS: dict[str, tuple[str, ...]] = {
    "mlp": ("depth", "width", "activation", "dropout", "norm", "bias_init", "init"),
    "cnn": ("channels", "dropout"),
    "logreg": (),
}

_LEAKY_SLOPE = 0.01


# --------------------------------------------------------------------------- validation


def _check_int(name: str, value: Any, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise ValueError(f"{name}: expected an integer, got {value!r}; allowed: integers >= {minimum}")
    if value < minimum:
        raise ValueError(f"{name}: {value!r} is out of range; allowed: integers >= {minimum}")
    return int(value)


def _check_dropout(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not (0.0 <= float(value) < 1.0):
        raise ValueError(f"dropout: {value!r} is not a valid probability; allowed: numbers with 0 <= p < 1")
    return float(value)


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value.lower() not in allowed:
        raise ValueError(f"{name}: unknown value {value!r}; allowed: {', '.join(allowed)}")
    return value.lower()


def _activation(name: str) -> nn.Module:
    if name == "relu":
        return nn.ReLU()
    if name == "leaky_relu":
        return nn.LeakyReLU(_LEAKY_SLOPE)
    if name == "gelu":
        return nn.GELU()
    if name == "silu":
        return nn.SiLU()
    if name == "tanh":
        return nn.Tanh()
    return nn.Sigmoid()


def _init_linear(layer: nn.Linear, init: str, activation: str | None) -> None:
    """Re-initialise one Linear layer; ``activation`` is None for the output layer."""
    if init == "default":
        return
    if init == "xavier":
        nn.init.xavier_uniform_(layer.weight)
    elif init == "kaiming":
        if activation in ("relu", "leaky_relu"):
            nn.init.kaiming_normal_(layer.weight, a=_LEAKY_SLOPE if activation == "leaky_relu" else 0.0,
                                    nonlinearity=activation)
        elif activation in ("gelu", "silu"):
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
        elif activation in ("tanh", "sigmoid"):
            nn.init.kaiming_normal_(layer.weight, nonlinearity=activation)
        else:
            nn.init.kaiming_normal_(layer.weight, nonlinearity="linear")
    else:  # small
        nn.init.normal_(layer.weight, mean=0.0, std=0.01)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


# --------------------------------------------------------------------------- models


class MLP(nn.Module):
    """Fully connected net: ``depth`` hidden blocks of Linear, [norm], activation, [dropout].

    The layers live in ``self.net`` (an ``nn.Sequential``), so parameter names read
    ``net.0.weight``, ``net.0.bias``, ...; the last module is the output Linear.
    Inputs with more than two dimensions are flattened (e.g. images).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        depth: int = 2,
        width: int = 64,
        activation: str = "relu",
        dropout: float = 0.0,
        norm: str | None = None,
        bias_init: float | None = None,
        init: str = "default",
    ) -> None:
        super().__init__()
        norm = "none" if norm is None else norm
        layers: list[nn.Module] = []
        hidden: list[nn.Linear] = []
        size = in_features
        for _ in range(depth):
            linear = nn.Linear(size, width)
            hidden.append(linear)
            layers.append(linear)
            if norm == "batch":
                layers.append(nn.BatchNorm1d(width))
            elif norm == "layer":
                layers.append(nn.LayerNorm(width))
            layers.append(_activation(activation))
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            size = width
        output = nn.Linear(size, out_features)
        layers.append(output)
        self.net = nn.Sequential(*layers)

        for linear in hidden:
            _init_linear(linear, init, activation)
            if bias_init is not None:
                nn.init.constant_(linear.bias, bias_init)
        _init_linear(output, init, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(batch, in_features)`` (or any shape flattening to it) to ``(batch, out)``."""
        return self.net(x.flatten(1))


class CNN(nn.Module):
    """Small conv net for single-channel square images passed in flattened (digits: 64 = 8x8).

    conv3x3(1->c) ReLU, conv3x3(c->2c) ReLU, maxpool 2, flatten, Linear->64, ReLU,
    dropout, Linear->out. The reshape to ``(batch, 1, side, side)`` happens in ``forward``.
    """

    def __init__(self, in_features: int, out_features: int, *, channels: int = 16, dropout: float = 0.0) -> None:
        super().__init__()
        side = math.isqrt(in_features)
        self.side = side
        pooled = side // 2
        self.net = nn.Sequential(
            nn.Conv2d(1, channels, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, 2 * channels, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * channels * pooled * pooled, 64),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(64, out_features),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reshape flattened ``(batch, side*side)`` input to images and classify it."""
        return self.net(x.reshape(x.shape[0], 1, self.side, self.side))


class LogReg(nn.Module):
    """One Linear layer: logistic/softmax regression when trained with cross entropy.

    Stored as ``self.net`` (a one-layer ``nn.Sequential``) so names match the MLP's.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits ``(batch, out_features)``; extra input dims are flattened."""
        return self.net(x.flatten(1))


# --------------------------------------------------------------------------- public API


def build_model(name: str, *, in_features: int, out_features: int, **options: Any) -> nn.Module:
    """Build model ``name`` for the given input/output widths after validating every option.

    ``out_features`` is the number of classes for classification (logits) or 1 for
    regression. Uses the global torch RNG for the initial weights (no seeding here).
    """
    if not isinstance(name, str) or name.lower() not in MODELS:
        raise ValueError(f"model: unknown name {name!r}; allowed: {', '.join(MODELS)}")
    name = name.lower()
    in_features = _check_int("in_features", in_features, minimum=1)
    out_features = _check_int("out_features", out_features, minimum=1)
    allowed = _OPTIONS[name]
    for key in options:
        if key not in allowed:
            listing = ", ".join(allowed) if allowed else "(none)"
            raise ValueError(f"model {name!r}: unknown option {key!r}; allowed: {listing}")

    if name == "mlp":
        norm = options.get("norm")
        norm = "none" if norm is None else _check_choice("norm", norm, NORMS)
        bias_init = options.get("bias_init")
        if bias_init is not None and (
            isinstance(bias_init, bool) or not isinstance(bias_init, Real) or not math.isfinite(float(bias_init))
        ):
            raise ValueError(f"bias_init: expected a finite number or None, got {bias_init!r}")
        return MLP(
            in_features,
            out_features,
            depth=_check_int("depth", options.get("depth", 2), minimum=0),
            width=_check_int("width", options.get("width", 64), minimum=1),
            activation=_check_choice("activation", options.get("activation", "relu"), ACTIVATIONS),
            dropout=_check_dropout(options.get("dropout", 0.0)),
            norm=norm,
            bias_init=None if bias_init is None else float(bias_init),
            init=_check_choice("init", options.get("init", "default"), INITS),
        )
    if name == "cnn":
        side = math.isqrt(in_features)
        if side * side != in_features or side < 2:
            raise ValueError(
                f"in_features: the cnn expects flattened square single-channel images like digits "
                f"(8x8 = 64 features), but got {in_features!r}, which is not a perfect square >= 4; "
                "use model 'mlp' (or 'logreg') for tabular data"
            )
        return CNN(
            in_features,
            out_features,
            channels=_check_int("channels", options.get("channels", 16), minimum=1),
            dropout=_check_dropout(options.get("dropout", 0.0)),
        )
    return LogReg(in_features, out_features)


def describe_models() -> dict[str, str]:
    """One plain-language line per model name, for menus and ``--help`` text."""
    return {
        "mlp": "Multi-layer perceptron: stacked fully connected layers; choose depth, width, activation, "
        "dropout, normalisation and init.",
        "cnn": "Small convolutional net for square grey images such as digits (8x8); learns local patterns.",
        "logreg": "Logistic (softmax) regression: a single linear layer, the simplest baseline.",
    }
