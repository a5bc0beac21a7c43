from subtune.train.trainer import (AdapterCheckpointCallback, FiniteGuardCallback, SubtuneTrainerMixin,
                                   ThroughputCallback, build_trainer)

__all__ = ["build_trainer", "AdapterCheckpointCallback", "FiniteGuardCallback", "SubtuneTrainerMixin",
           "ThroughputCallback"]
