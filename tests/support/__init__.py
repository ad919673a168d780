"""Test support shared by several test packages: real servers and real network faults."""
