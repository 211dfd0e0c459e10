#!/bin/sh
# Run every workload ELF under qemu-user and compare stdout and exit status
# with expected/<prog>.out and expected/<prog>.rc.
#   sh check.sh PROG...                     check all four arches
#   sh check.sh --write-expected PROG...    write expected/ from the x86_64 run, then check
set -u
cd "$(dirname "$0")"
ulimit -c 0                      # a SIGSEGV death must not leave qemu core files

write=0
if [ "${1:-}" = "--write-expected" ]; then write=1; shift; fi

qemu_for() {
    case "$1" in
        x86_64) echo qemu-x86_64 ;;
        arm64)  echo qemu-aarch64 ;;
        s390x)  echo qemu-s390x ;;
        ppc64)  echo qemu-ppc64 ;;
    esac
}

for a in x86_64 arm64 s390x ppc64; do
    q=$(qemu_for $a)
    command -v "$q" >/dev/null 2>&1 || { echo "check: $q not found (apt-get install -y qemu-user)" >&2; exit 1; }
done

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p expected
fails=0
for p in "$@"; do
    if [ $write = 1 ]; then
        "$(qemu_for x86_64)" "bin/x86_64/$p" > "expected/$p.out" 2>/dev/null
        echo $? > "expected/$p.rc"
    fi
    for a in x86_64 arm64 s390x ppc64; do
        "$(qemu_for $a)" "bin/$a/$p" > "$tmp/out" 2>"$tmp/err"
        echo $? > "$tmp/rc"
        if cmp -s "$tmp/out" "expected/$p.out" && cmp -s "$tmp/rc" "expected/$p.rc"; then
            echo "ok    $a/$p (rc $(cat "$tmp/rc"))"
        else
            echo "FAIL  $a/$p (rc $(cat "$tmp/rc"), expected $(cat "expected/$p.rc" 2>/dev/null))"
            diff "expected/$p.out" "$tmp/out" | sed 's/^/      /'
            fails=$((fails + 1))
        fi
    done
done
[ $fails = 0 ] && echo "all workloads agree on four arches" || echo "$fails failure(s)"
[ $fails = 0 ]
