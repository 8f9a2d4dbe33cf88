/*
 * TLS on memory BIOs (see tls.h). Each connection owns an SSL object whose
 * read BIO is filled by mp_tls_feed() and whose write BIO is drained by the
 * caller. A context holds one SSL_CTX per certificate; the first one is the
 * default and the servername callback switches a handshake to the context
 * whose certificate matches the SNI name (X509_check_host, so wildcards and
 * subjectAltNames follow RFC 6125).
 */
#include "tls.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

struct mp_tls_ctx {
    SSL_CTX **ctxs;
    X509 **leaves; /* the certificate of each ctxs[i] (not owned), or NULL */
    size_t n;
    int server;
    int verify;
    int refs;
};

struct mp_tls {
    SSL *ssl;
    BIO *rbio;
    BIO *wbio;
    mp_tls_ctx *ctx;
};

static const unsigned char SID_CTX[] = "moonpost";

void mp_tls_errors(char err[MP_TLS_ERRLEN], const char *prefix)
{
    size_t used = 0;
    unsigned long e;
    int first = 1;
    err[0] = '\0';
    if (prefix) used = (size_t)snprintf(err, MP_TLS_ERRLEN, "%s", prefix);
    if (used >= MP_TLS_ERRLEN) used = MP_TLS_ERRLEN - 1;
    while ((e = ERR_get_error()) != 0) {
        char one[160];
        const char *reason = ERR_reason_error_string(e);
        if (reason) {
            snprintf(one, sizeof one, "%s", reason);
        } else {
            ERR_error_string_n(e, one, sizeof one);
        }
        if (used < MP_TLS_ERRLEN - 1) {
            int w = snprintf(err + used, MP_TLS_ERRLEN - used, "%s%s",
                             first ? (prefix ? ": " : "") : "; ", one);
            if (w > 0) used += (size_t)w;
            if (used >= MP_TLS_ERRLEN) used = MP_TLS_ERRLEN - 1;
        }
        first = 0;
    }
    if (first && used < MP_TLS_ERRLEN - 1)
        snprintf(err + used, MP_TLS_ERRLEN - used, "%sunknown error", prefix ? ": " : "");
}

static int parse_version(const char *v, int *out)
{
    if (v == NULL) {
        *out = 0;
        return 0;
    }
    if (strcmp(v, "1.0") == 0) *out = TLS1_VERSION;
    else if (strcmp(v, "1.1") == 0) *out = TLS1_1_VERSION;
    else if (strcmp(v, "1.2") == 0) *out = TLS1_2_VERSION;
    else if (strcmp(v, "1.3") == 0) *out = TLS1_3_VERSION;
    else return -1;
    return 0;
}

/* Say which file cannot be read before OpenSSL says it less clearly. */
static int readable(const char *path, const char *what, char err[MP_TLS_ERRLEN])
{
    FILE *f = fopen(path, "rb");
    if (f == NULL) {
        snprintf(err, MP_TLS_ERRLEN, "%s: cannot read %s: %s", path, what, strerror(errno));
        return 0;
    }
    fclose(f);
    return 1;
}

static int servername_cb(SSL *ssl, int *alert, void *arg)
{
    mp_tls_ctx *c = arg;
    const char *name = SSL_get_servername(ssl, TLSEXT_NAMETYPE_host_name);
    size_t len;
    (void)alert;
    if (name == NULL || c->n < 2) return SSL_TLSEXT_ERR_OK;
    /* "mx.example." is the same host as "mx.example", but X509_check_host
     * matches no certificate name with the trailing dot: compare without
     * it (the length, not a NUL, ends the name there). */
    len = strlen(name);
    if (len > 1 && name[len - 1] == '.') len--;
    if (c->leaves[0] && X509_check_host(c->leaves[0], name, len, 0, NULL) == 1)
        return SSL_TLSEXT_ERR_OK;
    for (size_t i = 1; i < c->n; i++) {
        if (c->leaves[i] && X509_check_host(c->leaves[i], name, len, 0, NULL) == 1) {
            SSL_set_SSL_CTX(ssl, c->ctxs[i]);
            return SSL_TLSEXT_ERR_OK;
        }
    }
    return SSL_TLSEXT_ERR_OK; /* no match: the default certificate */
}

static SSL_CTX *build_one(const mp_tls_opts *o, const mp_tls_cert *cert, char err[MP_TLS_ERRLEN])
{
    int minv = 0, maxv = 0;
    SSL_CTX *ctx = SSL_CTX_new(o->server ? TLS_server_method() : TLS_client_method());
    if (ctx == NULL) {
        mp_tls_errors(err, "cannot create a TLS context");
        return NULL;
    }
    if (parse_version(o->min_version ? o->min_version : "1.2", &minv) != 0) {
        snprintf(err, MP_TLS_ERRLEN, "min_version: '%s' is not one of 1.0, 1.1, 1.2, 1.3", o->min_version);
        goto fail;
    }
    if (parse_version(o->max_version, &maxv) != 0) {
        snprintf(err, MP_TLS_ERRLEN, "max_version: '%s' is not one of 1.0, 1.1, 1.2, 1.3", o->max_version);
        goto fail;
    }
    if (maxv && maxv < minv) {
        snprintf(err, MP_TLS_ERRLEN, "max_version %s is below min_version %s", o->max_version,
                 o->min_version ? o->min_version : "1.2");
        goto fail;
    }
    if (!SSL_CTX_set_min_proto_version(ctx, minv) || !SSL_CTX_set_max_proto_version(ctx, maxv)) {
        mp_tls_errors(err, "cannot set protocol versions");
        goto fail;
    }
    SSL_CTX_set_options(ctx, SSL_OP_NO_RENEGOTIATION | SSL_OP_NO_COMPRESSION |
                                 (o->server ? SSL_OP_CIPHER_SERVER_PREFERENCE : 0));
    /* Idle inbound sessions, which may be many, do not keep 34 KiB of
     * record buffers each. Outbound connections are few and busy: they
     * keep theirs rather than allocate them for every record. */
    if (o->server) SSL_CTX_set_mode(ctx, SSL_MODE_RELEASE_BUFFERS);
    if (o->ciphers && !SSL_CTX_set_cipher_list(ctx, o->ciphers)) {
        mp_tls_errors(err, "ciphers: no usable cipher in the list");
        goto fail;
    }
    if (o->ciphersuites && !SSL_CTX_set_ciphersuites(ctx, o->ciphersuites)) {
        mp_tls_errors(err, "ciphersuites: not a valid TLS 1.3 suite list");
        goto fail;
    }
    if (o->groups && !SSL_CTX_set1_groups_list(ctx, o->groups)) {
        mp_tls_errors(err, "groups: not a valid group list");
        goto fail;
    }
    if (cert) {
        if (!readable(cert->cert, "the certificate", err)) goto fail;
        if (!readable(cert->key, "the key", err)) goto fail;
        if (SSL_CTX_use_certificate_chain_file(ctx, cert->cert) != 1) {
            char pre[MP_TLS_ERRLEN];
            snprintf(pre, sizeof pre, "%s: not a usable PEM certificate chain", cert->cert);
            mp_tls_errors(err, pre);
            goto fail;
        }
        if (SSL_CTX_use_PrivateKey_file(ctx, cert->key, SSL_FILETYPE_PEM) != 1) {
            char pre[MP_TLS_ERRLEN];
            unsigned long e = ERR_peek_last_error();
            if (ERR_GET_LIB(e) == ERR_LIB_X509 && ERR_GET_REASON(e) == X509_R_KEY_VALUES_MISMATCH) {
                ERR_clear_error();
                snprintf(err, MP_TLS_ERRLEN, "%s: the key does not match the certificate in %s", cert->key,
                         cert->cert);
                goto fail;
            }
            snprintf(pre, sizeof pre, "%s: not a usable PEM private key", cert->key);
            mp_tls_errors(err, pre);
            goto fail;
        }
        if (SSL_CTX_check_private_key(ctx) != 1) {
            ERR_clear_error();
            snprintf(err, MP_TLS_ERRLEN, "%s: the key does not match the certificate in %s", cert->key,
                     cert->cert);
            goto fail;
        }
    }
    if (o->server) {
        SSL_CTX_set_session_id_context(ctx, SID_CTX, sizeof SID_CTX - 1);
    } else {
        int ok = (o->ca_file || o->ca_path) ? SSL_CTX_load_verify_locations(ctx, o->ca_file, o->ca_path)
                                            : SSL_CTX_set_default_verify_paths(ctx);
        if (!ok) {
            char pre[MP_TLS_ERRLEN];
            snprintf(pre, sizeof pre, "%s: cannot load trust anchors",
                     o->ca_file ? o->ca_file : o->ca_path ? o->ca_path : "system CA store");
            mp_tls_errors(err, pre);
            goto fail;
        }
        SSL_CTX_set_verify(ctx, o->verify ? SSL_VERIFY_PEER : SSL_VERIFY_NONE, NULL);
    }
    return ctx;
fail:
    SSL_CTX_free(ctx);
    return NULL;
}

mp_tls_ctx *mp_tls_ctx_new(const mp_tls_opts *o, char err[MP_TLS_ERRLEN])
{
    size_t n = o->ncerts ? o->ncerts : 1;
    mp_tls_ctx *c;
    ERR_clear_error();
    if (o->server && o->ncerts == 0) {
        snprintf(err, MP_TLS_ERRLEN, "a server needs a certificate and a key");
        return NULL;
    }
    if (!o->server && o->ncerts > 1) {
        snprintf(err, MP_TLS_ERRLEN, "a client presents at most one certificate");
        return NULL;
    }
    c = calloc(1, sizeof *c);
    if (c == NULL) goto nomem;
    c->ctxs = calloc(n, sizeof *c->ctxs);
    c->leaves = calloc(n, sizeof *c->leaves);
    if (c->ctxs == NULL || c->leaves == NULL) goto nomem;
    c->server = o->server;
    c->verify = o->verify;
    c->refs = 1;
    for (size_t i = 0; i < n; i++) {
        c->ctxs[i] = build_one(o, o->ncerts ? &o->certs[i] : NULL, err);
        if (c->ctxs[i] == NULL) {
            c->n = i;
            mp_tls_ctx_free(c);
            return NULL;
        }
        c->n = i + 1;
        c->leaves[i] = SSL_CTX_get0_certificate(c->ctxs[i]);
    }
    if (c->server && c->n > 1) {
        SSL_CTX_set_tlsext_servername_callback(c->ctxs[0], servername_cb);
        SSL_CTX_set_tlsext_servername_arg(c->ctxs[0], c);
    }
    return c;
nomem:
    if (c) {
        free(c->ctxs);
        free(c->leaves);
        free(c);
    }
    snprintf(err, MP_TLS_ERRLEN, "out of memory");
    return NULL;
}

void mp_tls_ctx_free(mp_tls_ctx *c)
{
    if (c == NULL || --c->refs > 0) return;
    for (size_t i = 0; i < c->n; i++) SSL_CTX_free(c->ctxs[i]);
    free(c->ctxs);
    free(c->leaves);
    free(c);
}

static int is_ip_literal(const char *name)
{
    /* Enough to keep IP literals out of SNI (RFC 6066 3): digits and dots,
     * or any colon. */
    int only = 1;
    for (const char *p = name; *p; p++) {
        if (*p == ':') return 1;
        if (!((*p >= '0' && *p <= '9') || *p == '.')) only = 0;
    }
    return only;
}

mp_tls *mp_tls_new(mp_tls_ctx *c, const char *name, char err[MP_TLS_ERRLEN])
{
    mp_tls *t = calloc(1, sizeof *t);
    ERR_clear_error();
    if (t == NULL) {
        snprintf(err, MP_TLS_ERRLEN, "out of memory");
        return NULL;
    }
    t->ssl = SSL_new(c->ctxs[0]);
    t->rbio = BIO_new(BIO_s_mem());
    t->wbio = BIO_new(BIO_s_mem());
    if (t->ssl == NULL || t->rbio == NULL || t->wbio == NULL) {
        mp_tls_errors(err, "cannot create a TLS connection");
        BIO_free(t->rbio);
        BIO_free(t->wbio);
        SSL_free(t->ssl);
        free(t);
        return NULL;
    }
    /* An empty read BIO means "wait for more", not end of file. */
    BIO_set_mem_eof_return(t->rbio, -1);
    BIO_set_mem_eof_return(t->wbio, -1);
    SSL_set_bio(t->ssl, t->rbio, t->wbio);
    t->ctx = c;
    c->refs++;
    if (c->server) {
        SSL_set_accept_state(t->ssl);
    } else {
        SSL_set_connect_state(t->ssl);
        if (name && *name) {
            int ip = is_ip_literal(name);
            if (!ip) SSL_set_tlsext_host_name(t->ssl, name);
            if (c->verify) {
                int ok = ip ? X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(t->ssl), name)
                            : SSL_set1_host(t->ssl, name);
                if (!ok) {
                    mp_tls_errors(err, "cannot set the name to verify");
                    mp_tls_free(t);
                    return NULL;
                }
            }
        }
    }
    return t;
}

void mp_tls_free(mp_tls *t)
{
    if (t == NULL) return;
    SSL_free(t->ssl); /* frees both BIOs */
    mp_tls_ctx_free(t->ctx);
    free(t);
}

int mp_tls_feed(mp_tls *t, const char *p, size_t n)
{
    size_t done = 0;
    if (n == 0) return 0;
    if (!BIO_write_ex(t->rbio, p, n, &done) || done != n) return -1;
    return 0;
}

/* The reason a handshake or record failed, with the certificate
 * verification error when that was the cause. */
static void failure(mp_tls *t, char err[MP_TLS_ERRLEN], int sslerr)
{
    long vr = SSL_get_verify_result(t->ssl);
    if (sslerr == SSL_ERROR_SSL && vr != X509_V_OK && ERR_peek_error() != 0 &&
        ERR_GET_REASON(ERR_peek_error()) == SSL_R_CERTIFICATE_VERIFY_FAILED) {
        ERR_clear_error();
        snprintf(err, MP_TLS_ERRLEN, "certificate verify failed: %s", X509_verify_cert_error_string(vr));
        return;
    }
    if (sslerr == SSL_ERROR_SSL) {
        mp_tls_errors(err, NULL);
    } else {
        ERR_clear_error();
        snprintf(err, MP_TLS_ERRLEN, "TLS error %d", sslerr);
    }
}

int mp_tls_handshake(mp_tls *t, char err[MP_TLS_ERRLEN])
{
    int r, e;
    ERR_clear_error();
    r = SSL_do_handshake(t->ssl);
    if (r == 1) return MP_TLS_DONE;
    e = SSL_get_error(t->ssl, r);
    if (e == SSL_ERROR_WANT_READ) return MP_TLS_WANT;
    if (e == SSL_ERROR_ZERO_RETURN) {
        snprintf(err, MP_TLS_ERRLEN, "the peer closed the connection during the handshake");
        return MP_TLS_ERROR;
    }
    failure(t, err, e);
    return MP_TLS_ERROR;
}

long mp_tls_read(mp_tls *t, char *buf, size_t cap, char err[MP_TLS_ERRLEN])
{
    size_t n = 0;
    int e;
    ERR_clear_error();
    if (SSL_read_ex(t->ssl, buf, cap, &n) == 1) return (long)n;
    e = SSL_get_error(t->ssl, 0);
    if (e == SSL_ERROR_WANT_READ) return MP_TLS_WANT;
    if (e == SSL_ERROR_ZERO_RETURN) return MP_TLS_READ_CLOSED;
    failure(t, err, e);
    return MP_TLS_ERROR;
}

int mp_tls_write(mp_tls *t, const char *p, size_t n, char err[MP_TLS_ERRLEN])
{
    size_t done = 0;
    int e;
    if (n == 0) return 0;
    ERR_clear_error();
    /* The write BIO grows without bound, so a write completes in one call
     * unless the connection is broken. */
    if (SSL_write_ex(t->ssl, p, n, &done) == 1 && done == n) return 0;
    e = SSL_get_error(t->ssl, 0);
    failure(t, err, e);
    return -1;
}

void mp_tls_shutdown(mp_tls *t)
{
    ERR_clear_error();
    if (SSL_is_init_finished(t->ssl)) (void)SSL_shutdown(t->ssl);
    ERR_clear_error();
}

size_t mp_tls_out(mp_tls *t, const char **p)
{
    char *data = NULL;
    long n = BIO_get_mem_data(t->wbio, &data);
    *p = data;
    return n > 0 ? (size_t)n : 0;
}

/* Drop n bytes from the front of the output. BIO_reset would do it in one
 * call but clears the whole allocation, which grows to the largest write. */
void mp_tls_out_consume(mp_tls *t, size_t n)
{
    char scratch[16384];
    while (n > 0) {
        size_t got = 0;
        if (!BIO_read_ex(t->wbio, scratch, n < sizeof scratch ? n : sizeof scratch, &got) || got == 0) break;
        n -= got;
    }
}

void mp_tls_get_info(mp_tls *t, mp_tls_info *info)
{
    const SSL_CIPHER *c = SSL_get_current_cipher(t->ssl);
    X509 *peer = SSL_get0_peer_certificate(t->ssl);
    int nid;
    memset(info, 0, sizeof *info);
    info->version = SSL_get_version(t->ssl);
    info->cipher = c ? SSL_CIPHER_get_name(c) : NULL;
    info->bits = c ? SSL_CIPHER_get_bits(c, NULL) : 0;
    info->sni = SSL_get_servername(t->ssl, TLSEXT_NAMETYPE_host_name);
    nid = SSL_get_negotiated_group(t->ssl);
    info->group = nid > 0 ? SSL_group_to_name(t->ssl, nid) : NULL;
    info->peer_cert = peer != NULL;
    info->verify_result = SSL_get_verify_result(t->ssl);
    info->verify_error = info->verify_result == X509_V_OK ? NULL
                                                          : X509_verify_cert_error_string(info->verify_result);
    if (peer) X509_NAME_oneline(X509_get_subject_name(peer), info->peer_subject, sizeof info->peer_subject);
}

const char *mp_tls_library(void)
{
    return OpenSSL_version(OPENSSL_VERSION);
}
