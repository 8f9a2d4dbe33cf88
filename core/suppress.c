/*
 * Suppression set and log codec. See suppress.h for the layout and format.
 */
#define _GNU_SOURCE
#include "suppress.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <unistd.h>

/* ---- SipHash-1-3 ------------------------------------------------------------------ */

#define ROTL(x, b) (uint64_t)(((x) << (b)) | ((x) >> (64 - (b))))
#define SIPROUND                                                                                                      \
    do {                                                                                                              \
        v0 += v1;                                                                                                     \
        v1 = ROTL(v1, 13);                                                                                            \
        v1 ^= v0;                                                                                                     \
        v0 = ROTL(v0, 32);                                                                                            \
        v2 += v3;                                                                                                     \
        v3 = ROTL(v3, 16);                                                                                            \
        v3 ^= v2;                                                                                                     \
        v0 += v3;                                                                                                     \
        v3 = ROTL(v3, 21);                                                                                            \
        v3 ^= v0;                                                                                                     \
        v2 += v1;                                                                                                     \
        v1 = ROTL(v1, 17);                                                                                            \
        v1 ^= v2;                                                                                                     \
        v2 = ROTL(v2, 32);                                                                                            \
    } while (0)

static uint64_t load64(const unsigned char *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    return v;
}

static uint64_t siphash13(uint64_t k0, uint64_t k1, const unsigned char *in, size_t n)
{
    uint64_t v0 = 0x736f6d6570736575ULL ^ k0, v1 = 0x646f72616e646f6dULL ^ k1;
    uint64_t v2 = 0x6c7967656e657261ULL ^ k0, v3 = 0x7465646279746573ULL ^ k1;
    uint64_t b = (uint64_t)n << 56, m;
    const unsigned char *end = in + (n & ~(size_t)7);
    for (; in != end; in += 8) {
        m = load64(in);
        v3 ^= m;
        SIPROUND;
        v0 ^= m;
    }
    switch (n & 7) {
    case 7: b |= (uint64_t)in[6] << 48; /* fall through */
    case 6: b |= (uint64_t)in[5] << 40; /* fall through */
    case 5: b |= (uint64_t)in[4] << 32; /* fall through */
    case 4: b |= (uint64_t)in[3] << 24; /* fall through */
    case 3: b |= (uint64_t)in[2] << 16; /* fall through */
    case 2: b |= (uint64_t)in[1] << 8;  /* fall through */
    case 1: b |= (uint64_t)in[0]; /* fall through */
    default: break;
    }
    v3 ^= b;
    SIPROUND;
    v0 ^= b;
    v2 ^= 0xff;
    SIPROUND;
    SIPROUND;
    SIPROUND;
    return v0 ^ v1 ^ v2 ^ v3;
}

/* ---- interned strings (tenants, reasons) ------------------------------------------- */

typedef struct strtab {
    char **str;
    uint32_t *len;
    uint64_t *count; /* tenants: live entries */
    size_t n, cap;
    int32_t *index; /* open addressing over ids; -1 empty */
    size_t icap;
} strtab;

static void strtab_free(strtab *t)
{
    size_t i;
    for (i = 0; i < t->n; i++) free(t->str[i]);
    free(t->str);
    free(t->len);
    free(t->count);
    free(t->index);
    memset(t, 0, sizeof *t);
}

static uint64_t strhash(const char *p, size_t n)
{
    /* not keyed: these tables hold what the policy and the log name */
    uint64_t h = 0xcbf29ce484222325ULL;
    while (n--) h = (h ^ (unsigned char)*p++) * 0x100000001b3ULL;
    return h;
}

static int strtab_find(const strtab *t, const char *p, size_t n)
{
    size_t i;
    if (t->icap == 0) return -1;
    for (i = strhash(p, n) & (t->icap - 1);; i = (i + 1) & (t->icap - 1)) {
        int32_t id = t->index[i];
        if (id < 0) return -1;
        if (t->len[id] == n && memcmp(t->str[id], p, n) == 0) return id;
    }
}

static int strtab_reindex(strtab *t, size_t icap)
{
    int32_t *idx = malloc(icap * sizeof *idx);
    size_t k;
    if (idx == NULL) return -1;
    for (k = 0; k < icap; k++) idx[k] = -1;
    for (k = 0; k < t->n; k++) {
        size_t i = strhash(t->str[k], t->len[k]) & (icap - 1);
        while (idx[i] >= 0) i = (i + 1) & (icap - 1);
        idx[i] = (int32_t)k;
    }
    free(t->index);
    t->index = idx;
    t->icap = icap;
    return 0;
}

/* id of p, added if new; -1 out of memory or full (max ids) */
static int strtab_intern(strtab *t, const char *p, size_t n, size_t max)
{
    int id = strtab_find(t, p, n);
    char *copy;
    if (id >= 0) return id;
    if (t->n >= max) return -1;
    if (t->n == t->cap) {
        size_t cap = t->cap ? t->cap * 2 : 8;
        char **s = realloc(t->str, cap * sizeof *s);
        uint32_t *l;
        uint64_t *c;
        if (s == NULL) return -1;
        t->str = s;
        l = realloc(t->len, cap * sizeof *l);
        if (l == NULL) return -1;
        t->len = l;
        c = realloc(t->count, cap * sizeof *c);
        if (c == NULL) return -1;
        t->count = c;
        t->cap = cap;
    }
    if ((t->n + 1) * 2 > t->icap && strtab_reindex(t, t->icap ? t->icap * 2 : 16) != 0) return -1;
    copy = malloc(n + 1);
    if (copy == NULL) return -1;
    memcpy(copy, p, n);
    copy[n] = '\0';
    t->str[t->n] = copy;
    t->len[t->n] = (uint32_t)n;
    t->count[t->n] = 0;
    {
        size_t i = strhash(p, n) & (t->icap - 1);
        while (t->index[i] >= 0) i = (i + 1) & (t->icap - 1);
        t->index[i] = (int32_t)t->n;
    }
    return (int)t->n++;
}

static size_t strtab_memory(const strtab *t)
{
    size_t m = t->cap * (sizeof(char *) + sizeof(uint32_t) + sizeof(uint64_t)) + t->icap * sizeof(int32_t);
    size_t i;
    for (i = 0; i < t->n; i++) m += t->len[i] + 1;
    return m;
}

/* ---- the set ----------------------------------------------------------------------------- */

/* reason ids are 15 bits; the top bit of a slot's reason is the scan mark */
#define MARK 0x8000u
#define REASON_OTHER 0 /* id 0 is "other", interned at creation */
#define MIN_SLOTS 64
/* Tables this large go on transparent huge pages: a lookup is one cache
 * miss, and without them also a TLB miss (most of its cost in a VM). */
#define HUGE_PAGE (2u * 1024 * 1024)

/* One slot, packed: a probe reads one cache line (two for the few slots
 * that straddle one), where three arrays would read three on a hit. */
typedef struct __attribute__((packed)) slot {
    uint64_t key; /* 0: empty */
    uint32_t time;
    uint16_t reason;
} slot;

struct mp_sup {
    uint64_t k0, k1;
    slot *slots;
    size_t cap, count, bytes; /* bytes: allocated for slots */
    strtab tenants, reasons_tab;
};

static slot *slots_alloc(size_t cap, size_t *bytes)
{
    size_t n = cap * sizeof(slot);
    void *p;
    if (n < HUGE_PAGE) {
        *bytes = n;
        return calloc(cap, sizeof(slot));
    }
    n = (n + HUGE_PAGE - 1) & ~(size_t)(HUGE_PAGE - 1);
    if (posix_memalign(&p, HUGE_PAGE, n) != 0) return NULL;
#ifdef MADV_HUGEPAGE
    madvise(p, n, MADV_HUGEPAGE); /* advice: without it, small pages */
#endif
    memset(p, 0, n);
    *bytes = n;
    return p;
}

mp_sup *mp_sup_new(const unsigned char *seed)
{
    unsigned char rnd[16];
    mp_sup *s = calloc(1, sizeof *s);
    if (s == NULL) return NULL;
    if (seed == NULL) {
        size_t got = 0;
        while (got < sizeof rnd) {
            ssize_t r = getrandom(rnd + got, sizeof rnd - got, 0);
            if (r < 0 && errno == EINTR) continue;
            if (r <= 0) break;
            got += (size_t)r;
        }
        if (got < sizeof rnd) {
            /* no getrandom (old kernel): the key need only be unguessable from outside */
            int fd = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
            if (fd < 0 || read(fd, rnd, sizeof rnd) != (ssize_t)sizeof rnd) {
                if (fd >= 0) close(fd);
                free(s);
                return NULL;
            }
            close(fd);
        }
        seed = rnd;
    }
    s->k0 = load64(seed);
    s->k1 = load64(seed + 8);
    s->cap = MIN_SLOTS;
    s->slots = slots_alloc(s->cap, &s->bytes);
    if (s->slots == NULL || strtab_intern(&s->reasons_tab, "other", 5, MP_SUP_REASONS_MAX) != REASON_OTHER) {
        mp_sup_free(s);
        return NULL;
    }
    return s;
}

void mp_sup_free(mp_sup *s)
{
    if (s == NULL) return;
    free(s->slots);
    strtab_free(&s->tenants);
    strtab_free(&s->reasons_tab);
    free(s);
}

static unsigned char lower(unsigned char c)
{
    return (c >= 'A' && c <= 'Z') ? (unsigned char)(c + 32) : c;
}

uint64_t mp_sup_key(const mp_sup *s, const char *tenant, size_t tlen, const char *addr, size_t alen)
{
    unsigned char buf[MP_SUP_TENANT_MAX + 1 + MP_SUP_ADDRESS_MAX];
    size_t i;
    uint64_t k;
    if (tlen > MP_SUP_TENANT_MAX) tlen = MP_SUP_TENANT_MAX;
    if (alen > MP_SUP_ADDRESS_MAX) alen = MP_SUP_ADDRESS_MAX;
    memcpy(buf, tenant, tlen);
    buf[tlen] = 0;
    for (i = 0; i < alen; i++) buf[tlen + 1 + i] = lower((unsigned char)addr[i]);
    k = siphash13(s->k0, s->k1, buf, tlen + 1 + alen);
    return k ? k : 1;
}

/* how far slot i is from where key k wants to be */
static size_t dist(const mp_sup *s, size_t i, uint64_t k)
{
    return (i - (size_t)k) & (s->cap - 1);
}

static long find_slot(const mp_sup *s, uint64_t key)
{
    size_t mask = s->cap - 1, i = (size_t)key & mask, d = 0;
    for (;;) {
        uint64_t k = s->slots[i].key;
        if (k == 0) return -1;
        if (k == key) return (long)i;
        /* Robin Hood: key would have displaced this one */
        if (dist(s, i, k) < d) return -1;
        i = (i + 1) & mask;
        d++;
    }
}

/* Insert an entry whose key is absent (its reason may carry a mark). */
static void place(mp_sup *s, slot e)
{
    size_t mask = s->cap - 1, i = (size_t)e.key & mask, d = 0;
    for (;;) {
        slot *at = &s->slots[i];
        size_t kd;
        if (at->key == 0) {
            *at = e;
            return;
        }
        kd = dist(s, i, at->key);
        if (kd < d) {
            /* take the slot from the entry nearer its home, and carry that one on */
            slot t = *at;
            *at = e;
            e = t;
            d = kd;
        }
        i = (i + 1) & mask;
        d++;
    }
}

static int grow(mp_sup *s)
{
    size_t old = s->cap, i, bytes;
    slot *olds = s->slots;
    slot *news = slots_alloc(old * 2, &bytes);
    if (news == NULL) return -1;
    s->slots = news;
    s->cap = old * 2;
    s->bytes = bytes;
    for (i = 0; i < old; i++)
        if (olds[i].key) place(s, olds[i]);
    free(olds);
    return 0;
}

static void tenant_adjust(mp_sup *s, const char *tenant, size_t tlen, int delta)
{
    int id = delta > 0 ? strtab_intern(&s->tenants, tenant, tlen, (size_t)-1) : strtab_find(&s->tenants, tenant, tlen);
    if (id < 0) return; /* out of memory: the per-tenant count is off, the set is right */
    if (delta > 0) s->tenants.count[id]++;
    else if (s->tenants.count[id] > 0) s->tenants.count[id]--;
}

int mp_sup_add(mp_sup *s, const char *tenant, size_t tlen, const char *addr, size_t alen, uint32_t time,
               unsigned reason)
{
    uint64_t key = mp_sup_key(s, tenant, tlen, addr, alen);
    long i = find_slot(s, key);
    slot e;
    if (i >= 0) {
        s->slots[i].time = time;
        s->slots[i].reason = (uint16_t)((s->slots[i].reason & MARK) | (reason & ~MARK));
        return 0;
    }
    if ((s->count + 1) * 8 > s->cap * 7 && grow(s) != 0) return -1;
    e.key = key;
    e.time = time;
    e.reason = (uint16_t)(reason & ~MARK);
    place(s, e);
    s->count++;
    tenant_adjust(s, tenant, tlen, 1);
    return 1;
}

int mp_sup_remove(mp_sup *s, const char *tenant, size_t tlen, const char *addr, size_t alen)
{
    size_t mask = s->cap - 1, i, j;
    long found = find_slot(s, mp_sup_key(s, tenant, tlen, addr, alen));
    if (found < 0) return 0;
    /* backward shift: pull the following displaced entries one slot back */
    i = (size_t)found;
    for (j = (i + 1) & mask; s->slots[j].key != 0 && dist(s, j, s->slots[j].key) > 0; j = (j + 1) & mask) {
        s->slots[i] = s->slots[j];
        i = j;
    }
    s->slots[i].key = 0;
    s->count--;
    tenant_adjust(s, tenant, tlen, -1);
    return 1;
}

int mp_sup_lookup(const mp_sup *s, const char *tenant, size_t tlen, const char *addr, size_t alen,
                  uint32_t *time, unsigned *reason)
{
    long i = find_slot(s, mp_sup_key(s, tenant, tlen, addr, alen));
    if (i < 0) return 0;
    if (time) *time = s->slots[i].time;
    if (reason) *reason = s->slots[i].reason & ~MARK;
    return 1;
}

size_t mp_sup_count(const mp_sup *s)
{
    return s->count;
}

size_t mp_sup_tenant_count(const mp_sup *s, const char *tenant, size_t tlen)
{
    int id = strtab_find(&s->tenants, tenant, tlen);
    return id < 0 ? 0 : (size_t)s->tenants.count[id];
}

size_t mp_sup_slots(const mp_sup *s)
{
    return s->cap;
}

size_t mp_sup_memory(const mp_sup *s)
{
    return sizeof *s + s->bytes + strtab_memory(&s->tenants) + strtab_memory(&s->reasons_tab);
}

int mp_sup_reason(mp_sup *s, const char *text, size_t len)
{
    int id = strtab_intern(&s->reasons_tab, text, len, MP_SUP_REASONS_MAX);
    if (id < 0 && s->reasons_tab.n >= MP_SUP_REASONS_MAX) return REASON_OTHER;
    return id;
}

int mp_sup_reason_find(const mp_sup *s, const char *text, size_t len)
{
    int id = strtab_find(&s->reasons_tab, text, len);
    if (id < 0 && s->reasons_tab.n >= MP_SUP_REASONS_MAX) return REASON_OTHER;
    return id;
}

const char *mp_sup_reason_text(const mp_sup *s, unsigned id, size_t *len)
{
    if (id >= s->reasons_tab.n) id = REASON_OTHER;
    if (len) *len = s->reasons_tab.len[id];
    return s->reasons_tab.str[id];
}

int mp_sup_live_once(mp_sup *s, const char *tenant, size_t tlen, const char *addr, size_t alen, uint32_t time,
                     const char *reason, size_t rlen)
{
    long i = find_slot(s, mp_sup_key(s, tenant, tlen, addr, alen));
    int rid;
    if (i < 0 || (s->slots[i].reason & MARK) || s->slots[i].time != time) return 0;
    rid = mp_sup_reason_find(s, reason, rlen);
    if (rid < 0 || (unsigned)rid != (s->slots[i].reason & ~MARK)) return 0;
    s->slots[i].reason |= MARK;
    return 1;
}

void mp_sup_clear_marks(mp_sup *s)
{
    size_t i;
    for (i = 0; i < s->cap; i++) s->slots[i].reason &= (uint16_t)~MARK;
}

/* ---- records -------------------------------------------------------------------------------- */

static const char *check_field(const char *p, size_t n, size_t max, const char *why)
{
    size_t i;
    if (n > max) return why;
    for (i = 0; i < n; i++) {
        unsigned char c = (unsigned char)p[i];
        if (c == '\t' || c == '\n' || c == '\r' || c == 0) return why;
    }
    return NULL;
}

const char *mp_sup_check(const mp_sup_rec *r)
{
    const char *why;
    if (r->op != 'A' && r->op != 'R') return "bad operation";
    if ((why = check_field(r->tenant, r->tenant_len, MP_SUP_TENANT_MAX, "bad tenant")) != NULL) return why;
    if (r->addr_len == 0) return "bad address";
    if ((why = check_field(r->addr, r->addr_len, MP_SUP_ADDRESS_MAX, "bad address")) != NULL) return why;
    if (r->op == 'A' && (why = check_field(r->reason, r->reason_len, MP_SUP_REASON_MAX, "bad reason")) != NULL)
        return why;
    return NULL;
}

static const char hex[] = "0123456789abcdef";

size_t mp_sup_format(char *out, const mp_sup_rec *r)
{
    char *p = out;
    size_t i;
    uint32_t t = r->time, crc;
    char digits[10];
    int nd = 0;
    *p++ = (char)r->op;
    *p++ = '\t';
    memcpy(p, r->tenant, r->tenant_len);
    p += r->tenant_len;
    *p++ = '\t';
    for (i = 0; i < r->addr_len; i++) *p++ = (char)lower((unsigned char)r->addr[i]);
    *p++ = '\t';
    if (r->op == 'A') {
        memcpy(p, r->reason, r->reason_len);
        p += r->reason_len;
        *p++ = '\t';
    }
    do {
        digits[nd++] = (char)('0' + t % 10);
        t /= 10;
    } while (t);
    while (nd) *p++ = digits[--nd];
    crc = mp_crc32c(0, out, (size_t)(p - out));
    *p++ = '\t';
    for (i = 0; i < 8; i++) *p++ = hex[(crc >> (28 - 4 * i)) & 15];
    *p++ = '\n';
    return (size_t)(p - out);
}

static int hexval(char c)
{
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
}

const char *mp_sup_parse(const char *line, size_t len, mp_sup_rec *r)
{
    const char *f[6];
    size_t fl[6];
    size_t nf = 0, i, start = 0, body;
    uint32_t crc = 0;
    uint64_t t = 0;
    if (len > MP_SUP_LINE_MAX) return "line too long";
    if (len < 2 || (line[0] != 'A' && line[0] != 'R') || line[1] != '\t') return "not a record";
    for (i = 0; i <= len; i++) {
        if (i == len || line[i] == '\t') {
            if (nf == 6) return "too many fields";
            f[nf] = line + start;
            fl[nf] = i - start;
            nf++;
            start = i + 1;
        }
    }
    if (nf != (line[0] == 'A' ? 6u : 5u)) return "wrong number of fields";
    /* the checksum: 8 hex digits over everything before its tab */
    if (fl[nf - 1] != 8) return "bad checksum field";
    for (i = 0; i < 8; i++) {
        int v = hexval(f[nf - 1][i]);
        if (v < 0) return "bad checksum field";
        crc = crc << 4 | (uint32_t)v;
    }
    body = (size_t)(f[nf - 1] - line) - 1;
    if (mp_crc32c(0, line, body) != crc) return "checksum mismatch";
    if (fl[0] != 1) return "not a record";
    r->op = line[0];
    r->tenant = f[1];
    r->tenant_len = fl[1];
    r->addr = f[2];
    r->addr_len = fl[2];
    if (r->op == 'A') {
        r->reason = f[3];
        r->reason_len = fl[3];
    } else {
        r->reason = "";
        r->reason_len = 0;
    }
    if (fl[nf - 2] == 0 || fl[nf - 2] > 10) return "bad time";
    for (i = 0; i < fl[nf - 2]; i++) {
        char c = f[nf - 2][i];
        if (c < '0' || c > '9') return "bad time";
        t = t * 10 + (uint64_t)(c - '0');
    }
    if (t > UINT32_MAX) return "bad time";
    r->time = (uint32_t)t;
    return mp_sup_check(r);
}

/* ---- loader ------------------------------------------------------------------------------------ */

struct mp_sup_loader {
    mp_sup *s;
    mp_sup_load res;
    char carry[MP_SUP_LINE_MAX + 1]; /* a line split across pushes */
    size_t ncarry;
    int skipping;    /* inside an over-long line: drop until its LF */
    uint64_t off;    /* offset of the next octet pushed */
    uint64_t line_off;
    /* damaged lines since the last valid one: corrupt if a valid line follows, torn if not */
    uint64_t run_off, run_lines;
    mp_sup_bad run_bad[MP_SUP_REPORT];
};

mp_sup_loader *mp_sup_loader_new(mp_sup *s)
{
    mp_sup_loader *l = calloc(1, sizeof *l);
    if (l == NULL) return NULL;
    l->s = s;
    return l;
}

static void bad_line(mp_sup_loader *l, uint64_t off, const char *why)
{
    if (l->run_lines < MP_SUP_REPORT) {
        l->run_bad[l->run_lines].off = off;
        l->run_bad[l->run_lines].why = why;
    }
    if (l->run_lines == 0) l->run_off = off;
    l->run_lines++;
}

static void good_line(mp_sup_loader *l)
{
    uint64_t k;
    /* the damaged lines before this one are in the middle: skipped, reported */
    for (k = 0; k < l->run_lines && k < MP_SUP_REPORT; k++) {
        if (l->res.corrupt + k < MP_SUP_REPORT) l->res.bad[l->res.corrupt + k] = l->run_bad[k];
    }
    l->res.corrupt += l->run_lines;
    l->run_lines = 0;
}

static void apply(mp_sup_loader *l, const char *line, size_t len, uint64_t off)
{
    mp_sup_rec r;
    const char *why;
    if (len > 0 && line[0] == '#') {
        good_line(l);
        return;
    }
    why = mp_sup_parse(line, len, &r);
    if (why != NULL) {
        bad_line(l, off, why);
        return;
    }
    if (r.op == 'A') {
        int reason = mp_sup_reason(l->s, r.reason, r.reason_len);
        if (reason < 0 || mp_sup_add(l->s, r.tenant, r.tenant_len, r.addr, r.addr_len, r.time, (unsigned)reason) < 0)
            l->res.nomem = 1;
    } else {
        mp_sup_remove(l->s, r.tenant, r.tenant_len, r.addr, r.addr_len);
    }
    l->res.records++;
    good_line(l);
}

int mp_sup_loader_push(mp_sup_loader *l, const char *p, size_t n)
{
    const char *end = p + n;
    while (p < end) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        size_t part = nl ? (size_t)(nl - p) : (size_t)(end - p);
        if (l->skipping) {
            /* the rest of an over-long line */
        } else if (l->ncarry == 0 && nl) {
            apply(l, p, part, l->line_off); /* the common case: the whole line is here */
        } else if (l->ncarry + part > MP_SUP_LINE_MAX) {
            bad_line(l, l->line_off, "line too long");
            l->skipping = 1;
            l->ncarry = 0;
        } else {
            memcpy(l->carry + l->ncarry, p, part);
            l->ncarry += part;
            if (nl) {
                apply(l, l->carry, l->ncarry, l->line_off);
                l->ncarry = 0;
            }
        }
        l->off += part;
        p += part;
        if (nl) {
            p++;
            l->off++;
            l->line_off = l->off;
            l->skipping = 0;
        }
    }
    l->res.size = l->off;
    return 0;
}

void mp_sup_loader_finish(mp_sup_loader *l, mp_sup_load *out)
{
    l->res.size = l->off;
    if (l->line_off < l->off && !l->skipping) {
        /* a last line without its LF: a write cut short */
        bad_line(l, l->line_off, "incomplete line");
    } else if (l->skipping) {
        /* counted already as "line too long" */
    }
    if (l->run_lines == 1) {
        /* A crash cuts the last write short (or leaves zeroed pages past
         * it): that shows as one damaged last line, since a zeroed page
         * holds no LF. Nobody was told it was stored: it is cut. */
        l->res.torn = 1;
        l->res.torn_off = l->run_off;
        l->res.torn_why = l->run_bad[0].why;
        l->res.torn_lines = l->run_lines;
    } else if (l->run_lines > 1) {
        /* Several damaged lines at the end are no torn write but damage
         * (or text that is not ours): skipped and reported like damage in
         * the middle, never cut, so that nobody loses what they hold. */
        good_line(l);
        l->res.unterminated = l->line_off < l->off;
    }
    *out = l->res;
    free(l);
}
