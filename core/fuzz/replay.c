/*
 * Runs a fuzz target's LLVMFuzzerTestOneInput on files, without libFuzzer
 * or sanitizers: for replaying inputs under valgrind, which sees what the
 * sanitizers cannot inside libraries that were not built with them
 * (libopendkim). Built by spec/02-core/dkim_spec.lua.
 *
 *   cc -g -Icore -o replay core/fuzz/fuzz_<target>.c <its sources> core/fuzz/replay.c <libs>
 *   valgrind --error-exitcode=99 ./replay FILE...
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int main(int argc, char **argv)
{
    int i;
    for (i = 1; i < argc; i++) {
        FILE *f = fopen(argv[i], "rb");
        uint8_t *buf;
        long n;
        if (f == NULL || fseek(f, 0, SEEK_END) != 0 || (n = ftell(f)) < 0 || fseek(f, 0, SEEK_SET) != 0) {
            perror(argv[i]);
            return 2;
        }
        /* exactly the input's size: a read past it is an error valgrind reports */
        buf = malloc(n > 0 ? (size_t)n : 1);
        if (buf == NULL || fread(buf, 1, (size_t)n, f) != (size_t)n) {
            perror(argv[i]);
            return 2;
        }
        fclose(f);
        LLVMFuzzerTestOneInput(buf, (size_t)n);
        free(buf);
    }
    return 0;
}
