"""Discrete-event cluster simulator that drives the router's real policy objects."""
