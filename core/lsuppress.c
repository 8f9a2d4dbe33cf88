/*
 * moonpost.core.suppress: the suppression store (core/suppress.c) over its
 * append-only log file.
 *
 *   suppress.open(path)            -> store, report | nil, err, code
 *       Creates the file if needed, takes an exclusive flock on it, loads
 *       every line and cuts a torn last line off. report = { records, live,
 *       size, corrupt, bad = { { off, why }, ... }, torn = offset | nil,
 *       torn_why, torn_lines, unterminated = true | nil }. A file that does not
 *       start with the header is refused: nil, "not a suppression log ...", "EFTYPE".
 *   suppress.parse(line)           -> op, tenant, address, reason, time | nil, why
 *   suppress.format(op, tenant, address, reason, time) -> line | nil, why
 *
 *   store:add(tenant, address, reason [, time]) -> true (added) | false (already there)
 *                                                 | nil, "bad address" ...
 *   store:remove(tenant, address [, time])     -> true | false (not there)
 *   store:check(tenant, address)               -> time, reason | nil
 *   store:count([tenant])                      -> entries (of that tenant, or all)
 *       Writes go to a buffer in memory; flush() writes it to the file (one
 *       pwrite). Making it durable (fdatasync of fd()) is the caller's.
 *   store:flush()                              -> true | nil, err, code
 *   store:pending()                            -> octets buffered
 *   store:garbage()                            -> dead records, live entries
 *   store:fd(), store:stats(), store:close()
 *
 *   Scans read the file, never memory, and give each live entry once:
 *   store:scan_begin()                         -> end offset | nil, err, code
 *   store:read(from, to [, tenant])            -> next, rows  (rows: flat list of
 *       tenant, address, reason, time for each live entry in [from, next))
 *   store:scan_end()
 *
 *   Compaction: live entries to a new file, then rename it over the log.
 *   store:compact_begin(tmp)                   -> end offset | nil, err, code
 *   store:compact_step(from, to)               -> next | nil, err, code
 *   store:compact_tail()                       -> true | nil, err, code
 *       copies what was appended to the log since compact_begin (or the
 *       last compact_tail) to the new file as it is
 *   store:compact_fd()                         -> fd of the new file
 *   store:compact_finish(tmp, path)            -> true | nil, err, code
 *       compact_tail(), rename(tmp, path); the store then writes to the new file
 *   store:compact_abort(tmp)
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "lcompat.h"
#include "suppress.h"

#define STORE_MT "moonpost.core.suppress.store"

/* Octets read at a time by open() and by the scans. */
#ifndef MP_SUP_CHUNK
#define MP_SUP_CHUNK (1024 * 1024)
#endif
/* The compaction's output is written when this much is buffered. */
#ifndef MP_SUP_CBUF
#define MP_SUP_CBUF (1024 * 1024)
#endif

typedef struct buf {
    char *p;
    size_t len, cap;
} buf;

typedef struct lstore {
    mp_sup *set;
    int fd;           /* -1: closed */
    off_t end;        /* octets in the file */
    buf w;            /* lines not yet written, to go at end */
    uint64_t records; /* A and R lines in the file (live + dead) */
    /* compaction */
    int cfd;
    off_t cend;       /* octets in the new file */
    off_t csrc;       /* the log is copied to the new file up to here */
    uint64_t crecords;
    buf c;
} lstore;

static int buf_reserve(buf *b, size_t more)
{
    if (b->len + more > b->cap) {
        size_t cap = b->cap ? b->cap : 65536;
        char *p;
        while (cap < b->len + more) cap *= 2;
        p = realloc(b->p, cap);
        if (p == NULL) return -1;
        b->p = p;
        b->cap = cap;
    }
    return 0;
}

static void buf_free(buf *b)
{
    free(b->p);
    b->p = NULL;
    b->len = b->cap = 0;
}

/* Write all of p at off; 0 or -errno (with the file cut back to off). */
static int write_at(int fd, const char *p, size_t n, off_t off)
{
    size_t done = 0;
    while (done < n) {
        ssize_t w = pwrite(fd, p + done, n - done, off + (off_t)done);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) {
            int e = w < 0 ? errno : EIO;
            while (ftruncate(fd, off) != 0 && errno == EINTR) ;
            return -e;
        }
        done += (size_t)w;
    }
    return 0;
}

static lstore *checkstore(lua_State *L, int i)
{
    lstore *st = luaL_checkudata(L, i, STORE_MT);
    if (st->fd < 0) luaL_argerror(L, i, "store is closed");
    return st;
}

/* The buffer to the end of the file. On failure the file is as before and
 * the buffer is kept, so that a later flush can try again. */
static int store_flush(lstore *st)
{
    int r;
    if (st->w.len == 0) return 0;
    r = write_at(st->fd, st->w.p, st->w.len, st->end);
    if (r != 0) return r;
    st->end += (off_t)st->w.len;
    st->w.len = 0;
    if (st->w.cap > 4 * 1024 * 1024) buf_free(&st->w);
    return 0;
}

static void compact_close(lstore *st)
{
    if (st->cfd >= 0) {
        close(st->cfd);
        st->cfd = -1;
    }
    buf_free(&st->c);
}

static void store_close(lstore *st)
{
    if (st->fd >= 0) {
        store_flush(st); /* to the page cache; the caller synced what it promised */
        close(st->fd);
        st->fd = -1;
    }
    compact_close(st);
    buf_free(&st->w);
    mp_sup_free(st->set);
    st->set = NULL;
}

static const char *opt_tenant(lua_State *L, int i, size_t *len)
{
    return luaL_checklstring(L, i, len);
}

static uint32_t opt_time(lua_State *L, int i)
{
    lua_Number t;
    if (lua_isnoneornil(L, i)) return (uint32_t)time(NULL);
    t = luaL_checknumber(L, i);
    if (t < 0 || t > 4294967295.0) luaL_argerror(L, i, "time out of range");
    return (uint32_t)t;
}

static int push_why(lua_State *L, const char *why)
{
    lua_pushnil(L);
    lua_pushstring(L, why);
    return 2;
}

/* ---- open ------------------------------------------------------------------------------- */

static void push_report(lua_State *L, const mp_sup_load *r, const mp_sup *set)
{
    uint64_t k;
    lua_createtable(L, 0, 9);
    lua_pushnumber(L, (lua_Number)r->records);
    lua_setfield(L, -2, "records");
    lua_pushnumber(L, (lua_Number)mp_sup_count(set));
    lua_setfield(L, -2, "live");
    lua_pushnumber(L, (lua_Number)r->size);
    lua_setfield(L, -2, "size");
    lua_pushnumber(L, (lua_Number)r->corrupt);
    lua_setfield(L, -2, "corrupt");
    lua_newtable(L);
    for (k = 0; k < r->corrupt && k < MP_SUP_REPORT; k++) {
        lua_createtable(L, 0, 2);
        lua_pushnumber(L, (lua_Number)r->bad[k].off);
        lua_setfield(L, -2, "off");
        lua_pushstring(L, r->bad[k].why);
        lua_setfield(L, -2, "why");
        lua_rawseti(L, -2, (int)k + 1);
    }
    lua_setfield(L, -2, "bad");
    if (r->torn) {
        lua_pushnumber(L, (lua_Number)r->torn_off);
        lua_setfield(L, -2, "torn");
        lua_pushstring(L, r->torn_why);
        lua_setfield(L, -2, "torn_why");
        lua_pushnumber(L, (lua_Number)r->torn_lines);
        lua_setfield(L, -2, "torn_lines");
    }
    if (r->unterminated) {
        lua_pushboolean(L, 1);
        lua_setfield(L, -2, "unterminated");
    }
}

static int l_open(lua_State *L)
{
    const char *path = luaL_checkstring(L, 1);
    lstore *st = lua_newuserdata(L, sizeof *st);
    mp_sup_loader *ld;
    mp_sup_load res;
    char *chunk;
    memset(st, 0, sizeof *st);
    st->fd = st->cfd = -1;
    luaL_getmetatable(L, STORE_MT);
    lua_setmetatable(L, -2);
    st->set = mp_sup_new(NULL);
    if (st->set == NULL) return mp_pusherrno(L, "open", ENOMEM);
    st->fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (st->fd < 0) return mp_pusherrno(L, "open", errno);
    /* One writer per file: a second process would interleave its lines. */
    if (flock(st->fd, LOCK_EX | LOCK_NB) != 0) {
        int e = errno;
        store_close(st);
        if (e != EWOULDBLOCK) return mp_pusherrno(L, "lock", e);
        lua_pushnil(L);
        lua_pushfstring(L, "locked: %s is in use by another process", path);
        lua_pushliteral(L, "EWOULDBLOCK");
        return 3;
    }
    /* Ours, or refused untouched: a wrong path must not cost a file its
     * contents (what follows a header we did not write is never cut). */
    {
        char head[sizeof MP_SUP_HEADER];
        size_t want = sizeof MP_SUP_HEADER - 1;
        ssize_t n;
        do n = pread(st->fd, head, want, 0);
        while (n < 0 && errno == EINTR);
        if (n < 0) {
            int e = errno;
            store_close(st);
            return mp_pusherrno(L, "read", e);
        }
        if (n > 0 && memcmp(head, MP_SUP_HEADER, (size_t)n) != 0) {
            store_close(st);
            lua_pushnil(L);
            lua_pushliteral(L, "not a suppression log (its first line is not \"# moonpost suppression log 1\"); "
                               "left as it is");
            lua_pushliteral(L, "EFTYPE");
            return 3;
        }
        if (n > 0 && (size_t)n < want) {
            /* the header of a new file, cut short by a crash: start over */
            if (ftruncate(st->fd, 0) != 0) {
                int e = errno;
                store_close(st);
                return mp_pusherrno(L, "truncate", e);
            }
        }
    }
    ld = mp_sup_loader_new(st->set);
    chunk = malloc(MP_SUP_CHUNK);
    if (ld == NULL || chunk == NULL) {
        free(chunk);
        if (ld) mp_sup_loader_finish(ld, &res);
        return mp_pusherrno(L, "open", ENOMEM);
    }
    for (;;) {
        ssize_t n = read(st->fd, chunk, MP_SUP_CHUNK);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) {
            int e = errno;
            free(chunk);
            mp_sup_loader_finish(ld, &res);
            return mp_pusherrno(L, "read", e);
        }
        if (n == 0) break;
        mp_sup_loader_push(ld, chunk, (size_t)n);
    }
    free(chunk);
    mp_sup_loader_finish(ld, &res);
    if (res.nomem) return mp_pusherrno(L, "open", ENOMEM);
    st->end = (off_t)res.size;
    st->records = res.records;
    if (res.torn) {
        /* a write cut short by a crash: nobody was told it was stored */
        if (ftruncate(st->fd, (off_t)res.torn_off) != 0) return mp_pusherrno(L, "truncate", errno);
        st->end = (off_t)res.torn_off;
    }
    if (res.unterminated) {
        /* damage kept at the end: the next line starts on a line of its own */
        int r = write_at(st->fd, "\n", 1, st->end);
        if (r != 0) return mp_pusherrno(L, "write", -r);
        st->end += 1;
    }
    if (st->end == 0) {
        int r = write_at(st->fd, MP_SUP_HEADER, sizeof MP_SUP_HEADER - 1, 0);
        if (r != 0) return mp_pusherrno(L, "write", -r);
        st->end = sizeof MP_SUP_HEADER - 1;
    }
    push_report(L, &res, st->set);
    return 2;
}

/* ---- changes ------------------------------------------------------------------------------- */

static int s_add(lua_State *L)
{
    lstore *st = checkstore(L, 1);
    mp_sup_rec r;
    int reason;
    size_t n;
    r.op = 'A';
    r.tenant = opt_tenant(L, 2, &r.tenant_len);
    r.addr = luaL_checklstring(L, 3, &r.addr_len);
    r.reason = luaL_checklstring(L, 4, &r.reason_len);
    r.time = opt_time(L, 5);
    {
        const char *why = mp_sup_check(&r);
        if (why) return push_why(L, why);
    }
    if (mp_sup_lookup(st->set, r.tenant, r.tenant_len, r.addr, r.addr_len, NULL, NULL)) {
        lua_pushboolean(L, 0);
        return 1;
    }
    reason = mp_sup_reason(st->set, r.reason, r.reason_len);
    if (reason < 0 || buf_reserve(&st->w, MP_SUP_LINE_MAX) != 0) return mp_pusherrno(L, "add", ENOMEM);
    n = mp_sup_format(st->w.p + st->w.len, &r);
    if (mp_sup_add(st->set, r.tenant, r.tenant_len, r.addr, r.addr_len, r.time, (unsigned)reason) < 0)
        return mp_pusherrno(L, "add", ENOMEM);
    st->w.len += n;
    st->records++;
    lua_pushboolean(L, 1);
    return 1;
}

static int s_remove(lua_State *L)
{
    lstore *st = checkstore(L, 1);
    mp_sup_rec r;
    r.op = 'R';
    r.tenant = opt_tenant(L, 2, &r.tenant_len);
    r.addr = luaL_checklstring(L, 3, &r.addr_len);
    r.reason = "";
    r.reason_len = 0;
    r.time = opt_time(L, 4);
    if (mp_sup_check(&r) != NULL ||
        !mp_sup_lookup(st->set, r.tenant, r.tenant_len, r.addr, r.addr_len, NULL, NULL)) {
        lua_pushboolean(L, 0);
        return 1;
    }
    if (buf_reserve(&st->w, MP_SUP_LINE_MAX) != 0) return mp_pusherrno(L, "remove", ENOMEM);
    st->w.len += mp_sup_format(st->w.p + st->w.len, &r);
    mp_sup_remove(st->set, r.tenant, r.tenant_len, r.addr, r.addr_len);
    st->records++;
    lua_pushboolean(L, 1);
    return 1;
}

/* check(tenant, address) -> time, reason | nil. The hot path: no disk. */
static int s_check(lua_State *L)
{
    lstore *st = checkstore(L, 1);
    size_t tl, al, rl;
    const char *tenant = opt_tenant(L, 2, &tl);
    const char *addr = luaL_checklstring(L, 3, &al);
    uint32_t t;
    unsigned reason;
    const char *rt;
    /* longer than anything the store accepts: cannot be in it */
    if (tl > MP_SUP_TENANT_MAX || al > MP_SUP_ADDRESS_MAX ||
        !mp_sup_lookup(st->set, tenant, tl, addr, al, &t, &reason)) {
        lua_pushnil(L);
        return 1;
    }
    rt = mp_sup_reason_text(st->set, reason, &rl);
    lua_pushnumber(L, (lua_Number)t);
    lua_pushlstring(L, rt, rl);
    return 2;
}

static int s_count(lua_State *L)
{
    lstore *st = checkstore(L, 1);
    if (lua_isnoneornil(L, 2)) {
        lua_pushnumber(L, (lua_Number)mp_sup_count(st->set));
    } else {
        size_t tl;
        const char *t = luaL_checklstring(L, 2, &tl);
        lua_pushnumber(L, (lua_Number)mp_sup_tenant_count(st->set, t, tl));
    }
    return 1;
}

static int s_flush(lua_State *L)
{
    lstore *st = checkstore(L, 1);
    int r = store_flush(st);
    if (r != 0) return mp_pusherrno(L, "write", -r);
    lua_pushboolean(L, 1);
    return 1;
}

static int s_pending(lua_State *L)
{
    lua_pushnumber(L, (lua_Number)checkstore(L, 1)->w.len);
    return 1;
}

static int s_fd(lua_State *L)
{
    lua_pushinteger(L, checkstore(L, 1)->fd);
    return 1;
}

static int s_stats(lua_State *L)
{
    lstore *st = checkstore(L, 1);
    size_t live = mp_sup_count(st->set);
    lua_createtable(L, 0, 7);
    lua_pushnumber(L, (lua_Number)live);
    lua_setfield(L, -2, "live");
    lua_pushnumber(L, (lua_Number)st->records);
    lua_setfield(L, -2, "records");
    lua_pushnumber(L, (lua_Number)(st->records > live ? st->records - live : 0));
    lua_setfield(L, -2, "dead");
    lua_pushnumber(L, (lua_Number)mp_sup_memory(st->set));
    lua_setfield(L, -2, "memory");
    lua_pushnumber(L, (lua_Number)mp_sup_slots(st->set));
    lua_setfield(L, -2, "slots");
    lua_pushnumber(L, (lua_Number)(st->end + (off_t)st->w.len));
    lua_setfield(L, -2, "size");
    lua_pushnumber(L, (lua_Number)st->w.len);
    lua_setfield(L, -2, "pending");
    return 1;
}

/* garbage() -> dead records, live entries: what compaction would drop, cheaply */
static int s_garbage(lua_State *L)
{
    lstore *st = checkstore(L, 1);
    size_t live = mp_sup_count(st->set);
    lua_pushnumber(L, (lua_Number)(st->records > live ? st->records - live : 0));
    lua_pushnumber(L, (lua_Number)live);
    return 2;
}

static int s_close(lua_State *L)
{
    store_close(luaL_checkudata(L, 1, STORE_MT));
    lua_pushboolean(L, 1);
    return 1;
}

static int s_gc(lua_State *L)
{
    store_close(luaL_checkudata(L, 1, STORE_MT));
    return 0;
}

/* ---- scans ------------------------------------------------------------------------------------ */

/* Visit the complete lines of the log in [from, to), reading at most one
 * chunk. Returns the offset after the last line visited (a line cut at the
 * end of the chunk is left for the next call), or -errno. */
typedef void (*line_fn)(lstore *st, const char *line, size_t len, void *ud);

static off_t visit(lstore *st, off_t from, off_t to, line_fn fn, void *ud)
{
    size_t want, got = 0;
    char *chunk;
    const char *p, *end;
    if (from >= to) return to;
    want = (size_t)(to - from) < MP_SUP_CHUNK ? (size_t)(to - from) : MP_SUP_CHUNK;
    chunk = malloc(want);
    if (chunk == NULL) return -ENOMEM;
    while (got < want) {
        ssize_t n = pread(st->fd, chunk + got, want - got, from + (off_t)got);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) {
            int e = errno;
            free(chunk);
            return -e;
        }
        if (n == 0) break;
        got += (size_t)n;
    }
    p = chunk;
    end = chunk + got;
    while (p < end) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        if (nl == NULL) {
            /* cut by the chunk: next time; no LF in a whole chunk, or at the
             * very end: damage, passed over */
            if (p != chunk && from + (off_t)got < to) break;
            p = end;
            break;
        }
        fn(st, p, (size_t)(nl - p), ud);
        p = nl + 1;
    }
    free(chunk);
    if (got < want) return to; /* the file is shorter than it should be */
    return from + (off_t)(p - chunk);
}

static int s_scan_begin(lua_State *L)
{
    lstore *st = checkstore(L, 1);
    int r = store_flush(st);
    if (r != 0) return mp_pusherrno(L, "write", -r);
    mp_sup_clear_marks(st->set);
    lua_pushnumber(L, (lua_Number)st->end);
    return 1;
}

static int s_scan_end(lua_State *L)
{
    mp_sup_clear_marks(checkstore(L, 1)->set);
    return 0;
}

typedef struct read_ud {
    lua_State *L;
    const char *tenant;
    size_t tenant_len;
    int n;
} read_ud;

static void read_line(lstore *st, const char *line, size_t len, void *ud)
{
    read_ud *u = ud;
    mp_sup_rec r;
    if (mp_sup_parse(line, len, &r) != NULL || r.op != 'A') return;
    if (u->tenant && (r.tenant_len != u->tenant_len || memcmp(r.tenant, u->tenant, r.tenant_len) != 0)) return;
    if (!mp_sup_live_once(st->set, r.tenant, r.tenant_len, r.addr, r.addr_len, r.time, r.reason, r.reason_len))
        return;
    lua_pushlstring(u->L, r.tenant, r.tenant_len);
    lua_rawseti(u->L, -2, ++u->n);
    lua_pushlstring(u->L, r.addr, r.addr_len);
    lua_rawseti(u->L, -2, ++u->n);
    lua_pushlstring(u->L, r.reason, r.reason_len);
    lua_rawseti(u->L, -2, ++u->n);
    lua_pushnumber(u->L, (lua_Number)r.time);
    lua_rawseti(u->L, -2, ++u->n);
}

static off_t check_range(lua_State *L, lstore *st, int i, off_t *to)
{
    lua_Number from = luaL_checknumber(L, i);
    lua_Number t = luaL_checknumber(L, i + 1);
    if (from < 0 || t < from) luaL_argerror(L, i, "bad range");
    *to = (off_t)t > st->end ? st->end : (off_t)t;
    return (off_t)from;
}

static int s_read(lua_State *L)
{
    lstore *st = checkstore(L, 1);
    off_t to, from = check_range(L, st, 2, &to), next;
    read_ud u;
    u.L = L;
    u.n = 0;
    u.tenant = lua_isnoneornil(L, 4) ? NULL : luaL_checklstring(L, 4, &u.tenant_len);
    lua_newtable(L);
    next = visit(st, from, to, read_line, &u);
    if (next < 0) return mp_pusherrno(L, "read", (int)-next);
    lua_pushnumber(L, (lua_Number)next);
    lua_insert(L, -2);
    return 2;
}

/* ---- compaction ----------------------------------------------------------------------------------- */

static int cflush(lstore *st)
{
    int r;
    if (st->c.len == 0) return 0;
    r = write_at(st->cfd, st->c.p, st->c.len, st->cend);
    if (r != 0) return r;
    st->cend += (off_t)st->c.len;
    st->c.len = 0;
    return 0;
}

static lstore *checkcompact(lua_State *L)
{
    lstore *st = checkstore(L, 1);
    if (st->cfd < 0) luaL_argerror(L, 1, "no compaction in progress");
    return st;
}

static int s_compact_begin(lua_State *L)
{
    lstore *st = checkstore(L, 1);
    const char *tmp = luaL_checkstring(L, 2);
    int r;
    if (st->cfd >= 0) luaL_argerror(L, 1, "a compaction is in progress");
    r = store_flush(st);
    if (r != 0) return mp_pusherrno(L, "write", -r);
    st->cfd = open(tmp, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (st->cfd < 0) return mp_pusherrno(L, "open", errno);
    /* the lock moves with the file: the new one is locked before its rename */
    if (flock(st->cfd, LOCK_EX | LOCK_NB) != 0) {
        int e = errno;
        compact_close(st);
        return mp_pusherrno(L, "lock", e);
    }
    st->cend = 0;
    st->crecords = 0;
    st->csrc = st->end;
    if (buf_reserve(&st->c, sizeof MP_SUP_HEADER) != 0) {
        compact_close(st);
        return mp_pusherrno(L, "compact", ENOMEM);
    }
    memcpy(st->c.p, MP_SUP_HEADER, sizeof MP_SUP_HEADER - 1);
    st->c.len = sizeof MP_SUP_HEADER - 1;
    mp_sup_clear_marks(st->set);
    lua_pushnumber(L, (lua_Number)st->end);
    return 1;
}

typedef struct copy_ud {
    int err;
} copy_ud;

static void copy_line(lstore *st, const char *line, size_t len, void *ud)
{
    copy_ud *u = ud;
    mp_sup_rec r;
    if (u->err) return;
    if (mp_sup_parse(line, len, &r) != NULL || r.op != 'A') return;
    if (!mp_sup_live_once(st->set, r.tenant, r.tenant_len, r.addr, r.addr_len, r.time, r.reason, r.reason_len))
        return;
    if (st->c.len + len + 1 > MP_SUP_CBUF && (u->err = cflush(st)) != 0) return;
    if (buf_reserve(&st->c, len + 1) != 0) {
        u->err = -ENOMEM;
        return;
    }
    memcpy(st->c.p + st->c.len, line, len);
    st->c.p[st->c.len + len] = '\n';
    st->c.len += len + 1;
    st->crecords++;
}

static int s_compact_step(lua_State *L)
{
    lstore *st = checkcompact(L);
    off_t to, from = check_range(L, st, 2, &to), next;
    copy_ud u = {0};
    next = visit(st, from, to, copy_line, &u);
    if (next < 0) return mp_pusherrno(L, "read", (int)-next);
    if (u.err == 0) u.err = cflush(st);
    if (u.err != 0) return mp_pusherrno(L, "write", -u.err);
    lua_pushnumber(L, (lua_Number)next);
    return 1;
}

/* The lines appended to the log since csrc, copied as they are. */
static int compact_tail(lstore *st)
{
    int r = store_flush(st);
    char *chunk;
    if (r != 0) return r;
    if ((r = cflush(st)) != 0) return r;
    if (st->csrc >= st->end) return 0;
    chunk = malloc(MP_SUP_CHUNK);
    if (chunk == NULL) return -ENOMEM;
    while (st->csrc < st->end) {
        size_t want = (size_t)(st->end - st->csrc) < MP_SUP_CHUNK ? (size_t)(st->end - st->csrc) : MP_SUP_CHUNK;
        ssize_t n = pread(st->fd, chunk, want, st->csrc);
        const char *p;
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) {
            free(chunk);
            return n < 0 ? -errno : -EIO;
        }
        if ((r = write_at(st->cfd, chunk, (size_t)n, st->cend)) != 0) {
            free(chunk);
            return r;
        }
        for (p = chunk; (p = memchr(p, '\n', (size_t)(chunk + n - p))) != NULL; p++) st->crecords++;
        st->cend += n;
        st->csrc += n;
    }
    free(chunk);
    return 0;
}

static int s_compact_tail(lua_State *L)
{
    int r = compact_tail(checkcompact(L));
    if (r != 0) return mp_pusherrno(L, "compact", -r);
    lua_pushboolean(L, 1);
    return 1;
}

static int s_compact_fd(lua_State *L)
{
    lua_pushinteger(L, checkcompact(L)->cfd);
    return 1;
}

static int s_compact_finish(lua_State *L)
{
    lstore *st = checkcompact(L);
    const char *tmp = luaL_checkstring(L, 2);
    const char *path = luaL_checkstring(L, 3);
    int r = compact_tail(st);
    if (r != 0) return mp_pusherrno(L, "compact", -r);
    if (rename(tmp, path) != 0) return mp_pusherrno(L, "rename", errno);
    close(st->fd);
    st->fd = st->cfd;
    st->end = st->cend;
    st->records = st->crecords;
    st->cfd = -1;
    buf_free(&st->c);
    mp_sup_clear_marks(st->set);
    lua_pushboolean(L, 1);
    return 1;
}

static int s_compact_abort(lua_State *L)
{
    lstore *st = luaL_checkudata(L, 1, STORE_MT);
    const char *tmp = luaL_checkstring(L, 2);
    if (st->cfd >= 0) {
        compact_close(st);
        unlink(tmp);
    }
    if (st->set) mp_sup_clear_marks(st->set);
    lua_pushboolean(L, 1);
    return 1;
}

/* ---- records as strings (tools, specs) ---------------------------------------------------------------- */

static int l_parse(lua_State *L)
{
    size_t n;
    const char *line = luaL_checklstring(L, 1, &n);
    mp_sup_rec r;
    const char *why;
    if (n > 0 && line[n - 1] == '\n') n--;
    why = mp_sup_parse(line, n, &r);
    if (why) return push_why(L, why);
    lua_pushlstring(L, (const char *)&r.op, 1);
    lua_pushlstring(L, r.tenant, r.tenant_len);
    lua_pushlstring(L, r.addr, r.addr_len);
    if (r.op == 'A') lua_pushlstring(L, r.reason, r.reason_len);
    else lua_pushnil(L);
    lua_pushnumber(L, (lua_Number)r.time);
    return 5;
}

static int l_format(lua_State *L)
{
    const char *op = luaL_checkstring(L, 1);
    mp_sup_rec r;
    char line[MP_SUP_LINE_MAX];
    const char *why;
    r.op = op[0];
    r.tenant = luaL_checklstring(L, 2, &r.tenant_len);
    r.addr = luaL_checklstring(L, 3, &r.addr_len);
    if (r.op == 'A') {
        r.reason = luaL_checklstring(L, 4, &r.reason_len);
    } else {
        r.reason = "";
        r.reason_len = 0;
    }
    r.time = opt_time(L, 5);
    if ((op[0] != 'A' && op[0] != 'R') || op[1] != '\0') luaL_argerror(L, 1, "expected \"A\" or \"R\"");
    why = mp_sup_check(&r);
    if (why) return push_why(L, why);
    lua_pushlstring(L, line, mp_sup_format(line, &r));
    return 1;
}

static const luaL_Reg funcs[] = {{"open", l_open}, {"parse", l_parse}, {"format", l_format}, {NULL, NULL}};

static const luaL_Reg store_methods[] = {
    {"add", s_add},
    {"remove", s_remove},
    {"check", s_check},
    {"count", s_count},
    {"flush", s_flush},
    {"pending", s_pending},
    {"fd", s_fd},
    {"stats", s_stats},
    {"garbage", s_garbage},
    {"scan_begin", s_scan_begin},
    {"read", s_read},
    {"scan_end", s_scan_end},
    {"compact_begin", s_compact_begin},
    {"compact_step", s_compact_step},
    {"compact_tail", s_compact_tail},
    {"compact_fd", s_compact_fd},
    {"compact_finish", s_compact_finish},
    {"compact_abort", s_compact_abort},
    {"close", s_close},
    {NULL, NULL}};
static const luaL_Reg store_meta[] = {{"__gc", s_gc}, {NULL, NULL}};

MP_EXPORT int luaopen_moonpost_core_suppress(lua_State *L);
MP_EXPORT int luaopen_moonpost_core_suppress(lua_State *L)
{
    mp_createmeta(L, STORE_MT, store_meta, store_methods);
    lua_newtable(L);
    mp_setfuncs(L, funcs);
    lua_pushinteger(L, MP_SUP_ADDRESS_MAX);
    lua_setfield(L, -2, "ADDRESS_MAX");
    lua_pushinteger(L, MP_SUP_TENANT_MAX);
    lua_setfield(L, -2, "TENANT_MAX");
    lua_pushinteger(L, MP_SUP_REASON_MAX);
    lua_setfield(L, -2, "REASON_MAX");
    return 1;
}
