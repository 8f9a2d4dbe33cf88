/*
 * Small helpers shared by the bindings. The modules build against LuaJIT's
 * headers (make) or Lua 5.1's (luarocks on a stock tree); both speak the
 * 5.1 C API, so only what 5.1 lacks is defined here.
 */
#ifndef MOONPOST_LCOMPAT_H
#define MOONPOST_LCOMPAT_H

#include <errno.h>
#include <string.h>

#include "lauxlib.h"
#include "lua.h"

/* Modules build with -fvisibility=hidden; only luaopen_* is exported. */
#define MP_EXPORT __attribute__((visibility("default")))

static inline void mp_setfuncs(lua_State *L, const luaL_Reg *l)
{
    for (; l->name != NULL; l++) {
        lua_pushcfunction(L, l->func);
        lua_setfield(L, -2, l->name);
    }
}

/* luaL_testudata for Lua 5.1 (the userdata at ud if it has metatable
 * tname), with the metatable's address remembered in *cache: a hit
 * is a lua_getmetatable and a pointer compare instead of a lookup of tname
 * in the registry, which interns the name on every call (~200
 * instructions; a relayed message checks a userdata about 30 times). The
 * cache only ever holds a metatable that was found under tname, and those
 * live as long as their state (a closed state's modules are unloaded with
 * it); anything else takes the lookup, which refreshes the cache. */
static inline void *mp_testudata_c(lua_State *L, int ud, const char *tname, const void **cache)
{
    void *p = lua_touserdata(L, ud);
    const void *mt;
    if (p == NULL || !lua_getmetatable(L, ud)) return NULL;
    mt = lua_topointer(L, -1);
    if (mt != NULL && mt == *cache) {
        lua_pop(L, 1);
        return p;
    }
    lua_getfield(L, LUA_REGISTRYINDEX, tname);
    if (lua_rawequal(L, -1, -2)) *cache = mt;
    else p = NULL;
    lua_pop(L, 2);
    return p;
}

/* luaL_checkudata with the cache of mp_testudata_c (the same error). */
static inline void *mp_checkudata_c(lua_State *L, int ud, const char *tname, const void **cache)
{
    void *p = mp_testudata_c(L, ud, tname, cache);
    return p != NULL ? p : luaL_checkudata(L, ud, tname);
}

/* Create the metatable tname with methods (as __index) and metamethods. */
static inline void mp_createmeta(lua_State *L, const char *tname, const luaL_Reg *meta,
                                 const luaL_Reg *methods)
{
    luaL_newmetatable(L, tname);
    mp_setfuncs(L, meta);
    lua_newtable(L);
    mp_setfuncs(L, methods);
    lua_setfield(L, -2, "__index");
    lua_pop(L, 1);
}

/* The symbolic name of an errno value, as luv reports them ("ENOSPC"). */
static inline const char *mp_errno_name(int e)
{
    switch (e) {
    case ENOSPC: return "ENOSPC";
    case EIO: return "EIO";
    case EDQUOT: return "EDQUOT";
    case EBADF: return "EBADF";
    case EPIPE: return "EPIPE";
    case EAGAIN: return "EAGAIN";
    case EINTR: return "EINTR";
    case EFBIG: return "EFBIG";
    case EROFS: return "EROFS";
    case ENOMEM: return "ENOMEM";
    case EINVAL: return "EINVAL";
    case EACCES: return "EACCES";
    case ENOENT: return "ENOENT";
    case EEXIST: return "EEXIST";
    default: return "EUNKNOWN";
    }
}

/* Push nil, "token: strerror", "ECODE" and return 3. */
static inline int mp_pusherrno(lua_State *L, const char *token, int e)
{
    lua_pushnil(L);
    lua_pushfstring(L, "%s: %s", token, strerror(e));
    lua_pushstring(L, mp_errno_name(e));
    return 3;
}

#endif
