/*
 * moonpost.core.spool: segment files, records and the spool lock.
 *
 *   spool.lock(dir [, what])   -> lock | nil, err, code   exclusive flock on dir/LOCK;
 *       what names the directory in the message (default "spool")
 *   spool.open(path, create)   -> segment | nil, err, code
 *   spool.decode(record)       -> type, flags, id, meta, body | nil, why
 *   spool.crc32c(s [, crc])    -> number
 *
 *   segment:append(type, flags, id, meta [, body [, aux]]) -> offset, length | nil, err, code
 *       body: a string or a message (moonpost.core.smtp). Small records are
 *       copied into a write buffer; a large body is written straight from
 *       its buffer (after what is buffered).
 *   segment:flush()            -> true | nil, err, code   write the buffer (one pwrite);
 *       on failure nothing of the buffer stays in the file
 *   segment:pending()          -> bytes buffered;  segment:spill() writes them now,
 *       keeping a failure for the next flush()
 *   segment:scan()             -> scanner; scanner:next() -> one of
 *       "rec", offset, length, type, flags, id, meta, aux
 *       (scanner:next(true) leaves out the metadata of MSG records, nil, unless
 *       aux is 0, unknown, or saturated at 65535, or the record is a DSN's, F_DSN)
 *       "corrupt", offset, length, why      damaged bytes, valid records follow
 *       "torn", offset, why                 damaged or incomplete to the end
 *       "zeros", offset                     only zero bytes from offset to the end
 *                                           (preallocated space: the records end there)
 *       "error", err, code
 *       nil                                 end of file
 *   segment:read(offset, length) -> string   (blocking pread: recovery and tools)
 *   segment:meta(offset)        -> the metadata of the record at offset | nil, why
 *       (blocking; the header is checked, the payload is not read past the metadata)
 *   segment:size(), segment:fd(), segment:truncate(n), segment:close()
 */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include "lcompat.h"
#include "lmessage.h"
#include "spool.h"

#define SEGMENT_MT "moonpost.core.spool.segment"
#define SCAN_MT "moonpost.core.spool.scan"
#define LOCK_MT "moonpost.core.spool.lock"

/* Records smaller than this are buffered and written together at the next
 * flush (one syscall per group commit instead of one per record). */
#ifndef MP_SEG_DIRECT
#define MP_SEG_DIRECT (256 * 1024)
#endif
#ifndef MP_SEG_BUFFER_MAX
#define MP_SEG_BUFFER_MAX (4 * 1024 * 1024)
#endif

typedef struct lsegment {
    int fd;
    off_t end;      /* on disk */
    char *wbuf;     /* records not yet written, to go at end */
    size_t wlen, wcap;
    int pending_err; /* a flush done for a read failed: the next flush() reports it */
} lsegment;

typedef struct lscan {
    mp_scan *s;
} lscan;

typedef struct llock {
    int fd;
} llock;

/* the metatables' addresses, for mp_checkudata_c */
static const void *segment_mt, *message_mt;

static lsegment *checksegment(lua_State *L, int i)
{
    lsegment *seg = mp_checkudata_c(L, i, SEGMENT_MT, &segment_mt);
    if (seg->fd < 0) luaL_argerror(L, i, "segment is closed");
    return seg;
}

/* ids are message ids below 2^53, exact in a Lua number */
static uint64_t checkid(lua_State *L, int i)
{
    lua_Number n = luaL_checknumber(L, i);
    if (n < 0 || n > 9007199254740992.0 || n != (lua_Number)(uint64_t)n) luaL_argerror(L, i, "bad id");
    return (uint64_t)n;
}

static int l_open(lua_State *L)
{
    const char *path = luaL_checkstring(L, 1);
    int create = lua_toboolean(L, 2);
    lsegment *seg = lua_newuserdata(L, sizeof *seg);
    struct stat st;
    seg->fd = -1;
    seg->end = 0;
    seg->wbuf = NULL;
    seg->wlen = seg->wcap = 0;
    seg->pending_err = 0;
    luaL_getmetatable(L, SEGMENT_MT);
    lua_setmetatable(L, -2);
    seg->fd = open(path, O_RDWR | O_CLOEXEC | (create ? O_CREAT | O_EXCL : 0), 0600);
    if (seg->fd < 0) return mp_pusherrno(L, "open", errno);
    if (fstat(seg->fd, &st) != 0) {
        int e = errno;
        close(seg->fd);
        seg->fd = -1;
        return mp_pusherrno(L, "fstat", e);
    }
    seg->end = st.st_size;
    return 1;
}

/* Write the buffer at the end of the file. 0, or -errno with the file and
 * the buffer as before (the buffered records are dropped). */
static int seg_flush(lsegment *seg)
{
    size_t done = 0;
    while (done < seg->wlen) {
        ssize_t w = pwrite(seg->fd, seg->wbuf + done, seg->wlen - done, seg->end + (off_t)done);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) {
            int e = w < 0 ? errno : EIO;
            while (ftruncate(seg->fd, seg->end) != 0 && errno == EINTR) ;
            seg->wlen = 0;
            /* whoever waits on these records learns it at the next flush() */
            seg->pending_err = e;
            return -e;
        }
        done += (size_t)w;
    }
    seg->end += (off_t)seg->wlen;
    seg->wlen = 0;
    if (seg->wcap > MP_SEG_BUFFER_MAX) {
        free(seg->wbuf);
        seg->wbuf = NULL;
        seg->wcap = 0;
    }
    return 0;
}

static int buffer_record(lsegment *seg, const mp_rec_hdr *hin, const char *meta, size_t meta_len,
                         const char *body, size_t body_len)
{
    mp_rec_hdr h = *hin;
    size_t need = MP_REC_HEADER + meta_len + body_len;
    uint32_t crc;
    if (seg->wlen + need > seg->wcap) {
        size_t cap = seg->wcap ? seg->wcap : 65536;
        char *nb;
        while (cap < seg->wlen + need) cap *= 2;
        nb = realloc(seg->wbuf, cap);
        if (nb == NULL) return -ENOMEM;
        seg->wbuf = nb;
        seg->wcap = cap;
    }
    crc = mp_crc32c(0, meta, meta_len);
    crc = mp_crc32c(crc, body, body_len);
    h.meta_len = (uint32_t)meta_len;
    h.payload_len = (uint32_t)(meta_len + body_len);
    h.payload_crc = crc;
    mp_rec_encode((unsigned char *)seg->wbuf + seg->wlen, &h);
    memcpy(seg->wbuf + seg->wlen + MP_REC_HEADER, meta, meta_len);
    memcpy(seg->wbuf + seg->wlen + MP_REC_HEADER + meta_len, body, body_len);
    seg->wlen += need;
    return 0;
}

static int s_flush(lua_State *L)
{
    lsegment *seg = checksegment(L, 1);
    int r = seg_flush(seg);
    if (r == 0 && seg->pending_err) r = -seg->pending_err;
    seg->pending_err = 0;
    if (r != 0) return mp_pusherrno(L, "write", -r);
    lua_pushboolean(L, 1);
    return 1;
}

/* pending() -> bytes buffered and not yet written */
static int s_pending(lua_State *L)
{
    lua_pushnumber(L, (lua_Number)checksegment(L, 1)->wlen);
    return 1;
}

/* spill(): write the buffer now (so that a reader finds it). A failure is
 * kept for the next flush(), whose caller answers for those records. */
static int s_spill(lua_State *L)
{
    lsegment *seg = checksegment(L, 1);
    lua_pushboolean(L, seg_flush(seg) == 0);
    return 1;
}

static int s_append(lua_State *L)
{
    lsegment *seg = checksegment(L, 1);
    mp_rec_hdr h;
    size_t meta_len, body_len = 0;
    const char *meta, *body = NULL;
    off_t at;
    int r;
    h.type = (unsigned)luaL_checkinteger(L, 2);
    h.flags = (unsigned)luaL_checkinteger(L, 3);
    h.id = checkid(L, 4);
    h.aux = (unsigned)luaL_optinteger(L, 7, 0);
    if (h.aux > 65535) h.aux = 65535;
    meta = luaL_checklstring(L, 5, &meta_len);
    if (h.type < MP_REC_MSG || h.type > MP_REC_DONE) luaL_argerror(L, 2, "bad record type");
    if (lua_type(L, 6) == LUA_TSTRING) {
        body = lua_tolstring(L, 6, &body_len);
    } else if (!lua_isnoneornil(L, 6)) {
        lmessage *m = mp_testudata_c(L, 6, MESSAGE_MT, &message_mt);
        if (m == NULL) luaL_argerror(L, 6, "expected a string or a message");
        if (m->closed) luaL_argerror(L, 6, "message is closed");
        body = mp_body_data(&m->body);
        body_len = m->body.len;
    }
    if (meta_len + body_len > MP_REC_PAYLOAD_MAX) return mp_pusherrno(L, "write", EFBIG);
    at = seg->end + (off_t)seg->wlen;
    if (MP_REC_HEADER + meta_len + body_len <= MP_SEG_DIRECT) {
        if (seg->wlen + MP_REC_HEADER + meta_len + body_len > MP_SEG_BUFFER_MAX) {
            r = seg_flush(seg);
            if (r != 0) return mp_pusherrno(L, "write", -r);
            at = seg->end;
        }
        r = buffer_record(seg, &h, meta, meta_len, body ? body : "", body_len);
        if (r != 0) return mp_pusherrno(L, "write", -r);
    } else {
        /* large: write what is buffered, then the record from its own buffer */
        r = seg_flush(seg);
        if (r == 0) r = mp_seg_append(seg->fd, &seg->end, &h, meta, meta_len, body ? body : "", body_len);
        if (r != 0) return mp_pusherrno(L, "write", -r);
    }
    lua_pushnumber(L, (lua_Number)at);
    lua_pushnumber(L, (lua_Number)(MP_REC_HEADER + meta_len + body_len));
    return 2;
}

static int s_size(lua_State *L)
{
    lsegment *seg = checksegment(L, 1);
    lua_pushnumber(L, (lua_Number)(seg->end + (off_t)seg->wlen));
    return 1;
}

static int s_fd(lua_State *L)
{
    lua_pushinteger(L, checksegment(L, 1)->fd);
    return 1;
}

static int s_truncate(lua_State *L)
{
    lsegment *seg = checksegment(L, 1);
    lua_Number n = luaL_checknumber(L, 2);
    int r = seg_flush(seg);
    if (r != 0) return mp_pusherrno(L, "write", -r);
    if (n < 0 || n > (lua_Number)seg->end) luaL_argerror(L, 2, "offset out of range");
    if (ftruncate(seg->fd, (off_t)n) != 0) return mp_pusherrno(L, "truncate", errno);
    seg->end = (off_t)n;
    lua_pushboolean(L, 1);
    return 1;
}

/* pread up to n bytes at off into buf, through EINTR and short reads:
 * the count (less than n at the end of the file), or -errno */
static ssize_t pread_upto(int fd, char *buf, size_t n, off_t off)
{
    size_t done = 0;
    while (done < n) {
        ssize_t r = pread(fd, buf + done, n - done, off + (off_t)done);
        if (r < 0) {
            if (errno == EINTR) continue;
            return -errno;
        }
        if (r == 0) break;
        done += (size_t)r;
    }
    return (ssize_t)done;
}

/* Push the len bytes at off as a string (shorter at the end of the file):
 * returns 1, or 3 with nil, err, code pushed (mp_pusherrno) */
static int push_range(lua_State *L, int fd, off_t off, size_t len)
{
    luaL_Buffer b;
    size_t done = 0;
    luaL_buffinit(L, &b);
    while (done < len) {
        char tmp[LUAL_BUFFERSIZE];
        size_t want = len - done;
        ssize_t r;
        if (want > sizeof tmp) want = sizeof tmp;
        r = pread_upto(fd, tmp, want, off + (off_t)done);
        if (r < 0) return mp_pusherrno(L, "read", (int)-r);
        luaL_addlstring(&b, tmp, (size_t)r);
        done += (size_t)r;
        if ((size_t)r < want) break;
    }
    luaL_pushresult(&b);
    return 1;
}

static int s_meta(lua_State *L)
{
    lsegment *seg = checksegment(L, 1);
    lua_Number off = luaL_checknumber(L, 2);
    unsigned char hdr[MP_REC_HEADER];
    mp_rec_hdr h;
    size_t got;
    ssize_t n;
    int r;
    if (off < 0) luaL_argerror(L, 2, "negative offset");
    r = seg_flush(seg);
    if (r != 0) return mp_pusherrno(L, "write", -r);
    /* the header stays in C; only the metadata becomes a Lua string */
    n = pread_upto(seg->fd, (char *)hdr, sizeof hdr, (off_t)off);
    if (n < 0) return mp_pusherrno(L, "read", (int)-n);
    if ((size_t)n < sizeof hdr || mp_rec_decode(hdr, &h) != 0) {
        lua_pushnil(L);
        lua_pushliteral(L, "bad header");
        return 2;
    }
    if ((r = push_range(L, seg->fd, (off_t)off + MP_REC_HEADER, h.meta_len)) != 1) return r;
    lua_tolstring(L, -1, &got);
    if (got < h.meta_len) {
        lua_pushnil(L);
        lua_pushliteral(L, "short record");
        return 2;
    }
    return 1;
}

static int s_read(lua_State *L)
{
    lsegment *seg = checksegment(L, 1);
    lua_Number off = luaL_checknumber(L, 2);
    lua_Number len = luaL_checknumber(L, 3);
    int r;
    if (off < 0 || len < 0) luaL_argerror(L, 2, "negative offset or length");
    r = seg_flush(seg);
    if (r != 0) return mp_pusherrno(L, "write", -r);
    return push_range(L, seg->fd, (off_t)off, (size_t)len);
}

/* close() writes what is buffered (not synced: the caller syncs first if it
 * needs to), then closes. */
static void seg_close(lsegment *seg)
{
    if (seg->fd >= 0) {
        if (seg->wlen) seg_flush(seg);
        close(seg->fd);
        seg->fd = -1;
    }
    free(seg->wbuf);
    seg->wbuf = NULL;
    seg->wlen = seg->wcap = 0;
}

static int s_close(lua_State *L)
{
    seg_close(luaL_checkudata(L, 1, SEGMENT_MT));
    lua_pushboolean(L, 1);
    return 1;
}

static int s_gc(lua_State *L)
{
    seg_close(luaL_checkudata(L, 1, SEGMENT_MT));
    return 0;
}

/* ---- scanner ------------------------------------------------------------------ */

static int s_scan(lua_State *L)
{
    lsegment *seg = checksegment(L, 1);
    lscan *sc;
    if (seg->wlen && seg_flush(seg) != 0) return luaL_error(L, "scan: cannot write the buffered records");
    sc = lua_newuserdata(L, sizeof *sc);
    sc->s = NULL;
    luaL_getmetatable(L, SCAN_MT);
    lua_setmetatable(L, -2);
    sc->s = mp_scan_new(seg->fd);
    if (sc->s == NULL) return luaL_error(L, "out of memory");
    /* keep the segment alive while the scanner uses its fd */
    lua_pushvalue(L, 1);
    lua_setfenv(L, -2);
    return 1;
}

static int sc_next(lua_State *L)
{
    lscan *sc = luaL_checkudata(L, 1, SCAN_MT);
    int skip_msg_meta = lua_toboolean(L, 2);
    mp_scan_item it;
    if (sc->s == NULL) return 0;
    switch (mp_scan_next(sc->s, &it)) {
    case MP_SCAN_REC:
        lua_pushliteral(L, "rec");
        lua_pushnumber(L, (lua_Number)it.off);
        lua_pushnumber(L, (lua_Number)it.len);
        lua_pushinteger(L, (lua_Integer)it.hdr.type);
        lua_pushinteger(L, (lua_Integer)it.hdr.flags);
        lua_pushnumber(L, (lua_Number)it.hdr.id);
        /* an unknown (0) or saturated recipient count: the envelope is needed; a DSN's too */
        if (skip_msg_meta && it.hdr.type == MP_REC_MSG && it.hdr.aux > 0 && it.hdr.aux < 65535
            && !(it.hdr.flags & MP_REC_F_DSN))
            lua_pushnil(L);
        else lua_pushlstring(L, it.meta, it.hdr.meta_len);
        lua_pushinteger(L, (lua_Integer)it.hdr.aux);
        return 8;
    case MP_SCAN_CORRUPT:
        lua_pushliteral(L, "corrupt");
        lua_pushnumber(L, (lua_Number)it.off);
        lua_pushnumber(L, (lua_Number)it.len);
        lua_pushstring(L, it.why);
        return 4;
    case MP_SCAN_ZEROS:
        lua_pushliteral(L, "zeros");
        lua_pushnumber(L, (lua_Number)it.off);
        return 2;
    case MP_SCAN_TORN:
        lua_pushliteral(L, "torn");
        lua_pushnumber(L, (lua_Number)it.off);
        lua_pushstring(L, it.why);
        return 3;
    case MP_SCAN_ERROR:
        lua_pushliteral(L, "error");
        lua_pushfstring(L, "read: %s", strerror(it.err));
        lua_pushstring(L, mp_errno_name(it.err));
        return 3;
    default:
        return 0;
    }
}

static int sc_gc(lua_State *L)
{
    lscan *sc = luaL_checkudata(L, 1, SCAN_MT);
    mp_scan_free(sc->s);
    sc->s = NULL;
    return 0;
}

/* ---- decode ------------------------------------------------------------------------ */

static int l_decode(lua_State *L)
{
    size_t n;
    const char *s = luaL_checklstring(L, 1, &n);
    mp_rec_hdr h;
    if (n < MP_REC_HEADER || mp_rec_decode((const unsigned char *)s, &h) != 0) {
        lua_pushnil(L);
        lua_pushliteral(L, "bad header");
        return 2;
    }
    if (n - MP_REC_HEADER < h.payload_len) {
        lua_pushnil(L);
        lua_pushliteral(L, "short record");
        return 2;
    }
    if (mp_crc32c(0, s + MP_REC_HEADER, h.payload_len) != h.payload_crc) {
        lua_pushnil(L);
        lua_pushliteral(L, "payload checksum");
        return 2;
    }
    lua_pushinteger(L, (lua_Integer)h.type);
    lua_pushinteger(L, (lua_Integer)h.flags);
    lua_pushnumber(L, (lua_Number)h.id);
    lua_pushlstring(L, s + MP_REC_HEADER, h.meta_len);
    lua_pushlstring(L, s + MP_REC_HEADER + h.meta_len, h.payload_len - h.meta_len);
    return 5;
}

static int l_crc32c(lua_State *L)
{
    size_t n;
    const char *s = luaL_checklstring(L, 1, &n);
    uint32_t crc = (uint32_t)luaL_optnumber(L, 2, 0);
    lua_pushnumber(L, (lua_Number)mp_crc32c(crc, s, n));
    return 1;
}

/* ---- lock ------------------------------------------------------------------------------ */

/* lock(dir [, what]): an exclusive flock on dir/LOCK, held until close() or
 * exit. The file holds the owner's pid, for the message a second process
 * prints. The outbox of the event log's webhook takes the same lock
 * (runtime/outbox.lua); `what` names the directory in that message. */
static int l_lock(lua_State *L)
{
    const char *dir = luaL_checkstring(L, 1);
    const char *what = luaL_optstring(L, 2, "spool");
    char path[4096], pid[32];
    llock *lk = lua_newuserdata(L, sizeof *lk);
    ssize_t n;
    lk->fd = -1;
    luaL_getmetatable(L, LOCK_MT);
    lua_setmetatable(L, -2);
    if ((size_t)snprintf(path, sizeof path, "%s/LOCK", dir) >= sizeof path) luaL_argerror(L, 1, "path too long");
    lk->fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (lk->fd < 0) return mp_pusherrno(L, "lock", errno);
    if (flock(lk->fd, LOCK_EX | LOCK_NB) != 0) {
        int e = errno;
        char owner[32] = "";
        n = pread(lk->fd, owner, sizeof owner - 1, 0);
        if (n > 0) owner[n] = '\0';
        while (n > 0 && (owner[n - 1] == '\n' || owner[n - 1] == ' ')) owner[--n] = '\0';
        close(lk->fd);
        lk->fd = -1;
        lua_pushnil(L);
        if (e == EWOULDBLOCK)
            lua_pushfstring(L, "%s %s is locked by another process (pid %s; lock file %s)", what, dir,
                            n > 0 ? owner : "?", path);
        else
            lua_pushfstring(L, "lock %s: %s", path, strerror(e));
        lua_pushstring(L, e == EWOULDBLOCK ? "EWOULDBLOCK" : mp_errno_name(e));
        return 3;
    }
    n = snprintf(pid, sizeof pid, "%ld\n", (long)getpid());
    if (ftruncate(lk->fd, 0) != 0 || pwrite(lk->fd, pid, (size_t)n, 0) != n) {
        /* the lock holds even if the pid cannot be recorded */
    }
    return 1;
}

static int k_close(lua_State *L)
{
    llock *lk = luaL_checkudata(L, 1, LOCK_MT);
    if (lk->fd >= 0) {
        close(lk->fd);
        lk->fd = -1;
    }
    lua_pushboolean(L, 1);
    return 1;
}

static int k_gc(lua_State *L)
{
    k_close(L);
    return 0;
}

static const luaL_Reg funcs[] = {
    {"open", l_open}, {"lock", l_lock}, {"decode", l_decode}, {"crc32c", l_crc32c}, {NULL, NULL}};

static const luaL_Reg segment_methods[] = {
    {"append", s_append}, {"flush", s_flush}, {"pending", s_pending}, {"spill", s_spill}, {"size", s_size}, {"fd", s_fd}, {"truncate", s_truncate},
    {"read", s_read}, {"meta", s_meta}, {"scan", s_scan}, {"close", s_close}, {NULL, NULL}};
static const luaL_Reg segment_meta[] = {{"__gc", s_gc}, {NULL, NULL}};
static const luaL_Reg scan_methods[] = {{"next", sc_next}, {NULL, NULL}};
static const luaL_Reg scan_meta[] = {{"__gc", sc_gc}, {NULL, NULL}};
static const luaL_Reg lock_methods[] = {{"close", k_close}, {NULL, NULL}};
static const luaL_Reg lock_meta[] = {{"__gc", k_gc}, {NULL, NULL}};

MP_EXPORT int luaopen_moonpost_core_spool(lua_State *L);
MP_EXPORT int luaopen_moonpost_core_spool(lua_State *L)
{
    mp_createmeta(L, SEGMENT_MT, segment_meta, segment_methods);
    mp_createmeta(L, SCAN_MT, scan_meta, scan_methods);
    mp_createmeta(L, LOCK_MT, lock_meta, lock_methods);
    lua_newtable(L);
    mp_setfuncs(L, funcs);
    lua_pushinteger(L, MP_REC_MSG);
    lua_setfield(L, -2, "MSG");
    lua_pushinteger(L, MP_REC_STATE);
    lua_setfield(L, -2, "STATE");
    lua_pushinteger(L, MP_REC_DONE);
    lua_setfield(L, -2, "DONE");
    lua_pushinteger(L, MP_REC_F_COPY);
    lua_setfield(L, -2, "F_COPY");
    lua_pushinteger(L, MP_REC_F_DSN);
    lua_setfield(L, -2, "F_DSN");
    lua_pushinteger(L, MP_REC_F_VOID);
    lua_setfield(L, -2, "F_VOID");
    lua_pushinteger(L, MP_REC_HEADER);
    lua_setfield(L, -2, "HEADER");
    return 1;
}
