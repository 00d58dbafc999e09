"""Online adaptation: test-then-train signals, drift detection, alpha policies."""
