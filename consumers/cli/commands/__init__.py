"""The sub-commands of `casm`, one module each."""
