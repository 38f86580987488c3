"""python -m dpvit.bench: JSON output, MPI runs, FLOP formula, torch comparison plumbing.

These check that the benchmark measures and reports correctly, on a tiny model; the speed
targets themselves are checked by running the benchmark, not by timed tests.
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
from helpers import REPO, missing, run_dpvit

from dpvit import bench
from dpvit.errors import UserError
from dpvit.flops import forward_flops_per_image, train_flops_per_image, training_compute
from dpvit.parallel.comm import LocalComm
from dpvit.profiling import StepBench
from dpvit.training.step import STEP_EXTRAS, TrainStep
from dpvit.vit import ViTConfig

TINY = ["--dim", "16", "--depth", "1", "--heads", "2", "--batch-size", "8", "--steps", "2",
        "--warmup", "1", "--repeats", "2"]


def _json(result) -> dict:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_bench_json_single_process():
    out = _json(run_dpvit("bench", [*TINY, "--json"]))
    assert out["world_size"] == 1 and out["batch_per_rank"] == 8
    assert out["images_per_s_min"] <= out["images_per_s"] <= out["images_per_s_max"]
    assert 0 < out["mfu"] < 1 and out["peak_rss_mib_per_rank"] > 0
    layers = {row["layer"] for row in out["layers"]}
    assert {"Attention.forward", "Attention.backward", "Linear.backward"} <= layers


@pytest.mark.mpi
def test_bench_under_mpirun_reports_the_world():
    out = _json(run_dpvit("bench", [*TINY, "--json", "--no-layers"], ranks=2))
    assert out["world_size"] == 2 and out["threads_per_rank"] == 1
    assert 0 <= out["allreduce_share"] < 1
    assert 0 < out["compute_ms_fastest_rank"] <= out["compute_ms_slowest_rank"] < out["step_ms"]


def test_flop_formula_matches_a_hand_count():
    cfg = ViTConfig()
    T, D, hidden = 50, 64, 128
    # qkv, proj, fc1, fc2; then scores and the weighted sum, T x T x head_dim per head
    per_block = 2 * T * (D * 3 * D + D * D + D * hidden + hidden * D) + 2 * 2 * T * T * D
    expected = 2 * 49 * 16 * D + 6 * per_block + 2 * D * 10
    assert forward_flops_per_image(cfg) == expected


def test_the_default_recipe_trains_on_about_34_tflop():
    """The default model: about 23.6 MFLOP forward, 71 MFLOP to train on an image, and 8 epochs
    of 60000 MNIST images at batch 64 (937 full steps each) about 34 TFLOP."""
    cfg = ViTConfig()
    assert forward_flops_per_image(cfg) == pytest.approx(23.6e6, rel=2e-3)
    assert train_flops_per_image(cfg) == 3 * forward_flops_per_image(cfg)
    assert train_flops_per_image(cfg) == pytest.approx(71e6, rel=3e-3)
    spent = training_compute(cfg, step=8 * (60000 // 64), batch_size=64)
    assert spent["train_flops_per_image"] == train_flops_per_image(cfg)
    assert spent["train_flops"] == 8 * 937 * 64 * train_flops_per_image(cfg)
    assert spent["train_flops"] == pytest.approx(34e12, rel=3e-3)


@pytest.mark.mpi
def test_compare_torch_prints_a_ratio():
    if importlib.util.find_spec("torch") is None:
        missing("PyTorch (the benchmark's reference)", "pip install torch")
    result = run_dpvit("bench", [*TINY, "--compare-torch", "--ranks", "2", "--rounds", "1",
                                 "--json"], timeout=300)
    out = _json(result)
    (name, ratio), = out["ratios"].items()
    assert name == "dpvit -n 2 x 1 thread(s) / torch DDP 2 x 1 thread(s)" and ratio > 0


def test_scaling_runs_the_same_batch_per_replica(monkeypatch):
    """The lone process gets one rank's batch per thread, as training splits a global batch."""
    commands = []

    def fake_run(cmd, env):
        commands.append((cmd, env))
        return json.dumps({"images_per_s": 100.0})

    monkeypatch.setattr(bench, "available_cores", lambda: 3)
    monkeypatch.setattr(bench, "_run", fake_run)
    jobs, ratios = bench.comparison_jobs(bench.parse_args(["--scaling", "--batch-size", "16"]))
    for job in jobs.values():
        assert job() == {"images_per_s": 100.0}
    batches = {name: int(cmd[cmd.index("--batch-size") + 1])
               for name, (cmd, _) in zip(jobs, commands, strict=True)}
    assert batches == {"dpvit -n 1 x 1 thread": 16, "dpvit 1 process x 3 threads": 48,
                       "dpvit -n 2 x 1 thread": 16, "dpvit -n 4 x 1 thread": 16}
    assert commands[1][1] == {"DPVIT_NUM_THREADS": "3"} and "-n" not in commands[1][0]
    assert ("dpvit 1 process x 3 threads", "dpvit -n 2 x 1 thread") in ratios


def test_ratios_pair_the_jobs_of_each_round():
    # the machine was twice as fast in round 2: per-round ratios 2 and 1, while the ratio of
    # the medians (200 / 175) would mix rounds
    rates = {"a": [100.0, 300.0], "b": [50.0, 300.0], "c": [1.0, 2.0, 3.0], "d": [1.0] * 3}
    assert bench.paired_ratio(rates, "a", "b") == 1.5
    assert bench.paired_ratio(rates, "c", "d") == 2.0


def test_comparison_reports_each_jobs_rank_spread():
    """dpvit jobs carry their ranks' forward/backward times into the table and the JSON."""
    def dpvit(rate, fastest, slowest):
        return {"images_per_s": rate, "compute_ms_fastest_rank": fastest,
                "compute_ms_slowest_rank": slowest}

    records = {"n2": [dpvit(700.0, 260.0, 340.0), dpvit(760.0, 270.0, 300.0),
                      dpvit(740.0, 250.0, 320.0)],
               "torch": [{"images_per_s": 500.0}] * 3}
    args = bench.parse_args(["--compare-torch"])
    result, text = bench.summarize_comparison(args, records, [("n2", "torch")])
    assert result["compute_ms_rounds"] == {"n2": {"fastest": [260.0, 270.0, 250.0],
                                                  "slowest": [340.0, 300.0, 320.0]}}
    assert result["images_per_s"] == {"n2": 740.0, "torch": 500.0}
    assert result["ratios"] == {"n2 / torch": 1.48}
    assert "forward/backward 260 ms/step on the fastest rank, 320 on the slowest" in text
    assert "torch" in text.splitlines()[1] and "forward/backward" not in text.splitlines()[1]


def test_bad_bench_flag_is_one_clear_line():
    result = run_dpvit("bench", ["--steps", "0"])
    assert result.returncode == 1
    assert "--steps must be a positive integer" in result.stderr
    assert "Traceback" not in result.stderr


def test_bench_times_the_trainers_own_step():
    """The bench drives `TrainStep`, the trainer's step, with its allreduce payload (gradients
    and the step's extras), and splits forward/backward from the allreduce."""
    step_bench = StepBench(ViTConfig(embed_dim=16, depth=1, num_heads=2), LocalComm(), 8)
    assert isinstance(step_bench.train_step, TrainStep)
    store = step_bench.model.store
    assert store.grad_buffer.size == store.numel + STEP_EXTRAS
    before = store.flat_params.copy()
    times = step_bench.run(steps=2, warmup=1, repeats=2)
    assert step_bench.optimizer.steps == 5 and not np.array_equal(store.flat_params, before)
    assert 0 < times.compute_fastest == times.compute_slowest < sum(times.repeats)
    assert 0 <= times.allreduce < times.compute_fastest


def test_torch_reference_ships_in_the_repository():
    assert bench.DEFAULT_TORCH_REF == REPO / "launch" / "bench" / "torch_vit_ref.py"
    assert bench.DEFAULT_TORCH_REF.is_file()
    assert bench.parse_args([]).torch_ref == bench.DEFAULT_TORCH_REF
    assert bench.parse_args(["--torch-ref", "/x/ref.py"]).torch_ref.as_posix() == "/x/ref.py"


def test_compare_torch_without_torch_is_one_clear_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "torch" else real(name, *a))
    with pytest.raises(UserError, match=r"--compare-torch needs PyTorch: pip install torch"):
        bench.run(LocalComm(), ["--compare-torch"])


def test_compare_torch_with_a_missing_reference_names_it(tmp_path):
    if importlib.util.find_spec("torch") is None:
        missing("PyTorch (the benchmark's reference)", "pip install torch")
    result = run_dpvit("bench", ["--compare-torch", "--torch-ref", str(tmp_path / "nope.py")])
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"PyTorch reference {tmp_path / 'nope.py'} not found; pass --torch-ref PATH" in (
        result.stderr)
