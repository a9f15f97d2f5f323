"""mixpipe."""
