"""Property test: over random datasets, budgets, batch sizes and world sizes, every micro-batch fits
the budget and each drawn sample is trained exactly once or counted as skipped."""
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sphinx_model as sm
from sphinx_model.conversation import ChatTemplate
from sphinx_model.data import DataConfig, SphinxData
from sphinx_model.datasets import load_mixture

from .helpers import CharTokenizer, dialogue, make_image, write_jsonl

VISION = sm.preset("tiny").vision
IMAGES = {"sq.png": (16, 16), "wide.png": (30, 8), "tall.png": (8, 20)}  # 87, 55, 55 rows
_fresh = itertools.count()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("packing")
    for name, (w, h) in IMAGES.items():
        make_image(path / name, w, h)
    return path


@settings(max_examples=30, deadline=None)
@given(items=st.lists(st.tuples(st.integers(0, 150), st.integers(1, 40),
                                st.sampled_from([None, *IMAGES])), min_size=1, max_size=20),
       budget=st.integers(40, 400), global_batch=st.integers(1, 12), world=st.integers(1, 3),
       seed=st.integers(0, 3))
def test_micro_batches_fit_the_budget_and_no_sample_is_lost(folder, items, budget, global_batch,
                                                             world, seed):
    path = write_jsonl(folder / f"d{next(_fresh)}.jsonl",
                       [dialogue(("q" * (q + 1), "a" * a), image=image) for q, a, image in items])
    config = DataConfig(budget=budget, global_batch=global_batch, seed=seed, num_workers=0)
    mixture = load_mixture(path)
    for step in range(2):
        shares = [SphinxData(mixture, CharTokenizer(), VISION, config, rank=r, world_size=world,
                             template=ChatTemplate(system="")).step_batch(step)
                  for r in range(world)]
        assert len({len(s.micro_batches) for s in shares}) == 1
        trained = [i for s in shares for ids in s.sample_ids for i in ids]
        assert len(trained) == len(set(trained))  # nothing twice
        skipped = sum(sum(s.stats.skipped.values()) for s in shares)
        first = step * global_batch
        assert set(trained) <= set(range(first, first + global_batch))
        assert len(trained) + skipped == global_batch  # nothing lost: trained or counted
        for s in shares:
            for mb, ids in zip(s.micro_batches, s.sample_ids):
                assert mb.num_tokens <= budget and mb.layout.position_ids.shape[0] <= max(budget, 1)
                assert mb.num_samples == len(ids)
