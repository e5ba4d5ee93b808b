/* A STREAM-like memory benchmark, for the guest of a VM node (docs/vm-backdoor.md).
 *
 * After McCalpin's STREAM: four kernels over three arrays of N doubles -- copy (c = a),
 * scale (b = s c), add (c = a + b), triad (a = b + s c) -- each timed NTIMES times; the
 * best time of each is printed, in microseconds, then the bytes each kernel moves and a
 * checksum (which keeps the loops from being optimised away):
 *
 *     stream [N] [NTIMES]   ->   "copy_us scale_us add_us triad_us bytes_copy checksum"
 *
 * Built static by vm/initramfs.py and shipped in the guest's initramfs as /bin/stream.
 */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(int argc, char **argv)
{
	long n = argc > 1 ? atol(argv[1]) : 1L << 20;
	int times = argc > 2 ? atoi(argv[2]) : 10;
	const double s = 3.0;
	double best[4] = {1e30, 1e30, 1e30, 1e30}, t[5], sum = 0;
	double *a, *b, *c;
	long j;
	int k, i;

	if (n < 1 || times < 1) {
		fprintf(stderr, "usage: stream [N >= 1] [NTIMES >= 1]\n");
		return 2;
	}
	a = malloc(n * sizeof *a);
	b = malloc(n * sizeof *b);
	c = malloc(n * sizeof *c);
	if (!a || !b || !c) {
		fprintf(stderr, "stream: cannot allocate 3 arrays of %ld doubles\n", n);
		return 1;
	}
	for (j = 0; j < n; j++) {
		a[j] = 1.0;
		b[j] = 2.0;
		c[j] = 0.0;
	}
	for (k = 0; k < times; k++) {
		t[0] = now();
		for (j = 0; j < n; j++)
			c[j] = a[j];
		t[1] = now();
		for (j = 0; j < n; j++)
			b[j] = s * c[j];
		t[2] = now();
		for (j = 0; j < n; j++)
			c[j] = a[j] + b[j];
		t[3] = now();
		for (j = 0; j < n; j++)
			a[j] = b[j] + s * c[j];
		t[4] = now();
		for (i = 0; i < 4; i++)
			if (t[i + 1] - t[i] < best[i])
				best[i] = t[i + 1] - t[i];
	}
	for (j = 0; j < n; j++)
		sum += a[j] + b[j] + c[j];
	printf("%.1f %.1f %.1f %.1f %ld %.6g\n", best[0] * 1e6, best[1] * 1e6, best[2] * 1e6,
	       best[3] * 1e6, (long)(2 * n * sizeof *a), sum);
	return 0;
}
