"""``--timeline FILE``: a Chrome trace (Perfetto, chrome://tracing) of a few training steps.

Every rank records spans of its own work: the data wait, forward and backward of each block,
the gradient allreduce, clipping and the optimizer, evaluation and checkpoint writes; at the
end rank 0 gathers them and writes one JSON file in the Chrome trace event format::

    {"traceEvents": [{"name": "allreduce", "ph": "X", "ts": 1234.5, "dur": 87.2,
                      "pid": 0, "tid": 1, "args": {"step": 5}}, ...],
     "displayTimeUnit": "ms"}

``pid`` is the rank (a process named "rank r"), ``tid`` a track of that rank: 0 "main" (the
training thread), 1 "comm" (communication: every allreduce span goes there, whichever thread
runs it), then one per other thread that records (the replica threads, by thread name).
``ts`` and ``dur`` are microseconds from ``time.perf_counter_ns``, counted on each rank from
its own zero taken right after a barrier at the start of training: the ranks' clocks are
aligned at that barrier only (to within the barrier's exit skew, microseconds on one host),
and they drift apart over a run, not at all visibly over the few seconds recorded.

Only ``--timeline-steps`` steps are recorded, after ``WARMUP_STEPS`` steps (fewer when the
run is too short for both), so the file stays small; anything between the first recorded
step's data wait and the next step's (an evaluation, a checkpoint) is recorded too.

Recording code anywhere in the step calls the module functions, which cost one global read
when nothing records (no ``--timeline``, or outside the recorded steps)::

    from dpvit.training import timeline

    with timeline.span("allreduce bucket 3", track="comm", bytes=n):
        ...
    started = timeline.begin("allreduce bucket 3", track="comm")  # e.g. a request started
    ...
    timeline.end(started)  # where it completes (None from begin: nothing is recorded)
    timeline.record("allreduce bucket 3", t0, t1, track="comm")  # time.perf_counter() values

`comm_span(name, start, end)` is `record` on the comm track, in the shape of `GradSync`'s
``on_span`` callback (the trainer passes it when ``--timeline`` is given).

``python -m dpvit.training.timeline FILE --png OUT.png`` draws a trace as bars per rank and
track (``dpvit.report.plots.timeline_figure``; needs matplotlib).
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from dpvit.files import write_atomic

logger = logging.getLogger(__name__)

#: Steps taken before recording starts: the first steps allocate buffers and warm caches.
WARMUP_STEPS = 3
#: Tracks every rank has, with their ``tid``; other threads get the next numbers.
FIXED_TRACKS = ("main", "comm")

_now = time.perf_counter_ns
_OFF = nullcontext()
#: The timeline recording right now (its window is open), else None: the one check made by
#: `span`, `begin` and `end`.
_active: Timeline | None = None

#: A recorded span on this rank: (name, track, start ns, end ns, args or None).
Event = tuple[str, str, int, int, "dict[str, Any] | None"]


def span(name: str, track: str | None = None, **args: Any):
    """A context manager that records ``name`` from entry to exit on ``track`` (default: the
    calling thread's track) with ``args``, while a timeline records; else a no-op."""
    active = _active
    if active is None:
        return _OFF
    return _Span(active, name, track, args)


def begin(name: str, track: str | None = None, **args: Any) -> tuple | None:
    """Start a span that `end` finishes, possibly in another function or thread (a request
    started here and completed later). Returns the token for `end`, None when not recording."""
    if _active is None:
        return None
    return (name, track or _thread_track(), _now(), args or None)


def end(token: tuple | None) -> None:
    """Finish the span ``begin`` started (nothing for None, or when recording has stopped)."""
    active = _active
    if token is not None and active is not None:
        name, track, start, args = token
        active.events.append((name, track, start, _now(), args))


def record(name: str, start: float, end: float, track: str | None = None, **args: Any) -> None:
    """Record a span whose ``start`` and ``end`` were taken with ``time.perf_counter()``
    (seconds; the clock of ``perf_counter_ns``), while a timeline records."""
    active = _active
    if active is not None:
        active.events.append((name, track or _thread_track(), round(start * 1e9),
                              round(end * 1e9), args or None))


def comm_span(name: str, start: float, end: float) -> None:
    """`record` on the "comm" track: the ``on_span(name, start, end)`` callback of
    `dpvit.parallel.gradsync.GradSync` (each bucket's allreduce, from start to completion)."""
    record(name, start, end, track="comm")


def recording() -> bool:
    """True while a timeline records (for code that would compute span arguments)."""
    return _active is not None


def _thread_track() -> str:
    thread = threading.current_thread()
    return "main" if thread is threading.main_thread() else thread.name


class _Span:
    __slots__ = ("args", "name", "start", "timeline", "track")

    def __init__(self, timeline: Timeline, name: str, track: str | None,
                 args: dict[str, Any]) -> None:
        self.timeline, self.name, self.args = timeline, name, args or None
        self.track = track or _thread_track()

    def __enter__(self) -> _Span:
        self.start = _now()
        return self

    def __exit__(self, *exc: object) -> None:
        self.timeline.events.append((self.name, self.track, self.start, _now(), self.args))


class Timeline:
    """Records this rank's spans for ``steps`` training steps and writes the job's trace.

    The trainer calls `start` once before training (a barrier: every rank's clock zero),
    iterates its batches through `batches` (the data wait and the step spans; the window
    opens and closes there) and calls `finish` after training; `finish` (or the window's
    close) gathers every rank's events to rank 0, which writes ``path`` atomically.

    Args:
        path: the trace file to write.
        steps: how many steps to record.
        rank: this rank (the trace's ``pid``).
        models: the rank's model replicas; while recording, each block's ``forward`` and
            ``backward`` are wrapped (an instance attribute over the method) to record a span
            per block; outside the window the blocks are as they were (free when off).
        warmup: steps to take before recording.
    """

    def __init__(self, path: str | Path, steps: int, rank: int, models: Sequence[Any] = (),
                 warmup: int = WARMUP_STEPS) -> None:
        self.path, self.steps, self.rank = Path(path), steps, rank
        self.models, self.warmup = list(models), warmup
        self.events: list[Event] = []
        self.zero = _now()
        self.first = self.last = 0  # the recorded steps: first <= step < last
        self.is_open = self.written = False

    # -- the window ----------------------------------------------------------------------------

    def start(self, comm: Any, step: int, total_steps: int) -> None:
        """Agree on the clock's zero at a barrier and place the window: after ``warmup`` steps
        from ``step`` (the run's next step), fewer when the rest of the run is shorter."""
        self.first = step + min(self.warmup, max(0, total_steps - step - self.steps))
        self.last = self.first + self.steps
        if comm.is_root:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        comm.barrier()
        self.zero = _now()

    def _open(self) -> None:
        global _active
        self.is_open, _active = True, self
        for model in self.models:
            for i, block in enumerate(model.blocks):
                for method in ("forward", "backward"):
                    setattr(block, method, _traced(self, getattr(block, method),
                                                   f"block {i} {method}"))

    def close(self) -> None:
        """Stop recording (no file is written; `finish` writes): the blocks get their methods
        back and the module functions are off again."""
        global _active
        if _active is self:
            _active = None
        self.is_open = False
        for model in self.models:
            for block in model.blocks:
                for method in ("forward", "backward"):
                    vars(block).pop(method, None)  # the class's method again

    def batches(self, loader: Iterable[Any], step: int, comm: Any) -> Iterator[Any]:
        """``loader``'s batches, for steps ``step``, ``step + 1``, ...; records each step's
        data wait and the whole step (from its data wait to the request of the next batch),
        opens the window before the first recorded step's data wait and closes it (and writes
        the trace) when the batch after the last recorded step has arrived."""
        batches = iter(loader)
        while True:
            if self.first <= step < self.last and not self.is_open and not self.written:
                self._open()
            start = _now()
            try:
                item = next(batches)
            except StopIteration:
                return
            if step >= self.last and self.is_open:
                self.finish(comm)  # every rank is here at the same step: a safe collective
            recording = self.is_open
            if recording:
                self.events.append(("data wait", "main", start, _now(), {"step": step + 1}))
            yield item
            if recording and self.is_open:
                # numbered from 1, as the log and the checkpoints (step-N.h5) count steps
                self.events.append((f"step {step + 1}", "main", start, _now(),
                                    {"step": step + 1}))
            step += 1

    # -- the file ------------------------------------------------------------------------------

    def finish(self, comm: Any) -> None:
        """Stop recording; gather every rank's events; rank 0 writes the trace (once).
        Collective: call on every rank."""
        self.close()
        if self.written:
            return
        self.written = True
        ranks = comm.allgather_object(self._relative_events())
        if not comm.is_root:
            return
        if not any(ranks):
            logger.warning("--timeline: no step was recorded (the run took no steps)")
        try:
            write_atomic(self.path, json.dumps(chrome_trace(ranks), separators=(",", ":")))
        except OSError as err:
            logger.error("could not write the timeline %s: %s", self.path, err)
            return
        logger.info("timeline of steps %d-%d written to %s", self.first + 1,
                    self.last, self.path)

    def _relative_events(self) -> list[tuple[str, str, int, int, dict | None]]:
        """This rank's events as (name, track, start ns, duration ns, args), from its zero."""
        return [(name, track, start - self.zero, end - start, args)
                for name, track, start, end, args in self.events]


def _traced(timeline: Timeline, method: Callable[..., Any], name: str) -> Callable[..., Any]:
    """``method`` recording a span ``name`` around each call."""
    def traced(*args: Any, **kwargs: Any) -> Any:
        with _Span(timeline, name, None, None):
            return method(*args, **kwargs)

    return traced


def chrome_trace(ranks: Sequence[Sequence[tuple]]) -> dict[str, Any]:
    """The trace of every rank's relative events (``ranks[r]``, see `Timeline`): complete
    ("X") events in microseconds, sorted by track and start, and metadata ("M") events naming
    each rank's process and tracks.

    Trace viewers need the spans of one ``tid`` disjoint or nested; spans of a track that
    overlap otherwise (buckets in flight together) go to lanes "comm 2", "comm 3", ... next to
    it."""
    events: list[dict[str, Any]] = []
    for rank, rank_events in enumerate(ranks):
        placed, lanes = _lanes(rank_events)
        tids = {name: tid for tid, name in enumerate(lanes)}
        events.append({"name": "process_name", "ph": "M", "pid": rank, "tid": 0,
                       "args": {"name": f"rank {rank}"}})
        events.append({"name": "process_sort_index", "ph": "M", "pid": rank, "tid": 0,
                       "args": {"sort_index": rank}})
        for track, tid in tids.items():
            events.append({"name": "thread_name", "ph": "M", "pid": rank, "tid": tid,
                           "args": {"name": track}})
            events.append({"name": "thread_sort_index", "ph": "M", "pid": rank, "tid": tid,
                           "args": {"sort_index": tid}})
        spans = []
        for (name, _, start, duration, args), lane in placed:
            event = {"name": name, "cat": _category(name), "ph": "X", "ts": start / 1000,
                     "dur": duration / 1000, "pid": rank, "tid": tids[lane]}
            if args:
                event["args"] = {key: value if isinstance(value, str | int | float | bool)
                                 else _plain(value) for key, value in args.items()}
            spans.append(event)
        # by track, then start; an enclosing span before the spans it contains
        spans.sort(key=lambda e: (e["tid"], e["ts"], -e["dur"]))
        events += spans
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def _lanes(rank_events: Sequence[tuple]) -> tuple[list[tuple[tuple, str]], list[str]]:
    """Each event with the lane it goes to (its track, or "track k" when it overlaps a span
    of the earlier lanes without nesting in it), and every lane in display order (the fixed
    tracks first, each track's extra lanes after it)."""
    tracks: dict[str, list[tuple]] = {name: [] for name in FIXED_TRACKS}
    for event in rank_events:
        tracks.setdefault(event[1], []).append(event)
    placed, order = [], []
    for track, track_events in tracks.items():
        open_ends: list[list[int]] = [[]]  # per lane, the ends of the spans still open
        for event in sorted(track_events, key=lambda e: (e[2], -e[3])):
            end = event[2] + event[3]
            lane = _free_lane(open_ends, event[2], end)
            open_ends[lane].append(end)
            placed.append((event, track if lane == 0 else f"{track} {lane + 1}"))
        order += [track] + [f"{track} {lane + 1}" for lane in range(1, len(open_ends))]
    return placed, order


def _free_lane(open_ends: list[list[int]], start: int, end: int) -> int:
    """The first lane where a span ``start``-``end`` nests in the open span or follows it
    (a new lane when none does)."""
    for lane, ends in enumerate(open_ends):
        while ends and ends[-1] <= start:
            ends.pop()
        if not ends or end <= ends[-1]:
            return lane
    open_ends.append([])
    return len(open_ends) - 1


#: Span name prefixes and the category (trace "cat", figure colour) they belong to.
CATEGORIES = (("step", "step"), ("data wait", "data"), ("forward/backward", "compute"),
              ("block", "forward"), ("allreduce", "comm"), ("clip", "optimizer"),
              ("evaluation", "evaluation"), ("checkpoint", "checkpoint"), ("report", "report"))


def _category(name: str) -> str:
    for prefix, category in CATEGORIES:
        if name.startswith(prefix):
            return "backward" if category == "forward" and "backward" in name else category
    return "other"


def _plain(value: Any) -> Any:
    """A span argument JSON cannot hold as it is: a numpy scalar's value, else its text
    (None included: trace viewers show it as text)."""
    return value.item() if hasattr(value, "item") else str(value)


def read_trace(path: str | Path) -> dict[str, Any]:
    """A trace file written by `Timeline`."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def main(argv: list[str] | None = None) -> None:
    """``python -m dpvit.training.timeline FILE --png OUT.png``: draw a trace."""
    parser = argparse.ArgumentParser(prog="python -m dpvit.training.timeline",
                                     description="Draw a --timeline trace as a PNG.")
    parser.add_argument("trace", help="the trace JSON written by --timeline")
    parser.add_argument("--png", required=True, help="the picture to write")
    parser.add_argument("--steps", type=int, default=None,
                        help="draw only the first N recorded steps (default: all)")
    parser.add_argument("--title", default=None, help="the figure's title")
    args = parser.parse_args(argv)
    from dpvit.report.plots import timeline

    write_atomic(args.png, timeline(read_trace(args.trace), steps=args.steps,
                                    title=args.title))


if __name__ == "__main__":
    main()
