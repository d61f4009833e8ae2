"""The format room: the on-disk layouts of a layer, read and written as bytes
(LSMT headers and index records, ZFile, the one-entry tar wrapper, ext4's
metadata).  It does not open images, fetch blobs or serve devices; the hot
loops over records and blocks are in tcmu_obd.core."""
