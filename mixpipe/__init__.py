"""mixpipe: training-input mixing for NVIDIA DALI, FFCV and torch loaders, planned per epoch by a
selection server, so an epoch needs fewer forward passes."""

#: The package version; pyproject.toml reads it from here, so there is one place to change it.
__version__ = "0.1.0"
