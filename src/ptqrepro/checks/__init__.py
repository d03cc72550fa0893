"""Checks of an experiment config at planning time: cross-setting checks and preflight against models and machine."""
