/*
 * Fuzz target for the DKIM engine's parsers and canonicalization: the input
 * is a message. Checks that the header splitter covers the header section
 * in order and finds the body inside the input, that tag lists and
 * DKIM-Signature summaries stay inside their text, that the native engine
 * signs or refuses any message (headers folded within 78 columns), and that
 * verification returns one sane result per DKIM-Signature field.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "dkim.h"

static const char ED25519[] =
    "-----BEGIN PRIVATE KEY-----\n"
    "MC4CAQAwBQYDK2VwBCIEIJ1hsZ3v/VpguoRK9JLsLMREScVpezJpGXA7rAMcrn9g\n"
    "-----END PRIVATE KEY-----\n";

static void check_tags(const char *s, size_t n)
{
    mp_tag tags[MP_DKIM_MAX_TAGS];
    const char *why = NULL;
    int k, c = mp_dkim_tags(s, n, tags, MP_DKIM_MAX_TAGS, &why);
    if (c < 0 && why == NULL) abort();
    for (k = 0; k < c; k++) {
        if (tags[k].name < s || tags[k].name + tags[k].name_len > s + n) abort();
        if (tags[k].value < s || tags[k].value + tags[k].value_len > s + n) abort();
        if (tags[k].name_len == 0) abort();
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static mp_dkim_key *key;
    const char *msg = (const char *)data;
    mp_hdr_iter it;
    mp_hdr_field f;
    size_t end = 0;
    int nsig = 0, steps = 0;
    char err[256];
    if (key == NULL && (key = mp_dkim_key_from_pem(ED25519, sizeof ED25519 - 1, "fuzz", err, sizeof err)) == NULL)
        abort();

    mp_hdr_init(&it, msg, size);
    while (mp_hdr_next(&it, &f)) {
        if (++steps > (int)size + 1) abort();
        if (f.text != msg + end && f.text < msg + end) abort(); /* in order, no overlap */
        if (f.text + f.len > msg + size || f.name_len > f.len) abort();
        end = (size_t)(f.text - msg) + f.len;
        if (f.name_len == 14 && strncasecmp(f.text, "DKIM-Signature", 14) == 0) {
            const char *colon = memchr(f.text, ':', f.len);
            mp_dkim_sig sig;
            if (colon == NULL) abort();
            mp_dkim_sig_parse(colon + 1, f.len - (size_t)(colon + 1 - f.text), &sig);
            if (strlen(sig.header_b) > 8 || strlen(sig.domain) > 255) abort();
            nsig++;
        }
    }
    if (it.body > size || it.body < end) abort();
    check_tags(msg, size);

    /* native signing: relaxed or simple, chosen by the first octet */
    {
        static const char *const hdrs[] = {"from", "to", "subject", "dkim-signature"};
        static const char *const over[] = {"from"};
        mp_dkim_spec_in in = {key, "example.com", "s1", NULL, 0, 0, hdrs, 4, over, 1, 0, 1, MP_ENGINE_NATIVE, 0};
        mp_dkim_job *j = mp_dkim_job_new(msg, size, 1);
        size_t rlen;
        const char *r;
        if (j == NULL) abort();
        in.hcanon = size > 0 && (data[0] & 1);
        in.bcanon = size > 0 && (data[0] & 2);
        if (mp_dkim_job_set(j, 0, &in, err, sizeof err) != 0) abort();
        mp_dkim_job_run(j);
        r = mp_dkim_job_result(j, &rlen);
        if (r == NULL && mp_dkim_job_error(j) == NULL) abort();
        if (r) {
            size_t col = 0, i;
            if (rlen < 2 || memcmp(r, "DKIM-Signature: ", 16) != 0 || memcmp(r + rlen - 2, "\r\n", 2) != 0) abort();
            for (i = 0; i < rlen; i++) {
                if (r[i] == '\n') col = 0;
                else if (r[i] != '\r') col += r[i] == '\t' ? 8 : 1;
                /* only d= and s= are not folded, and they are short here */
                if (col > 78) abort();
            }
        }
        mp_dkim_job_free(j);
    }

    /* verification: one result per DKIM-Signature field */
    {
        static mp_dkim_result res[64];
        mp_dkim_keyrec keys[1] = {{"s1._domainkey.example.com", "v=DKIM1; k=ed25519; p=11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=", MP_KEY_FOUND}};
        int n = mp_dkim_verify(msg, size, keys, 1, res, 64, err, sizeof err), k;
        if (n < 0) abort();
        if (n != (nsig < 64 ? nsig : 64)) abort();
        for (k = 0; k < n; k++)
            if (res[k].result == NULL) abort();
    }
    return 0;
}
