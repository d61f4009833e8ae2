"""The serve room: exposing an opened image to the kernel, through TCMU (the
overlaybd handler, SCSI emulation, configfs attach, the iSCSI fabric, the
daemon) or FUSE plus a loop device.  It takes images from tcmu_obd.image and
does not parse layer formats or talk to registries itself."""
