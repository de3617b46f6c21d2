import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(1)


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def shapes():
    """An untouched tiny pipeline whose layers give the shapes of random adaptors."""
    from test_adaptors import tiny_pipeline

    return tiny_pipeline(0)
