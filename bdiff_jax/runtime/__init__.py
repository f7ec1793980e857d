"""The process and its workdir, below everything else: setup before JAX starts (bootstrap,
XLA flags, host allocator), devices and sharding, the distributed runtime, checkpoints, the
workdir, metrics and user-facing output."""
