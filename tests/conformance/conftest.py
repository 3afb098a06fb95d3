"""The conformance suite runs many tiny models eagerly: one torch thread each (on two
shared cores, intra-op threads of ops this small spend ten times their work waiting on
each other)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
