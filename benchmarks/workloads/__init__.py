"""Training loops the benchmarks run under ray_elastic, torchrun and Ray Train."""
