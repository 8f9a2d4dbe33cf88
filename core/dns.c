/*
 * DNS message parsing. See dns.h.
 */
#include "dns.h"

#include <arpa/inet.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>

static uint16_t get16(const unsigned char *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static uint32_t get32(const unsigned char *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/* Copy n bytes (plus a NUL) into the arena; NULL when full. */
static char *arena_put(mp_dns_msg *m, const char *s, size_t n)
{
    char *d;
    if (m->used + n + 1 > sizeof m->arena) return NULL;
    d = m->arena + m->used;
    memcpy(d, s, n);
    d[n] = '\0';
    m->used += n + 1;
    return d;
}

/* Read a (possibly compressed) name at *pos into out (lower-case, dots, no
 * trailing dot; "" for the root). Advances *pos past the name in place.
 * Returns the length, or -1 when malformed. */
static int read_name(const unsigned char *buf, size_t len, size_t *pos, char *out, size_t outsz)
{
    size_t p = *pos, o = 0;
    int jumped = 0, hops = 0;
    for (;;) {
        unsigned c;
        if (p >= len) return -1;
        c = buf[p];
        if (c == 0) {
            if (!jumped) *pos = p + 1;
            break;
        }
        if ((c & 0xC0) == 0xC0) {
            size_t target;
            if (p + 1 >= len || ++hops > 32) return -1;
            target = ((c & 0x3F) << 8) | buf[p + 1];
            if (target >= len) return -1;
            if (!jumped) *pos = p + 2;
            jumped = 1;
            p = target;
            continue;
        }
        if (c & 0xC0) return -1; /* reserved label types */
        if (p + 1 + c > len) return -1;
        if (o + c + 2 > outsz || o + c + 1 > 255) return -1;
        if (o > 0) out[o++] = '.';
        {
            size_t i;
            for (i = 0; i < c; i++) {
                unsigned char ch = buf[p + 1 + i];
                out[o++] = (char)((ch >= 'A' && ch <= 'Z') ? ch + 32 : ch);
            }
        }
        p += 1 + c;
    }
    out[o] = '\0';
    return (int)o;
}

static int skip_name(const unsigned char *buf, size_t len, size_t *pos)
{
    char tmp[300];
    return read_name(buf, len, pos, tmp, sizeof tmp) < 0 ? -1 : 0;
}

static void hex(const unsigned char *p, size_t n, char *out)
{
    static const char digits[] = "0123456789abcdef";
    size_t i;
    for (i = 0; i < n; i++) {
        out[2 * i] = digits[p[i] >> 4];
        out[2 * i + 1] = digits[p[i] & 15];
    }
    out[2 * n] = '\0';
}

int mp_dns_parse(const unsigned char *buf, size_t len, mp_dns_msg *m)
{
    size_t pos = 12;
    unsigned qd, an, ns, i;
    memset(m, 0, offsetof(mp_dns_msg, arena));
    m->used = 0;
    if (len < 12) return -1;
    m->rcode = buf[3] & 0x0F;
    m->truncated = (buf[2] & 0x02) != 0;
    m->authoritative = (buf[2] & 0x04) != 0;
    qd = get16(buf + 4);
    an = get16(buf + 6);
    ns = get16(buf + 8);
    for (i = 0; i < qd; i++) {
        if (skip_name(buf, len, &pos) < 0 || pos + 4 > len) return -1;
        pos += 4;
    }
    for (i = 0; i < an + ns; i++) {
        char name[300], target[300];
        uint16_t type, rdlen;
        uint32_t ttl;
        size_t rd, rp;
        int nl = read_name(buf, len, &pos, name, sizeof name);
        if (nl < 0 || pos + 10 > len) return -1;
        type = get16(buf + pos);
        ttl = get32(buf + pos + 4);
        if (ttl > 0x7FFFFFFF) ttl = 0; /* RFC 2181 8 */
        rdlen = get16(buf + pos + 8);
        pos += 10;
        if (pos + rdlen > len) return -1;
        rd = pos;
        pos += rdlen;
        if (i >= an) {
            /* authority: the SOA gives the negative-caching TTL (RFC 2308) */
            if (type == MP_DNS_SOA) {
                size_t q = rd;
                uint32_t minimum;
                if (skip_name(buf, len, &q) < 0 || skip_name(buf, len, &q) < 0 || q + 20 > rd + rdlen) return -1;
                minimum = get32(buf + q + 16);
                m->neg_ttl = ttl < minimum ? ttl : minimum;
            }
            continue;
        }
        if (m->nrr >= MP_DNS_MAX_RR) continue;
        {
            mp_dns_rr *r = &m->rr[m->nrr];
            const char *text = NULL;
            size_t tlen = 0;
            memset(r, 0, sizeof *r);
            r->type = type;
            r->ttl = ttl;
            switch (type) {
            case MP_DNS_A:
            case MP_DNS_AAAA: {
                char addr[64];
                if (rdlen != (type == MP_DNS_A ? 4 : 16)) return -1;
                inet_ntop(type == MP_DNS_A ? AF_INET : AF_INET6, buf + rd, addr, sizeof addr);
                text = addr;
                tlen = strlen(addr);
                r->text = arena_put(m, text, tlen);
                break;
            }
            case MP_DNS_MX: {
                int tl;
                if (rdlen < 3) return -1;
                r->pref = get16(buf + rd);
                rp = rd + 2;
                tl = read_name(buf, len, &rp, target, sizeof target);
                if (tl < 0 || rp > rd + rdlen) return -1;
                r->text = arena_put(m, target, (size_t)tl);
                tlen = (size_t)tl;
                break;
            }
            case MP_DNS_PTR:
            case MP_DNS_CNAME:
            case MP_DNS_NS: {
                int tl;
                rp = rd;
                tl = read_name(buf, len, &rp, target, sizeof target);
                if (tl < 0 || rp > rd + rdlen) return -1;
                r->text = arena_put(m, target, (size_t)tl);
                tlen = (size_t)tl;
                break;
            }
            case MP_DNS_TXT: {
                /* character-strings, joined */
                char tmp[4096];
                size_t q = rd, o = 0;
                while (q < rd + rdlen) {
                    unsigned n = buf[q];
                    if (q + 1 + n > rd + rdlen) return -1;
                    if (o + n >= sizeof tmp) break;
                    memcpy(tmp + o, buf + q + 1, n);
                    o += n;
                    q += 1 + n;
                }
                r->text = arena_put(m, tmp, o);
                tlen = o;
                break;
            }
            case MP_DNS_TLSA: {
                char tmp[2 * 512 + 1];
                size_t n;
                if (rdlen < 3) return -1;
                r->usage = buf[rd];
                r->selector = buf[rd + 1];
                r->mtype = buf[rd + 2];
                n = (size_t)rdlen - 3;
                if (n > 512) n = 512;
                hex(buf + rd + 3, n, tmp);
                r->text = arena_put(m, tmp, 2 * n);
                tlen = 2 * n;
                break;
            }
            default:
                continue; /* a type we do not read */
            }
            if (r->text == NULL) continue; /* arena full: drop the record */
            r->text_len = tlen;
            r->name = arena_put(m, name, (size_t)nl);
            if (r->name == NULL) continue;
            m->nrr++;
        }
    }
    return 0;
}

int mp_dns_type(const char *name)
{
    static const struct { const char *n; int t; } types[] = {
        {"A", MP_DNS_A}, {"NS", MP_DNS_NS}, {"CNAME", MP_DNS_CNAME}, {"SOA", MP_DNS_SOA},
        {"PTR", MP_DNS_PTR}, {"MX", MP_DNS_MX}, {"TXT", MP_DNS_TXT}, {"AAAA", MP_DNS_AAAA},
        {"TLSA", MP_DNS_TLSA}, {NULL, 0}};
    int i;
    for (i = 0; types[i].n; i++)
        if (strcasecmp(types[i].n, name) == 0) return types[i].t;
    return 0;
}
