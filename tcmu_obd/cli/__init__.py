"""Command-line tools: overlaybd-create, -commit, -zfile, -merge (same names
and flags as overlaybd's) and the tcmu-obd command.  Each tool is a thin
argument parser over the library; no format logic lives here."""
