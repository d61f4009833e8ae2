"""Commit / compaction: writing a committed LSMT layer from a source index
(docs/formats.md, Commit and merge), byte for byte as overlaybd does.

Used for RW commit, --commit_sealed, merge and flatten.  The output is
written strictly sequentially through write(), so it can be piped into a
ZFileWriter, a tar wrapper or (later) a registry upload.  This module does
not choose the wrappers; the tools do.
"""
from tcmu_obd import core
from tcmu_obd.format import lsmt
from tcmu_obd.errors import ReadError
from tcmu_obd.format.lsmt import FLAG_DATA, FLAG_HEADER, FLAG_SEALED, HT_SPACE, MAX_LENGTH, SECTOR, LsmtHeader

STEP = 64            # sectors copied per step (32 KiB); each step is one record
READ_CHUNK = 8192    # sectors read from a source at once (4 MiB, a multiple of STEP)
INDEX_PAD = 256      # records; the index is padded to 4 KiB


def layer_info(files, uuid=None, parent_uuid=None, user_tag=b""):
    """Header fields for the output (load_layer_info): vsize from files[0]'s
    header, parent from files[0] (one source) or files[-1] (several)."""
    first = LsmtHeader.unpack(files[0].pread(0, HT_SPACE), files[0].name)
    last = first if len(files) == 1 else LsmtHeader.unpack(files[-1].pread(0, HT_SPACE), files[-1].name)
    parent = last.parent_uuid
    if parent_uuid and lsmt.valid_uuid(parent_uuid):
        parent = parent_uuid.upper()
    uid = uuid.upper() if uuid and lsmt.valid_uuid(uuid) else lsmt.NULL_UUID
    if isinstance(user_tag, str):
        user_tag = user_tag.encode()
    return LsmtHeader(FLAG_HEADER | FLAG_DATA | FLAG_SEALED, 0, 0, first.virtual_size, uid, parent,
                      user_tag)


def _steps(records, files, out, remote_tag=None):
    """Copy the data of every record and yield the per-step records.
    Records with tag `remote_tag` (a warp layer's tar mappings) are yielded
    verbatim: their data is not in the layer."""
    mo = HT_SPACE // SECTOR
    for off, length, moff, zeroed, tag in records:
        if tag == remote_tag:
            yield (off, length, moff, zeroed, tag)
            continue
        if zeroed:
            yield (off, length, mo, 1, tag)
            continue
        src = files[tag]
        done = 0
        while done < length:
            n = min(length - done, READ_CHUNK)
            data = src.pread((moff + done) * SECTOR, n * SECTOR)
            if len(data) != n * SECTOR:
                raise ReadError(f"{src.name}: short read of {n * SECTOR} bytes at byte "
                                f"{(moff + done) * SECTOR} while committing")
            out.write(data)
            for s in range(0, n, STEP):
                st = min(STEP, n - s)
                yield (off + done + s, st, mo, 0, tag)
                mo += st
            done += n


def merge_records(steps):
    """overlaybd's one-pass index compression (note: strictly less than 16383)."""
    acc = None
    for b in steps:
        if acc is not None:
            a_end = acc[0] + acc[1]
            a_mend = acc[2] if acc[3] else acc[2] + acc[1]
            if (a_end == b[0] and a_mend == b[2] and acc[3] == b[3] and acc[4] == b[4]
                    and acc[1] + b[1] < MAX_LENGTH):
                acc = (acc[0], acc[1] + b[1], acc[2], acc[3], acc[4])
                continue
            yield acc
        acc = b
    if acc is not None:
        yield acc


def compact(records, files, out, header, remote_tag=None):
    """Write header, data, padded index and trailer to `out`; returns the
    number of bytes written.  remote_tag: see _steps (warp commit: 1)."""
    out.write(header.pack())
    merged = list(merge_records(_steps(records, files, out, remote_tag)))
    data_end = HT_SPACE + sum(r[1] for r in merged if not r[3] and r[4] != remote_tag) * SECTOR
    index = core.Index.from_records(merged)
    dump = index.dump(INDEX_PAD)
    for i in range(0, len(dump), 4096):
        out.write(dump[i:i + 4096])
    trailer = LsmtHeader(FLAG_DATA | FLAG_SEALED, data_end, len(dump) // 16, header.virtual_size,
                         header.uuid, header.parent_uuid, header.user_tag)
    out.write(trailer.pack())
    return data_end + len(dump) + HT_SPACE
