"""The cloud side: the gRPC controller that registers models, signs artifacts, directs devices."""
