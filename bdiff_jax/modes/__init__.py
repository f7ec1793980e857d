"""What `main.py --mode=...` runs: orchestration only (train, evaluate, sample, glue), and
`launch`, what main.py does around a mode."""
