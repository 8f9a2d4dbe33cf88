/*
 * Password hashing (see kdf.h): PBKDF2-HMAC-SHA256 and scrypt from OpenSSL,
 * and the worker pool that runs them off the loop thread.
 */
#include "kdf.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

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
    struct job *next;
    uint64_t id;
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

struct mp_kdf_pool {
    pthread_mutex_t lock;
    pthread_cond_t cond;
    pthread_t *threads;
    int nthreads;
    int stop;
    job *qhead, *qtail; /* queued, oldest first */
    job *dhead, *dtail; /* finished, oldest first */
    size_t pending;
    uint64_t next_id;
    int efd;
};

static void job_free(job *j)
{
    if (j == NULL) return;
    if (j->pw) {
        OPENSSL_cleanse(j->pw, j->pwlen);
        free(j->pw);
    }
    OPENSSL_cleanse(j, sizeof *j);
    free(j);
}

static void job_run(job *j)
{
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

static void *worker(void *arg)
{
    mp_kdf_pool *s = arg;
    uint64_t one = 1;
    for (;;) {
        job *j;
        pthread_mutex_lock(&s->lock);
        while (!s->stop && s->qhead == NULL) pthread_cond_wait(&s->cond, &s->lock);
        if (s->stop) {
            pthread_mutex_unlock(&s->lock);
            return NULL;
        }
        j = s->qhead;
        s->qhead = j->next;
        if (s->qhead == NULL) s->qtail = NULL;
        pthread_mutex_unlock(&s->lock);
        j->next = NULL;
        job_run(j);
        pthread_mutex_lock(&s->lock);
        if (s->dtail) s->dtail->next = j;
        else s->dhead = j;
        s->dtail = j;
        pthread_mutex_unlock(&s->lock);
        /* a failed write is only a late wakeup */
        while (write(s->efd, &one, sizeof one) < 0 && errno == EINTR) ;
    }
}

mp_kdf_pool *mp_kdf_pool_new(int threads, int *err)
{
    mp_kdf_pool *s;
    sigset_t all, old;
    int i;
    if (threads < 1 || threads > MP_KDF_MAX_THREADS) {
        *err = EINVAL;
        return NULL;
    }
    s = calloc(1, sizeof *s);
    if (s == NULL) {
        *err = ENOMEM;
        return NULL;
    }
    s->threads = calloc((size_t)threads, sizeof *s->threads);
    s->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (s->threads == NULL || s->efd < 0) {
        *err = s->efd < 0 ? errno : ENOMEM;
        if (s->efd >= 0) close(s->efd);
        free(s->threads);
        free(s);
        return NULL;
    }
    pthread_mutex_init(&s->lock, NULL);
    pthread_cond_init(&s->cond, NULL);
    s->next_id = 1;
    /* signals belong to the loop thread: the workers block them all */
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    for (i = 0; i < threads; i++) {
        int e = pthread_create(&s->threads[i], NULL, worker, s);
        if (e != 0) {
            *err = e;
            break;
        }
        s->nthreads++;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (s->nthreads < threads) {
        mp_kdf_pool_free(s);
        return NULL;
    }
    return s;
}

int mp_kdf_submit(mp_kdf_pool *s, const mp_kdf_params *k, const char *pw, size_t pwlen,
                  const unsigned char *salt, size_t saltlen, const unsigned char *expected, size_t explen,
                  uint64_t *id)
{
    job *j;
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
    pthread_mutex_lock(&s->lock);
    if (s->pending >= MP_KDF_MAX_QUEUE) {
        pthread_mutex_unlock(&s->lock);
        job_free(j);
        return -EBUSY;
    }
    j->id = s->next_id++;
    if (s->qtail) s->qtail->next = j;
    else s->qhead = j;
    s->qtail = j;
    s->pending++;
    *id = j->id;
    pthread_cond_signal(&s->cond);
    pthread_mutex_unlock(&s->lock);
    return 0;
}

size_t mp_kdf_collect(mp_kdf_pool *s, mp_kdf_result *out, size_t cap)
{
    uint64_t v, one = 1;
    size_t n = 0;
    int more;
    job *j;
    while (read(s->efd, &v, sizeof v) < 0 && errno == EINTR) ;
    pthread_mutex_lock(&s->lock);
    while (n < cap && (j = s->dhead) != NULL) {
        s->dhead = j->next;
        if (s->dhead == NULL) s->dtail = NULL;
        s->pending--;
        out[n].id = j->id;
        out[n].match = j->match;
        memcpy(out[n].err, j->err, sizeof out[n].err);
        n++;
        job_free(j);
    }
    more = s->dhead != NULL;
    pthread_mutex_unlock(&s->lock);
    /* left some behind: keep the fd readable for them */
    if (more) while (write(s->efd, &one, sizeof one) < 0 && errno == EINTR) ;
    return n;
}

int mp_kdf_pool_fd(const mp_kdf_pool *s) { return s->efd; }

size_t mp_kdf_pending(mp_kdf_pool *s)
{
    size_t n;
    pthread_mutex_lock(&s->lock);
    n = s->pending;
    pthread_mutex_unlock(&s->lock);
    return n;
}

void mp_kdf_pool_free(mp_kdf_pool *s)
{
    job *j;
    int i;
    if (s == NULL) return;
    pthread_mutex_lock(&s->lock);
    s->stop = 1;
    pthread_cond_broadcast(&s->cond);
    pthread_mutex_unlock(&s->lock);
    for (i = 0; i < s->nthreads; i++) pthread_join(s->threads[i], NULL);
    while ((j = s->qhead) != NULL) {
        s->qhead = j->next;
        job_free(j);
    }
    while ((j = s->dhead) != NULL) {
        s->dhead = j->next;
        job_free(j);
    }
    close(s->efd);
    pthread_cond_destroy(&s->cond);
    pthread_mutex_destroy(&s->lock);
    free(s->threads);
    free(s);
}
