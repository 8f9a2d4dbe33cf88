/*
 * TLS on memory BIOs: OpenSSL does the protocol, the caller moves the bytes.
 * No sockets here. Ciphertext read from the network is fed in with
 * mp_tls_feed(); whatever OpenSSL wants to send accumulates in an output
 * buffer that the caller drains with mp_tls_out()/mp_tls_out_consume().
 */
#ifndef MOONPOST_TLS_H
#define MOONPOST_TLS_H

#include <stddef.h>

#define MP_TLS_ERRLEN 256

typedef struct mp_tls_ctx mp_tls_ctx;
typedef struct mp_tls mp_tls;

typedef struct mp_tls_cert {
    const char *cert; /* PEM file: the certificate, then its chain */
    const char *key;  /* PEM file: the private key */
} mp_tls_cert;

typedef struct mp_tls_opts {
    int server;               /* 1: accept handshakes; 0: make them */
    const char *min_version;  /* "1.2" (default) or "1.3" */
    const char *max_version;  /* NULL: the highest OpenSSL has */
    const char *ciphers;      /* TLS 1.2 cipher list, OpenSSL syntax */
    const char *ciphersuites; /* TLS 1.3 suites */
    const char *groups;       /* key exchange groups, e.g. "X25519:P-256" */
    int verify;               /* client: check the peer's chain and name */
    const char *ca_file;      /* trust anchors; NULL and no ca_path: the system store */
    const char *ca_path;
    const mp_tls_cert *certs; /* server: one or more, chosen by SNI; client: at most one */
    size_t ncerts;
} mp_tls_opts;

/* Build a context; NULL with err filled (naming the file) on failure. */
mp_tls_ctx *mp_tls_ctx_new(const mp_tls_opts *o, char err[MP_TLS_ERRLEN]);
void mp_tls_ctx_free(mp_tls_ctx *c); /* connections keep what they use alive */

/* A connection. For clients, name is the SNI and (with verify) the name the
 * certificate must carry; NULL for none. */
mp_tls *mp_tls_new(mp_tls_ctx *c, const char *name, char err[MP_TLS_ERRLEN]);
void mp_tls_free(mp_tls *t);

int mp_tls_feed(mp_tls *t, const char *p, size_t n); /* 0, or -1 out of memory */

enum { MP_TLS_ERROR = -1, MP_TLS_WANT = 0, MP_TLS_DONE = 1, MP_TLS_CLOSED = 2 };

/* Advance the handshake: MP_TLS_DONE, MP_TLS_WANT (feed more) or
 * MP_TLS_ERROR with the reason in err. */
int mp_tls_handshake(mp_tls *t, char err[MP_TLS_ERRLEN]);

/* Decrypt what has been fed: up to cap bytes into buf. Returns bytes (> 0),
 * MP_TLS_WANT (0) when nothing more can be read now, MP_TLS_CLOSED (-2 as
 * returned value) after the peer's close_notify, MP_TLS_ERROR (-1). */
#define MP_TLS_READ_CLOSED (-2)
long mp_tls_read(mp_tls *t, char *buf, size_t cap, char err[MP_TLS_ERRLEN]);

/* Encrypt n bytes; the records land in the output buffer. 0 or -1. */
int mp_tls_write(mp_tls *t, const char *p, size_t n, char err[MP_TLS_ERRLEN]);

/* Queue a close_notify alert. */
void mp_tls_shutdown(mp_tls *t);

/* The pending output: pointer and length, valid until the next call;
 * mp_tls_out_consume() drops what the caller has taken. */
size_t mp_tls_out(mp_tls *t, const char **p);
void mp_tls_out_consume(mp_tls *t, size_t n);

typedef struct mp_tls_info {
    const char *version; /* "TLSv1.3" */
    const char *cipher;  /* "TLS_AES_256_GCM_SHA384" */
    int bits;
    const char *sni;     /* the name the client asked for (server side) */
    const char *group;   /* key exchange group, when known */
    int peer_cert;       /* the peer presented a certificate */
    long verify_result;  /* X509_V_OK (0) or the error */
    const char *verify_error;
    char peer_subject[256];
} mp_tls_info;

void mp_tls_get_info(mp_tls *t, mp_tls_info *info);

/* Messages for the last OpenSSL errors of this thread, joined with "; ". */
void mp_tls_errors(char err[MP_TLS_ERRLEN], const char *prefix);

/* The OpenSSL version in use, e.g. "OpenSSL 3.0.19 27 Jan 2026". */
const char *mp_tls_library(void);

#endif
