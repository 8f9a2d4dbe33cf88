/*
 * moonpost.core.tls: the Lua binding of tls.c.
 *
 *   ctx = tls.context{ server = true, certs = { { cert = "c.pem", key = "k.pem" }, ... },
 *                      min_version = "1.2", max_version, ciphers, ciphersuites, groups,
 *                      verify = false, ca_file, ca_path }          -> ctx | nil, err
 *   conn = ctx:new([name])              client: SNI and the name to verify
 *   conn:handshake([ciphertext])        -> "done" | "want", out | nil, err, out
 *   conn:decrypt(ciphertext)            -> plaintext, out, closed | nil, err, out
 *   conn:encrypt(plaintext)             -> ciphertext | nil, err
 *   conn:close_notify()                 -> ciphertext | nil
 *   conn:info()                         -> { version, cipher, bits, sni, group,
 *                                            peer_cert, verified, verify_error, peer_subject }
 *
 * `out` is ciphertext the caller must send (or nil). Nothing here touches a
 * socket or calls back into Lua.
 */
#include "lcompat.h"
#include "tls.h"

#define CTX_MT "moonpost.core.tls.context"
#define CONN_MT "moonpost.core.tls.conn"

typedef struct lctx {
    mp_tls_ctx *c;
} lctx;

typedef struct lconn {
    mp_tls *t;
} lconn;

static lctx *checkctx(lua_State *L, int i)
{
    lctx *x = luaL_checkudata(L, i, CTX_MT);
    if (x->c == NULL) luaL_argerror(L, i, "closed TLS context");
    return x;
}

/* the connections' metatable's address, for mp_checkudata_c (a check per
 * TLS record) */
static const void *conn_mt;

static lconn *checkconn(lua_State *L, int i)
{
    lconn *x = mp_checkudata_c(L, i, CONN_MT, &conn_mt);
    if (x->t == NULL) luaL_argerror(L, i, "closed TLS connection");
    return x;
}

/* Push the pending output (and drop it from the BIO), or nil. */
static void push_out(lua_State *L, mp_tls *t)
{
    const char *p;
    size_t n = mp_tls_out(t, &p);
    if (n == 0) {
        lua_pushnil(L);
        return;
    }
    lua_pushlstring(L, p, n);
    mp_tls_out_consume(t, n);
}

static const char *optfield(lua_State *L, int t, const char *name)
{
    const char *s;
    lua_getfield(L, t, name);
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        return NULL;
    }
    if (lua_type(L, -1) != LUA_TSTRING) luaL_error(L, "tls.context: field '%s' must be a string", name);
    s = lua_tostring(L, -1);
    lua_pop(L, 1); /* the string stays alive: it is referenced by the table */
    return s;
}

/* context(opts) */
static int l_context(lua_State *L)
{
    mp_tls_opts o;
    mp_tls_cert certs[64];
    char err[MP_TLS_ERRLEN];
    lctx *x;
    memset(&o, 0, sizeof o);
    luaL_checktype(L, 1, LUA_TTABLE);
    lua_getfield(L, 1, "server");
    o.server = lua_toboolean(L, -1);
    lua_getfield(L, 1, "verify");
    o.verify = lua_toboolean(L, -1);
    lua_pop(L, 2);
    o.min_version = optfield(L, 1, "min_version");
    o.max_version = optfield(L, 1, "max_version");
    o.ciphers = optfield(L, 1, "ciphers");
    o.ciphersuites = optfield(L, 1, "ciphersuites");
    o.groups = optfield(L, 1, "groups");
    o.ca_file = optfield(L, 1, "ca_file");
    o.ca_path = optfield(L, 1, "ca_path");
    lua_getfield(L, 1, "certs");
    if (lua_istable(L, -1)) {
        size_t n = lua_objlen(L, -1);
        if (n > sizeof certs / sizeof certs[0]) return luaL_error(L, "tls.context: at most 64 certificates");
        for (size_t i = 0; i < n; i++) {
            lua_rawgeti(L, -1, (int)i + 1);
            if (!lua_istable(L, -1)) return luaL_error(L, "tls.context: certs[%d] must be a table", (int)i + 1);
            certs[i].cert = optfield(L, lua_gettop(L), "cert");
            certs[i].key = optfield(L, lua_gettop(L), "key");
            if (certs[i].cert == NULL || certs[i].key == NULL)
                return luaL_error(L, "tls.context: certs[%d] needs cert and key", (int)i + 1);
            lua_pop(L, 1);
        }
        o.certs = certs;
        o.ncerts = n;
    } else if (!lua_isnil(L, -1)) {
        return luaL_error(L, "tls.context: field 'certs' must be a list");
    }
    lua_pop(L, 1);
    x = lua_newuserdata(L, sizeof *x);
    x->c = NULL;
    luaL_getmetatable(L, CTX_MT);
    lua_setmetatable(L, -2);
    x->c = mp_tls_ctx_new(&o, err);
    if (x->c == NULL) {
        lua_pushnil(L);
        lua_pushstring(L, err);
        return 2;
    }
    return 1;
}

static int ctx_new(lua_State *L)
{
    lctx *c = checkctx(L, 1);
    const char *name = luaL_optstring(L, 2, NULL);
    char err[MP_TLS_ERRLEN];
    lconn *x = lua_newuserdata(L, sizeof *x);
    x->t = NULL;
    luaL_getmetatable(L, CONN_MT);
    lua_setmetatable(L, -2);
    x->t = mp_tls_new(c->c, name, err);
    if (x->t == NULL) {
        lua_pushnil(L);
        lua_pushstring(L, err);
        return 2;
    }
    return 1;
}

static int ctx_gc(lua_State *L)
{
    lctx *x = luaL_checkudata(L, 1, CTX_MT);
    if (x->c) mp_tls_ctx_free(x->c);
    x->c = NULL;
    return 0;
}

static int feed_arg(lua_State *L, mp_tls *t, int i)
{
    size_t n = 0;
    const char *p = luaL_optlstring(L, i, NULL, &n);
    if (p && mp_tls_feed(t, p, n) != 0) return luaL_error(L, "out of memory");
    return 0;
}

static int conn_handshake(lua_State *L)
{
    lconn *x = checkconn(L, 1);
    char err[MP_TLS_ERRLEN];
    int r;
    feed_arg(L, x->t, 2);
    r = mp_tls_handshake(x->t, err);
    if (r == MP_TLS_ERROR) {
        lua_pushnil(L);
        lua_pushstring(L, err);
        push_out(L, x->t); /* the alert, when OpenSSL made one */
        return 3;
    }
    lua_pushstring(L, r == MP_TLS_DONE ? "done" : "want");
    push_out(L, x->t);
    return 2;
}

static int conn_decrypt(lua_State *L)
{
    lconn *x = checkconn(L, 1);
    char err[MP_TLS_ERRLEN];
    luaL_Buffer b;
    int closed = 0;
    feed_arg(L, x->t, 2);
    luaL_buffinit(L, &b);
    for (;;) {
        char *p = luaL_prepbuffer(&b);
        long n = mp_tls_read(x->t, p, LUAL_BUFFERSIZE, err);
        if (n > 0) {
            luaL_addsize(&b, (size_t)n);
            continue;
        }
        if (n == MP_TLS_WANT) break;
        if (n == MP_TLS_READ_CLOSED) {
            closed = 1;
            break;
        }
        lua_pushnil(L);
        lua_pushstring(L, err);
        push_out(L, x->t);
        return 3;
    }
    luaL_pushresult(&b);
    push_out(L, x->t);
    lua_pushboolean(L, closed);
    return 3;
}

static int conn_encrypt(lua_State *L)
{
    lconn *x = checkconn(L, 1);
    size_t n;
    const char *p = luaL_checklstring(L, 2, &n);
    char err[MP_TLS_ERRLEN];
    if (mp_tls_write(x->t, p, n, err) != 0) {
        lua_pushnil(L);
        lua_pushstring(L, err);
        return 2;
    }
    push_out(L, x->t);
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        lua_pushliteral(L, "");
    }
    return 1;
}

static int conn_close_notify(lua_State *L)
{
    lconn *x = checkconn(L, 1);
    mp_tls_shutdown(x->t);
    push_out(L, x->t);
    return 1;
}

static void setstr(lua_State *L, const char *k, const char *v)
{
    if (v == NULL) return;
    lua_pushstring(L, v);
    lua_setfield(L, -2, k);
}

static int conn_info(lua_State *L)
{
    lconn *x = checkconn(L, 1);
    mp_tls_info i;
    mp_tls_get_info(x->t, &i);
    lua_createtable(L, 0, 9);
    setstr(L, "version", i.version);
    setstr(L, "cipher", i.cipher);
    lua_pushinteger(L, i.bits);
    lua_setfield(L, -2, "bits");
    setstr(L, "sni", i.sni);
    setstr(L, "group", i.group);
    lua_pushboolean(L, i.peer_cert);
    lua_setfield(L, -2, "peer_cert");
    lua_pushboolean(L, i.peer_cert && i.verify_result == 0);
    lua_setfield(L, -2, "verified");
    setstr(L, "verify_error", i.verify_error);
    if (i.peer_cert) setstr(L, "peer_subject", i.peer_subject);
    return 1;
}

static int conn_gc(lua_State *L)
{
    lconn *x = luaL_checkudata(L, 1, CONN_MT);
    if (x->t) mp_tls_free(x->t);
    x->t = NULL;
    return 0;
}

static const luaL_Reg funcs[] = {{"context", l_context}, {NULL, NULL}};

static const luaL_Reg ctx_methods[] = {{"new", ctx_new}, {"close", ctx_gc}, {NULL, NULL}};
static const luaL_Reg ctx_meta[] = {{"__gc", ctx_gc}, {NULL, NULL}};

static const luaL_Reg conn_methods[] = {
    {"handshake", conn_handshake},
    {"decrypt", conn_decrypt},
    {"encrypt", conn_encrypt},
    {"close_notify", conn_close_notify},
    {"info", conn_info},
    {"close", conn_gc},
    {NULL, NULL}};
static const luaL_Reg conn_meta[] = {{"__gc", conn_gc}, {NULL, NULL}};

MP_EXPORT int luaopen_moonpost_core_tls(lua_State *L)
{
    mp_createmeta(L, CTX_MT, ctx_meta, ctx_methods);
    mp_createmeta(L, CONN_MT, conn_meta, conn_methods);
    lua_newtable(L);
    mp_setfuncs(L, funcs);
    lua_pushstring(L, mp_tls_library());
    lua_setfield(L, -2, "openssl_version");
    return 1;
}
