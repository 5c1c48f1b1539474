"""Benchmark of the tree families' exponential-family-entropy relaxation (Matrix-Tree marginals).

    python benchmarks/trees.py [--quick] [--threads T]

Prints, in one run:

1. Spanning-tree marginals, forward + backward (a loss <G, X_tau> back-propagated to the
   edge scores), batch 128, n = 10 and 30, float64, for
   * ``ours``: ``polytopes._matrix_tree.spanning_tree_marginals`` (method "auto"; on these
     well-conditioned inputs every element takes the inverse path);
   * ``naive``: autograd.grad of ``torch.linalg.slogdet`` of the reduced Laplacian with
     ``create_graph=True``, then the backward of the loss through it (the obvious
     reference, as in the paper's code but in float64);
   * ``inv``: one batched ``torch.linalg.inv`` of the same reduced Laplacians, the cost
     floor named by the target (any inverse-based method computes an inverse);
   * ``chol-inv``: the same inverse the way ``ours`` computes it (Cholesky, a triangular
     solve, one matmul), which is cheaper than ``inv``: ours/chol-inv is the overhead of
     everything around the inverse;
   with the ratios ours/naive (target <= 1) and ours/inv (target <= 3); and on its own
   * ``ours-stable``: ``ours`` forced onto the log-space path (what ill-conditioned
     elements, e.g. small tau, cost), timed outside the rotation of the others.
2. Specialized vs generic ``exp_family_entropy`` for ``SpanningTree`` and ``Arborescence``
   at n = 4..6 and batch 1, 32, 256, through ``sstcvx.compare``
   (``sstcvx.harness.bench.speedup_report``).  The generic path solves the entropy relaxation
   over the vertex weights with CVXPY (A*(x) = min sum l log l over weights l with mean x), so
   it exists only where the vertices are listed; plain enumeration of the vertex list (one
   softmax, what ``solver="auto"`` does where no specialized solver exists) is timed too:
   below a few thousand vertices it is faster than the structured solvers, which are what
   scale past enumeration.

3. Arborescence marginals against torch-struct's non-projective dependency marginals
   (``torch_struct.NonProjectiveDependencyCRF(..., multiroot=True).marginals``: the root
   may have several children, as in an arborescence; one batched inverse), batch
   128, n = 10 and 30, float64, well-conditioned input (standard normal scores): forward,
   and forward + backward.  torch-struct's N words plus its implicit root are our n = N + 1
   vertices rooted at 0 (its diagonal holds the root's arcs), so both invert an
   (n − 1) × (n − 1) matrix.  ``ours`` is ``polytopes._matrix_tree.arborescence_marginals``
   (method "auto", with its per-element conditioning screen); ``relax`` the same through
   ``sstcvx.relax(..., solver="specialized")``.  torch-struct is an optional import: without
   it the peer column is ``floor``, the same Matrix-Tree marginals written here as plainly as
   possible (one ``torch.linalg.inv``, the marginals as linear forms in the inverse, the
   backward by autograd), and the script says so.  torch-struct adds 1e-5 to every weight,
   so the two agree to about that.

Timing: the candidates of one comparison run interleaved (one call of each per round, the
order rotating), and the median over rounds is reported.  The clock is the process's CPU
time (``time.process_time``) by default, because on a shared machine wall-clock time
mostly measures the other processes; ``--wall`` uses ``time.perf_counter`` instead.
``--threads`` sets torch's intra-op threads (default 1, which makes CPU time equal to
the work done; with more threads CPU time adds up over threads).

What moves the ratios on a shared machine (contention, the allocator) is described with
the measured figures in docs/benchmarks.md ("Trees").
"""

from __future__ import annotations

import warnings

import torch
from _timing import benchmark_arguments, fmt, interleaved, median_time

import sstcvx
from polytopes import _matrix_tree as mt
from polytopes.arborescence import Arborescence
from polytopes.spanning_tree import SpanningTree
from sstcvx.enumeration import vertex_marginals as gibbs_marginals
from sstcvx.harness.bench import speedup_report


def matrix_tree_section(quick: bool):
    print("== Spanning-tree marginals, forward + backward, batch 128, float64 ==")
    B = 128
    rounds = 30 if quick else 100
    rows = []
    for n in (10, 30):
        edges = torch.triu_indices(n, n, 1).T
        E = edges.shape[0]
        g = torch.Generator().manual_seed(n)
        Z = torch.randn(B, E, dtype=torch.float64, generator=g)
        G = torch.randn(B, E, dtype=torch.float64, generator=g)
        i, j = edges[:, 0], edges[:, 1]
        eye = torch.eye(n - 1, dtype=torch.float64)

        def laplacian(z):
            W = z.new_zeros(B, n * n).index_copy(1, i * n + j, z.exp()).view(B, n, n)
            W = W + W.mT
            return torch.diag_embed(W.sum(-1)) - W

        Lhat = laplacian(Z)[:, :-1, :-1].contiguous()

        def ours(method):
            def run():
                z = Z.clone().requires_grad_(True)
                (mt.spanning_tree_marginals(z, edges, n, method=method) * G).sum().backward()

            return run

        def naive():
            z = Z.clone().requires_grad_(True)
            logdet = torch.linalg.slogdet(laplacian(z)[:, :-1, :-1])[1]
            (mu,) = torch.autograd.grad(logdet.sum(), z, create_graph=True)
            (mu * G).sum().backward()

        def inv():
            torch.linalg.inv(Lhat)

        def chol_inv():  # the inverse as ours computes it: Cholesky, C⁻¹ by a triangular solve, C⁻ᵀC⁻¹
            C = torch.linalg.cholesky_ex(Lhat)[0]
            Y = torch.linalg.solve_triangular(C, eye.expand_as(Lhat), upper=False)
            torch.bmm(Y.mT, Y)

        t = interleaved(
            {"ours": ours("auto"), "naive": naive, "inv": inv, "chol-inv": chol_inv}, rounds if n == 10 else rounds // 2
        )
        # the log-space path is timed on its own: its 10-100 ms calls churn the allocator and
        # the caches, which would tax whichever candidate follows them in a shared rotation
        if n == 10 or not quick:
            t["ours-stable"] = median_time(ours("stable"), rounds=5 if quick else 10)
        # sanity: same numbers
        z = Z.clone().requires_grad_(True)
        mu = mt.spanning_tree_marginals(Z, edges, n)
        logdet = torch.linalg.slogdet(laplacian(z)[:, :-1, :-1])[1]
        (ref,) = torch.autograd.grad(logdet.sum(), z)
        err = (mu - ref).abs().max().item()
        print(
            f"n={n:3d} E={E:4d}  ours {fmt(t['ours'])}  naive {fmt(t['naive'])}  inv {fmt(t['inv'])}  chol-inv {fmt(t['chol-inv'])}"
            + (f"  ours-stable {fmt(t['ours-stable'])}" if "ours-stable" in t else "")
        )
        print(
            f"          ours/naive {t['ours'] / t['naive']:5.2f} (target <= 1)   ours/inv {t['ours'] / t['inv']:5.2f} (target <= 3)"
            f"   ours/chol-inv {t['ours'] / t['chol-inv']:5.2f}   max|ours - naive| {err:.1e}"
        )
        rows.append((n, t))
    return rows


def _torch_struct_marginals():
    """torch-struct's non-projective marginals as a function of (B, N, N) scores, or None."""
    try:
        from torch_struct import NonProjectiveDependencyCRF
    except Exception:  # not installed, or it does not import with this torch
        return None

    def marginals(S):
        with warnings.catch_warnings():  # its distribution class warns that it has no arg_constraints
            warnings.simplefilter("ignore", UserWarning)
            # multiroot: the root may have several children, as in an arborescence rooted at 0
            return NonProjectiveDependencyCRF(S, multiroot=True).marginals

    return marginals


def _inverse_floor(Z):
    """Arc marginals rooted at 0 of scores Z (B, n, n) with one plain inverse: the floor that
    any inverse-based method pays (no shift, no screen, no mask beyond the diagonal and the
    root's column), differentiated by autograd."""
    n = Z.shape[-1]
    keep = ~torch.eye(n, dtype=torch.bool, device=Z.device)
    keep[:, 0] = False
    w = Z.exp() * keep
    Lhat = (torch.diag_embed(w.sum(-2)) - w)[:, 1:, 1:]
    X = torch.linalg.inv(Lhat)
    Xt = torch.nn.functional.pad(X, (1, 0, 1, 0))  # a zero row and column at the root
    return w * (torch.diagonal(Xt, dim1=-2, dim2=-1).unsqueeze(-2) - Xt.mT)


def arborescence_peer_section(quick: bool):
    print()
    peer = _torch_struct_marginals()
    peer_name = "torch-struct" if peer is not None else "floor"
    print(f"== Arborescence marginals vs {peer_name}, batch 128, float64, standard normal scores ==")
    if peer is None:
        print("   torch-struct is not installed (pip install torch-struct): the peer is the plain one-inverse floor")
    B = 128
    for n in (10, 30):
        # sub-millisecond calls: many rounds, so that the median outlasts the machine's slow spells
        rounds = (100 if quick else 400) if n == 10 else (20 if quick else 60)
        g = torch.Generator().manual_seed(100 + n)
        Z = torch.randn(B, n, n, dtype=torch.float64, generator=g)
        G = torch.randn(B, n, n, dtype=torch.float64, generator=g)
        P = Arborescence(n, root=0)
        # torch-struct's layout: word h - 1 -> word d - 1 off the diagonal, root -> word d - 1 on it
        S = Z[:, 1:, 1:].clone()
        S.diagonal(dim1=-2, dim2=-1).copy_(Z[:, 0, 1:])
        GS = G[:, 1:, 1:].clone()
        GS.diagonal(dim1=-2, dim2=-1).copy_(G[:, 0, 1:])

        def peer_forward(s):
            if peer is None:
                return _inverse_floor(s)
            return peer(s)

        peer_input, peer_cotangent = (Z, G) if peer is None else (S, GS)

        def fb(fn, x, cot):
            def run():
                z = x.clone().requires_grad_(True)
                (fn(z) * cot).sum().backward()

            return run

        fns = {
            "ours": lambda: mt.arborescence_marginals(Z, 0),
            "relax": lambda: sstcvx.relax(P, Z, 1.0, "exp_family_entropy", solver="specialized"),
            "peer": lambda: peer_forward(peer_input),
            "ours-fb": fb(lambda z: mt.arborescence_marginals(z, 0), Z, G),
            "relax-fb": fb(lambda z: sstcvx.relax(P, z, 1.0, "exp_family_entropy", solver="specialized"), Z, G),
            "peer-fb": fb(peer_forward, peer_input, peer_cotangent),
        }
        t = interleaved(fns, rounds)
        mu = mt.arborescence_marginals(Z, 0)
        other = peer_forward(peer_input)
        if peer is not None:  # back to our layout
            mapped = torch.zeros_like(mu)
            mapped[:, 1:, 1:] = other
            mapped[:, 0, 1:] = other.diagonal(dim1=-2, dim2=-1)
            mapped[:, 1:, 1:].diagonal(dim1=-2, dim2=-1).zero_()
            other = mapped
        err = (mu - other).abs().max().item()
        print(
            f"n={n:3d}  forward: ours {fmt(t['ours'])}  relax {fmt(t['relax'])}  {peer_name} {fmt(t['peer'])}"
            f"   ours/{peer_name} {t['ours'] / t['peer']:5.2f}  relax/{peer_name} {t['relax'] / t['peer']:5.2f}"
            + (" (target <= 1)" if peer is not None else " (the floor has no shift, screen or mask)")
        )
        print(
            f"        fwd+bwd: ours {fmt(t['ours-fb'])}  relax {fmt(t['relax-fb'])}  {peer_name} {fmt(t['peer-fb'])}"
            f"   ours/{peer_name} {t['ours-fb'] / t['peer-fb']:5.2f}  relax/{peer_name} {t['relax-fb'] / t['peer-fb']:5.2f}"
            f"   max|ours - {peer_name}| {err:.1e}"
        )


def relax_fb(P, U, tau, reg, solver):
    u = U.clone().requires_grad_(True)
    X = sstcvx.relax(P, u, tau, reg, solver=solver)
    (X * torch.ones_like(X)).sum().backward()


def enumeration_fb(P, U, tau):
    u = U.clone().requires_grad_(True)
    (gibbs_marginals(P, u / tau)).sum().backward()


def specialized_vs_generic_section(quick: bool):
    print()
    print("== Specialized vs generic exp_family_entropy (CVXPY over the vertex weights), through sstcvx.compare ==")
    sizes = (4, 5) if quick else (4, 5, 6)
    cases = [(cls(n), "exp_family_entropy") for cls in (SpanningTree, Arborescence) for n in sizes]
    print(speedup_report(cases, tau=0.5, max_generic_batch=8, repeats=2 if quick else 3).table())
    print("   enumeration: one softmax over P.vertices (what solver='auto' does where no specialized solver exists)")
    for P, _ in cases:
        for B in (1, 32, 256):
            U = torch.randn((B, *P.event_shape), dtype=torch.float64)
            t = interleaved(
                {
                    "specialized": lambda: relax_fb(P, U, 0.5, "exp_family_entropy", "specialized"),
                    "enumeration": lambda: enumeration_fb(P, U, 0.5),
                },
                rounds=5 if quick else 15,
            )
            print(
                f"{P.name:28s} B={B:4d}  specialized {fmt(t['specialized'] / B)}  "
                f"enumeration ({len(P.vertices):4d} vertices) {fmt(t['enumeration'] / B)}"
            )


def main(argv=None):
    args = benchmark_arguments(__doc__, "fewer rounds and sizes (about a minute)", argv)
    torch.manual_seed(0)
    clock_name = "wall clock" if args.wall else "process CPU time"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), device cpu, timed by {clock_name}")
    matrix_tree_section(args.quick)
    arborescence_peer_section(args.quick)
    specialized_vs_generic_section(args.quick)


if __name__ == "__main__":
    main()
