from benchmarks import retrain
from benchmarks.run import run_setting


def test_benchmark_runner_on_a_small_setting(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(retrain, "CACHE", tmp_path / "cache")
    _, rows = run_setting("logreg", ["explicit", "grad-dot", "trak-5"], n_models=6, n_val=2, do_tune=True, seed=0,
                       n_train=150, results=tmp_path)
    assert [r.method for r in rows] == ["explicit", "grad-dot"]  # convex: no TRAK ensemble
    explicit = rows[0]
    assert explicit.lds > 0.5 and explicit.auc > 0.8  # influence on a convex model predicts retraining
    assert all(0.0 <= r.auc <= 1.0 for r in rows)
    text = (tmp_path / "logreg-quick-partial.md").read_text()
    assert "| explicit |" in text and (tmp_path / "logreg-quick-partial.png").stat().st_size > 1000
    out = capsys.readouterr().out
    assert "validation LDS" in out  # tuned on the validation models
