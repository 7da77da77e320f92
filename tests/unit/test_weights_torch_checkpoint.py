"""weights.TorchCheckpoint: a torch.save state dict (OpenFlamingo's checkpoint.pt) read tensor by tensor
with pread at the byte offsets found through torch.load(mmap=True), without keeping the file mapped."""

import os

import pytest
import torch

from mmtrain.models.weights import TorchCheckpoint, open_checkpoint


def _mapped(path):
    real = os.path.realpath(path)
    with open("/proc/self/maps") as maps:
        return any(line.rstrip("\n").endswith(" " + real) for line in maps)


def _rss_file_bytes():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssFile:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no RssFile in /proc/self/status")


def _state():
    generator = torch.Generator().manual_seed(0)
    table = torch.randn(40, 24, generator=generator)
    return {
        "module.table": table,
        "module.rows": table[8:20],  # a view: saved as the whole shared storage, read from its offset
        "module.half": torch.randn(5, 7, generator=generator).to(torch.bfloat16),
        "module.ids": torch.arange(13),
        "module.scalar": torch.tensor(2.5),
        "module.empty": torch.zeros(0, 4),
        "module.flipped": torch.randn(6, 3, generator=generator).t(),  # not contiguous: read from the mapping
    }


@pytest.mark.skipif(not os.path.isfile("/proc/self/maps"), reason="locating tensors needs /proc/self/maps")
def test_reads_every_tensor_by_pread_and_drops_the_mapping(tmp_path):
    path = str(tmp_path / "checkpoint.pt")
    state = _state()
    torch.save({"epoch": 1, "model_state_dict": state}, path)
    expected = {key[len("module."):]: value for key, value in state.items()}
    with open_checkpoint(path) as checkpoint:
        assert isinstance(checkpoint, TorchCheckpoint)
        assert checkpoint.keys() == list(expected)
        assert checkpoint.shapes() == {key: tuple(value.shape) for key, value in expected.items()}
        located = [key for key in expected if checkpoint.info(key).offset >= 0]
        assert located == [key for key in expected if key != "flipped"]
        for key, value in expected.items():
            got = checkpoint.read(key)
            assert got.dtype == value.dtype and torch.equal(got, value), key
        del got  # the last one is a view of the mapping
        assert torch.equal(checkpoint.read_rows("table", 30, 10), expected["table"][30:])
        assert torch.equal(checkpoint.read_rows("flipped", 1, 2), expected["flipped"][1:3])
        out = torch.empty(12, 24)
        assert checkpoint.can_read_into("rows", out) and not checkpoint.can_read_into("flipped", torch.empty(3, 6))
        checkpoint.read_into("rows", out)
        assert torch.equal(out, expected["rows"])
        # Only the tensor read from the mapping keeps the file mapped.
        assert _mapped(path)
    assert not _mapped(path)

    del state["module.flipped"]
    torch.save(state, path)
    with TorchCheckpoint(path) as checkpoint:
        assert not _mapped(path)
        assert torch.equal(checkpoint.read("rows"), expected["rows"])


@pytest.mark.skipif(not os.path.isfile("/proc/self/maps"), reason="RssFile is Linux's")
def test_reading_a_checkpoint_does_not_keep_its_pages(tmp_path):
    """Copying tensors out of torch.load(mmap=True)'s views leaves each touched page in the process
    (RssFile grows to the file's size); reading them by pread leaves none."""
    path = str(tmp_path / "big.pt")
    numel = 2 * 2**20  # 8 MB per fp32 tensor, 48 MB in all
    torch.save({f"t{i}": torch.full((numel,), float(i)) for i in range(6)}, path)
    size = os.path.getsize(path)
    out = torch.empty(numel)

    def read_all():
        with TorchCheckpoint(path) as checkpoint:
            for key in checkpoint.keys():
                checkpoint.read_into(key, out)
                assert out[-1].item() == float(key[1:])

    read_all()  # warms up the code paths (their library pages count as RssFile too)
    before = _rss_file_bytes()
    read_all()
    assert _rss_file_bytes() - before < size / 4

    views = torch.load(path, mmap=True, weights_only=True)
    before = _rss_file_bytes()
    for value in views.values():
        out.copy_(value)
    assert _rss_file_bytes() - before > size / 2  # what the pread reader avoids, measured the same way


def test_not_a_state_dict_names_the_file(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(ValueError, match=r"checkpoint\.pt: not a torch state dict"):
        TorchCheckpoint(path)
    torch.save([torch.zeros(2)], path)
    with pytest.raises(ValueError, match=r"checkpoint\.pt: holds a list, not a state dict"):
        TorchCheckpoint(path)
