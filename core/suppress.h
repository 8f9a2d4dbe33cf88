/*
 * Suppression set and its log codec. No Lua.
 *
 * In memory: an open-addressing hash set of 64-bit keys, each the keyed
 * SipHash-1-3 of "tenant NUL lowercased-address" under a random per-process
 * key (so nobody can aim addresses at one bucket, and the key never needs
 * to be on disk: the log holds the strings). Linear probing with Robin Hood
 * insertion and backward-shift deletion, so there are no tombstones and a
 * miss stops early. A slot is a key (8 octets), the time it was added
 * (4, Unix seconds) and a reason id (2), packed: 14 octets, one cache line
 * per probe. The table doubles past 7/8 full, so an entry costs 16 to 32
 * octets; tables of 2 MiB and more are on transparent huge pages.
 *
 * The addresses themselves are not in memory. Two different (tenant,
 * address) pairs share a key with probability about n / 2^64 per lookup.
 *
 * On disk: an append-only log of text lines, one per change:
 *
 *   A <TAB> tenant <TAB> address <TAB> reason <TAB> time <TAB> crc <LF>
 *   R <TAB> tenant <TAB> address <TAB> time <TAB> crc <LF>
 *   # comment <LF>
 *
 * address is lowercased (ASCII), time is decimal Unix seconds, crc is the
 * CRC32C of every octet before the tab that precedes it, as 8 lowercase
 * hex digits. Replaying the lines in order gives the set: A adds (or
 * replaces), R removes.
 */
#ifndef MOONPOST_SUPPRESS_H
#define MOONPOST_SUPPRESS_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/* Field and line limits. An address is at most 256 octets in SMTP (RFC
 * 5321 4.5.3.1.3); a little more is allowed for what CSV files hold. */
#ifndef MP_SUP_TENANT_MAX
#define MP_SUP_TENANT_MAX 255
#endif
#ifndef MP_SUP_ADDRESS_MAX
#define MP_SUP_ADDRESS_MAX 512
#endif
#ifndef MP_SUP_REASON_MAX
#define MP_SUP_REASON_MAX 255
#endif
/* A line can be no longer than this (fields, tabs, time, crc, LF). */
#define MP_SUP_LINE_MAX (MP_SUP_TENANT_MAX + MP_SUP_ADDRESS_MAX + MP_SUP_REASON_MAX + 40)
/* Distinct reason texts kept in memory; beyond, entries get the reason
 * "other" in memory (the log keeps the real text). */
#define MP_SUP_REASONS_MAX 32767
/* How many damaged lines a load reports one by one (it counts them all). */
#ifndef MP_SUP_REPORT
#define MP_SUP_REPORT 8
#endif

#define MP_SUP_HEADER "# moonpost suppression log 1\n"

typedef struct mp_sup mp_sup;

/* ---- the set -------------------------------------------------------------------- */

/* seed: 16 octets of SipHash key; NULL draws one from getrandom(). */
mp_sup *mp_sup_new(const unsigned char *seed);
void mp_sup_free(mp_sup *s);

uint64_t mp_sup_key(const mp_sup *s, const char *tenant, size_t tlen, const char *addr, size_t alen);

/* add: 1 added, 0 replaced an entry with the same key, -1 out of memory.
 * reason is an id from mp_sup_reason(). */
int mp_sup_add(mp_sup *s, const char *tenant, size_t tlen, const char *addr, size_t alen, uint32_t time,
               unsigned reason);
/* remove: 1 removed, 0 absent */
int mp_sup_remove(mp_sup *s, const char *tenant, size_t tlen, const char *addr, size_t alen);
/* lookup: 1 and *time, *reason set, or 0 */
int mp_sup_lookup(const mp_sup *s, const char *tenant, size_t tlen, const char *addr, size_t alen,
                  uint32_t *time, unsigned *reason);

size_t mp_sup_count(const mp_sup *s);
/* live entries of one tenant */
size_t mp_sup_tenant_count(const mp_sup *s, const char *tenant, size_t tlen);
/* slots in the table, and octets of memory the set holds (table, tenants, reasons) */
size_t mp_sup_slots(const mp_sup *s);
size_t mp_sup_memory(const mp_sup *s);

/* The id of a reason text, interned on first use; -1 out of memory. */
int mp_sup_reason(mp_sup *s, const char *text, size_t len);
/* The id of a reason already interned (or "other" when the table is full), -1 if none. */
int mp_sup_reason_find(const mp_sup *s, const char *text, size_t len);
const char *mp_sup_reason_text(const mp_sup *s, unsigned id, size_t *len);

/* Scans over the log (export, compaction) emit each live entry once: the
 * first A line whose key is live with the same time and reason is taken
 * and its slot marked. live_once() -> 1 when this line is that one. */
int mp_sup_live_once(mp_sup *s, const char *tenant, size_t tlen, const char *addr, size_t alen, uint32_t time,
                     const char *reason, size_t rlen);
void mp_sup_clear_marks(mp_sup *s);

/* ---- records -------------------------------------------------------------------------- */

typedef struct mp_sup_rec {
    int op; /* 'A' or 'R' */
    const char *tenant, *addr, *reason;
    size_t tenant_len, addr_len, reason_len; /* reason: A only */
    uint32_t time;
} mp_sup_rec;

/* NULL when the fields can be written, else why not ("bad address", ...). */
const char *mp_sup_check(const mp_sup_rec *r);
/* Write r as a line (address lowercased) into out, which has room for
 * MP_SUP_LINE_MAX octets; returns its length (with the LF). r must pass
 * mp_sup_check(). */
size_t mp_sup_format(char *out, const mp_sup_rec *r);
/* Parse one line (len octets, without its LF). NULL when valid (fields
 * point into line), else a short reason. */
const char *mp_sup_parse(const char *line, size_t len, mp_sup_rec *r);

/* ---- loading a log ---------------------------------------------------------------------- */

typedef struct mp_sup_bad {
    uint64_t off;
    const char *why;
} mp_sup_bad;

typedef struct mp_sup_load {
    uint64_t size;       /* octets pushed */
    uint64_t records;    /* valid A and R lines applied */
    uint64_t corrupt;    /* damaged lines skipped (valid lines follow them) */
    mp_sup_bad bad[MP_SUP_REPORT]; /* the first damaged lines */
    int torn;            /* the tail from torn_off to the end is damaged or incomplete */
    uint64_t torn_off;
    const char *torn_why;
    uint64_t torn_lines; /* damaged lines in that tail */
    int unterminated;    /* the last line has no LF and is not cut off as torn */
    int nomem;           /* the set could not grow: the load is incomplete */
} mp_sup_load;

typedef struct mp_sup_loader mp_sup_loader;

/* A loader applies the lines of a log to s as they are pushed, in chunks
 * of any size. finish() fills in the result; the loader is then freed. */
mp_sup_loader *mp_sup_loader_new(mp_sup *s);
int mp_sup_loader_push(mp_sup_loader *l, const char *p, size_t n); /* 0, or -1 out of memory */
void mp_sup_loader_finish(mp_sup_loader *l, mp_sup_load *out);

/* CRC32C, shared with the spool (core/spool.c). */
uint32_t mp_crc32c(uint32_t crc, const void *p, size_t n);

#endif
