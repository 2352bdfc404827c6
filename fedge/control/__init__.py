"""Steering running fedge processes: Ctrl-C handling, commands to a running coordinator."""
