import subprocess
import sys

import pytest
import torch

from kernels import backend


def test_default_is_torch_on_cpu(monkeypatch):
    monkeypatch.delenv("ATTRIB_KERNELS", raising=False)
    assert backend(torch.ones(1)) == "torch"


def test_environment_forces_a_path(monkeypatch):
    monkeypatch.setenv("ATTRIB_KERNELS", "torch")
    assert backend(torch.ones(1)) == "torch"
    monkeypatch.setenv("ATTRIB_KERNELS", "cuda")
    with pytest.raises(ValueError, match="ATTRIB_KERNELS"):
        backend(torch.ones(1))
    monkeypatch.setenv("ATTRIB_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        backend(torch.ones(1))


def test_package_works_without_triton():
    # A fresh interpreter in which importing triton fails, as on platforms without it.
    code = """
import builtins, sys
real_import = builtins.__import__
def no_triton(name, *args, **kwargs):
    if name == "triton" or name.startswith("triton."):
        raise ImportError("no triton here")
    return real_import(name, *args, **kwargs)
builtins.__import__ = no_triton
import importlib.util
real_find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a: None if name == "triton" else real_find_spec(name, *a)
import torch, kernels, attrib_core
x = torch.randn(3, 50)
assert kernels.backend(x) == "torch"
assert kernels.project(x, 8, kind="gaussian").shape == (3, 8)
assert attrib_core.topk_scores(x, x[:2], 2).indices.shape == (2, 2)
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
