import pytest
import torch

from tests.metrics.helpers import tiny_llama

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def relu_llama():
    return tiny_llama("relu")
