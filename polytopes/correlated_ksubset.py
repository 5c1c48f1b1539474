"""Correlated k-subsets: k-hot vectors x of length n together with the indicators y_i = x_i x_{i+1}.

X = {(x, y) : x in {0, 1}^n, sum x = k, y_i = x_i x_{i+1} for i = 0..n-2}, embedded as
the vector (x, y) of length 2n - 1 (x first); P = conv(X).  A utility (theta, phi) scores
a subset S as sum_{i in S} theta_i + sum_{i, i+1 in S} phi_i, so that phi > 0 rewards
choosing neighbours together (contiguous rationales in a text, adjacent pixels).  This is
the "correlated k-subset" of Paulus et al. (NeurIPS 2020, §8.3).

Every solver runs a dynamic program over the states (position i, count c of items chosen
among 0..i, bit x_i): a chain of n steps with (k + 1) x 2 states each, vectorised over the
batch and the counts.  Specialized solvers (Z = U / tau, shape (B, 2n - 1)):

* hard argmax: the max-plus program, then a forward reconstruction;
* ``exp_family_entropy``: the Gibbs marginals by the log-space forward-backward program,
  with the exact backward (the covariance-vector product by one more forward and backward
  pass of tangents).

The CVXPY declaration is the same program's paths as a network flow (an extended
formulation: exactly conv(X)), so the generic path serves every CVXPY regularizer
(``binary_entropy``, ``euclidean``, ``entropy``, users' own).
"""

from __future__ import annotations

import math

import cvxpy as cp
import numpy as np
import scipy.sparse as sp
import torch

from sstcvx import Polytope, register_argmax, register_relaxation
from sstcvx.families import Family, register_family

from ._validation import check_int

# _enumerate_vertices returns None above this many vertices or this many entries (8 MB in float64).
MAX_VERTICES = 5000
MAX_ENTRIES = 1_000_000


class CorrelatedKSubset(Polytope):
    """conv{(x, y) : x in {0, 1}^n, sum x = k, y_i = x_i x_{i+1}}: k-subsets with their adjacent pairs.

    ``CorrelatedKSubset(n, k)`` with n >= 2 and 1 <= k <= n - 1; event shape
    ``(2 n - 1,)``: the n item indicators x, then the n - 1 pair indicators y.
    Vertices: one per k-subset, in lexicographic order of the index sets (the order
    of :class:`polytopes.KSubset`), listed while C(n, k) <= ``MAX_VERTICES`` and
    (2n - 1) C(n, k) <= ``MAX_ENTRIES``.
    """

    def __init__(self, n: int, k: int):
        n, k = check_int(n, "n"), check_int(k, "k")
        if n < 2:
            raise ValueError(f"n: expected an int >= 2 (correlated k-subsets need 1 <= k <= n - 1), got n={n}")
        if not 1 <= k <= n - 1:
            raise ValueError(f"k: expected 1 <= k <= n - 1 = {n - 1} for n={n}, got k={k}")
        super().__init__((2 * n - 1,), name=f"CorrelatedKSubset(n={n}, k={k})")
        self.n, self.k = n, k

    def _flow_network(self):
        """The dynamic program as a graph: ``(states, arcs)``.

        A state (i, c, b) means "after item i, c items are chosen and x_i = b"; only the
        states on some path from the start to a final state (n - 1, k, b) are kept.  An
        arc ``(tail, head)`` chooses x_i = head's bit; tail ``None`` is the start.
        """
        n, k = self.n, self.k

        def useful(i, c, b):  # reachable from the start and completable to count k
            return b <= c <= k and c - b <= i and k - c <= n - 1 - i

        states = [(i, c, b) for i in range(n) for c in range(k + 1) for b in (0, 1) if useful(i, c, b)]
        arcs = [(None, (0, b, b)) for b in (0, 1) if useful(0, b, b)]
        for i, c, b in states:
            for bit in (0, 1):
                head = (i + 1, c + bit, bit)
                if i + 1 < n and useful(*head):
                    arcs.append(((i, c, b), head))
        return states, arcs

    def _declare(self):
        """The path polytope of the dynamic program, projected to (x, y).

        Flow variables f >= 0 on the arcs of :meth:`_flow_network`, one unit leaving the
        start and conservation at every state but the final ones.  The constraint matrix
        of a flow network is totally unimodular, so the vertices of this polytope are
        the start-to-end paths, which are in one-to-one correspondence with the k-subsets;
        x_i (the flow entering states (i, ., 1)) and y_i (the flow on arcs (i, ., 1) ->
        (i + 1, ., 1)) are linear in f, and the image of a polytope is the convex hull of
        the images of its vertices: exactly P.  A few valid inequalities on (x, y) alone
        (0 <= x, y <= 1, sum x = k, y_i <= x_i, y_i <= x_{i+1}, x_i + x_{i+1} - y_i <= 1)
        are added: they cut nothing and let the generic path check its solutions'
        feasibility.  Size: O(n k) flow variables and rows.
        """
        n, k = self.n, self.k
        states, arcs = self._flow_network()
        index = {s: j for j, s in enumerate(states)}
        m = len(arcs)
        rows, cols, vals = [], [], []  # conservation: inflow - outflow = 0 at non-final states
        x_rows, x_cols, y_rows, y_cols = [], [], [], []
        start_arcs = []
        for a, (tail, head) in enumerate(arcs):
            if tail is None:
                start_arcs.append(a)
            elif tail[0] < n - 1:
                rows.append(index[tail])
                cols.append(a)
                vals.append(-1.0)
            if head[0] < n - 1:
                rows.append(index[head])
                cols.append(a)
                vals.append(1.0)
            if head[2] == 1:
                x_rows.append(head[0])
                x_cols.append(a)
                if tail is not None and tail[2] == 1:
                    y_rows.append(tail[0])
                    y_cols.append(a)
        inner = sorted(set(rows))
        renumber = {r: j for j, r in enumerate(inner)}
        conservation = sp.csr_matrix((vals, ([renumber[r] for r in rows], cols)), shape=(len(inner), m))
        to_x = sp.csr_matrix((np.ones(len(x_cols)), (x_rows, x_cols)), shape=(n, m))
        to_y = sp.csr_matrix((np.ones(len(y_cols)), (y_rows, y_cols)), shape=(n - 1, m))
        event = cp.Variable(2 * n - 1)
        flow = cp.Variable(m, nonneg=True)
        x, y = event[:n], event[n:]
        return event, [
            conservation @ flow == 0,
            cp.sum(flow[start_arcs]) == 1,
            x == to_x @ flow,
            y == to_y @ flow,
            event >= 0,
            event <= 1,
            cp.sum(x) == k,
            y <= x[:-1],
            y <= x[1:],
            x[:-1] + x[1:] - y <= 1,
        ]

    def _enumerate_vertices(self):
        count = math.comb(self.n, self.k)
        if count > MAX_VERTICES or count * (2 * self.n - 1) > MAX_ENTRIES:
            return None
        index = torch.combinations(torch.arange(self.n), self.k)  # (C(n, k), k), lexicographic
        if index.dim() == 1:  # torch.combinations of r = 1 returns a vector
            index = index.unsqueeze(-1)
        x = torch.zeros(index.shape[0], self.n, dtype=torch.float64).scatter_(1, index, 1.0)
        return torch.cat([x, x[:, :-1] * x[:, 1:]], dim=-1)


def _split(P: CorrelatedKSubset, Z: torch.Tensor):
    """(theta (B, n), phi (B, n - 1)) in float64 from a batch Z (B, 2n - 1)."""
    z = Z.detach().to(torch.float64)
    return z[:, : P.n], z[:, P.n :]


# ----------------------------------------------------------------------------------------------
# hard argmax: max-plus dynamic program
# ----------------------------------------------------------------------------------------------


@register_argmax(CorrelatedKSubset)
def max_plus_argmax(P: CorrelatedKSubset, U: torch.Tensor) -> torch.Tensor:
    """The vertex maximising sum_i theta_i x_i + sum_i phi_i x_i x_{i+1} over k-subsets, U = (theta, phi).

    A max-plus dynamic program from the right: M[i, c, b], the best score of
    x_{i+1..n-1} when c items are chosen among 0..i and x_i = b, is
    max(M[i+1, c, 0], theta_{i+1} + phi_i b + M[i+1, c+1, 1]), with M[n-1, k, .] = 0
    and -inf elsewhere; then x is rebuilt from position 0, setting x_i = 1 when
    that choice's best completion is at least the other's.  Ties (equal computed
    scores) thus go to the selection with a 1 at the first position where the
    maximisers differ (the lexicographically largest x).  U: (B, 2n - 1) ->
    (B, 2n - 1) in {0, 1}, same dtype and device.  Cost O(n k) work in 2n
    vectorised steps; scores in float64.
    """
    n, k = P.n, P.k
    theta, phi = _split(P, U)
    B = theta.shape[0]
    # M[i] has k + 2 counts: column k + 1 stays -inf, so "count + 1" never leaves the table
    M = theta.new_full((n, B, k + 2, 2), float("-inf"))
    M[n - 1, :, k, :] = 0.0
    for i in range(n - 2, -1, -1):
        skip = M[i + 1, :, : k + 1, 0]
        take = theta[:, i + 1, None] + M[i + 1, :, 1:, 1]
        M[i, :, : k + 1, 0] = torch.maximum(skip, take)
        M[i, :, : k + 1, 1] = torch.maximum(skip, take + phi[:, i, None])
    rows = torch.arange(B, device=U.device)
    count = torch.zeros(B, dtype=torch.long, device=U.device)
    previous = theta.new_zeros(B)
    x = theta.new_zeros(B, n)
    for i in range(n):
        skip = M[i, rows, count, 0]
        take = theta[:, i] + M[i, rows, count + 1, 1]
        if i > 0:
            take = take + phi[:, i - 1] * previous
        chosen = take >= skip
        x[:, i] = chosen.to(x.dtype)
        count = count + chosen.long()
        previous = x[:, i]
    return torch.cat([x, x[:, :-1] * x[:, 1:]], dim=-1).to(U.dtype)


# ----------------------------------------------------------------------------------------------
# exponential-family entropy: Gibbs marginals by forward-backward, exact covariance backward
# ----------------------------------------------------------------------------------------------


def _ratio(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """exp(a - b), with 0 where b = -inf (a term of an absent state: a <= b = -inf)."""
    return torch.where(b > float("-inf"), (a - b).exp(), 0.0)


def _forward_backward(theta: torch.Tensor, phi: torch.Tensor, k: int):
    """The log-space tables (alpha (n, B, k+1, 2), beta (n, B, k+2, 2), log Z (B,)).

    alpha[i, :, c, b] = log of the total weight of the prefixes x_0..x_i with c ones and
    x_i = b; beta[i, :, c, b] = log of the total weight of the suffixes x_{i+1}..x_{n-1}
    completing that state to k ones (column k + 1 is -inf padding).  A weight is
    exp(sum theta_i x_i + sum phi_i x_i x_{i+1}).  Absent states hold -inf; every
    logaddexp of two -inf stays -inf.
    """
    n, B = theta.shape[1], theta.shape[0]
    alpha = theta.new_full((n, B, k + 1, 2), float("-inf"))
    alpha[0, :, 0, 0] = 0.0
    alpha[0, :, 1, 1] = theta[:, 0]
    for i in range(1, n):
        prev = alpha[i - 1]
        alpha[i, :, :, 0] = torch.logaddexp(prev[..., 0], prev[..., 1])
        alpha[i, :, 1:, 1] = theta[:, i, None] + torch.logaddexp(prev[:, :-1, 0], prev[:, :-1, 1] + phi[:, i - 1, None])
    beta = theta.new_full((n, B, k + 2, 2), float("-inf"))
    beta[n - 1, :, k, :] = 0.0
    for i in range(n - 2, -1, -1):
        skip = beta[i + 1, :, : k + 1, 0]
        take = theta[:, i + 1, None] + beta[i + 1, :, 1:, 1]
        beta[i, :, : k + 1, 0] = torch.logaddexp(skip, take)
        beta[i, :, : k + 1, 1] = torch.logaddexp(skip, take + phi[:, i, None])
    log_z = torch.logaddexp(alpha[n - 1, :, k, 0], alpha[n - 1, :, k, 1])
    return alpha, beta, log_z


def _marginal_terms(theta, phi, alpha, beta, log_z):
    """The posterior weights of the states: p_x (n, B, k+1) of (i, c, x_i = 1), p_y (n-1, B, k+1) of
    (i, c, x_i = 1, x_{i+1} = 1); mu_x_i = sum_c p_x[i, :, c], mu_y_i = sum_c p_y[i, :, c]."""
    k = alpha.shape[2] - 1
    p_x = (alpha[..., 1] + beta[:, :, : k + 1, 1] - log_z[:, None]).exp()
    pair = (phi + theta[:, 1:]).T[:, :, None]
    p_y = (alpha[:-1, :, :, 1] + pair + beta[1:, :, 1:, 1] - log_z[:, None]).exp()
    return p_x, p_y


class _GibbsMarginals(torch.autograd.Function):
    """mu = grad log Z(theta, phi) by forward-backward; backward: Cov(T) g by a pass of tangents.

    The Jacobian of mu is the Hessian of log Z, the covariance of the sufficient
    statistic T = (x, y) under the Gibbs law: symmetric, so the vector-Jacobian
    product equals the Jacobian-vector product, the directional derivative of mu
    along g.  It is computed exactly by differentiating the forward-backward program
    in forward mode: each logaddexp passes on the weighted mean of its inputs'
    tangents, with the weights of the saved tables.
    """

    @staticmethod
    def forward(ctx, Z, n, k):
        theta, phi = Z.detach().to(torch.float64)[:, :n], Z.detach().to(torch.float64)[:, n:]
        # the score of every k-subset moves by k * shift: a shift leaves the law unchanged and
        # keeps the log-space sums near the top score (rounding eps * |theta - shift|)
        shift = theta.topk(k, dim=-1).values[:, k - 1 :]
        theta = theta - shift
        alpha, beta, log_z = _forward_backward(theta, phi, k)
        p_x, p_y = _marginal_terms(theta, phi, alpha, beta, log_z)
        mu = torch.cat([p_x.sum(-1).T, p_y.sum(-1).T], dim=-1).clamp(0.0, 1.0)
        ctx.save_for_backward(theta, phi, alpha, beta, log_z)
        return mu.to(Z.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        theta, phi, alpha, beta, log_z = ctx.saved_tensors
        n, B, k = theta.shape[1], theta.shape[0], alpha.shape[2] - 1
        g64 = g.to(torch.float64)
        g_theta, g_phi = g64[:, :n], g64[:, n:]
        # The weights of every logaddexp's inputs, for all positions at once (the loops below are
        # then two multiply-adds per step).  Tangents of alpha:
        # d alpha[i, :, c, b] = E[<g, T(x_0..x_i)> | state (i, c, b)].
        prev, new = alpha[:-1], alpha[1:]  # (n - 1, B, k + 1, 2)
        to_zero = _ratio(prev, new[..., :1])  # from (i - 1, c, b) into (i, c, 0)
        theta_t, phi_t = theta.T[:, :, None], phi.T[:, :, None]  # (n, B, 1), (n - 1, B, 1)
        g_theta_t, g_phi_t = g_theta.T[:, :, None], g_phi.T[:, :, None]
        base = new[:, :, 1:, 1] - theta_t[1:]
        one_from_zero = _ratio(prev[:, :, :-1, 0], base)  # from (i - 1, c - 1, 0) into (i, c, 1)
        one_from_one = _ratio(prev[:, :, :-1, 1] + phi_t, base)  # from (i - 1, c - 1, 1) into (i, c, 1)
        one_constant = g_theta_t[1:] + one_from_one * g_phi_t
        d_alpha = theta.new_zeros((n, B, k + 1, 2))
        d_alpha[0, :, 1, 1] = g_theta[:, 0]
        for i in range(1, n):
            d_prev = d_alpha[i - 1]
            d_alpha[i, :, :, 0] = (to_zero[i - 1] * d_prev).sum(-1)
            d_alpha[i, :, 1:, 1] = (
                one_constant[i - 1] + one_from_zero[i - 1] * d_prev[:, :-1, 0] + one_from_one[i - 1] * d_prev[:, :-1, 1]
            )
        # tangents of beta: the same expectation over the completions
        skip, take = beta[1:, :, : k + 1, 0], theta_t[1:] + beta[1:, :, 1:, 1]  # (n - 1, B, k + 1)
        skip_w = _ratio(skip.unsqueeze(-1), beta[:-1, :, : k + 1, :])  # (n - 1, B, k + 1, 2): into bit 0, bit 1
        take_w = torch.stack(
            [_ratio(take, beta[:-1, :, : k + 1, 0]), _ratio(take + phi_t, beta[:-1, :, : k + 1, 1])], -1
        )
        take_constant = take_w * torch.stack(
            [g_theta_t[1:], g_theta_t[1:] + g_phi_t], -1
        )  # the tangent of the taken item (and pair)
        d_beta = theta.new_zeros((n, B, k + 2, 2))
        for i in range(n - 2, -1, -1):
            d_next = d_beta[i + 1]
            d_beta[i, :, : k + 1, :] = (
                take_constant[i] + skip_w[i] * d_next[:, : k + 1, :1] + take_w[i] * d_next[:, 1:, 1:]
            )
        # d log Z = <g, mu>, from the final states
        final = alpha[n - 1, :, k, :]
        d_log_z = (_ratio(final, log_z[:, None]) * d_alpha[n - 1, :, k, :]).sum(-1)
        p_x, p_y = _marginal_terms(theta, phi, alpha, beta, log_z)
        d_x = (p_x * (d_alpha[..., 1] + d_beta[:, :, : k + 1, 1] - d_log_z[:, None])).sum(-1)
        d_pair = (g_phi + g_theta[:, 1:]).T[:, :, None]
        d_y = (p_y * (d_alpha[:-1, :, :, 1] + d_pair + d_beta[1:, :, 1:, 1] - d_log_z[:, None])).sum(-1)
        return torch.cat([d_x.T, d_y.T], dim=-1).to(g.dtype), None, None


@register_relaxation(CorrelatedKSubset, "exp_family_entropy")
def correlated_marginals(P: CorrelatedKSubset, Z: torch.Tensor) -> torch.Tensor:
    """grad log Z: the marginals (P(x_i = 1), P(x_i = x_{i+1} = 1)) of the Gibbs law p(x) ~ exp<Z, T(x)>.

    This is argmax_{v in P} <Z, v> - A*(v), A = log Z the log-partition function
    over the correlated k-subsets.  Z: (B, 2n - 1) -> (B, 2n - 1), same dtype and
    device; sum of the first n entries = k.

    Algorithm: forward-backward in log space over the states (position, count, bit)
    (:func:`_forward_backward`); a state's posterior weight is
    exp(alpha + beta - log Z), and mu_x_i, mu_y_i sum them over the counts.  Cost
    O(n k) work per element in 2n vectorised steps, O(n k B) memory for the tables.
    Backward: the exact covariance-vector product Cov(T) g, by one forward and one
    backward pass of tangents over the saved tables (same cost); it is not itself
    differentiable (double backward raises).

    Precision: float64 internally, cast back.  theta is first shifted per row by its
    k-th largest entry (the law does not change); log-space sums round at about
    eps * (the magnitude of the partial scores), so the marginals are accurate to
    about 1e-16 * k * max|Z| (1e-9 at |Z| = 1e6, i.e. tau = 1e-3 with |U| = 1e3;
    about 1e-15 for moderate Z).
    """
    return _GibbsMarginals.apply(Z, P.n, P.k)


def _make_correlated_ksubset(n: int, k: int | None) -> CorrelatedKSubset:
    """CorrelatedKSubset(n, k), with k about n / 3 (within 1 <= k <= n - 1) when not given."""
    return CorrelatedKSubset(n, max(1, min(n - 1, n // 3)) if k is None else k)


register_family(
    Family(
        name="correlated_ksubset",
        make=_make_correlated_ksubset,
        regularizers=("binary_entropy", "euclidean", "exp_family_entropy"),
        n=10,
        sizes=(6, 10, 20, 50, 100, 300),
        quick_sizes=(6, 20, 100),
        max_generic_n=20,
        device_check_n=40,
        quick_device_check_n=10,
        uses_k=True,
    )
)
