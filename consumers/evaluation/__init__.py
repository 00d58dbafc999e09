"""Evaluation: offline protocol runs, live replays through `casm serve`, reports."""
