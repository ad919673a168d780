"""The closed budget loop: observed telemetry against each class's budgets, and the fix.

``check`` decides from telemetry slices whether a class misses its budget (minimum
samples, K windows in a row); ``loop`` acts on it (a recompression with the class's
latency model recalibrated, a canary share, then promote or roll back); ``store``
keeps every rollout and decision in the database, so any replica can carry one on.
"""
