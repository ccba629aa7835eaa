"""Dict batches, as Hugging Face users have them, end to end: the same scores as the same data in tuples.

Non-tensor fields (string ids) pass through untouched. Swept over every attributor
that takes a task-defined loss.
"""

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader

from tests.attrib_torch.attributors_under_test import ATTRIBUTORS_UNDER_TEST

DT = torch.float64


class Bag(nn.Module):
    """Mean of the embeddings of the unmasked tokens, then a linear head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.emb = nn.Embedding(11, 4)
        self.mid = nn.Linear(4, 5)
        self.fc = nn.Linear(5, 3)

    def forward(self, input_ids, attention_mask):
        h = self.emb(input_ids) * attention_mask[..., None]
        return self.fc(torch.tanh(self.mid(h.sum(1) / attention_mask.sum(1, keepdim=True))))



def records(n, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(1, 6, (1,), generator=g))
        ids = torch.randint(0, 11, (6,), generator=g)
        mask = (torch.arange(6) < length).to(DT)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": int(torch.randint(0, 3, (1,), generator=g)),
                    "id": f"doc-{seed}-{i}"})
    return out


def as_tuples(loader):
    return [(b["input_ids"], b["attention_mask"], b["labels"]) for b in loader]


class Adapter(nn.Module):
    """The Bag model called with one argument that is a dict or a tuple of (ids, mask)."""

    def __init__(self):
        super().__init__()
        self.bag = Bag().double()

    def forward(self, inputs):
        return self.bag(*inputs)


@pytest.mark.parametrize("name", [n for n in sorted(ATTRIBUTORS_UNDER_TEST) if n != "rps"])
def test_dict_batches_score_as_tuples(name, monkeypatch):
    import tests.attrib_torch.attributors_under_test as sweep

    def task_for(model, margin=False, checkpoints=None):
        def loss(params, batch):
            if isinstance(batch, dict):
                inputs, labels = (batch["input_ids"], batch["attention_mask"]), batch["labels"]
                # strings arrive untouched: one per example of a batch (also of batches joined into one); an
                # example presented alone sees its batch's list, as a non-tensor field cannot be mapped over
                assert all(i.startswith("doc-") for i in batch["id"])
                assert len(labels) == 1 or len(batch["id"]) == len(labels)
            else:
                inputs, labels = batch[:2], batch[2]
            logits = functional_call(model, params, (inputs,))
            if margin:
                p = torch.softmax(logits, -1).gather(1, labels[:, None]).squeeze(1)
                return (torch.log(p) - torch.log1p(-p)).sum()
            return nn.functional.cross_entropy(logits, labels)

        return sweep.AttributionTask(loss, model, model.state_dict() if checkpoints is None else checkpoints)

    def probability(model):
        def p(params, batch):
            inputs, labels = ((batch["input_ids"], batch["attention_mask"]), batch["labels"]) \
                if isinstance(batch, dict) else (batch[:2], batch[2])
            return torch.softmax(functional_call(model, params, (inputs,)), -1).gather(1, labels[:, None]).squeeze(1)

        return p

    monkeypatch.setattr(sweep, "task_for", task_for)
    monkeypatch.setattr(sweep, "probability", probability)
    train = DataLoader(records(14, 0), batch_size=5)
    test = DataLoader(records(6, 1), batch_size=4)
    scores = {}
    for kind, (tr, te) in {"dict": (train, test), "tuple": (as_tuples(train), as_tuples(test))}.items():
        attributor = ATTRIBUTORS_UNDER_TEST[name](Adapter())
        attributor.cache(tr)
        scores[kind] = sweep.call(attributor, "attribute", tr, te)
    assert scores["dict"].shape == (14, 6)
    torch.testing.assert_close(scores["dict"], scores["tuple"])
