"""Compression techniques, one module each, composable into recipes the planner searches."""
