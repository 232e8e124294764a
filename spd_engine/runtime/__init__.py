"""Runtimes that drive the SPD cycle of :mod:`spd_engine.spd` somewhere other than one eager process."""
