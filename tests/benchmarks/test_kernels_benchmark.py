from benchmarks.kernels import main


def test_kernel_benchmark_runs_on_small_shapes(capsys):
    main(["--B", "8", "--P", "3000", "--k", "64", "--n-train", "500", "--n-test", "7", "--repeats", "1"])
    out = capsys.readouterr().out
    assert "| project, gaussian |" in out and "| top-10: topk_inner (streaming) |" in out
    assert "GPU: none available here" in out or "GPU:" in out
