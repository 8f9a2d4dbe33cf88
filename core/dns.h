/*
 * DNS message parsing (RFC 1035 with RFC 3596 AAAA, RFC 6698 TLSA). Pure C:
 * no I/O, no Lua. c-ares carries the queries (core/ldns.c); this reads the
 * answers, with their TTLs, which the c-ares parsers of Debian 12 do not
 * give for every type.
 */
#ifndef MOONPOST_DNS_H
#define MOONPOST_DNS_H

#include <stddef.h>
#include <stdint.h>

#define MP_DNS_MAX_RR 64
#define MP_DNS_ARENA 8192

enum {
    MP_DNS_A = 1, MP_DNS_NS = 2, MP_DNS_CNAME = 5, MP_DNS_SOA = 6, MP_DNS_PTR = 12,
    MP_DNS_MX = 15, MP_DNS_TXT = 16, MP_DNS_AAAA = 28, MP_DNS_TLSA = 52
};

typedef struct mp_dns_rr {
    uint16_t type;
    uint32_t ttl;
    const char *name;     /* owner, lower-case, no trailing dot */
    const char *text;     /* A/AAAA address, MX exchange, PTR/CNAME/NS target,
                             TXT strings joined, TLSA data in hex ("" for MX ".") */
    size_t text_len;
    uint16_t pref;        /* MX preference */
    uint8_t usage, selector, mtype; /* TLSA */
} mp_dns_rr;

typedef struct mp_dns_msg {
    int rcode;            /* 0 NOERROR, 3 NXDOMAIN, ... */
    int truncated;
    int authoritative;
    int nrr;              /* answer records kept */
    mp_dns_rr rr[MP_DNS_MAX_RR];
    uint32_t neg_ttl;     /* from the SOA in the authority section: min(ttl, minimum), or 0 */
    char arena[MP_DNS_ARENA];
    size_t used;
} mp_dns_msg;

/* 0 when msg parsed (records that do not fit are dropped), -1 when malformed. */
int mp_dns_parse(const unsigned char *buf, size_t len, mp_dns_msg *out);
/* the type number of "MX", "A", ...; 0 if unknown */
int mp_dns_type(const char *name);

#endif
