"""Built-in losses of the lab, by name: batched torch functions ``(B, *event_shape) -> (B,)``.

* ``"linear"``: <c, X> with c ~ N(0, 1) entrywise; on the vertices E[L(X)] depends on theta
  only through the marginals of X.
* ``"quadratic"``: (<c, X> - 1)^2 with the same c; not linear on the vertices (it couples the
  coordinates of X), so its gradient involves the joint law of X, not only its marginals.
"""

from __future__ import annotations

import torch

LOSSES = ("linear", "quadratic")


class NamedLoss:
    """A built-in loss with its coefficients ``c`` (shape ``event_shape``); callable on ``(B, *event_shape)``."""

    def __init__(self, name: str, c: torch.Tensor):
        self.name, self.c = name, c

    def __call__(self, X: torch.Tensor) -> torch.Tensor:
        inner = (X * self.c.to(X)).flatten(1).sum(-1)
        return inner if self.name == "linear" else (inner - 1.0) ** 2

    def __repr__(self):
        return self.name


def make_loss(name: str, P, dtype=torch.float64, device=None, generator: torch.Generator | None = None) -> NamedLoss:
    """The built-in loss ``name`` for polytope ``P``, its coefficients drawn from ``generator``."""
    if name not in LOSSES:
        raise ValueError(f"loss: unknown name {name!r}; expected one of {', '.join(LOSSES)} or a callable")
    c = torch.randn(tuple(P.event_shape), dtype=dtype, device=device, generator=generator)
    return NamedLoss(name, c)
