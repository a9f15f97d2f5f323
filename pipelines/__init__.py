"""Ready-made DALI and FFCV pipelines with mixing (see each module)."""
