"""Strongly convex regularizers f of the relaxed program argmax_{x in P} <U, x> - tau f(x).

Each regularizer has a name (the key of the specialized-solver registry), a CVXPY
form for the generic path (``cvxpy(x)``, convex in ``x``) and a torch value
(``value(x)``, summed over the event dimensions) for reporting.  The
exponential-family entropy A*(x) has no CVXPY form: it is computed from the
structure of P (specialized solvers) or from its explicit vertex list.
"""

from __future__ import annotations

import copy
import itertools
import pickle
from typing import Callable

import cvxpy as cp
import torch


class Regularizer:
    """A convex regularizer f, known by ``name``.

    Subclasses implement ``cvxpy(x)`` (a convex CVXPY expression, or raise
    ``NotImplementedError`` when f has no CVXPY form) and optionally
    ``value(x)`` (a torch tensor of shape ``x.shape[:-event_dim]``).
    """

    name: str = "regularizer"
    has_cvxpy_form: bool = True
    #: True when f'' >= 1 / max(1, x) entrywise, so that the Jacobian of X_tau with respect
    #: to Z = U / tau has spectral norm at most max(1, max |X_tau|); the generic path uses
    #: it to catch a wrong derivative from the conic solver.
    bounded_jacobian: bool = False

    def cvxpy(self, x: cp.Expression) -> cp.Expression:
        raise NotImplementedError

    def value(self, x: torch.Tensor, event_dim: int) -> torch.Tensor:
        raise NotImplementedError(f"regularizer {self.name!r} has no torch value")

    def __repr__(self):
        return f"Regularizer({self.name!r})"

    @staticmethod
    def from_cvxpy(fn: Callable[[cp.Expression], cp.Expression], name: str | None = None) -> "Regularizer":
        """A user regularizer f(x) = fn(x), a strongly convex CVXPY expression of the variable.

        ``fn`` receives the polytope's ``cp.Variable`` and must return a scalar
        convex expression; convexity is checked when the generic problem is
        built, strong convexity (needed for a unique, differentiable X_tau) is
        the user's promise.  Only the generic path serves it unless a
        specialized solver is registered under ``name``.  The expression must hold no
        ``cp.Parameter`` (use constants; build one regularizer per value).

        Copies: ``copy.deepcopy`` always works (``fn`` is shared, like any function);
        ``pickle`` (``torch.save``, spawned data-loader workers, multiprocessing) needs
        ``fn`` to be picklable, i.e. a function defined at the top level of a module,
        not a lambda or a nested function; otherwise it raises a ``pickle.PicklingError``
        that says so.
        """
        if not callable(fn):
            raise TypeError(f"fn: expected a callable x -> cvxpy expression, got {type(fn).__name__}")
        return CvxpyRegularizer(fn, name)


def _sum_events(t: torch.Tensor, event_dim: int) -> torch.Tensor:
    return t.flatten(t.dim() - event_dim).sum(-1) if event_dim else t


def _xlogx(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 0, x * torch.log(x.clamp_min(torch.finfo(x.dtype).tiny)), torch.zeros_like(x))


class Entropy(Regularizer):
    """Negative Shannon entropy f(x) = sum_i x_i log x_i (implies x >= 0)."""

    name = "entropy"
    bounded_jacobian = True

    def cvxpy(self, x):
        return -cp.sum(cp.entr(x))

    def value(self, x, event_dim):
        return _sum_events(_xlogx(x), event_dim)


class BinaryEntropy(Regularizer):
    """f(x) = sum_i x_i log x_i + (1 - x_i) log(1 - x_i) (implies 0 <= x <= 1)."""

    name = "binary_entropy"
    bounded_jacobian = True

    def cvxpy(self, x):
        return -cp.sum(cp.entr(x) + cp.entr(1 - x))

    def value(self, x, event_dim):
        return _sum_events(_xlogx(x) + _xlogx(1 - x), event_dim)


class Euclidean(Regularizer):
    """f(x) = 1/2 ||x||^2: X_tau is the Euclidean projection of U / tau onto P."""

    name = "euclidean"
    bounded_jacobian = True

    def cvxpy(self, x):
        return 0.5 * cp.sum_squares(x)

    def value(self, x, event_dim):
        return _sum_events(0.5 * x * x, event_dim)


class ExpFamilyEntropy(Regularizer):
    """f = A*, the conjugate of A(theta) = log sum_{y in X} exp<theta, y>.

    X_tau = grad A(U / tau): the marginals of the Gibbs distribution with natural
    parameter U / tau.  No CVXPY form exists; solvers use the polytope's
    structure or its vertex list.
    """

    name = "exp_family_entropy"
    has_cvxpy_form = False

    def cvxpy(self, x):
        raise NotImplementedError(
            "regularizer 'exp_family_entropy' has no CVXPY form: X_tau is the gradient of "
            "log sum_y exp<U/tau, y>, which needs the polytope's structure (a specialized "
            "solver) or its vertices (declare it with Polytope.from_vertices)"
        )


_user_counter = itertools.count()


class CvxpyRegularizer(Regularizer):
    """A user-supplied convex CVXPY expression; see :meth:`Regularizer.from_cvxpy`."""

    def __init__(self, fn, name=None):
        self.fn = fn
        self.name = name if name is not None else f"user_regularizer_{next(_user_counter)}"
        if not isinstance(self.name, str) or not self.name:
            raise TypeError(f"name: expected a non-empty string, got {name!r}")

    def cvxpy(self, x):
        expr = self.fn(x)
        if not isinstance(expr, cp.Expression):
            raise TypeError(
                f"regularizer {self.name!r}: fn(x) must return a cvxpy Expression, got {type(expr).__name__}"
            )
        if expr.size != 1:
            raise ValueError(f"regularizer {self.name!r}: fn(x) must be a scalar, got shape {expr.shape}")
        if not expr.is_convex():
            raise ValueError(
                f"regularizer {self.name!r}: fn(x) = {expr} is not convex under CVXPY's DCP rules; "
                "the relaxed program needs a (strongly) convex f"
            )
        if expr.parameters():
            names = ", ".join(sorted({p.name() for p in expr.parameters()}))
            raise ValueError(
                f"regularizer {self.name!r}: fn(x) holds cvxpy Parameters ({names}); the generic "
                "layer's only parameter is the utility, and a regularizer is fixed once built. Put "
                "the values in as constants (numpy arrays or numbers) instead, and build one "
                "regularizer (with its own name) per value"
            )
        return expr

    def __deepcopy__(self, memo):
        # A function is immutable and shared by its copies (as copy.deepcopy does for functions
        # itself); spelled out so that deepcopy never goes through pickling's __getstate__.
        clone = object.__new__(type(self))
        memo[id(self)] = clone
        clone.__dict__.update(copy.deepcopy({k: v for k, v in self.__dict__.items() if k != "fn"}, memo))
        clone.fn = self.fn
        return clone

    def __getstate__(self):
        try:
            pickle.dumps(self.fn)
        except Exception as error:  # noqa: BLE001  pickle raises several types here
            raise pickle.PicklingError(
                f"regularizer {self.name!r} cannot be pickled: its function {self.fn!r} cannot "
                f"({type(error).__name__}: {error}). Define the function with def at the top level "
                "of a module (not a lambda or a nested function) to pickle it, torch.save it or "
                "send it to worker processes; copy.deepcopy works either way"
            ) from None
        return dict(self.__dict__)


BUILTIN = {r.name: r for r in (Entropy(), BinaryEntropy(), Euclidean(), ExpFamilyEntropy())}


def get_regularizer(regularizer) -> Regularizer:
    """Resolve a regularizer given by name or as a :class:`Regularizer` object."""
    if isinstance(regularizer, Regularizer):
        return regularizer
    if isinstance(regularizer, str):
        try:
            return BUILTIN[regularizer]
        except KeyError:
            raise ValueError(
                f"regularizer: unknown name {regularizer!r}; expected one of {sorted(BUILTIN)} "
                "or a Regularizer (e.g. Regularizer.from_cvxpy(lambda x: ...))"
            ) from None
    raise TypeError(
        f"regularizer: expected a name or a Regularizer, got {type(regularizer).__name__}"
    )
