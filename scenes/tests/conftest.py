"""Fixtures of the scenes package's tests."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def scenes_model_dir(tmp_path_factory) -> str:
    """A tiny random scenes LLaVA saved with its processor, loaded back like a hub checkpoint."""
    from st3_scenes.model import save_tiny

    return save_tiny(tmp_path_factory.mktemp("scenes-llava"))
