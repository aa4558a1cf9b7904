"""The data pipeline runs in DataLoader workers, one torch thread each (DataLoader's default); the
in-process tests run it the same way (several threads only add contention to these small copies)."""
import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
