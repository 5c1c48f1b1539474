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
import math
import pickle
from collections.abc import Callable

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
    def from_cvxpy(fn: Callable[[cp.Expression], cp.Expression], name: str | None = None) -> Regularizer:
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

    @staticmethod
    def separable(
        phi: Callable[[torch.Tensor], torch.Tensor],
        domain: tuple = (-math.inf, math.inf),
        name: str | None = None,
        dphi: Callable | None = None,
        d2phi: Callable | None = None,
        inverse_dphi: Callable | None = None,
        cvxpy: Callable | None = None,
    ) -> SeparableRegularizer:
        """A separable regularizer f(x) = sum_i phi(x_i), phi strictly convex on ``domain``.

        ``phi`` maps a float64 tensor to a tensor of the same shape, elementwise, in torch
        operations; ``domain = (lo, hi)`` (either may be infinite; an end may be where phi' is
        infinite, as 0 is for x log x).  phi' and phi'' come from autograd unless ``dphi`` and
        ``d2phi`` are given; the inverse of phi' (the mirror map) is computed in batch by a
        safeguarded Newton/bisection unless ``inverse_dphi`` is given.  ``cvxpy``, optional, is
        the same f as a CVXPY expression of the variable (``lambda x: ...``, convex, implying the
        domain); with it the cvxpylayers path serves f too and ``sstcvx.compare`` checks one
        path against the other.

        Served by: the specialized solvers of the families that register one for every separable
        regularizer (``register_relaxation(Family, "separable")``: the hypercube, the simplex and
        k-subsets in ``polytopes``), and by the cvxpylayers path elsewhere when ``cvxpy`` is given.

        Checks when built (on a grid of about 200 points of the domain): phi, phi', phi'' finite,
        phi elementwise, phi'' > 0 (strict convexity; the error names the first point where it
        fails), and ``dphi``, ``d2phi``, ``inverse_dphi`` consistent with phi.  Copies and pickling
        as for :meth:`from_cvxpy`: ``copy.deepcopy`` always works, ``pickle`` needs every function
        given to be defined with ``def`` at the top level of a module.
        """
        return SeparableRegularizer(phi, domain, name, dphi, d2phi, inverse_dphi, cvxpy)


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
        except Exception as error:
            raise pickle.PicklingError(
                f"regularizer {self.name!r} cannot be pickled: its function {self.fn!r} cannot "
                f"({type(error).__name__}: {error}). Define the function with def at the top level "
                "of a module (not a lambda or a nested function) to pickle it, torch.save it or "
                "send it to worker processes; copy.deepcopy works either way"
            ) from None
        return dict(self.__dict__)


def _check_picklable(name: str, functions: dict):
    """Raise a pickle.PicklingError naming the first of ``functions`` that cannot be pickled."""
    for role, fn in functions.items():
        if fn is None:
            continue
        try:
            pickle.dumps(fn)
        except Exception as error:
            raise pickle.PicklingError(
                f"regularizer {name!r} cannot be pickled: its {role} {fn!r} cannot "
                f"({type(error).__name__}: {error}). Define the function with def at the top level "
                "of a module (not a lambda or a nested function) to pickle it, torch.save it or "
                "send it to worker processes; copy.deepcopy works either way"
            ) from None


#: Points of the construction check on each side of a bounded domain (and per decade on an unbounded one).
_PROBES = 97


def _probe_grid(lo: float, hi: float) -> torch.Tensor:
    """About 200 float64 points strictly inside (lo, hi): uniform, plus points close to finite ends."""
    t = torch.linspace(0.0, 1.0, _PROBES + 2, dtype=torch.float64)[1:-1]
    close = torch.logspace(-8, -1, 15, dtype=torch.float64)
    if math.isfinite(lo) and math.isfinite(hi):
        width = hi - lo
        points = [lo + width * t, lo + width * close, hi - width * close]
    elif math.isfinite(lo):
        far = torch.logspace(-8, 4, 2 * _PROBES, dtype=torch.float64)
        points = [lo + far * max(1.0, abs(lo))]
    elif math.isfinite(hi):
        far = torch.logspace(-8, 4, 2 * _PROBES, dtype=torch.float64)
        points = [hi - far * max(1.0, abs(hi))]
    else:
        far = torch.logspace(-4, 4, _PROBES, dtype=torch.float64)
        points = [-far, torch.zeros(1, dtype=torch.float64), far]
    grid = torch.cat(points).unique()
    return grid[(grid > lo) & (grid < hi)]


class SeparableRegularizer(Regularizer):
    """f(x) = sum_i phi(x_i) with phi strictly convex on an interval; see :meth:`Regularizer.separable`.

    Besides the Regularizer interface it gives the pieces that batched solvers need:
    :meth:`derivatives` (phi', phi'' elementwise), :meth:`mirror` (x(v) = argmax_{a <= x <= b}
    v x - phi(x), its derivative and the clamped mask) and :meth:`conjugate` (v x - phi(x) at it).
    """

    bounded_jacobian = False

    def __init__(
        self, phi, domain=(-math.inf, math.inf), name=None, dphi=None, d2phi=None, inverse_dphi=None, cvxpy=None
    ):
        for role, fn in (
            ("phi", phi),
            ("dphi", dphi),
            ("d2phi", d2phi),
            ("inverse_dphi", inverse_dphi),
            ("cvxpy", cvxpy),
        ):
            if fn is not None and not callable(fn):
                raise TypeError(f"{role}: expected a callable, got {type(fn).__name__}")
        if phi is None:
            raise TypeError("phi: expected a callable tensor -> tensor (elementwise), got None")
        self.name = name if name is not None else f"separable_regularizer_{next(_user_counter)}"
        if not isinstance(self.name, str) or not self.name:
            raise TypeError(f"name: expected a non-empty string, got {name!r}")
        try:
            lo, hi = (float(v) for v in domain)
        except (TypeError, ValueError):
            raise TypeError(f"domain: expected a pair of numbers (lo, hi), got {domain!r}") from None
        if math.isnan(lo) or math.isnan(hi) or not lo < hi:
            raise ValueError(f"domain: expected lo < hi (either may be infinite), got ({lo}, {hi})")
        self.domain = (lo, hi)
        self.phi, self.dphi, self.d2phi, self.inverse_dphi = phi, dphi, d2phi, inverse_dphi
        self.cvxpy_fn = cvxpy
        self.has_cvxpy_form = cvxpy is not None
        self._check()

    # -- derivatives ----------------------------------------------------------------------------
    def derivatives(self, x: torch.Tensor):
        """(phi'(x), phi''(x)) elementwise, same shape as x: the user's functions, or autograd."""
        if self.dphi is not None and self.d2phi is not None:
            return self.dphi(x), self.d2phi(x)
        with torch.enable_grad():
            t = x.detach().requires_grad_(True)
            # phi is elementwise: seeding each backward with ones gives the same derivatives as
            # backpropagating a sum, without the sum and its backward node (two of some 15 operations)
            ones = torch.ones_like(x)
            if self.dphi is not None:
                g = self.dphi(t)
            else:
                (g,) = torch.autograd.grad(self.phi(t), t, ones, create_graph=self.d2phi is None)
            if self.d2phi is not None:
                h = self.d2phi(x)
            elif g.requires_grad:
                (h,) = torch.autograd.grad(g, t, ones)
            else:  # phi' does not depend on x: phi is affine (rejected by the construction check)
                h = torch.zeros_like(x)
        return g.detach(), h.detach()

    def mirror(self, v: torch.Tensor, lower=None, upper=None, x0=None):
        """x = argmax_{a <= x <= b} v x - phi(x) elementwise, D = dx/dv = 1 / phi''(x) (0 where clamped),
        and the clamped mask, for ``v (..., n)`` (float64 recommended) and a = max(lo, lower),
        b = min(hi, upper) (``lower``, ``upper`` tensors broadcastable to v, or None).
        See :func:`sstcvx.separable.mirror_map` for the algorithm."""
        from .separable import mirror_map

        a = v.new_tensor(self.domain[0]) if lower is None else torch.clamp(lower.to(v), min=self.domain[0])
        b = v.new_tensor(self.domain[1]) if upper is None else torch.clamp(upper.to(v), max=self.domain[1])
        return mirror_map(self, v, a, b, x0=x0)

    def conjugate(self, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """sum over the last dim of v x - phi(x), at the maximizer x from :meth:`mirror`."""
        return (v * x - self.phi(x)).sum(-1)

    # -- Regularizer interface --------------------------------------------------------------------
    def cvxpy(self, x):
        if self.cvxpy_fn is None:
            raise NotImplementedError(
                f"regularizer {self.name!r} has no CVXPY form: pass cvxpy=lambda x: ... to "
                "Regularizer.separable for the cvxpylayers path (and sstcvx.compare)"
            )
        return CvxpyRegularizer(self.cvxpy_fn, self.name).cvxpy(x)

    def value(self, x, event_dim):
        return _sum_events(self.phi(x), event_dim)

    def __repr__(self):
        return f"Regularizer.separable({self.name!r}, domain={self.domain})"

    # -- construction checks ----------------------------------------------------------------------
    def _check(self):
        lo, hi = self.domain
        grid = _probe_grid(lo, hi)
        where = f"on its domain [{lo:g}, {hi:g}]"
        try:
            values = self.phi(grid)
        except Exception as error:
            raise TypeError(
                f"regularizer {self.name!r}: phi failed on a float64 tensor of shape {tuple(grid.shape)} "
                f"({type(error).__name__}: {error}); phi must be an elementwise torch function"
            ) from error
        if not isinstance(values, torch.Tensor) or values.shape != grid.shape:
            raise ValueError(
                f"regularizer {self.name!r}: phi must return a tensor of its input's shape (elementwise), "
                f"got {type(values).__name__} {tuple(getattr(values, 'shape', ()))} for input {tuple(grid.shape)}"
            )
        # elementwise: phi of part of the grid, as a 2-d tensor, is that part of phi(grid)
        part = grid[: 2 * (grid.numel() // 4)].reshape(2, -1)
        if not torch.allclose(
            self.phi(part), values[: part.numel()].reshape(2, -1), rtol=1e-12, atol=1e-300, equal_nan=True
        ):
            raise ValueError(f"regularizer {self.name!r}: phi is not elementwise (phi(x)[i] depends on other entries)")
        g, h = self.derivatives(grid)
        for label, t in (("phi", values), ("phi'", g), ("phi''", h)):
            bad = ~torch.isfinite(t)
            if bool(bad.any()):
                i = int(bad.nonzero()[0])
                raise ValueError(
                    f"regularizer {self.name!r}: {label}(x) = {float(t[i])} is not finite at x = {float(grid[i]):.6g} "
                    f"{where} (phi and its first two derivatives must be finite inside the domain)"
                )
        bad = h <= 0
        if bool(bad.any()):
            points = ", ".join(f"{float(x):.4g}" for x in grid[bad][:5])
            raise ValueError(
                f"regularizer {self.name!r}: phi is not strictly convex {where}: phi''(x) <= 0 at "
                f"{int(bad.sum())} of {grid.numel()} probe points (x = {points}{', ...' if int(bad.sum()) > 5 else ''})"
            )
        if self.dphi is not None or self.d2phi is not None:
            auto = SeparableRegularizer.__new__(SeparableRegularizer)
            auto.phi, auto.dphi, auto.d2phi = self.phi, None, None
            ga, ha = auto.derivatives(grid)
            for label, given, ref in (("dphi", g, ga), ("d2phi", h, ha)):
                if (label == "dphi" and self.dphi is None) or (label == "d2phi" and self.d2phi is None):
                    continue
                wrong = (given - ref).abs() > 1e-6 * ref.abs().clamp_min(1.0)
                if bool(wrong.any()):
                    i = int(wrong.nonzero()[0])
                    raise ValueError(
                        f"regularizer {self.name!r}: {label}(x) = {float(given[i]):.6g} disagrees with phi's "
                        f"autograd derivative {float(ref[i]):.6g} at x = {float(grid[i]):.6g}"
                    )
        if self.inverse_dphi is not None:
            back = self.inverse_dphi(g)
            wrong = ~((back - grid).abs() <= 1e-6 * grid.abs().clamp_min(1.0))
            if bool(wrong.any()):
                i = int(wrong.nonzero()[0])
                raise ValueError(
                    f"regularizer {self.name!r}: inverse_dphi(phi'(x)) = {float(back[i]):.6g} is not "
                    f"x = {float(grid[i]):.6g}"
                )

    # -- copies -----------------------------------------------------------------------------------
    _FUNCTIONS = ("phi", "dphi", "d2phi", "inverse_dphi", "cvxpy_fn")

    def __deepcopy__(self, memo):
        # functions are shared by the copies (as copy.deepcopy does for functions itself); spelled
        # out so that deepcopy never goes through pickling's __getstate__
        clone = object.__new__(type(self))
        memo[id(self)] = clone
        rest = {k: v for k, v in self.__dict__.items() if k not in self._FUNCTIONS}
        clone.__dict__.update(copy.deepcopy(rest, memo))
        for key in self._FUNCTIONS:
            clone.__dict__[key] = self.__dict__[key]
        return clone

    def __getstate__(self):
        _check_picklable(self.name, {k: self.__dict__[k] for k in self._FUNCTIONS})
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
    raise TypeError(f"regularizer: expected a name or a Regularizer, got {type(regularizer).__name__}")
