"""What `main.py --mode=...` runs: orchestration only (train, evaluate, sample)."""
