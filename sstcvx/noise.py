"""Noise laws for the random utility U = theta + eps.

Each law samples i.i.d. noise of a given shape, dtype and device from an
optional ``torch.Generator`` (whose device must match), and gives its
log-density for KL terms.
"""

from __future__ import annotations

import math

import torch


class Noise:
    """An i.i.d. noise law with location 0 and a ``scale``."""

    name = "noise"

    def __init__(self, scale: float = 1.0):
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale: expected a positive finite number, got {scale!r}")
        self.scale = float(scale)

    def sample(self, shape, dtype=torch.float32, device=None, generator=None) -> torch.Tensor:
        return self.scale * self._standard(torch.Size(shape), dtype, device, generator)

    def _standard(self, shape, dtype, device, generator):
        raise NotImplementedError

    def log_prob(self, eps: torch.Tensor) -> torch.Tensor:
        """Elementwise log-density of the noise at ``eps``."""
        raise NotImplementedError

    def __repr__(self):
        return f"{type(self).__name__}(scale={self.scale})"


def _open_uniform(shape, dtype, device, generator):
    u = torch.rand(shape, dtype=dtype, device=device, generator=generator)
    finfo = torch.finfo(dtype)
    return u.clamp(finfo.tiny, 1.0 - finfo.eps)


class Gumbel(Noise):
    """Standard Gumbel(0, scale): -scale * log(-log V), V ~ Uniform(0, 1)."""

    name = "gumbel"

    def _standard(self, shape, dtype, device, generator):
        return -torch.log(-torch.log(_open_uniform(shape, dtype, device, generator)))

    def log_prob(self, eps):
        z = eps / self.scale
        return -z - torch.exp(-z) - math.log(self.scale)


class Gaussian(Noise):
    """Normal(0, scale^2)."""

    name = "gaussian"

    def _standard(self, shape, dtype, device, generator):
        return torch.randn(shape, dtype=dtype, device=device, generator=generator)

    def log_prob(self, eps):
        z = eps / self.scale
        return -0.5 * z * z - math.log(self.scale) - 0.5 * math.log(2 * math.pi)


class Logistic(Noise):
    """Logistic(0, scale): log V - log(1 - V)."""

    name = "logistic"

    def _standard(self, shape, dtype, device, generator):
        v = _open_uniform(shape, dtype, device, generator)
        return torch.log(v) - torch.log1p(-v)

    def log_prob(self, eps):
        z = eps / self.scale
        return -z - 2 * torch.nn.functional.softplus(-z) - math.log(self.scale)


class Exponential(Noise):
    """Exponential with mean ``scale``: -scale * log V."""

    name = "exponential"

    def _standard(self, shape, dtype, device, generator):
        return -torch.log(_open_uniform(shape, dtype, device, generator))

    def log_prob(self, eps):
        z = eps / self.scale
        return torch.where(z >= 0, -z - math.log(self.scale), torch.full_like(z, -math.inf))


BUILTIN = {cls.name: cls for cls in (Gumbel, Gaussian, Logistic, Exponential)}


def get_noise(noise) -> Noise:
    """Resolve a noise law given by name or as a :class:`Noise` object."""
    if isinstance(noise, Noise):
        return noise
    if isinstance(noise, str):
        try:
            return BUILTIN[noise]()
        except KeyError:
            raise ValueError(
                f"noise: unknown name {noise!r}; expected one of {sorted(BUILTIN)} or a Noise object"
            ) from None
    raise TypeError(f"noise: expected a name or a Noise object, got {type(noise).__name__}")
