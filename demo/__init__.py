"""`make demo`: a whole HomeFleet on one machine, driven the way an operator would.

It trains the BasicMotions activity-recognition model, starts a controller and three
edge agents of different device classes as real processes, registers and assigns the
model through the real `homefleet` CLI, waits until every device serves it, then sends
the real test set through each device's local inference API and reports accuracy and
latency. Every process it starts is stopped before it exits, whatever happens.
"""
