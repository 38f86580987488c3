"""The training loop and what keeps it safe: schedule, run state, metrics log, stop signals,
the run-directory lock, non-finite steps and the progress display."""
