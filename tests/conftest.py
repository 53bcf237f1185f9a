"""Shared test setup.

Triton kernels run under the CPU interpreter when no CUDA device is present; the
variable must be set before any kernel module is imported, hence here.
"""
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tests import the flat top-level modules (clip_model, textrefiner, data, kernels).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped on CPU")
    config.addinivalue_line("markers", "slow: end-to-end runs of several seconds")


def pytest_collection_modifyitems(config, items):
    import pytest

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none found)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
