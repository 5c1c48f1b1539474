"""Adversarial checks of the compiled CPU kernels (k-subset Gibbs marginals, Sinkhorn, Birkhoff projection)
against their torch paths (``polytopes._compiled.disabled``): tensor kinds (strided, expanded, negative-bit
views, low precision, inference tensors), autograd usages (outputs changed in place, retained graphs,
straight-through samples, inference mode), error behaviour on non-finite input, threads and a seeded fuzz
over sizes, batch shapes, temperatures and scales."""

import random
import threading
import warnings

import pytest
import torch

import sstcvx
from polytopes import KSubset, Permutation
from polytopes._compiled import disabled
from polytopes.birkhoff import birkhoff_projection
from polytopes.ksubset import _GibbsMarginals, k_subset_marginals
from polytopes.sinkhorn import sinkhorn

# (name, solver of Z, event shape of Z at size n, absolute tolerance compiled vs torch on X and dL/dZ at
# |Z| ~ 1): the Gibbs kernel runs the torch path's recurrences (1e-10 is far above their rounding), the
# two permutation solvers stop at column sums within 1e-12 (each on its own iterates)
SOLVERS = [
    ("gibbs", lambda Z: k_subset_marginals(Z, 3), lambda n: (30,), 1e-10),
    ("gibbs-complement", lambda Z: k_subset_marginals(Z, 26), lambda n: (30,), 1e-10),
    ("sinkhorn", sinkhorn, lambda n: (n, n), 1e-10),
    ("birkhoff", birkhoff_projection, lambda n: (n, n), 1e-10),
]
IDS = [s[0] for s in SOLVERS]


def gumbel_like(shape, seed):
    """Gumbel-perturbed N(0, 1) utilities, float64 (no ties, entries spread as in training)."""
    generator = torch.Generator().manual_seed(seed)
    uniform = torch.rand(shape, dtype=torch.float64, generator=generator).clamp_min(1e-300)
    return torch.randn(shape, dtype=torch.float64, generator=generator) - torch.log(-torch.log(uniform))


def forward_backward(solve, Z, G):
    """(X, dL/dZ) for L = <X, G>; Z may be any tensor kind (it is used as given, not copied)."""
    leaf = Z.detach().requires_grad_(True) if not Z.requires_grad else Z
    X = solve(leaf)
    (grad,) = torch.autograd.grad(X, leaf, G)
    return X.detach(), grad


def on_both_paths(function):
    """function() on the compiled path, then on the torch path."""
    compiled = function()
    with disabled():
        reference = function()
    return compiled, reference


def largest(U):
    """max |U| (0 for an empty U)."""
    return float(U.abs().max()) if U.numel() else 0.0


def assert_close(a, b, atol):
    for x, y in zip(a, b, strict=True):
        assert x.shape == y.shape and x.dtype == y.dtype
        torch.testing.assert_close(x, y, atol=atol, rtol=0)


@pytest.mark.parametrize("name, solve, event, atol", SOLVERS, ids=IDS)
def test_negative_bit_views(name, solve, event, atol):
    """A tensor with the negative bit (torch._neg_view: -x stored lazily) as Z, and as the incoming
    gradient: numpy() refuses such tensors, so the glue must resolve the bit (it raised RuntimeError)."""
    Z = gumbel_like((4, *event(6)), seed=1)
    G = torch.randn(Z.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    Z_neg, G_neg = torch._neg_view(-Z), torch._neg_view(-G)
    assert Z_neg.is_neg() and G_neg.is_neg()
    compiled, reference = on_both_paths(lambda: forward_backward(solve, Z_neg, G_neg))
    plain = forward_backward(solve, Z, G)
    assert_close(compiled, reference, atol)
    assert_close(compiled, plain, 0.0)
    # the forward of a negative-bit view itself (not a leaf: a view of a leaf)
    leaf = (-Z).requires_grad_(True)
    X = solve(torch._neg_view(leaf))
    (grad,) = torch.autograd.grad(X, leaf, G)
    assert_close((X.detach(), -grad), plain, 0.0)


@pytest.mark.parametrize("name, solve, event, atol", SOLVERS, ids=IDS)
def test_strided_expanded_and_low_precision_inputs(name, solve, event, atol):
    Z = gumbel_like((5, *event(7)), seed=3)
    wide = gumbel_like((10, *(2 * s for s in event(7))), seed=4)
    kinds = {
        "batch-transposed": Z.transpose(0, -1).contiguous().transpose(0, -1),
        "stepped": wide[::2][(..., *(slice(None, None, 2),) * len(event(7)))],
        "expanded": Z[:1].expand(Z.shape),
        "leading dims": gumbel_like((2, 3, *event(7)), seed=5),
        "one element": Z[0],
        "empty batch": Z[:0],
    }
    for kind, Zk in kinds.items():
        G = torch.randn(Zk.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
        compiled, reference = on_both_paths(lambda Zk=Zk, G=G: forward_backward(solve, Zk, G))
        assert_close(compiled, reference, atol), kind
    for dtype, tol in ((torch.float32, 1e-6), (torch.float16, 1e-3), (torch.bfloat16, 1e-2)):
        compiled, reference = on_both_paths(lambda dtype=dtype: solve(Z.to(dtype)))
        assert compiled.dtype == dtype
        torch.testing.assert_close(compiled, reference, atol=tol, rtol=0)


@pytest.mark.parametrize("name, solve, event, atol", SOLVERS, ids=IDS)
def test_output_changed_in_place_before_backward(name, solve, event, atol):
    """X.mul_(2) before backward: either the gradient is that of 2 X on both paths, or both paths refuse
    (Sinkhorn's backward reads X). The k-subset torch path's backward read the output it had returned
    (the linear-space state held it), so its gradient was silently wrong (compiled: right)."""
    Z = gumbel_like((4, *event(6)), seed=7)
    G = torch.randn(Z.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    expected = forward_backward(solve, Z, G)[1]

    def changed_in_place():
        leaf = Z.clone().requires_grad_(True)
        X = solve(leaf)
        X.mul_(2.0)
        try:
            (grad,) = torch.autograd.grad(X, leaf, G)
        except RuntimeError as error:
            return str(error).split(":")[0]
        return grad

    compiled, reference = on_both_paths(changed_in_place)
    if name == "sinkhorn":
        assert isinstance(compiled, str) and compiled == reference
    else:
        torch.testing.assert_close(compiled, 2 * expected, atol=atol, rtol=0)
        torch.testing.assert_close(reference, 2 * expected, atol=atol, rtol=0)


@pytest.mark.parametrize("k", [1, 2, 7])
def test_ksubset_output_changed_in_place_torch_path(k):
    """The torch path's linear-space backward (k = 1 softmax, k > 1 prefix sums; called directly, as
    the public function enumerates the subsets at k = 1) after X.add_(1)."""
    z = gumbel_like((3, 40), seed=k)
    g = torch.randn(3, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    with disabled():
        expected = forward_backward(lambda t: _GibbsMarginals.apply(t, k), z, g)[1]
        leaf = z.clone().requires_grad_(True)
        x = _GibbsMarginals.apply(leaf, k)
        x.add_(1.0)
        (grad,) = torch.autograd.grad(x, leaf, g)
    torch.testing.assert_close(grad, expected, atol=1e-13, rtol=0)


CASES = [
    (KSubset(40, 7), "exp_family_entropy", (40,)),
    (KSubset(40, 31), "exp_family_entropy", (40,)),
    (Permutation(8), "entropy", (8, 8)),
    (Permutation(8), "euclidean", (8, 8)),
]
CASE_IDS = ["ksubset", "ksubset-complement", "sinkhorn", "birkhoff"]


@pytest.mark.parametrize("P, regularizer, event", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("tau", [1e-3, 1.0])
def test_relax_under_inference_mode_and_no_grad(P, regularizer, event, tau):
    """relax inside torch.inference_mode (on an inference tensor) and torch.no_grad: at tau = 1e-3 the
    k-subset rows take the log-space DP, differentiated by autograd, which raised RuntimeError ("element 0
    of tensors does not require grad") under inference mode on both paths."""
    U = gumbel_like((6, *event), seed=10)
    U[0] *= 1e-3  # one row of small spread: the k-subset batch mixes linear-space and log-space rows
    expected = sstcvx.relax(P, U, tau, regularizer, solver="specialized").detach()

    def in_inference_mode():
        with torch.inference_mode():
            return sstcvx.relax(P, U.clone(), tau, regularizer, solver="specialized")

    def in_no_grad():
        with torch.no_grad():
            return sstcvx.relax(P, U.clone().requires_grad_(True), tau, regularizer, solver="specialized")

    for function in (in_inference_mode, in_no_grad):
        for X in on_both_paths(function):
            torch.testing.assert_close(X, expected, atol=1e-9, rtol=0)
    with torch.inference_mode():
        made_there = U.clone()
    for X in on_both_paths(lambda: sstcvx.relax(P, made_there, tau, regularizer, solver="specialized")):
        torch.testing.assert_close(X, expected, atol=1e-9, rtol=0)


@pytest.mark.parametrize("P, regularizer, event", CASES, ids=CASE_IDS)
def test_retained_graph_and_straight_through(P, regularizer, event):
    theta = gumbel_like((5, *event), seed=11)
    G = torch.randn(theta.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(12))

    def twice():
        leaf = theta.clone().requires_grad_(True)
        loss = (sstcvx.relax(P, leaf, 0.5, regularizer, solver="specialized") * G).sum()
        (first,) = torch.autograd.grad(loss, leaf, retain_graph=True)
        (second,) = torch.autograd.grad(loss, leaf)
        return first, second

    compiled, reference = on_both_paths(twice)
    assert_close(compiled, reference, 1e-10)
    torch.testing.assert_close(compiled[0], compiled[1], atol=0, rtol=0)

    def straight_through():
        leaf = theta.clone().requires_grad_(True)
        generator = torch.Generator().manual_seed(13)
        X = sstcvx.sample(P, leaf, 0.5, regularizer, mode="straight_through", generator=generator)
        (grad,) = torch.autograd.grad(X, leaf, G)
        return X.detach(), grad

    compiled, reference = on_both_paths(straight_through)
    assert_close(compiled, reference, 1e-10)
    assert set(compiled[0].unique().tolist()) <= {0.0, 1.0} and compiled[1].abs().max() > 1e-3


@pytest.mark.parametrize("name, solve, event, atol", SOLVERS[2:], ids=IDS[2:])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_same_error(name, solve, event, atol, value):
    Z = gumbel_like((3, *event(5)), seed=14)
    Z[1, 2, 3] = value

    def error():
        with pytest.raises(ValueError) as info:
            solve(Z)
        return str(info.value)

    compiled, reference = on_both_paths(error)
    assert compiled == reference and "finite" in compiled


@pytest.mark.parametrize("P, regularizer, event", CASES, ids=CASE_IDS)
def test_relax_non_finite_same_error(P, regularizer, event):
    for value in (float("nan"), float("inf"), float("-inf")):
        U = gumbel_like((2, *event), seed=15)
        U.view(-1)[3] = value

        def error(U=U):
            with pytest.raises(ValueError) as info:
                sstcvx.relax(P, U, 1.0, regularizer, solver="specialized")
            return str(info.value)

        compiled, reference = on_both_paths(error)
        assert compiled == reference


def test_ksubset_masked_items_agree():
    """-inf utilities mask items (kernel path, n = 40, k <= n / 2): both paths give the same marginals,
    zero (to rounding) on the masked items, also where exactly k items are left."""
    z = gumbel_like((3, 40), seed=16)
    z[0, 5] = float("-inf")
    z[1, :33] = float("-inf")
    compiled, reference = on_both_paths(lambda: k_subset_marginals(z, 7))
    torch.testing.assert_close(compiled, reference, atol=1e-12, rtol=0)
    assert compiled[0, 5] <= 1e-15 and compiled[1, :33].abs().max() <= 1e-15 and torch.isfinite(compiled).all()
    torch.testing.assert_close(compiled.sum(-1), torch.full((3,), 7.0, dtype=torch.float64))


@pytest.mark.parametrize("P, regularizer, event", CASES, ids=CASE_IDS)
def test_two_threads_at_once(P, regularizer, event):
    """The kernels release the GIL (nogil): two threads solving different batches at once get the
    single-threaded results, forward and backward."""
    U = [gumbel_like((64, *event), seed=20 + i) for i in range(2)]
    expected = [forward_backward(lambda t: sstcvx.relax(P, t, 0.7, regularizer, solver="specialized"), u, u) for u in U]
    results: list = [None, None]
    errors: list = []

    def work(i):
        try:
            for _ in range(4):
                results[i] = forward_backward(
                    lambda t: sstcvx.relax(P, t, 0.7, regularizer, solver="specialized"), U[i], U[i]
                )
        except Exception as error:  # (reported below: an exception in a thread would be lost)
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for got, want in zip(results, expected, strict=True):
        assert_close(got, want, 0.0)


def test_seeded_fuzz_compiled_against_torch():
    """Random sizes, batch shapes, temperatures, scales, ties and integer inputs through relax, X and
    tau dL/dU compared between the paths. Tolerances: the Gibbs recurrences 1e-10 (to rounding); Sinkhorn
    1e-10 on O(1) entries; the Birkhoff projection its own, 1e-12 + 16 n eps max|Z| (both paths may
    round a support entry at a tie differently, which moves X by that much)."""
    rng = random.Random(2026)
    generator = torch.Generator().manual_seed(2026)
    for _ in range(40):
        family = rng.choice(["ksubset", "sinkhorn", "birkhoff"])
        n = rng.randint(2, 60) if family == "ksubset" else rng.randint(2, 12)
        batch = rng.choice([(), (0,), (1,), (2,), (7,), (33,), (3, 2)])
        tau = rng.choice([1e-3, 0.1, 1.0, 10.0, 1e3])
        scale = rng.choice([1e-8, 1.0, 30.0, 1e3])
        kind = rng.choice(["random", "integer", "ties"])
        shape = (*batch, n) if family == "ksubset" else (*batch, n, n)
        if kind == "random":
            U = scale * torch.randn(shape, dtype=torch.float64, generator=generator)
        elif kind == "integer":
            U = scale * torch.randint(-3, 4, shape, generator=generator).double()
        else:
            U = scale * torch.randint(0, 2, shape, generator=generator).double()
        G = torch.randn(shape, dtype=torch.float64, generator=generator)
        if family == "ksubset":
            P, regularizer, atol = KSubset(n, rng.randint(1, n - 1)), "exp_family_entropy", 1e-10
        else:
            P = Permutation(n)
            regularizer = "entropy" if family == "sinkhorn" else "euclidean"
            atol = 1e-10 if family == "sinkhorn" else 1e-12 + 16 * n * 2.3e-16 * largest(U) / tau

        def solve(P=P, regularizer=regularizer, tau=tau):
            return lambda t: sstcvx.relax(P, t, tau, regularizer, solver="specialized")

        with warnings.catch_warnings():
            warnings.simplefilter("error")  # neither path may warn (no unconverged elements)
            compiled, reference = on_both_paths(lambda U=U, G=G, solve=solve: forward_backward(solve(), U, G))
        case = (family, n, shape, tau, scale, kind)
        torch.testing.assert_close(compiled[0], reference[0], atol=atol, rtol=0, msg=lambda m: f"{case}: {m}")
        if family != "birkhoff" or bool(((compiled[0] > 0) == (reference[0] > 0)).all()):
            # (the Birkhoff gradient is compared where the supports agree: elsewhere each path is an
            # element of the generalized Jacobian)
            torch.testing.assert_close(
                tau * compiled[1], tau * reference[1], atol=max(atol, 1e-10), rtol=0, msg=lambda m: f"{case}: {m}"
            )
