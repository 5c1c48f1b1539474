"""Batched mirror maps of separable regularizers f(x) = sum_i phi(x_i), and the solvers built on them.

For a convex phi on an interval and bounds ``a <= x <= b`` (the domain of phi intersected with
a box), the *mirror map* of one coordinate is

    x(v) = argmax_{a <= x <= b} v x - phi(x) = clamp((phi')^{-1}(v), a, b),

with derivative ``dx/dv = 1 / phi''(x)`` where ``a < x < b`` and 0 where x is clamped.  This
module computes it for a whole batch (:func:`mirror_map`) and builds two exact, differentiable
solvers, used by the families whose relaxed program reduces to one scalar root per element (on
a bounded interval both start from a cached table of the inverse of phi' and finish by Newton
steps that evaluate phi', phi'' once each, see :class:`_IntervalInfo` and :func:`_joint_sum`):

* :func:`box_relaxation`: ``argmax_{x in [lower, upper]^n} <z, x> - f(x)`` = the mirror map of
  each coordinate (the hypercube);
* :func:`sum_relaxation`: ``argmax { <z, x> - f(x) : lower <= x <= upper, sum x = total }``
  = ``x_i(z_i - nu)`` with the scalar nu solving ``sum_i x_i(z_i - nu) = total`` (the simplex,
  k-subsets).  Backward by the implicit function theorem: with ``D = dx/dv`` at the solution,
  ``dX/dz = diag(D) - D D^T / sum(D)``.

Everything runs in float64 on the input's device; the result is cast back to the input's dtype.  On CPU
tensors the table part of the joint iteration of a sum runs compiled (:mod:`sstcvx._compiled_separable`).
"""

from __future__ import annotations

import math
import weakref

import torch

from . import _compiled as compiled
from .errors import SolverError

#: Newton/bisection steps allowed for one inverse of phi' and for the scalar root of a sum.
MAX_ITER = 200
#: Doublings (of the exponent) allowed to find a bracket on an unbounded side of the domain.
MAX_EXPAND = 64
#: A safeguarded iteration bisects at least every FORCE steps unless its bracket halved meanwhile.
FORCE = 8
#: The inverse of phi' stops at |phi'(x) - v| <= INNER_TOLERANCE max(1, |v|) (or at the resolution of x).
INNER_TOLERANCE = 16 * 2.0**-52
#: The root of a sum takes a Newton step only after one that divided the residual by 1 / SUM_PROGRESS:
#: slower (linear) convergence, as at a root where every free coordinate leaves its interval, bisects.
SUM_PROGRESS = 0.2
#: Joint Newton steps on (x, nu) allowed before the rows still unconverged go to the nested solver.
JOINT_ITER = 12
#: Nodes of the tabulated inverse of phi' that starts the joint iteration, and the reach of its
#: stretched coordinate towards a barrier (x - a down to e^-REACH times the width).
TABLE_SIZE = 1024
TABLE_REACH = 30.0
#: A table is exact to rounding when its error at the midpoints of its segments is at most EXACT_TABLE eps;
#: towards a barrier, a table of 1024 nodes that is not gets a fine one of FINE_SIZE nodes for its last step.
EXACT_TABLE = 64
FINE_SIZE = 32768
#: Newton/bisection steps on nu allowed on the tabulated surrogate (a start: the joint steps refine it).
SURROGATE_ITER = 10
#: The root of the table's sum looks for a multiple root (steps shrinking by a constant ratio) from this
#: step on: earlier, steps approaching from afar shrink alike.
MULTIPLICITY_AFTER = 3
#: After this many joint steps, every other step keeps nu (see :func:`_joint_sum`).
SLOW_AFTER = 6


def _inside_point(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A point strictly inside each interval (a, b) (either side may be infinite)."""
    fa, fb = torch.isfinite(a), torch.isfinite(b)
    zero = torch.zeros_like(a)
    mid = torch.where(fa & fb, 0.5 * (torch.where(fa, a, zero) + torch.where(fb, b, zero)), zero)
    mid = torch.where(fa & ~fb, torch.where(fa, a, zero) + 1.0 + torch.where(fa, a, zero).abs(), mid)
    mid = torch.where(~fa & fb, torch.where(fb, b, zero) - 1.0 - torch.where(fb, b, zero).abs(), mid)
    return mid


def endpoint_slopes(reg, a: torch.Tensor, b: torch.Tensor):
    """phi'(a+) and phi'(b-), with -inf / +inf where an end is infinite or phi' blows up there.

    The one-sided limits are taken at a + delta and b - delta, delta = max(4 eps |end|, 1e-300):
    a user's phi written safely for the end itself (x log x as ``where(x > 0, ..., 0)``) gives
    autograd derivatives there that are not the limit.  A v between phi'(a) and phi'(a + delta)
    is clamped to a, an error of at most delta in x.
    """
    inside = _inside_point(a, b)
    fa, fb = torch.isfinite(a), torch.isfinite(b)
    eps = torch.finfo(a.dtype).eps
    delta_a = torch.clamp(4 * eps * a.abs(), min=1e-300)
    delta_b = torch.clamp(4 * eps * b.abs(), min=1e-300)
    ga, _ = reg.derivatives(torch.where(fa, a + delta_a, inside))
    gb, _ = reg.derivatives(torch.where(fb, b - delta_b, inside))
    ga = torch.where(fa & torch.isfinite(ga), ga, torch.full_like(ga, -math.inf))
    gb = torch.where(fb & torch.isfinite(gb), gb, torch.full_like(gb, math.inf))
    return ga, gb


def barrier_ends(reg, a: torch.Tensor, b: torch.Tensor):
    """Whether phi' is infinite at each finite end (a barrier, as log x at 0) rather than finite.

    Decided from phi' at distances delta, 1e-6 w and 1e-3 w from the end (w = min(1, b - a)): a
    barrier changes more over the first stretch (many decades) than over the second, a finite
    slope less.  Scale-invariant in phi.
    """
    fa, fb = torch.isfinite(a), torch.isfinite(b)
    width = torch.where(fa & fb, (b - a).clamp(max=1.0), torch.ones_like(a))
    delta_a, delta_b = _deltas(a, b)
    inside = _inside_point(a, b)
    a0, b0 = torch.where(fa, a, inside), torch.where(fb, b, inside)
    points = torch.stack(
        [a0 + delta_a, a0 + 1e-6 * width, a0 + 1e-3 * width, b0 - delta_b, b0 - 1e-6 * width, b0 - 1e-3 * width]
    )
    g, _ = reg.derivatives(points)
    g = torch.where(torch.isfinite(g), g, torch.full_like(g, math.inf))
    near_a, far_a = (g[0] - g[1]).abs(), (g[1] - g[2]).abs()
    near_b, far_b = (g[3] - g[4]).abs(), (g[4] - g[5]).abs()
    return fa & ~(near_a <= far_a), fb & ~(near_b <= far_b)


class _Coordinates:
    """x = map(s): a monotone bijection from the real line onto the open interval (a, b).

    (a, b) both finite: x = a + (b - a) sigmoid(s); only a: x = a + exp(s); only b:
    x = b - exp(-s); neither: x = s.  In s, phi' of the usual barriers is nearly linear
    (exactly so for x log x on [0, inf) and the binary entropy on [0, 1]), Newton steps never
    leave the domain, and bisection halves the logarithm of the distance to a finite end.
    """

    def __init__(self, a, b, log_a=None, log_b=None):
        # the map stretches logarithmically only towards an end where phi' is infinite (a barrier,
        # log_a / log_b); towards an end where phi' is finite, phi' is smooth in x itself
        self.a, self.b = a, b
        self.finite_a, self.finite_b = torch.isfinite(a), torch.isfinite(b)
        self.fa = self.finite_a if log_a is None else self.finite_a & log_a
        self.fb = self.finite_b if log_b is None else self.finite_b & log_b
        zero = torch.zeros_like(a)
        self.a0, self.b0 = torch.where(self.finite_a, a, zero), torch.where(self.finite_b, b, zero)
        self.width = torch.where(self.fa & self.fb, self.b0 - self.a0, torch.ones_like(a))
        # the common case, every interval a pair of barriers: one expression instead of four
        self.bounded = bool((self.fa & self.fb).all())

    def x(self, s):
        both = self.a0 + self.width * torch.sigmoid(s)
        if self.bounded:
            return both
        lower = self.a0 + torch.exp(s)
        upper = self.b0 - torch.exp(-s)
        return torch.where(self.fa, torch.where(self.fb, both, lower), torch.where(self.fb, upper, s))

    def dx(self, s):
        both = self.width * torch.sigmoid(s) * torch.sigmoid(-s)
        if self.bounded:
            return both
        return torch.where(self.fa, torch.where(self.fb, both, torch.exp(s)), torch.where(self.fb, torch.exp(-s), 1.0))

    def s(self, x, delta_a, delta_b):
        """The inverse map, with x moved at least delta inside each finite end."""
        x = torch.where(self.finite_a, torch.maximum(x, self.a0 + delta_a), x)
        x = torch.where(self.finite_b, torch.minimum(x, self.b0 - delta_b), x)
        both = torch.log(x - self.a0) - torch.log(self.b0 - x)
        if self.bounded:
            return both
        lower = torch.log(x - self.a0)
        upper = -torch.log(self.b0 - x)
        return torch.where(self.fa, torch.where(self.fb, both, lower), torch.where(self.fb, upper, x))


def _deltas(a, b):
    eps = torch.finfo(a.dtype).eps
    return torch.clamp(4 * eps * a.abs(), min=1e-300), torch.clamp(4 * eps * b.abs(), min=1e-300)


def mirror_map(
    reg,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    x0: torch.Tensor | None = None,
    slopes=None,
    max_iter: int = MAX_ITER,
    barriers=None,
):
    """x = argmax_{a <= x <= b} v x - phi(x) elementwise, D = dx/dv (0 where clamped), and the clamped mask.

    ``v (..., n)`` float64; ``a, b`` broadcastable to v (a < b, either may be infinite), inside
    phi's domain; ``x0`` an optional warm start; ``slopes`` the pair phi'(a+), phi'(b-) from
    :func:`endpoint_slopes` (computed when not given).  Where v <= phi'(a+) the maximizer is a,
    where v >= phi'(b-) it is b.  Elsewhere it is the root of phi'(x) = v, from
    ``reg.inverse_dphi`` when the regularizer has one, otherwise by a safeguarded Newton
    iteration in the coordinate s of :class:`_Coordinates` (x = a + (b - a) sigmoid(s) on a
    bounded interval, x = a + exp(s) on a half-line): the bracket [s_l, s_u] always holds the
    root (it starts a few ulps inside the finite ends; an infinite side is closed first by
    steps that double), and a Newton step that leaves it or moves more than half the step
    before the last (as in Numerical Recipes' rtsafe) is replaced by the bracket's midpoint.
    Stops when |phi'(x) - v| <= 16 eps max(1, |v|), phi'' times the spacing of floats at x, or the bracket is a few ulps wide.  Cost: one
    evaluation of phi' and phi'' per step: one step for x log x and the binary entropy (linear
    in s), typically 3-8 otherwise.
    """
    a, b = torch.broadcast_to(a, v.shape), torch.broadcast_to(b, v.shape)
    ga, gb = endpoint_slopes(reg, a, b) if slopes is None else (torch.broadcast_to(s, v.shape) for s in slopes)
    low, high = v <= ga, v >= gb
    if reg.inverse_dphi is not None:
        x = torch.minimum(torch.maximum(reg.inverse_dphi(v), a), b)
        h = None
    else:
        if barriers is None:
            barriers = barrier_ends(reg, a, b)
        x, h = _newton_inverse(
            reg, v, a, b, low | high, x0, max_iter, *(torch.broadcast_to(t, v.shape) for t in barriers)
        )
    x = torch.where(low, a, torch.where(high, b, x))
    # a root that rounds onto an end of the interval is clamped there too
    clamped = low | high | (x <= a) | (x >= b)
    if h is None:
        _, h = reg.derivatives(torch.where(clamped, _inside_point(a, b), x))
    D = torch.where(clamped, torch.zeros_like(v), 1.0 / h)
    return x, D, clamped


def _newton_inverse(reg, v, a, b, skip, x0, max_iter, barrier_a=None, barrier_b=None):
    eps = torch.finfo(v.dtype).eps
    todo = ~skip
    coords = _Coordinates(a, b, barrier_a, barrier_b)
    delta_a, delta_b = _deltas(a, b)
    inf = torch.full_like(v, math.inf)
    # the root lies beyond a + delta_a and before b - delta_b (v is strictly between the end slopes)
    sl = torch.where(coords.finite_a, coords.s(coords.a0 + delta_a, delta_a, delta_b), -inf)
    su = torch.where(coords.finite_b, coords.s(coords.b0 - delta_b, delta_a, delta_b), inf)
    s = torch.zeros_like(v)
    if x0 is not None:  # a warm start, except where it sits at an end (a clamped coordinate)
        s = torch.where((x0 > a) & (x0 < b), coords.s(x0, delta_a, delta_b), s)
    s = torch.where((s > sl) & (s < su), s, torch.zeros_like(s).clamp(sl, su))
    # close infinite sides by steps that double (in s: a distance that squares on a half-line)
    open_side = todo & ~(torch.isfinite(sl) & torch.isfinite(su))
    if bool(open_side.any()):
        step = torch.ones_like(v)
        base = s.clone()
        for _ in range(MAX_EXPAND):
            g, _ = reg.derivatives(coords.x(s))
            r = g - v
            sl = torch.where(open_side & (r < 0), s, sl)
            su = torch.where(open_side & (r > 0), s, su)
            exact = open_side & (r == 0)
            sl, su = torch.where(exact, s, sl), torch.where(exact, s, su)
            open_side = open_side & ~(torch.isfinite(sl) & torch.isfinite(su))
            if not bool(open_side.any()):
                break
            linear = ~coords.fa & ~coords.fb
            # the largest |s| whose x is finite: log(max float) on a half-line
            cap = torch.where(linear, torch.full_like(s, 1e308), torch.full_like(s, 709.0))
            new = torch.where(torch.isfinite(sl), base + step, base - step).clamp(-cap, cap)
            if bool((open_side & (new == s)).any()):
                break  # at the end of the floating-point range and still short of the root
            s = torch.where(open_side, new, s)
            step = torch.where(linear, step * step.clamp_min(2.0), step * 2.0)
        if bool(open_side.any()):
            raise ValueError(f"regularizer {reg.name!r}: (phi')^-1(v) is out of floating-point range for some v")
        s = torch.where(todo & ((s <= sl) | (s >= su)), 0.5 * (sl + su), s)
    count = torch.zeros_like(v)
    width = su - sl
    reference = torch.full_like(v, math.inf)
    tol = INNER_TOLERANCE * v.abs().clamp_min(1.0)
    for _ in range(max_iter):
        x = coords.x(s)
        g, h = reg.derivatives(x)
        r = g - v
        sl = torch.where(r < 0, s, sl)
        su = torch.where(r > 0, s, su)
        # |phi'(x) - v| cannot be resolved beyond phi'' times the spacing of floats at x
        resolved = r.abs() <= torch.maximum(tol, 4.0 * eps * h * x.abs())
        done = ~todo | resolved | (su - sl <= 4.0 * eps * torch.maximum(sl.abs(), su.abs()).clamp_min(1.0))
        if bool(done.all()):
            return x, h
        newton = s - r / (h * coords.dx(s))
        take = (newton > sl) & (newton < su)
        # where the step in s leaves the bracket, the Newton step in x itself may not (phi' concave
        # near an end, as x^1.5 at 0): take it when it lands inside
        x_newton = x - r / h
        inside_x = (x_newton > coords.x(sl)) & (x_newton < coords.x(su))
        s_newton = coords.s(torch.where(inside_x, x_newton, x), delta_a, delta_b)
        take_x = ~take & inside_x & (s_newton > sl) & (s_newton < su)
        # a bisection is forced after FORCE steps in which neither |phi'(x) - v| nor the bracket
        # halved: Newton steps alone could make arbitrarily slow progress
        progress = (r.abs() <= 0.5 * reference) | (su - sl <= 0.5 * width)
        count = torch.where(progress, torch.zeros_like(count), count + 1)
        reference = torch.where(progress, r.abs(), reference)
        width = torch.where(progress, su - sl, width)
        force = count >= FORCE
        take, take_x = take & ~force, take_x & ~force
        new = torch.where(take, newton, torch.where(take_x, s_newton, 0.5 * (sl + su)))
        count = torch.where(force, torch.zeros_like(count), count)
        s = torch.where(done, s, new)
    bad = todo & ~(r.abs() <= 1e-8 * v.abs().clamp_min(1.0))
    if bool(bad.any()):
        element = int(bad.reshape(-1, bad.shape[-1]).any(-1).nonzero()[0]) if bad.dim() > 1 else 0
        raise SolverError(
            f"regularizer {reg.name!r}: the inverse of phi' did not converge in {max_iter} steps "
            f"(batch element {element})",
            element=element,
            solver="separable",
            status="max_iter",
        )
    return x, h


# ----------------------------------------------------------------------------------------------
# the two solvers: a box, and a box with one sum constraint
# ----------------------------------------------------------------------------------------------


def _interval(reg, lower: float, upper: float, what: str):
    a, b = max(reg.domain[0], lower), min(reg.domain[1], upper)
    if not a < b:
        raise ValueError(
            f"regularizer {reg.name!r}: its domain [{reg.domain[0]:g}, {reg.domain[1]:g}] meets the box "
            f"[{lower:g}, {upper:g}] of {what} in [{a:g}, {b:g}], which has no interior"
        )
    return a, b


class _Box(torch.autograd.Function):
    @staticmethod
    def forward(ctx, Z, reg, a, b):
        z = Z.detach().to(torch.float64)
        x, D = _solve_box(reg, z, a, b)
        ctx.save_for_backward(D)
        return x.to(Z.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (D,) = ctx.saved_tensors
        return (D * g.to(D.dtype)).to(g.dtype), None, None, None


def box_relaxation(reg, Z: torch.Tensor, lower: float, upper: float, what: str = "the polytope") -> torch.Tensor:
    """argmax_{x in [lower, upper]^n} <Z, x> - sum_i phi(x_i): the mirror map of every coordinate.

    Z: (..., n) -> (..., n), same dtype.  Exact backward dX/dZ = diag(D), D = 1 / phi''(x) (0 where
    x is at a bound).  On a bounded box: Newton steps in x from the cached table of the inverse of
    phi' (:func:`_solve_box`; typically 1-2 evaluations of phi', phi''), else one :func:`mirror_map`.
    """
    a, b = _interval(reg, lower, upper, what)
    return _Box.apply(Z, reg, a, b)


def _sum_root(reg, z, total, a, b, max_iter=MAX_ITER):
    """nu (B, 1) with sum_i x_i(z_i - nu) = total, and x, D at it; safeguarded Newton on nu.

    S(nu) = sum_i x_i(z_i - nu) is non-increasing with S' = -sum D.  With c = total / n
    (strictly inside (a, b)), every term is >= c at nu = min z - phi'(c) and <= c at
    nu = max z - phi'(c), so that pair brackets the root.  Newton steps that leave the bracket
    or do not halve the residual are replaced by bisections; the inner inverse of phi' is
    warm-started from the previous x.
    """
    n = z.shape[-1]
    eps = torch.finfo(z.dtype).eps
    c = total / n
    av, bv = z.new_tensor(a), z.new_tensor(b)
    slopes = endpoint_slopes(reg, av, bv)
    barriers = barrier_ends(reg, av, bv)
    gc, _ = reg.derivatives(z.new_tensor(c))
    lo = z.amin(-1, keepdim=True) - gc
    hi = z.amax(-1, keepdim=True) - gc
    # Two starts, both evaluated, the better one kept (and both tighten the bracket): between the
    # total-th and next largest entry, less phi' at the middle of the interval (right when the
    # answer is nearly a vertex), and the upper end of the bracket, where every x_i <= c (no
    # coordinate at its upper bound, where D = 0 would make the first Newton steps useless)
    k = min(max(round(total), 1), n - 1) if n > 1 else 1
    top = z.topk(min(k + 1, n), dim=-1).values
    middle = 0.5 * (a + b) if math.isfinite(a) and math.isfinite(b) else c
    gm, _ = reg.derivatives(z.new_tensor(middle))
    nu = (0.5 * (top[..., k - 1 : k] + top[..., -1:]) - gm).clamp(lo, hi)
    tol = 16.0 * n * eps * max(1.0, abs(total))
    x = None
    previous = torch.full_like(nu, math.inf)
    tiny = torch.finfo(z.dtype).tiny
    use_log = a >= 0 and total > 0
    first = nu, *mirror_map(reg, z - nu, av, bv, slopes=slopes, barriers=barriers)[:2]
    nu_old = nu
    for iteration in range(max_iter):
        if iteration == 0:
            upper = hi
            x, D, _ = mirror_map(reg, z - upper, av, bv, slopes=slopes, barriers=barriers)
            S0, S1 = first[1].sum(-1, keepdim=True), x.sum(-1, keepdim=True)
            lo = torch.where(S0 > total, first[0], lo)
            hi = torch.where(S0 < total, first[0], hi)
            if use_log:
                keep = (S0 > 0) & ((S0 / total).log().abs() <= (S1.clamp_min(tiny) / total).log().abs())
            else:
                keep = (S0 - total).abs() <= (S1 - total).abs()
            nu = torch.where(keep, first[0], upper)
            x, D = torch.where(keep, first[1], x), torch.where(keep, first[2], D)
        else:
            # warm start: the first-order prediction x - D dnu of the new point
            x, D, _ = mirror_map(reg, z - nu, av, bv, x0=x - D * (nu - nu_old), slopes=slopes, barriers=barriers)
        f = x.sum(-1, keepdim=True) - total
        d = D.sum(-1, keepdim=True)
        lo = torch.where(f > 0, nu, lo)
        hi = torch.where(f < 0, nu, hi)
        # each x_i is exact to D_i times the inner tolerance on phi', so the sum to their total
        inner = 2 * INNER_TOLERANCE * d * (z - nu).abs().amax(-1, keepdim=True).clamp_min(1.0)
        done = (f.abs() <= torch.maximum(inner, torch.full_like(f, tol))) | (
            hi - lo <= 4.0 * eps * torch.maximum(lo.abs(), hi.abs()).clamp_min(1.0)
        )
        if bool(done.all()):
            return nu, x, D
        # Newton on log S(nu) = log total where the coordinates are nonnegative (exact in one step for
        # x log x, whose S is exponential in nu; the same local convergence as Newton on S otherwise)
        S = x.sum(-1, keepdim=True)
        if use_log:
            step = torch.where(S > 0, (torch.log(S.clamp_min(tiny)) - math.log(total)) * S, f)
        else:
            step = f
        newton = nu + step / d.clamp_min(tiny)
        take = (newton > lo) & (newton < hi) & (f.abs() <= SUM_PROGRESS * previous)
        previous = f.abs()
        nu_old = nu
        nu = torch.where(done, nu, torch.where(take, newton, 0.5 * (lo + hi)))
    bad = ~(
        (f.abs() <= 1e-8 * max(1.0, abs(total))) | (hi - lo <= 1e-10 * torch.maximum(lo.abs(), hi.abs()).clamp_min(1.0))
    )
    if bool(bad.any()):
        element = int(bad.reshape(-1).nonzero()[0])
        raise SolverError(
            f"regularizer {reg.name!r}: the threshold of the sum constraint did not converge in {max_iter} steps "
            f"(batch element {element}, residual {float(f.reshape(-1)[element]):.2e})",
            element=element,
            solver="separable",
            status="max_iter",
        )
    return nu, x, D


# ----------------------------------------------------------------------------------------------
# the joint Newton iteration on (x, nu) of a sum constraint
# ----------------------------------------------------------------------------------------------

#: per regularizer, {(a, b, total, n): _IntervalInfo, ("table", a, b): (table, its error)}
_INFO: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _IntervalInfo:
    """What the joint iteration needs of phi on one interval [a, b] (finite) with sum ``total`` over
    ``n`` coordinates, as Python floats: computed once in float64 on the CPU, cached per regularizer.

    ``ga``, ``gb``: phi'(a+), phi'(b-) (:func:`endpoint_slopes`); ``barrier_a``, ``barrier_b``:
    whether phi' is infinite there (:func:`barrier_ends`); ``c = total / n`` and phi'(c),
    1 / phi''(c); ``table``: the tabulated inverse of phi' (:meth:`surrogate`), None where phi' is
    not resolved as increasing on its grid, and ``table_error``: the largest |x~(phi'(x)) - x| at the
    midpoints of its segments (measured once; the table of an interval is shared by its infos).  Its
    device copies are made on first use.
    """

    def __init__(self, reg, a: float, b: float, total: float, n: int, shared: dict | None = None):
        av, bv = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
        ga, gb = endpoint_slopes(reg, av, bv)
        barrier_a, barrier_b = barrier_ends(reg, av, bv)
        self.ga, self.gb = float(ga), float(gb)
        self.barrier_a, self.barrier_b = bool(barrier_a), bool(barrier_b)
        self.c = total / n
        gc, hc = reg.derivatives(torch.tensor(self.c, dtype=torch.float64))
        self.gc, self.dc = float(gc), 1.0 / float(hc)
        delta_a, delta_b = _deltas(av, bv)
        # the closest a free coordinate comes to an end (its x stays strictly inside)
        self.inner_a, self.inner_b = a + float(delta_a), b - float(delta_b)
        self.usable = all(math.isfinite(t) for t in (self.ga, self.gb, self.gc, self.dc)) and self.dc > 0
        self.a, self.b = a, b
        self._tables: dict = {}
        self.table_error = math.inf
        self.table, self.fine, self.double_roots = None, None, False
        if self.usable:
            self._choose_table(reg, shared)

    # the tabulated inverse of phi' (the surrogate that starts the joint iteration)
    def x_of_s(self, s):
        """The stretched coordinate of the table: x = a + w sigmoid(s) between two barriers, a + e^s
        or b - e^-s towards one, s itself between finite-slope ends; and dx/ds."""
        a, b = self.a, self.b
        if self.barrier_a and self.barrier_b:
            p = torch.sigmoid(s)
            dp = torch.addcmul(p, p, p, value=-1.0)  # p (1 - p)
            return p.mul(b - a).add_(a), dp.mul_(b - a)
        if self.barrier_a:
            e = torch.exp(s)
            return (e + a if a != 0.0 else e), e
        if self.barrier_b:
            e = torch.exp(-s)
            return b - e, e
        # between finite-slope ends: x = a + w sin^2(pi s / 2) on [0, 1], nodes crowding quadratically
        # towards both ends, where phi' often behaves as a square root (x^1.5 at 0)
        x, dx = _sine_map(a, b, 0.5 * math.pi * s)
        return x, 0.5 * math.pi * dx

    def _choose_table(self, reg, shared):
        """The table of TABLE_SIZE nodes and its error, shared by the infos of one interval; towards a barrier,
        where that table is not exact to rounding, also a fine one (:meth:`refine`)."""
        key = ("table", self.a, self.b)
        if shared is not None and key in shared:
            self.table, self.table_error, self.fine, self.double_roots = shared[key]
            return
        # phi'' infinite at a finite-slope end (x ~ (v - phi'(a))^2 there, as x^1.5 at 0): the sum can have a
        # double root, which the root in nu looks for (see _surrogate_root)
        ends = [e for e, barrier in ((self.inner_a, self.barrier_a), (self.inner_b, self.barrier_b)) if not barrier]
        if ends:
            _, h = reg.derivatives(torch.tensor(ends, dtype=torch.float64))
            self.double_roots = bool((~(h.reciprocal() > 1e-6 * self.dc)).any())
        built = self._build_table(reg, TABLE_SIZE)
        if built is not None:
            self.table, self.table_error = built
            eps = torch.finfo(torch.float64).eps
            if (self.barrier_a or self.barrier_b) and self.table_error > EXACT_TABLE * eps:
                fine = self._build_table(reg, FINE_SIZE)
                lo, hi = self._s_range()
                if fine is not None and fine[1] <= EXACT_TABLE * eps and fine[0][1].shape[0] == FINE_SIZE + 1:
                    self.fine = (fine[0][1], lo, (FINE_SIZE - 1) / (hi - lo))
        if shared is not None:
            shared[key] = (self.table, self.table_error, self.fine, self.double_roots)

    def _s_range(self):
        w = self.b - self.a
        if self.barrier_a and self.barrier_b:
            return -TABLE_REACH, TABLE_REACH
        if self.barrier_a:
            return math.log(w) - TABLE_REACH, math.log(w)
        if self.barrier_b:
            return -math.log(w), TABLE_REACH - math.log(w)
        return 0.0, 1.0

    def _build_table(self, reg, size):
        """(bounds, rows) of a table of ``size`` nodes and its largest error |x~(phi'(x)) - x| at the midpoints of
        its segments; None where phi' is not resolved as increasing on the grid."""
        a, b = self.a, self.b
        lo, hi = self._s_range()
        s = torch.linspace(lo, hi, size, dtype=torch.float64)
        x, _ = self.x_of_s(s)
        inside = (x > self.inner_a) & (x < self.inner_b)
        s, x = s[inside], x[inside]
        # a finite-slope end is a node itself (where phi' = ga), so that x~ reaches it continuously
        if not self.barrier_a:
            s0 = 0.0 if not self.barrier_b else -math.log(b - self.inner_a)
            s, x = torch.cat([s.new_tensor([s0]), s]), torch.cat([x.new_tensor([self.inner_a]), x])
        if not self.barrier_b:
            s1 = 1.0 if not self.barrier_a else math.log(self.inner_b - a)
            s, x = torch.cat([s, s.new_tensor([s1])]), torch.cat([x, x.new_tensor([self.inner_b])])
        g, h = reg.derivatives(x)
        if s.numel() < 8 or not bool(torch.isfinite(g).all()) or not bool((g[1:] > g[:-1]).all()):
            return None  # phi' not resolved as increasing on the grid: no table, the start from c serves
        width = g[1:] - g[:-1]
        zero = torch.zeros(1, dtype=torch.float64)
        if self.barrier_a or self.barrier_b:
            # towards a barrier: per segment j (v from v_j = phi'(x_j) to v_j+1), s~ is the cubic in t = v - v_j with
            # the nodes' s and ds/dv = 1 / (phi'' dx/ds) at both ends (Hermite; linear where that cubic would not
            # be monotone); beyond a barrier's last node s~ is linear in v with the node's slope (exact for a log
            # barrier, whose phi' is linear in s), beyond a finite end constant (x~ = the end)
            m = 1.0 / (h * self.x_of_s(s)[1])
            k = (s[1:] - s[:-1]) / width
            c2 = (3.0 * k - 2.0 * m[:-1] - m[1:]) / width
            c3 = (m[:-1] + m[1:] - 2.0 * k) / (width * width)
            alpha, beta = m[:-1] / k, m[1:] / k
            cubic = (alpha >= 0) & (beta >= 0) & (alpha * alpha + beta * beta <= 9.0)
            cubic &= torch.isfinite(c2) & torch.isfinite(c3)
            segments = torch.stack(
                [
                    g[:-1],
                    s[:-1],
                    torch.where(cubic, m[:-1], k),
                    torch.where(cubic, c2, 0.0),
                    torch.where(cubic, c3, 0.0),
                ],
                -1,
            )
            ends = []
            for i, barrier in ((0, self.barrier_a), (-1, self.barrier_b)):
                if barrier:
                    slope = m[i] if bool(torch.isfinite(m[i]) & (m[i] > 0)) else k[i]
                    ends.append(torch.stack([g[i], s[i], slope, zero[0], zero[0]]))
                else:  # the finite end itself: x = b = a + e^s, or x = a = b - e^-s
                    s_end = math.log(b - a) if i == -1 else -math.log(b - a)
                    ends.append(g.new_tensor([float(g[i]), s_end, 0.0, 0.0, 0.0]))
        else:
            # between finite-slope ends, per segment j: x~ = x_j + D_j t + q_j t^2, t = v - v_j, D_j = 1 / phi''(x_j)
            # and q_j putting x~ on x_j+1 at the segment's end (exact where x is quadratic in v, as near a square-root
            # end); linear where that quadratic would not increase.  Beyond the ends: the ends themselves
            D = 1.0 / h
            rise = x[1:] - x[:-1]
            q = (rise - D[:-1] * width) / (width * width)
            monotone = (D[:-1] >= 0) & (2.0 * rise / width - D[:-1] >= 0) & torch.isfinite(q)
            segments = torch.stack(
                [g[:-1], x[:-1], torch.where(monotone, D[:-1], rise / width), torch.where(monotone, q, 0.0)], -1
            )
            ends = [g.new_tensor([self.ga, a, 0.0, 0.0]), g.new_tensor([self.gb, b, 0.0, 0.0])]
        # searchsorted over every node: v <= v_0 gives the row before the first segment, v > v_last the one after
        table = (g.contiguous(), torch.cat([ends[0][None], segments, ends[1][None]]).contiguous())
        mid, _ = self.x_of_s(0.5 * (s[1:] + s[:-1]))
        mid = mid[(mid > self.inner_a) & (mid < self.inner_b)]
        error = float((self._lookup(table, reg.derivatives(mid)[0])[0] - mid).abs().max())
        return table, (error if math.isfinite(error) else math.inf)

    def table_on(self, like):
        key = (like.device, like.dtype)
        tables = self._tables.get(key)
        if tables is None:
            tables = self._tables[key] = tuple(t.to(device=like.device, dtype=like.dtype) for t in self.table)
        return tables

    def filling(self, like, total, n):
        """log R_m = log(|total - n e| - m (b - a)) for m = 0 .. n-1 (+inf where not positive) and log(b - a),
        for :func:`_barrier_start` (e the barrier end), cached on like's device and dtype."""
        key = ("filling", like.device, like.dtype)
        cached = self._tables.get(key)
        if cached is None:
            rest = abs(total - n * (self.a if self.barrier_a else self.b))
            values = [rest - m * (self.b - self.a) for m in range(n)]
            log_rest = like.new_tensor([math.log(r) if r > 0 else math.inf for r in values])
            cached = self._tables[key] = (log_rest, math.log(self.b - self.a))
        return cached

    def surrogate(self, v):
        """x~(v) from the table (s cubic in v towards a barrier, x quadratic in v between finite-slope ends)
        and dx~/dv: one ``searchsorted``, one gather and a few fused operations.  Beyond a finite end's slope
        x~ is that end (to rounding) with slope 0; elsewhere x~ may round onto an end, and callers that need
        a free coordinate strictly inside clamp it to [inner_a, inner_b]."""
        return self._lookup(self.table_on(v), v)

    def _lookup(self, table, v):
        bounds, rows = table
        index = torch.searchsorted(bounds, v)
        cols = rows.index_select(0, index.reshape(-1)).view(*v.shape, rows.shape[-1]).unbind(-1)
        if self.barrier_a or self.barrier_b:
            g0, s0, m, c2, c3 = cols
            t = v - g0
            s = torch.addcmul(s0, torch.addcmul(m, torch.addcmul(c2, c3, t), t), t)
            dsdv = torch.addcmul(m, torch.addcmul(c2, c3, t, value=1.5), t, value=2.0)
            x, dxds = self.x_of_s(s)
            return x, dxds * dsdv
        g0, x0, k, q = cols
        t = v - g0
        return torch.addcmul(x0, torch.addcmul(k, q, t), t), torch.addcmul(k, q, t, value=2.0)

    def start(self, v):
        """x~(v) with the exact active set: a where v <= phi'(a+), b where v >= phi'(b-), strictly inside
        (a, b) elsewhere; and the two masks."""
        at_a, at_b = v <= self.ga, v >= self.gb
        x = self.surrogate(v)[0].clamp_(self.inner_a, self.inner_b)
        return x.masked_fill_(at_a, self.a).masked_fill_(at_b, self.b), at_a, at_b

    def refine(self, z, total, nu, x, use_log):
        """Towards a barrier, where the table of TABLE_SIZE nodes is not exact to rounding: nu and x from the
        fine table (FINE_SIZE nodes, exact to rounding, as the mix's), from the coarse table's root (nu, x):
        one Newton step on nu with the fine x~ (the error squares) and x~ there (:meth:`fine_map`); about 30
        tensor operations and one gather."""
        evaluate = self.fine_map(x)
        x, slope = evaluate(z - nu)
        f = x.sum(-1, keepdim=True) - total
        tiny = torch.finfo(z.dtype).tiny
        nu = nu + _nu_step(x, slope, f, total, use_log) / slope.sum(-1, keepdim=True).clamp_min(tiny)
        return nu, evaluate(z - nu, slope=False)[0]

    def s_speed(self, x, slope):
        """The largest |ds/dv| over the last dim (keepdim) in the fine table's coordinate s (towards a barrier), at
        x with dx/dv = slope: slope / (x - a), slope / (b - x), or their sum between two barriers."""
        if self.barrier_a and self.barrier_b:
            speed = slope / (x - self.a) + slope / (self.b - x)
        elif self.barrier_a:
            speed = slope / (x - self.a)
        else:
            speed = slope / (self.b - x)
        return speed.amax(-1, keepdim=True)

    def fine_map(self, x):
        """v -> (x~(v), dx~/dv) from the fine table on the segments of the coarse estimates x (the coordinates'
        segments stay those while v moves by less than about 1e-4 of a segment).  Its nodes are uniform in s, so
        that the segment of each coordinate follows from s(x) by arithmetic (no search): a coarse x within about
        1e-9 of the fine one lies well inside a segment, and a coordinate near a node takes either neighbor's
        cubic, which agree there."""
        rows, lo, inverse_step = self.fine_on(x)
        a, b = self.a, self.b
        if self.barrier_a and self.barrier_b:
            s = torch.log(x - a) - torch.log(b - x)
        elif self.barrier_a:
            s = torch.log(x - a if a != 0.0 else x)
        else:
            s = -torch.log(b - x)
        # node k at lo + k / inverse_step starts row k + 1 (row 0 and the last: beyond the ends, as in the table)
        index = s.sub_(lo).mul_(inverse_step).floor_().add_(1.0).clamp_(0, rows.shape[0] - 1).long()
        g0, s0, m, c2, c3 = rows.index_select(0, index.reshape(-1)).view(*x.shape, 5).unbind(-1)

        def evaluate(v, slope=True):
            t = v - g0
            s = torch.addcmul(s0, torch.addcmul(m, torch.addcmul(c2, c3, t), t), t)
            x, dxds = self.x_of_s(s)
            if not slope:  # x~ alone (the slope's three operations saved)
                return x, None
            return x, dxds * torch.addcmul(m, torch.addcmul(c2, c3, t, value=1.5), t, value=2.0)

        return evaluate

    def fine_on(self, like):
        key = ("fine", like.device, like.dtype)
        cached = self._tables.get(key)
        if cached is None:
            rows, *rest = self.fine
            cached = self._tables[key] = (rows.to(device=like.device, dtype=like.dtype), *rest)
        return cached

    def __getstate__(self):  # the device copies of the table are a cache
        state = dict(self.__dict__)
        state["_tables"] = {}
        return state


def _interval_info(reg, a, b, total, n):
    key = (a, b, total, n)
    try:
        table = _INFO.setdefault(reg, {})
    except TypeError:  # a regularizer that cannot be weakly referenced: no cache
        return _IntervalInfo(reg, a, b, total, n)
    info = table.get(key)
    if info is None:
        info = table[key] = _IntervalInfo(reg, a, b, total, n, shared=table)
    return info


def _sine_map(a, b, theta):
    """x = a + (b - a) sin^2(theta) for theta in [0, pi/2], accurate near both ends, and dx/dtheta."""
    w = b - a
    sin, cos = torch.sin(theta), torch.cos(theta)
    x = torch.where(theta < 0.25 * math.pi, a + w * sin * sin, b - w * cos * cos)
    return x, 2.0 * w * sin * cos


def _advance(info, a, b, x, g, D, v):
    """The next x of each coordinate for the target slope v (the mirror map at v, one Newton step),
    and its derivative in v.

    v <= phi'(a+) gives a and v >= phi'(b-) gives b (the exact mirror map's active set).  Else a
    Newton step for phi'(x) = v from (x, g = phi'(x), D = 1 / phi''(x)), taken in the coordinate
    that stretches logarithmically towards a barrier end (x = a + e^s, b - e^-s, or a + (b - a)
    sigmoid(s)), where the usual barriers' phi' is nearly linear; a step that still lands outside
    (a, b) (a finite-slope end, phi' concave near it as x^1.5 at 0) is replaced by the secant
    between that end and x.  Returns x, dx/dv and the masks of the coordinates at a and at b.
    """
    dx = (v - g) * D
    if info.barrier_a and info.barrier_b:
        left, right = x - a, b - x
        t = dx * (b - a) / (left * right)
        p = torch.sigmoid(torch.log(left) - torch.log(right) + t)
        new = a + (b - a) * p
        slope = D * (b - a) ** 2 * p * (1.0 - p) / (left * right)
    elif info.barrier_a:
        left = x - a
        grow = torch.exp((dx / left).clamp(max=60.0))
        new, slope = a + left * grow, D * grow
    elif info.barrier_b:
        right = b - x
        grow = torch.exp((-dx / right).clamp(max=60.0))
        new, slope = b - right * grow, D * grow
    else:
        # in the table's angle theta (x = a + w sin^2 theta), where phi' like a square root at an end is
        # nearly linear; dx/dtheta = 2 sqrt((x - a)(b - x))
        root = torch.sqrt((x - a) * (b - x))
        theta = torch.atan2(torch.sqrt(x - a), torch.sqrt(b - x)) + dx / (2.0 * root)
        new, dnew = _sine_map(a, b, theta)
        slope = D * dnew / (2.0 * root)
        new = torch.where(theta <= 0.0, a, torch.where(theta >= 0.5 * math.pi, b, new))
    tiny = torch.finfo(x.dtype).tiny
    below = new <= info.inner_a
    above = new >= info.inner_b
    chord_a = (x - a) / (g - info.ga).clamp_min(tiny)
    chord_b = (b - x) / (info.gb - g).clamp_min(tiny)
    new = torch.where(below, a + (v - info.ga) * chord_a, torch.where(above, b - (info.gb - v) * chord_b, new))
    slope = torch.where(below, chord_a, torch.where(above, chord_b, slope))
    new = new.clamp(info.inner_a, info.inner_b)
    at_a, at_b = v <= info.ga, v >= info.gb
    clamped = at_a | at_b
    return new.masked_fill(at_a, a).masked_fill(at_b, b), slope.masked_fill(clamped, 0.0), at_a, at_b


def _nu_step(x, slope, f, total, use_log):
    """The numerator of a Newton step on nu for sum x(nu) = total (divide by sum slope), f = sum x - total:
    f itself, or where the coordinates are nonnegative, the step on log of the moving part (the coordinates
    with slope > 0; those at an end do not scale) -- exact for x log x, whose moving part is exponential in
    nu.  Where the ends alone exceed the total, the log step has f's sign and a bracket bounds it."""
    if not use_log:
        return f
    tiny = torch.finfo(x.dtype).tiny
    moving = torch.where(slope > 0, x, 0.0).sum(-1, keepdim=True)
    logs = torch.log(moving.clamp_min(tiny) / (moving - f).clamp_min(tiny)).mul_(moving)
    return torch.where(moving > 0, logs, f)


def _surrogate_root(info, z, total, nu, lo, hi, use_log, tol, hand_off=None):
    """nu with sum_i x~(z_i - nu) = total for the tabulated mirror map x~ (:meth:`_IntervalInfo.surrogate`),
    to ``tol`` (no finer than the table itself: the joint steps take it from there), and x~ there: Newton
    steps (on log of the moving part where the coordinates are nonnegative) inside a bracket, bisection where
    a step leaves it.  No evaluation of phi; about 20 tensor operations and one host sync per step.

    With ``hand_off`` (a move in the table's coordinate s, 1e-3 of a fine segment; for :meth:`_IntervalInfo.refine`,
    which only needs x~ to pick each coordinate's fine segment): once the sum is within 1e-5 max(1, |total|) of the
    total and the next Newton step (inside the bracket) moves no s by more than ``hand_off``, that step's nu is
    returned with x~ before it: it saves the lookup that would only confirm the root (the fine step squares the
    error anyway, and a coordinate moved by 1e-3 of a segment keeps its segment or takes the neighbor's cubic,
    equal there to rounding)."""
    tiny = torch.finfo(z.dtype).tiny
    nu_x = nu
    previous = None
    for iteration in range(SURROGATE_ITER):
        x, slope = info.surrogate(z - nu)
        nu_x = nu
        f = x.sum(-1, keepdim=True) - total
        f_max = float(f.abs().max())  # one sync per step: it saves the remaining steps
        if f_max <= tol:
            break
        lo, hi = torch.where(f > 0, nu, lo), torch.where(f < 0, nu, hi)
        step = _nu_step(x, slope, f, total, use_log) / slope.sum(-1, keepdim=True).clamp_min(tiny)
        if hand_off is not None and f_max <= 1e-5 * max(1.0, abs(total)):
            new = nu + step
            if bool(((torch.clamp(new, lo, hi) == new) & (step.abs() * info.s_speed(x, slope) <= hand_off)).all()):
                return new, x
        # a double root (a vertex where a coordinate leaves a finite-slope end as (v - phi'(a))^2) halves
        # Newton's steps: two consecutive steps in that ratio are scaled by the multiplicity (see _joint_sum)
        if info.double_roots:
            if iteration > MULTIPLICITY_AFTER:
                ratio = step / previous
                previous, step = step, torch.where((ratio > 0.3) & (ratio < 0.8), step / (1.0 - ratio), step)
            else:
                previous = step
        new = nu + step
        nu = torch.where(torch.clamp(new, lo, hi) == new, new, 0.5 * (lo + hi))
    return nu_x, x


def _barrier_start(info, z, total):
    """The start in nu towards one barrier end e: the root of sum_i d_i = |total - n e| for the model
    d_i = d_c exp(+-alpha (z_i - nu - phi'(c))) of the distance d_i = |x_i - e| around c (its value and
    slope right at c), each d_i capped at the width b - a (the other end).  Water-filling: with the m
    largest terms capped, the rest sum to R_m = |total - n e| - m (b - a), which fixes nu in closed form
    (a log-sum-exp of the uncapped terms); m is the smallest count at which the largest uncapped term
    stays under the cap.  Exact for x log x on [0, inf); one sort and about 12 tensor operations."""
    n = z.shape[-1]
    sign = 1.0 if info.barrier_a else -1.0
    end = info.a if info.barrier_a else info.b
    d_c = sign * (info.c - end)
    alpha = info.dc / d_c
    log_rest, log_width = info.filling(z, total, n)
    logits = (z - info.gc).mul_(sign * alpha).sort(-1, descending=True).values
    # log-sum-exp of the terms from m on (sorted: shifted by the largest, a tail that underflows gives -inf, never
    # chosen); cheaper than logcumsumexp
    top = logits[..., :1]
    tail = (logits - top).exp_().flip(-1).cumsum(-1).flip(-1).log_().add_(top)
    uncapped = logits - tail + log_rest <= log_width
    m = uncapped.to(torch.uint8).argmax(-1, keepdim=True)  # the first m where it holds (0 if none)
    return (tail - log_rest).gather(-1, m).add_(math.log(d_c)).mul_(sign / alpha)


def _table_start(info, z, total, a, b, use_log, tol_sum):
    """The start of :func:`_joint_sum` in torch (the reference of the compiled :func:`_compiled_start`): nu (B, 1),
    x (B, n), the masks of the coordinates at a and at b, and the bracket lo, hi (B, 1) of nu."""
    n = z.shape[-1]
    ga, gb = info.ga, info.gb
    # every term is >= c at nu = min z - phi'(c) and <= c at max z - phi'(c): a bracket of the root
    z_min, z_max = torch.aminmax(z, dim=-1, keepdim=True)
    lo, hi = z_min - info.gc, z_max - info.gc
    if info.barrier_a != info.barrier_b:
        nu = _barrier_start(info, z, total)
    else:
        # between the total-th and the next largest entry, less the middle of the end slopes between finite-slope
        # ends (the middle of the range of nu that gives the vertex there: x^2 / 2 then rarely cycles), else phi'(c)
        k = min(max(round(total), 1), n - 1) if n > 1 else 1
        top = z.topk(min(k + 1, n), dim=-1).values
        nu = 0.5 * (top[..., k - 1 : k] + top[..., -1:]) - (info.gc if info.barrier_a else 0.5 * (ga + gb))
    nu = torch.clamp(nu, lo, hi)
    if info.table is not None:
        hand_off = None if info.fine is None else 1e-3 / info.fine[2]
        nu, x = _surrogate_root(info, z, total, nu, lo, hi, use_log, max(tol_sum, n * info.table_error), hand_off)
        if info.fine is not None:
            nu, x = info.refine(z, total, nu, x, use_log)
        v = z - nu
        at_a, at_b = v <= ga, v >= gb
        x = x.clamp(info.inner_a, info.inner_b).masked_fill_(at_a, a).masked_fill_(at_b, b)
    else:
        start = torch.full_like(z, info.c)
        x, _, at_a, at_b = _advance(info, a, b, start, torch.full_like(z, info.gc), torch.full_like(z, info.dc), z - nu)
    return nu, x, at_a, at_b, lo, hi


def _compiled_start(info, z, total, use_log, tol):
    """:func:`_table_start` on a CPU float64 z (..., n) with a table, by the compiled kernel
    :func:`sstcvx._compiled_separable.table_start` (one call; per-row stopping rules, see its module)."""
    from . import _compiled_separable

    n = z.shape[-1]
    arrays = info._tables.get("kernel")
    if arrays is None:
        arrays = info._tables["kernel"] = _kernel_arrays(info, total, n, use_log, tol)
    z2 = z.detach().reshape(-1, n).contiguous()
    batch = z2.shape[0]
    nu = torch.empty(batch, 1, dtype=torch.float64)
    lo, hi = torch.empty_like(nu), torch.empty_like(nu)
    x = torch.empty(batch, n, dtype=torch.float64)
    at_a, at_b = torch.empty(batch, n, dtype=torch.bool), torch.empty(batch, n, dtype=torch.bool)
    _compiled_separable.table_start(
        z2.numpy(), *arrays, nu.numpy(), x.numpy(), at_a.numpy(), at_b.numpy(), lo.numpy(), hi.numpy()
    )
    lead = z.shape[:-1]
    return (
        nu.view(*lead, 1),
        x.view(*lead, n),
        at_a.view(*lead, n),
        at_b.view(*lead, n),
        lo.view(*lead, 1),
        hi.view(*lead, 1),
    )


def _kernel_arrays(info, total, n, use_log, tol):
    """The numpy arguments of :func:`sstcvx._compiled_separable.table_start` for one interval info (constant
    per info: its interval, total and n), cached in it: the coarse table, the fine one, the barrier start's
    log R_m, the numbers and the integers (layouts of that module)."""
    import numpy as np

    from . import _compiled_separable as kernel

    bounds, rows = (t.detach().cpu().to(torch.float64).contiguous().numpy() for t in info.table)
    if info.barrier_a and info.barrier_b:
        kind = kernel._BOTH
    elif info.barrier_a:
        kind = kernel._LOWER
    elif info.barrier_b:
        kind = kernel._UPPER
    else:
        kind = kernel._SINE
    cf = np.zeros(17)
    ci = np.zeros(8, dtype=np.int64)
    cf[kernel._A], cf[kernel._B] = info.a, info.b
    cf[kernel._GA], cf[kernel._GB], cf[kernel._GC] = info.ga, info.gb, info.gc
    cf[kernel._INNER_A], cf[kernel._INNER_B] = info.inner_a, info.inner_b
    cf[kernel._TOTAL], cf[kernel._TOL] = total, tol
    cf[kernel._HAND_OFF] = -1.0
    fine = np.zeros((1, 5))
    if info.fine is not None:
        fine_rows, fine_lo, inverse_step = info.fine
        fine = fine_rows.detach().cpu().to(torch.float64).contiguous().numpy()
        cf[kernel._HAND_OFF] = 1e-3 / inverse_step
        cf[kernel._FINE_LO], cf[kernel._FINE_INVERSE_STEP] = fine_lo, inverse_step
        ci[kernel._HAS_FINE] = 1
    log_rest = np.zeros(n)
    if info.barrier_a != info.barrier_b:  # the constants of _barrier_start
        sign = 1.0 if info.barrier_a else -1.0
        d_c = sign * (info.c - (info.a if info.barrier_a else info.b))
        rest, log_width = info.filling(torch.zeros((), dtype=torch.float64), total, n)
        log_rest = rest.numpy().copy()
        cf[kernel._SIGN], cf[kernel._D_C], cf[kernel._ALPHA] = sign, d_c, info.dc / d_c
        cf[kernel._LOG_WIDTH] = log_width
        ci[kernel._BARRIER_START] = 1
    else:
        cf[kernel._OFFSET] = info.gc if info.barrier_a else 0.5 * (info.ga + info.gb)
    ci[kernel._KIND] = kind
    ci[kernel._K] = min(max(round(total), 1), n - 1) if n > 1 else 1
    ci[kernel._USE_LOG] = int(bool(use_log))
    ci[kernel._DOUBLE_ROOTS] = int(info.double_roots)
    ci[kernel._MAX_ITER], ci[kernel._MULTIPLICITY_AFTER] = SURROGATE_ITER, MULTIPLICITY_AFTER
    return bounds, rows, fine, log_rest, cf, ci


def _joint_sum(reg, z, total, a, b, max_iter=None):
    """x (B, n) = argmax {<z, x> - sum phi(x_i) : a <= x <= b, sum x = total}, D = dx/dv at it, and
    the mask of rows that converged (None when all did): a joint (semismooth) Newton iteration on (x, nu).

    The KKT conditions are phi'(x_i) = z_i - nu for a < x_i < b, x_i = a where z_i - nu <= phi'(a+),
    x_i = b where z_i - nu >= phi'(b-), and sum x = total.  The start is the root in nu of the
    tabulated mirror map (:func:`_surrogate_root`, no evaluation of phi), as accurate as the table (for
    the usual phi 1e-9 relative or better, exact where x is quadratic in v); then each step evaluates
    phi', phi'' once at the current x (one call of ``reg.derivatives``) and solves the linearized system:
    with the Newton steps dx_i = (v_i - phi'(x_i)) D_i of the free coordinates at v = z - nu and
    D = 1 / phi'', the step in nu makes the linearized sum right (on log of the moving part where
    coordinates are nonnegative: exact for x log x), and every x moves to the new nu: a, b for the
    coordinates the new nu puts beyond an end's slope (the exact active set), x + dx - dnu D for the
    others, and the table's value where that leaves (a, b) or a coordinate leaves its end.  Without a
    table (phi' not resolved on its grid) the start is one Newton step from c = total / n in a
    stretched coordinate (:func:`_advance`).  Stops when every free coordinate has
    |phi'(x) - v| <= 16 eps max(1, |v|) (in x: |dx| <= 16 eps max(1, |v|) D, or 4 eps |x|, its
    resolution), every clamped one is on the right side of its end's slope and sum x = total to
    16 n eps max(1, total) -- the nested solver's precision; D is then phi'' at the returned x (exact
    backward).  From step ``SLOW_AFTER`` on, every other step keeps nu (a row cycling between active
    sets then alternates exact coordinate solves and steps in nu).  Rows still unconverged after
    ``max_iter`` steps are returned unmarked (the caller solves them by :func:`_sum_root`).  Cost: one
    evaluation of phi', phi'' per step, typically 1 (an exact table) or 2 steps after 3-6 of the
    table, each about 30 O(Bn) tensor operations.  On CPU tensors (:func:`sstcvx._compiled.enabled_for`) the
    table part (the start, the table's root, the fine step: :func:`_table_start`) is one call of the numba kernel
    of :mod:`sstcvx._compiled_separable` (per row, its stopping rules per row), the joint steps stay in torch.
    """
    n = z.shape[-1]
    max_iter = JOINT_ITER if max_iter is None else max_iter
    info = _interval_info(reg, a, b, total, n)
    eps = torch.finfo(z.dtype).eps
    tiny = torch.finfo(z.dtype).tiny
    # Newton on log of the moving part of the sum towards a barrier at a >= 0 (exact for x log x); on the
    # sum itself otherwise (x ~ (v - phi'(a))^2 near a finite-slope end, as x^1.5 at 0, is far from exponential)
    use_log = a >= 0 and total > 0 and info.barrier_a
    ga, gb = info.ga, info.gb
    tol_sum = 16.0 * n * eps * max(1.0, abs(total))
    if info.table is not None and compiled.enabled_for(z):
        # the start, the table's root and its fine step, per row in one compiled loop
        nu, x, at_a, at_b, lo, hi = _compiled_start(info, z, total, use_log, max(tol_sum, n * info.table_error))
    else:
        nu, x, at_a, at_b, lo, hi = _table_start(info, z, total, a, b, use_log, tol_sum)
    previous = None
    done = None  # no row yet
    # the start can pass the first check only where the table is exact to rounding (as x^1.5's, x log x's):
    # elsewhere the first step goes without it (a step from a converged row keeps it where it is)
    check_first = info.table is not None and (info.table_error <= EXACT_TABLE * eps or info.fine is not None)
    for iteration in range(max_iter):
        clamped = at_a | at_b
        # a clamped coordinate is evaluated at c (phi' may be infinite at its end), its values unused
        xe = x.masked_fill(clamped, info.c)
        g, h = reg.derivatives(xe)
        v = z - nu
        D_all = h.reciprocal()
        D = D_all.masked_fill(clamped, 0.0)
        dx = (v - g).mul_(D)
        f = x.sum(-1, keepdim=True) - total
        sum_D = D.sum(-1, keepdim=True)
        scale = v.abs().amax(-1, keepdim=True).clamp_min_(1.0).mul_(16.0 * eps)
        if iteration > 0 or check_first:
            # |dx| within 4 eps |x| + scale D everywhere, and the sum within 2 scale sum D (or tol_sum)
            converged = (dx.abs() <= torch.addcmul(x.abs().mul_(4.0 * eps), scale, D)).all(-1, keepdim=True)
            converged &= f.abs() <= (2.0 * scale * sum_D).clamp_min_(tol_sum)
            done = converged if done is None else done | converged
            if bool(done.all()):
                return x, D, None
        # the step in nu that makes the linearized sum right
        dnu = _nu_step(x + dx, D, f + dx.sum(-1, keepdim=True), total, use_log) / sum_D.clamp_min(tiny)
        # every coordinate clamped where nu stands: move nu to the nearest end slope that frees one
        stuck = sum_D <= 0
        if bool(stuck.any()):
            gap_a = (ga - v).masked_fill(~at_a, math.inf).amin(-1, keepdim=True)
            gap_b = (v - gb).masked_fill(~at_b, math.inf).amin(-1, keepdim=True)
            dnu = torch.where(stuck, torch.where(f < 0, -gap_a, gap_b), dnu)
        # a root of multiplicity m (a vertex of a phi' like a square root at its end: x ~ (v - ga)^2 makes
        # sum x - total touch zero quadratically) shrinks Newton's steps by (m - 1) / m each: then
        # the step is scaled by m, estimated from two consecutive steps in the same direction
        if previous is not None:
            ratio = dnu / previous
            previous = dnu
            dnu = torch.where((ratio > 0.3) & (ratio < 0.8), dnu / (1.0 - ratio), dnu)
        else:
            previous = dnu
        if iteration >= SLOW_AFTER:
            # the bracket: with every free x on one side of its root, sum x bounds S(nu) = sum_i x_i(z_i - nu),
            # which decreases in nu; a step that leaves it is replaced by its midpoint.  Every other step
            # keeps nu and solves each coordinate alone (the nested solver's inner step), so that the next
            # step in nu starts from the exact x(nu), where the bracket test applies
            r_pos, r_neg = (dx <= scale * D).all(-1, keepdim=True), (dx >= -scale * D).all(-1, keepdim=True)
            hi = torch.where((f < 0) & r_pos, torch.minimum(hi, nu), hi)
            lo = torch.where((f > 0) & r_neg, torch.maximum(lo, nu), lo)
            if iteration % 2 == 0:
                dnu = torch.zeros_like(dnu)
            new_nu = nu + dnu
            new_nu = torch.where((new_nu > lo) & (new_nu < hi) | (dnu == 0), new_nu, 0.5 * (lo + hi))
        else:
            new_nu = nu + dnu
        nu = new_nu if done is None else torch.where(done, nu, new_nu)
        v_new = z - nu
        at_a_new, at_b_new = v_new <= ga, v_new >= gb
        x_new = torch.addcmul(xe, v_new - g, D_all)
        # a step that leaves the interval, or a coordinate that leaves its end: the table's value
        lost = ((x_new <= info.inner_a) | (x_new >= info.inner_b) | clamped) & ~(at_a_new | at_b_new)
        if bool(lost.any()):
            if info.table is not None:
                x_new = torch.where(lost, info.surrogate(v_new)[0].clamp_(info.inner_a, info.inner_b), x_new)
            else:
                x_new = torch.where(lost, _advance(info, a, b, xe, g, D_all, v_new)[0], x_new)
        x_new = x_new.masked_fill_(at_a_new, a).masked_fill_(at_b_new, b)
        if done is None:
            x, at_a, at_b = x_new, at_a_new, at_b_new
        else:
            x = torch.where(done, x, x_new)
            at_a, at_b = torch.where(done, at_a, at_a_new), torch.where(done, at_b, at_b_new)
    if done is None:
        return x, D, torch.zeros(z.shape[:-1], dtype=torch.bool, device=z.device)
    return x, D, done.squeeze(-1)


def _solve_box(reg, z, a, b):
    """x and D of :func:`box_relaxation` for a float64 z: x_i = the mirror map at v = z_i.

    On a bounded interval with a table (:class:`_IntervalInfo`): the table's x~(z) (its active set
    is exact: z <= phi'(a+) gives a, z >= phi'(b-) gives b), then Newton steps x += (z - phi'(x)) D
    on the free coordinates (where a step leaves the interval, the stretched step of :func:`_advance`),
    to the nested solver's precision |phi'(x) - z| <= 16 eps max(1, |z|) (or 4 eps |x| in x); one
    evaluation of phi', phi'' per step, typically 1 (the check) where the table, or its fine one, is
    exact, 2 elsewhere.  The elements still unconverged after ``JOINT_ITER`` steps, and every element
    elsewhere, take :func:`mirror_map`.
    """
    info = None
    if math.isfinite(a) and math.isfinite(b):
        n = z.shape[-1]
        info = _interval_info(reg, a, b, 0.5 * (a + b) * n, n)
    if info is None or not info.usable or info.table is None:
        x, D, _ = mirror_map(reg, z, z.new_tensor(a), z.new_tensor(b))
        return x, D
    eps = torch.finfo(z.dtype).eps
    x, at_a, at_b = info.start(z)
    if info.fine is not None:  # the fine table's x~ on the coarse table's segments: exact to rounding
        x = info.fine_map(x)(z)[0].clamp_(info.inner_a, info.inner_b).masked_fill_(at_a, a).masked_fill_(at_b, b)
    clamped = at_a | at_b  # fixed: v = z does not move
    tol = z.abs().clamp_min(1.0).mul_(16.0 * eps)
    done = clamped
    for _ in range(JOINT_ITER):
        xe = x.masked_fill(clamped, info.c)
        g, h = reg.derivatives(xe)
        D_all = h.reciprocal()
        D = D_all.masked_fill(clamped, 0.0)
        dx = (z - g).mul_(D)
        done = clamped | (dx.abs() <= torch.addcmul(x.abs().mul_(4.0 * eps), tol, D))
        if bool(done.all()):
            return x, D
        x_new = xe + dx
        lost = (x_new <= info.inner_a) | (x_new >= info.inner_b)
        if bool(lost.any()):
            x_new = torch.where(lost, _advance(info, a, b, xe, g, D_all, z)[0], x_new)
        x = torch.where(done, x, x_new)
    # the rest by the safeguarded inverse (a Python-level fallback on the few unconverged entries)
    rest = ~done
    x_rest, D_rest, _ = mirror_map(reg, z[rest], z.new_tensor(a), z.new_tensor(b))
    x, D = x.clone(), D.clone()
    x[rest], D[rest] = x_rest, D_rest
    return x, D


def _solve_sum(reg, z, total, a, b):
    """x and D of :func:`sum_relaxation` for a float64 batch z (B, n): the joint iteration, then the
    nested solver (:func:`_sum_root`) for the rows it left unconverged; the nested solver alone on an
    interval with an infinite end."""
    if math.isfinite(a) and math.isfinite(b):
        info = _interval_info(reg, a, b, total, z.shape[-1])
        if info.usable:
            x, D, done = _joint_sum(reg, z, total, a, b)
            if done is None:
                return x, D
            rest = ~done
            _, x_rest, D_rest = _sum_root(reg, z[rest], total, a, b)
            x, D = x.clone(), D.clone()
            x[rest], D[rest] = x_rest, D_rest
            return x, D
    _, x, D = _sum_root(reg, z, total, a, b)
    return x, D


class _Sum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, Z, reg, total, a, b):
        z = Z.detach().to(torch.float64)
        x, D = _solve_sum(reg, z, total, a, b)
        ctx.save_for_backward(D)
        return x.to(Z.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        # sum x = total fixes dnu = <D, dZ> / sum D, so J = diag(D) - D D^T / sum D (symmetric)
        (D,) = ctx.saved_tensors
        g64 = g.to(D.dtype)
        total = D.sum(-1, keepdim=True)
        grad = D * (g64 - (D * g64).sum(-1, keepdim=True) / total.clamp_min(torch.finfo(D.dtype).tiny))
        return grad.to(g.dtype), None, None, None, None


def sum_relaxation(reg, Z: torch.Tensor, total: float, lower: float, upper: float, what: str = "the polytope"):
    """argmax { <Z, x> - sum_i phi(x_i) : lower <= x <= upper, sum_i x_i = total } over the last dim.

    The KKT conditions give x_i = x(Z_i - nu) (the mirror map on [lower, upper] intersected
    with phi's domain) for the one scalar nu per row that makes the sum right.  On a bounded
    interval (x, nu) are found jointly by :func:`_joint_sum` (a cached table of the inverse of phi'
    for the start, then joint Newton steps); rows it leaves unconverged, and unbounded intervals,
    by the nested :func:`_sum_root`.  Z: (..., n) -> (..., n), same dtype.  Exact backward:
    dZ = D (g - <D, g> / sum D), D = 1 / phi''(x) (0 at the bounds).  Cost: O(n) per evaluation of
    phi', phi''; typically 1 evaluation per batch (2 where the table is not exact and has no fine one)
    and 4-7 of the table (the nested solver: 100-200).  Precision: float64;
    |phi'(x_i) - z_i + nu| <= 16 eps max(1, |z - nu|) on free coordinates, sum x = total to about 16 n eps.
    """
    n = Z.shape[-1]
    a, b = _interval(reg, lower, upper, what)
    if not n * a < total < n * b:
        raise ValueError(
            f"regularizer {reg.name!r}: sum x = {total:g} has no point with every coordinate strictly inside "
            f"[{a:g}, {b:g}] (n = {n}); its domain does not meet the relative interior of {what}"
        )
    return _Sum.apply(Z, reg, float(total), a, b)
