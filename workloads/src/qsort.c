/*
 * qsort - fill 20000 uint64 from a xorshift64 PRNG, sort them with a
 * hand-written quicksort (median-of-three, insertion sort below 16 elements,
 * recursion only into the smaller side so the depth stays O(log n)),
 * verify, and print count, first, last and a checksum.
 *
 * The array lives in .bss (160 KB), so the first touch of each page faults.
 */
#include "rt.h"

#define COUNT       20000
#define SMALL       16

static u64 a[COUNT];

static u64 xorshift64(u64 *state)
{
    u64 x = *state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *state = x;
}

static void insertion_sort(u64 *v, long n)
{
    for (long i = 1; i < n; i++) {
        u64 x = v[i];
        long j = i - 1;
        while (j >= 0 && v[j] > x) {
            v[j + 1] = v[j];
            j--;
        }
        v[j + 1] = x;
    }
}

static void swap(u64 *x, u64 *y)
{
    u64 t = *x;
    *x = *y;
    *y = t;
}

static void quicksort(u64 *v, long n)
{
    while (n > SMALL) {
        /* median of three into v[mid], then Hoare partition */
        long mid = n / 2;
        if (v[mid] < v[0])
            swap(&v[mid], &v[0]);
        if (v[n - 1] < v[0])
            swap(&v[n - 1], &v[0]);
        if (v[n - 1] < v[mid])
            swap(&v[n - 1], &v[mid]);
        u64 pivot = v[mid];

        long i = -1, j = n;
        for (;;) {
            do i++; while (v[i] < pivot);
            do j--; while (v[j] > pivot);
            if (i >= j)
                break;
            swap(&v[i], &v[j]);
        }
        /* [0, j] and [j+1, n): recurse into the smaller, loop on the larger */
        long left = j + 1, right = n - left;
        if (left < right) {
            quicksort(v, left);
            v += left;
            n = right;
        } else {
            quicksort(v + left, right);
            n = left;
        }
    }
    insertion_sort(v, n);
}

int main(int argc, char **argv)
{
    (void)argc;
    (void)argv;
    u64 state = 0x2545f4914f6cdd1dUL;
    u64 in_sum = 0;
    for (long i = 0; i < COUNT; i++) {
        a[i] = xorshift64(&state);
        in_sum += a[i];
    }

    quicksort(a, COUNT);

    u64 out_sum = 0, checksum = 0;
    long unsorted = 0;
    for (long i = 0; i < COUNT; i++) {
        out_sum += a[i];
        checksum = (checksum ^ a[i]) * 0x100000001b3UL + (u64)i;
        if (i && a[i - 1] > a[i])
            unsorted++;
    }
    put_kv_dec("count", COUNT);
    put_kv_hex("first", a[0]);
    put_kv_hex("last", a[COUNT - 1]);
    put_kv_hex("checksum", checksum);
    put_str(unsorted == 0 && in_sum == out_sum ? "sorted: yes\n" : "sorted: NO\n");
    return unsorted == 0 && in_sum == out_sum ? 0 : 1;
}
