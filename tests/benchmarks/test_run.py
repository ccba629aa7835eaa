import pytest
import torch

from attrib_core import mislabel_auc
from benchmarks import retrain
from benchmarks.run import auc_rows, run_setting


def test_benchmark_runner_on_a_small_setting(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(retrain, "CACHE", tmp_path / "cache")
    _, rows = run_setting("logreg", ["explicit", "grad-dot", "trak-5"], n_models=6, n_val=2, do_tune=True, seed=0,
                       n_train=150, results=tmp_path, auc_limit=100, tag="some_methods")
    assert [r.method for r in rows] == ["explicit", "grad-dot"]  # convex: no TRAK ensemble
    explicit = rows[0]
    assert explicit.lds > 0.5 and explicit.auc > 0.8  # influence on a convex model predicts retraining
    assert all(0.0 <= r.auc <= 1.0 for r in rows)
    text = (tmp_path / "logreg-quick-some_methods.md").read_text()
    assert "AUC over all 15 flipped and 85 random clean training images" in text
    assert "| explicit |" in text and (tmp_path / "logreg-quick-some_methods.png").stat().st_size > 1000
    out = capsys.readouterr().out
    assert "validation LDS" in out  # tuned on the validation models


def test_a_bad_tag_is_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="tag"):
        run_setting("logreg", ["explicit"], n_models=6, n_val=2, do_tune=False, seed=0, results=tmp_path,
                    tag="../elsewhere")


def test_auc_rows_keep_every_flipped_image_and_estimate_the_full_auc_without_bias():
    scores = torch.randn(400, generator=torch.Generator().manual_seed(0))
    is_noisy = torch.zeros(400, dtype=torch.bool)
    is_noisy[::10] = True
    scores[is_noisy] += 1.0
    assert auc_rows(is_noisy, None, 0) is None and auc_rows(is_noisy, 400, 0) is None
    rows = auc_rows(is_noisy, 120, 0)
    assert len(rows) == 120 and len(set(rows.tolist())) == 120 and bool(is_noisy[rows].sum() == 40)
    full = mislabel_auc(scores, is_noisy).auc
    estimates = [mislabel_auc(scores[r], is_noisy[r]).auc for r in (auc_rows(is_noisy, 120, s) for s in range(200))]
    assert abs(sum(estimates) / len(estimates) - full) < 0.01  # the mean of 200 draws is the full AUC
    assert len(set(estimates)) > 1  # different seeds draw different clean images
    with pytest.raises(ValueError, match="--auc-rows"):
        auc_rows(is_noisy, 40, 0)
