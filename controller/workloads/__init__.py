"""Reference workloads: real data shipped inside PyPI packages, no downloads at run time.

Each module loads one dataset from a package already installed with the controller
extra (sktime ships the UCR/UEA archives it names), trains a small seeded model on
the CPU, and exports it to ONNX so the rest of HomeFleet has a real model to
register, compress, ship and measure — not a toy graph built by hand.
"""
