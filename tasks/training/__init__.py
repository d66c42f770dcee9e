"""What the train step runs: run.py (run_train's phases: setup → resume → fit → save →
record), checkpoints.py, distributed.py, record.py, and the loading, adapters, speed levers
and launch they use."""
