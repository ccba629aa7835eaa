"""Every attributor class with small settings, on one small model: what the contract sweeps run over.

``ATTRIBUTORS_UNDER_TEST`` maps a name to ``build(model, checkpoints=None) -> attributor``
(``checkpoints``: a list of state dicts for an ensemble; by default one); the model
(:func:`make_model`) is in train mode with Dropout and BatchNorm, holds a frozen layer
and a user hook, and the tasks' checkpoints differ from its weights. :func:`call`
runs one public method the way each class takes its arguments.
"""

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from attrib_torch import (
    AttributionTask,
    IFAttributorArnoldi,
    IFAttributorCG,
    IFAttributorDataInf,
    IFAttributorEKFAC,
    IFAttributorExplicit,
    IFAttributorLiSSA,
    RPSAttributor,
    TRAKAttributor,
    TracInAttributor,
)

DT = torch.float64


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.frozen = nn.Linear(5, 5)
        self.body = nn.Linear(5, 6)
        self.bn = nn.BatchNorm1d(6)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.drop(torch.tanh(self.bn(self.body(x + 0.1 * self.frozen(x))))))


def make_model():
    torch.manual_seed(11)
    model = Net().double()
    for p in model.frozen.parameters():
        p.requires_grad_(False)
    model.bn.running_mean.normal_()
    model.bn.running_var.uniform_(0.5, 2.0)
    model.train()
    model.head.register_forward_hook(lambda module, args, out: None)
    return model


def data():
    g = torch.Generator().manual_seed(12)
    x, y = torch.randn(24, 5, generator=g, dtype=DT), torch.randint(0, 3, (24,), generator=g)
    return DataLoader(TensorDataset(x[:16], y[:16]), batch_size=5), DataLoader(TensorDataset(x[16:], y[16:]),
                                                                                batch_size=4)


def checkpoint(model, scale=0.9):
    """The model's state with every floating-point tensor scaled: weights other than the model's own."""
    return {k: v.clone() * (scale if v.is_floating_point() else 1) for k, v in model.state_dict().items()}


def task_for(model, margin=False, checkpoints=None):
    def loss(params, batch):
        logits = functional_call(model, params, (batch[0],))
        if margin:  # TRAK's output to explain
            p = torch.softmax(logits, -1).gather(1, batch[1][:, None]).squeeze(1)
            return (torch.log(p) - torch.log1p(-p)).sum()
        return nn.functional.cross_entropy(logits, batch[1])

    return AttributionTask(loss, model, checkpoint(model) if checkpoints is None else checkpoints)


def probability(model):
    def p(params, batch):
        logits = functional_call(model, params, (batch[0],))
        return torch.softmax(logits, -1).gather(1, batch[1][:, None]).squeeze(1)

    return p


def rps_task(model, checkpoints=None):
    return AttributionTask(lambda params, batch: None, model, model.state_dict() if checkpoints is None else checkpoints,
                           target_func=lambda logits, labels: nn.functional.cross_entropy(logits, labels))


def learning_rates(checkpoints):
    """TracIn's weight per checkpoint: 1 for one, 0.3 and 0.7 (and so on) for an ensemble."""
    return [1.0] if checkpoints is None else [0.3 + 0.4 * i for i in range(len(checkpoints))]


ATTRIBUTORS_UNDER_TEST = {
    "explicit": lambda m, c=None: IFAttributorExplicit(task_for(m, checkpoints=c), regularization=1e-2,
                                                       show_progress=False),
    "cg": lambda m, c=None: IFAttributorCG(task_for(m, checkpoints=c), regularization=1.0, max_iter=100, tol=1e-10,
                                           show_progress=False),
    "lissa": lambda m, c=None: IFAttributorLiSSA(task_for(m, checkpoints=c), recursion_depth=20, damping=0.1,
                                                 scaling=50.0, show_progress=False),
    "datainf": lambda m, c=None: IFAttributorDataInf(task_for(m, checkpoints=c), show_progress=False),
    "arnoldi": lambda m, c=None: IFAttributorArnoldi(task_for(m, checkpoints=c), proj_dim=5, max_iter=10,
                                                     regularization=1e-2, show_progress=False),
    "ekfac": lambda m, c=None: IFAttributorEKFAC(task_for(m, checkpoints=c), damping=1e-2, show_progress=False),
    "tracin": lambda m, c=None: TracInAttributor(task_for(m, checkpoints=c), learning_rates(c), normalized_grad=False,
                                                 show_progress=False),
    "grad-cos": lambda m, c=None: TracInAttributor(task_for(m, checkpoints=c), learning_rates(c),
                                                   normalized_grad=True, projector_kwargs={"proj_dim": 4},
                                                   show_progress=False),
    "trak": lambda m, c=None: TRAKAttributor(task_for(m, margin=True, checkpoints=c), probability(m),
                                             projector_kwargs={"proj_dim": 8}, regularization=1e-2,
                                             show_progress=False),
    "rps": lambda m, c=None: RPSAttributor(rps_task(m, c), "head", epoch=50),
}


def call(attributor, method, train, test):
    if method == "cache":
        return attributor.cache(train)
    if method == "attribute":
        return attributor.attribute(test) if isinstance(attributor, TRAKAttributor) else \
            attributor.attribute(train, test)
    if method == "self_attribute":
        return attributor.self_attribute(train)
    return attributor.topk(test, 3, train_dataloader=train)
