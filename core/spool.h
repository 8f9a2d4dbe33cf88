/*
 * Spool record codec and segment file I/O. No Lua.
 *
 * A segment is an append-only file of records. Each record:
 *
 *   offset size
 *    0     4   magic "MPR1"
 *    4     1   type   (MP_REC_*)
 *    5     1   flags
 *    6     2   aux    (MSG: number of recipients, capped at 65535)
 *    8     8   id     (little-endian u64: the message id)
 *   16     4   meta_len     (bytes of metadata at the start of the payload)
 *   20     4   payload_len  (metadata + body)
 *   24     4   payload_crc  (CRC32C of the payload)
 *   28     4   header_crc   (CRC32C of bytes 0..27)
 *   32     payload
 *
 * The two checksums let recovery tell a damaged payload (header intact: the
 * record's extent is known and it is skipped exactly) from a damaged header
 * (the scanner searches forward for the next valid header).
 *
 * A segment may end in zero bytes: space written ahead of the records
 * (preallocated) so that a group commit's fdatasync finds its blocks
 * allocated and the file's size unchanged, and has no metadata to journal.
 * Zeros from a record boundary to the end of the file are the clean end of
 * the records (MP_SCAN_ZEROS); zeros followed by anything else are damage.
 */
#ifndef MOONPOST_SPOOL_H
#define MOONPOST_SPOOL_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#define MP_REC_HEADER 32
#define MP_REC_MAGIC "MPR1"
/* Upper bound on one record's payload; a header claiming more is damaged. */
#ifndef MP_REC_PAYLOAD_MAX
#define MP_REC_PAYLOAD_MAX (1u << 30)
#endif

enum mp_rec_type {
    MP_REC_MSG = 1,   /* a message: envelope metadata + body */
    MP_REC_STATE = 2, /* a state change of a message (metadata only) */
    MP_REC_DONE = 3   /* the message is finished and may be reclaimed */
};

/* flags */
#define MP_REC_F_COPY 0x01 /* MSG copied forward by compaction: supersedes older copies */
#define MP_REC_F_DSN 0x02  /* MSG: a DSN whose envelope names the message and recipients it reports
                            * on (read at recovery: the report is final even if that message's
                            * own state record was lost) */
#define MP_REC_F_VOID 0x04 /* DONE: the message was never acknowledged (its sync failed) */

typedef struct mp_rec_hdr {
    unsigned type, flags, aux;
    uint64_t id;
    uint32_t meta_len, payload_len, payload_crc;
} mp_rec_hdr;

/* CRC32C (Castagnoli), hardware-assisted where the CPU has SSE4.2.
 * mp_crc32c(0, p, n) is the standard checksum; pass a previous result to
 * continue it over more data. */
uint32_t mp_crc32c(uint32_t crc, const void *p, size_t n);

void mp_rec_encode(unsigned char out[MP_REC_HEADER], const mp_rec_hdr *h);
/* 0 when buf holds a valid header (magic, header CRC, sane lengths). */
int mp_rec_decode(const unsigned char buf[MP_REC_HEADER], mp_rec_hdr *h);

/* Append one record at *end with a single pwritev. On failure the partial
 * record is truncated away and -errno is returned; *end is unchanged. */
int mp_seg_append(int fd, off_t *end, const mp_rec_hdr *h, const void *meta, size_t meta_len,
                  const void *body, size_t body_len);

/* ---- scanning a segment (recovery) ---------------------------------------- */

enum mp_scan_result {
    MP_SCAN_END = 0,  /* clean end of file */
    MP_SCAN_REC,      /* a valid record */
    MP_SCAN_CORRUPT,  /* damaged bytes [off, off+len) followed by valid records */
    MP_SCAN_TORN,     /* damaged or incomplete bytes from off to the end of file */
    MP_SCAN_ERROR,    /* read error: errno in err */
    MP_SCAN_ZEROS     /* zero bytes from off to the end of file: the end of the records */
};

typedef struct mp_scan mp_scan;

typedef struct mp_scan_item {
    int result;
    off_t off;            /* record or damage start */
    off_t len;            /* record length (header + payload) or damage length */
    mp_rec_hdr hdr;       /* MP_SCAN_REC */
    const char *meta;     /* MP_SCAN_REC: metadata, valid until the next call */
    const char *why;      /* CORRUPT / TORN: a short reason */
    int err;              /* MP_SCAN_ERROR */
} mp_scan_item;

mp_scan *mp_scan_new(int fd);
void mp_scan_free(mp_scan *s);
int mp_scan_next(mp_scan *s, mp_scan_item *it);

#endif
