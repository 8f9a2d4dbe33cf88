/*
 * The message userdata (a body held in C), shared by the bindings that
 * produce or consume message bodies: moonpost.core.smtp creates it,
 * moonpost.core.spool writes it to disk without copying it into Lua.
 */
#ifndef MOONPOST_LMESSAGE_H
#define MOONPOST_LMESSAGE_H

#include "smtp.h"

#define MESSAGE_MT "moonpost.core.smtp.message"

typedef struct lmessage {
    mp_body body;
    int closed;
} lmessage;

#endif
