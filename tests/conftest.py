"""Shared test setup.

Triton kernels run under the CPU interpreter when no CUDA device is present; the
variable must be set before any kernel module is imported, hence here.
"""
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tests import the flat top-level modules (clip_model, textrefiner, data, kernels).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped on CPU")
    config.addinivalue_line("markers", "slow: end-to-end runs of several seconds")


def pytest_collection_modifyitems(config, items):


    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none found)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def run(tmp_path_factory):
    """(data root, tiny CLIP weights, run folder) of one uninterrupted CoOp + TextRefiner base2new training."""
    import helpers
    return helpers.trained_run(tmp_path_factory)


@pytest.fixture(scope="session")
def pk_run(tmp_path_factory):
    """(base folder, run folder) of one uninterrupted PromptKD + TextRefiner base2new training."""
    import helpers
    import train
    base = str(tmp_path_factory.getbasetemp())
    out = os.path.join(base, "pk-run")
    if not os.path.exists(os.path.join(out, "results.json")):
        train.main(helpers.pk_argv(base, out))
    return base, out
