"""The estimator lab: reference gradients against exact ones, estimator bias and variance, report, command line."""

import json
import math
import textwrap
from pathlib import Path

import pytest
import torch

import sstcvx
from polytopes.hypercube import Hypercube
from polytopes.ksubset import KSubset
from polytopes.permutation import Permutation
from polytopes.simplex import Simplex
from polytopes.spanning_tree import SpanningTree
from sstcvx.harness.cli import main
from sstcvx.harness.lab import (
    CustomEstimator,
    LossError,
    Relaxed,
    ScoreFunction,
    StraightThrough,
    exact_gradient,
    make_loss,
    reference_gradient,
    run_lab,
)
from sstcvx.harness.lab.stats import Moments, ball_radius

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Many small batched calls: on a busy shared machine, one torch thread is several times faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _setup(P, seed, loss="quadratic"):
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(tuple(P.event_shape), dtype=F64, generator=g)
    return theta, make_loss(loss, P, generator=g), g


# ----------------------------------------------------------------------------------------------
# exact gradients and the Monte Carlo reference
# ----------------------------------------------------------------------------------------------


def test_exact_gradient_on_the_simplex_is_the_softmax_gradient():
    P = Simplex(5)
    theta, loss, _ = _setup(P, 0, "linear")
    p = torch.softmax(theta, 0)
    c = loss.c
    # d/dtheta sum_i softmax(theta)_i c_i = p * (c - <p, c>)
    assert torch.allclose(exact_gradient(P, theta, loss), p * (c - p @ c), atol=1e-12)
    # with Gumbel noise of scale s the law is softmax(theta / s)
    p2 = torch.softmax(theta / 2, 0)
    assert torch.allclose(exact_gradient(P, theta, loss, sstcvx.noise.Gumbel(2.0)), p2 * (c - p2 @ c) / 2, atol=1e-12)
    # no closed form with Gaussian noise on the simplex, none on k-subsets
    assert exact_gradient(P, theta, loss, "gaussian") is None
    assert exact_gradient(KSubset(5, 2), theta, loss) is None


def test_reference_agrees_with_the_exact_gradient_on_the_simplex():
    P = Simplex(5)
    theta, loss, g = _setup(P, 0)
    exact = exact_gradient(P, theta, loss)
    ref = reference_gradient(P, theta, loss, samples=60_000, confidence=0.99, generator=g)
    assert ref.kind == "score_function" and ref.samples == 60_000
    assert ref.contains(exact), (ref.mean, exact, ref.radius)
    assert bool(((exact >= ref.low) & (exact <= ref.high)).all())
    # the interval is meaningful: a few percent of the gradient, and the control variates help
    assert ref.radius < 0.05 * float(exact.norm())
    assert ref.variance_reduction > 1.5
    # and it would notice a wrong gradient: the exact gradient of another loss is outside
    other = exact_gradient(P, theta, make_loss("quadratic", P, generator=torch.Generator().manual_seed(5)))
    assert not ref.contains(other)


def test_hypercube_gumbel_linear_loss_has_the_closed_form_gradient():
    # X_i = 1 iff theta_i + eps_i > 0, P = 1 - exp(-e^theta_i), derivative e^theta_i exp(-e^theta_i)
    P = Hypercube(4)
    theta, loss, g = _setup(P, 1, "linear")
    closed = loss.c * theta.exp() * torch.exp(-theta.exp())
    assert torch.allclose(exact_gradient(P, theta, loss), closed, atol=1e-12)
    # the derivative of P(theta + G > 0) by central differences, as an independent witness
    h = 1e-6

    def prob(t):
        return 1 - torch.exp(-torch.exp(t))

    assert torch.allclose(loss.c * (prob(theta + h) - prob(theta - h)) / (2 * h), closed, atol=1e-8)
    ref = reference_gradient(P, theta, loss, samples=60_000, confidence=0.99, generator=g)
    assert ref.contains(closed), (ref.mean, closed, ref.radius)
    assert ref.radius < 0.05 * float(closed.norm())


def test_hypercube_exact_gradient_with_logistic_noise_and_a_nonlinear_loss():
    P = Hypercube(3)
    theta, loss, g = _setup(P, 2)
    exact = exact_gradient(P, theta, loss, "logistic")
    ref = reference_gradient(P, theta, loss, "logistic", samples=60_000, confidence=0.99, generator=g)
    assert ref.contains(exact)


# ----------------------------------------------------------------------------------------------
# estimators
# ----------------------------------------------------------------------------------------------


def test_score_function_bias_interval_covers_zero_on_three_families():
    for P, seed in ((KSubset(6, 2), 0), (SpanningTree(4), 1), (Permutation(3), 2)):
        report = run_lab(
            P,
            "quadratic",
            estimators=["score_function"],
            samples=4000,
            reference_samples=60_000,
            confidence=0.99,
            seed=seed,
        )
        norm = report.reference["norm"]
        assert report.reference["kind"] == "score_function"
        assert [r.baseline for r in report] == ["none", "running_mean", "leave_one_out"]
        for row in report:
            assert row.error is None
            assert row.bias_ci[0] == 0.0, (P, row.key, row.bias_ci)
            assert row.bias_ci[1] < 2 * norm, (P, row.key, row.bias_ci, norm)  # the interval says something
            assert row.cosine > 0.8
        # a biased estimator is caught at the same sample size: the score function times 1.5
        loo = ScoreFunction("leave_one_out")
        biased = CustomEstimator(lambda *a, loo=loo: 1.5 * loo(*a), name="inflated", group_size=8)
        row = run_lab(
            P, "quadratic", estimators=[biased], samples=4000, reference_samples=60_000, confidence=0.99, seed=seed
        ).rows[0]
        assert row.estimator == "inflated" and row.bias_ci[0] > 0, row.bias_ci


def test_relaxed_bias_is_smaller_at_tau_0_1_than_at_tau_1_on_ksubset():
    report = run_lab(
        KSubset(6, 2),
        "quadratic",
        taus=(0.1, 1.0),
        regularizers=["binary_entropy", "exp_family_entropy"],
        estimators=["relaxed"],
        samples=10_000,
        batch=5000,
        reference_samples=200_000,
        seed=1,
    )
    for reg in ("binary_entropy", "exp_family_entropy"):
        low, high = report.find("relaxed", tau=0.1, regularizer=reg), report.find("relaxed", tau=1.0, regularizer=reg)
        assert low.bias_ci[1] < high.bias_ci[0], (reg, low.bias_ci, high.bias_ci)
        assert low.variance > high.variance  # and the variance rises as tau falls


def test_straight_through_and_relaxed_agree_with_the_softmax_gradient_on_the_simplex_at_small_tau():
    # on the simplex with the linear loss the relaxed estimator is unbiased for E<c, softmax(U / tau)>, whose
    # gradient tends to the exact one as tau -> 0; at tau = 0.05 the lab should find no significant bias
    report = run_lab(
        Simplex(4),
        "linear",
        taus=(0.05,),
        regularizers=["entropy"],
        estimators=["relaxed", "straight_through"],
        samples=20_000,
        batch=10_000,
        reference_samples=20_000,
        seed=3,
    )
    assert report.reference["kind"] == "exact" and report.reference_check["agrees"]
    for row in report:
        assert row.relative_bias < 0.1, (row.key, row.relative_bias, row.bias_ci)


def test_baselines_reduce_the_score_function_variance():
    report = run_lab(
        Simplex(5), "quadratic", estimators=["score_function"], samples=4000, reference_samples=20_000, seed=0
    )
    none, mean, loo = (report.find("score_function", baseline=b) for b in ("none", "running_mean", "leave_one_out"))
    assert mean.variance < 0.7 * none.variance and loo.variance < 0.7 * none.variance
    assert loo.group_size == 8 and loo.samples % 8 == 0


def test_estimators_return_per_sample_gradients_with_thetas_dtype():
    P = KSubset(5, 2)
    theta, loss, g = _setup(P, 0)
    for est in (
        Relaxed(0.5, "binary_entropy"),
        StraightThrough(0.5, "euclidean"),
        ScoreFunction("running_mean"),
        ScoreFunction("leave_one_out", k=4),
    ):
        G = est(P, theta, loss, sstcvx.noise.Gumbel(), 8, g)
        assert G.shape == (8, 5) and G.dtype == F64 and torch.isfinite(G).all()
    # the relaxed estimator's rows are the gradients of L(X_tau) at each U (checked on one row by autograd)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    G = Relaxed(0.5, "binary_entropy")(P, theta, loss, sstcvx.noise.Gumbel(), 3, g1)
    eps = sstcvx.noise.Gumbel().sample((3, 5), dtype=F64, generator=g2)
    t = theta.clone().requires_grad_()
    (direct,) = torch.autograd.grad(loss(sstcvx.relax(P, (t + eps[1:2]), 0.5, "binary_entropy")).sum(), t)
    assert torch.allclose(G[1], direct, atol=1e-10)


# ----------------------------------------------------------------------------------------------
# report, reproducibility, errors
# ----------------------------------------------------------------------------------------------


def test_report_json_csv_and_table():
    report = run_lab(
        KSubset(5, 2),
        "linear",
        taus=(0.5, 1.0),
        regularizers=["euclidean"],
        samples=400,
        reference_samples=5000,
        seed=0,
    )
    data = json.loads(report.to_json())
    assert data["format"] == "sstcvx.lab/1"
    names = {r["estimator"] for r in data["results"]}
    assert names == {"relaxed", "straight_through", "score_function"}
    for entry in data["results"]:
        for key in ("bias_norm", "bias_ci", "variance", "mse", "seconds_per_sample", "cosine", "samples_to_target"):
            assert key in entry
        assert entry["bias_ci"][0] <= entry["bias_norm"] <= entry["bias_ci"][1]
        assert entry["mse"] >= entry["variance"] >= 0 and entry["seconds_per_sample"] > 0
    csv_lines = report.to_csv().splitlines()
    assert len(csv_lines) == 1 + len(report) and csv_lines[0].startswith("key,estimator")
    table = report.table()
    assert "relaxed" in table and "score_function" in table and "|bias|" in table


def test_runs_are_reproducible_with_a_generator():
    def run(seed):
        report = run_lab(
            KSubset(5, 2),
            "quadratic",
            taus=(0.5,),
            regularizers=["binary_entropy"],
            samples=200,
            reference_samples=2000,
            generator=torch.Generator().manual_seed(seed),
        )
        return [(r.key, r.bias_norm, r.variance, r.bias) for r in report], report.theta

    assert run(3) == run(3)
    assert run(3) != run(4)


def test_bad_options_raise_clear_errors():
    P = KSubset(5, 2)
    with pytest.raises(ValueError, match="samples"):
        run_lab(P, samples=0)
    with pytest.raises(ValueError, match="taus"):
        run_lab(P, taus=(0.1, -1.0))
    with pytest.raises(ValueError, match="estimators: unknown name 'foo'"):
        run_lab(P, estimators=["foo"])
    with pytest.raises(ValueError, match="baselines"):
        run_lab(P, baselines=["mean"])
    with pytest.raises(ValueError, match="theta: expected shape"):
        run_lab(P, theta=torch.zeros(3, dtype=F64))
    with pytest.raises(TypeError, match="loss"):
        run_lab(P, loss=42)
    with pytest.raises(ValueError, match="loss: unknown name"):
        run_lab(P, loss="cubic")
    with pytest.raises(ValueError, match="confidence"):
        run_lab(P, confidence=1.5)
    with pytest.raises(ValueError, match="noise: the score-function"):
        run_lab(P, noise="exponential", samples=10, reference_samples=100)
    with pytest.raises(ValueError, match="baseline"):
        ScoreFunction("mean")
    with pytest.raises(ValueError, match="tau"):
        Relaxed(0.0)
    with pytest.raises(ValueError, match="multiple of the group size"):
        ScoreFunction("leave_one_out", k=4)(
            P, torch.zeros(5, dtype=F64), make_loss("linear", P), sstcvx.noise.Gumbel(), 6
        )


def test_non_finite_and_misshapen_losses_raise_clear_errors():
    P = KSubset(5, 2)

    def nan_loss(X):
        out = X.sum(-1)
        out[3] = math.nan
        return out

    with pytest.raises(LossError, match="non-finite value nan at sample 3"):
        run_lab(P, nan_loss, samples=10, reference_samples=100)
    with pytest.raises(LossError, match="non-finite"):
        Relaxed(1.0, "binary_entropy")(
            P, torch.zeros(5, dtype=F64), lambda X: torch.log(X[:, 0] - 2), sstcvx.noise.Gumbel(), 4
        )
    with pytest.raises(LossError, match=r"one value per sample, shape \(\d+,\)"):
        run_lab(P, lambda X: X, samples=10, reference_samples=100)


def test_a_failing_user_estimator_fails_its_row_only():
    def wrong_shape(P, theta, loss, noise, num, generator):
        return torch.zeros(num, dtype=theta.dtype)

    report = run_lab(
        KSubset(5, 2), estimators=[wrong_shape, "score_function"], baselines=["none"], samples=50, reference_samples=500
    )
    assert "expected a tensor of shape" in report.rows[0].error and report.rows[1].error is None
    assert "error [wrong_shape]" in report.table()


def test_statistics():
    # the ball of a standard normal mean in one dimension is the two-sided normal interval
    assert ball_radius(torch.eye(1, dtype=F64), 0.95) == pytest.approx(1.959964, rel=1e-5)
    # in d dimensions with identity covariance, the chi-square quantile exactly
    from scipy.stats import chi2

    assert ball_radius(torch.eye(6, dtype=F64), 0.9) == pytest.approx(math.sqrt(chi2.ppf(0.9, 6)), rel=1e-9)
    rows = torch.randn(1000, 3, dtype=F64) * torch.tensor([1.0, 2.0, 3.0], dtype=F64) + 100
    m = Moments()
    for chunk in rows.split(300):
        m.add(chunk)
    assert torch.allclose(m.mean, rows.mean(0)) and torch.allclose(m.cov, torch.cov(rows.T), atol=1e-10)


# ----------------------------------------------------------------------------------------------
# the command line
# ----------------------------------------------------------------------------------------------

USER_FILE = textwrap.dedent(
    """
    import torch

    def bad_loss(X):
        return torch.full((X.shape[0],), float("inf"), dtype=X.dtype)

    def soft_loss(X):
        return (X[:, 0] - 0.5) ** 2 + X.sum(-1)

    def doubled(P, theta, loss, noise, num, generator):
        from sstcvx.harness.lab import Relaxed
        return 2 * Relaxed(1.0, "euclidean")(P, theta, loss, noise, num, generator)
    """
)


def test_cli_lab_writes_json_csv_png(capsys, tmp_path):
    out = tmp_path / "lab"
    status = main(
        [
            "lab",
            "ksubset",
            "--n",
            "5",
            "--k",
            "2",
            "--samples",
            "200",
            "--reference-samples",
            "4000",
            "--tau",
            "0.5,1",
            "--regularizer",
            "euclidean",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert "KSubset(n=5, k=2)" in captured.out and "|bias|" in captured.out
    data = json.loads((out / "lab.json").read_text())
    assert {r["estimator"] for r in data["results"]} == {"relaxed", "straight_through", "score_function"}
    assert (out / "lab.csv").exists()
    assert (out / "lab.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_lab_user_loss_and_estimator(capsys, tmp_path):
    path = tmp_path / "mine.py"
    path.write_text(USER_FILE)
    status = main(
        [
            "lab",
            "simplex",
            "--n",
            "4",
            "--loss",
            f"{path}:soft_loss",
            "--estimators",
            f"score_function,{path}:doubled",
            "--baselines",
            "none",
            "--samples",
            "100",
            "--reference-samples",
            "1000",
            "--out",
            str(tmp_path / "o"),
            "--no-progress",
        ]
    )
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert "doubled" in captured.out and "reference: exact" in captured.out
    status = main(
        [
            "lab",
            "simplex",
            "--loss",
            f"{path}:bad_loss",
            "--samples",
            "10",
            "--reference-samples",
            "100",
            "--out",
            str(tmp_path / "o"),
            "--no-progress",
        ]
    )
    captured = capsys.readouterr()
    assert status == 1 and "non-finite value inf" in captured.err and len(captured.err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--samples", "0"], "--samples: expected a positive integer"),
        (["--tau", "0"], "--tau: expected temperatures > 0"),
        (["--estimators", "magic"], "unknown estimator 'magic'"),
        (["--baselines", "median"], "unknown baseline 'median'"),
        (["--noise", "exponential"], "--noise: invalid choice"),
        (["--loss", "cubic"], "unknown loss 'cubic'"),
        (["--loss", "nofile.py:f"], "no such file"),
        (["--confidence", "2"], "--confidence: expected a number in (0, 1)"),
    ],
)
def test_cli_lab_bad_options_exit_2_with_one_line(capsys, tmp_path, argv, message):
    status = main(["lab", "ksubset", *argv, "--out", str(tmp_path / "o")])
    captured = capsys.readouterr()
    assert status == 2
    assert message in captured.err and len(captured.err.strip().splitlines()) == 1, captured.err
    assert not (tmp_path / "o").exists()


def test_cli_lab_unknown_family_exits_2(capsys):
    assert main(["lab", "nope"]) == 2
    assert "unknown family 'nope'" in capsys.readouterr().err


def test_plot_with_score_function_only(tmp_path):
    report = run_lab(Simplex(3), estimators=["score_function"], baselines=["none"], samples=50, reference_samples=500)
    path = report.plot(tmp_path / "sf.png")
    assert Path(path).read_bytes()[:4] == b"\x89PNG"


def test_example_runs_tiny(tmp_path):
    import importlib.util

    source = Path(__file__).resolve().parent.parent / "examples" / "estimator_lab.py"
    spec = importlib.util.spec_from_file_location("example_estimator_lab", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out, js = tmp_path / "lab.png", tmp_path / "lab.json"
    results = module.main(["--tiny", "--quiet", "--out", str(out), "--json", str(js)])
    assert out.read_bytes()[:4] == b"\x89PNG" and set(results) == {"ksubset", "spanning_tree"}
    assert json.loads(js.read_text())["ksubset"]["format"] == "sstcvx.lab/1"
    for data in results.values():
        assert {r["estimator"] for r in data["results"]} == {"relaxed", "straight_through", "score_function"}
