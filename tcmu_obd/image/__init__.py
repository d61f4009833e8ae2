"""The image room: layers stacked into one virtual disk.  Opening a layer
file, the RW upper, the stack, committing, parsing config.v1.json
(image.config) and assembling the image it describes from local files and
remote lowers (image.assemble, with the background download).  It holds no
byte formats (tcmu_obd.format), no HTTP or cache (tcmu_obd.remote) and no
kernel front end (tcmu_obd.serve)."""
