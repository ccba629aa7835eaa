"""``python -m attrib_torch build | query | info``: the command line (:mod:`attrib_torch.cli`)."""

from .cli import main

main()
