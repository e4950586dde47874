"""What every long job shares: the run dir, checkpoints, preemption, callbacks."""
