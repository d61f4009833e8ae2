"""The splice mutation the file-format harnesses share (fuzz_layer, fuzz_zfile):
a fuzz input read as ops that overwrite regions of a real, valid seed file,
so that mutations land in headers, tables and payloads rather than only in
bytes a parser rejects at once.  Not a harness itself (no fuzz_ prefix:
scripts/test.sh does not run it).

An op is 4 bytes (region, offset low, offset high, n) followed by n payload
bytes.  region % (len(regions) + 2) picks one of the seed's (start, length)
regions (the payload goes at start + offset % (length + 1)), anywhere in the
file (offset % (size + 1)), or a truncation at offset % (size + 1) followed
by the payload.
"""


def splice(blob, regions, ops):
    """A bytearray: blob with the ops applied."""
    buf = bytearray(blob)
    pos = 0
    while pos + 4 <= len(ops):
        region, off, n = ops[pos], ops[pos + 1] | ops[pos + 2] << 8, ops[pos + 3]
        payload = ops[pos + 4:pos + 4 + n]
        pos += 4 + n
        kind = region % (len(regions) + 2)
        if kind == len(regions):                # anywhere
            start = off % (len(buf) + 1)
        elif kind == len(regions) + 1:          # truncate (or extend with the payload)
            del buf[off % (len(buf) + 1):]
            buf += payload
            continue
        else:
            rstart, rlen = regions[kind]
            start = rstart + off % (max(rlen, 0) + 1)
        buf[start:start + len(payload)] = payload
    return buf
