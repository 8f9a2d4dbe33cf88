/*
 * Fuzz target for path and parameter parsing: mp_parse_path for MAIL and
 * RCPT, mp_check_param on every parameter found, and the UTF-8 and xtext
 * validators. Checks that every pointer returned lies inside the input and
 * that the mailbox fits the path limit.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "smtp.h"

static void inside(const char *base, size_t n, const char *p, size_t len)
{
    if (len == 0) return;
    if (p < base || p + len > base + n) abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *arg = malloc(size ? size : 1);
    char buf[MP_SMTP_PATH_MAX + 64];
    int kind;
    if (arg == NULL) return 0;
    memcpy(arg, data, size);
    for (kind = 0; kind < 2; kind++) {
        mp_path path;
        const char *detail = NULL;
        int err = mp_parse_path(arg, size, kind, &path, buf, sizeof buf, &detail);
        if (detail == NULL) abort();
        if (err == MP_PATH_OK) {
            int i;
            if (path.mailbox_len > MP_SMTP_PATH_MAX) abort();
            if (strlen(path.mailbox) != path.mailbox_len) {
                /* a NUL inside is impossible: atext and qtext exclude it */
                abort();
            }
            inside(arg, size, path.local, path.local_len);
            inside(arg, size, path.domain, path.domain_len);
            if (path.utf8 && !mp_utf8_valid(path.mailbox, path.mailbox_len)) abort();
            for (i = 0; i < path.nparams; i++) {
                inside(arg, size, path.params[i].key, path.params[i].key_len);
                inside(arg, size, path.params[i].value, path.params[i].value_len);
                (void)mp_check_param(path.params[i].key, path.params[i].key_len,
                                     path.params[i].value, path.params[i].value_len);
            }
        }
    }
    (void)mp_utf8_valid(arg, size);
    (void)mp_xtext_valid(arg, size);
    if (size > 0) {
        size_t k = data[0] % (size + 1);
        (void)mp_check_param(arg, k, arg + k, size - k);
    }
    free(arg);
    return 0;
}
