/*
 * Password hashing for SMTP AUTH: PBKDF2-HMAC-SHA256 and scrypt through
 * OpenSSL, a constant-time compare, and a small pool of worker threads that
 * verifies passwords off the event loop (one verification costs tens to
 * hundreds of milliseconds by design). No Lua here.
 *
 * The pool is a work queue (workq.h), as the DKIM signer's is: a worker
 * derives the key and compares it with the expected one, and the finished
 * job waits until the loop thread collects it; the queue's eventfd is
 * readable whenever finished jobs wait.
 */
#ifndef MOONPOST_KDF_H
#define MOONPOST_KDF_H

#include <stddef.h>
#include <stdint.h>

#include "workq.h"

#define MP_KDF_ERRLEN 160

#ifndef MP_KDF_MAX_THREADS
#define MP_KDF_MAX_THREADS 16
#endif
/* Jobs waiting or running at once; a full queue answers -EBUSY. */
#ifndef MP_KDF_MAX_QUEUE
#define MP_KDF_MAX_QUEUE 1024
#endif
/* Derived keys and salts: sizes the formats allow. */
#define MP_KDF_MIN_KEY 16
#define MP_KDF_MAX_KEY 64
#define MP_KDF_MAX_SALT 64
/* A password longer than this is refused before any work. */
#define MP_KDF_MAX_PASSWORD 1024
/* Cost limits: a hash beyond them is refused rather than run (a bad or
 * hostile users file must not make one AUTH take minutes or gigabytes). */
#define MP_KDF_MAX_ITERATIONS 100000000ULL
#define MP_KDF_MAX_SCRYPT_MEM (1024ULL * 1024 * 1024)

enum { MP_KDF_PBKDF2_SHA256 = 1, MP_KDF_SCRYPT = 2 };

typedef struct mp_kdf_params {
    int alg;
    uint64_t iterations; /* PBKDF2 */
    uint64_t N, r, p;    /* scrypt: N a power of two above 1 */
} mp_kdf_params;

/* 0 when the parameters are within the limits, else -1 with err filled. */
int mp_kdf_check(const mp_kdf_params *k, char err[MP_KDF_ERRLEN]);

/* Derive outlen octets into out: 0, or -1 with err filled. */
int mp_kdf_derive(const mp_kdf_params *k, const char *pw, size_t pwlen, const unsigned char *salt,
                  size_t saltlen, unsigned char *out, size_t outlen, char err[MP_KDF_ERRLEN]);

/* 1 when the n octets at a and b are equal, in time that does not depend
 * on where they differ. */
int mp_kdf_equal(const void *a, const void *b, size_t n);

/* n octets from OpenSSL's CSPRNG: 0 or -1. */
int mp_kdf_random(unsigned char *out, size_t n);

typedef struct mp_kdf_result {
    uint64_t id;
    int match;                 /* 1 match, 0 mismatch, -1 error */
    char err[MP_KDF_ERRLEN];
} mp_kdf_result;

/* A work queue whose threads verify passwords: submit and collect them
 * here; mp_workq_fd(), mp_workq_pending() and mp_workq_free() (which joins
 * the threads and drops queued and uncollected jobs) serve as they are.
 * NULL with *err an errno value on failure. */
mp_workq *mp_kdf_pool_new(int threads, int *err);

/* Queue a verification: derive a key of explen octets from pw and salt and
 * compare it with expected. The inputs are copied (the password is wiped
 * when the job ends). 0 with *id set, -EBUSY when the queue is full,
 * -ENOMEM. The parameters must have passed mp_kdf_check(). */
int mp_kdf_submit(mp_workq *s, const mp_kdf_params *k, const char *pw, size_t pwlen,
                  const unsigned char *salt, size_t saltlen, const unsigned char *expected, size_t explen,
                  uint64_t *id);

/* Finished jobs, oldest first, at most cap of them: returns how many were
 * written to out. Reading drains the eventfd first, so a job that finishes
 * meanwhile leaves it readable. */
size_t mp_kdf_collect(mp_workq *s, mp_kdf_result *out, size_t cap);

#endif
