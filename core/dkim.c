/*
 * DKIM engine: keys, header splitting, tag lists, the two signing engines,
 * the signer (a work queue, workq.h) and verification. See dkim.h.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rsa.h>
#include <openssl/x509.h>

#include <opendkim/dkim.h>
#include <sodium.h>

#include "dkim.h"

#define HDR_NAME "DKIM-Signature"
#define HDR_PREFIX "DKIM-Signature: "
#define HDR_PREFIX_LEN 16

/* libopendkim's buffer for a key record (BUFRSZ + 1 in dkim_get_key) */
#define MP_DKIM_MAX_KEYTXT 1025

#ifndef MP_DKIM_MAX_LIBS
#define MP_DKIM_MAX_LIBS 64   /* distinct oversign/expire settings signed by libopendkim */
#endif

/* ---- small helpers ----------------------------------------------------------------- */

typedef struct buf {
    char *p;
    size_t len, cap;
    int oom;
} buf;

/* room for n more octets (and the NUL b_add keeps): where they go, or NULL */
static char *b_reserve(buf *b, size_t n)
{
    if (b->oom) return NULL;
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        char *np;
        while (cap < b->len + n + 1) cap *= 2;
        np = realloc(b->p, cap);
        if (np == NULL) {
            b->oom = 1;
            return NULL;
        }
        b->p = np;
        b->cap = cap;
    }
    return b->p + b->len;
}

static void b_add(buf *b, const void *p, size_t n)
{
    char *o = b_reserve(b, n);
    if (o == NULL) return;
    memcpy(o, p, n);
    b->len += n;
    b->p[b->len] = '\0';
}

static void b_adds(buf *b, const char *s) { b_add(b, s, strlen(s)); }
static void b_addc(buf *b, char c) { b_add(b, &c, 1); }

static int is_wsp(int c) { return c == ' ' || c == '\t'; }
static int is_fws(int c) { return c == ' ' || c == '\t' || c == '\r' || c == '\n'; }

static char *xstrndup(const char *s, size_t n)
{
    char *p = malloc(n + 1);
    if (p == NULL) return NULL;
    memcpy(p, s, n);
    p[n] = '\0';
    return p;
}

static char *lowerdup(const char *s)
{
    size_t n = strlen(s), i;
    char *p = malloc(n + 1);
    if (p == NULL) return NULL;
    for (i = 0; i <= n; i++) p[i] = (char)((s[i] >= 'A' && s[i] <= 'Z') ? s[i] + 32 : s[i]);
    return p;
}

static char *b64(const unsigned char *p, size_t n)
{
    char *out = malloc(4 * ((n + 2) / 3) + 1);
    if (out == NULL) return NULL;
    EVP_EncodeBlock((unsigned char *)out, p, (int)n);
    return out;
}

static int eq_ci(const char *a, size_t alen, const char *b, size_t blen)
{
    return alen == blen && strncasecmp(a, b, alen) == 0;
}

/* ---- header fields --------------------------------------------------------------------- */

void mp_hdr_init(mp_hdr_iter *it, const char *msg, size_t len)
{
    it->msg = msg;
    it->len = len;
    it->pos = 0;
    it->body = len;
    it->done = 0;
}

/* The end of the line at pos (its CR or LF, or len) and where the next begins. */
static size_t line_end(const char *m, size_t len, size_t pos, size_t *next)
{
    const char *nl = memchr(m + pos, '\n', len - pos);
    size_t i;
    if (nl == NULL) {
        *next = len;
        return len;
    }
    i = (size_t)(nl - m);
    *next = i + 1;
    return (i > pos && m[i - 1] == '\r') ? i - 1 : i;
}

int mp_hdr_next(mp_hdr_iter *it, mp_hdr_field *f)
{
    const char *m = it->msg;
    size_t p = it->pos, start, end, next, i;
    if (it->done) return 0;
    if (p >= it->len) {
        it->done = 1;
        it->body = it->len;
        return 0;
    }
    /* an empty line ends the header section */
    if (m[p] == '\n' || (m[p] == '\r' && p + 1 < it->len && m[p + 1] == '\n')) {
        it->done = 1;
        it->body = p + (m[p] == '\n' ? 1 : 2);
        return 0;
    }
    start = p;
    for (;;) {
        end = line_end(m, it->len, p, &next);
        if (next >= it->len || !is_wsp((unsigned char)m[next])) break;
        p = next; /* a continuation line belongs to this field */
    }
    it->pos = next;
    f->text = m + start;
    f->len = end - start;
    f->name_len = 0;
    for (i = 0; i < f->len; i++) {
        if (f->text[i] == ':') {
            size_t n = i;
            while (n > 0 && is_wsp((unsigned char)f->text[n - 1])) n--;
            f->name_len = n;
            break;
        }
    }
    return 1;
}

static int field_is(const mp_hdr_field *f, const char *name)
{
    return f->name_len > 0 && eq_ci(f->text, f->name_len, name, strlen(name));
}

/* ---- tag lists --------------------------------------------------------------------------- */

int mp_dkim_tags(const char *s, size_t len, mp_tag *tags, int max, const char **why)
{
    size_t p = 0;
    int n = 0;
    while (p <= len) {
        const char *seg = s + p, *semi = memchr(seg, ';', len - p), *eq;
        size_t seglen = semi ? (size_t)(semi - seg) : len - p, a = 0, b = seglen, k;
        mp_tag t;
        int j;
        while (a < b && is_fws((unsigned char)seg[a])) a++;
        while (b > a && is_fws((unsigned char)seg[b - 1])) b--;
        if (a == b) {
            if (semi == NULL) break; /* a ';' may end the list */
            *why = "empty tag";
            return -1;
        }
        eq = memchr(seg + a, '=', b - a);
        if (eq == NULL) {
            *why = "tag without '='";
            return -1;
        }
        t.name = seg + a;
        t.name_len = (size_t)(eq - t.name);
        while (t.name_len > 0 && is_fws((unsigned char)t.name[t.name_len - 1])) t.name_len--;
        if (t.name_len == 0 || !((t.name[0] | 32) >= 'a' && (t.name[0] | 32) <= 'z')) {
            *why = "bad tag name";
            return -1;
        }
        for (k = 1; k < t.name_len; k++) {
            unsigned char c = (unsigned char)t.name[k];
            if (!((c | 32) >= 'a' && (c | 32) <= 'z') && !(c >= '0' && c <= '9') && c != '_') {
                *why = "bad tag name";
                return -1;
            }
        }
        t.value = eq + 1;
        t.value_len = (size_t)(seg + b - t.value);
        while (t.value_len > 0 && is_fws((unsigned char)t.value[0])) {
            t.value++;
            t.value_len--;
        }
        for (k = 0; k < t.value_len; k++) {
            unsigned char c = (unsigned char)t.value[k];
            if (c == ';' || (c < 0x21 && !is_fws(c)) || c == 0x7f) {
                *why = "bad character in tag value";
                return -1;
            }
        }
        for (j = 0; j < n; j++) {
            if (tags[j].name_len == t.name_len && memcmp(tags[j].name, t.name, t.name_len) == 0) {
                *why = "duplicate tag";
                return -1;
            }
        }
        if (n == max) {
            *why = "too many tags";
            return -1;
        }
        tags[n++] = t;
        if (semi == NULL) break;
        p = (size_t)(semi - s) + 1;
    }
    return n;
}

static const mp_tag *tag_get(const mp_tag *tags, int n, const char *name)
{
    size_t l = strlen(name);
    int i;
    for (i = 0; i < n; i++)
        if (tags[i].name_len == l && memcmp(tags[i].name, name, l) == 0) return &tags[i];
    return NULL;
}

/* A domain name or selector: dot-separated labels of letters, digits, '-' and '_'. */
static int valid_dname(const char *s, size_t n)
{
    size_t i, label = 0;
    if (n == 0 || n > 253) return 0;
    for (i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == '.') {
            if (label == 0) return 0;
            label = 0;
        } else if (((c | 32) >= 'a' && (c | 32) <= 'z') || (c >= '0' && c <= '9') || c == '-' || c == '_') {
            if (++label > 63) return 0;
        } else {
            return 0;
        }
    }
    return label > 0;
}

/* d= or a subdomain of it (RFC 6376 3.5, i=). */
static int in_domain(const char *sub, size_t sublen, const char *d, size_t dlen)
{
    if (eq_ci(sub, sublen, d, dlen)) return 1;
    return sublen > dlen && sub[sublen - dlen - 1] == '.' && strncasecmp(sub + sublen - dlen, d, dlen) == 0;
}

int mp_dkim_valid_name(const char *s, size_t n) { return valid_dname(s, n); }

int mp_dkim_valid_identity(const char *i, size_t n, const char *d, size_t dn)
{
    const char *at = memchr(i, '@', n);
    size_t k;
    for (k = 0; k < n; k++)
        if ((unsigned char)i[k] <= 0x20 || i[k] == ';' || i[k] == 0x7f) return 0;
    return at != NULL && valid_dname(at + 1, n - (size_t)(at + 1 - i)) && in_domain(at + 1, n - (size_t)(at + 1 - i), d, dn);
}

static int parse_uint(const char *s, size_t n, uint64_t *out)
{
    uint64_t v = 0;
    size_t i;
    if (n == 0 || n > 12) return -1;
    for (i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9') return -1;
        v = v * 10 + (uint64_t)(s[i] - '0');
    }
    *out = v;
    return 0;
}

static void copy_field(char *dst, size_t cap, const char *s, size_t n)
{
    if (n >= cap) n = cap - 1;
    memcpy(dst, s, n);
    dst[n] = '\0';
}

/* base64string of RFC 6376 3.5: ALPHA / DIGIT / "+" / "/", folding white
 * space between, at most two "=" at the end, in groups of four */
static int valid_base64(const mp_tag *t)
{
    size_t i, chars = 0, pads = 0;
    for (i = 0; i < t->value_len; i++) {
        unsigned char c = (unsigned char)t->value[i];
        if (is_fws(c)) continue;
        if (c == '=') {
            if (++pads > 2) return 0;
        } else if (pads > 0 || !((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
                                 c == '+' || c == '/')) {
            return 0;
        }
        chars++;
    }
    return chars > 0 && chars % 4 == 0;
}

int mp_dkim_sig_parse(const char *value, size_t len, mp_dkim_sig *out)
{
    mp_tag tags[MP_DKIM_MAX_TAGS];
    const mp_tag *t;
    const char *why = NULL;
    static const char *const required[] = {"v", "a", "b", "bh", "d", "h", "s"};
    size_t i, k;
    int n;
    memset(out, 0, sizeof *out);
    n = mp_dkim_tags(value, len, tags, MP_DKIM_MAX_TAGS, &why);
    if (n < 0) {
        out->error = why;
        return -1;
    }
    if ((t = tag_get(tags, n, "d")) != NULL) copy_field(out->domain, sizeof out->domain, t->value, t->value_len);
    if ((t = tag_get(tags, n, "s")) != NULL) copy_field(out->selector, sizeof out->selector, t->value, t->value_len);
    if ((t = tag_get(tags, n, "a")) != NULL) copy_field(out->algorithm, sizeof out->algorithm, t->value, t->value_len);
    if ((t = tag_get(tags, n, "b")) != NULL) {
        for (i = 0, k = 0; i < t->value_len && k < 8; i++)
            if (!is_fws((unsigned char)t->value[i])) out->header_b[k++] = t->value[i];
        out->header_b[k] = '\0';
    }
    for (i = 0; i < sizeof required / sizeof *required; i++) {
        t = tag_get(tags, n, required[i]);
        if (t == NULL || (t->value_len == 0 && strcmp(required[i], "b") != 0)) {
            static const char *const missing[] = {"missing v= tag", "missing a= tag", "missing b= tag",
                                                  "missing bh= tag", "missing d= tag", "missing h= tag",
                                                  "missing s= tag"};
            out->error = missing[i];
            return -1;
        }
    }
    t = tag_get(tags, n, "v");
    if (t->value_len != 1 || t->value[0] != '1') {
        out->error = "v= is not 1";
        return -1;
    }
    t = tag_get(tags, n, "d");
    if (!valid_dname(t->value, t->value_len)) {
        out->error = "bad domain in d=";
        return -1;
    }
    t = tag_get(tags, n, "s");
    if (!valid_dname(t->value, t->value_len)) {
        out->error = "bad selector in s=";
        return -1;
    }
    if (tag_get(tags, n, "b")->value_len == 0) {
        out->error = "empty b= tag";
        return -1;
    }
    /* RFC 6376 6.1.1: a signature that does not sign From is ignored */
    {
        const mp_tag *h = tag_get(tags, n, "h");
        size_t a = 0;
        int from = 0;
        while (a < h->value_len) {
            const char *colon = memchr(h->value + a, ':', h->value_len - a);
            size_t e = colon ? (size_t)(colon - h->value) : h->value_len, s0 = a, e0 = e;
            while (s0 < e0 && is_fws((unsigned char)h->value[s0])) s0++;
            while (e0 > s0 && is_fws((unsigned char)h->value[e0 - 1])) e0--;
            if (eq_ci(h->value + s0, e0 - s0, "from", 4)) from++;
            a = e + 1;
        }
        out->h_from = from;
        if (!from) {
            out->error = "h= does not include From";
            return -1;
        }
    }
    /* RFC 6376 3.5, 6.1.1: q= lists query methods; without dns/txt (the
     * only one there is) the key cannot be had */
    if ((t = tag_get(tags, n, "q")) != NULL) {
        size_t a = 0;
        int dns = 0;
        while (a <= t->value_len) {
            const char *colon = memchr(t->value + a, ':', t->value_len - a);
            size_t e = colon ? (size_t)(colon - t->value) : t->value_len, s0 = a, e0 = e;
            const char *slash;
            while (s0 < e0 && is_fws((unsigned char)t->value[s0])) s0++;
            while (e0 > s0 && is_fws((unsigned char)t->value[e0 - 1])) e0--;
            /* dns/txt, perhaps with options after a further '/' */
            slash = memchr(t->value + s0, '/', e0 - s0);
            if (slash && eq_ci(t->value + s0, (size_t)(slash - t->value) - s0, "dns", 3)) {
                size_t r0 = (size_t)(slash + 1 - t->value), r1 = r0;
                while (r1 < e0 && t->value[r1] != '/') r1++;
                if (eq_ci(t->value + r0, r1 - r0, "txt", 3)) dns = 1;
            }
            if (colon == NULL) break;
            a = e + 1;
        }
        if (!dns) {
            out->error = "q= names no query method Moonpost has (dns/txt)";
            return -1;
        }
    }
    if ((t = tag_get(tags, n, "i")) != NULL) {
        const char *at = memchr(t->value, '@', t->value_len);
        const mp_tag *d = tag_get(tags, n, "d");
        if (at == NULL ||
            !in_domain(at + 1, t->value_len - (size_t)(at + 1 - t->value), d->value, d->value_len)) {
            out->error = "i= is not within d=";
            return -1;
        }
    }
    {
        const mp_tag *ts = tag_get(tags, n, "t"), *xs = tag_get(tags, n, "x");
        uint64_t tv = 0, xv = 0;
        if (ts && parse_uint(ts->value, ts->value_len, &tv) != 0) {
            out->error = "bad t= value";
            return -1;
        }
        if (xs && parse_uint(xs->value, xs->value_len, &xv) != 0) {
            out->error = "bad x= value";
            return -1;
        }
        if (ts && xs && xv < tv) {
            out->error = "x= is before t=";
            return -1;
        }
    }
    /* RFC 6376 3.5: b= and bh= are base64 (folding white space anywhere); a
     * signature that cannot be decoded is malformed, not a failed one */
    if (!valid_base64(tag_get(tags, n, "b"))) {
        out->error = "b= is not base64";
        return -1;
    }
    if (!valid_base64(tag_get(tags, n, "bh"))) {
        out->error = "bh= is not base64";
        return -1;
    }
    /* 1*76DIGIT */
    if ((t = tag_get(tags, n, "l")) != NULL) {
        size_t d;
        for (d = 0; d < t->value_len && t->value[d] >= '0' && t->value[d] <= '9'; d++) ;
        if (t->value_len == 0 || t->value_len > 76 || d != t->value_len) {
            out->error = "bad l= value";
            return -1;
        }
    }
    return 0;
}

/* ---- keys ----------------------------------------------------------------------------------- */

struct mp_dkim_key {
    int refs;
    int type, bits;
    EVP_PKEY *pkey;
    /* An Ed25519 key for libsodium (seed and public key), which signs in
     * ~19 us where OpenSSL 3.0 takes ~44 (both deterministic, RFC 8032:
     * the same signature); has_sk is 0 when libsodium could not start. */
    unsigned char ed_sk[crypto_sign_SECRETKEYBYTES];
    int has_sk;
    char *pem;    /* PKCS#8, for libopendkim */
    char *pub;    /* base64 for p= */
    char *name;
};

/* Never prompt for a passphrase: an encrypted key is an error. */
static int no_passphrase(char *buf, int size, int rwflag, void *u)
{
    (void)buf; (void)size; (void)rwflag; (void)u;
    return -1;
}

static void key_free(mp_dkim_key *k)
{
    if (k == NULL) return;
    EVP_PKEY_free(k->pkey);
    OPENSSL_cleanse(k->ed_sk, sizeof k->ed_sk);
    if (k->pem) OPENSSL_cleanse(k->pem, strlen(k->pem));
    free(k->pem);
    free(k->pub);
    free(k->name);
    free(k);
}

static int has(const char *s, size_t n, const char *needle)
{
    return memmem(s, n, needle, strlen(needle)) != NULL;
}

mp_dkim_key *mp_dkim_key_from_pem(const char *pem, size_t len, const char *name, char *err, size_t errlen)
{
    mp_dkim_key *k;
    BIO *bio;
    EVP_PKEY *pkey;
    int id;
    if (!has(pem, len, "-----BEGIN ")) {
        snprintf(err, errlen, "%s: not a PEM private key", name);
        return NULL;
    }
    if (has(pem, len, "ENCRYPTED")) {
        snprintf(err, errlen, "%s: an encrypted key; decrypt it first (openssl pkey -in KEY -out KEY.pem)", name);
        return NULL;
    }
    if (!has(pem, len, "PRIVATE KEY-----")) {
        snprintf(err, errlen, "%s: not a PEM private key (a public key or certificate?)", name);
        return NULL;
    }
    bio = BIO_new_mem_buf(pem, (int)len);
    if (bio == NULL) {
        snprintf(err, errlen, "%s: out of memory", name);
        return NULL;
    }
    pkey = PEM_read_bio_PrivateKey(bio, NULL, no_passphrase, NULL);
    BIO_free(bio);
    ERR_clear_error();
    if (pkey == NULL) {
        snprintf(err, errlen, "%s: not a PEM private key", name);
        return NULL;
    }
    id = EVP_PKEY_get_base_id(pkey);
    if (id != EVP_PKEY_RSA && id != EVP_PKEY_ED25519) {
        const char *t = EVP_PKEY_get0_type_name(pkey);
        snprintf(err, errlen, "%s: %s key; RSA (1024 to 4096 bits) and Ed25519 keys are supported", name,
                 t ? t : "unknown");
        EVP_PKEY_free(pkey);
        return NULL;
    }
    if (id == EVP_PKEY_RSA && (EVP_PKEY_get_bits(pkey) < 1024 || EVP_PKEY_get_bits(pkey) > 4096)) {
        snprintf(err, errlen, "%s: RSA key of %d bits; 1024 to 4096 are supported", name, EVP_PKEY_get_bits(pkey));
        EVP_PKEY_free(pkey);
        return NULL;
    }
    k = calloc(1, sizeof *k);
    if (k == NULL) goto oom;
    k->refs = 1;
    k->pkey = pkey;
    k->type = id == EVP_PKEY_RSA ? MP_DKIM_RSA : MP_DKIM_ED25519;
    k->bits = EVP_PKEY_get_bits(pkey);
    k->name = strdup(name);
    if (k->name == NULL) goto oom;
    if (k->type == MP_DKIM_RSA) {
        /* p= of an RSA key is its SubjectPublicKeyInfo (RFC 6376 3.6.1) */
        unsigned char *der = NULL;
        int n = i2d_PUBKEY(pkey, &der);
        if (n <= 0) goto oom;
        k->pub = b64(der, (size_t)n);
        OPENSSL_free(der);
    } else {
        /* p= of an Ed25519 key is the bare 32-octet key (RFC 8463 4) */
        unsigned char raw[32], seed[32], pk[crypto_sign_PUBLICKEYBYTES];
        size_t n = sizeof raw, sn = sizeof seed;
        if (EVP_PKEY_get_raw_public_key(pkey, raw, &n) != 1) goto oom;
        k->pub = b64(raw, n);
        /* the signing key for libsodium: from the seed, and only if it
         * gives the same public key */
        if (sodium_init() >= 0 && EVP_PKEY_get_raw_private_key(pkey, seed, &sn) == 1 && sn == sizeof seed &&
            crypto_sign_seed_keypair(pk, k->ed_sk, seed) == 0 && n == sizeof pk && memcmp(pk, raw, n) == 0)
            k->has_sk = 1;
        OPENSSL_cleanse(seed, sizeof seed);
    }
    if (k->pub == NULL) goto oom;
    {
        BIO *out = BIO_new(BIO_s_mem());
        char *data;
        long n;
        if (out == NULL || PEM_write_bio_PrivateKey(out, pkey, NULL, NULL, 0, NULL, NULL) != 1) {
            BIO_free(out);
            goto oom;
        }
        n = BIO_get_mem_data(out, &data);
        k->pem = xstrndup(data, (size_t)n);
        OPENSSL_cleanse(data, (size_t)n);
        BIO_free(out);
        if (k->pem == NULL) goto oom;
    }
    return k;
oom:
    ERR_clear_error();
    if (k) key_free(k);
    else EVP_PKEY_free(pkey);
    snprintf(err, errlen, "%s: out of memory", name);
    return NULL;
}

mp_dkim_key *mp_dkim_key_load(const char *path, char *err, size_t errlen)
{
    struct stat st;
    char *data;
    size_t got = 0;
    mp_dkim_key *k;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        snprintf(err, errlen, "%s: %s", path, strerror(errno));
        return NULL;
    }
    if (fstat(fd, &st) != 0) {
        snprintf(err, errlen, "%s: %s", path, strerror(errno));
        close(fd);
        return NULL;
    }
    if (!S_ISREG(st.st_mode)) {
        snprintf(err, errlen, "%s: %s", path, S_ISDIR(st.st_mode) ? "a directory" : "not a regular file");
        close(fd);
        return NULL;
    }
    if (st.st_size > MP_DKIM_MAX_KEYFILE) {
        snprintf(err, errlen, "%s: not a PEM private key (%lld bytes)", path, (long long)st.st_size);
        close(fd);
        return NULL;
    }
    data = malloc((size_t)st.st_size + 1);
    if (data == NULL) {
        snprintf(err, errlen, "%s: out of memory", path);
        close(fd);
        return NULL;
    }
    while (got < (size_t)st.st_size) {
        ssize_t r = read(fd, data + got, (size_t)st.st_size - got);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) break;
        got += (size_t)r;
    }
    close(fd);
    data[got] = '\0';
    k = mp_dkim_key_from_pem(data, got, path, err, errlen);
    OPENSSL_cleanse(data, got);
    free(data);
    return k;
}

mp_dkim_key *mp_dkim_key_ref(mp_dkim_key *k)
{
    __atomic_add_fetch(&k->refs, 1, __ATOMIC_RELAXED);
    return k;
}

void mp_dkim_key_unref(mp_dkim_key *k)
{
    if (k && __atomic_sub_fetch(&k->refs, 1, __ATOMIC_ACQ_REL) == 0) key_free(k);
}

int mp_dkim_key_type(const mp_dkim_key *k) { return k->type; }
int mp_dkim_key_bits(const mp_dkim_key *k) { return k->bits; }
const char *mp_dkim_key_public(const mp_dkim_key *k) { return k->pub; }
const char *mp_dkim_key_name(const mp_dkim_key *k) { return k->name; }

/* ---- libopendkim library handles ------------------------------------------------------------ */

/* Oversigning and x= are options of a DKIM_LIB, not of a handle, so each
 * distinct setting gets one library handle, created once and shared by all
 * threads (libopendkim only reads it while signing). */
typedef struct signlib {
    char *key;
    DKIM_LIB *lib;
} signlib;

static pthread_mutex_t libs_lock = PTHREAD_MUTEX_INITIALIZER;
static signlib libs[MP_DKIM_MAX_LIBS];
static int nlibs;

static DKIM_LIB *sign_lib(char *const *oversign, size_t n, uint64_t ttl, char *err, size_t errlen)
{
    buf key = {0};
    DKIM_LIB *lib = NULL;
    char num[32];
    size_t i;
    int j;
    snprintf(num, sizeof num, "%llu", (unsigned long long)ttl);
    b_adds(&key, num);
    for (i = 0; i < n; i++) {
        b_addc(&key, ':');
        b_adds(&key, oversign[i]);
    }
    if (key.oom) {
        free(key.p);
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    pthread_mutex_lock(&libs_lock);
    for (j = 0; j < nlibs; j++) {
        if (strcmp(libs[j].key, key.p) == 0) {
            lib = libs[j].lib;
            break;
        }
    }
    if (lib == NULL) {
        if (nlibs == MP_DKIM_MAX_LIBS) {
            snprintf(err, errlen, "more than %d distinct oversign/expire settings", MP_DKIM_MAX_LIBS);
        } else if ((lib = dkim_init(NULL, NULL)) == NULL) {
            snprintf(err, errlen, "dkim_init failed");
        } else {
            const char *os[MP_DKIM_MAX_HEADERS + 1];
            int bad = 0;
            for (i = 0; i < n && i < MP_DKIM_MAX_HEADERS; i++) os[i] = oversign[i];
            os[i] = NULL;
            if (n > 0 && dkim_options(lib, DKIM_OP_SETOPT, DKIM_OPTS_OVERSIGNHDRS, os, sizeof(char **)) != DKIM_STAT_OK)
                bad = 1;
            if (ttl > 0 && dkim_options(lib, DKIM_OP_SETOPT, DKIM_OPTS_SIGNATURETTL, &ttl, sizeof ttl) != DKIM_STAT_OK)
                bad = 1;
            if (bad) {
                dkim_close(lib);
                lib = NULL;
                snprintf(err, errlen, "dkim_options failed");
            } else {
                libs[nlibs].key = key.p;
                libs[nlibs].lib = lib;
                key.p = NULL;
                nlibs++;
            }
        }
    }
    pthread_mutex_unlock(&libs_lock);
    free(key.p);
    return lib;
}

/* ---- signing jobs ------------------------------------------------------------------------------ */

typedef struct spec {
    mp_dkim_key *key;
    char *domain, *selector, *identity;
    int hcanon, bcanon;
    char **headers, **oversign;
    size_t nheaders, noversign;
    int lists_static; /* headers and oversign borrowed (mp_dkim_spec_in) */
    uint64_t expire;
    int timestamp;
    DKIM_LIB *lib;   /* NULL: the native engine */
} spec;

struct mp_dkim_job {
    mp_workq_item item;   /* first: the signer's queue links jobs through it */
    char *msg;
    size_t len;
    int nspecs;
    char *result, *error;
    size_t result_len;
    spec specs[];
};

/* The number of bare CR and bare LF in msg: each becomes CRLF on the wire. */
static size_t count_bare(const char *msg, size_t len)
{
    size_t n = 0;
    const char *p = msg, *end = msg + len;
    while ((p = memchr(p, '\n', (size_t)(end - p))) != NULL) {
        if (p == msg || p[-1] != '\r') n++;
        p++;
    }
    for (p = msg; (p = memchr(p, '\r', (size_t)(end - p))) != NULL; p++) {
        if (p + 1 == end || p[1] != '\n') n++;
    }
    return n;
}

mp_dkim_job *mp_dkim_job_new(const char *msg, size_t len, int nspecs)
{
    mp_dkim_job *j;
    size_t bare;
    if (nspecs < 1 || nspecs > MP_DKIM_MAX_SPECS) return NULL;
    j = calloc(1, sizeof *j + (size_t)nspecs * sizeof(spec));
    if (j == NULL) return NULL;
    /* What is signed is the message as it goes on the wire: Moonpost's
     * client (and any SMTP client) sends a bare CR or LF as CRLF, and ends
     * the message with CRLF before the final dot. A message received over
     * SMTP or the API has none (they are normalized there); one made in Lua
     * may. libopendkim also refuses a message without the final CRLF. */
    bare = count_bare(msg, len);
    j->msg = malloc(len + bare + 2);
    if (j->msg == NULL) {
        free(j);
        return NULL;
    }
    if (bare == 0) {
        memcpy(j->msg, msg, len);
    } else {
        size_t i, o = 0;
        for (i = 0; i < len; i++) {
            char c = msg[i];
            if (c == '\n' && (i == 0 || msg[i - 1] != '\r')) {
                j->msg[o++] = '\r';
            }
            j->msg[o++] = c;
            if (c == '\r' && (i + 1 == len || msg[i + 1] != '\n')) j->msg[o++] = '\n';
        }
        len = o;
    }
    if (len > 0 && j->msg[len - 1] != '\n') {
        memcpy(j->msg + len, "\r\n", 2);
        len += 2;
    }
    j->len = len;
    j->nspecs = nspecs;
    return j;
}

static int lower_c(int c) { return c >= 'A' && c <= 'Z' ? c + 32 : c; }

/* name (len octets) is one of names, lower-case or not (names are
 * lower-case: copy_list or lists_static) */
static int listed(char *const *names, size_t n, const char *name, size_t len)
{
    size_t i;
    int first;
    if (len == 0) return 0;
    first = lower_c((unsigned char)name[0]);
    /* the length first: name may hold a NUL, where strncasecmp would stop */
    for (i = 0; i < n; i++)
        if (names[i][0] == first && strlen(names[i]) == len && strncasecmp(names[i], name, len) == 0) return 1;
    return 0;
}

static void free_list(char **l, size_t n)
{
    size_t i;
    if (l == NULL) return;
    for (i = 0; i < n; i++) free(l[i]);
    free(l);
}

static char **copy_list(const char *const *in, size_t n)
{
    char **l = calloc(n + 1, sizeof *l);
    size_t i;
    if (l == NULL) return NULL;
    for (i = 0; i < n; i++) {
        if ((l[i] = lowerdup(in[i])) == NULL) {
            free_list(l, i);
            return NULL;
        }
    }
    return l;
}

int mp_dkim_job_set(mp_dkim_job *j, int i, const mp_dkim_spec_in *in, char *err, size_t errlen)
{
    spec *s;
    if (i < 0 || i >= j->nspecs || j->specs[i].key != NULL) {
        snprintf(err, errlen, "bad spec index");
        return -1;
    }
    s = &j->specs[i];
    s->domain = strdup(in->domain);
    s->selector = strdup(in->selector);
    s->identity = in->identity ? strdup(in->identity) : NULL;
    s->nheaders = in->nheaders;
    s->lists_static = in->lists_static;
    if (in->lists_static) {
        /* the defaults: nothing to copy, nothing to add to h= */
        s->headers = (char **)in->headers;
        s->oversign = (char **)in->oversign;
    } else {
        s->headers = copy_list(in->headers, in->nheaders);
        s->oversign = copy_list(in->oversign, in->noversign);
    }
    /* An oversigned name is signed too: libopendkim lists it in h= without
     * hashing it, which breaks the signature when such a field is present
     * but not signed. */
    if (!s->lists_static && s->headers && s->oversign) {
        size_t k, extra = 0;
        char **all;
        for (k = 0; k < in->noversign; k++)
            if (!listed(s->headers, s->nheaders, s->oversign[k], strlen(s->oversign[k]))) extra++;
        all = extra ? realloc(s->headers, (s->nheaders + extra + 1) * sizeof *all) : s->headers;
        if (all == NULL) {
            snprintf(err, errlen, "out of memory");
            return -1;
        }
        s->headers = all;
        for (k = 0; k < in->noversign; k++) {
            if (!listed(s->headers, s->nheaders, s->oversign[k], strlen(s->oversign[k]))) {
                if ((s->headers[s->nheaders] = strdup(s->oversign[k])) == NULL) {
                    snprintf(err, errlen, "out of memory");
                    return -1;
                }
                s->nheaders++;
            }
        }
        s->headers[s->nheaders] = NULL;
    }
    s->noversign = in->noversign;
    s->hcanon = in->hcanon;
    s->bcanon = in->bcanon;
    s->expire = in->expire;
    s->timestamp = in->timestamp;
    s->key = mp_dkim_key_ref(in->key);
    if (!s->domain || !s->selector || (in->identity && !s->identity) || !s->headers || !s->oversign) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    /* libopendkim signs RSA unless asked otherwise; it cannot leave out t=,
     * and Ed25519 is signed natively (see docs/dkim.md) */
    if (s->key->type == MP_DKIM_RSA && in->engine == MP_ENGINE_LIBOPENDKIM && in->timestamp) {
        s->lib = sign_lib(s->oversign, s->noversign, s->expire, err, errlen);
        if (s->lib == NULL) return -1;
    }
    return 0;
}

void mp_dkim_job_free(mp_dkim_job *j)
{
    int i;
    if (j == NULL) return;
    for (i = 0; i < j->nspecs; i++) {
        spec *s = &j->specs[i];
        free(s->domain);
        free(s->selector);
        free(s->identity);
        if (!s->lists_static) {
            free_list(s->headers, s->nheaders);
            free_list(s->oversign, s->noversign);
        }
        mp_dkim_key_unref(s->key);
    }
    free(j->msg);
    free(j->result);
    free(j->error);
    free(j);
}

uint64_t mp_dkim_job_id(const mp_dkim_job *j) { return j->item.id; }
mp_dkim_job *mp_dkim_job_next(const mp_dkim_job *j) { return (mp_dkim_job *)j->item.next; }
const char *mp_dkim_job_error(const mp_dkim_job *j) { return j->error; }

const char *mp_dkim_job_result(const mp_dkim_job *j, size_t *len)
{
    if (len) *len = j->result_len;
    return j->result;
}

/* The header fields of the message, in order. */
typedef struct fields {
    mp_hdr_field *f;
    size_t n, cap;
    size_t body;
} fields;

static int split(const char *msg, size_t len, fields *out)
{
    mp_hdr_iter it;
    mp_hdr_field f;
    out->f = NULL;
    out->n = out->cap = 0;
    mp_hdr_init(&it, msg, len);
    while (mp_hdr_next(&it, &f)) {
        if (out->n == out->cap) {
            size_t cap = out->cap ? out->cap * 2 : 32;
            mp_hdr_field *nf = realloc(out->f, cap * sizeof *nf);
            if (nf == NULL) return -1;
            out->f = nf;
            out->cap = cap;
        }
        out->f[out->n++] = f;
    }
    out->body = it.body;
    return 0;
}


/* ---- the native engine: canonicalization (RFC 6376 3.4) and signing --------------------- */

static void canon_header(buf *out, const char *text, size_t len, size_t name_len, int canon, int crlf)
{
    size_t i;
    int space = 0, started = 0;
    char *o;
    if (canon == MP_CANON_SIMPLE) {
        b_add(out, text, len);
        if (crlf) b_add(out, "\r\n", 2);
        return;
    }
    /* relaxed output is never longer than the field, plus the CRLF */
    if ((o = b_reserve(out, len + 3)) == NULL) return;
    for (i = 0; i < name_len; i++) *o++ = (char)lower_c((unsigned char)text[i]);
    *o++ = ':';
    i = (size_t)((const char *)memchr(text, ':', len) - text) + 1;
    /* unfold, turn runs of WSP into one SP, drop WSP at both ends */
    for (; i < len; i++) {
        unsigned char c = (unsigned char)text[i];
        if (c == '\r' || c == '\n') continue;
        if (is_wsp(c)) {
            space = started;
            continue;
        }
        if (space) *o++ = ' ';
        space = 0;
        started = 1;
        *o++ = (char)c;
    }
    if (crlf) {
        *o++ = '\r';
        *o++ = '\n';
    }
    *o = '\0';
    out->len = (size_t)(o - out->p);
}

static void md_update(EVP_MD_CTX *md, const char *p, size_t n)
{
    if (n) EVP_DigestUpdate(md, p, n);
}

/* Where a canonical body goes: into a digest, and counted (the verifier
 * counts the octets a signature's l= leaves out). */
typedef struct body_out {
    EVP_MD_CTX *md; /* or NULL: only counted */
    size_t n;
} body_out;

static void bo_put(body_out *o, const char *p, size_t n)
{
    if (o->md && n) EVP_DigestUpdate(o->md, p, n);
    o->n += n;
}

/* The body hash: empty lines at the end are dropped, a missing final CRLF
 * is added; relaxed also squeezes WSP. */
static void canon_body(body_out *md, const char *body, size_t len, int canon)
{
    size_t p = 0, empties = 0;
    int any = 0;
    while (p < len) {
        const char *line = body + p, *nl = NULL;
        size_t n, next, k;
        const char *q = line;
        /* a line ends at CRLF; a bare CR or LF is data */
        for (;;) {
            q = memchr(q, '\r', (size_t)(body + len - q));
            if (q == NULL || q + 1 >= body + len) break;
            if (q[1] == '\n') {
                nl = q;
                break;
            }
            q++;
        }
        n = nl ? (size_t)(nl - line) : len - p;
        next = nl ? p + n + 2 : len;
        if (canon == MP_CANON_RELAXED && nl && n > 0 && !memchr(line, ' ', n) && !memchr(line, '\t', n)) {
            /* no WSP: the line, with its CRLF, is its own canonical form */
            for (; empties > 0; empties--) bo_put(md, "\r\n", 2);
            bo_put(md, line, n + 2);
            any = 1;
        } else if (canon == MP_CANON_RELAXED) {
            size_t e = n;
            while (e > 0 && is_wsp((unsigned char)line[e - 1])) e--;
            if (e == 0) {
                empties++;
            } else {
                size_t s = 0;
                for (; empties > 0; empties--) bo_put(md, "\r\n", 2);
                for (k = 0; k < e; k++) {
                    if (is_wsp((unsigned char)line[k])) {
                        bo_put(md, line + s, k - s);
                        bo_put(md, " ", 1);
                        while (k + 1 < e && is_wsp((unsigned char)line[k + 1])) k++;
                        s = k + 1;
                    }
                }
                bo_put(md, line + s, e - s);
                bo_put(md, "\r\n", 2);
                any = 1;
            }
        } else {
            if (n == 0) {
                empties++;
            } else {
                for (; empties > 0; empties--) bo_put(md, "\r\n", 2);
                bo_put(md, line, n);
                bo_put(md, "\r\n", 2);
                any = 1;
            }
        }
        p = next;
    }
    if (!any && canon == MP_CANON_SIMPLE) bo_put(md, "\r\n", 2);
}

/* Fold the tags into the signature field, lines within MP_DKIM_MARGIN
 * columns (a tab counts 8, as libopendkim counts it). "b=" always starts a
 * line of its own, so the field that is hashed (b= empty) and the field
 * that is written differ only in the value of b=. */
static void fold(buf *out, char **tags, int n, const char *bvalue)
{
    size_t col = HDR_PREFIX_LEN;
    int i;
    for (i = 0; i < n; i++) {
        const char *t = tags[i];
        size_t len = strlen(t) + 1; /* with ';' */
        if (i == 0) {
            b_adds(out, t);
            b_addc(out, ';');
            col += len;
        } else if (col + 1 + len <= MP_DKIM_MARGIN) {
            b_addc(out, ' ');
            b_adds(out, t);
            b_addc(out, ';');
            col += 1 + len;
        } else {
            b_add(out, "\r\n\t", 3);
            col = 8;
            if (col + len <= MP_DKIM_MARGIN) {
                b_adds(out, t);
                b_addc(out, ';');
                col += len;
            } else if (t[0] == 'h' && t[1] == '=') {
                /* h= breaks after a colon */
                const char *p = t;
                while (*p) {
                    const char *c = strchr(p, ':');
                    size_t l = c ? (size_t)(c - p) + 1 : strlen(p) + 1;
                    if (col + l > MP_DKIM_MARGIN && p != t) {
                        b_add(out, "\r\n\t ", 4);
                        col = 9;
                    }
                    if (c) b_add(out, p, l);
                    else {
                        b_adds(out, p);
                        b_addc(out, ';');
                    }
                    col += l;
                    p += c ? l : l - 1;
                }
            } else {
                b_adds(out, t);
                b_addc(out, ';');
                col += len;
            }
        }
    }
    b_add(out, "\r\n\tb=", 5);
    col = 10;
    while (*bvalue) {
        size_t room, l = strlen(bvalue);
        if (col >= MP_DKIM_MARGIN) {
            b_add(out, "\r\n\t ", 4);
            col = 9;
        }
        room = MP_DKIM_MARGIN - col;
        if (l > room) l = room;
        b_add(out, bvalue, l);
        bvalue += l;
        col += l;
    }
}

static char *tagf(const char *fmt, const char *a, const char *b)
{
    size_t n = strlen(fmt) + strlen(a) + (b ? strlen(b) : 0) + 1;
    char *p = malloc(n);
    if (p) snprintf(p, n, fmt, a, b ? b : "");
    return p;
}

static int sign_native(const spec *s, const fields *fl, const char *msg, size_t msglen, buf *out, char *err,
                       size_t errlen)
{
    static const char *const canons[] = {"simple", "relaxed"};
    EVP_MD_CTX *md = EVP_MD_CTX_new();
    unsigned char bh[32], hh[32], sig[1024];
    size_t siglen = sizeof sig, i, k;
    char *tags[12] = {0}, *bh64 = NULL, *sig64 = NULL, num[32];
    char *used = NULL;
    buf hlist = {0}, tmp = {0}, field = {0};
    int nt = 0, rc = -1;
    const char *alg = s->key->type == MP_DKIM_RSA ? "rsa-sha256" : "ed25519-sha256";
    uint64_t now = (uint64_t)time(NULL);
    if (md == NULL) goto oom;
    for (i = 0; i < fl->n; i++)
        if (field_is(&fl->f[i], "from")) break;
    if (i == fl->n) {
        snprintf(err, errlen, "message has no From field");
        goto done;
    }
    /* body hash */
    if (EVP_DigestInit_ex(md, EVP_sha256(), NULL) != 1) goto ssl;
    {
        body_out bo = {md, 0};
        canon_body(&bo, msg + fl->body, msglen - fl->body, s->bcanon);
    }
    if (EVP_DigestFinal_ex(md, bh, NULL) != 1) goto ssl;
    if ((bh64 = b64(bh, sizeof bh)) == NULL) goto oom;
    /* h=: the listed fields present, top to bottom, then the oversigned names */
    for (i = 0; i < fl->n; i++) {
        const mp_hdr_field *f = &fl->f[i];
        if (f->name_len && listed(s->headers, s->nheaders, f->text, f->name_len)) {
            if (hlist.len) b_addc(&hlist, ':');
            b_add(&hlist, f->text, f->name_len);
        }
    }
    for (i = 0; i < s->noversign; i++) {
        if (hlist.len) b_addc(&hlist, ':');
        b_adds(&hlist, s->oversign[i]);
    }
    if (hlist.oom) goto oom;
    /* the tags, in libopendkim's order */
    tags[nt++] = tagf("v=1", "", NULL);
    tags[nt++] = tagf("a=%s", alg, NULL);
    tags[nt++] = tagf("c=%s/%s", canons[s->hcanon], canons[s->bcanon]);
    tags[nt++] = tagf("d=%s", s->domain, NULL);
    tags[nt++] = tagf("s=%s", s->selector, NULL);
    if (s->timestamp) {
        snprintf(num, sizeof num, "%llu", (unsigned long long)now);
        tags[nt++] = tagf("t=%s", num, NULL);
    }
    if (s->expire) {
        snprintf(num, sizeof num, "%llu", (unsigned long long)(now + s->expire));
        tags[nt++] = tagf("x=%s", num, NULL);
    }
    if (s->identity) tags[nt++] = tagf("i=%s", s->identity, NULL);
    tags[nt++] = tagf("bh=%s", bh64, NULL);
    tags[nt++] = tagf("h=%s", hlist.p, NULL);
    for (i = 0; i < (size_t)nt; i++)
        if (tags[i] == NULL) goto oom;
    /* header hash: each name of h= takes the lowest field of that name not
     * yet taken (RFC 6376 5.4.2), then the signature field with b= empty */
    used = calloc(fl->n + 1, 1);
    if (used == NULL) goto oom;
    if (EVP_DigestInit_ex(md, EVP_sha256(), NULL) != 1) goto ssl;
    {
        const char *p = hlist.p;
        while (p && *p) {
            const char *c = strchr(p, ':');
            size_t l = c ? (size_t)(c - p) : strlen(p);
            for (k = fl->n; k-- > 0;) {
                const mp_hdr_field *f = &fl->f[k];
                if (!used[k] && f->name_len && eq_ci(f->text, f->name_len, p, l)) {
                    used[k] = 1;
                    tmp.len = 0;
                    canon_header(&tmp, f->text, f->len, f->name_len, s->hcanon, 1);
                    if (tmp.oom) goto oom;
                    md_update(md, tmp.p, tmp.len);
                    break;
                }
            }
            p = c ? c + 1 : NULL;
        }
    }
    b_adds(&field, HDR_PREFIX);
    fold(&field, tags, nt, "");
    tmp.len = 0;
    canon_header(&tmp, field.p, field.len, strlen(HDR_NAME), s->hcanon, 0);
    if (tmp.oom || field.oom) goto oom;
    md_update(md, tmp.p, tmp.len);
    if (EVP_DigestFinal_ex(md, hh, NULL) != 1) goto ssl;
    /* RFC 8463 3: Ed25519 (PureEdDSA) signs the SHA-256 hash; RSA signs it
     * with PKCS#1 v1.5 */
    if (s->key->type == MP_DKIM_ED25519 && s->key->has_sk) {
        unsigned long long sl = 0;
        if (crypto_sign_detached(sig, &sl, hh, sizeof hh, s->key->ed_sk) != 0) goto ssl;
        siglen = (size_t)sl;
    } else if (s->key->type == MP_DKIM_ED25519) {
        EVP_MD_CTX *sctx = EVP_MD_CTX_new();
        int ok = sctx && EVP_DigestSignInit(sctx, NULL, NULL, NULL, s->key->pkey) == 1 &&
                 EVP_DigestSign(sctx, sig, &siglen, hh, sizeof hh) == 1;
        EVP_MD_CTX_free(sctx);
        if (!ok) goto ssl;
    } else {
        EVP_PKEY_CTX *pctx = EVP_PKEY_CTX_new(s->key->pkey, NULL);
        int ok = pctx && EVP_PKEY_sign_init(pctx) == 1 &&
                 EVP_PKEY_CTX_set_rsa_padding(pctx, RSA_PKCS1_PADDING) == 1 &&
                 EVP_PKEY_CTX_set_signature_md(pctx, EVP_sha256()) == 1 &&
                 EVP_PKEY_sign(pctx, sig, &siglen, hh, sizeof hh) == 1;
        EVP_PKEY_CTX_free(pctx);
        if (!ok) goto ssl;
    }
    if ((sig64 = b64(sig, siglen)) == NULL) goto oom;
    b_adds(out, HDR_PREFIX);
    fold(out, tags, nt, sig64);
    b_add(out, "\r\n", 2);
    rc = out->oom ? -1 : 0;
    if (rc) snprintf(err, errlen, "out of memory");
    goto done;
ssl:
    snprintf(err, errlen, "signing failed: %s", ERR_reason_error_string(ERR_peek_last_error()) ?
             ERR_reason_error_string(ERR_peek_last_error()) : "OpenSSL error");
    ERR_clear_error();
    goto done;
oom:
    snprintf(err, errlen, "out of memory");
done:
    EVP_MD_CTX_free(md);
    for (i = 0; i < (size_t)nt; i++) free(tags[i]);
    free(bh64);
    free(sig64);
    free(used);
    free(hlist.p);
    free(tmp.p);
    free(field.p);
    return rc;
}

/* ---- the libopendkim engine --------------------------------------------------------------------- */

static int sign_libopendkim(const spec *s, const fields *fl, const char *msg, size_t msglen, buf *out, char *err,
                            size_t errlen)
{
    DKIM_STAT st;
    DKIM *d;
    const char *hdrs[2 * MP_DKIM_MAX_HEADERS + 1];
    unsigned char *sighdr = NULL;
    size_t sighdr_len = 0, i;
    int rc = -1;
    if (fl->body > 0 && memchr(msg, '\0', fl->body < msglen ? fl->body : msglen) != NULL) {
        /* see mp_dkim_verify: libopendkim cannot take a NUL in a header */
        snprintf(err, errlen, "message header contains a NUL octet");
        return -1;
    }
    d = dkim_sign(s->lib, (const unsigned char *)"moonpost", NULL, (dkim_sigkey_t)s->key->pem,
                  (const unsigned char *)s->selector, (const unsigned char *)s->domain, s->hcanon, s->bcanon,
                  DKIM_SIGN_RSASHA256, -1, &st);
    if (d == NULL) {
        snprintf(err, errlen, "dkim_sign: %s", dkim_getresultstr(st));
        return -1;
    }
    for (i = 0; i < s->nheaders && i < 2 * MP_DKIM_MAX_HEADERS; i++) hdrs[i] = s->headers[i];
    hdrs[i] = NULL;
    if ((st = dkim_set_margin(d, MP_DKIM_MARGIN)) != DKIM_STAT_OK || (st = dkim_signhdrs(d, hdrs)) != DKIM_STAT_OK ||
        (s->identity && (st = dkim_set_signer(d, (const unsigned char *)s->identity)) != DKIM_STAT_OK))
        goto fail;
    for (i = 0; i < fl->n; i++) {
        st = dkim_header(d, (unsigned char *)fl->f[i].text, fl->f[i].len);
        if (st != DKIM_STAT_OK) goto fail;
    }
    if ((st = dkim_eoh(d)) != DKIM_STAT_OK) goto fail;
    if (msglen > fl->body && (st = dkim_body(d, (unsigned char *)msg + fl->body, msglen - fl->body)) != DKIM_STAT_OK)
        goto fail;
    if ((st = dkim_eom(d, NULL)) != DKIM_STAT_OK) goto fail;
    if ((st = dkim_getsighdr_d(d, HDR_PREFIX_LEN, &sighdr, &sighdr_len)) != DKIM_STAT_OK) goto fail;
    b_adds(out, HDR_PREFIX);
    b_add(out, sighdr, sighdr_len);
    b_add(out, "\r\n", 2);
    rc = out->oom ? -1 : 0;
    if (rc) snprintf(err, errlen, "out of memory");
    dkim_free(d);
    return rc;
fail:
    snprintf(err, errlen, "libopendkim: %s%s%s", dkim_getresultstr(st), dkim_geterror(d) ? ": " : "",
             dkim_geterror(d) ? dkim_geterror(d) : "");
    dkim_free(d);
    return -1;
}

void mp_dkim_job_run(mp_dkim_job *j)
{
    fields fl;
    buf out = {0};
    char err[256];
    int i;
    if (split(j->msg, j->len, &fl) != 0) {
        free(fl.f);
        j->error = strdup("out of memory");
        return;
    }
    for (i = 0; i < j->nspecs; i++) {
        const spec *s = &j->specs[i];
        int rc = s->lib ? sign_libopendkim(s, &fl, j->msg, j->len, &out, err, sizeof err)
                        : sign_native(s, &fl, j->msg, j->len, &out, err, sizeof err);
        if (rc != 0) {
            char msg[400];
            snprintf(msg, sizeof msg, "%s/%s: %s", s->domain, s->selector, err);
            j->error = strdup(msg);
            free(out.p);
            free(fl.f);
            return;
        }
    }
    free(fl.f);
    j->result = out.p;
    j->result_len = out.len;
    if (j->result == NULL) j->result = strdup("");
}

/* ---- the signer ----------------------------------------------------------------------------------- */

static void run_job(mp_workq_item *it) { mp_dkim_job_run((mp_dkim_job *)it); }
static void drop_job(mp_workq_item *it) { mp_dkim_job_free((mp_dkim_job *)it); }

mp_workq *mp_dkim_signer_new(int threads, int *err)
{
    if (threads < 1 || threads > MP_DKIM_MAX_THREADS) {
        *err = EINVAL;
        return NULL;
    }
    return mp_workq_new(threads, MP_DKIM_MAX_QUEUE, run_job, drop_job, err);
}

int mp_dkim_signer_submit(mp_workq *s, mp_dkim_job *j, uint64_t *id) { return mp_workq_submit(s, &j->item, id); }

mp_dkim_job *mp_dkim_signer_collect(mp_workq *s) { return (mp_dkim_job *)mp_workq_collect(s, SIZE_MAX); }

/* ---- verification ------------------------------------------------------------------------------------ */

typedef struct vctx {
    const mp_dkim_keyrec *keys;
    size_t nkeys;
    int from_fields; /* From fields in the message's header */
    const char *body; /* the body, for what l= leaves out */
    size_t body_len;
} vctx;

static const mp_dkim_keyrec *find_key(const vctx *c, const char *selector, const char *domain)
{
    size_t sl = strlen(selector), dl = strlen(domain), i;
    for (i = 0; i < c->nkeys; i++) {
        const char *q = c->keys[i].query;
        size_t ql = strlen(q);
        if (ql == sl + 12 + dl && strncasecmp(q, selector, sl) == 0 && strncasecmp(q + sl, "._domainkey.", 12) == 0 &&
            strncasecmp(q + sl + 12, domain, dl) == 0)
            return &c->keys[i];
    }
    return NULL;
}

/* The keys come from the caller, fetched before verification started.
 * Every miss is "not found" to libopendkim: a "try again" would end the
 * whole message's processing, and judge() tells the two apart from the
 * caller's table anyway. */
static DKIM_CBSTAT v_lookup(DKIM *d, DKIM_SIGINFO *sig, unsigned char *out, size_t outlen)
{
    const vctx *c = dkim_get_user_context(d);
    const unsigned char *sel = dkim_sig_getselector(sig), *dom = dkim_sig_getdomain(sig);
    const mp_dkim_keyrec *k;
    if (c == NULL || sel == NULL || dom == NULL) return DKIM_CBSTAT_NOTFOUND;
    k = find_key(c, (const char *)sel, (const char *)dom);
    if (k == NULL || k->state != MP_KEY_FOUND || k->txt == NULL || strlen(k->txt) >= outlen)
        return DKIM_CBSTAT_NOTFOUND;
    memcpy(out, k->txt, strlen(k->txt) + 1);
    return DKIM_CBSTAT_CONTINUE;
}

/* Bounds the work one message can cause. */
static DKIM_CBSTAT v_prescreen(DKIM *d, DKIM_SIGINFO **sigs, int nsigs)
{
    int i;
    (void)d;
    for (i = MP_DKIM_MAX_SIGS; i < nsigs; i++) dkim_sig_ignore(sigs[i]);
    return DKIM_CBSTAT_CONTINUE;
}

static pthread_once_t vonce = PTHREAD_ONCE_INIT;
static DKIM_LIB *vlib;

static void vlib_init(void)
{
    uint32_t flags = DKIM_LIBFLAGS_BADSIGHANDLES | DKIM_LIBFLAGS_FIXCRLF;
    vlib = dkim_init(NULL, NULL);
    if (vlib == NULL) return;
    dkim_options(vlib, DKIM_OP_SETOPT, DKIM_OPTS_FLAGS, &flags, sizeof flags);
    dkim_set_key_lookup(vlib, v_lookup);
    dkim_set_prescreen(vlib, v_prescreen);
}

static void header_b8(DKIM_SIGINFO *s, char out[9])
{
    unsigned char *b = dkim_sig_gettagvalue(s, 0, (unsigned char *)"b");
    size_t k = 0;
    if (b)
        for (; *b && k < 8; b++)
            if (!is_fws(*b)) out[k++] = (char)*b;
    out[k] = '\0';
}

/* Errors of the signature itself (RFC 6376 6.1.1): found before any key is
 * needed, so a missing or unanswered key does not make them temporary. */
static int sig_error(int e)
{
    switch (e) {
    case DKIM_SIGERROR_VERSION: case DKIM_SIGERROR_DOMAIN: case DKIM_SIGERROR_EXPIRED:
    case DKIM_SIGERROR_FUTURE: case DKIM_SIGERROR_TIMESTAMPS: case DKIM_SIGERROR_INVALID_HC:
    case DKIM_SIGERROR_INVALID_BC: case DKIM_SIGERROR_MISSING_A: case DKIM_SIGERROR_INVALID_A:
    case DKIM_SIGERROR_MISSING_H: case DKIM_SIGERROR_INVALID_L: case DKIM_SIGERROR_INVALID_Q:
    case DKIM_SIGERROR_INVALID_QO: case DKIM_SIGERROR_MISSING_D: case DKIM_SIGERROR_EMPTY_D:
    case DKIM_SIGERROR_MISSING_S: case DKIM_SIGERROR_EMPTY_S: case DKIM_SIGERROR_MISSING_B:
    case DKIM_SIGERROR_EMPTY_B: case DKIM_SIGERROR_CORRUPT_B: case DKIM_SIGERROR_MISSING_BH:
    case DKIM_SIGERROR_EMPTY_BH: case DKIM_SIGERROR_CORRUPT_BH: case DKIM_SIGERROR_SUBDOMAIN:
    case DKIM_SIGERROR_EMPTY_H: case DKIM_SIGERROR_INVALID_H: case DKIM_SIGERROR_TOOLARGE_L:
    case DKIM_SIGERROR_MISSING_V: case DKIM_SIGERROR_EMPTY_V:
        return 1;
    default:
        return 0;
    }
}

/* RFC 6376 3.6.1 and 6.1.2 step 8: the key record's k= (rsa when absent)
 * must be the family of the signature's a= (rsa-*, ed25519-*). libopendkim
 * does not check it: an RSA key published as k=ed25519 verified an RSA
 * signature. 0 when they match, else the reason in why. */
static int key_type_mismatch(const char *txt, const char *alg, char *why, size_t whylen)
{
    mp_tag tags[MP_DKIM_MAX_TAGS];
    const char *terr = NULL;
    const mp_tag *kt;
    const char *type = "rsa";
    size_t type_len = 3, fam_len;
    const char *dash = strchr(alg, '-');
    int n = mp_dkim_tags(txt, strlen(txt), tags, MP_DKIM_MAX_TAGS, &terr);
    if (n < 0) return 0; /* libopendkim judges a broken record itself */
    kt = tag_get(tags, n, "k");
    if (kt) {
        type = kt->value;
        type_len = kt->value_len;
    }
    fam_len = dash ? (size_t)(dash - alg) : strlen(alg);
    if (type_len == fam_len && strncasecmp(type, alg, fam_len) == 0) return 0;
    snprintf(why, whylen, "key type k=%.*s does not fit a=%s", (int)(type_len < 32 ? type_len : 32), type, alg);
    return 1;
}

static void judge(DKIM *d, DKIM_SIGINFO *s, const vctx *c, mp_dkim_result *r, int ignored)
{
    unsigned int fl = dkim_sig_getflags(s);
    int bh = dkim_sig_getbh(s), e = dkim_sig_geterror(s);
    const mp_dkim_keyrec *k = find_key(c, r->sig.selector, r->sig.domain);
    r->testing = (fl & DKIM_SIGFLAG_TESTKEY) != 0;
    if (ignored || (fl & DKIM_SIGFLAG_IGNORE)) {
        r->result = "policy";
        snprintf(r->reason, sizeof r->reason, "more than %d signatures", MP_DKIM_MAX_SIGS);
    } else if ((fl & DKIM_SIGFLAG_PASSED) && bh == DKIM_SIGBH_MATCH && e == DKIM_SIGERROR_OK) {
        if (strcasecmp(r->sig.algorithm, "rsa-sha1") == 0) {
            r->result = "policy";
            snprintf(r->reason, sizeof r->reason, "rsa-sha1 is not accepted (RFC 8301)");
        } else if (k && k->txt && key_type_mismatch(k->txt, r->sig.algorithm, r->reason, sizeof r->reason)) {
            r->result = "permerror";
        } else if (c->from_fields > r->sig.h_from) {
            /* RFC 6376 8.15: a From the signature does not cover, beside the
             * one it does (RFC 5322 allows one): which one a reader sees is
             * not known, so the signature says nothing of the author */
            r->result = "permerror";
            snprintf(r->reason, sizeof r->reason, "%d From fields, %d signed (h= must list From as often)",
                     c->from_fields, r->sig.h_from);
        } else {
            /* RFC 6376 8.2: with l=, octets appended after signing pass too;
             * say how many, so that a policy can refuse such a pass */
            ssize_t msglen = 0, canonlen = 0, signlen = -1;
            r->result = "pass";
            /* libopendkim stops canonicalizing at l=: the whole body's
             * canonical length is counted here */
            if (dkim_sig_getcanonlen(d, s, &msglen, &canonlen, &signlen) == DKIM_STAT_OK && signlen >= 0) {
                dkim_canon_t hc, bc = DKIM_CANON_SIMPLE;
                body_out bo = {NULL, 0};
                dkim_sig_getcanons(s, &hc, &bc);
                canon_body(&bo, c->body, c->body_len, bc == DKIM_CANON_RELAXED ? MP_CANON_RELAXED : MP_CANON_SIMPLE);
                if (bo.n > (size_t)signlen) r->body_unsigned = (long long)(bo.n - (size_t)signlen);
            }
        }
    } else if (sig_error(e)) {
        const char *why = dkim_sig_geterrorstr(e);
        r->result = "permerror";
        snprintf(r->reason, sizeof r->reason, "%s", why ? why : "invalid signature");
    } else if (k == NULL || k->state == MP_KEY_TEMP) {
        r->result = "temperror";
        snprintf(r->reason, sizeof r->reason, "no answer for the key (%s._domainkey.%s)", r->sig.selector,
                 r->sig.domain);
    } else if (k->state == MP_KEY_FOUND && k->txt && strlen(k->txt) >= MP_DKIM_MAX_KEYTXT) {
        r->result = "permerror";
        snprintf(r->reason, sizeof r->reason, "key record longer than %d bytes", MP_DKIM_MAX_KEYTXT - 1);
    } else if (k->state == MP_KEY_NONE || e == DKIM_SIGERROR_NOKEY) {
        r->result = "permerror";
        snprintf(r->reason, sizeof r->reason, "no key for signature (%s._domainkey.%s)", r->sig.selector,
                 r->sig.domain);
    } else if (e == DKIM_SIGERROR_KEYTOOSMALL) {
        unsigned int bits = 0;
        dkim_sig_getkeysize(s, &bits);
        r->result = "policy";
        snprintf(r->reason, sizeof r->reason, "key of %u bits is too small", bits);
    } else if (bh == DKIM_SIGBH_MISMATCH) {
        r->result = "fail";
        snprintf(r->reason, sizeof r->reason, "body hash did not verify");
    } else if (e == DKIM_SIGERROR_BADSIG || (e == DKIM_SIGERROR_OK && (fl & DKIM_SIGFLAG_PROCESSED))) {
        r->result = "fail";
        snprintf(r->reason, sizeof r->reason, "signature did not verify");
    } else if (e == DKIM_SIGERROR_KEYFAIL) {
        r->result = "temperror";
        snprintf(r->reason, sizeof r->reason, "key unavailable");
    } else if (e != DKIM_SIGERROR_OK && e != DKIM_SIGERROR_UNKNOWN) {
        const char *why = dkim_sig_geterrorstr(e);
        r->result = "permerror";
        snprintf(r->reason, sizeof r->reason, "%s", why ? why : "unknown error");
    } else {
        r->result = "neutral";
        snprintf(r->reason, sizeof r->reason, "signature not processed");
    }
}

int mp_dkim_verify(const char *msg, size_t len, const mp_dkim_keyrec *keys, size_t nkeys, mp_dkim_result *out, int max,
                   char *err, size_t errlen)
{
    fields fl;
    vctx ctx = {keys, nkeys, 0, NULL, 0};
    DKIM *d;
    DKIM_STAT st;
    DKIM_SIGINFO **sigs = NULL;
    char *used = NULL;
    int n = 0, nsigs = 0, i, j;
    size_t f;
    if (split(msg, len, &fl) != 0) {
        free(fl.f);
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    for (f = 0; f < fl.n; f++)
        if (field_is(&fl.f[f], "From")) ctx.from_fields++;
    if (fl.body < len) {
        ctx.body = msg + fl.body;
        ctx.body_len = len - fl.body;
    }
    for (f = 0; f < fl.n && n < max; f++) {
        if (!field_is(&fl.f[f], HDR_NAME)) continue;
        {
            const char *colon = memchr(fl.f[f].text, ':', fl.f[f].len);
            size_t off = (size_t)(colon + 1 - fl.f[f].text);
            memset(&out[n], 0, sizeof out[n]);
            mp_dkim_sig_parse(colon + 1, fl.f[f].len - off, &out[n].sig);
            if (out[n].sig.error) {
                out[n].result = "permerror";
                snprintf(out[n].reason, sizeof out[n].reason, "%s", out[n].sig.error);
            }
            n++;
        }
    }
    if (n == 0) {
        free(fl.f);
        return 0;
    }
    if (fl.body > 0 && memchr(msg, '\0', fl.body < len ? fl.body : len) != NULL) {
        /* libopendkim mixes lengths and C strings on header fields: a NUL
         * octet in one makes dkim_eoh() overrun a heap buffer (found by
         * fuzz_dkim_parse). RFC 5322 forbids NUL; such a message is not
         * given to libopendkim at all. */
        for (i = 0; i < n; i++) {
            if (out[i].result) continue;
            out[i].result = "permerror";
            snprintf(out[i].reason, sizeof out[i].reason, "header contains a NUL octet");
        }
        free(fl.f);
        return n;
    }
    pthread_once(&vonce, vlib_init);
    if (vlib == NULL) {
        free(fl.f);
        snprintf(err, errlen, "dkim_init failed");
        return -1;
    }
    d = dkim_verify(vlib, (const unsigned char *)"moonpost", NULL, &st);
    if (d == NULL) {
        free(fl.f);
        snprintf(err, errlen, "dkim_verify: %s", dkim_getresultstr(st));
        return -1;
    }
    dkim_set_user_context(d, &ctx);
    for (f = 0; f < fl.n; f++) {
        /* A signature whose tag list this parser cannot read (judged
         * permerror already) is not handed to libopendkim: one with
         * duplicate tags made its dkim_eoh() write past a heap block (found
         * by fuzz_dkim_parse; core/fuzz/regress/dkim_parse/dup-tags-eoh-overflow).
         * One whose tags read but whose values are wrong (h= without From,
         * v=2, b= not base64, ...) is still a header field, and another
         * signature's h= may cover it (RFC 6376 5.4): it is handed over, so
         * that the hash of such a signature is the signer's. */
        if (field_is(&fl.f[f], HDR_NAME)) {
            const char *colon = memchr(fl.f[f].text, ':', fl.f[f].len);
            mp_tag tags[MP_DKIM_MAX_TAGS];
            const char *why = NULL;
            if (mp_dkim_tags(colon + 1, fl.f[f].len - (size_t)(colon + 1 - fl.f[f].text), tags, MP_DKIM_MAX_TAGS,
                             &why) < 0)
                continue;
        }
        st = dkim_header(d, (unsigned char *)fl.f[f].text, fl.f[f].len);
        if (st != DKIM_STAT_OK && st != DKIM_STAT_SYNTAX) break;
    }
    if (st == DKIM_STAT_OK || st == DKIM_STAT_SYNTAX) st = dkim_eoh(d);
    if (st == DKIM_STAT_OK) {
        if (len > fl.body) dkim_body(d, (unsigned char *)msg + fl.body, len - fl.body);
        dkim_eom(d, NULL);
    }
    if (dkim_getsiglist(d, &sigs, &nsigs) != DKIM_STAT_OK) nsigs = 0;
    used = calloc((size_t)nsigs + 1, 1);
    for (i = 0; i < n; i++) {
        mp_dkim_result *r = &out[i];
        if (r->result) continue; /* malformed */
        for (j = 0; used && j < nsigs; j++) {
            char b8[9];
            const unsigned char *dd = dkim_sig_getdomain(sigs[j]), *ss = dkim_sig_getselector(sigs[j]);
            if (used[j] || dd == NULL || ss == NULL) continue;
            header_b8(sigs[j], b8);
            if (strcasecmp((const char *)dd, r->sig.domain) == 0 && strcasecmp((const char *)ss, r->sig.selector) == 0 &&
                strcmp(b8, r->sig.header_b) == 0) {
                used[j] = 1;
                judge(d, sigs[j], &ctx, r, j >= MP_DKIM_MAX_SIGS);
                break;
            }
        }
        if (r->result == NULL) {
            const char *why = dkim_geterror(d);
            r->result = "permerror";
            snprintf(r->reason, sizeof r->reason, "not a valid signature%s%s", why ? ": " : "", why ? why : "");
        }
    }
    free(used);
    dkim_free(d);
    free(fl.f);
    return n;
}
