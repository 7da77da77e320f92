"""Every recorded performance result (bench/results/perf_*.json, written by bench/perf.py on the GPU
machine) carries what the performance issue asks of each measured configuration, and its vanilla
figure is the vanilla measured in the same run."""

import glob
import json
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESULTS = sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "bench", "results", "perf_*.json")))
REQUIRED = ("model", "device", "num_gpus", "seq_len", "tokens_per_s", "mfu", "peak_mem_gib",
            "vanilla_tokens_per_s", "versions", "command")
# Recorded before bench/perf.py computed MFU; docs/performance.md quotes only its tokens/s.
WITHOUT_MFU = {"bench/results/perf_idefics9b_1xh200_a.json"}


def test_results_exist():
    assert len(RESULTS) > 10


@pytest.mark.parametrize("path", RESULTS)
def test_each_measured_configuration_is_complete(path):
    with open(os.path.join(REPO, path)) as f:
        records = json.load(f)
    assert isinstance(records, list) and records, f"{path}: a list of one object per configuration"
    measured = [r for r in records if "error" not in r]
    assert measured, f"{path}: every configuration failed"
    vanilla = [r for r in measured if r["variant"] == "vanilla"]
    assert len(vanilla) <= 1, f"{path}: one vanilla per run"
    for record in measured:
        where = f"{path} variant {record.get('variant')!r}"
        required = [k for k in REQUIRED if not (k == "mfu" and path in WITHOUT_MFU)]
        missing = [k for k in required if k not in record]
        assert not missing, f"{where}: missing {missing}"
        assert record["device"].startswith("NVIDIA "), where
        assert record["num_gpus"] >= 1 and record["tokens_per_s"] > 0 and record["peak_mem_gib"] > 0, where
        if "mfu" in required:
            assert 0 < record["mfu"] < 1, f"{where}: mfu {record['mfu']}"
        assert {"torch", "deepspeed", "transformers"} <= set(record["versions"]), where
        assert record["command"].startswith("python3 -m bench.perf"), where
        # "from the same run": the file's own vanilla row, or none where the run measured none.
        expected = vanilla[0]["tokens_per_s"] if vanilla else None
        assert record["vanilla_tokens_per_s"] == expected, f"{where}: vanilla_tokens_per_s is not this run's"
