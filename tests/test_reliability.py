"""Nothing silently wrong: thread safety, second derivatives, the pinned backend, pickling,
up-front errors, the command line's output paths, and no stdout from library calls."""

import copy
import importlib.util
import io
import itertools
import os
import pickle
import subprocess
import sys
import threading
import types
import warnings
from pathlib import Path

import cvxpy as cp
import pytest
import torch

import polytopes
import sstcvx
from sstcvx import generic
from sstcvx.generic import settings
from sstcvx.harness.cli import main as cli_main

ROOT = Path(__file__).resolve().parent.parent


def declared_ksubset(n=6, k=2):
    x = cp.Variable(n)
    return sstcvx.Polytope.from_cvxpy(x, [x >= 0, x <= 1, cp.sum(x) == k], name=f"declared {k}-of-{n}")


def top_k(U, k):
    """The truth for a k-subset polytope: the indicator of the k largest utilities, per row."""
    X = torch.zeros_like(U)
    return X.scatter(-1, U.topk(k, dim=-1).indices, 1.0)


def squared_norm(x):  # a top-level function: a user regularizer that pickles
    return cp.sum_squares(x)


# ------------------------------------------------------------------------------------------------
# 1. thread safety
# ------------------------------------------------------------------------------------------------


def _run_threads(work, count):
    errors = []

    def guarded(i):
        try:
            work(i)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def test_generic_argmax_is_thread_safe_on_one_polytope():
    """Several threads share one polytope's cached LP (and, in one thread, layers are built on
    the same declaration meanwhile); every hard sample must be the brute-force top k."""
    n, k = 6, 2
    P = declared_ksubset(n, k)
    wrong, total = [], [0]

    def work(i):
        generator = torch.Generator().manual_seed(100 + i)
        if i == 0:  # builds generic layers (their feasibility compile touches the declaration)
            for reg in ("euclidean", "binary_entropy", sstcvx.Regularizer.from_cvxpy(squared_norm, name="sq")):
                U = torch.randn(2, n, dtype=torch.float64, generator=generator)
                X = sstcvx.relax(P, U, 0.5, reg, solver="generic")
                assert ((X.sum(-1) - k).abs() < 1e-5).all()
            return
        for _ in range(30):
            U = torch.randn(1, n, dtype=torch.float64, generator=generator)
            X = sstcvx.argmax(P, U, solver="generic")
            total[0] += 1
            if not torch.equal(X, top_k(U, k)):
                wrong.append((U, X))

    _run_threads(work, 5)
    assert total[0] == 120
    assert not wrong, f"{len(wrong)} of {total[0]} hard samples were another call's vertex"


def test_specialized_tree_solvers_under_threads_match_one_thread():
    """The tree solvers' module-level tables are filled concurrently: every thread's result
    must equal the single-threaded one."""
    cases = [polytopes.SpanningTree(n) for n in (4, 5, 6)] + [polytopes.Arborescence(n) for n in (4, 5)]
    inputs = [torch.randn(3, *P.event_shape, dtype=torch.float64) for P in cases]
    results = {}

    def work(i):
        for j in itertools.chain(range(i % len(cases), len(cases)), range(i % len(cases))):
            for reg in sstcvx.registry.specialized_regularizers(cases[j]):
                results[(i, j, reg)] = sstcvx.relax(cases[j], inputs[j], 0.5, reg)
            results[(i, j, "argmax")] = sstcvx.argmax(cases[j], inputs[j])

    _run_threads(work, 4)
    for (_i, j, what), X in results.items():
        if what == "argmax":
            expected = sstcvx.argmax(cases[j], inputs[j])
        else:
            expected = sstcvx.relax(cases[j], inputs[j], 0.5, what)
        torch.testing.assert_close(X, expected, rtol=0, atol=1e-12, msg=f"{cases[j].name} {what}")


# ------------------------------------------------------------------------------------------------
# 2. second derivatives
# ------------------------------------------------------------------------------------------------


def _double_backward(P, reg, solver):
    U = torch.randn(2, *P.event_shape, dtype=torch.float64, requires_grad=True)
    X = sstcvx.relax(P, U, 0.7, reg, solver=solver)
    cotangent = torch.linspace(-1, 1, X.numel(), dtype=torch.float64).reshape(X.shape)
    (grad,) = torch.autograd.grad(X, U, cotangent, create_graph=True)
    return grad


@pytest.mark.parametrize(
    "make, reg, path, solver",
    [
        (declared_ksubset, "entropy", "generic path", "cvxpylayers"),
        (declared_ksubset, "entropy", "fast generic path", "fast"),
        (lambda: sstcvx.Polytope.from_vertices(torch.eye(4)), "exp_family_entropy", "vertex weights", "generic"),
    ],
    ids=["cvxpylayers", "fast", "vertex-weights"],
)
def test_generic_path_refuses_double_backward(make, reg, path, solver):
    P = make()
    with pytest.raises(sstcvx.SecondDerivativeError, match=rf"(?s){path}.*differentiable only once.*create_graph"):
        _double_backward(P, reg, solver)
    # the first derivative is unaffected
    U = torch.randn(2, *P.event_shape, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(sstcvx.relax(P, U, 0.7, reg, solver=solver).sum(), U)
    assert torch.isfinite(grad).all()


SPECIALIZED = [
    (polytopes.Simplex(4), ("entropy", "exp_family_entropy", "euclidean")),
    (polytopes.Hypercube(3), ("binary_entropy", "exp_family_entropy", "euclidean")),
    (polytopes.KSubset(5, 2), ("binary_entropy", "exp_family_entropy", "euclidean")),
    (polytopes.Permutation(3), ("entropy", "euclidean")),
    (sstcvx.Polytope.from_vertices(torch.tensor([[1.0, 0, 1], [0, 1, 1], [1, 1, 0]])), ("exp_family_entropy",)),
]


def test_every_non_tree_family_is_listed():
    """The list below covers every specialized relaxation of these families (trees: elsewhere)."""
    for P, regs in SPECIALIZED:
        assert tuple(sorted(regs)) == tuple(sorted(sstcvx.registry.specialized_regularizers(P))), P.name


@pytest.mark.parametrize(
    "P, reg",
    [(P, reg) for P, regs in SPECIALIZED for reg in regs],
    ids=[f"{P.name}-{reg}" for P, regs in SPECIALIZED for reg in regs],
)
def test_specialized_relaxation_is_twice_differentiable(P, reg):
    U = torch.randn(2, *P.event_shape, dtype=torch.float64, requires_grad=True)
    tau = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda u, t: sstcvx.relax(P, u, t, reg, solver="specialized"), (U, tau))


# ------------------------------------------------------------------------------------------------
# 3. the cvxpylayers backend
# ------------------------------------------------------------------------------------------------


def _layers(P):
    yield generic.generic_relaxation(P, sstcvx.regularizers.get_regularizer("entropy")).layer
    V = sstcvx.Polytope.from_vertices(torch.eye(3))
    yield generic.generic_relaxation(V, sstcvx.regularizers.get_regularizer("exp_family_entropy")).lifted.layer


def test_every_generic_layer_uses_the_named_backend():
    for layer in _layers(declared_ksubset(4, 2)):
        assert settings.BACKEND == "DIFFCP"
        assert layer.ctx.solver == settings.BACKEND
        assert type(layer.ctx.solver_ctx).__name__ == "DIFFCP_ctx"


def test_a_changed_cvxpylayers_default_does_not_change_the_backend(monkeypatch):
    """Simulates cvxpylayers making another backend (Moreau) the default for PyTorch."""
    import cvxpylayers.utils.parse_args as pa

    real = pa.parse_args

    def moreau_default(problem, variables, parameters, solver, *args, **kwargs):
        return real(problem, variables, parameters, "MOREAU" if solver is None else solver, *args, **kwargs)

    monkeypatch.setattr(pa, "parse_args", moreau_default)
    P = declared_ksubset(4, 2)
    U = torch.randn(2, 4, dtype=torch.float64)
    X = sstcvx.relax(P, U, 1.0, "euclidean", solver="generic")
    assert ((X.sum(-1) - 2).abs() < 1e-6).all()
    assert generic.generic_relaxation(P, sstcvx.regularizers.get_regularizer("euclidean")).layer.ctx.solver == "DIFFCP"


def test_pyproject_bounds_hold_the_tested_versions():
    from importlib.metadata import version

    from packaging.requirements import Requirement

    text = (ROOT / "pyproject.toml").read_text()
    bounded = {}
    for line in text.splitlines():
        line = line.strip().rstrip(",").strip('"')
        if line.startswith(("cvxpylayers", "diffcp")):
            req = Requirement(line)
            bounded[req.name] = req.specifier
    assert set(bounded) == {"cvxpylayers", "diffcp"}
    for name, spec in bounded.items():
        assert any(s.operator in ("<", "<=", "==", "~=") for s in spec), f"{name} has no upper bound"
        assert spec.contains(version(name)), f"installed {name} {version(name)} is outside {spec}"


# ------------------------------------------------------------------------------------------------
# 4. pickling, deep copies, torch.save, data-loader workers
# ------------------------------------------------------------------------------------------------


def _round_trips(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return {
        "pickle": pickle.loads(pickle.dumps(obj)),
        "deepcopy": copy.deepcopy(obj),
        "torch.save": torch.load(buffer, weights_only=False),
    }


POLYTOPES = [
    lambda: declared_ksubset(5, 2),
    lambda: sstcvx.Polytope.from_vertices(torch.tensor([[1.0, 0, 1], [0, 1, 1], [1, 1, 0]])),
    lambda: polytopes.Simplex(4),
    lambda: polytopes.Hypercube(3),
    lambda: polytopes.KSubset(5, 2),
    lambda: polytopes.Permutation(3),
    lambda: polytopes.SpanningTree(4),
    lambda: polytopes.SpanningTree(4, edges=torch.tensor([[0, 1], [1, 2], [2, 3], [0, 3], [0, 2]])),
    lambda: polytopes.Arborescence(4),
]


def _use(P, U):
    """Hard samples on both paths and relaxed samples on every path P has; returns them."""
    out = [sstcvx.argmax(P, U, solver="generic"), sstcvx.argmax(P, U)]
    for reg in sstcvx.registry.specialized_regularizers(P):
        out.append(sstcvx.relax(P, U, 0.5, reg))
    if not sstcvx.registry.specialized_regularizers(P):
        out.append(sstcvx.relax(P, U, 0.5, "euclidean", solver="generic"))
    return out


@pytest.mark.parametrize("make", POLYTOPES, ids=[f().name for f in POLYTOPES])
def test_polytopes_pickle_and_copy_before_and_after_use(make):
    P = make()
    U = torch.randn(2, *P.event_shape, dtype=torch.float64)
    for how, Q in _round_trips(P).items():  # before use
        assert Q.event_shape == P.event_shape and Q.name == P.name, how
    expected = _use(P, U)
    for how, Q in _round_trips(P).items():  # after use: the generic cache stays with P
        for got, want in zip(_use(Q, U), expected):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6, msg=f"{P.name} after {how}")


def test_regularizers_pickle_and_copy():
    P = declared_ksubset(4, 2)
    U = torch.randn(2, 4, dtype=torch.float64)
    for reg in (sstcvx.regularizers.get_regularizer(name) for name in ("entropy", "euclidean", "exp_family_entropy")):
        for how, copied in _round_trips(reg).items():
            assert copied.name == reg.name, how
    mine = sstcvx.Regularizer.from_cvxpy(squared_norm, name="sq")
    expected = sstcvx.relax(P, U, 1.0, mine, solver="generic")
    for how, copied in _round_trips(mine).items():
        torch.testing.assert_close(sstcvx.relax(P, U, 1.0, copied, solver="generic"), expected, msg=how)

    anonymous = sstcvx.Regularizer.from_cvxpy(lambda x: cp.sum_squares(x), name="lambda_l2")
    torch.testing.assert_close(sstcvx.relax(P, U, 1.0, copy.deepcopy(anonymous), solver="generic"), expected)
    with pytest.raises(pickle.PicklingError, match=r"(?s)regularizer 'lambda_l2' cannot be pickled.*top level"):
        pickle.dumps(anonymous)


@pytest.mark.parametrize(
    "cls", [sstcvx.StochasticArgmax, sstcvx.RelaxedStochasticArgmax, sstcvx.StraightThroughStochasticArgmax]
)
def test_distributions_pickle_and_copy_before_and_after_use(cls):
    P = declared_ksubset(5, 2)
    theta = torch.randn(3, 5, dtype=torch.float64)
    kwargs = {} if cls is sstcvx.StochasticArgmax else {"tau": 0.5, "regularizer": "euclidean"}
    d = cls(P, theta, **kwargs)
    for stage in ("before", "after"):
        for how, copied in _round_trips(d).items():
            torch.manual_seed(7)
            want = d.sample((2,))
            torch.manual_seed(7)
            got = copied.sample((2,))
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6, msg=f"{cls.__name__} {stage} use, {how}")
        if cls.has_rsample:
            d.rsample()


def test_declared_polytope_in_dataloader_workers():
    from _reliability_worker import LPDataset

    P = declared_ksubset(6, 2)
    sstcvx.argmax(P, torch.randn(6, dtype=torch.float64), solver="generic")  # used before it is sent
    U = torch.randn(8, 6, dtype=torch.float64)
    loader = torch.utils.data.DataLoader(
        LPDataset(P, U),
        batch_size=2,
        num_workers=2,
        multiprocessing_context="spawn",  # spawn pickles P
    )
    X = torch.cat(list(loader))
    assert torch.equal(X, top_k(U, 2))


# ------------------------------------------------------------------------------------------------
# 5. clear errors up front
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, match",
    [
        ({"solve_method": "SCSS"}, r"solver_args: solve_method 'SCSS'.*'Clarabel'.*'SCS'"),
        ({"eps_abs": 1e-6}, r"solver_args: solve_method None"),
        ({"solve_method": "Clarabel", "tolfeas": 1e-8}, r"solver_args: 'tolfeas' is not a Clarabel setting"),
        ({"solve_method": "SCS", "eps_ab": 1e-8}, r"solver_args: SCS rejects.*eps_ab"),
        ({"solve_method": "Clarabel", "max_iter": "many"}, r"solver_args: Clarabel setting max_iter='many'"),
    ],
)
def test_bad_solver_args_fail_up_front(args, match):
    P = declared_ksubset(4, 2)
    U = torch.randn(2, 4, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no per-element fallback warning either
        with pytest.raises(ValueError, match=match):
            sstcvx.relax(P, U, 1.0, "entropy", solver="generic", solver_args=args)
        with pytest.raises(ValueError, match=match):
            sstcvx.sample(P, U, 1.0, "entropy", mode="relaxed", solver="generic", solver_args=args)
    with pytest.raises(TypeError, match="solver_args: expected a dict"):
        sstcvx.relax(P, U, 1.0, "entropy", solver="generic", solver_args="SCS")


def test_good_solver_args_are_accepted():
    P = declared_ksubset(4, 2)
    U = torch.randn(2, 4, dtype=torch.float64)
    for args in (settings.CLARABEL_ARGS, settings.SCS_ARGS, {"solve_method": "SCS", "eps": 1e-7, "n_jobs_forward": 1}):
        X = sstcvx.relax(P, U, 1.0, "euclidean", solver="generic", solver_args=args)
        assert ((X.sum(-1) - 2).abs() < 1e-4).all()


def test_regularizer_with_its_own_parameter_is_refused_with_advice():
    P = declared_ksubset(4, 2)
    weight = cp.Parameter(nonneg=True, name="weight", value=2.0)
    reg = sstcvx.Regularizer.from_cvxpy(lambda x: weight * cp.sum_squares(x), name="weighted_l2")
    with pytest.raises(ValueError, match=r"regularizer 'weighted_l2'.*Parameters \(weight\).*constants"):
        sstcvx.relax(P, torch.randn(2, 4, dtype=torch.float64), 1.0, reg, solver="generic")


@pytest.mark.parametrize("attribute", ["boolean", "integer"])
def test_integer_variables_are_refused_at_declaration(attribute):
    x = cp.Variable(4, **{attribute: True})
    with pytest.raises(ValueError, match=rf"x: a {attribute} cp.Variable.*continuous"):
        sstcvx.Polytope.from_cvxpy(x, [x >= 0, x <= 1, cp.sum(x) == 2])
    x, y = cp.Variable(4), cp.Variable(4, **{attribute: True})
    with pytest.raises(ValueError, match=rf"constraints \(variable .*\): a {attribute} cp.Variable"):
        sstcvx.Polytope.from_cvxpy(x, [x >= 0, x <= y, y <= 1, cp.sum(x) == 2])


# ------------------------------------------------------------------------------------------------
# 6. the command line checks its output paths before the run
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "option, make, match",
    [
        ("--json", lambda d: d / "missing" / "r.json", "does not exist"),
        ("--csv", lambda d: d / "missing" / "r.csv", "does not exist"),
        ("--json", lambda d: d, "is a directory"),
        ("--csv", lambda d: d / "a_file" / "r.csv", "does not exist"),
    ],
)
def test_compare_output_paths_are_checked_before_the_run(capsys, tmp_path, option, make, match):
    (tmp_path / "a_file").write_text("")
    status = cli_main(["compare", "simplex", "--n", "3", "--batch", "2", "--repeats", "0", option, str(make(tmp_path))])
    out, err = capsys.readouterr()
    assert status == 2 and err.count("\n") == 1 and option in err and match in err, err
    assert out == ""  # nothing ran


def test_bench_out_is_checked_before_the_run(capsys, tmp_path):
    status = cli_main(["bench", "--quick", "--out", str(tmp_path / "missing" / "deeper")])
    _out, err = capsys.readouterr()
    assert status == 2 and err.count("\n") == 1 and "--out" in err and "does not exist" in err, err


# ------------------------------------------------------------------------------------------------
# 7. no stdout from library calls; the examples' install hint and thread default
# ------------------------------------------------------------------------------------------------

SILENT_SCRIPT = """
import cvxpy as cp, torch, sstcvx
x = cp.Variable(5)
P = sstcvx.Polytope.from_cvxpy(x, [x >= 0, x <= 1, cp.sum(x) == 2], check=True)
U = torch.randn(3, 5, dtype=torch.float64)
X = sstcvx.argmax(P, U, solver="generic")
assert torch.equal(X, torch.zeros_like(U).scatter(-1, U.topk(2, dim=-1).indices, 1.0))
"""


def test_library_calls_print_nothing_on_stdout():
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run(
        [sys.executable, "-c", SILENT_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""


def _load_example(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}_reliability", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_graph_layout_without_networkx_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "networkx", None)  # makes "import networkx" fail
    with pytest.raises(SystemExit, match="pip install networkx"):
        _load_example("graph_layout")


def test_examples_default_to_one_thread_and_say_why(capsys):
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import _common
    finally:
        sys.path.remove(str(ROOT / "examples"))
    import argparse

    parser = argparse.ArgumentParser()
    _common.add_run_arguments(parser, "x")
    assert parser.parse_args([]).threads == 1
    assert parser.parse_args(["--threads", "2"]).threads == 2
    help_text = " ".join(parser.format_help().split())
    assert "Default 1" in help_text and "busy" in help_text
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        _common.apply_threads(parser.parse_args([]))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_family_registry_loads_once_for_all_threads(monkeypatch):
    """A thread asking for the families while another loads them waits for the whole registry."""
    from sstcvx import families as registry

    everything = registry.families()
    assert {"simplex", "ksubset", "spanning_tree"} <= set(everything)

    def slow_import(name):  # stands for a family package that takes a while to import
        threading.Event().wait(0.3)
        for family in everything.values():
            registry.register_family(family)

    monkeypatch.setattr(registry, "_FAMILIES", {})
    monkeypatch.setattr(registry, "_loaded", False)
    monkeypatch.setattr(registry, "importlib", types.SimpleNamespace(import_module=slow_import))
    seen = {}
    _run_threads(lambda i: seen.__setitem__(i, set(registry.families())), 3)
    assert all(names == set(everything) for names in seen.values()), seen
