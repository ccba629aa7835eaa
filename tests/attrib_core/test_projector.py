import math

import pytest
import torch

from attrib_core import projector
from kernels import project


@pytest.mark.parametrize("kind", ["gaussian", "rademacher", "sjlt"])
def test_random_kinds_are_the_kernel_projection_and_batch_independent(kind):
    G = torch.randn(12, 300, dtype=torch.float64)
    proj = projector(300, 32, kind=kind, seed=5)
    out = proj(G)
    torch.testing.assert_close(out, project(G, 32, kind=kind, seed=5))
    torch.testing.assert_close(torch.cat([proj(G[:5]), proj(G[5:])]), out, rtol=1e-12, atol=1e-12)
    halves = proj(G[:, :100], offset=0) + proj(G[:, 100:], offset=100)
    torch.testing.assert_close(halves, out, rtol=1e-12, atol=1e-12)


def test_mask_and_identity():
    G = torch.randn(4, 50, dtype=torch.float64)
    mask = projector(50, 10, kind="mask", seed=1)
    assert mask.columns.shape == (10,) and len(set(mask.columns.tolist())) == 10
    torch.testing.assert_close(mask(G), G[:, mask.columns] * math.sqrt(50 / 10))
    assert torch.equal(projector(50, 10, kind="mask", seed=1).columns, mask.columns)
    assert not torch.equal(projector(50, 10, kind="mask", seed=2).columns, mask.columns)
    identity = projector(50, 50, kind="identity")
    torch.testing.assert_close(identity(G), G)
    torch.testing.assert_close(identity(G[:, :20], offset=0) + identity(G[:, 20:], offset=20), G)


def test_bad_input():
    with pytest.raises(ValueError, match="kind"):
        projector(10, 5, kind="fft")
    with pytest.raises(ValueError, match="identity"):
        projector(10, 5, kind="identity")
    with pytest.raises(ValueError, match="mask"):
        projector(10, 11, kind="mask")
    with pytest.raises(ValueError, match="dim_out"):
        projector(10, 0)
    with pytest.raises(ValueError, match="G: expected shape"):
        projector(10, 4)(torch.ones(2, 9))
    with pytest.raises(ValueError, match="exceed dim_in"):
        projector(10, 4)(torch.ones(2, 5), offset=6)
