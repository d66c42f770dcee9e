"""What the train step runs: loading, adapters, speed levers, checkpoints, launch."""
