"""launch/step_ab.py: the working tree's step against a git revision's, in one process."""

from __future__ import annotations

import subprocess
import sys

from helpers import REPO


def test_step_ab_prints_the_step_and_every_layer():
    result = subprocess.run(
        [sys.executable, str(REPO / "launch" / "step_ab.py"), "--paths", "dpvit/nn",
         "dpvit/vit.py", "--rounds", "4", "--batch-size", "2"],
        capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("4 paired rounds, batch 2, one thread; old = HEAD for dpvit/nn "
                               "dpvit/vit.py")
    names = [line.split()[0] for line in lines[1:]]
    assert names[0] == "step" and {"Attention.forward", "GELU.backward"} <= set(names)
    assert all(line.count("x (") == 2 for line in lines[1:])  # a cpu and a wall ratio each
