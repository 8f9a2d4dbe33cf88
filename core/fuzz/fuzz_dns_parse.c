/*
 * Fuzz target for the DNS message parser: any input parses or is refused,
 * every record's strings lie in the arena, and MX/A/AAAA texts are sane.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "dns.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static mp_dns_msg m;
    int i;
    if (mp_dns_parse(data, size, &m) != 0) return 0;
    if (m.nrr < 0 || m.nrr > MP_DNS_MAX_RR || m.used > sizeof m.arena) abort();
    for (i = 0; i < m.nrr; i++) {
        mp_dns_rr *r = &m.rr[i];
        if (r->name < m.arena || r->name >= m.arena + m.used) abort();
        if (r->text < m.arena || r->text + r->text_len >= m.arena + m.used + 1) abort();
        if (strlen(r->name) > 255) abort();
        if ((r->type == MP_DNS_A || r->type == MP_DNS_AAAA) && r->text_len == 0) abort();
    }
    return 0;
}
