/*
 * Spool record codec and segment I/O. See spool.h for the record layout.
 */
#include "spool.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

/* ---- CRC32C ------------------------------------------------------------------ */

static uint32_t crc_table[8][256];
static int crc_ready;
static int crc_hw;

static void crc_init(void)
{
    uint32_t i, j, c;
    for (i = 0; i < 256; i++) {
        c = i;
        for (j = 0; j < 8; j++) c = (c >> 1) ^ (0x82F63B78u & (0u - (c & 1u)));
        crc_table[0][i] = c;
    }
    for (i = 0; i < 256; i++) {
        c = crc_table[0][i];
        for (j = 1; j < 8; j++) {
            c = crc_table[0][c & 0xff] ^ (c >> 8);
            crc_table[j][i] = c;
        }
    }
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();
    crc_hw = __builtin_cpu_supports("sse4.2");
#endif
    crc_ready = 1;
}

/* Slicing-by-8 in software. */
static uint32_t crc_sw(uint32_t c, const unsigned char *p, size_t n)
{
    while (n && ((uintptr_t)p & 7)) {
        c = crc_table[0][(c ^ *p++) & 0xff] ^ (c >> 8);
        n--;
    }
    while (n >= 8) {
        uint32_t lo = c ^ ((uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24);
        uint32_t hi = (uint32_t)p[4] | (uint32_t)p[5] << 8 | (uint32_t)p[6] << 16 | (uint32_t)p[7] << 24;
        c = crc_table[7][lo & 0xff] ^ crc_table[6][(lo >> 8) & 0xff] ^ crc_table[5][(lo >> 16) & 0xff] ^
            crc_table[4][lo >> 24] ^ crc_table[3][hi & 0xff] ^ crc_table[2][(hi >> 8) & 0xff] ^
            crc_table[1][(hi >> 16) & 0xff] ^ crc_table[0][hi >> 24];
        p += 8;
        n -= 8;
    }
    while (n--) c = crc_table[0][(c ^ *p++) & 0xff] ^ (c >> 8);
    return c;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
/* The SSE4.2 crc32 instruction computes exactly CRC32C. */
__attribute__((target("sse4.2"))) static uint32_t crc_hw8(uint32_t c, const unsigned char *p, size_t n)
{
    uint64_t c64;
    while (n && ((uintptr_t)p & 7)) {
        c = __builtin_ia32_crc32qi(c, *p++);
        n--;
    }
    c64 = c;
    while (n >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        c64 = __builtin_ia32_crc32di(c64, v);
        p += 8;
        n -= 8;
    }
    c = (uint32_t)c64;
    while (n--) c = __builtin_ia32_crc32qi(c, *p++);
    return c;
}
#endif

uint32_t mp_crc32c(uint32_t crc, const void *data, size_t n)
{
    uint32_t c = ~crc;
    if (!crc_ready) crc_init();
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    if (crc_hw) return ~crc_hw8(c, data, n);
#endif
    return ~crc_sw(c, data, n);
}

/* ---- header codec -------------------------------------------------------------- */

static void put32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)v;
    p[1] = (unsigned char)(v >> 8);
    p[2] = (unsigned char)(v >> 16);
    p[3] = (unsigned char)(v >> 24);
}

static uint32_t get32(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

void mp_rec_encode(unsigned char out[MP_REC_HEADER], const mp_rec_hdr *h)
{
    memcpy(out, MP_REC_MAGIC, 4);
    out[4] = (unsigned char)h->type;
    out[5] = (unsigned char)h->flags;
    out[6] = (unsigned char)h->aux;
    out[7] = (unsigned char)(h->aux >> 8);
    put32(out + 8, (uint32_t)h->id);
    put32(out + 12, (uint32_t)(h->id >> 32));
    put32(out + 16, h->meta_len);
    put32(out + 20, h->payload_len);
    put32(out + 24, h->payload_crc);
    put32(out + 28, mp_crc32c(0, out, 28));
}

int mp_rec_decode(const unsigned char buf[MP_REC_HEADER], mp_rec_hdr *h)
{
    if (memcmp(buf, MP_REC_MAGIC, 4) != 0) return -1;
    if (get32(buf + 28) != mp_crc32c(0, buf, 28)) return -1;
    h->type = buf[4];
    h->flags = buf[5];
    h->aux = (unsigned)buf[6] | (unsigned)buf[7] << 8;
    h->id = (uint64_t)get32(buf + 8) | (uint64_t)get32(buf + 12) << 32;
    h->meta_len = get32(buf + 16);
    h->payload_len = get32(buf + 20);
    h->payload_crc = get32(buf + 24);
    if (h->type < MP_REC_MSG || h->type > MP_REC_DONE) return -1;
    if (h->payload_len > MP_REC_PAYLOAD_MAX || h->meta_len > h->payload_len) return -1;
    return 0;
}

/* ---- append ------------------------------------------------------------------------ */

int mp_seg_append(int fd, off_t *end, const mp_rec_hdr *hin, const void *meta, size_t meta_len,
                  const void *body, size_t body_len)
{
    unsigned char head[MP_REC_HEADER];
    mp_rec_hdr h = *hin;
    struct iovec iov[3];
    size_t total = MP_REC_HEADER + meta_len + body_len;
    size_t done = 0;
    uint32_t crc;

    if (meta_len + body_len > MP_REC_PAYLOAD_MAX) return -EFBIG;
    crc = mp_crc32c(0, meta, meta_len);
    crc = mp_crc32c(crc, body, body_len);
    h.meta_len = (uint32_t)meta_len;
    h.payload_len = (uint32_t)(meta_len + body_len);
    h.payload_crc = crc;
    mp_rec_encode(head, &h);

    while (done < total) {
        /* Rebuild the vector past what was written so far. */
        int n = 0;
        size_t skip = done;
        const void *parts[3] = {head, meta, body};
        size_t lens[3] = {MP_REC_HEADER, meta_len, body_len};
        int k;
        ssize_t w;
        for (k = 0; k < 3; k++) {
            if (skip >= lens[k]) {
                skip -= lens[k];
                continue;
            }
            iov[n].iov_base = (char *)parts[k] + skip;
            iov[n].iov_len = lens[k] - skip;
            skip = 0;
            n++;
        }
        w = pwritev(fd, iov, n, *end + (off_t)done);
        if (w < 0) {
            int e = errno;
            if (e == EINTR) continue;
            /* Leave no partial record behind. */
            if (done > 0 || e == ENOSPC || e == EIO) {
                while (ftruncate(fd, *end) != 0 && errno == EINTR) ;
            }
            return -e;
        }
        if (w == 0) {
            while (ftruncate(fd, *end) != 0 && errno == EINTR) ;
            return -EIO;
        }
        done += (size_t)w;
    }
    *end += (off_t)total;
    return 0;
}

/* ---- scanning ------------------------------------------------------------------------ */

#define SCAN_BUF (1u << 20)

struct mp_scan {
    int fd;
    off_t pos;        /* file offset of the next record */
    char *buf;        /* read buffer: file bytes [buf_off, buf_off + buf_len) */
    off_t buf_off;
    size_t buf_len;
    char *meta;       /* metadata of the last record */
    size_t meta_cap;
    int eof_known;
    off_t file_end;   /* valid once eof_known */
};

mp_scan *mp_scan_new(int fd)
{
    mp_scan *s = calloc(1, sizeof *s);
    if (s == NULL) return NULL;
    s->buf = malloc(SCAN_BUF);
    if (s->buf == NULL) {
        free(s);
        return NULL;
    }
    s->fd = fd;
    return s;
}

void mp_scan_free(mp_scan *s)
{
    if (s == NULL) return;
    free(s->buf);
    free(s->meta);
    free(s);
}

/* Make file bytes [off, off+want) available from the buffer as far as the
 * file has them. Returns a pointer to off and sets *have (0 at EOF), or
 * NULL with errno on a read error. want is at most SCAN_BUF. */
static const char *scan_get(mp_scan *s, off_t off, size_t want, size_t *have)
{
    if (off >= s->buf_off && off + (off_t)want <= s->buf_off + (off_t)s->buf_len) {
        *have = want;
        return s->buf + (off - s->buf_off);
    }
    if (s->eof_known && off >= s->file_end) {
        *have = 0;
        return s->buf;
    }
    /* Refill from off. */
    s->buf_off = off;
    s->buf_len = 0;
    while (s->buf_len < SCAN_BUF) {
        ssize_t r = pread(s->fd, s->buf + s->buf_len, SCAN_BUF - s->buf_len, off + (off_t)s->buf_len);
        if (r < 0) {
            if (errno == EINTR) continue;
            return NULL;
        }
        if (r == 0) {
            s->eof_known = 1;
            s->file_end = off + (off_t)s->buf_len;
            break;
        }
        s->buf_len += (size_t)r;
    }
    *have = s->buf_len < want ? s->buf_len : want;
    return s->buf;
}

/* The offset of the next valid header at or after from, or -1. */
static off_t scan_resync(mp_scan *s, off_t from, int *err)
{
    off_t off = from;
    *err = 0;
    for (;;) {
        size_t have, i;
        const char *p = scan_get(s, off, SCAN_BUF, &have);
        if (p == NULL) {
            *err = errno;
            return -1;
        }
        if (have < MP_REC_HEADER) return -1;
        for (i = 0; i + MP_REC_HEADER <= have; i++) {
            const char *m = memchr(p + i, 'M', have - MP_REC_HEADER + 1 - i);
            mp_rec_hdr h;
            if (m == NULL) break;
            i = (size_t)(m - p);
            if (memcmp(m, MP_REC_MAGIC, 4) == 0 && mp_rec_decode((const unsigned char *)m, &h) == 0)
                return off + (off_t)i;
        }
        /* Keep the last header-size bytes: a header may straddle the refill. */
        off += (off_t)(have - MP_REC_HEADER + 1);
    }
}

static int damaged(mp_scan *s, mp_scan_item *it, off_t start, off_t resume_from, const char *why)
{
    int err;
    off_t next = scan_resync(s, resume_from, &err);
    if (err) {
        it->result = MP_SCAN_ERROR;
        it->err = err;
        return MP_SCAN_ERROR;
    }
    it->off = start;
    it->why = why;
    if (next < 0) {
        it->result = MP_SCAN_TORN;
        it->len = 0;
        s->pos = -1; /* nothing more */
        return MP_SCAN_TORN;
    }
    it->result = MP_SCAN_CORRUPT;
    it->len = next - start;
    s->pos = next;
    return MP_SCAN_CORRUPT;
}

/* 1 when the file holds only zero bytes from off to its end, 0 when not,
 * -1 with errno on a read error. */
static int zeros_to_end(mp_scan *s, off_t off)
{
    for (;;) {
        size_t have, i;
        const char *p = scan_get(s, off, SCAN_BUF, &have);
        if (p == NULL) return -1;
        if (have == 0) return 1;
        for (i = 0; i < have; i++)
            if (p[i] != 0) return 0;
        off += (off_t)have;
    }
}

static int all_zero(const char *p, size_t n)
{
    size_t i;
    for (i = 0; i < n; i++)
        if (p[i] != 0) return 0;
    return 1;
}

int mp_scan_next(mp_scan *s, mp_scan_item *it)
{
    size_t have;
    const char *p;
    mp_rec_hdr h;
    off_t start = s->pos;
    uint32_t crc = 0;
    size_t left, got_meta = 0;
    off_t off;

    memset(it, 0, sizeof *it);
    if (start < 0) return it->result = MP_SCAN_END;
    p = scan_get(s, start, MP_REC_HEADER, &have);
    if (p == NULL) {
        it->err = errno;
        return it->result = MP_SCAN_ERROR;
    }
    if (have == 0) return it->result = MP_SCAN_END;
    if (all_zero(p, have)) {
        /* preallocated space after the last record, or damage */
        int z = zeros_to_end(s, start);
        if (z < 0) {
            it->err = errno;
            return it->result = MP_SCAN_ERROR;
        }
        if (z) {
            it->off = start;
            s->pos = -1;
            return it->result = MP_SCAN_ZEROS;
        }
        /* zeros_to_end() refilled the buffer from further on: p pointed
         * into it, so the header is fetched again */
        p = scan_get(s, start, MP_REC_HEADER, &have);
        if (p == NULL) {
            it->err = errno;
            return it->result = MP_SCAN_ERROR;
        }
    }
    if (have < MP_REC_HEADER) return damaged(s, it, start, start + 1, "short header");
    if (mp_rec_decode((const unsigned char *)p, &h) != 0) return damaged(s, it, start, start + 1, "bad header");
    if (s->meta_cap < h.meta_len + 1) {
        size_t cap = h.meta_len + 1 < 256 ? 256 : h.meta_len + 1;
        char *nm = realloc(s->meta, cap);
        if (nm == NULL) {
            it->err = ENOMEM;
            return it->result = MP_SCAN_ERROR;
        }
        s->meta = nm;
        s->meta_cap = cap;
    }
    off = start + MP_REC_HEADER;
    left = h.payload_len;
    while (left > 0) {
        size_t want = left < SCAN_BUF ? left : SCAN_BUF;
        p = scan_get(s, off, want, &have);
        if (p == NULL) {
            it->err = errno;
            return it->result = MP_SCAN_ERROR;
        }
        /* The header is intact, so its extent is trusted: never look for a
         * record inside it (a message body can hold a crafted one). */
        if (have == 0)
            return damaged(s, it, start, start + MP_REC_HEADER + (off_t)h.payload_len, "short record");
        if (got_meta < h.meta_len) {
            size_t m = h.meta_len - got_meta;
            if (m > have) m = have;
            memcpy(s->meta + got_meta, p, m);
            got_meta += m;
        }
        crc = mp_crc32c(crc, p, have);
        off += (off_t)have;
        left -= have;
    }
    if (crc != h.payload_crc) return damaged(s, it, start, start + MP_REC_HEADER + (off_t)h.payload_len, "payload checksum");
    s->meta[h.meta_len] = '\0';
    s->pos = off;
    it->result = MP_SCAN_REC;
    it->off = start;
    it->len = off - start;
    it->hdr = h;
    it->meta = s->meta;
    return MP_SCAN_REC;
}
