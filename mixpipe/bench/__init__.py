"""Benchmarks behind ``mixpipe bench ...``; ``benchmarks/*.py`` are thin scripts over these."""
