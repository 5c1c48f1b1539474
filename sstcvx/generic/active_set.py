"""The active-set method of the fast generic solver's Euclidean case: a guess of the active pairs, an
exact solve with them held, and sign flips until the sign conditions hold.

Used by :mod:`~sstcvx.generic.interior_point` (its states, layout and problem are that module's) in two
places: before the first iteration (:func:`euclidean_start`) and on elements near their solution
(:func:`polish`).

Polish (the Euclidean regularizer on declarations without auxiliary variables, where the problem
is a strictly convex quadratic program): once an element's largest complementarity product is
below ``POLISH_START`` (of :mod:`~sstcvx.generic.interior_point`) times the form's scale, its
active set is guessed (a slack below its multiplier), the active rows and bounds are held at equality and the others dropped, and the
remaining equality-constrained problem is solved exactly by one Newton step on (x, nu)
(:func:`polish`); pairs that break their sign condition change sides and the element is solved
again (``POLISH_ROUNDS`` times at most: a primal-dual active-set step; from round
``SINGLE_FLIP_AFTER`` on, an element whose count of broken conditions is not below its best
changes only its most broken pair), with ``POLISH_TRIES`` attempts per element (an active-set
method can cycle on a degenerate element).  An element whose polished point has every held
multiplier and dropped slack non-negative, its held rows met and its dual residual below the
tolerances is done, with complementarity exactly 0: an interior point can approach a
near-degenerate pair only as mu / s, the polish lands on it.  The same active-set solve also runs
before the interior point (:func:`euclidean_start`), with ``START_ROUNDS`` rounds when its guess
breaks at most ``START_MAX_WRONG`` sign conditions per element on average; the elements it solves never
iterate.  The guess (:func:`dual_guess`): the active set of ``START_DUAL_STEPS`` accelerated
projected gradient steps on the dual of the projection (held: the rows with a positive
multiplier, the bounds that z - C^T nu leaves); where that holds a row together with bounds on
all its columns (a degenerate vertex: the system is then singular), the active set of the box's
solution instead (:func:`box_guess`: x = z clamped; the bounds z leaves and the rows that x
violates held, except the bounds of a held row's columns).  No polish for a nonlinear f (see
:func:`~sstcvx.generic.interior_point._polishes`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from . import normal_matrix
from .normal_matrix import HUGE, TINY

# In a polished solution, the vanishing member of a complementarity pair is 0 (a slack) or TINY (a
# multiplier); a row dropped from the polish system gets the diagonal weight HUGE.

if TYPE_CHECKING:
    from .interior_point import InteriorPointProblem, _Layout

#: Rounds of the active-set method that starts the Euclidean case (negative: none).
START_ROUNDS = 12
#: ... unless its guess breaks more sign conditions than this per element on average: the active set then
#: changes by a fraction per round, and the rounds cost more than the interior-point iterations they replace.
START_MAX_WRONG = 12.0
#: From this round on, an element of :func:`polish` whose count of broken sign conditions has not fallen below
#: its best changes only its most broken pair (the full flips can cycle; the polish inside the iteration,
#: with POLISH_ROUNDS rounds, never gets there).
SINGLE_FLIP_AFTER = 4
#: Accelerated projected gradient steps on the projection's dual that guess the start's active set
#: (:func:`dual_guess`; 0: the box's guess everywhere).  Fewer steps leave more wrong pairs; more overshoot
#: (the extrapolation).
START_DUAL_STEPS = 5
#: ... stopped after the first where that flags this fraction of the batch degenerate (the box's guess then
#: serves every element: the fraction falls only a little over the steps, and the few elements left would
#: gain less than the steps cost).
START_DUAL_GIVE_UP = 0.6
#: The dtype of those steps (a guess only: the polish's solve and test are in float64); float32 halves the
#: products' cost on CPU.
START_DUAL_DTYPE = torch.float32


def polish(ip: InteriorPointProblem, lay: _Layout, T, zs, sz, tolerance: float, rounds: int = 1, max_wrong=math.inf):
    """Active-set polish of the elements ``T (B, width)`` (with ``zs = z / sz (B, nx)``, ``sz (B, 1)``) for
    the Euclidean regularizer: guess the active pairs (a slack below its multiplier), hold them at
    equality (the bound's value, the row's right-hand side), drop the others, and solve the remaining
    equality-constrained quadratic program exactly (one Newton step on (x, nu), :func:`solve_held`).
    Where the solution breaks a sign condition (a held pair's multiplier or a dropped pair's slack below
    -tolerance), the offending pairs change sides and that element is solved again, up to ``rounds``
    more times (a primal-dual active-set step; from round ``SINGLE_FLIP_AFTER`` on, an element that is
    not improving changes only its most broken pair), unless the first solve broke more than
    ``max_wrong`` sign conditions per element on average.  Returns ``(T', g', h', accepted (B,))``: the
    polished state, laid out as T, with the vanishing member of every pair at 0 (a slack) or ``TINY``
    (a multiplier), so that the backward reads the active set from it; its derivatives; and which
    elements are solved: sign conditions met, held rows met and the dual residual on the free
    coordinates below the tolerances, complementarity exact -- so that the caller's convergence test
    passes on them.  Only for declarations without auxiliary variables (f is then strictly convex on
    every free coordinate)."""
    held = (T[:, lay.o_s :] < T[:, lay.o_y : lay.o_s]) & lay.exists
    Tn, g, h, margin, solved = solve_held(ip, lay, T, zs, sz, held, tolerance)
    wrong = margin < -tolerance
    if rounds and wrong.sum(-1).float().mean() > max_wrong:
        # far from the final active set: it would change by a fraction per round, and the rounds
        # would cost more than the interior-point iterations they replace
        rounds = 0
    best = wrong.sum(-1)
    for r in range(rounds):
        again = wrong.any(-1).nonzero().squeeze(1)
        if not again.numel():
            break
        flip = wrong[again]
        if r >= SINGLE_FLIP_AFTER:
            # an element whose count of broken conditions is no lower than its best so far may be cycling:
            # it changes only its most broken pair
            count = flip.sum(-1)
            stuck = count >= best[again]
            best[again] = torch.minimum(best[again], count)
            if bool(stuck.any()):
                worst = margin[again].argmin(-1, keepdim=True)
                single = torch.zeros_like(flip).scatter_(1, worst, True)
                flip = torch.where(stuck[:, None], single, flip)
        held[again] ^= flip
        Tn[again], g[again], h[again], margin[again], solved[again] = solve_held(
            ip, lay, T[again], zs[again], sz[again], held[again], tolerance
        )
        wrong[again] = margin[again] < -tolerance
    return Tn, g, h, ~wrong.any(-1) & solved


def solve_held(ip: InteriorPointProblem, lay: _Layout, T, zs, sz, held, tolerance: float):
    """One solve of :func:`polish` with the pairs ``held (B, P)`` at equality: ``(T', g', h', margin
    (B, P), solved (B,))``, margin each pair's sign condition (its multiplier if held, its slack over the
    form's scale if dropped, +inf for an absent pair; below -tolerance: broken), solved whether the
    held rows are met to tolerance times the form's scale and the dual residual on the free
    coordinates is below tolerance (rounding only, for this exact solve).  In the scaled problem
    f' = x / sz and f'' = 1 / sz.  Masks are applied as float factors: fewer and cheaper operations
    than ``torch.where`` on these small tensors."""
    N, m, m_eq, mi = lay.N, lay.m, lay.m_eq, lay.mi
    scale = ip.dual.scale
    on = held.to(T.dtype)
    off = 1.0 - on
    rows, at_lo, at_up = on[:, :mi], on[:, mi : mi + N], on[:, mi + N :]
    free = 1.0 - at_lo - at_up
    v = T[:, :N] * free + at_lo * ip.lo + at_up * ip.up
    nu = T[:, N : N + m].clone()
    nu[:, m_eq:] *= rows
    # a dropped row leaves the system through a huge diagonal weight (equilibration makes it harmless)
    extra = off[:, :mi] * HUGE
    phi_inv = free * sz
    rd = v / sz - zs + nu @ ip.C
    rp = v @ ip.C.T - ip.d
    rp[:, m_eq:] *= rows
    dnu = normal_matrix.solve(ip, normal_matrix.factor(ip, extra, phi_inv), rp - (phi_inv * rd) @ ip.C.T)
    dnu[:, m_eq:] *= rows
    nu += dnu
    v = v - phi_inv * (rd + dnu @ ip.C)
    g, h = v / sz, torch.ones_like(v) / sz
    r = g - zs + nu @ ip.C
    rp = v @ ip.C.T - ip.d
    # every pair's multiplier if held and slack if dropped, laid out as the pairs [rows | lower | upper]
    multiplier = torch.cat([nu[:, m_eq:], r, -r], 1)
    slack = torch.cat([-rp[:, m_eq:], v, -v], 1) * lay.mask + lay.slack_offset
    margin = torch.where(lay.exists, on * multiplier + off * slack / scale, math.inf)
    rp[:, m_eq:] *= rows
    solved = (rp.abs().amax(-1) <= tolerance * scale) if m else torch.ones_like(sz[:, 0], dtype=torch.bool)
    if N:
        solved &= (r.abs() * free).amax(-1) <= tolerance
    Y = (on * multiplier).clamp_min_(TINY) * lay.mask
    Tn = torch.cat([v, nu[:, :m_eq], Y, (off * slack).clamp_min_(0.0)], 1)
    return Tn, g, h, margin, solved


def box_guess(ip: InteriorPointProblem, lay: _Layout, z):
    """A state whose active set (for :func:`polish`) is that of the box alone: x = z clamped to its
    bounds (the Euclidean solution without the rows), the bounds z leaves and the rows that x
    violates held."""
    x = torch.where(ip.has_lo > 0, torch.maximum(z, ip.lo), z)
    x = torch.where(ip.has_up > 0, torch.minimum(x, ip.up), x)
    G = ip.C[lay.m_eq :]
    rows = (x @ G.T > ip.d[lay.m_eq :]).to(z.dtype)
    # a column of a held row is left free (holding its bound too would over-determine the row)
    touched = (rows @ (G != 0).to(z.dtype)) > 0
    slack = torch.cat([z, -z], 1) * lay.mask[lay.mi :] + lay.slack_offset[lay.mi :]
    bounds = ((slack < 0) & ~touched.repeat(1, 2)).to(z.dtype)
    held = torch.cat([rows, bounds], 1)
    nu = z.new_zeros(z.shape[0], lay.m_eq)
    return torch.cat([x, nu, held, 1.0 - held], 1)


def dual_guess(ip: InteriorPointProblem, lay: _Layout, z, steps: int):
    """A state whose active set (for :func:`polish`) is that of ``steps`` accelerated projected
    gradient steps (FISTA) on the dual of the Euclidean projection of ``z (B, N)`` onto P, from nu = 0:
    for multipliers nu of the rows (y >= 0 on the inequality rows), x(nu) = z - C^T nu clamped to the
    bounds, the dual's gradient is C x(nu) - d, Lipschitz with constant ||C||_2^2 (the step's inverse,
    computed once per problem).  Held: the inequality rows with y > 0 and the bounds that z - C^T nu
    leaves.  Returns ``(T (B, width), degenerate (B,))``, degenerate where a held row has every column
    held at a bound (the guess then over-determines the system: the row's multiplier is not fixed by
    it), or None where after the first step a fraction ``START_DUAL_GIVE_UP`` of the batch is
    degenerate.  The steps run in ``START_DUAL_DTYPE`` (an element whose z overflows it gets a useless
    guess, which the polish's test rejects).  Cost: 2 ``steps`` + 2 products of (B, m) or (B, N) with C,
    about 6 ``steps`` elementwise operations and one host synchronization."""
    m_eq = lay.m_eq
    if ip.dual_guess is None:
        L = float(torch.linalg.matrix_norm(ip.C, 2)) ** 2 if lay.m else 1.0
        step = 1.0 / max(L, 1e-300)
        lo = torch.where(ip.has_lo > 0, ip.lo, -math.inf)
        up = torch.where(ip.has_up > 0, ip.up, math.inf)
        f = START_DUAL_DTYPE
        ip.dual_guess = tuple(
            a.to(f).contiguous() for a in ((-ip.C), step * ip.C.T, step * ip.d, lo, up, (ip.C[m_eq:] != 0).T)
        )
    negC, sCT, sd, lo, up, GT = ip.dual_guess
    dt, z = z.dtype, z.to(START_DUAL_DTYPE)

    def active(nu):
        # the active set of nu and whether it is degenerate
        u = torch.addmm(z, nu, negC)
        rows = nu[:, m_eq:] > 0
        below, above = u < lo, u > up
        return u, rows, below, above, (rows & ((~(below | above)).to(z.dtype) @ GT == 0)).any(1)

    nu = w = z.new_zeros(z.shape[0], lay.m)
    x, t = z.clamp(lo, up), 1.0
    for k in range(steps):
        if k:
            x = torch.addmm(z, w, negC).clamp_(lo, up)
        # a projected gradient step from the extrapolated point w, then the next extrapolation
        nxt = torch.addmm(w.sub(sd), x, sCT)
        (nxt[:, m_eq:] if m_eq else nxt).clamp_min_(0.0)
        if k == 0 and steps > 1 and float(active(nxt)[4].to(z.dtype).mean()) >= START_DUAL_GIVE_UP:
            return None  # the batch is at degenerate vertices (the flag persists over the steps)
        t_next = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * t * t))
        w = torch.lerp(nu, nxt, 1.0 + (t - 1.0) / t_next)
        nu, t = nxt, t_next
    u, rows, below, above, degenerate = active(nu)
    held = torch.cat([rows, below, above], 1).to(dt)
    return torch.cat([u.clamp_(lo, up).to(dt), nu[:, :m_eq].to(dt), held, 1.0 - held], 1), degenerate


def euclidean_start(ip: InteriorPointProblem, lay: _Layout, z, zs, sz, tolerance: float):
    """The active-set method that starts the Euclidean case: :func:`polish` with ``START_ROUNDS``
    rounds from :func:`dual_guess` with ``START_DUAL_STEPS`` steps, or from :func:`box_guess` on the
    elements where that guess is degenerate (or everywhere with no steps).  Returns :func:`polish`'s
    tuple."""
    if START_DUAL_STEPS <= 0:
        T = box_guess(ip, lay, z)
    else:
        guess = dual_guess(ip, lay, z, START_DUAL_STEPS)
        if guess is None:
            T = box_guess(ip, lay, z)
        else:
            T, degenerate = guess
            if bool(degenerate.any()):
                T = torch.where(degenerate[:, None], box_guess(ip, lay, z), T)
    return polish(ip, lay, T, zs, sz, tolerance, START_ROUNDS, START_MAX_WRONG)
