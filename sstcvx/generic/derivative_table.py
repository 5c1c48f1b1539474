"""A tabulated surrogate of phi' and phi'' for a user's separable regularizer, for the compiled interior point.

Problem.  The interior point's compiled kernel (:mod:`~sstcvx.generic._compiled_interior_point`) runs its whole
iteration in one call for the built-in entropies, whose phi' and phi'' it evaluates itself.  A user's phi is a
torch function: evaluating it between the kernel's iterations costs one call of it (two autograd passes where its
derivatives are not given) per iteration, 15-20 per solve, which was most of the time of a solve.  This module
replaces phi' and phi'' *during the iteration* by a table of them that the kernel reads; the iteration then
continues from the table's solution with the exact phi' and phi'' until the usual stop test passes (see
:func:`~sstcvx.generic._compiled_interior_point.run`).  The table moves the path, never the answer: the
returned point passes the same test on the exact derivatives as without it, and phi'' for the backward is the
exact one there.

Table.  On an interval [a, b] (finite: the caller's holds every coordinate of x at every point of P), in a
coordinate s with x = X(s) chosen as in :mod:`sstcvx.separable` (the ends where phi' is infinite, *barriers*,
found by :func:`~sstcvx.separable.barrier_ends`):

* both ends barriers: x = a + w sigmoid(s) (w = b - a), s in [-REACH, REACH];
* a barrier at a only: x = a + e^s, s in [log w - REACH, log w]; at b only: x = b - e^-s;
* neither: x = a + w sin^(2p)(pi s / 2), s in [0, 1], nodes crowding towards both ends, where phi' often behaves
  as a power: with phi'(x) - phi'(a) ~ (x - a)^beta (measured at the lower end, :func:`_end_exponent`), the
  power p = 1 / (2 beta) makes phi' linear in s there (p = 1, quadratic crowding, for x^1.5 at 0 and wherever
  beta is not in ``POWER_RANGE``; 2.5 for the Tsallis 1.2-entropy); the upper end keeps quadratic crowding.

The coordinate of a point is computed from its distances to both ends (s = log(x - a) - log(b - x),
(2 / pi) atan2(sqrt(x - a), sqrt(b - x)), ...: accurate near either end).  Towards a barrier at an end e other
than 0, x itself resolves distances to e only down to about |e| eps, so the nodes stop at the distance
``RESOLUTION`` |e|, where the rounding of x moves s by about 1e-12.  G(s) = phi'(X(s)) is tabulated at
``NODES`` nodes uniform in s, with G'(s) = phi''(X(s)) X'(s) (at the ends' own nodes a few ulps inside, where
phi'' may be infinite but phi'' X' has a finite limit), and interpolated on each segment by the cubic Hermite
polynomial through both nodes' values and slopes.  Beyond the first and the last node G is extended linearly
in s: exact for a logarithmic barrier such as x log x, whose phi' is linear in s, an approximation for other
barriers (x within e^-REACH w of 0, or within ``RESOLUTION`` |e| of another end); beyond an end of the sine map
that is only a bound (the iterates cross bounds before they converge), by phi's tangent line there; beyond an
end of phi's domain x is clamped to it, as the exact iteration clamps.  The surrogate's derivatives are
g = G(s) and h = G'(s) / X'(s): h is the derivative of g, so the iteration on the surrogate is Newton's method on
a strictly convex problem.  Segment coefficients are stored as rows ``(c0, c1, c2, c3)`` of
G = c0 + t (c1 + t (c2 + t c3)), t in [0, 1] the position in the segment: a lookup is one floor, one row and a
few multiply-adds, no search.  Precision (measured at 1e5 points): phi' to 5e-13 relative to max(1, |phi'|)
for x log x / 2 + x^2 / 4, 1e-13 for the binary entropy, 1e-15 for x^1.5 and x^4 + 0.01 x^2; phi'' to 1e-8 -
1e-10 relative away from the ends, less close to an end where phi' is finite (there the bound's own barrier
term dominates the iteration's Phi).

A segment whose cubic would not keep G' > 0 (the minimum of the quadratic G') is linear instead, and at the two
outermost nodes a slope phi'' X' that is infinite or 0 (phi' like x^0.7 or x^2 at a finite-slope end) is
replaced by the adjacent secant, so that h > 0 everywhere and the surrogate is strictly convex.  Accepted only
where it is a faithful surrogate: phi' increasing over the nodes, everything finite, and |G - phi'| at three
points inside every segment at most ``TOLERANCE`` max(1, |phi'|) (the exact iteration then typically needs 0-2
steps from the table's solutions).  Otherwise :func:`table_for` returns None and the kernel evaluates phi' and
phi'' in torch at every iteration, as before.

Accepted, for example: the Tsallis alpha-entropies on [0, 1] for alpha from 1.2 to 3 (errors 2e-15 to 3e-9;
6e-11 for alpha = 1.2), x^3 (phi'' = 0 at 0).  Not accepted: a phi' with detail finer than the nodes.

Cost: one evaluation of phi' and phi'' on ``NODES`` points and one on 3 ``NODES`` points, once per regularizer and
interval (cached per regularizer, 3-20 ms); 256 KiB per table.  A phi that reads state besides x (a closure
over a value the user changes) makes a cached table stale: the kernel's wrapper compares the table with the
exact phi' where the exact iteration starts and drops a table that disagrees (see :func:`discard`).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import numpy as np
import torch

#: Nodes of a table (uniform in s).  The Hermite interpolant's error falls as the fourth power of the step: for
#: x log x / 2 + x^2 / 4 it is about 5e-13 at 8192 nodes (the iteration's dual tolerance is 1e-11).
NODES = 8192
#: How far the coordinate s reaches towards a barrier: x - a down to e^-REACH times the interval's width.
REACH = 36.0
#: Towards a barrier at an end e other than 0, the nodes keep a distance of at least |e| RESOLUTION to it.
RESOLUTION = 1e12 * 2.0**-53
#: A table is accepted where its phi' is within TOLERANCE max(1, |phi'|) of the exact one inside its range (a
#: looser table costs exact iterations after the table's, never accuracy).
TOLERANCE = 1e-6
#: Tables a regularizer may have dropped as stale before it gets none (its phi then changes between calls).
STALE_LIMIT = 2

MAP_SIGMOID, MAP_LOWER, MAP_UPPER, MAP_SINE = range(4)
#: The smallest distance to an end the surrogate reads (a coordinate's distance is clamped to it).
TINY = 1e-300
_BELOW_ONE = 1.0 - 2.0**-53


@dataclass
class DerivativeTable:
    """The table of one regularizer on one interval [a, b]: the map (``MAP_*``), the first node ``s_lo``, the
    inverse of the node step, the segments' coefficients ``rows (NODES - 1, 4)`` and the largest error of its
    phi' measured at build (relative to max(1, |phi'|))."""

    map: int
    a: float
    b: float
    s_lo: float
    inverse_step: float
    rows: np.ndarray
    error: float
    #: the sine map's linear extension beyond a and b: phi'' there, NaN at an end of phi's domain (x beyond it
    #: is clamped to it, as the exact iteration clamps x into the domain)
    slope_a: float = math.nan
    slope_b: float = math.nan
    #: the sine map's power p (x = a + w sin^(2p)(pi s / 2)), 1 / (2 beta) where phi' - phi'(a) ~ (x - a)^beta
    power: float = 1.0

    def derivatives(self, x: np.ndarray):
        """The surrogate's (phi'(x), phi''(x)) at the points ``x`` (a float64 array), by the kernel's arithmetic
        in numpy (:func:`~sstcvx.generic._compiled_interior_point._table_point`): what the build's error check and
        the tests read."""
        s, dx = _coordinate(self.map, np.maximum(x - self.a, TINY), np.maximum(self.b - x, TINY), self.power)
        p = (s - self.s_lo) * self.inverse_step
        last = self.rows.shape[0]
        i = np.clip(np.floor(p), 0, last - 1).astype(np.int64)
        t = p - i
        c0, c1, c2, c3 = np.moveaxis(self.rows[i], -1, 0)
        # linear beyond the first and the last node
        t_in = np.clip(t, 0.0, 1.0)
        G_in = c0 + t_in * (c1 + t_in * (c2 + t_in * c3))
        dG = c1 + t_in * (2.0 * c2 + 3.0 * t_in * c3)
        G = G_in + (t - t_in) * dG
        h = dG * self.inverse_step / dx
        if self.map == MAP_SINE:
            for end, value, slope, beyond in (
                (self.a, self.rows[0, 0], self.slope_a, x < self.a),
                (self.b, self.rows[-1].sum(), self.slope_b, x > self.b),
            ):
                if math.isfinite(slope):
                    G = np.where(beyond, value + slope * (x - end), G)
                    h = np.where(beyond, slope, h)
        return G, h


def _x_of_s(kind: int, a: float, b: float, s: torch.Tensor, power: float = 1.0) -> torch.Tensor:
    """x = X(s) of the map ``kind`` on [a, b] (``power``: the sine map's p)."""
    w = b - a
    if kind == MAP_SIGMOID:
        return a + w * torch.sigmoid(s)
    if kind == MAP_LOWER:
        return a + torch.exp(s)
    if kind == MAP_UPPER:
        return b - torch.exp(-s)
    return a + w * torch.sin(0.5 * math.pi * s) ** (2.0 * power)


def _coordinate(kind: int, da, db, power: float = 1.0):
    """s and X'(s) at the point at distances ``da = x - a``, ``db = b - x`` from the ends (positive; numpy or
    torch), by the kernel's formulas (the sine map's s by an arctangent of both distances: accurate at both
    ends; with a power p, sin^2 = q = (da / w)^(1/p) near a, cos^2 = 1 - q = -expm1(log1p(-db / w) / p) near b,
    and X' = w p pi sin^(2p - 1) cos = p pi da cos / sin)."""
    lib = np if isinstance(da, np.ndarray) else torch
    if kind == MAP_SIGMOID:
        return lib.log(da) - lib.log(db), da * db / (da + db)
    if kind == MAP_LOWER:
        return lib.log(da), da
    if kind == MAP_UPPER:
        return -lib.log(db), db
    if power == 1.0:
        sa, sb = lib.sqrt(da), lib.sqrt(db)
        return lib.arctan2(sa, sb) * (2.0 / math.pi), math.pi * sa * sb
    w = da + db
    near_a = da <= db
    # q = sin^2 from the nearer end's distance (the other one's expression is evaluated too, unused there)
    q_a = lib.exp(lib.log(da / w) / power)
    rest_b = -lib.expm1(lib.log1p(-lib.clip(db / w, 0.0, _BELOW_ONE)) / power)
    q, rest = lib.where(near_a, q_a, 1.0 - rest_b), lib.where(near_a, 1.0 - q_a, rest_b)
    sin, cos = lib.sqrt(q), lib.sqrt(rest)
    return lib.arctan2(sin, cos) * (2.0 / math.pi), power * math.pi * da / sin * cos


#: Where phi' - phi'(a) ~ (x - a)^beta at a finite-slope end a with beta in this range, the sine map takes the
#: power p = 1 / (2 beta), so that phi' is linear in s there (beta = 1/2, x^1.5 at 0, is the plain sine map's
#: case, kept where p is within POWER_SLACK of 1; beta = 1, a phi'' finite at a, keeps it too).
POWER_RANGE = (0.05, 0.9)
POWER_SLACK = 0.02


def _end_exponent(reg, a: float, w: float, delta_a: float) -> float:
    """beta in phi'(a + d) - phi'(a + delta_a) ~ d^beta, from d = 1e-9 w and 1e-6 w (1 for a phi'' finite at a)."""
    points = torch.tensor([a + delta_a, a + 1e-9 * w, a + 1e-6 * w], dtype=torch.float64)
    g = reg.derivatives(points)[0]
    rise_near, rise_far = float(g[1] - g[0]), float(g[2] - g[0])
    if not (rise_near > 0 and rise_far > rise_near):
        return 1.0
    return math.log(rise_far / rise_near) / math.log(1e3)


def build(reg, a: float, b: float) -> DerivativeTable | None:
    """The table of ``reg`` on [a, b] (both finite, inside its domain), or None where it is not accepted (see
    the module)."""
    from ..separable import _deltas, barrier_ends

    if not (math.isfinite(a) and math.isfinite(b) and a < b):
        return None
    av, bv = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    barrier_a, barrier_b = (bool(t) for t in barrier_ends(reg, av, bv))
    w = b - a

    def reach(end):
        # towards a barrier at an end other than 0, x resolves distances to it only down to about |end| eps: the
        # nodes stop where the rounding of x moves s by about 1e-12 (linear beyond, as past REACH)
        return REACH if end == 0.0 else min(REACH, math.log(w / (abs(end) * RESOLUTION)))

    if barrier_a and barrier_b:
        kind, s_lo, s_hi = MAP_SIGMOID, -reach(a), reach(b)
    elif barrier_a:
        kind, s_lo, s_hi = MAP_LOWER, math.log(w) - reach(a), math.log(w)
    elif barrier_b:
        kind, s_lo, s_hi = MAP_UPPER, -math.log(w), reach(b) - math.log(w)
    else:
        kind, s_lo, s_hi = MAP_SINE, 0.0, 1.0
    delta_a, delta_b = (float(t) for t in _deltas(av, bv))
    beta = _end_exponent(reg, a, w, delta_a) if kind == MAP_SINE else 1.0
    power = 1.0 / (2.0 * beta) if POWER_RANGE[0] <= beta <= POWER_RANGE[1] else 1.0
    power = 1.0 if abs(power - 1.0) <= POWER_SLACK else power
    s = torch.linspace(s_lo, s_hi, NODES, dtype=torch.float64)
    step = (s_hi - s_lo) / (NODES - 1)
    # phi', phi'' at the nodes, each a few ulps inside [a, b] (the ends' own nodes included: where phi'' is
    # infinite at a finite-slope end, as for x^1.5 at 0, phi'' X' there is the finite limit)
    x = _x_of_s(kind, a, b, s, power).clamp(a + delta_a, b - delta_b)
    da, db = (x - a).clamp_min(TINY), (b - x).clamp_min(TINY)
    dx = _coordinate(kind, da, db, power)[1]
    g, h = reg.derivatives(x)
    G, dG = g, h * dx * step  # the slope per unit of t
    G0, G1 = G[:-1], G[1:]
    secant = G1 - G0
    if not bool(torch.isfinite(G).all() & (secant > 0).all() & torch.isfinite(dG[1:-1]).all() & (dG[1:-1] > 0).all()):
        return None  # phi' not resolved as increasing on the nodes
    # at the two outermost nodes phi'' x' may be infinite or 0 (phi' like x^0.2 or x^2 at a finite-slope end):
    # there the adjacent segment's secant
    dG = dG.clone()
    for end, inner in ((0, 0), (-1, -1)):
        if not (math.isfinite(float(dG[end])) and float(dG[end]) > 0):
            dG[end] = secant[inner]
    m0, m1 = dG[:-1], dG[1:]
    # Hermite on t in [0, 1]: c0 = G0, c1 = G0', c2 = 3 (G1 - G0) - 2 G0' - G1', c3 = 2 (G0 - G1) + G0' + G1'
    cubic = torch.stack([G0, m0, 3.0 * secant - 2.0 * m0 - m1, -2.0 * secant + m0 + m1], -1)
    # G'(t) = c1 + 2 c2 t + 3 c3 t^2 must stay positive on [0, 1] (it is at both ends): at the vertex where that
    # lies inside; a segment where it does not is linear (G' its secant: positive, but not continuous)
    c1, c2, c3 = cubic[:, 1], cubic[:, 2], cubic[:, 3]
    vertex = torch.where(c3 != 0, -c2 / (3.0 * c3), torch.full_like(c3, -1.0))
    inside = (vertex > 0) & (vertex < 1) & (c3 > 0)
    at_vertex = c1 + vertex * (2.0 * c2 + 3.0 * vertex * c3)
    monotone = torch.isfinite(cubic).all(-1) & ~(inside & ~(at_vertex > 0))
    linear = torch.stack([G0, secant, torch.zeros_like(G0), torch.zeros_like(G0)], -1)
    rows = torch.where(monotone[:, None], cubic, linear)
    table = DerivativeTable(kind, a, b, s_lo, 1.0 / step, rows.contiguous().numpy().copy(), math.inf, power=power)
    if kind == MAP_SINE:
        # beyond an end that is only a bound (the iterates cross bounds before they converge), the tangent line of
        # phi' there: the surrogate stays smooth and strictly convex
        inner = reg.derivatives(torch.tensor([a + delta_a, b - delta_b], dtype=torch.float64))[1]
        lo, hi = reg.domain
        table.slope_a = float(inner[0]) if a > lo and math.isfinite(float(inner[0])) else math.nan
        table.slope_b = float(inner[1]) if b < hi and math.isfinite(float(inner[1])) else math.nan
    # the error of phi' at a quarter, the middle and three quarters of every segment
    probe = (s[:-1, None] + step * s.new_tensor([0.25, 0.5, 0.75])).reshape(-1)
    xp = _x_of_s(kind, a, b, probe, power)
    xp = xp[(xp > a) & (xp < b)]
    exact, _ = reg.derivatives(xp)
    approx, _ = table.derivatives(xp.numpy())
    error = float(((torch.from_numpy(approx) - exact).abs() / exact.abs().clamp_min(1.0)).max())
    if not error <= TOLERANCE:
        return None
    table.error = error
    return table


#: per regularizer: {(a, b): DerivativeTable or None, "stale": how many tables it had dropped}
_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def table_for(reg, a: float, b: float) -> DerivativeTable | None:
    """The cached table of ``reg`` on [a, b] (built on first use), None where there is none (not accepted, an
    infinite end, or a regularizer whose tables went stale ``STALE_LIMIT`` times)."""
    try:
        cache = _TABLES.setdefault(reg, {"stale": 0})
    except TypeError:  # a regularizer that cannot be weakly referenced: no cache, so no table
        return None
    if cache["stale"] >= STALE_LIMIT:
        return None
    key = (a, b)
    if key not in cache:
        cache[key] = build(reg, a, b)
    return cache[key]


def discard(reg, a: float, b: float) -> None:
    """Drop the cached table of ``reg`` on [a, b]: it no longer matches phi (phi read state that changed).  The
    next call builds it again, until the regularizer has dropped ``STALE_LIMIT`` tables."""
    cache = _TABLES.get(reg)
    if cache is not None and cache.pop((a, b), None) is not None:
        cache["stale"] += 1
