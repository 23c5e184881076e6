"""autorecbench: run and compare AutoML methods for deep recommender systems."""

__version__ = "0.1.0"
