"""Every recipe opens with its launch commands, each naming the recipe's own path, in forms the
launchers accept (the deepspeed launcher takes `--module`, not `-m`)."""

import glob
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECIPES = sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "recipes", "**", "*.yaml"),
                                                            recursive=True))


def _header_commands(path):
    """The comment lines before the first YAML line, with `\\` continuations joined."""
    lines = []
    with open(os.path.join(REPO, path)) as f:
        for line in f:
            if not line.startswith("#"):
                break
            lines.append(line[1:].strip())
    return re.sub(r"\\\n\s*", " ", "\n".join(lines)).splitlines()


def test_recipes_exist():
    assert RECIPES


@pytest.mark.parametrize("path", RECIPES)
def test_header_shows_every_launcher_with_this_recipe(path):
    commands = _header_commands(path)

    def lines_with(pattern):
        return [c for c in commands if re.search(pattern, c)]

    own = re.escape(path)
    assert lines_with(rf"^torchrun .*-m mmtrain\.train {own}( |$)"), f"{path}: no torchrun line naming {path}"
    assert lines_with(rf"^deepspeed .*--module mmtrain\.train {own}( |$)"), f"{path}: no deepspeed line naming {path}"
    assert lines_with(rf"^mmtrain submit slurm {own} "), f"{path}: no `mmtrain submit slurm` line"
    assert lines_with(rf"^mmtrain submit sagemaker {own} .*--instance-type "), f"{path}: no `mmtrain submit sagemaker`"
    assert not lines_with(r"^deepspeed .* -m "), f"{path}: the deepspeed launcher has no -m; it is --module"
    for command in lines_with(r"mmtrain\.train |^mmtrain (train|validate|submit) "):
        named = re.findall(r"recipes/\S+\.yaml", command)
        assert named == [path], f"{path}: header command names {named}: {command}"
