"""``run_lab``: measure gradient estimators of E[L(X)] against a reference gradient on any polytope."""

from __future__ import annotations

import math
import time

import torch

from ...noise import get_noise
from ...registry import specialized_regularizers
from ...regularizers import get_regularizer
from ...validation import check_polytope, check_solver
from ..progress import progress_bar
from .estimators import (
    BASELINES,
    Estimator,
    LossError,
    Relaxed,
    ScoreFunction,
    StraightThrough,
    as_estimator,
)
from .losses import make_loss
from .reference import _check_theta, exact_reference, reference_gradient
from .report import LabReport, LabRow
from .stats import Moments, ball_radius, cosine_with_interval

#: The names accepted in ``estimators``.
ESTIMATORS = ("relaxed", "straight_through", "score_function")


def _positive_int(value, name):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return value


def _temperatures(taus):
    taus = [taus] if isinstance(taus, (int, float)) and not isinstance(taus, bool) else list(taus)
    if not taus:
        raise ValueError("taus: expected at least one temperature")
    for tau in taus:
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not (math.isfinite(tau) and tau > 0):
            raise ValueError(f"taus: expected positive finite temperatures, got {tau!r}")
    return [float(t) for t in taus]


def expand_estimators(P, estimators, taus, regularizers, baselines, loo_k, solver) -> list:
    """The list of :class:`Estimator` objects a run measures: each name expanded over its settings.

    ``"relaxed"`` and ``"straight_through"``: one per regularizer and temperature;
    ``"score_function"``: one per baseline; objects and callables are taken as they are.
    """
    if isinstance(estimators, str) or not hasattr(estimators, "__iter__"):
        estimators = [estimators]
    out: list[Estimator] = []
    for item in estimators:
        if isinstance(item, str):
            if item not in ESTIMATORS:
                raise ValueError(
                    f"estimators: unknown name {item!r}; expected {', '.join(ESTIMATORS)}, an Estimator or a callable"
                )
            if item == "score_function":
                out += [ScoreFunction(b, k=loo_k, solver=solver) for b in baselines]
            else:
                cls = Relaxed if item == "relaxed" else StraightThrough
                out += [cls(tau, reg, solver) for reg in regularizers for tau in taus]
        else:
            out.append(as_estimator(item))
    if not out:
        raise ValueError("estimators: expected at least one estimator")
    return out


def measure(
    estimator: Estimator,
    P,
    theta,
    loss,
    noise,
    reference,
    samples: int,
    batch: int,
    confidence: float,
    target_error: float,
    generator=None,
    progress=None,
) -> LabRow:
    """Draw ``samples`` per-sample gradients of ``estimator`` (in calls of about ``batch``) and compare them with ``reference``.

    Rows are averaged within groups of ``estimator.group_size`` first; the per-sample
    covariance is group_size times the group means' covariance.  See :class:`LabRow` for
    the metrics.  The estimator's failures other than :class:`LossError` are recorded in
    ``row.error``; a bad loss raises.
    """
    K = estimator.group_size
    settings = estimator.settings() if isinstance(estimator, Estimator) else {}
    row = LabRow(
        estimator=estimator.name,
        group_size=K,
        **{k: v for k, v in settings.items() if k in ("tau", "regularizer", "baseline", "k")},
    )
    shape = tuple(P.event_shape)
    total = K * math.ceil(samples / K)
    step = K * max(1, batch // K)
    groups = Moments()
    elapsed, done = 0.0, 0
    try:
        estimator.reset()
        estimator(P, theta, loss, noise, K, generator)  # warm-up (caches, first-call costs), not timed
        estimator.reset()
        while done < total:
            num = min(step, total - done)
            start = time.perf_counter()
            G = estimator(P, theta, loss, noise, num, generator)
            elapsed += time.perf_counter() - start
            if not isinstance(G, torch.Tensor) or tuple(G.shape) != (num,) + shape:
                got = tuple(G.shape) if isinstance(G, torch.Tensor) else type(G).__name__
                raise ValueError(f"estimator {row.key!r} returned {got}, expected a tensor of shape {(num,) + shape}")
            G = G.detach().to(torch.float64)
            if not bool(torch.isfinite(G).all()):
                k = int((~torch.isfinite(G.reshape(num, -1)).all(1)).nonzero()[0])
                raise ValueError(f"non-finite gradient at sample {done + k}")
            groups.add(G.reshape(num // K, K, -1).mean(1))
            done += num
            if progress is not None:
                progress(num)
    except (LossError, KeyboardInterrupt):
        raise
    except Exception as error:
        row.error = f"{type(error).__name__}: {error}".splitlines()[0]
        if progress is not None:
            progress(total - done)
        return row
    g = reference.mean.reshape(-1).to(torch.float64)
    cov_of_mean = groups.cov / groups.count
    per_sample = K * groups.cov
    bias = groups.mean - g
    cov_bias = cov_of_mean + reference.cov.to(cov_of_mean)
    radius = ball_radius(cov_bias, confidence)
    norm = float(bias.norm())
    bias_sq = max(0.0, norm * norm - float(torch.diagonal(cov_bias).sum()))
    variance = float(torch.diagonal(per_sample).sum())
    target = target_error * float(g.norm())
    row.samples = total
    row.bias = bias.tolist()
    row.bias_norm = norm
    row.bias_ci = [max(0.0, norm - radius), norm + radius]
    row.relative_bias = norm / float(g.norm()) if float(g.norm()) > 0 else None
    row.cosine, row.cosine_ci = cosine_with_interval(groups.mean, cov_of_mean, g, reference.cov.to(g), confidence)
    row.variance = variance
    row.std = math.sqrt(variance)
    row.mse = bias_sq + variance
    row.seconds_per_sample = elapsed / total
    row.target_error = target
    low = row.bias_ci[0]  # the smallest bias the data allow: "never" is then a firm conclusion
    row.samples_to_target = max(1, math.ceil(variance / (target * target - low * low))) if target > low else None
    return row


def run_lab(
    P,
    loss="quadratic",
    theta: torch.Tensor | None = None,
    *,
    taus=(0.1, 0.3, 1.0),
    regularizers=None,
    estimators=ESTIMATORS,
    baselines=BASELINES,
    loo_k: int = 8,
    noise="gumbel",
    samples: int = 2000,
    reference_samples: int = 200_000,
    batch: int = 2000,
    reference_batch: int = 20_000,
    confidence: float = 0.95,
    target_error: float = 0.1,
    generator: torch.Generator | None = None,
    seed: int = 0,
    solver: str = "auto",
    use_exact: bool = True,
    progress: bool = False,
) -> LabReport:
    """Measure estimators of grad_theta E[L(X)], X = argmax_{x in P} <theta + eps, x>, against a reference.

    Args:
        P: any :class:`sstcvx.Polytope`.
        loss: a batched torch function ``(B, *event_shape) -> (B,)`` defined on all of P (the
            relaxed estimators evaluate it at interior points), or a built-in name
            (``"linear"``, ``"quadratic"``; see :mod:`.losses`, coefficients from the generator).
        theta: the parameters, shape ``P.event_shape`` (default: standard normal from the generator, float64).
        taus, regularizers: the temperatures and regularizer names of the relaxed and
            straight-through estimators (default regularizers: those with a specialized solver
            on P, else ``"euclidean"`` on the generic path).
        estimators: names from ``"relaxed"``, ``"straight_through"``, ``"score_function"``,
            :class:`Estimator` objects, or callables ``fn(P, theta, loss, noise, num, generator)``.
        baselines, loo_k: the score function's baselines and the leave-one-out group size.
        noise: a name or :class:`sstcvx.Noise`.
        samples: per-sample gradients drawn per estimator and setting, in calls of ``batch``.
        reference_samples, reference_batch: hard samples behind the Monte Carlo reference.
        confidence: the level of every interval; target_error: the relative RMS error
            (x ||grad||) behind ``samples_to_target``.
        generator: a ``torch.Generator`` on theta's device (default: one seeded with ``seed``);
            every random draw comes from it, so a run is reproducible (timings aside).
        solver: passed to ``sstcvx.relax`` / ``sstcvx.argmax``.
        use_exact: where the exact gradient is known (a simplex with Gumbel noise, a hypercube
            with Gumbel, Gaussian or logistic noise), measure against it; the Monte Carlo
            reference is still computed and checked against it (``report.reference_check``).
        progress: show a tqdm progress bar on stderr.

    Returns a :class:`LabReport`.  Cost: ``reference_samples`` hard samples plus ``samples``
    estimator samples per setting, in batches (one solver call each).
    """
    check_polytope(P)
    check_solver(solver)
    law = get_noise(noise)
    samples = _positive_int(samples, "samples")
    batch = _positive_int(batch, "batch")
    reference_batch = _positive_int(reference_batch, "reference_batch")
    if isinstance(reference_samples, bool) or not isinstance(reference_samples, int) or reference_samples < 2:
        raise ValueError(f"reference_samples: expected an int >= 2, got {reference_samples!r}")
    if not (isinstance(confidence, float) and 0 < confidence < 1):
        raise ValueError(f"confidence: expected a float in (0, 1), got {confidence!r}")
    if (
        isinstance(target_error, bool)
        or not isinstance(target_error, (int, float))
        or not (0 < target_error < math.inf)
    ):
        raise ValueError(f"target_error: expected a positive number, got {target_error!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator, got {type(generator).__name__}")
    taus = _temperatures(taus)
    if regularizers is None:
        regularizers = specialized_regularizers(P) or ["euclidean"]
    regularizers = [regularizers] if isinstance(regularizers, str) else list(regularizers)
    regularizer_names = [get_regularizer(r).name for r in regularizers]
    if isinstance(baselines, str):
        baselines = [baselines]
    bad = [b for b in baselines if b not in BASELINES]
    if bad or not baselines:
        raise ValueError(f"baselines: expected names from {', '.join(BASELINES)}, got {list(baselines)!r}")
    if theta is not None:
        theta = _check_theta(P, theta)
    device = theta.device if theta is not None else None
    if generator is None:
        generator = torch.Generator(device=device or "cpu").manual_seed(seed)
    if theta is None:
        theta = torch.randn(tuple(P.event_shape), dtype=torch.float64, generator=generator)
    if isinstance(loss, str):
        loss = make_loss(loss, P, theta.dtype, theta.device, generator)
    elif not callable(loss):
        raise TypeError(f"loss: expected a callable X -> (B,) or a name, got {type(loss).__name__}")
    loss_name = repr(loss) if hasattr(loss, "c") else getattr(loss, "__name__", type(loss).__name__)
    built = expand_estimators(P, estimators, taus, regularizers, baselines, loo_k, solver)

    bar = _bar(reference_samples + sum(e.group_size * math.ceil(samples / e.group_size) for e in built), progress)
    try:
        bar.set_description("reference")
        done = [0]

        def advance(total_so_far):
            bar.update(total_so_far - done[0])
            done[0] = total_so_far

        monte_carlo = reference_gradient(
            P, theta, loss, law, reference_samples, reference_batch, confidence, generator, solver, progress=advance
        )
        exact = exact_reference(P, theta, loss, law, confidence) if use_exact else None
        check = None
        if exact is not None:
            distance = float((monte_carlo.mean - exact.mean).norm())
            check = {
                "distance": distance,
                "radius": monte_carlo.radius,
                "confidence": confidence,
                "agrees": distance <= monte_carlo.radius,
            }
        reference = exact if exact is not None else monte_carlo
        rows = []
        for estimator in built:
            bar.set_description(getattr(estimator, "name", "estimator"))
            rows.append(
                measure(
                    estimator,
                    P,
                    theta,
                    loss,
                    law,
                    reference,
                    samples,
                    batch,
                    confidence,
                    target_error,
                    generator,
                    bar.update,
                )
            )
    finally:
        bar.close()
    summary = reference.summary()
    if exact is not None:
        summary["monte_carlo"] = monte_carlo.summary()
    return LabReport(
        polytope=repr(P),
        loss=loss_name,
        noise=repr(law),
        theta=theta.flatten().tolist(),
        confidence=confidence,
        target_error=float(target_error),
        reference=summary,
        reference_check=check,
        rows=rows,
        settings={
            "taus": taus,
            "regularizers": regularizer_names,
            "baselines": list(baselines),
            "loo_k": loo_k,
            "samples": samples,
            "reference_samples": reference_samples,
            "batch": batch,
            "solver": solver,
            "torch_threads": torch.get_num_threads(),
        },
    )


def _bar(total, enabled):
    return progress_bar(total, enabled, unit="sample", unit_scale=True)
