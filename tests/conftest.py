"""Test configuration: kernel interpreter mode and the hypothesis profiles.

``TRITON_INTERPRET=1`` must be set before any Triton kernel module is imported,
so it is set here, at the top of the first file pytest loads.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# "ci" (the default) is deterministic and has no per-example deadline, so a slow
# machine never turns a correct change red; "dev" draws fresh examples each run.
settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    max_examples=20,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "dev", deadline=None, max_examples=50, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _seed_torch():
    """Each test starts from the same global RNG state, whatever ran before it."""
    torch.manual_seed(0)
