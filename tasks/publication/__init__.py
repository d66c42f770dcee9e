"""What publishing renders from a run's record: the model card, lineage, loss curve."""
