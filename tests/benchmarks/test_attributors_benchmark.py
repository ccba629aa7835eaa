from benchmarks.attributors import main


def test_attributor_benchmark_runs_on_a_small_model(capsys):
    main(["--n-train", "120", "--hidden", "8", "--dattri-methods", ""])
    out = capsys.readouterr().out
    for method in ("explicit", "cg", "lissa", "datainf", "arnoldi", "ekfac"):
        assert f"| {method} |" in out
    assert "| explicit |" in out and "| True | 1.000 |" in out
