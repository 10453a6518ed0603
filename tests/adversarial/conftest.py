"""The crash-isolating worker interpreter of the adversarial probes (adv_common.Worker)."""
import pytest

from adv_common import Worker


@pytest.fixture(scope="session")
def worker():
    w = Worker()
    yield w
    w.close()
