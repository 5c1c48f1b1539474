"""Smoke tests: every example runs in its tiny configuration and writes sane results and a PNG."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_example(name, tmp_path, *extra):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out, js = tmp_path / f"{name}.png", tmp_path / f"{name}.json"
    returned = module.main(["--tiny", "--quiet", "--out", str(out), "--json", str(js), *extra])
    assert out.read_bytes()[:8] == PNG_MAGIC
    written = json.loads(js.read_text())
    assert written == json.loads(json.dumps(returned))
    return written


def in_unit_interval(*values):
    return all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in values)


def test_graph_layout(tmp_path):
    results = run_example("graph_layout", tmp_path, "--no-cache")
    assert set(results) == {"spanning_tree", "topk", "independent"}
    for method, r in results.items():
        assert math.isfinite(r["elbo"]), method
        assert in_unit_interval(r["edge_precision"], r["edge_recall"]), (method, r)
    # Trees and top-(n-1) sets both have n - 1 edges, so precision equals recall.
    for method in ("spanning_tree", "topk"):
        assert results[method]["edge_precision"] == pytest.approx(results[method]["edge_recall"])


def test_subset_selection(tmp_path):
    results = run_example("subset_selection", tmp_path)
    assert set(results) == {"binary_entropy", "exp_family_entropy", "euclidean", "straight_through", "independent"}
    for method, r in results.items():
        assert in_unit_interval(r["accuracy"], r["subset_precision"]), (method, r)


def test_custom_polytope(tmp_path):
    results = run_example("custom_polytope", tmp_path)
    for path in ("generic", "specialized"):
        assert results[path]["vertices"] == 1.0
        assert in_unit_interval(results[path]["accuracy"])
    # Same seed, same U: the two paths train the same model up to the conic solver's tolerance.
    assert results["generic"]["final_loss"] == pytest.approx(results["specialized"]["final_loss"], abs=1e-4)
    assert results["compare"]["max_abs_diff"] < 1e-6
    assert results["compare"]["hard_agreement"] == 1.0


def test_new_relaxation(tmp_path):
    results = run_example("new_relaxation", tmp_path)
    assert results["tsallis_1.5"]["path"] == "specialized"  # Regularizer.separable on k-subsets
    assert results["tsallis_1.5 (cvxpylayers)"]["path"] == "generic"
    assert results["entropy+euclidean"]["path"] == "specialized"
    assert results["binary_entropy"]["path"] == "specialized"
    compare = results.pop("compare")
    for name in ("tsallis_1.5", "entropy+euclidean"):
        assert compare[name]["max_abs_diff"] < 1e-6 and compare[name]["brute_force_max_abs_diff"] < 1e-6, compare
    for name, r in results.items():
        assert in_unit_interval(r["subset_precision"], r["boundary_fraction"], r["relaxed_hard_gap"]), (name, r)
        assert math.isfinite(r["final_loss"])
    # The Euclidean projection reaches the boundary of P.
    assert results["euclidean"]["boundary_fraction"] > 0


def test_correlated_subset_selection(tmp_path):
    import torch

    threads = torch.get_num_threads()
    try:
        results = run_example("correlated_subset_selection", tmp_path)
    finally:  # this example defaults to --threads 1; leave the test process as it was
        torch.set_num_threads(threads)
    assert set(results) == {"correlated", "ksubset", "straight_through", "independent"}
    for method, r in results.items():
        assert in_unit_interval(r["accuracy"], r["subset_precision"], r["contiguity"]), (method, r)


def test_listops_parsing(tmp_path):
    results = run_example("listops_parsing", tmp_path, "--no-cache")
    assert set(results) == {"arborescence", "straight_through", "independent"}
    for method, r in results.items():
        assert in_unit_interval(r["accuracy"], r["hard_accuracy"], r["arc_precision"], r["arc_recall"]), (method, r)
    # A hard arborescence has exactly one arc into every token, as the true parse does: precision equals recall.
    for method in ("arborescence", "straight_through"):
        assert results[method]["arc_precision"] == pytest.approx(results[method]["arc_recall"])


def test_listops_ground_truth_parse():
    """The generator's parse is an arborescence rooted at ROOT, and evaluating it bottom-up gives the label."""
    import numpy as np
    import torch

    import polytopes
    import sstcvx

    spec = importlib.util.spec_from_file_location("example_listops", EXAMPLES / "listops_parsing.py")
    lp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lp)
    rng = np.random.default_rng(0)
    for _ in range(100):
        tokens, nodes, heads, value = lp.draw_expression(rng, max_depth=3, max_args=4, p_nest=0.4)
        n = len(nodes)
        words = [lp.VOCAB[tokens[p]] for p in nodes]
        assert words[0] == "ROOT" and "]" not in words and len(tokens) == n + sum(w.startswith("[") for w in words)
        children = {h: [d for d in range(1, n) if heads[d] == h] for h in range(n)}

        def evaluate(v, words=words, children=children):
            if words[v].isdigit():
                return int(words[v])
            args = [evaluate(d) for d in children[v]]
            return {"[MIN": min, "[MAX": max, "[MED": lambda a: sorted(a)[(len(a) - 1) // 2]}[words[v]](args)

        # ROOT heads the first token only; only operators head anything.
        assert children[0] == [1] and evaluate(1) == value
        assert all(words[h].startswith("[") for h in children if h and children[h])
        # The gold arcs form an arborescence: they are their own best arborescence.
        gold = lp.gold_arcs(torch.tensor([heads]))
        assert torch.equal(sstcvx.argmax(polytopes.Arborescence(n), gold), gold)
