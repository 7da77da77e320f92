"""Shared test set-up: GPU tests skip without CUDA; DeepSpeed runs on its CPU accelerator."""

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _environment_restored():
    """Whatever a test (or code it calls in this process) puts in os.environ is gone after it: a
    leaked RANK or MASTER_PORT once made a later `mmtrain train --nproc 2` run as a world of one."""
    saved = dict(os.environ)
    yield
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory):
    from helpers import make_shapes_dataset

    return make_shapes_dataset(str(tmp_path_factory.mktemp("shapes")), num_train=400, num_eval=60)


@pytest.fixture(scope="session")
def tok(tmp_path_factory):
    """The tiny byte-level BPE tokenizer with the media tokens of the `simple` template."""
    from mmtrain.data.tokenizer import load_tokenizer, train_tiny_tokenizer

    return load_tokenizer(train_tiny_tokenizer(str(tmp_path_factory.mktemp("tok"))))


@pytest.fixture(scope="session")
def ids(tok):
    from mmtrain.data.tokenizer import TokenIds

    return TokenIds.from_tokenizer(tok)
