"""Benchmarks run by `main.py --mode=memory` (and other modes): numbers, not tests."""
