"""Routing policies (filter -> score -> pick) shared by the router and the simulator."""
