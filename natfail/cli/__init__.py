"""Entry points of the `natfail` and `natfailctl` programs."""
