/*
 * Password hashing (see kdf.h): PBKDF2-HMAC-SHA256 and scrypt from OpenSSL,
 * and the work queue (workq.h) that runs them off the loop thread.
 */
#include "kdf.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/rand.h>

static void ssl_error(char err[MP_KDF_ERRLEN], const char *what)
{
    unsigned long e = ERR_get_error();
    const char *reason = e ? ERR_reason_error_string(e) : NULL;
    snprintf(err, MP_KDF_ERRLEN, "%s: %s", what, reason ? reason : "failed");
    ERR_clear_error();
}

int mp_kdf_check(const mp_kdf_params *k, char err[MP_KDF_ERRLEN])
{
    if (k->alg == MP_KDF_PBKDF2_SHA256) {
        if (k->iterations < 1 || k->iterations > MP_KDF_MAX_ITERATIONS) {
            snprintf(err, MP_KDF_ERRLEN, "iterations must be from 1 to %llu", MP_KDF_MAX_ITERATIONS);
            return -1;
        }
        return 0;
    }
    if (k->alg == MP_KDF_SCRYPT) {
        uint64_t mem;
        if (k->N < 2 || (k->N & (k->N - 1)) != 0 || k->N > (1ULL << 40)) {
            snprintf(err, MP_KDF_ERRLEN, "scrypt N must be a power of 2 above 1");
            return -1;
        }
        if (k->r < 1 || k->r > 1024 || k->p < 1 || k->p > 1024) {
            snprintf(err, MP_KDF_ERRLEN, "scrypt r and p must be from 1 to 1024");
            return -1;
        }
        /* scrypt's working memory: 128 r (N + p) octets, about */
        mem = 128 * k->r * (k->N + k->p);
        if (mem > MP_KDF_MAX_SCRYPT_MEM) {
            snprintf(err, MP_KDF_ERRLEN, "scrypt parameters need more than %llu MiB",
                     MP_KDF_MAX_SCRYPT_MEM >> 20);
            return -1;
        }
        return 0;
    }
    snprintf(err, MP_KDF_ERRLEN, "unknown algorithm");
    return -1;
}

int mp_kdf_derive(const mp_kdf_params *k, const char *pw, size_t pwlen, const unsigned char *salt,
                  size_t saltlen, unsigned char *out, size_t outlen, char err[MP_KDF_ERRLEN])
{
    if (mp_kdf_check(k, err) != 0) return -1;
    if (pwlen > MP_KDF_MAX_PASSWORD) {
        snprintf(err, MP_KDF_ERRLEN, "password longer than %d octets", MP_KDF_MAX_PASSWORD);
        return -1;
    }
    if (k->alg == MP_KDF_PBKDF2_SHA256) {
        if (PKCS5_PBKDF2_HMAC(pw, (int)pwlen, salt, (int)saltlen, (int)k->iterations, EVP_sha256(), (int)outlen,
                              out) != 1) {
            ssl_error(err, "pbkdf2");
            return -1;
        }
        return 0;
    }
    /* OpenSSL refuses scrypt above its default 32 MiB unless told the
     * limit: give it what these parameters need, with room to spare. */
    if (EVP_PBE_scrypt(pw, pwlen, salt, saltlen, k->N, k->r, k->p, 128 * k->r * (k->N + k->p) + (1 << 20), out,
                       outlen) != 1) {
        ssl_error(err, "scrypt");
        return -1;
    }
    return 0;
}

int mp_kdf_equal(const void *a, const void *b, size_t n) { return CRYPTO_memcmp(a, b, n) == 0; }

int mp_kdf_random(unsigned char *out, size_t n) { return RAND_bytes(out, (int)n) == 1 ? 0 : -1; }

/* ---- the pool ------------------------------------------------------------------------------- */

typedef struct job {
    mp_workq_item item; /* first: the pool's queue links jobs through it */
    mp_kdf_params k;
    char *pw;
    size_t pwlen;
    unsigned char salt[MP_KDF_MAX_SALT];
    size_t saltlen;
    unsigned char expected[MP_KDF_MAX_KEY];
    size_t explen;
    int match;
    char err[MP_KDF_ERRLEN];
} job;

static void job_free(mp_workq_item *it)
{
    job *j = (job *)it;
    if (j == NULL) return;
    if (j->pw) {
        OPENSSL_cleanse(j->pw, j->pwlen);
        free(j->pw);
    }
    OPENSSL_cleanse(j, sizeof *j);
    free(j);
}

static void job_run(mp_workq_item *it)
{
    job *j = (job *)it;
    unsigned char out[MP_KDF_MAX_KEY];
    if (mp_kdf_derive(&j->k, j->pw, j->pwlen, j->salt, j->saltlen, out, j->explen, j->err) != 0) {
        j->match = -1;
    } else {
        j->match = mp_kdf_equal(out, j->expected, j->explen);
    }
    OPENSSL_cleanse(out, sizeof out);
    /* the password is not needed any more: wipe it now, not at collect */
    OPENSSL_cleanse(j->pw, j->pwlen);
}

mp_workq *mp_kdf_pool_new(int threads, int *err)
{
    if (threads < 1 || threads > MP_KDF_MAX_THREADS) {
        *err = EINVAL;
        return NULL;
    }
    return mp_workq_new(threads, MP_KDF_MAX_QUEUE, job_run, job_free, err);
}

int mp_kdf_submit(mp_workq *s, const mp_kdf_params *k, const char *pw, size_t pwlen,
                  const unsigned char *salt, size_t saltlen, const unsigned char *expected, size_t explen,
                  uint64_t *id)
{
    job *j;
    int r;
    if (saltlen > MP_KDF_MAX_SALT || explen > MP_KDF_MAX_KEY || explen < MP_KDF_MIN_KEY) return -EINVAL;
    j = calloc(1, sizeof *j);
    if (j == NULL) return -ENOMEM;
    j->pw = malloc(pwlen + 1);
    if (j->pw == NULL) {
        free(j);
        return -ENOMEM;
    }
    memcpy(j->pw, pw, pwlen);
    j->pwlen = pwlen;
    j->k = *k;
    memcpy(j->salt, salt, saltlen);
    j->saltlen = saltlen;
    memcpy(j->expected, expected, explen);
    j->explen = explen;
    r = mp_workq_submit(s, &j->item, id);
    if (r != 0) job_free(&j->item);
    return r;
}

size_t mp_kdf_collect(mp_workq *s, mp_kdf_result *out, size_t cap)
{
    mp_workq_item *it = mp_workq_collect(s, cap);
    size_t n = 0;
    while (it != NULL) {
        job *j = (job *)it;
        it = it->next;
        out[n].id = j->item.id;
        out[n].match = j->match;
        memcpy(out[n].err, j->err, sizeof out[n].err);
        n++;
        job_free(&j->item);
    }
    return n;
}
