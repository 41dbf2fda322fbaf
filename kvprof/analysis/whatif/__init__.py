"""The what-if model: calibrate from a run's traces, simulate deployments, compare with measured."""
