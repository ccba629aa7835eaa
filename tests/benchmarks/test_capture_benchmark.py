from benchmarks.capture import main


def test_capture_benchmark_runs_on_a_small_shape(capsys):
    main(["--repeats", "1", "--shapes", "16x8"])
    out = capsys.readouterr().out
    assert "| 16 x 8 |" in out and "x |" in out
