/*
 * Fuzz target for the client side: the reply parser (whole input against
 * chunked input, same replies) and dot-stuffing (what mp_stuff produces,
 * read back by the DATA parser, is the input with CRLF line ends).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "smtp.h"

static uint64_t replies(const uint8_t *data, size_t size, size_t chunk)
{
    mp_reply_parser *r = mp_reply_new();
    uint64_t h = 1469598103934665603ULL;
    size_t pos = 0;
    if (r == NULL) abort();
    while (pos < size) {
        size_t n = chunk ? chunk : size;
        mp_reply rep;
        int t;
        if (n > size - pos) n = size - pos;
        if (mp_reply_push(r, (const char *)data + pos, n) != 0) abort();
        pos += n;
        while ((t = mp_reply_next(r, &rep)) != MP_REPLY_NONE) {
            size_t i;
            h = (h ^ (uint64_t)t) * 1099511628211ULL;
            if (t == MP_REPLY_DONE) {
                if (rep.code < 200 || rep.code > 599) abort();
                h = (h ^ (uint64_t)rep.code) * 1099511628211ULL;
                for (i = 0; i < rep.text_len; i++) h = (h ^ (uint8_t)rep.text[i]) * 1099511628211ULL;
                for (i = 0; rep.enhanced[i]; i++) h = (h ^ (uint8_t)rep.enhanced[i]) * 1099511628211ULL;
            }
        }
    }
    mp_reply_free(r);
    return h;
}

/* What the DATA parser must give back for the stuffed form of s. */
static void normalize(const uint8_t *s, size_t n, mp_body *out)
{
    size_t i;
    for (i = 0; i < n; i++) {
        if (s[i] == '\r') {
            mp_body_append(out, "\r\n", 2);
            if (i + 1 < n && s[i + 1] == '\n') i++;
        } else if (s[i] == '\n') {
            mp_body_append(out, "\r\n", 2);
        } else {
            mp_body_append(out, (const char *)s + i, 1);
        }
    }
    if (out->len > 0 && !(out->len >= 2 && mp_body_data(out)[out->len - 2] == '\r' &&
                          mp_body_data(out)[out->len - 1] == '\n'))
        mp_body_append(out, "\r\n", 2);
}

static void stuffing(const uint8_t *data, size_t size, size_t chunk)
{
    mp_stuff st;
    mp_body stuffed, expect, got;
    mp_smtp_in *p;
    mp_in_ev ev;
    size_t pos = 0;
    int t;
    mp_body_init(&stuffed);
    mp_body_init(&expect);
    mp_stuff_init(&st);
    while (pos < size) {
        size_t n = chunk < size - pos ? chunk : size - pos;
        if (mp_stuff_feed(&st, (const char *)data + pos, n, &stuffed) != 0) abort();
        pos += n;
    }
    if (mp_stuff_finish(&st, &stuffed) != 0) abort();
    normalize(data, size, &expect);
    p = mp_in_new(NULL);
    mp_in_begin_data(p);
    mp_in_push(p, mp_body_data(&stuffed), stuffed.len);
    t = mp_in_next(p, &ev);
    if (t != MP_EV_DATA_END) abort();
    if (mp_in_buffered(p) != 0) abort();
    mp_in_take_body(p, &got);
    if (got.len != expect.len || memcmp(mp_body_data(&got), mp_body_data(&expect), got.len) != 0) abort();
    mp_body_free(&got);
    mp_body_free(&stuffed);
    mp_body_free(&expect);
    mp_in_free(p);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    size_t chunk;
    if (size < 1) return 0;
    chunk = (size_t)(data[0] % 32) + 1;
    if (replies(data + 1, size - 1, 0) != replies(data + 1, size - 1, chunk)) abort();
    stuffing(data + 1, size - 1, chunk);
    return 0;
}
