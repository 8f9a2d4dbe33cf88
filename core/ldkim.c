/*
 * moonpost.core.dkim: the Lua face of the DKIM engine (dkim.c).
 *
 *   dkim.load_key(path)          -> key | nil, err      ("<path>: <why>")
 *   dkim.key_from_pem(pem, name) -> key | nil, err
 *   key:info() -> { type = "rsa" | "ed25519", bits = n, public = "<base64 for p=>" }
 *   key:txt()  -> "v=DKIM1; k=rsa; p=..."   (the TXT record to publish)
 *   key:name() -> the path or name it was loaded from
 *
 *   dkim.signer{ threads = 2, rsa = "openssl" | "libopendkim" } -> signer | nil, err
 *   signer:submit(msg, specs) -> id | nil, "busy"
 *       msg: a string or a message (moonpost.core.smtp), copied into the job;
 *       specs: { { key =, domain =, selector =, canon =, headers =, oversign =,
 *                  identity =, expire =, timestamp = }, ... }
 *   signer:collect() -> { { id, headers } | { id, nil, err }, ... }   finished jobs
 *   signer:fd()      -> fd readable while finished jobs wait to be collected
 *   signer:pending() -> jobs submitted and not yet collected
 *   signer:close()   -> true   (joins the threads; queued jobs are dropped)
 *
 *   dkim.signatures(msg) -> { { domain, selector, algorithm, query, header_b [, error] }, ... }
 *   dkim.verify(msg, keys) -> { { domain, selector, algorithm, query, header_b, result
 *                                 [, reason] [, testing] }, ... }
 *       keys[query] = TXT text | false (no record) | nil (temporary failure)
 *
 * Nothing here calls into Lua from another thread: the signer's threads
 * only touch C memory, and results wait in C until collect().
 */
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "dkim.h"
#include "lcompat.h"
#include "lmessage.h"

#define KEY_MT "moonpost.core.dkim.key"
#define SIGNER_MT "moonpost.core.dkim.signer"

#ifndef MP_DKIM_MAX_RESULTS
#define MP_DKIM_MAX_RESULTS 64   /* DKIM-Signature fields reported per message */
#endif
#define DEFAULT_THREADS 2

/* Signed when present (RFC 6376 5.4.1, plus the List-* fields of RFC 2369,
 * RFC 2919 and RFC 8058). */
static const char *const default_headers[] = {
    "from", "reply-to", "subject", "date", "to", "cc", "resent-date", "resent-from", "resent-to", "resent-cc",
    "in-reply-to", "references", "list-id", "list-help", "list-unsubscribe", "list-unsubscribe-post",
    "list-subscribe", "list-post", "list-owner", "list-archive", "message-id", "mime-version", "content-type",
    "content-transfer-encoding"};
static const char *const default_oversign[] = {"from"};

typedef struct lkey {
    mp_dkim_key *k;
} lkey;

typedef struct lsigner {
    mp_workq *s;
    int engine;
} lsigner;

/* ---- messages ---------------------------------------------------------------------------- */

static const void *message_mt, *key_mt; /* for mp_testudata_c */

static const char *checkmsg(lua_State *L, int i, size_t *len)
{
    lmessage *m;
    if (lua_type(L, i) == LUA_TSTRING) return lua_tolstring(L, i, len);
    m = mp_testudata_c(L, i, MESSAGE_MT, &message_mt);
    if (m == NULL) luaL_argerror(L, i, "expected a string or a message");
    if (m->closed) luaL_argerror(L, i, "message is closed");
    *len = m->body.len;
    return mp_body_data(&m->body);
}

/* ---- keys -------------------------------------------------------------------------------- */

static lkey *newkey(lua_State *L)
{
    lkey *k = lua_newuserdata(L, sizeof *k);
    k->k = NULL;
    luaL_getmetatable(L, KEY_MT);
    lua_setmetatable(L, -2);
    return k;
}

static int l_load_key(lua_State *L)
{
    const char *path = luaL_checkstring(L, 1);
    char err[512];
    lkey *k = newkey(L);
    k->k = mp_dkim_key_load(path, err, sizeof err);
    if (k->k == NULL) {
        lua_pushnil(L);
        lua_pushstring(L, err);
        return 2;
    }
    return 1;
}

static int l_key_from_pem(lua_State *L)
{
    size_t len;
    const char *pem = luaL_checklstring(L, 1, &len);
    const char *name = luaL_optstring(L, 2, "key");
    char err[512];
    lkey *k = newkey(L);
    k->k = mp_dkim_key_from_pem(pem, len, name, err, sizeof err);
    if (k->k == NULL) {
        lua_pushnil(L);
        lua_pushstring(L, err);
        return 2;
    }
    return 1;
}

static mp_dkim_key *checkkey(lua_State *L, int i)
{
    lkey *k = mp_checkudata_c(L, i, KEY_MT, &key_mt);
    if (k->k == NULL) luaL_argerror(L, i, "key was not loaded");
    return k->k;
}

static const char *key_type(const mp_dkim_key *k)
{
    return mp_dkim_key_type(k) == MP_DKIM_RSA ? "rsa" : "ed25519";
}

static int k_info(lua_State *L)
{
    mp_dkim_key *k = checkkey(L, 1);
    lua_createtable(L, 0, 3);
    lua_pushstring(L, key_type(k));
    lua_setfield(L, -2, "type");
    lua_pushinteger(L, mp_dkim_key_bits(k));
    lua_setfield(L, -2, "bits");
    lua_pushstring(L, mp_dkim_key_public(k));
    lua_setfield(L, -2, "public");
    return 1;
}

static int k_txt(lua_State *L)
{
    mp_dkim_key *k = checkkey(L, 1);
    lua_pushfstring(L, "v=DKIM1; k=%s; p=%s", key_type(k), mp_dkim_key_public(k));
    return 1;
}

static int k_name(lua_State *L)
{
    lua_pushstring(L, mp_dkim_key_name(checkkey(L, 1)));
    return 1;
}

static int k_tostring(lua_State *L)
{
    lkey *k = luaL_checkudata(L, 1, KEY_MT);
    if (k->k == NULL) lua_pushliteral(L, "dkim key (none)");
    else lua_pushfstring(L, "dkim key %s (%s, %d bits)", mp_dkim_key_name(k->k), key_type(k->k), mp_dkim_key_bits(k->k));
    return 1;
}

static int k_gc(lua_State *L)
{
    lkey *k = luaL_checkudata(L, 1, KEY_MT);
    mp_dkim_key_unref(k->k);
    k->k = NULL;
    return 0;
}

/* ---- the signer ----------------------------------------------------------------------------- */

static int l_signer(lua_State *L)
{
    int threads = DEFAULT_THREADS, engine = MP_ENGINE_NATIVE, err = 0;
    lsigner *sg;
    if (!lua_isnoneornil(L, 1)) {
        luaL_checktype(L, 1, LUA_TTABLE);
        lua_getfield(L, 1, "threads");
        if (!lua_isnil(L, -1)) {
            lua_Number n = lua_tonumber(L, -1);
            if (!lua_isnumber(L, -1) || n != (int)n || n < 1 || n > MP_DKIM_MAX_THREADS)
                luaL_argerror(L, 1, lua_pushfstring(L, "threads: expected an integer from 1 to %d", MP_DKIM_MAX_THREADS));
            threads = (int)n;
        }
        lua_getfield(L, 1, "rsa");
        if (!lua_isnil(L, -1)) {
            const char *e = lua_tostring(L, -1);
            if (e && strcmp(e, "openssl") == 0) engine = MP_ENGINE_NATIVE;
            else if (e && strcmp(e, "libopendkim") == 0) engine = MP_ENGINE_LIBOPENDKIM;
            else
                luaL_argerror(L, 1, "rsa: expected \"libopendkim\" or \"openssl\"");
        }
        lua_pop(L, 2);
    }
    sg = lua_newuserdata(L, sizeof *sg);
    sg->s = NULL;
    sg->engine = engine;
    luaL_getmetatable(L, SIGNER_MT);
    lua_setmetatable(L, -2);
    sg->s = mp_dkim_signer_new(threads, &err);
    if (sg->s == NULL) return mp_pusherrno(L, "dkim signer", err);
    return 1;
}

static lsigner *checksigner(lua_State *L, int i)
{
    lsigner *sg = luaL_checkudata(L, i, SIGNER_MT);
    if (sg->s == NULL) luaL_argerror(L, i, "signer is closed");
    return sg;
}

/* One spec as read from Lua: pointers into strings its table holds. */
typedef struct rspec {
    mp_dkim_key *key;
    const char *domain, *selector, *identity;
    int hcanon, bcanon, timestamp;
    const char *headers[MP_DKIM_MAX_HEADERS], *oversign[MP_DKIM_MAX_HEADERS];
    size_t nheaders, noversign;
    double expire;
    int defaults; /* headers and oversign are the defaults below (nothing to copy) */
} rspec;

static int spec_error(lua_State *L, int n, const char *fmt, const char *a)
{
    return luaL_argerror(L, 3, lua_pushfstring(L, "spec %d: %s", n, lua_pushfstring(L, fmt, a)));
}

/* A header field name we pass to libopendkim, which makes a regex of it. */
static int valid_header_name(const char *s, size_t n)
{
    size_t i;
    if (n == 0 || n > 64) return 0;
    for (i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (!((c | 32) >= 'a' && (c | 32) <= 'z') && !(c >= '0' && c <= '9') && c != '-' && c != '_') return 0;
    }
    return 1;
}

/* Read the list at the top of the stack into out; pops it. */
static size_t read_names(lua_State *L, int n, const char *field, const char **out)
{
    size_t i, count = lua_objlen(L, -1);
    if (count > MP_DKIM_MAX_HEADERS) spec_error(L, n, "%s: more than 64 names", field);
    for (i = 0; i < count; i++) {
        size_t len = 0;
        const char *s = NULL;
        lua_rawgeti(L, -1, (int)i + 1);
        /* a string only: lua_tolstring would turn a number into a string
         * that nothing holds once it is popped */
        if (lua_type(L, -1) == LUA_TSTRING) s = lua_tolstring(L, -1, &len);
        if (s == NULL || !valid_header_name(s, len))
            spec_error(L, n, "%s: expected header field names (letters, digits, '-', '_')", field);
        out[i] = s; /* the list, still on the stack's table, keeps it */
        lua_pop(L, 1);
    }
    lua_pop(L, 1);
    return count;
}

static const char *const spec_fields[] = {"key", "domain", "selector", "canon", "headers", "oversign",
                                          "identity", "expire", "timestamp", NULL};

static void read_spec(lua_State *L, int n, rspec *sp)
{
    const char *canon;
    size_t len, i;
    int from = 0;
    if (!lua_istable(L, -1)) spec_error(L, n, "expected a table, got %s", luaL_typename(L, -1));
    lua_pushnil(L);
    while (lua_next(L, -2)) {
        const char *k = lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : NULL;
        for (i = 0; k && spec_fields[i]; i++)
            if (strcmp(k, spec_fields[i]) == 0) break;
        if (k == NULL || spec_fields[i] == NULL)
            spec_error(L, n, "unknown field '%s' (known: key, domain, selector, canon, headers, oversign, identity, "
                             "expire, timestamp)", k ? k : luaL_typename(L, -2));
        lua_pop(L, 1);
    }
    lua_getfield(L, -1, "key");
    if (mp_testudata_c(L, -1, KEY_MT, &key_mt) == NULL || ((lkey *)lua_touserdata(L, -1))->k == NULL)
        spec_error(L, n, "key: expected a key from dkim.load_key, got %s", luaL_typename(L, -1));
    sp->key = ((lkey *)lua_touserdata(L, -1))->k;
    lua_pop(L, 1);
    lua_getfield(L, -1, "domain");
    if (lua_type(L, -1) != LUA_TSTRING)
        spec_error(L, n, "domain: expected a domain name, got %s", luaL_typename(L, -1));
    sp->domain = lua_tolstring(L, -1, &len);
    if (!mp_dkim_valid_name(sp->domain, len) || strlen(sp->domain) != len)
        spec_error(L, n, "domain: expected a domain name, got \"%s\"", sp->domain);
    lua_pop(L, 1);
    lua_getfield(L, -1, "selector");
    if (lua_type(L, -1) != LUA_TSTRING)
        spec_error(L, n, "selector: expected a selector, got %s", luaL_typename(L, -1));
    sp->selector = lua_tolstring(L, -1, &len);
    if (!mp_dkim_valid_name(sp->selector, len) || strlen(sp->selector) != len)
        spec_error(L, n, "selector: expected a selector, got \"%s\"", sp->selector);
    lua_pop(L, 1);
    lua_getfield(L, -1, "canon");
    canon = lua_isnil(L, -1) ? "relaxed/relaxed" : lua_tostring(L, -1);
    if (canon && strcmp(canon, "relaxed/relaxed") == 0) sp->hcanon = sp->bcanon = MP_CANON_RELAXED;
    else if (canon && strcmp(canon, "simple/simple") == 0) sp->hcanon = sp->bcanon = MP_CANON_SIMPLE;
    else if (canon && strcmp(canon, "relaxed/simple") == 0) sp->hcanon = MP_CANON_RELAXED, sp->bcanon = MP_CANON_SIMPLE;
    else if (canon && strcmp(canon, "simple/relaxed") == 0) sp->hcanon = MP_CANON_SIMPLE, sp->bcanon = MP_CANON_RELAXED;
    else spec_error(L, n, "canon: expected %s", "\"relaxed/relaxed\", \"simple/simple\", \"relaxed/simple\" or \"simple/relaxed\"");
    lua_pop(L, 1);
    sp->defaults = 0;
    lua_getfield(L, -1, "headers");
    if (lua_isnil(L, -1)) {
        sp->defaults = 1;
        lua_pop(L, 1);
        sp->nheaders = sizeof default_headers / sizeof *default_headers;
        for (i = 0; i < sp->nheaders; i++) sp->headers[i] = default_headers[i];
    } else {
        if (!lua_istable(L, -1)) spec_error(L, n, "headers: expected a list of names, got %s", luaL_typename(L, -1));
        sp->nheaders = read_names(L, n, "headers", sp->headers);
    }
    for (i = 0; i < sp->nheaders; i++)
        if (strcasecmp(sp->headers[i], "from") == 0) from = 1;
    if (!from) spec_error(L, n, "headers: %s", "must include From (RFC 6376 5.4)");
    lua_getfield(L, -1, "oversign");
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        sp->noversign = 1;
        sp->oversign[0] = default_oversign[0];
    } else {
        sp->defaults = 0;
        if (!lua_istable(L, -1)) spec_error(L, n, "oversign: expected a list of names, got %s", luaL_typename(L, -1));
        sp->noversign = read_names(L, n, "oversign", sp->oversign);
    }
    lua_getfield(L, -1, "identity");
    sp->identity = NULL;
    if (!lua_isnil(L, -1)) {
        if (lua_type(L, -1) == LUA_TSTRING) sp->identity = lua_tolstring(L, -1, &len);
        if (sp->identity == NULL || !mp_dkim_valid_identity(sp->identity, len, sp->domain, strlen(sp->domain)))
            spec_error(L, n, "identity: expected [local]@domain within domain %s", sp->domain);
    }
    lua_pop(L, 1);
    lua_getfield(L, -1, "expire");
    sp->expire = 0;
    if (!lua_isnil(L, -1)) {
        sp->expire = lua_tonumber(L, -1);
        if (lua_type(L, -1) != LUA_TNUMBER || sp->expire != (double)(long long)sp->expire || sp->expire < 1 ||
            sp->expire > 1e10)
            spec_error(L, n, "expire: expected %s", "a whole number of seconds, at least 1");
    }
    lua_pop(L, 1);
    lua_getfield(L, -1, "timestamp");
    if (!lua_isnil(L, -1) && lua_type(L, -1) != LUA_TBOOLEAN)
        spec_error(L, n, "timestamp: expected a boolean, got %s", luaL_typename(L, -1));
    sp->timestamp = lua_isnil(L, -1) || lua_toboolean(L, -1);
    lua_pop(L, 1);
}

/* submit(msg, specs): all arguments are checked before anything is
 * allocated, so an argument error leaks nothing. */
/* The job for msg (at index mi) and the specs (at index si): a job, or NULL
 * with nil, err pushed. A mistake in a spec raises. */
static mp_dkim_job *make_job(lua_State *L, int mi, int si, int engine)
{
    size_t len, nspecs;
    const char *msg = checkmsg(L, mi, &len);
    rspec specs[MP_DKIM_MAX_SPECS];
    mp_dkim_job *j;
    char err[256];
    size_t i;
    luaL_checktype(L, si, LUA_TTABLE);
    nspecs = lua_objlen(L, si);
    if (nspecs < 1 || nspecs > MP_DKIM_MAX_SPECS)
        luaL_argerror(L, si, lua_pushfstring(L, "expected 1 to %d signature specs", MP_DKIM_MAX_SPECS));
    for (i = 0; i < nspecs; i++) {
        lua_rawgeti(L, si, (int)i + 1);
        read_spec(L, (int)i + 1, &specs[i]);
        lua_pop(L, 1);
    }
    j = mp_dkim_job_new(msg, len, (int)nspecs);
    if (j == NULL) {
        lua_pushnil(L);
        lua_pushliteral(L, "out of memory");
        return NULL;
    }
    for (i = 0; i < nspecs; i++) {
        const rspec *sp = &specs[i];
        mp_dkim_spec_in in;
        in.key = sp->key;
        in.domain = sp->domain;
        in.selector = sp->selector;
        in.identity = sp->identity;
        in.hcanon = sp->hcanon;
        in.bcanon = sp->bcanon;
        in.headers = sp->defaults ? default_headers : sp->headers;
        in.nheaders = sp->nheaders;
        in.oversign = sp->defaults ? default_oversign : sp->oversign;
        in.lists_static = sp->defaults;
        in.noversign = sp->noversign;
        in.expire = (uint64_t)sp->expire;
        in.timestamp = sp->timestamp;
        in.engine = engine;
        if (mp_dkim_job_set(j, (int)i, &in, err, sizeof err) != 0) {
            mp_dkim_job_free(j);
            lua_pushnil(L);
            lua_pushstring(L, err);
            return NULL;
        }
    }
    return j;
}

static int s_submit(lua_State *L)
{
    lsigner *sg = checksigner(L, 1);
    uint64_t id;
    mp_dkim_job *j = make_job(L, 2, 3, sg->engine);
    if (j == NULL) return 2;
    if (mp_dkim_signer_submit(sg->s, j, &id) != 0) {
        mp_dkim_job_free(j);
        lua_pushnil(L);
        lua_pushliteral(L, "busy");
        return 2;
    }
    lua_pushnumber(L, (lua_Number)id);
    return 1;
}

/* sign_now(msg, specs) -> headers | nil, err: the same job, made in the
 * calling thread (for Ed25519, whose signature costs less than a trip to
 * a signer thread and back). Always the native engine. */
static int l_sign_now(lua_State *L)
{
    size_t rlen;
    const char *r;
    mp_dkim_job *j = make_job(L, 1, 2, MP_ENGINE_NATIVE);
    if (j == NULL) return 2;
    mp_dkim_job_run(j);
    r = mp_dkim_job_result(j, &rlen);
    if (r) {
        lua_pushlstring(L, r, rlen);
        mp_dkim_job_free(j);
        return 1;
    }
    lua_pushnil(L);
    lua_pushstring(L, mp_dkim_job_error(j) ? mp_dkim_job_error(j) : "unknown error");
    mp_dkim_job_free(j);
    return 2;
}

static int s_collect(lua_State *L)
{
    lsigner *sg = checksigner(L, 1);
    mp_dkim_job *j = mp_dkim_signer_collect(sg->s);
    int n = 0;
    lua_newtable(L);
    while (j) {
        mp_dkim_job *next = mp_dkim_job_next(j);
        size_t len;
        const char *res = mp_dkim_job_result(j, &len);
        lua_createtable(L, 3, 0);
        lua_pushnumber(L, (lua_Number)mp_dkim_job_id(j));
        lua_rawseti(L, -2, 1);
        if (res) {
            lua_pushlstring(L, res, len);
            lua_rawseti(L, -2, 2);
        } else {
            lua_pushstring(L, mp_dkim_job_error(j) ? mp_dkim_job_error(j) : "unknown error");
            lua_rawseti(L, -2, 3);
        }
        lua_rawseti(L, -2, ++n);
        mp_dkim_job_free(j);
        j = next;
    }
    return 1;
}

static int s_fd(lua_State *L)
{
    lua_pushinteger(L, mp_workq_fd(checksigner(L, 1)->s));
    return 1;
}

static int s_pending(lua_State *L)
{
    lua_pushnumber(L, (lua_Number)mp_workq_pending(checksigner(L, 1)->s));
    return 1;
}

static int s_close(lua_State *L)
{
    lsigner *sg = luaL_checkudata(L, 1, SIGNER_MT);
    if (sg->s) {
        mp_workq_free(sg->s);
        sg->s = NULL;
    }
    lua_pushboolean(L, 1);
    return 1;
}

static int s_gc(lua_State *L)
{
    s_close(L);
    return 0;
}

/* ---- signatures and verification --------------------------------------------------------------- */

static void push_sig(lua_State *L, const mp_dkim_sig *s)
{
    if (s->domain[0]) {
        lua_pushstring(L, s->domain);
        lua_setfield(L, -2, "domain");
    }
    if (s->selector[0]) {
        lua_pushstring(L, s->selector);
        lua_setfield(L, -2, "selector");
    }
    if (s->algorithm[0]) {
        lua_pushstring(L, s->algorithm);
        lua_setfield(L, -2, "algorithm");
    }
    if (s->domain[0] && s->selector[0]) {
        char q[600];
        size_t i;
        snprintf(q, sizeof q, "%s._domainkey.%s", s->selector, s->domain);
        for (i = 0; q[i]; i++)
            if (q[i] >= 'A' && q[i] <= 'Z') q[i] = (char)(q[i] + 32);
        lua_pushstring(L, q);
        lua_setfield(L, -2, "query");
    }
    if (s->header_b[0]) {
        lua_pushstring(L, s->header_b);
        lua_setfield(L, -2, "header_b");
    }
}

static int l_signatures(lua_State *L)
{
    size_t len;
    const char *msg = checkmsg(L, 1, &len);
    mp_hdr_iter it;
    mp_hdr_field f;
    int n = 0;
    lua_newtable(L);
    mp_hdr_init(&it, msg, len);
    while (mp_hdr_next(&it, &f) && n < MP_DKIM_MAX_RESULTS) {
        mp_dkim_sig sig;
        const char *colon;
        if (f.name_len != 14 || strncasecmp(f.text, "DKIM-Signature", 14) != 0) continue;
        colon = memchr(f.text, ':', f.len);
        mp_dkim_sig_parse(colon + 1, f.len - (size_t)(colon + 1 - f.text), &sig);
        lua_newtable(L);
        push_sig(L, &sig);
        if (sig.error) {
            lua_pushstring(L, sig.error);
            lua_setfield(L, -2, "error");
        }
        lua_rawseti(L, -2, ++n);
    }
    return 1;
}

static int l_verify(lua_State *L)
{
    size_t len, nkeys = 0, i;
    const char *msg = checkmsg(L, 1, &len);
    mp_dkim_keyrec *keys;
    mp_dkim_result *res;
    char err[256];
    int n, k;
    if (!lua_isnoneornil(L, 2)) luaL_checktype(L, 2, LUA_TTABLE);
    else {
        lua_settop(L, 1);
        lua_newtable(L);
    }
    /* check first, then copy: the strings stay in the caller's table */
    lua_pushnil(L);
    while (lua_next(L, 2)) {
        int t = lua_type(L, -1);
        if (lua_type(L, -2) != LUA_TSTRING)
            luaL_argerror(L, 2, "keys: expected query names (\"s1._domainkey.example.com\") as keys");
        if (t != LUA_TSTRING && !(t == LUA_TBOOLEAN && !lua_toboolean(L, -1)))
            luaL_argerror(L, 2, lua_pushfstring(L, "keys[\"%s\"]: expected the TXT record or false, got %s",
                                                lua_tostring(L, -2), luaL_typename(L, -1)));
        nkeys++;
        lua_pop(L, 1);
    }
    /* scratch memory that the GC owns, so that nothing leaks on an error */
    keys = lua_newuserdata(L, (nkeys ? nkeys : 1) * sizeof *keys);
    res = lua_newuserdata(L, MP_DKIM_MAX_RESULTS * sizeof *res);
    i = 0;
    lua_pushnil(L);
    while (lua_next(L, 2)) {
        keys[i].query = lua_tostring(L, -2);
        keys[i].txt = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : NULL;
        keys[i].state = keys[i].txt ? MP_KEY_FOUND : MP_KEY_NONE;
        i++;
        lua_pop(L, 1);
    }
    n = mp_dkim_verify(msg, len, keys, nkeys, res, MP_DKIM_MAX_RESULTS, err, sizeof err);
    if (n < 0) {
        lua_pushnil(L);
        lua_pushstring(L, err);
        return 2;
    }
    lua_createtable(L, n, 0);
    for (k = 0; k < n; k++) {
        lua_createtable(L, 0, 8);
        push_sig(L, &res[k].sig);
        lua_pushstring(L, res[k].result);
        lua_setfield(L, -2, "result");
        if (res[k].reason[0]) {
            lua_pushstring(L, res[k].reason);
            lua_setfield(L, -2, "reason");
        }
        if (res[k].testing) {
            lua_pushboolean(L, 1);
            lua_setfield(L, -2, "testing");
        }
        if (res[k].body_unsigned > 0) {
            lua_pushnumber(L, (lua_Number)res[k].body_unsigned);
            lua_setfield(L, -2, "body_unsigned");
        }
        lua_rawseti(L, -2, k + 1);
    }
    return 1;
}

static const luaL_Reg funcs[] = {{"load_key", l_load_key},     {"key_from_pem", l_key_from_pem},
                                 {"signer", l_signer},         {"sign_now", l_sign_now}, {"signatures", l_signatures},
                                 {"verify", l_verify},         {NULL, NULL}};
static const luaL_Reg key_methods[] = {{"info", k_info}, {"txt", k_txt}, {"name", k_name}, {NULL, NULL}};
static const luaL_Reg key_meta[] = {{"__gc", k_gc}, {"__tostring", k_tostring}, {NULL, NULL}};
static const luaL_Reg signer_methods[] = {{"submit", s_submit}, {"collect", s_collect}, {"fd", s_fd},
                                          {"pending", s_pending}, {"close", s_close}, {NULL, NULL}};
static const luaL_Reg signer_meta[] = {{"__gc", s_gc}, {NULL, NULL}};

MP_EXPORT int luaopen_moonpost_core_dkim(lua_State *L);
MP_EXPORT int luaopen_moonpost_core_dkim(lua_State *L)
{
    mp_createmeta(L, KEY_MT, key_meta, key_methods);
    mp_createmeta(L, SIGNER_MT, signer_meta, signer_methods);
    lua_newtable(L);
    mp_setfuncs(L, funcs);
    lua_pushinteger(L, MP_DKIM_MAX_SPECS);
    lua_setfield(L, -2, "MAX_SPECS");
    lua_pushinteger(L, MP_DKIM_MAX_SIGS);
    lua_setfield(L, -2, "MAX_SIGS");
    return 1;
}
