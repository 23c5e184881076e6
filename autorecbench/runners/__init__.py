"""Protocols that drive a method over a dataset. Runners know the protocol, never the method."""
