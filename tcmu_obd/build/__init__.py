"""The build room: making images rather than reading them: applying layer
tars onto an upper (mkfs, untar rules, rollback), converting OCI images to
overlaybd, running an image for a build, and the progress display.  It uses
the rooms below; the command-line parsing is tcmu_obd.cli's."""
