/*
 * Fuzz target for the server input parser (mp_smtp_in).
 *
 * The input is fed twice, like a session would: once in one piece and once
 * in chunks whose sizes come from the input itself, switching modes on DATA,
 * BDAT and AUTH the way the session does. Beyond memory errors (ASan, UBSan)
 * it checks:
 *   - both runs produce the same events and the same bodies;
 *   - a stored body holds CRLF line ends only;
 *   - a body never exceeds max_size;
 *   - unconsumed command input stays bounded.
 * A third run also discards buffered input at STARTTLS (not compared).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "smtp.h"

#define MAX_SIZE 4096
#define LOG_MAX (1 << 16)

typedef struct evlog {
    unsigned char buf[LOG_MAX];
    size_t len;
    uint64_t hash;
} evlog;

static void log_add(evlog *l, const void *p, size_t n)
{
    const unsigned char *s = p;
    size_t i;
    for (i = 0; i < n; i++) l->hash = (l->hash ^ s[i]) * 1099511628211ULL;
    if (l->len + n <= LOG_MAX) {
        memcpy(l->buf + l->len, p, n);
        l->len += n;
    }
}

static void check_body(const mp_body *b)
{
    const char *s = mp_body_data(b);
    size_t i;
    if (b->len > MAX_SIZE) abort();
    for (i = 0; i < b->len; i++) {
        if (s[i] == '\n' && (i == 0 || s[i - 1] != '\r')) abort();
        if (s[i] == '\r' && (i + 1 >= b->len || s[i + 1] != '\n')) abort();
    }
}

/* STARTTLS drops whatever input is buffered at that moment, which depends
 * on the chunking by design; only the third, uncompared run does it. */
static int do_discard;

static void drain(mp_smtp_in *p, evlog *l, int *bdat_last)
{
    mp_in_ev ev;
    for (;;) {
        int t = mp_in_next(p, &ev);
        if (t == MP_EV_NONE) break;
        log_add(l, &t, sizeof t);
        switch (t) {
        case MP_EV_CMD: {
            unsigned long long n = 0;
            size_t i;
            log_add(l, ev.verb, ev.verb_len);
            log_add(l, ev.arg, ev.arg_len);
            log_add(l, &ev.flags, sizeof ev.flags);
            if (strcmp(ev.verb, "DATA") == 0) {
                mp_in_begin_data(p);
            } else if (strcmp(ev.verb, "BDAT") == 0) {
                for (i = 0; i < ev.arg_len && i < 6 && ev.arg[i] >= '0' && ev.arg[i] <= '9'; i++)
                    n = n * 10 + (unsigned)(ev.arg[i] - '0');
                *bdat_last = ev.arg_len > i + 1;
                mp_in_begin_bdat(p, n);
            } else if (strcmp(ev.verb, "AUTH") == 0) {
                mp_in_begin_line(p);
            } else if (strcmp(ev.verb, "RSET") == 0) {
                mp_in_reset_body(p);
            } else if (do_discard && strcmp(ev.verb, "STARTTLS") == 0) {
                mp_in_discard(p);
            }
            break;
        }
        case MP_EV_LINE:
            log_add(l, ev.arg, ev.arg_len);
            break;
        case MP_EV_TOO_LONG:
            log_add(l, &ev.line_len, sizeof ev.line_len);
            break;
        case MP_EV_DATA_END:
        case MP_EV_BDAT_END:
            if (t == MP_EV_DATA_END || *bdat_last) {
                mp_body b;
                unsigned flags = mp_in_take_body(p, &b);
                if (!(flags & MP_MSG_TOO_BIG) && t == MP_EV_DATA_END) check_body(&b);
                if (b.len > MAX_SIZE) abort();
                log_add(l, &flags, sizeof flags);
                log_add(l, mp_body_data(&b), b.len);
                mp_body_free(&b);
            } else {
                size_t sz = mp_in_body_size(p);
                log_add(l, &sz, sizeof sz);
            }
            break;
        }
    }
}

static void run(const uint8_t *data, size_t size, const uint8_t *sizes, size_t nsizes, evlog *l)
{
    mp_in_limits lim;
    mp_smtp_in *p;
    size_t pos = 0, k = 0;
    int bdat_last = 0;
    mp_in_limits_default(&lim);
    lim.max_size = MAX_SIZE;
    lim.text_line = 100;
    p = mp_in_new(&lim);
    if (p == NULL) abort();
    while (pos < size) {
        size_t n = nsizes ? (size_t)(sizes[k++ % nsizes] % 64) + 1 : size;
        if (n > size - pos) n = size - pos;
        if (mp_in_push(p, (const char *)data + pos, n) != 0) abort();
        pos += n;
        drain(p, l, &bdat_last);
        if (mp_in_mode(p) == MP_MODE_CMD && mp_in_buffered(p) > MP_SMTP_AUTH_LINE_MAX + 64 + 64) abort();
    }
    drain(p, l, &bdat_last);
    mp_in_free(p);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static evlog a, b;
    size_t nsizes;
    if (size < 1) return 0;
    nsizes = data[0] % 16;
    if (nsizes + 1 > size) return 0;
    a.len = b.len = 0;
    a.hash = b.hash = 1469598103934665603ULL;
    run(data + 1 + nsizes, size - 1 - nsizes, NULL, 0, &a);
    run(data + 1 + nsizes, size - 1 - nsizes, data + 1, nsizes, &b);
    if (a.hash != b.hash || a.len != b.len || memcmp(a.buf, b.buf, a.len) != 0) {
        fprintf(stderr, "events differ between whole and chunked input\n");
        abort();
    }
    do_discard = 1;
    run(data + 1 + nsizes, size - 1 - nsizes, data + 1, nsizes, &a);
    do_discard = 0;
    return 0;
}
