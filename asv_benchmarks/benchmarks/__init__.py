"""asv benchmarks for fastpool (see asv_benchmarks/README.md)."""
