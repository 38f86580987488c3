"""launch/gemm_floor.py: the training step's matrix products alone, against the step."""

from __future__ import annotations

import re
import subprocess
import sys

from helpers import REPO, load_launch_script

from dpvit.flops import forward_flops_per_image
from dpvit.vit import ViTConfig

SCRIPT = REPO / "launch" / "gemm_floor.py"


def test_the_replayed_products_are_the_models_flops_less_what_dpvit_skips():
    cfg = ViTConfig()
    batch = 64
    N, D = (cfg.img_size // cfg.patch_size) ** 2 + 1, cfg.embed_dim
    hidden = int(D * cfg.mlp_ratio)
    # the last block computes the cls token's output alone: of its per-token work only the
    # qkv GEMM (keys and values of every token) remains for the other N - 1 tokens
    skipped_forward = (N - 1) * (2 * D * (D + 2 * hidden) + 2 * 2 * N * D)
    patch_input_grad = 2 * (N - 1) * cfg.patch_size**2 * D
    expected = batch * (3 * (forward_flops_per_image(cfg) - skipped_forward) - patch_input_grad)
    _, flops = load_launch_script("gemm_floor").products_of_step(cfg, batch)
    assert flops == expected


def test_gemm_floor_prints_the_step_and_its_products():
    result = subprocess.run([sys.executable, str(SCRIPT), "--rounds", "4", "--batch-size", "32"],
                            capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("4 rounds, 32 images per step in micro-batches of 32")
    ms = {}
    for line in lines[1:3]:
        name, value = re.match(r"\s+(.+?)\s+([\d.]+) ms", line).groups()
        ms[name] = float(value)
    assert set(ms) == {"training step", "its matrix products alone"}
    # the products are a part of the step's work: taking longer would mean they replay more
    assert ms["its matrix products alone"] < ms["training step"]
    assert lines[3].startswith("  products / step: 0.")
