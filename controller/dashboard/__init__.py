"""The controller's built-in dashboard and its HTTP port (which also serves /metrics)."""
