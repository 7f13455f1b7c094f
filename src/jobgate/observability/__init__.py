"""Observability: structured logs (`logging`) and Prometheus metrics (`metrics`)."""
