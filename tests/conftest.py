"""Shared fixtures: a seeded generator per test."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def gen() -> torch.Generator:
    """A CPU generator seeded per test, so every test draws the same numbers on every run."""
    return torch.Generator().manual_seed(1234)
