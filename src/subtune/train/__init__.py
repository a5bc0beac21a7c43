from subtune.train.trainer import AdapterCheckpointCallback, ThroughputCallback, build_trainer

__all__ = ["build_trainer", "AdapterCheckpointCallback", "ThroughputCallback"]
