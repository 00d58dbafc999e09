"""The trainer process and the service's link to it."""
