"""The pure core: decisions over values, no I/O; time is always a parameter."""
