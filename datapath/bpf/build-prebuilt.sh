#!/bin/sh
# Regenerates the fallback objects that build.rs uses on machines without clang.
# Run after every change to bpf/*.c and commit the result together with the source.
# DWARF is stripped; .BTF stays because aya reads the map definitions from it.
set -eu
cd "$(dirname "$0")"
mkdir -p prebuilt
arch=$(uname -m)
for src in *.c; do
    name=${src%.c}
    clang -target bpf -O2 -g -Wall -Werror -I"/usr/include/${arch}-linux-gnu" -c "$src" -o "prebuilt/$name.o"
    llvm-strip -g "prebuilt/$name.o"
    # build.rs compares this to the current source and warns when the object is stale.
    printf '%s\n' "$(cksum < "$src" | cut -d' ' -f1)" > "prebuilt/$name.c.cksum"
done
