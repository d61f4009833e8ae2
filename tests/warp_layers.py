"""Test helper: writing TurboOCI warp meta layers with the project's own
writers (LSMT header/index/trailer from tcmu_obd.format.lsmt and core.Index,
ZFile and tar wrappers from tcmu_obd.image.output), and a bytearray model of
what a warp layer reads as.  Not a converter: the records are given."""
from tcmu_obd import core
from tcmu_obd.format.lsmt import FLAG_DATA, FLAG_HEADER, FLAG_SEALED, HT_SPACE, SECTOR, LsmtHeader
from tcmu_obd.image.output import Output


def write_warp_layer(path, vsize, records, use_zfile=False, use_tar=False, tag_base=0):
    """A committed warp meta layer at `path`.  records (sorted, disjoint, in
    sectors): (offset, length, "meta", bytes) data stored in this file,
    (offset, length, "target", moffset) data at byte moffset*512 of the
    target, (offset, length, "zero", None) zeroed.  Stored tags are
    tag_base (meta) and tag_base + 1 (target)."""
    out = Output(str(path), True, use_zfile, use_tar, 1, 4096, 1, overwrite_header=use_zfile)
    try:
        out.write(LsmtHeader(FLAG_HEADER | FLAG_DATA | FLAG_SEALED, 0, 0, vsize).pack())
        mo, recs = HT_SPACE // SECTOR, []
        for off, ln, kind, x in records:
            if kind == "meta":
                assert len(x) == ln * SECTOR
                out.write(x)
                recs.append((off, ln, mo, 0, tag_base))
                mo += ln
            elif kind == "target":
                recs.append((off, ln, x, 0, tag_base + 1))
            else:
                recs.append((off, ln, mo, 1, tag_base))
        dump = core.Index.from_records(recs).dump(256)
        out.write(dump)
        out.write(LsmtHeader(FLAG_DATA | FLAG_SEALED, mo * SECTOR, len(dump) // 16, vsize).pack())
        out.close()
    finally:
        out.abort()
    return str(path)


def model_warp(model, records, target):
    """Apply a warp layer's records to a bytearray model of the disk (holes
    untouched); target reads past its end are zeros."""
    for off, ln, kind, x in records:
        n = ln * SECTOR
        if kind == "meta":
            data = x
        elif kind == "target":
            data = bytes(target[x * SECTOR:x * SECTOR + n]).ljust(n, b"\0")
        else:
            data = bytes(n)
        model[off * SECTOR:off * SECTOR + n] = data
    return model
