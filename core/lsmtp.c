/*
 * moonpost.core.smtp: the Lua face of the SMTP engine (smtp.c).
 *
 *   smtp.parser([limits])     -> parser     server-side input framing
 *   smtp.reply_parser()       -> reply      client-side reply framing
 *   smtp.message(s)           -> message    a message body held in C
 *   smtp.parse_path(arg, kind)-> path table | nil, code, enhanced, text
 *   smtp.check_param(k, v)    -> true | nil, why
 *   smtp.dotstuff(s)          -> s          (for tests and small bodies)
 *   smtp.utf8_valid(s), smtp.xtext_valid(s)
 */
#include <stdint.h>
#include <unistd.h>
#ifdef __GLIBC__
#include <malloc.h>
#endif
#include <uv.h>

#include "lcompat.h"
#include "lmessage.h"
#include "smtp.h"

#define PARSER_MT "moonpost.core.smtp.parser"
#define REPLY_MT "moonpost.core.smtp.reply"

/* ---- message ------------------------------------------------------------ */

/* Pushed closed, so an allocation failure after this leaks nothing. */
static lmessage *newmessage(lua_State *L)
{
    lmessage *m = lua_newuserdata(L, sizeof *m);
    mp_body_init(&m->body);
    m->closed = 1;
    luaL_getmetatable(L, MESSAGE_MT);
    lua_setmetatable(L, -2);
    return m;
}

/* the metatables' addresses, for mp_checkudata_c */
static const void *message_mt, *parser_mt, *reply_mt, *uv_tcp_mt;

static lmessage *checkmessage(lua_State *L, int i)
{
    lmessage *m = mp_checkudata_c(L, i, MESSAGE_MT, &message_mt);
    if (m->closed) luaL_argerror(L, i, "message is closed");
    return m;
}

static int l_message(lua_State *L)
{
    size_t n;
    const char *s = luaL_checklstring(L, 1, &n);
    lmessage *m = newmessage(L);
    m->closed = 0;
    if (mp_body_append(&m->body, s, n) != 0) return luaL_error(L, "out of memory");
    return 1;
}

static int m_size(lua_State *L)
{
    lmessage *m = checkmessage(L, 1);
    lua_pushnumber(L, (lua_Number)m->body.len);
    return 1;
}

static int m_tostring(lua_State *L)
{
    lmessage *m = checkmessage(L, 1);
    lua_pushlstring(L, mp_body_data(&m->body), m->body.len);
    return 1;
}

/* The range i..j of arguments 2 and 3, as string.sub reads them (1-based,
 * inclusive, negative from the end), clamped to the message; i > j when
 * it is empty. */
static void message_range(lua_State *L, lmessage *m, lua_Integer *pi, lua_Integer *pj)
{
    lua_Integer len = (lua_Integer)m->body.len;
    lua_Integer i = luaL_checkinteger(L, 2);
    lua_Integer j = luaL_optinteger(L, 3, -1);
    if (i < 0) i = len + i + 1;
    if (j < 0) j = len + j + 1;
    if (i < 1) i = 1;
    if (j > len) j = len;
    *pi = i;
    *pj = j;
}

/* sub(i [, j]): bytes i..j, 1-based and inclusive like string.sub. */
static int m_sub(lua_State *L)
{
    lmessage *m = checkmessage(L, 1);
    lua_Integer i, j;
    message_range(L, m, &i, &j);
    if (i > j) lua_pushliteral(L, "");
    else lua_pushlstring(L, mp_body_data(&m->body) + i - 1, (size_t)(j - i + 1));
    return 1;
}

/* remove(i, j): drop octets i to j (1-based, inclusive, negative from the
 * end, as sub()); returns the message. For taking out a header field. */
static int m_remove(lua_State *L)
{
    lmessage *m = checkmessage(L, 1);
    lua_Integer i, j;
    message_range(L, m, &i, &j);
    if (i <= j) mp_body_remove(&m->body, (size_t)(i - 1), (size_t)(j - i + 1));
    lua_settop(L, 1);
    return 1;
}

/* headers(): the header section including the empty line that ends it, or
 * the whole message when it has no body. */
static int m_headers(lua_State *L)
{
    lmessage *m = checkmessage(L, 1);
    const char *s = mp_body_data(&m->body);
    size_t n = m->body.len, i;
    if (n >= 2 && s[0] == '\r' && s[1] == '\n') {
        lua_pushliteral(L, "\r\n");
        return 1;
    }
    for (i = 0; i + 3 < n; i++) {
        const char *p = memchr(s + i, '\r', n - i - 3);
        if (p == NULL) break;
        i = (size_t)(p - s);
        if (p[1] == '\n' && p[2] == '\r' && p[3] == '\n') {
            lua_pushlstring(L, s, i + 4);
            return 1;
        }
    }
    lua_pushlstring(L, s, n);
    return 1;
}

static int m_prepend(lua_State *L)
{
    lmessage *m = checkmessage(L, 1);
    size_t n;
    const char *s = luaL_checklstring(L, 2, &n);
    if (mp_body_prepend(&m->body, s, n) != 0) return luaL_error(L, "out of memory");
    lua_settop(L, 1);
    return 1;
}

static int m_append(lua_State *L)
{
    lmessage *m = checkmessage(L, 1);
    size_t n;
    const char *s = luaL_checklstring(L, 2, &n);
    if (mp_body_append(&m->body, s, n) != 0) return luaL_error(L, "out of memory");
    lua_settop(L, 1);
    return 1;
}

/* write(fd [, prefix]): write the optional prefix then the message to a file
 * descriptor. Meant for regular files: the write lands in the page cache and
 * the caller syncs through the thread pool. Returns the bytes written, or
 * nil, "write: <strerror>", "ECODE". */
static int m_write(lua_State *L)
{
    lmessage *m = checkmessage(L, 1);
    int fd = (int)luaL_checkinteger(L, 2);
    size_t plen = 0;
    const char *prefix = luaL_optlstring(L, 3, NULL, &plen);
    const char *parts[2];
    size_t lens[2], total = 0;
    int k;
    parts[0] = prefix;
    lens[0] = prefix ? plen : 0;
    parts[1] = mp_body_data(&m->body);
    lens[1] = m->body.len;
    for (k = 0; k < 2; k++) {
        size_t done = 0;
        while (done < lens[k]) {
            ssize_t w = write(fd, parts[k] + done, lens[k] - done);
            if (w < 0) {
                if (errno == EINTR) continue;
                return mp_pusherrno(L, "write", errno);
            }
            done += (size_t)w;
        }
        total += done;
    }
    lua_pushnumber(L, (lua_Number)total);
    return 1;
}

static int m_close(lua_State *L)
{
    lmessage *m = mp_checkudata_c(L, 1, MESSAGE_MT, &message_mt);
    if (!m->closed) {
        mp_body_free(&m->body);
        m->closed = 1;
    }
    lua_pushboolean(L, 1);
    return 1;
}

static int m_gc(lua_State *L)
{
    lmessage *m = mp_checkudata_c(L, 1, MESSAGE_MT, &message_mt);
    if (!m->closed) {
        mp_body_free(&m->body);
        m->closed = 1;
    }
    return 0;
}

static int m_len(lua_State *L)
{
    lmessage *m = mp_checkudata_c(L, 1, MESSAGE_MT, &message_mt);
    lua_pushnumber(L, m->closed ? 0 : (lua_Number)m->body.len);
    return 1;
}

static int m___tostring(lua_State *L)
{
    lmessage *m = mp_checkudata_c(L, 1, MESSAGE_MT, &message_mt);
    if (m->closed) lua_pushliteral(L, "smtp.message (closed)");
    else lua_pushfstring(L, "smtp.message (%f bytes)", (lua_Number)m->body.len);
    return 1;
}

/* ---- parser --------------------------------------------------------------- */

typedef struct lparser {
    mp_smtp_in *p;
} lparser;

static lparser *checkparser(lua_State *L, int i)
{
    lparser *lp = mp_checkudata_c(L, i, PARSER_MT, &parser_mt);
    if (lp->p == NULL) luaL_argerror(L, i, "parser is closed");
    return lp;
}

static size_t optsize(lua_State *L, int t, const char *field, size_t def)
{
    lua_Number v;
    lua_getfield(L, t, field);
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        return def;
    }
    if (!lua_isnumber(L, -1)) luaL_error(L, "limit '%s' must be a number", field);
    v = lua_tonumber(L, -1);
    lua_pop(L, 1);
    /* integers up to 2^53: anything else would not convert exactly */
    if (!(v >= 0 && v <= 9007199254740992.0) || v != (lua_Number)(uint64_t)v)
        luaL_error(L, "limit '%s' must be an integer from 0 to 2^53", field);
    return (size_t)v;
}

static void readlimits(lua_State *L, int t, mp_in_limits *l)
{
    if (lua_isnoneornil(L, t)) return;
    luaL_checktype(L, t, LUA_TTABLE);
    l->cmd_line = optsize(L, t, "cmd_line", l->cmd_line);
    l->text_line = optsize(L, t, "text_line", l->text_line);
    l->max_size = optsize(L, t, "max_size", l->max_size);
    if (l->cmd_line < 16) luaL_error(L, "limit 'cmd_line' must be at least 16");
}

static int l_parser(lua_State *L)
{
    mp_in_limits lim;
    lparser *lp;
    mp_in_limits_default(&lim);
    readlimits(L, 1, &lim);
    lp = lua_newuserdata(L, sizeof *lp);
    lp->p = NULL;
    luaL_getmetatable(L, PARSER_MT);
    lua_setmetatable(L, -2);
    lp->p = mp_in_new(&lim);
    if (lp->p == NULL) return luaL_error(L, "out of memory");
    return 1;
}

static int p_set_limits(lua_State *L)
{
    lparser *lp = checkparser(L, 1);
    mp_in_limits lim = *mp_in_get_limits(lp->p);
    readlimits(L, 2, &lim);
    mp_in_set_limits(lp->p, &lim);
    return 0;
}

static int p_push(lua_State *L)
{
    lparser *lp = checkparser(L, 1);
    size_t n;
    const char *s = luaL_checklstring(L, 2, &n);
    if (mp_in_push(lp->p, s, n) != 0) {
        lua_pushnil(L);
        lua_pushliteral(L, "no memory");
        return 2;
    }
    lua_pushnumber(L, (lua_Number)mp_in_buffered(lp->p));
    return 1;
}

/* next() -> nil                          need more input
 *         | "cmd", VERB, arg, flags
 *         | "line", line, flags          (after begin_line)
 *         | "too_long", wire_length [, VERB]  (VERB: of a command line)
 *         | "data", msgflags             DATA content complete
 *         | "bdat", msgflags             BDAT chunk complete */
static int p_next(lua_State *L)
{
    lparser *lp = checkparser(L, 1);
    mp_in_ev ev;
    switch (mp_in_next(lp->p, &ev)) {
    case MP_EV_CMD:
        lua_pushliteral(L, "cmd");
        lua_pushlstring(L, ev.verb, ev.verb_len);
        lua_pushlstring(L, ev.arg, ev.arg_len);
        lua_pushinteger(L, (lua_Integer)ev.flags);
        return 4;
    case MP_EV_LINE:
        lua_pushliteral(L, "line");
        lua_pushlstring(L, ev.arg, ev.arg_len);
        lua_pushinteger(L, (lua_Integer)ev.flags);
        return 3;
    case MP_EV_TOO_LONG:
        lua_pushliteral(L, "too_long");
        lua_pushnumber(L, (lua_Number)ev.line_len);
        if (ev.verb == NULL) return 2;
        lua_pushlstring(L, ev.verb, ev.verb_len);
        return 3;
    case MP_EV_DATA_END:
        lua_pushliteral(L, "data");
        lua_pushinteger(L, (lua_Integer)ev.flags);
        return 2;
    case MP_EV_BDAT_END:
        lua_pushliteral(L, "bdat");
        lua_pushinteger(L, (lua_Integer)ev.flags);
        return 2;
    default:
        return 0;
    }
}

static int p_begin_data(lua_State *L)
{
    mp_in_begin_data(checkparser(L, 1)->p);
    return 0;
}

static int p_begin_bdat(lua_State *L)
{
    lparser *lp = checkparser(L, 1);
    lua_Number n = luaL_checknumber(L, 2);
    if (n < 0 || n != n || n > 9007199254740992.0) luaL_argerror(L, 2, "chunk size out of range");
    mp_in_begin_bdat(lp->p, (uint64_t)n);
    return 0;
}

static int p_begin_line(lua_State *L)
{
    mp_in_begin_line(checkparser(L, 1)->p);
    return 0;
}

static int p_discard(lua_State *L)
{
    mp_in_discard(checkparser(L, 1)->p);
    return 0;
}

static int p_reset_body(lua_State *L)
{
    mp_in_reset_body(checkparser(L, 1)->p);
    return 0;
}

/* take() -> message, msgflags: the body received so far, moved out of the parser. */
static int p_take(lua_State *L)
{
    lparser *lp = checkparser(L, 1);
    lmessage *m = newmessage(L);
    unsigned flags = mp_in_take_body(lp->p, &m->body);
    m->closed = 0;
    lua_pushinteger(L, (lua_Integer)flags);
    return 2;
}

static int p_buffered(lua_State *L)
{
    lua_pushnumber(L, (lua_Number)mp_in_buffered(checkparser(L, 1)->p));
    return 1;
}

/* capacity(): bytes allocated for unconsumed input (for tests and metrics) */
static int p_capacity(lua_State *L)
{
    lua_pushnumber(L, (lua_Number)mp_in_capacity(checkparser(L, 1)->p));
    return 1;
}

static int p_body_size(lua_State *L)
{
    lua_pushnumber(L, (lua_Number)mp_in_body_size(checkparser(L, 1)->p));
    return 1;
}

static int p_mode(lua_State *L)
{
    static const char *const names[] = {"cmd", "line", "data", "bdat"};
    lua_pushstring(L, names[mp_in_mode(checkparser(L, 1)->p)]);
    return 1;
}

static int p_close(lua_State *L)
{
    lparser *lp = mp_checkudata_c(L, 1, PARSER_MT, &parser_mt);
    mp_in_free(lp->p);
    lp->p = NULL;
    lua_pushboolean(L, 1);
    return 1;
}

static int p_gc(lua_State *L)
{
    lparser *lp = mp_checkudata_c(L, 1, PARSER_MT, &parser_mt);
    mp_in_free(lp->p);
    lp->p = NULL;
    return 0;
}

/* ---- reply parser ---------------------------------------------------------- */

typedef struct lreply {
    mp_reply_parser *r;
} lreply;

static lreply *checkreply(lua_State *L, int i)
{
    lreply *lr = mp_checkudata_c(L, i, REPLY_MT, &reply_mt);
    if (lr->r == NULL) luaL_argerror(L, i, "reply parser is closed");
    return lr;
}

static int l_reply_parser(lua_State *L)
{
    lreply *lr = lua_newuserdata(L, sizeof *lr);
    lr->r = NULL;
    luaL_getmetatable(L, REPLY_MT);
    lua_setmetatable(L, -2);
    lr->r = mp_reply_new();
    if (lr->r == NULL) return luaL_error(L, "out of memory");
    return 1;
}

static int r_push(lua_State *L)
{
    lreply *lr = checkreply(L, 1);
    size_t n;
    const char *s = luaL_checklstring(L, 2, &n);
    if (mp_reply_push(lr->r, s, n) != 0) {
        lua_pushnil(L);
        lua_pushliteral(L, "no memory");
        return 2;
    }
    lua_pushnumber(L, (lua_Number)mp_reply_buffered(lr->r));
    return 1;
}

/* next() -> code, enhanced|false, text, nlines | nil (need more) | nil, "error: detail" */
static int r_next(lua_State *L)
{
    lreply *lr = checkreply(L, 1);
    mp_reply rep;
    switch (mp_reply_next(lr->r, &rep)) {
    case MP_REPLY_DONE:
        lua_pushinteger(L, rep.code);
        if (rep.enhanced[0]) lua_pushstring(L, rep.enhanced);
        else lua_pushboolean(L, 0);
        lua_pushlstring(L, rep.text, rep.text_len);
        lua_pushinteger(L, rep.nlines);
        return 4;
    case MP_REPLY_ERROR:
        lua_pushnil(L);
        lua_pushfstring(L, "protocol: %s", rep.error);
        return 2;
    default:
        return 0;
    }
}

static int r_buffered(lua_State *L)
{
    lua_pushnumber(L, (lua_Number)mp_reply_buffered(checkreply(L, 1)->r));
    return 1;
}

static int r_close(lua_State *L)
{
    lreply *lr = mp_checkudata_c(L, 1, REPLY_MT, &reply_mt);
    mp_reply_free(lr->r);
    lr->r = NULL;
    lua_pushboolean(L, 1);
    return 1;
}

static int r_gc(lua_State *L)
{
    lreply *lr = mp_checkudata_c(L, 1, REPLY_MT, &reply_mt);
    mp_reply_free(lr->r);
    lr->r = NULL;
    return 0;
}

/* ---- module functions ------------------------------------------------------ */

static void setlstr(lua_State *L, const char *k, const char *s, size_t n)
{
    lua_pushlstring(L, s, n);
    lua_setfield(L, -2, k);
}

static void setbool(lua_State *L, const char *k, int v)
{
    lua_pushboolean(L, v);
    lua_setfield(L, -2, k);
}

/* parse_path(arg, "mail"|"rcpt") -> { address, local, domain, null, postmaster,
 * utf8, literal, route, params = { KEY = value|true } }
 * or nil, code, enhanced, text. Parameter keys are upper-cased; a repeated
 * key is an error (501 5.5.4). Values are checked by check_param separately. */
static int l_parse_path(lua_State *L)
{
    size_t n;
    const char *arg = luaL_checklstring(L, 1, &n);
    static const char *const kinds[] = {"mail", "rcpt", NULL};
    int kind = luaL_checkoption(L, 2, NULL, kinds);
    mp_path path;
    char buf[MP_SMTP_PATH_MAX + 64];
    const char *detail;
    int err = mp_parse_path(arg, n, kind, &path, buf, sizeof buf, &detail);
    int i;
    if (err != MP_PATH_OK) {
        lua_pushnil(L);
        switch (err) {
        case MP_PATH_ERR_ADDRESS:
        case MP_PATH_ERR_TOO_LONG:
            lua_pushinteger(L, 553);
            lua_pushstring(L, kind == MP_PATH_MAIL ? "5.1.7" : "5.1.3");
            break;
        case MP_PATH_ERR_PARAM:
        case MP_PATH_ERR_PARAMS:
            lua_pushinteger(L, 501);
            lua_pushliteral(L, "5.5.4");
            break;
        default:
            lua_pushinteger(L, 501);
            lua_pushliteral(L, "5.5.2");
            break;
        }
        lua_pushstring(L, detail);
        return 4;
    }
    /* sized for the fields set (4 and the flags, and the session's notify
     * and orcpt for a RCPT with parameters): the table of every MAIL and
     * RCPT, where a fixed 10 (16 slots) made ~380 octets of garbage each */
    lua_createtable(L, 0, 4 + !!path.null_path + !!path.postmaster + !!path.utf8 + !!path.literal +
                              !!path.had_route + (kind == MP_PATH_RCPT && path.nparams > 0 ? 2 : 0));
    setlstr(L, "address", path.mailbox, path.mailbox_len);
    setlstr(L, "local", path.local, path.local_len);
    setlstr(L, "domain", path.domain, path.domain_len);
    if (path.null_path) setbool(L, "null", 1);
    if (path.postmaster) setbool(L, "postmaster", 1);
    if (path.utf8) setbool(L, "utf8", 1);
    if (path.literal) setbool(L, "literal", 1);
    if (path.had_route) setbool(L, "route", 1);
    lua_createtable(L, 0, path.nparams);
    for (i = 0; i < path.nparams; i++) {
        char key[64];
        size_t k, kl = path.params[i].key_len;
        if (kl >= sizeof key) kl = sizeof key - 1;
        for (k = 0; k < kl; k++) {
            char c = path.params[i].key[k];
            key[k] = (c >= 'a' && c <= 'z') ? (char)(c - 32) : c;
        }
        key[kl] = '\0';
        lua_getfield(L, -1, key);
        if (!lua_isnil(L, -1)) {
            lua_pushnil(L);
            lua_pushinteger(L, 501);
            lua_pushliteral(L, "5.5.4");
            lua_pushfstring(L, "duplicate parameter %s", key);
            return 4;
        }
        lua_pop(L, 1);
        if (path.params[i].value) lua_pushlstring(L, path.params[i].value, path.params[i].value_len);
        else lua_pushboolean(L, 1);
        lua_setfield(L, -2, key);
    }
    lua_setfield(L, -2, "params");
    return 1;
}

static int l_check_param(lua_State *L)
{
    size_t kn, vn = 0;
    const char *k = luaL_checklstring(L, 1, &kn);
    const char *v = NULL;
    const char *why;
    if (lua_type(L, 2) == LUA_TSTRING) v = lua_tolstring(L, 2, &vn);
    why = mp_check_param(k, kn, v, vn);
    if (why) {
        lua_pushnil(L);
        lua_pushstring(L, why);
        return 2;
    }
    lua_pushboolean(L, 1);
    return 1;
}

/* the bytes of a string or a message argument */
static const char *checkbytes(lua_State *L, int i, size_t *n)
{
    if (lua_type(L, i) == LUA_TSTRING) return lua_tolstring(L, i, n);
    {
        lmessage *m = mp_testudata_c(L, i, MESSAGE_MT, &message_mt);
        if (m == NULL) luaL_argerror(L, i, "expected a string or a message");
        if (m->closed) luaL_argerror(L, i, "message is closed");
        *n = m->body.len;
        return mp_body_data(&m->body);
    }
}

/* has_8bit(s | message) -> true when an octet is above 127 */
static int l_has_8bit(lua_State *L)
{
    size_t n, i = 0;
    const unsigned char *s = (const unsigned char *)checkbytes(L, 1, &n);
    /* eight octets at a time, then the rest */
    for (; i + 8 <= n; i += 8) {
        uint64_t w;
        memcpy(&w, s + i, 8);
        if (w & 0x8080808080808080ULL) break;
    }
    for (; i < n; i++)
        if (s[i] & 0x80) break;
    lua_pushboolean(L, i < n);
    return 1;
}

/* has_ctl(s) -> true when s holds a control character other than HT (0-8,
 * 10-31) or DEL: what a line of the text log escapes. A loop here, not a
 * Lua pattern: string.find with a class calls the class matcher for every
 * octet, and the log checks every line it writes. */
static int l_has_ctl(lua_State *L)
{
    size_t n, i;
    const unsigned char *s = (const unsigned char *)luaL_checklstring(L, 1, &n);
    for (i = 0; i < n; i++)
        if ((s[i] < 32 && s[i] != 9) || s[i] == 127) break;
    lua_pushboolean(L, i < n);
    return 1;
}

static int l_dotstuff(lua_State *L)
{
    size_t n;
    const char *s = checkbytes(L, 1, &n);
    mp_stuff st;
    mp_body out;
    mp_body_init(&out);
    mp_stuff_init(&st);
    if (mp_stuff_feed(&st, s, n, &out) != 0 || mp_stuff_finish(&st, &out) != 0) {
        mp_body_free(&out);
        return luaL_error(L, "out of memory");
    }
    lua_pushlstring(L, mp_body_data(&out), out.len);
    mp_body_free(&out);
    return 1;
}

/* The libuv TCP handle of a luv "uv_tcp" userdata whose descriptor luv
 * gives as fd, or NULL. luv (1.44 here) keeps a pointer to the handle in the
 * userdata. The handle's type and descriptor are read through this
 * module's libuv and compared with what luv says: a luv that lays out its
 * userdata otherwise, or is built on another libuv (LuaRocks can bundle
 * one) whose handles this libuv reads differently, gets NULL (and the
 * caller the Lua path), never a write to the wrong descriptor. */
static uv_stream_t *luv_tcp_handle(lua_State *L, int idx, lua_Integer fd)
{
    uv_os_fd_t have;
    void *ud = lua_touserdata(L, idx);
    uv_handle_t *h;
    if (ud == NULL || lua_objlen(L, idx) < sizeof(void *) || mp_testudata_c(L, idx, "uv_tcp", &uv_tcp_mt) == NULL)
        return NULL;
    h = *(uv_handle_t **)ud;
    if (h == NULL || h->type != UV_TCP || uv_is_closing(h)) return NULL;
    if (uv_fileno(h, &have) != 0 || (lua_Integer)have != fd) return NULL;
    return (uv_stream_t *)h;
}

/* send_stuffed(tcp, fd, body [, trailer]) -> written, rest | nil, err, name
 * The body dot-stuffed and ended with "." (as dotstuff), then trailer when
 * given (the next transaction's commands, RFC 2920 3.1), written to a luv
 * TCP handle from here in one uv_try_write: a delivered message does not
 * become a Lua string to be hashed and collected. rest is what the socket
 * did not take (nil when it took all), for the caller to queue. fd is the
 * descriptor luv gives for tcp (tcp:fileno()). nil, "unsupported" when tcp
 * is not a handle this can write to (the caller uses dotstuff). */
static int l_send_stuffed(lua_State *L)
{
    uv_stream_t *h = luv_tcp_handle(L, 1, luaL_checkinteger(L, 2));
    size_t n, tn = 0, total;
    const char *s, *trailer = NULL;
    mp_stuff st;
    mp_body out;
    uv_buf_t bufs[2];
    int r;
    if (h == NULL) {
        lua_pushnil(L);
        lua_pushliteral(L, "unsupported");
        return 2;
    }
    s = checkbytes(L, 3, &n);
    if (!lua_isnoneornil(L, 4)) trailer = luaL_checklstring(L, 4, &tn);
    mp_body_init(&out);
    mp_stuff_init(&st);
    if (mp_stuff_feed(&st, s, n, &out) != 0 || mp_stuff_finish(&st, &out) != 0) {
        mp_body_free(&out);
        return luaL_error(L, "out of memory");
    }
    bufs[0] = uv_buf_init((char *)mp_body_data(&out), (unsigned int)out.len);
    bufs[1] = uv_buf_init((char *)trailer, (unsigned int)tn);
    total = out.len + tn;
    r = uv_try_write(h, bufs, tn > 0 ? 2 : 1);
    if (r == UV_EAGAIN) r = 0;
    if (r < 0) {
        mp_body_free(&out);
        lua_pushnil(L);
        lua_pushfstring(L, "%s: %s", uv_err_name(r), uv_strerror(r));
        lua_pushstring(L, uv_err_name(r));
        return 3;
    }
    lua_pushinteger(L, r);
    if ((size_t)r >= total) {
        lua_pushnil(L);
    } else if ((size_t)r >= out.len) {
        lua_pushlstring(L, trailer + ((size_t)r - out.len), total - (size_t)r);
    } else {
        /* the rest of the body, then the whole trailer: one string */
        luaL_Buffer b;
        luaL_buffinit(L, &b);
        luaL_addlstring(&b, mp_body_data(&out) + r, out.len - (size_t)r);
        if (tn > 0) luaL_addlstring(&b, trailer, tn);
        luaL_pushresult(&b);
    }
    mp_body_free(&out);
    return 2;
}

/* ---- reading a luv TCP handle straight into a parser ------------------------
 *
 * read_start(tcp, fd, parser, callback) -> true | nil, err
 * read_stop(tcp) -> true
 *
 * luv's read_start hands every chunk it reads to Lua as a new string: a
 * 64 KiB malloc and free for the buffer, the string interned (hashed, and a
 * message body hashed in full when its chain has many like it), a pcall
 * into Lua, and a call back into C to push it into the parser. Here libuv
 * reads into one static buffer, the bytes go into the parser (a server
 * parser or a reply parser) in C, and callback(err, n, buffered) is told
 * what happened: n octets read and the parser's buffered total (buffered
 * nil when the parser is out of memory); err a "NAME: message" string on a
 * read error; all nil at the end of the stream. The callback runs on a
 * coroutine of this module's own (luv's main state is not reachable from
 * here). Only for plaintext: a TLS stream needs the ciphertext in Lua.
 *
 * libuv gives a read callback only the handle, so the handles being read
 * here are found in a small hash table keyed by address. A reader holds
 * references to its parser and callback until read_stop, which the stream
 * calls before it closes the handle. */

typedef struct mp_reader {
    uv_stream_t *h;
    lparser *in;  /* one of the two parsers */
    lreply *rep;
    int parser_ref, cb_ref;
} mp_reader;

static mp_reader **rmap;
static size_t rmap_cap, rmap_n;
static lua_State *cb_thread; /* anchored in the registry at load */
static char read_buf[65536];

static size_t rmap_slot(const void *p)
{
    uint64_t x = (uint64_t)(uintptr_t)p;
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    return (size_t)x & (rmap_cap - 1);
}

static mp_reader *rmap_get(const uv_stream_t *h)
{
    size_t i;
    if (rmap_n == 0) return NULL;
    for (i = rmap_slot(h); rmap[i] != NULL; i = (i + 1) & (rmap_cap - 1))
        if (rmap[i]->h == h) return rmap[i];
    return NULL;
}

static int rmap_put(mp_reader *r)
{
    size_t i;
    if (2 * (rmap_n + 1) > rmap_cap) {
        size_t cap = rmap_cap ? 2 * rmap_cap : 64, old = rmap_cap, k;
        mp_reader **m = calloc(cap, sizeof *m), **was = rmap;
        if (m == NULL) return -1;
        rmap = m;
        rmap_cap = cap;
        for (k = 0; k < old; k++) {
            if (was[k] == NULL) continue;
            for (i = rmap_slot(was[k]->h); rmap[i] != NULL; i = (i + 1) & (cap - 1)) {}
            rmap[i] = was[k];
        }
        free(was);
    }
    for (i = rmap_slot(r->h); rmap[i] != NULL; i = (i + 1) & (rmap_cap - 1)) {}
    rmap[i] = r;
    rmap_n++;
    return 0;
}

/* linear probing: the entries after the removed one move back to keep every
 * chain unbroken (no tombstones) */
static void rmap_del(const mp_reader *r)
{
    size_t i = rmap_slot(r->h), j, k;
    while (rmap[i] != r) i = (i + 1) & (rmap_cap - 1);
    rmap[i] = NULL;
    rmap_n--;
    for (j = (i + 1) & (rmap_cap - 1); rmap[j] != NULL; j = (j + 1) & (rmap_cap - 1)) {
        k = rmap_slot(rmap[j]->h);
        /* rmap[j] may fill the hole at i when its home slot k is not in (i, j] */
        if ((j > i && (k <= i || k > j)) || (j < i && (k <= i && k > j))) {
            rmap[i] = rmap[j];
            rmap[j] = NULL;
            i = j;
        }
    }
}

static void reader_free(lua_State *L, mp_reader *r)
{
    rmap_del(r);
    luaL_unref(L, LUA_REGISTRYINDEX, r->parser_ref);
    luaL_unref(L, LUA_REGISTRYINDEX, r->cb_ref);
    free(r);
}

static void cread_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    (void)h;
    (void)suggested;
    buf->base = read_buf;
    buf->len = sizeof read_buf;
}

static void cread_cb(uv_stream_t *h, ssize_t nread, const uv_buf_t *buf)
{
    mp_reader *r = rmap_get(h);
    lua_State *L = cb_thread;
    int nargs;
    if (nread == 0 || r == NULL) return;
    lua_rawgeti(L, LUA_REGISTRYINDEX, r->cb_ref);
    if (nread > 0) {
        int failed;
        size_t buffered;
        if (r->in != NULL) {
            failed = r->in->p == NULL || mp_in_push(r->in->p, buf->base, (size_t)nread) != 0;
            buffered = failed ? 0 : mp_in_buffered(r->in->p);
        } else {
            failed = r->rep->r == NULL || mp_reply_push(r->rep->r, buf->base, (size_t)nread) != 0;
            buffered = failed ? 0 : mp_reply_buffered(r->rep->r);
        }
        lua_pushnil(L);
        lua_pushnumber(L, (lua_Number)nread);
        if (failed) lua_pushnil(L);
        else lua_pushnumber(L, (lua_Number)buffered);
        nargs = 3;
    } else if (nread == UV_EOF) {
        nargs = 0;
    } else {
        lua_pushfstring(L, "%s: %s", uv_err_name((int)nread), uv_strerror((int)nread));
        nargs = 1;
    }
    /* (r may be gone after the call: the callback may stop the reading) */
    if (lua_pcall(L, nargs, 0, 0) != 0) {
        fprintf(stderr, "moonpost: read callback: %s\n", lua_tostring(L, -1));
        lua_pop(L, 1);
    }
}

static int l_read_start(lua_State *L)
{
    uv_stream_t *h = luv_tcp_handle(L, 1, luaL_checkinteger(L, 2));
    lparser *in = mp_testudata_c(L, 3, PARSER_MT, &parser_mt);
    lreply *rep = in == NULL ? mp_testudata_c(L, 3, REPLY_MT, &reply_mt) : NULL;
    mp_reader *r;
    int rc;
    luaL_checktype(L, 4, LUA_TFUNCTION);
    if (in == NULL && rep == NULL) luaL_argerror(L, 3, "parser or reply parser expected");
    if (h == NULL) {
        lua_pushnil(L);
        lua_pushliteral(L, "unsupported");
        return 2;
    }
    r = rmap_get(h);
    if (r == NULL) {
        r = calloc(1, sizeof *r);
        if (r == NULL || (r->h = h, rmap_put(r) != 0)) {
            free(r);
            return luaL_error(L, "out of memory");
        }
    } else {
        luaL_unref(L, LUA_REGISTRYINDEX, r->parser_ref);
        luaL_unref(L, LUA_REGISTRYINDEX, r->cb_ref);
    }
    r->in = in;
    r->rep = rep;
    lua_pushvalue(L, 3);
    r->parser_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_pushvalue(L, 4);
    r->cb_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    uv_read_stop(h);
    rc = uv_read_start(h, cread_alloc, cread_cb);
    if (rc != 0) {
        reader_free(L, r);
        lua_pushnil(L);
        lua_pushfstring(L, "%s: %s", uv_err_name(rc), uv_strerror(rc));
        return 2;
    }
    lua_pushboolean(L, 1);
    return 1;
}

/* read_stop(tcp): also for a handle being closed (luv's userdata stays
 * valid until it is collected) */
static int l_read_stop(lua_State *L)
{
    void *ud = lua_touserdata(L, 1);
    uv_stream_t *h;
    mp_reader *r;
    if (ud == NULL || mp_testudata_c(L, 1, "uv_tcp", &uv_tcp_mt) == NULL) luaL_argerror(L, 1, "uv_tcp expected");
    h = *(uv_stream_t **)ud;
    r = h != NULL ? rmap_get(h) : NULL;
    if (r != NULL) {
        if (!uv_is_closing((uv_handle_t *)h)) uv_read_stop(h);
        reader_free(L, r);
    }
    lua_pushboolean(L, 1);
    return 1;
}

/* readers() -> the number of handles being read here (for tests) */
static int l_readers(lua_State *L)
{
    lua_pushinteger(L, (lua_Integer)rmap_n);
    return 1;
}

static int l_utf8_valid(lua_State *L)
{
    size_t n;
    const char *s = luaL_checklstring(L, 1, &n);
    lua_pushboolean(L, mp_utf8_valid(s, n));
    return 1;
}

static int l_xtext_valid(lua_State *L)
{
    size_t n;
    const char *s = luaL_checklstring(L, 1, &n);
    lua_pushboolean(L, mp_xtext_valid(s, n));
    return 1;
}

/* tune_malloc(): keep freed memory at the top of glibc's heap instead of
 * giving it back at every free. Every read allocates and frees a 64 KiB
 * buffer (libuv through luv), and with glibc's defaults (trim past 128 KiB,
 * and a threshold that moves with each mmapped block freed) the heap top was
 * given back and faulted in again over and over: 1.41 page faults per
 * message in the durable benchmark, 0.49 with this (what the growing queue
 * itself needs). Returns true where it applies (glibc). */
static int l_tune_malloc(lua_State *L)
{
#ifdef __GLIBC__
    int ok = mallopt(M_TRIM_THRESHOLD, 4 * 1024 * 1024) == 1 && mallopt(M_TOP_PAD, 1024 * 1024) == 1;
    lua_pushboolean(L, ok);
#else
    lua_pushboolean(L, 0);
#endif
    return 1;
}

static const luaL_Reg funcs[] = {
    {"tune_malloc", l_tune_malloc},
    {"send_stuffed", l_send_stuffed},
    {"read_start", l_read_start},
    {"read_stop", l_read_stop},
    {"readers", l_readers},
    {"parser", l_parser},
    {"reply_parser", l_reply_parser},
    {"message", l_message},
    {"parse_path", l_parse_path},
    {"check_param", l_check_param},
    {"dotstuff", l_dotstuff},
    {"has_8bit", l_has_8bit},
    {"has_ctl", l_has_ctl},
    {"utf8_valid", l_utf8_valid},
    {"xtext_valid", l_xtext_valid},
    {NULL, NULL}};

static const luaL_Reg parser_methods[] = {
    {"push", p_push},
    {"next", p_next},
    {"begin_data", p_begin_data},
    {"begin_bdat", p_begin_bdat},
    {"begin_line", p_begin_line},
    {"discard", p_discard},
    {"reset_body", p_reset_body},
    {"take", p_take},
    {"buffered", p_buffered},
    {"body_size", p_body_size},
    {"capacity", p_capacity},
    {"mode", p_mode},
    {"set_limits", p_set_limits},
    {"close", p_close},
    {NULL, NULL}};

static const luaL_Reg parser_meta[] = {{"__gc", p_gc}, {NULL, NULL}};

static const luaL_Reg message_methods[] = {
    {"size", m_size},
    {"tostring", m_tostring},
    {"sub", m_sub},
    {"headers", m_headers},
    {"remove", m_remove},
    {"prepend", m_prepend},
    {"append", m_append},
    {"write", m_write},
    {"close", m_close},
    {NULL, NULL}};

static const luaL_Reg message_meta[] = {
    {"__gc", m_gc}, {"__len", m_len}, {"__tostring", m___tostring}, {NULL, NULL}};

static const luaL_Reg reply_methods[] = {
    {"push", r_push}, {"next", r_next}, {"buffered", r_buffered}, {"close", r_close}, {NULL, NULL}};

static const luaL_Reg reply_meta[] = {{"__gc", r_gc}, {NULL, NULL}};

MP_EXPORT int luaopen_moonpost_core_smtp(lua_State *L);
MP_EXPORT int luaopen_moonpost_core_smtp(lua_State *L)
{
    mp_createmeta(L, PARSER_MT, parser_meta, parser_methods);
    mp_createmeta(L, MESSAGE_MT, message_meta, message_methods);
    mp_createmeta(L, REPLY_MT, reply_meta, reply_methods);
    if (cb_thread == NULL) {
        cb_thread = lua_newthread(L);
        luaL_ref(L, LUA_REGISTRYINDEX); /* kept for the life of the state */
    }
    lua_newtable(L);
    mp_setfuncs(L, funcs);
    lua_pushinteger(L, MP_SMTP_CMD_LINE_MAX);
    lua_setfield(L, -2, "CMD_LINE_MAX");
    lua_pushinteger(L, MP_SMTP_TEXT_LINE_MAX);
    lua_setfield(L, -2, "TEXT_LINE_MAX");
    lua_pushinteger(L, MP_SMTP_PATH_MAX);
    lua_setfield(L, -2, "PATH_MAX");
    return 1;
}
