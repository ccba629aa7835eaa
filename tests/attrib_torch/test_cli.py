"""``attrib build | query | info`` end to end on a GPT-2 from its config: a user's objects by import string, the
store the library would build, exact top-k equal to sorting the attributor's scores, resume, refusals."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore:LoGraAttributor:UserWarning")  # the LayerNorms left out, named

from attrib_torch.cli import main  # noqa: E402
from attrib_torch.store import FeatureStore  # noqa: E402

USER = textwrap.dedent('''
    import torch, transformers

    class Sequences(torch.utils.data.Dataset):
        def __init__(self, n, seed):
            g = torch.Generator().manual_seed(seed)
            self.ids = torch.randint(1, 24, (n, 10), generator=g)
            lengths = torch.randint(3, 11, (n,), generator=g)
            self.mask = (torch.arange(10) < lengths[:, None]).long()
            self.ids = self.ids * self.mask
        def __len__(self):
            return len(self.ids)
        def __getitem__(self, i):
            labels = torch.where(self.mask[i].bool(), self.ids[i], torch.full_like(self.ids[i], -100))
            return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": labels}

    def model():
        config = transformers.GPT2Config(vocab_size=24, n_positions=16, n_embd=8, n_layer=2, n_head=2,
                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        torch.manual_seed(0)
        return transformers.GPT2LMHeadModel(config)

    def data():
        return torch.utils.data.DataLoader(Sequences(13, 1), batch_size=4)

    def queries():
        return Sequences(3, 2)
''')


@pytest.fixture
def user(tmp_path, monkeypatch):
    (tmp_path / "userobjs.py").write_text(USER)
    monkeypatch.chdir(tmp_path)
    sys.modules.pop("userobjs", None)
    yield tmp_path
    sys.modules.pop("userobjs", None)


def test_build_query_and_info_agree_with_the_attributor(user, capsys):
    import warnings

    from torch.utils.data import DataLoader

    from attrib_torch import AttributionTask, CausalLMLoss, LoGraAttributor

    store = user / "store"
    main(["build", str(store), "--model", "userobjs:model", "--data", "userobjs:data", "--proj-dim", "9",
          "--chunk-rows", "8"])
    assert "13 rows x" in capsys.readouterr().out
    main(["query", str(store), "--queries", "userobjs:queries", "--k", "4", "--out", str(user / "top.pt")])
    main(["query", str(store), "--queries", "userobjs:queries", "--k", "4", "--opponents", "--out",
          str(user / "bottom.npz")])
    import userobjs

    model = userobjs.model().eval()
    task = AttributionTask(CausalLMLoss(model), model, {k: v.clone() for k, v in model.state_dict().items()})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scores = LoGraAttributor(task, rank=3, show_progress=False).attribute(
            DataLoader(userobjs.Sequences(13, 1), batch_size=4), DataLoader(userobjs.queries(), batch_size=4))
    top = torch.load(user / "top.pt")
    assert torch.equal(top["indices"], scores.T.topk(4, dim=1).indices)
    torch.testing.assert_close(top["scores"], scores.T.topk(4, dim=1).values, rtol=1e-4, atol=1e-6)
    import numpy as np

    bottom = np.load(user / "bottom.npz")
    assert (bottom["indices"] == scores.T.topk(4, dim=1, largest=False).indices.numpy()).all()
    main(["info", str(store)])
    out = capsys.readouterr().out
    assert "complete, every file's checksum verified" in out and "rows 13, examples 13, width" in out
    before = {p.name: p.read_bytes() for p in store.iterdir()}
    main(["build", str(store), "--resume"])  # nothing left to do: the same bytes
    main(["build", str(store), "--model", "userobjs:model", "--data", "userobjs:data", "--proj-dim", "9",
          "--chunk-rows", "8"])  # the same command again, as after a crash
    main(["build", str(store), "--resume", "--chunk-rows", "8"])
    main(["build", str(store), "--model", "userobjs:model", "--data", "userobjs:data", "--proj-dim", "9",
          "--chunk-rows", "8", "--dtype", "float32", "--seed", "0"])  # defaults spelled out: the same build
    assert {p.name: p.read_bytes() for p in store.iterdir()} == before
    with pytest.raises(SystemExit, match="--proj_dim 16"):
        main(["build", str(store), "--resume", "--proj-dim", "16"])
    with pytest.raises(SystemExit, match="another configuration"):
        main(["build", str(store), "--model", "userobjs:model", "--data", "userobjs:data", "--proj-dim", "16"])


def test_bad_import_strings_and_options_are_named(user):
    for argv, match in ((["build", "s", "--model", "userobjs", "--data", "userobjs:data"], "import string"),
                        (["build", "s", "--model", "nomodule:model", "--data", "userobjs:data"], "cannot import"),
                        (["build", "s", "--model", "userobjs:nothing", "--data", "userobjs:data"], "no attribute"),
                        (["build", "s", "--model", "userobjs:data", "--data", "userobjs:data"], "not an nn.Module"),
                        (["build", "s", "--model", "userobjs:model", "--data", "userobjs:data", "--proj-dim", "10"],
                         "perfect square"),
                        (["build", "s", "--data", "userobjs:data"], "--model and --data are required"),
                        (["build", "s", "--resume"], "has no build.json")):
        with pytest.raises(SystemExit, match=match):
            main(argv)
    never = ["--model", "nomodule:model", "--data", "nomodule:data"]  # options are checked before any import
    for argv, match in ((["--proj-dim", "10"], "perfect square"), (["--proj-dim", "0"], "--proj-dim: expected a pos"),
                        (["--batch-size", "0"], "--batch-size: expected a pos"),
                        (["--chunk-rows", "-5"], "--chunk-rows: expected a pos"),
                        (["--batch-size", "4", "--chunk-rows", "6"], "multiple of --batch-size 4"),
                        (["--method", "grad", "--per-token"], "--per-token: needs")):
        with pytest.raises(SystemExit, match=match):
            main(["build", "s", *never, *argv])
    for argv, match in ((["--out", "top.txt"], "--out: expected a .pt or .npz"), (["--k", "0", "--out", "a.pt"],
                                                                                     "--k: expected a pos")):
        with pytest.raises(SystemExit, match=match):
            main(["query", "nostore", "--queries", "nomodule:q", *argv])
    with pytest.raises(SystemExit, match="not a directory"):
        main(["info", "nostore"])


def test_info_reports_damaged_stores_and_query_finds_training_tokens(user, capsys):
    store = user / "tokens"
    main(["build", str(store), "--model", "userobjs:model", "--data", "userobjs:data", "--proj-dim", "4",
          "--per-token"])
    assert "token rows of 13 examples" in capsys.readouterr().out
    main(["query", str(store), "--queries", "userobjs:queries", "--k", "3", "--tokens", "--out", str(user / "t.pt")])
    found = torch.load(user / "t.pt")
    opened = FeatureStore.open(store)
    offsets = opened.token_offsets()
    assert torch.equal(offsets[found["examples"]] + found["positions"], found["indices"])
    main(["query", str(store), "--queries", "userobjs:queries", "--k", "3", "--out", str(user / "s.pt")])
    assert torch.load(user / "s.pt")["indices"].max() < 13  # sequences, their token rows added up
    with pytest.raises(SystemExit, match="attrib index"):
        main(["query", str(store), "--queries", "userobjs:queries", "--tokens", "--approximate", "--out", "a.pt"])
    main(["index", str(store), "--kind", "ivf-flat", "--nlist", "4"])
    main(["query", str(store), "--queries", "userobjs:queries", "--k", "3", "--tokens", "--approximate",
          "--nprobe", "4", "--out", str(user / "a.pt")])  # every list scanned: the exact answer
    approximate = torch.load(user / "a.pt")
    assert torch.equal(approximate["indices"], found["indices"])
    assert torch.equal(approximate["positions"], found["positions"])
    shard = store / "part-00000.npy"
    shard.write_bytes(shard.read_bytes()[:-7])
    main(["info", str(store)])
    assert "NOT USABLE" in capsys.readouterr().out
    (store / "manifest.json").write_text("{")
    main(["info", str(store)])
    assert "NOT USABLE" in capsys.readouterr().out


def test_torchrun_builds_the_store_one_process_builds(user):
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2]), str(user), os.environ.get("PYTHONPATH", "")])}
    common = ["--model", "userobjs:model", "--data", "userobjs:data", "--method", "grad", "--proj-dim", "32",
              "--chunk-rows", "4"]
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                    "attrib_torch", "build", str(user / "two"), *common], check=True, env=env, capture_output=True,
                   timeout=300, cwd=user)
    subprocess.run([sys.executable, "-m", "attrib_torch", "build", str(user / "one"), *common], check=True, env=env,
                   capture_output=True, timeout=300, cwd=user)
    two, one = FeatureStore.open(user / "two"), FeatureStore.open(user / "one")
    assert len(two.shards) == 2 and torch.equal(two.rows(), one.rows())
    shown = subprocess.run([sys.executable, "-m", "attrib_torch", "info", str(user / "two")], env=env, cwd=user,
                           capture_output=True, text=True, check=True).stdout
    assert "part-00001.npy" in shown
