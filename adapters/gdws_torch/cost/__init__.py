"""Cost and speed: MAC counts, frames per second on every backend, per-layer latency
tables and the keep-dense latency check.
"""
