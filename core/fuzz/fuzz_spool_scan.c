/*
 * Fuzz target for the spool segment scanner (recovery): the input is a
 * segment file's contents. Checks that every record and damaged range lies
 * inside the file, that offsets only move forward, that a record's length
 * matches its header, and that a valid record read back with
 * mp_rec_decode has the same header.
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "spool.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static int fd = -1;
    mp_scan *s;
    mp_scan_item it;
    off_t last = -1;
    int steps = 0;
    if (fd < 0) fd = memfd_create("segment", 0);
    if (fd < 0) abort();
    if (ftruncate(fd, 0) != 0 || pwrite(fd, data, size, 0) != (ssize_t)size) abort();
    s = mp_scan_new(fd);
    if (s == NULL) abort();
    for (;;) {
        int r = mp_scan_next(s, &it);
        if (r == MP_SCAN_END) break;
        if (++steps > (int)size + 2) abort(); /* must make progress */
        if (r == MP_SCAN_ERROR) abort();
        if (it.off <= last || it.off < 0 || (size_t)it.off > size) abort();
        last = it.off;
        if (r == MP_SCAN_REC) {
            mp_rec_hdr h;
            if ((size_t)(it.off + it.len) > size) abort();
            if (it.len != (off_t)(MP_REC_HEADER + it.hdr.payload_len)) abort();
            if (mp_rec_decode(data + it.off, &h) != 0 || h.id != it.hdr.id || h.payload_len != it.hdr.payload_len)
                abort();
            if (mp_crc32c(0, data + it.off + MP_REC_HEADER, h.payload_len) != h.payload_crc) abort();
        } else if (r == MP_SCAN_CORRUPT) {
            if (it.len <= 0 || (size_t)(it.off + it.len) > size) abort();
        } else if (r == MP_SCAN_TORN) {
            break;
        } else if (r == MP_SCAN_ZEROS) {
            size_t i;
            for (i = (size_t)it.off; i < size; i++)
                if (data[i] != 0) abort(); /* only zeros may end the records */
            break;
        }
    }
    mp_scan_free(s);
    return 0;
}
