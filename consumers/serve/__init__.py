"""`casm serve`: ingest, publish, deliver (the service loop and its parts)."""
