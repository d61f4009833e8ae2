"""tcmu-obd: an overlaybd-compatible implementation of lazily loaded
block-device container images (LSMT and ZFile layers, their tools, and the
daemons that serve them).  See README.md."""
__version__ = "0.1.0"
