/*
 * Fuzz target for the suppression log loader: the input is a log file's
 * contents. It is loaded twice, at once and in chunks of random sizes, and
 * the two loads must agree (records, damage, torn offset, live entries).
 * A torn tail lies inside the input; the input cut there loads again with
 * no torn tail and the same entries. Every line that parses formats back
 * to the same octets (when its address is already lowercase).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "suppress.h"

static const unsigned char seed[16] = "fuzz-suppress-k";

static mp_sup *load(const uint8_t *data, size_t size, uint32_t chunks, mp_sup_load *res)
{
    mp_sup *s = mp_sup_new(seed);
    mp_sup_loader *l;
    size_t off = 0;
    if (s == NULL) abort();
    l = mp_sup_loader_new(s);
    if (l == NULL) abort();
    while (off < size) {
        size_t n = size - off;
        if (chunks) {
            chunks = chunks * 1103515245u + 12345u;
            n = 1 + (chunks >> 16) % 97;
            if (n > size - off) n = size - off;
        }
        if (mp_sup_loader_push(l, (const char *)data + off, n) != 0) abort();
        off += n;
    }
    mp_sup_loader_finish(l, res);
    if (res->nomem) abort();
    return s;
}

static int is_lower(const char *p, size_t n)
{
    size_t i;
    for (i = 0; i < n; i++)
        if (p[i] >= 'A' && p[i] <= 'Z') return 0;
    return 1;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    mp_sup_load a, b, c;
    mp_sup *sa, *sb, *sc;
    const uint8_t *p = data, *end = data + size;
    uint32_t chunks = 1u + (size ? data[0] : 0u);
    sa = load(data, size, 0, &a);
    sb = load(data, size, chunks, &b);
    if (a.size != size || b.size != size) abort();
    if (a.records != b.records || a.corrupt != b.corrupt || a.torn != b.torn || a.torn_off != b.torn_off)
        abort();
    if (mp_sup_count(sa) != mp_sup_count(sb)) abort();
    if (a.unterminated != b.unterminated) abort();
    /* only one damaged last line is ever cut; more are kept as damage */
    if (a.torn && (a.torn_off >= size || a.torn_lines != 1)) abort();
    if (a.torn && a.unterminated) abort();
    if (a.records + a.corrupt + a.torn_lines > size) abort();
    /* cut at the torn offset: a clean log with the same entries */
    sc = load(data, a.torn ? a.torn_off : size, 0, &c);
    if (c.torn || c.records != a.records || mp_sup_count(sc) != mp_sup_count(sa)) abort();
    /* line by line: parse and format back */
    while (p < end) {
        const uint8_t *nl = memchr(p, '\n', (size_t)(end - p));
        size_t len = nl ? (size_t)(nl - p) : (size_t)(end - p);
        mp_sup_rec r;
        if (mp_sup_parse((const char *)p, len, &r) == NULL) {
            char out[MP_SUP_LINE_MAX];
            size_t n;
            if (mp_sup_check(&r) != NULL) abort();
            n = mp_sup_format(out, &r);
            if (n > MP_SUP_LINE_MAX || out[n - 1] != '\n') abort();
            if (is_lower(r.addr, r.addr_len) && (n - 1 != len || memcmp(out, p, len) != 0)) abort();
        }
        if (!nl) break;
        p = nl + 1;
    }
    mp_sup_free(sa);
    mp_sup_free(sb);
    mp_sup_free(sc);
    return 0;
}
