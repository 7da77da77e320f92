"""Every script that runs as a rank ends through exit_process (mmtrain/engine/distributed.py): the
interpreter's teardown under DeepSpeed's live gloo groups aborts a finished rank now and then
(tests/dist/test_clean_exit.py shows the hazard). It is rare per launch, so a probe that forgot it
once passed its own test and aborted in CI; the rule is held here by reading the scripts."""

import ast
import os

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DIST = os.path.join(REPO, "tests", "dist")


def _rank_scripts():
    probes = [os.path.join(DIST, name) for name in sorted(os.listdir(DIST))
              if name.endswith(".py") and not name.startswith("test_")]
    return probes + [os.path.join(REPO, "bench", "perf.py"), os.path.join(REPO, "mmtrain", "train.py")]


def _main_block_calls(path: str):
    """Names called inside the module's `if __name__ == "__main__":` block (None: no such block)."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    for node in tree.body:
        if (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
                and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__"):
            return {call.func.id if isinstance(call.func, ast.Name) else getattr(call.func, "attr", None)
                    for call in ast.walk(node) if isinstance(call, ast.Call)}
    return None


def test_every_rank_script_ends_through_exit_process():
    scripts = _rank_scripts()
    assert len(scripts) >= 3
    missing = [os.path.relpath(path, REPO) for path in scripts if "exit_process" not in (_main_block_calls(path) or set())]
    assert not missing, f"these rank scripts do not call exit_process under __main__: {missing}"


def test_the_check_sees_a_script_without_it(tmp_path):
    plain = tmp_path / "probe.py"
    plain.write_text('import sys\n\n# exit_process( in a comment\n\nif __name__ == "__main__":\n    sys.exit(0)\n')
    assert "exit_process" not in _main_block_calls(str(plain))
    assert _main_block_calls(str(plain)) == {"exit"}
