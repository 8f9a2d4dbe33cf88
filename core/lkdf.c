/*
 * moonpost.core.kdf: the Lua binding of kdf.c.
 *
 *   kdf.pbkdf2_sha256(password, salt, iterations [, length]) -> key | nil, err
 *   kdf.scrypt(password, salt, N, r, p [, length])           -> key | nil, err
 *   kdf.equal(a, b)      -> boolean (constant time for strings of equal length)
 *   kdf.random(n)        -> n random octets | nil, err
 *   kdf.pool([threads])  -> pool | nil, err, code
 *   pool:submit(expected, "pbkdf2-sha256", password, salt, iterations)
 *   pool:submit(expected, "scrypt", password, salt, N, r, p)
 *                        -> id | nil, "busy"   (the key length is #expected)
 *   pool:collect()       -> { { id, true | false } | { id, nil, err }, ... }
 *   pool:fd()            -> fd readable while finished jobs wait to be collected
 *   pool:pending()       -> jobs submitted and not yet collected
 *   pool:close()         -> true   (joins the threads; queued jobs are dropped)
 *
 * Keys are raw octets (length 32 by default, 16 to 64). Parameters beyond
 * the limits of kdf.h raise: the caller validates what users write. The
 * synchronous functions run on the calling thread and are meant for the
 * command line and the specs; a server verifies through a pool.
 */
#include "lcompat.h"
#include "kdf.h"

#include <openssl/crypto.h>

#define POOL_MT "moonpost.core.kdf.pool"

typedef struct lpool {
    mp_workq *s;
} lpool;

static lua_Number checkcount(lua_State *L, int i)
{
    lua_Number n = luaL_checknumber(L, i);
    /* below 2^53 every whole number is exact; the limits are far lower */
    if (!(n >= 0 && n <= 9007199254740992.0) || n != (lua_Number)(int64_t)n)
        luaL_argerror(L, i, "expected a whole number >= 0");
    return n;
}

/* Read alg-specific parameters starting at stack index i. */
static void checkparams(lua_State *L, const char *alg, int i, mp_kdf_params *k)
{
    char err[MP_KDF_ERRLEN];
    memset(k, 0, sizeof *k);
    if (strcmp(alg, "pbkdf2-sha256") == 0) {
        k->alg = MP_KDF_PBKDF2_SHA256;
        k->iterations = (uint64_t)checkcount(L, i);
        if (mp_kdf_check(k, err) != 0) luaL_argerror(L, i, err);
    } else if (strcmp(alg, "scrypt") == 0) {
        k->alg = MP_KDF_SCRYPT;
        k->N = (uint64_t)checkcount(L, i);
        k->r = (uint64_t)checkcount(L, i + 1);
        k->p = (uint64_t)checkcount(L, i + 2);
        if (mp_kdf_check(k, err) != 0) luaL_argerror(L, i, err);
    } else {
        luaL_argerror(L, i - 1, "expected \"pbkdf2-sha256\" or \"scrypt\"");
    }
}

static const char *checkpassword(lua_State *L, int i, size_t *n)
{
    const char *pw = luaL_checklstring(L, i, n);
    if (*n > MP_KDF_MAX_PASSWORD) luaL_argerror(L, i, "password too long");
    return pw;
}

static const char *checksalt(lua_State *L, int i, size_t *n)
{
    const char *salt = luaL_checklstring(L, i, n);
    if (*n > MP_KDF_MAX_SALT) luaL_argerror(L, i, "salt longer than 64 octets");
    return salt;
}

/* kdf.<alg>(password, salt, <nparams parameters> [, length]): both
 * synchronous functions, which differ only in their parameters. */
static int derive(lua_State *L, const char *alg, int nparams)
{
    unsigned char out[MP_KDF_MAX_KEY];
    char err[MP_KDF_ERRLEN];
    size_t pwlen, saltlen;
    const char *pw = checkpassword(L, 1, &pwlen);
    const char *salt = checksalt(L, 2, &saltlen);
    int len_arg = 3 + nparams;
    lua_Integer len;
    mp_kdf_params k;
    checkparams(L, alg, 3, &k);
    len = luaL_optinteger(L, len_arg, 32);
    if (len < MP_KDF_MIN_KEY || len > MP_KDF_MAX_KEY) luaL_argerror(L, len_arg, "length must be from 16 to 64");
    if (mp_kdf_derive(&k, pw, pwlen, (const unsigned char *)salt, saltlen, out, (size_t)len, err) != 0) {
        lua_pushnil(L);
        lua_pushstring(L, err);
        return 2;
    }
    lua_pushlstring(L, (const char *)out, (size_t)len);
    OPENSSL_cleanse(out, sizeof out);
    return 1;
}

static int l_pbkdf2_sha256(lua_State *L) { return derive(L, "pbkdf2-sha256", 1); }
static int l_scrypt(lua_State *L) { return derive(L, "scrypt", 3); }

static int l_equal(lua_State *L)
{
    size_t na, nb;
    const char *a = luaL_checklstring(L, 1, &na);
    const char *b = luaL_checklstring(L, 2, &nb);
    lua_pushboolean(L, na == nb && mp_kdf_equal(a, b, na));
    return 1;
}

static int l_random(lua_State *L)
{
    unsigned char buf[256];
    lua_Integer n = luaL_checkinteger(L, 1);
    if (n < 1 || n > (lua_Integer)sizeof buf) luaL_argerror(L, 1, "expected 1 to 256");
    if (mp_kdf_random(buf, (size_t)n) != 0) {
        lua_pushnil(L);
        lua_pushliteral(L, "random: no entropy");
        return 2;
    }
    lua_pushlstring(L, (const char *)buf, (size_t)n);
    return 1;
}

/* ---- the pool --------------------------------------------------------------------------- */

static int l_pool(lua_State *L)
{
    lua_Integer threads = luaL_optinteger(L, 1, 2);
    int err = 0;
    lpool *p;
    if (threads < 1 || threads > MP_KDF_MAX_THREADS) luaL_argerror(L, 1, "threads must be from 1 to 16");
    p = lua_newuserdata(L, sizeof *p);
    p->s = NULL;
    luaL_getmetatable(L, POOL_MT);
    lua_setmetatable(L, -2);
    p->s = mp_kdf_pool_new((int)threads, &err);
    if (p->s == NULL) return mp_pusherrno(L, "kdf pool", err);
    return 1;
}

static lpool *checkpool(lua_State *L, int i)
{
    lpool *p = luaL_checkudata(L, i, POOL_MT);
    if (p->s == NULL) luaL_argerror(L, i, "pool is closed");
    return p;
}

static int p_submit(lua_State *L)
{
    lpool *p = checkpool(L, 1);
    size_t explen, pwlen, saltlen;
    const char *expected = luaL_checklstring(L, 2, &explen);
    const char *alg = luaL_checkstring(L, 3);
    const char *pw = checkpassword(L, 4, &pwlen);
    const char *salt = checksalt(L, 5, &saltlen);
    mp_kdf_params k;
    uint64_t id;
    int r;
    if (explen < MP_KDF_MIN_KEY || explen > MP_KDF_MAX_KEY) luaL_argerror(L, 2, "expected 16 to 64 octets");
    checkparams(L, alg, 6, &k);
    r = mp_kdf_submit(p->s, &k, pw, pwlen, (const unsigned char *)salt, saltlen,
                      (const unsigned char *)expected, explen, &id);
    if (r == -EBUSY) {
        lua_pushnil(L);
        lua_pushliteral(L, "busy");
        return 2;
    }
    if (r != 0) return luaL_error(L, "out of memory");
    lua_pushnumber(L, (lua_Number)id);
    return 1;
}

static int p_collect(lua_State *L)
{
    lpool *p = checkpool(L, 1);
    mp_kdf_result res[16];
    int n = 0;
    size_t got, i;
    lua_newtable(L);
    do {
        got = mp_kdf_collect(p->s, res, sizeof res / sizeof res[0]);
        for (i = 0; i < got; i++) {
            lua_createtable(L, 3, 0);
            lua_pushnumber(L, (lua_Number)res[i].id);
            lua_rawseti(L, -2, 1);
            if (res[i].match >= 0) {
                lua_pushboolean(L, res[i].match);
                lua_rawseti(L, -2, 2);
            } else {
                lua_pushstring(L, res[i].err);
                lua_rawseti(L, -2, 3);
            }
            lua_rawseti(L, -2, ++n);
        }
    } while (got == sizeof res / sizeof res[0]);
    return 1;
}

static int p_fd(lua_State *L)
{
    lua_pushinteger(L, mp_workq_fd(checkpool(L, 1)->s));
    return 1;
}

static int p_pending(lua_State *L)
{
    lua_pushnumber(L, (lua_Number)mp_workq_pending(checkpool(L, 1)->s));
    return 1;
}

static int p_close(lua_State *L)
{
    lpool *p = luaL_checkudata(L, 1, POOL_MT);
    if (p->s) {
        mp_workq_free(p->s);
        p->s = NULL;
    }
    lua_pushboolean(L, 1);
    return 1;
}

static int p_gc(lua_State *L)
{
    lpool *p = luaL_checkudata(L, 1, POOL_MT);
    if (p->s) mp_workq_free(p->s);
    p->s = NULL;
    return 0;
}

static const luaL_Reg funcs[] = {{"pbkdf2_sha256", l_pbkdf2_sha256},
                                 {"scrypt", l_scrypt},
                                 {"equal", l_equal},
                                 {"random", l_random},
                                 {"pool", l_pool},
                                 {NULL, NULL}};

static const luaL_Reg pool_methods[] = {{"submit", p_submit},   {"collect", p_collect}, {"fd", p_fd},
                                        {"pending", p_pending}, {"close", p_close},     {NULL, NULL}};
static const luaL_Reg pool_meta[] = {{"__gc", p_gc}, {NULL, NULL}};

MP_EXPORT int luaopen_moonpost_core_kdf(lua_State *L);
MP_EXPORT int luaopen_moonpost_core_kdf(lua_State *L)
{
    mp_createmeta(L, POOL_MT, pool_meta, pool_methods);
    lua_newtable(L);
    mp_setfuncs(L, funcs);
    lua_pushinteger(L, MP_KDF_MAX_QUEUE);
    lua_setfield(L, -2, "MAX_QUEUE");
    return 1;
}
