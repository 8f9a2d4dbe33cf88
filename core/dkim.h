/*
 * DKIM (RFC 6376, RFC 8463, RFC 8301) on libopendkim and OpenSSL. No Lua
 * here: keys, the header splitter, the tag-list parser, signing jobs and the
 * thread pool that runs them, and verification against keys the caller has
 * fetched beforehand (DNS is the runtime's business).
 *
 * Signing has two engines that produce the same header:
 *   - libopendkim (dkim_sign ... dkim_getsighdr_d) signs RSA;
 *   - the native engine (canonicalization here, signature by OpenSSL with
 *     the key parsed once) signs Ed25519, where libopendkim 2.11.0~beta2
 *     leaks and folds wrongly, RSA when the signer asks for it, and
 *     signatures without t=, which libopendkim always writes.
 * docs/dkim.md ("Notes on libopendkim") says what fell short and why.
 */
#ifndef MOONPOST_DKIM_H
#define MOONPOST_DKIM_H

#include <stddef.h>
#include <stdint.h>

#include "workq.h"

/* Limits; each may be overridden at build time. */
#ifndef MP_DKIM_MAX_SPECS
#define MP_DKIM_MAX_SPECS 8         /* signatures per job */
#endif
#ifndef MP_DKIM_MAX_HEADERS
#define MP_DKIM_MAX_HEADERS 64      /* names in headers = { } and oversign = { } */
#endif
#ifndef MP_DKIM_MAX_SIGS
#define MP_DKIM_MAX_SIGS 16         /* signatures verified per message; more get "policy" */
#endif
#ifndef MP_DKIM_MAX_KEYFILE
#define MP_DKIM_MAX_KEYFILE 65536   /* bytes of a PEM key file */
#endif
#ifndef MP_DKIM_MAX_QUEUE
#define MP_DKIM_MAX_QUEUE 100000    /* jobs queued or finished and not collected */
#endif
#ifndef MP_DKIM_MAX_THREADS
#define MP_DKIM_MAX_THREADS 64
#endif
#define MP_DKIM_MARGIN 78           /* signature header lines, in columns (a tab is 8) */

/* ---- header fields ------------------------------------------------------- */

/* Walks the header section of a message: one field per call, folded
 * continuation lines included. Lines end in CRLF (a bare LF is accepted). */
typedef struct mp_hdr_iter {
    const char *msg;
    size_t len, pos;
    size_t body;     /* after mp_hdr_next() returned 0: offset of the body */
    int done;
} mp_hdr_iter;

typedef struct mp_hdr_field {
    const char *text;  /* the field, from its name to the end of its last line */
    size_t len;        /* without the final line end */
    size_t name_len;   /* length of the name (before ':' and any WSP); 0 without ':' */
} mp_hdr_field;

void mp_hdr_init(mp_hdr_iter *it, const char *msg, size_t len);
int mp_hdr_next(mp_hdr_iter *it, mp_hdr_field *f); /* 1: a field, 0: end of the header */

/* ---- tag lists (RFC 6376 3.2) --------------------------------------------- */

#define MP_DKIM_MAX_TAGS 32

typedef struct mp_tag {
    const char *name, *value;   /* value without surrounding FWS */
    size_t name_len, value_len;
} mp_tag;

/* The number of tags, or -1 with *why set (a static string). */
int mp_dkim_tags(const char *s, size_t len, mp_tag *tags, int max, const char **why);

/* A DKIM-Signature field value, summarized: what dkim.signatures() reports. */
typedef struct mp_dkim_sig {
    char domain[256], selector[256], algorithm[32];
    char header_b[9];           /* the first 8 characters of b= */
    const char *error;          /* NULL, or why the signature is malformed */
    int h_from;                 /* how many times h= lists From */
} mp_dkim_sig;

int mp_dkim_sig_parse(const char *value, size_t len, mp_dkim_sig *out); /* 0, or -1 with out->error */

/* A domain or selector: dot-separated labels of letters, digits, '-', '_'. */
int mp_dkim_valid_name(const char *s, size_t n);
/* An i= value: printable, with an '@' and a domain that is d= or below it. */
int mp_dkim_valid_identity(const char *i, size_t n, const char *d, size_t dn);

/* ---- keys ------------------------------------------------------------------ */

enum { MP_DKIM_RSA = 1, MP_DKIM_ED25519 = 2 };

typedef struct mp_dkim_key mp_dkim_key;   /* reference counted, shared by threads */

/* name is used in error messages ("<name>: not a PEM private key"). */
mp_dkim_key *mp_dkim_key_from_pem(const char *pem, size_t len, const char *name, char *err, size_t errlen);
mp_dkim_key *mp_dkim_key_load(const char *path, char *err, size_t errlen);
mp_dkim_key *mp_dkim_key_ref(mp_dkim_key *k);
void mp_dkim_key_unref(mp_dkim_key *k);
int mp_dkim_key_type(const mp_dkim_key *k);
int mp_dkim_key_bits(const mp_dkim_key *k);
const char *mp_dkim_key_public(const mp_dkim_key *k);  /* base64 for p= */
const char *mp_dkim_key_name(const mp_dkim_key *k);

/* ---- signing jobs ------------------------------------------------------------ */

enum { MP_CANON_SIMPLE = 0, MP_CANON_RELAXED = 1 };   /* as DKIM_CANON_* */
enum { MP_ENGINE_LIBOPENDKIM = 0, MP_ENGINE_NATIVE = 1 };

/* One signature to make. Strings are copied; names are lower-cased. */
typedef struct mp_dkim_spec_in {
    mp_dkim_key *key;                  /* the job takes its own reference */
    const char *domain, *selector;
    const char *identity;              /* i=, or NULL */
    int hcanon, bcanon;
    const char *const *headers;        /* names to sign (those present are) */
    size_t nheaders;
    const char *const *oversign;       /* names listed once more than present */
    size_t noversign;
    uint64_t expire;                   /* x= = t= + expire; 0: no x= */
    int timestamp;                     /* 0: no t= (native engine only) */
    int engine;                        /* MP_ENGINE_* for an RSA key */
    int lists_static;                  /* headers and oversign are lower-case, every
                                          oversigned name is in headers, and they live
                                          as long as the process: the job borrows them */
} mp_dkim_spec_in;

typedef struct mp_dkim_job mp_dkim_job;

/* A job over a copy of msg, with room for nspecs signatures. */
mp_dkim_job *mp_dkim_job_new(const char *msg, size_t len, int nspecs);
int mp_dkim_job_set(mp_dkim_job *j, int i, const mp_dkim_spec_in *in, char *err, size_t errlen); /* 0 | -1 */
void mp_dkim_job_run(mp_dkim_job *j);    /* sign, in the calling thread */
void mp_dkim_job_free(mp_dkim_job *j);
uint64_t mp_dkim_job_id(const mp_dkim_job *j);
/* The DKIM-Signature fields to prepend (CRLF-terminated), or NULL and the error. */
const char *mp_dkim_job_result(const mp_dkim_job *j, size_t *len);
const char *mp_dkim_job_error(const mp_dkim_job *j);
mp_dkim_job *mp_dkim_job_next(const mp_dkim_job *j);

/* ---- the signer: a pool of threads (workq.h) --------------------------------- */

/* A work queue whose threads run signing jobs: submit and collect them
 * here; mp_workq_fd(), mp_workq_pending() and mp_workq_free() (which joins
 * the threads and drops queued jobs) serve as they are. NULL with *err =
 * errno. */
mp_workq *mp_dkim_signer_new(int threads, int *err);
/* Queue j (the signer owns it from here): 0 with *id set, or -EBUSY. */
int mp_dkim_signer_submit(mp_workq *s, mp_dkim_job *j, uint64_t *id);
/* Finished jobs in order of completion (a list through mp_dkim_job_next;
 * free each), and the fd drained. */
mp_dkim_job *mp_dkim_signer_collect(mp_workq *s);

/* ---- verification ------------------------------------------------------------- */

enum { MP_KEY_FOUND = 0, MP_KEY_NONE = 1, MP_KEY_TEMP = 2 };

/* A key record fetched beforehand: query is "<s>._domainkey.<d>". Queries
 * not in the list are temporary failures. */
typedef struct mp_dkim_keyrec {
    const char *query;
    const char *txt;      /* the TXT record, strings joined; NULL unless MP_KEY_FOUND */
    int state;
} mp_dkim_keyrec;

typedef struct mp_dkim_result {
    mp_dkim_sig sig;
    const char *result;   /* "pass", "fail", "neutral", "policy", "temperror", "permerror" */
    char reason[160];
    int testing;          /* the key has t=y */
    long long body_unsigned; /* pass with l=: canonicalized body octets after the l= signed */
} mp_dkim_result;

/* One result per DKIM-Signature field, top to bottom (at most max): the
 * count, or -1 with err set when the message could not be processed. */
int mp_dkim_verify(const char *msg, size_t len, const mp_dkim_keyrec *keys, size_t nkeys,
                   mp_dkim_result *out, int max, char *err, size_t errlen);

#endif
