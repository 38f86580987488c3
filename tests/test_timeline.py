"""``--timeline FILE``: a Chrome trace of a few steps of every rank (dpvit.training.timeline).

The trace is checked against the Chrome trace event format (`validate_chrome_trace`, the
subset dpvit writes: complete "X" events and "M" metadata), and against what a timeline must
show: both ranks, each step's allreduce after that step's backward and inside the step.
"""

from __future__ import annotations

import importlib.util
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import TINY_ARGS, missing, real_data_dir, train

from dpvit.parallel.comm import LocalComm
from dpvit.training import timeline
from dpvit.training.timeline import Timeline, chrome_trace

METADATA = {"process_name": "name", "thread_name": "name", "process_sort_index": "sort_index",
            "thread_sort_index": "sort_index"}


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def validate_chrome_trace(trace: dict) -> None:
    """Assert ``trace`` follows the Chrome trace event format (JSON object form) for complete
    ("X") and metadata ("M") events: required keys and types per phase, non-negative ts and
    dur, integer pid/tid, events of a track in time order and nested or disjoint, every track
    and process named."""
    assert isinstance(trace, dict) and isinstance(trace["traceEvents"], list)
    assert trace.get("displayTimeUnit", "ms") in ("ms", "ns")
    json.loads(json.dumps(trace))  # plain JSON values only
    named_threads, named_processes, last_ts, open_ends = set(), set(), {}, {}
    for event in trace["traceEvents"]:
        assert isinstance(event.get("name"), str) and event["name"], event
        assert event.get("ph") in ("X", "M"), event
        for key in ("pid", "tid"):
            assert isinstance(event.get(key), int) and not isinstance(event[key], bool), event
        assert isinstance(event.get("args", {}), dict), event
        if event["ph"] == "M":
            assert event["name"] in METADATA, event
            value = event["args"][METADATA[event["name"]]]
            assert isinstance(value, str if METADATA[event["name"]] == "name" else int), event
            if event["name"] == "thread_name":
                named_threads.add((event["pid"], event["tid"]))
            if event["name"] == "process_name":
                named_processes.add(event["pid"])
            continue
        assert _number(event.get("ts")) and event["ts"] >= 0, event
        assert _number(event.get("dur")) and event["dur"] >= 0, event
        assert isinstance(event.get("cat", ""), str), event
        track = (event["pid"], event["tid"])
        assert event["ts"] >= last_ts.get(track, 0), f"{event} before the track's previous"
        last_ts[track] = event["ts"]
        # a span on a track nests in the open one or starts after it ends (trace viewers)
        ends = open_ends.setdefault(track, [])
        while ends and ends[-1] <= event["ts"] + 1e-3:
            ends.pop()
        assert not ends or event["ts"] + event["dur"] <= ends[-1] + 1e-3, (
            f"{event} overlaps a span of its track without nesting in it")
        ends.append(event["ts"] + event["dur"])
    assert set(last_ts) <= named_threads, "a track without a thread_name"
    assert {pid for pid, _ in last_ts} <= named_processes, "a rank without a process_name"


def _spans(trace: dict) -> list[dict]:
    return [e for e in trace["traceEvents"] if e["ph"] == "X"]


def _track_names(trace: dict) -> dict[tuple[int, int], str]:
    return {(e["pid"], e["tid"]): e["args"]["name"] for e in trace["traceEvents"]
            if e["ph"] == "M" and e["name"] == "thread_name"}


def _end(event: dict) -> float:
    return event["ts"] + event["dur"]


def _inside(inner: dict, outer: dict) -> bool:
    return outer["ts"] <= inner["ts"] and _end(inner) <= _end(outer) + 1e-3


def check_steps(trace: dict, rank: int, steps: list[int]) -> None:
    """On ``rank``: each of ``steps`` has a step span holding its data wait, forward/backward
    with every block's backward, then one allreduce (comm track) after backward ends, then
    clipping + optimizer."""
    names = _track_names(trace)
    mine = [e for e in _spans(trace) if e["pid"] == rank]
    step_spans = sorted((e for e in mine if e["cat"] == "step"), key=lambda e: e["ts"])
    assert [e["args"]["step"] for e in step_spans] == steps
    for step in step_spans:
        within = [e for e in mine if e is not step and _inside(e, step)]
        by_name = {e["name"]: e for e in within}
        assert {"data wait", "forward/backward", "allreduce", "clip + optimizer"} <= set(
            by_name), f"{step['name']} on rank {rank}: {sorted(by_name)}"
        allreduce = [e for e in within if e["name"] == "allreduce"]
        assert len(allreduce) == 1 and names[rank, allreduce[0]["tid"]] == "comm"
        reduce = allreduce[0]
        backward = [e for e in within if e["cat"] == "backward"]
        assert backward, f"no block backward inside {step['name']} on rank {rank}"
        assert reduce["ts"] >= max(_end(e) for e in backward)
        assert reduce["ts"] >= _end(by_name["forward/backward"]) - 1e-3
        assert _end(reduce) <= by_name["clip + optimizer"]["ts"] + 1e-3
        assert by_name["data wait"]["ts"] <= by_name["forward/backward"]["ts"]


@pytest.mark.mpi
def test_two_rank_run_writes_a_valid_trace_of_both_ranks(tmp_path):
    """mpirun -n 2, --timeline-steps 3 of a 6-step run: steps 4-6 after 3 warm-up steps, and
    the checkpoint (every 2 steps) and final evaluation that fall among them."""
    path = tmp_path / "trace" / "timeline.json"
    result = train(tmp_path / "run", "--epochs", "1", "--max-steps", "6", "--checkpoint-every",
                   "2", "--timeline", str(path), "--timeline-steps", "3", ranks=2)
    assert f"timeline of steps 4-6 written to {path}" in result.stderr
    trace = json.loads(path.read_text())
    validate_chrome_trace(trace)
    processes = {e["pid"]: e["args"]["name"] for e in trace["traceEvents"]
                 if e["ph"] == "M" and e["name"] == "process_name"}
    assert processes == {0: "rank 0", 1: "rank 1"}
    for rank in (0, 1):
        assert {"main", "comm"} <= {name for (pid, _), name in _track_names(trace).items()
                                    if pid == rank}
        check_steps(trace, rank, [4, 5, 6])
        names = {e["name"] for e in _spans(trace) if e["pid"] == rank}
        assert {"evaluation", "checkpoint", "block 0 forward", "block 0 backward"} <= names
    assert "report" in {e["name"] for e in _spans(trace) if e["pid"] == 0}
    assert not list(path.parent.glob("*.tmp-*"))  # written atomically: nothing left beside


def _tiny_trainer(run_dir: Path, *extra: str):
    from dpvit.config import load_config
    from dpvit.training.trainer import Trainer

    cfg, _ = load_config([*TINY_ARGS, "--data-dir", str(real_data_dir()), "--epochs", "1",
                          "--max-steps", "5", *extra])
    run_dir.mkdir()
    return Trainer(cfg, LocalComm(), run_dir)


def test_without_timeline_nothing_is_recorded_and_no_file_written(tmp_path, monkeypatch):
    """No --timeline: no Timeline exists, no span reads the clock, the blocks keep their own
    methods, and no trace file appears."""
    def no_timeline(*args, **kwargs):
        raise AssertionError("a Timeline was created without --timeline")

    def no_clock():
        raise AssertionError("a span read the clock without --timeline")

    monkeypatch.setattr(timeline, "Timeline", no_timeline)
    monkeypatch.setattr(timeline, "_now", no_clock)
    trainer = _tiny_trainer(tmp_path / "run", "--checkpoint-every", "2")
    assert trainer.cfg.train.timeline is None and trainer.timeline is None
    assert trainer.parallel_step.sync is None or trainer.parallel_step.sync.on_span is None
    trainer.fit()
    assert timeline._active is None and not timeline.recording()
    for model in trainer.replicas.models:
        assert all("forward" not in vars(b) and "backward" not in vars(b) for b in model.blocks)
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written and not [p for p in written if b"traceEvents" in p.read_bytes()]


def test_single_process_trace_and_blocks_restored(tmp_path):
    """In process: the window's steps, the replica threads' tracks, the blocks unwrapped after
    the window, and the module functions off again."""
    path = tmp_path / "t.json"
    trainer = _tiny_trainer(tmp_path / "run", "--timeline", str(path), "--timeline-steps", "2")
    trainer.fit()
    trace = json.loads(path.read_text())
    validate_chrome_trace(trace)
    check_steps(trace, 0, [4, 5])
    assert timeline._active is None
    for model in trainer.replicas.models:
        assert all("forward" not in vars(b) and "backward" not in vars(b) for b in model.blocks)


@pytest.mark.parametrize(("total", "steps", "first"), [(10, 3, 3), (4, 3, 1), (2, 3, 0)])
def test_window_follows_the_warmup_or_fits_a_short_run(tmp_path, total, steps, first):
    """Steps ``first`` .. ``first + steps - 1`` (0-based) are recorded, after 3 warm-up steps
    or fewer when the run is short; the file is written when the next batch arrives."""
    path = tmp_path / "t.json"
    tl = Timeline(path, steps, rank=0)
    comm = LocalComm()
    tl.start(comm, 0, total)
    for step, _ in enumerate(tl.batches(range(total), 0, comm)):
        with timeline.span("work", step=step):
            pass
        if step < first + steps:
            assert not path.exists()
    tl.finish(comm)
    trace = json.loads(path.read_text())
    validate_chrome_trace(trace)
    work = [e["args"]["step"] for e in _spans(trace) if e["name"] == "work"]
    recorded = list(range(first, min(first + steps, total)))
    assert work == recorded
    assert [e["name"] for e in _spans(trace) if e["cat"] == "step"] == [
        f"step {s + 1}" for s in recorded]


def test_api_is_a_no_op_when_off_and_records_across_threads_when_on(tmp_path):
    assert timeline._active is None
    assert timeline.begin("x") is None
    timeline.end(None)
    timeline.record("x", 0.0, 1.0)
    with timeline.span("x"):
        pass
    tl = Timeline(tmp_path / "t.json", 1, rank=3)
    tl._open()
    try:
        started = timeline.begin("allreduce bucket 0", track="comm", values=np.int64(10))
        worker = threading.Thread(target=timeline.end, args=(started,), name="progress")
        worker.start()
        worker.join()
        t0 = time.perf_counter()
        timeline.comm_span("allreduce bucket 1", t0, t0 + 0.001)
        inner = threading.Thread(target=lambda: timeline.span("on a thread").__enter__()
                                 .__exit__(None, None, None), name="helper")
        inner.start()
        inner.join()
    finally:
        tl.close()
    timeline.record("after the window", 0.0, 1.0)
    events = {e[0]: e for e in tl.events}
    assert set(events) == {"allreduce bucket 0", "allreduce bucket 1", "on a thread"}
    assert events["allreduce bucket 0"][1] == "comm" and events["on a thread"][1] == "helper"
    assert events["allreduce bucket 0"][4] == {"values": 10}
    assert events["allreduce bucket 1"][3] - events["allreduce bucket 1"][2] == 1_000_000
    trace = chrome_trace([[], tl._relative_events()])
    validate_chrome_trace(trace)
    assert {(e["pid"], e["tid"]) for e in _spans(trace)} == {(1, 1), (1, 2)}
    tl.finish(LocalComm())  # a numpy argument is written as its value
    written = json.loads((tmp_path / "t.json").read_text())
    validate_chrome_trace(written)
    assert {"values": 10} in [e.get("args") for e in _spans(written)]


def test_validator_rejects_what_trace_viewers_reject():
    good = chrome_trace([[("a", "main", 5, 10, None), ("b", "main", 20, 1, {"k": 1})]])
    validate_chrome_trace(good)
    for corrupt in (lambda e: e.update(dur=-1.0), lambda e: e.update(ts=-0.5),
                    lambda e: e.update(pid="0"), lambda e: e.pop("ts"),
                    lambda e: e.update(ph="B"), lambda e: e.update(tid=7)):
        bad = json.loads(json.dumps(good))
        corrupt(next(e for e in bad["traceEvents"] if e["ph"] == "X"))
        with pytest.raises((AssertionError, KeyError)):
            validate_chrome_trace(bad)
    unsorted = json.loads(json.dumps(good))
    spans = [e for e in unsorted["traceEvents"] if e["ph"] == "X"]
    spans[0]["ts"], spans[1]["ts"] = spans[1]["ts"], spans[0]["ts"]
    with pytest.raises(AssertionError):
        validate_chrome_trace(unsorted)


def test_timeline_figure_has_a_row_per_rank_and_track(tmp_path):
    if importlib.util.find_spec("matplotlib") is None:
        missing("matplotlib", 'pip install -e ".[plots]"')
    from dpvit.report.plots import timeline_figure

    ranks = [[("step 1", "main", 0, 5000, {"step": 1}), ("forward/backward", "main", 10, 3000,
                                                         None),
              ("allreduce", "comm", 3100, 200, None)],
             [("step 1", "main", 0, 5200, {"step": 1}), ("allreduce", "comm", 3300, 100, None)]]
    fig = timeline_figure(chrome_trace(ranks))
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels == ["rank 0 main", "rank 0 comm", "rank 1 main", "rank 1 comm"]
    from dpvit.training.timeline import main

    path = tmp_path / "trace.json"
    path.write_text(json.dumps(chrome_trace(ranks)))
    main([str(path), "--png", str(tmp_path / "t.png")])
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"


def test_buckets_in_flight_together_get_lanes_that_viewers_accept():
    """Bucket allreduces that overlap without nesting (started during backward, completed in
    another order) cannot share a tid: the later one goes to the lane "comm 2"."""
    events = [("allreduce bucket 0", "comm", 0, 100_000, None),
              ("allreduce bucket 1", "comm", 10_000, 100_000, None),
              ("allreduce bucket 2", "comm", 120_000, 5_000, None),
              ("backward", "main", 0, 110_000, None)]
    trace = chrome_trace([events])
    validate_chrome_trace(trace)
    names = _track_names(trace)
    lanes = {e["name"]: names[0, e["tid"]] for e in _spans(trace)}
    assert lanes == {"allreduce bucket 0": "comm", "allreduce bucket 1": "comm 2",
                     "allreduce bucket 2": "comm", "backward": "main"}
