"""The sstcvx command line: compare, bench, demo; exit statuses, outputs and one-line errors."""

import dataclasses
import json
import subprocess
import sys
import textwrap

import pytest

import sstcvx
from sstcvx.harness import bench as bench_module
from sstcvx.harness.cli import main

USER_FILE = textwrap.dedent(
    """
    import cvxpy as cp
    import sstcvx

    def make_polytope(n=5):
        x = cp.Variable(n)
        return sstcvx.Polytope.from_cvxpy(x, [x >= 0, x <= 1, cp.sum(x) == 2], name=f"my 2-of-{n}", recognize=False)

    def not_a_polytope():
        return 42

    def broken():
        raise RuntimeError("cannot build")
    """
)


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "my_polytopes.py"
    path.write_text(USER_FILE)
    return path


def run(capsys, *argv):
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_compare_family_prints_a_table_and_writes_json_and_csv(capsys, tmp_path):
    json_path, csv_path = tmp_path / "r.json", tmp_path / "r.csv"
    status, out, err = run(
        capsys,
        "compare",
        "ksubset",
        "--n",
        "6",
        "--k",
        "2",
        "--batch",
        "3",
        "--repeats",
        "1",
        "--regularizer",
        "euclidean",
        "--regularizer",
        "binary_entropy",
        "--tau",
        "0.5",
        "--json",
        str(json_path),
        "--csv",
        str(csv_path),
    )
    assert status == 0, err
    assert "KSubset(n=6, k=2)" in out and "max|dX|" in out and "specialized" in out
    assert f"wrote JSON to {json_path}" in out and csv_path.exists()
    report = sstcvx.harness.report.ComparisonReport.from_json(json_path)
    assert [r.regularizer for r in report] == ["euclidean", "binary_entropy"]
    assert all(r.tau == 0.5 and r.batch == 3 and r.max_abs_diff < 1e-4 for r in report)
    data = json.loads(json_path.read_text())
    for values in data["configurations"].values():
        assert {"max_abs_diff", "max_abs_grad_diff", "time_generic", "time_specialized", "speedup"} <= set(values)
    assert sstcvx.harness.report.ComparisonReport.from_json(report.to_json()) == report


def test_compare_family_defaults_to_its_regularizers(capsys):
    status, out, _ = run(capsys, "compare", "hypercube", "--n", "4", "--batch", "2", "--repeats", "0")
    assert status == 0
    assert "binary_entropy" in out and "euclidean" in out and "Hypercube(n=4)" in out


def test_compare_user_polytope_file(capsys, user_file):
    status, out, err = run(
        capsys,
        "compare",
        f"{user_file}:make_polytope",
        "--n",
        "4",
        "--batch",
        "2",
        "--repeats",
        "0",
        "--regularizer",
        "euclidean",
    )
    assert status == 0, err
    assert (
        "my 2-of-4" in out and "solver:Clara" in out
    )  # euclidean runs on SCS, the second solver is Clarabel (truncated column)


def test_fail_above_gives_status_1(capsys):
    # the entropy: on the Euclidean simplex the fast solver now agrees with sparsemax bit for bit
    # (a difference of 0 is not above any threshold); softmax differs by rounding
    status, _, err = run(
        capsys,
        "compare",
        "simplex",
        "--n",
        "4",
        "--batch",
        "2",
        "--repeats",
        "0",
        "--regularizer",
        "entropy",
        "--fail-above",
        "1e-30",
    )
    assert status == 1 and "FAILED" in err


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate"],
        ["compare"],
        ["compare", "nosuchfamily"],
        ["compare", "ksubset", "--n", "0"],
        ["compare", "ksubset", "--n", "ten"],
        ["compare", "ksubset", "--n", "3", "--k", "5"],
        ["compare", "simplex", "--k", "2"],
        ["compare", "ksubset", "--tau", "-1"],
        ["compare", "ksubset", "--tau", "1,nan"],
        ["compare", "ksubset", "--regularizer", "l2"],
        ["compare", "ksubset", "--batch", "0"],
        ["compare", "ksubset", "--bogus"],
        ["compare", "missing_file.py:make"],
        ["compare", "USER:nosuchfunction"],
        ["compare", "USER:not_a_polytope"],
        ["compare", "USER:broken"],
        ["bench", "--families", "simplex,nonsense"],
        ["bench", "--bogus"],
        ["demo", "--bogus"],
    ],
)
def test_wrong_options_give_one_line_and_status_2(capsys, user_file, argv):
    argv = [a.replace("USER", str(user_file)) for a in argv]
    status, out, err = run(capsys, *argv)
    assert status == 2
    assert out == ""
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert "error" in err


@pytest.mark.parametrize(
    "command, options",
    [
        (
            "compare",
            [
                "--n",
                "--k",
                "--batch",
                "--tau",
                "--regularizer",
                "--json",
                "--csv",
                "--repeats",
                "--seed",
                "--reference",
                "--max-generic-batch",
                "--fail-above",
                "--threads",
                "FILE.py:FUNCTION",
                "spanning_tree",
            ],
        ),
        ("bench", ["--quick", "--out", "--families", "--no-progress", "--threads"]),
        ("demo", ["--threads"]),
    ],
)
def test_help_explains_every_option(capsys, command, options):
    status, out, _ = run(capsys, command, "--help")
    assert status == 0
    flat = " ".join(out.split())
    for option in options:
        assert option in flat
    assert flat.count("--") >= len([o for o in options if o.startswith("--")])


def test_python_m_sstcvx_help_does_not_import_polytopes():
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "sstcvx", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0
    for command in ("compare", "bench", "demo"):
        assert command in result.stdout
    imported = [line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if "|" in line]
    assert "sstcvx" in imported and "sstcvx.harness.cli" in imported
    assert not any(name == "polytopes" or name.startswith("polytopes.") for name in imported)


@pytest.fixture
def tiny_bench(monkeypatch):
    from sstcvx import families

    simplex = dataclasses.replace(families.get_family("simplex"), n=4, quick_sizes=(3, 5), regularizers=("euclidean",))
    monkeypatch.setitem(families._FAMILIES, "simplex", simplex)
    monkeypatch.setitem(
        bench_module.SETTINGS,
        "quick",
        {
            "batch": 2,
            "max_generic_batch": 2,
            "batches": (1, 2, 8),
            "repeats": 1,
            "taus": (0.5, 1.0),
            "sizes": "quick_sizes",
        },
    )


def test_bench_writes_json_and_plots(capsys, tmp_path, tiny_bench):
    out_dir = tmp_path / "bench"
    status, out, err = run(capsys, "bench", "--quick", "--families", "simplex", "--out", str(out_dir))
    assert status == 0, err
    data = json.loads((out_dir / "bench.json").read_text())
    assert data["mode"] == "quick" and list(data["families"]) == ["simplex"]
    sweeps = {(r["sweep"], r["n"]) for r in data["records"]}
    assert sweeps == {("n", 3), ("n", 5), ("batch", 4), ("tau", 4)}
    assert not any("error" in r for r in data["records"])
    capped = [r for r in data["records"] if r["sweep"] == "batch" and r["configurations"][0]["batch"] == 8]
    assert capped[0]["generic_skipped"] == "batch > 2" and capped[0]["configurations"][0]["time_generic"] is None
    tau_rows = [row for r in data["records"] if r["sweep"] == "tau" for row in r["configurations"]]
    assert [row["tau"] for row in tau_rows] == [0.5, 1.0]
    assert all(row["max_abs_diff"] < 1e-4 for row in tau_rows), tau_rows
    assert "at most 2 rows" in out and str(out_dir / "bench.json") in out
    for name in ("time_vs_n.png", "time_vs_batch.png", "error_vs_tau.png"):
        png = out_dir / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and str(png) in out
    assert "simplex" in err  # the progress bar, on stderr


def test_bench_out_must_be_a_directory(capsys, tmp_path):
    target = tmp_path / "file"
    target.write_text("")
    status, _, err = run(capsys, "bench", "--out", str(target))
    assert status == 2 and err.count("\n") == 1


def test_demo_tour_and_comparison():
    from sstcvx.harness.demo import run_demo

    lines = []
    run_demo(out=lines.append, batch=2, repeats=0, families=["simplex"])
    text = "\n".join(lines)
    assert "straight-through" in text and "path-indep-sets(6)" in text and "brute_force" in text
    assert "Simplex(n=10)" in text and "demo done" in text


def test_version_comes_from_its_single_source(capsys):
    from sstcvx._version import __version__

    status, out, _ = run(capsys, "--version")
    assert status == 0 and out.strip() == f"sstcvx {__version__}"
    assert sstcvx.__version__ == __version__
