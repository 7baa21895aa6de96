/* The coarse stage's exhaustive scan in C: dlbhc_ball_search, called
 * through ctypes by dlbhc/codes.py's HammingBall (dlbhc/native.py builds
 * this file).  One call per query does what the Python path did in ~20 numpy
 * calls, whose fixed costs dominated small indexes (and grow several-fold
 * with caches cold from the re-rank's fc7 reads between queries):
 *
 *   1. one pass over every code: its Hamming distance to the query; the
 *      codes that may lie within the stopping radius are kept as it goes;
 *   2. the stopping radius (index.py's rule: the smallest radius whose ball
 *      holds `need` images, at most `limit`; index.shell_radius states it
 *      for whole histograms, the tests hold the two equal);
 *   3. the codes within it, in (distance, position) order, placed by a
 *      counting sort of the kept codes: no comparison sort, no second pass.
 *
 * The rule's radius over the codes seen so far can only shrink as more are
 * seen (counts only grow), so it bounds the final radius: a code farther
 * than the bound when it is read cannot be in the ball and is neither kept
 * nor counted.  The bound only drops once the images closer than it reach
 * `need`, so at the end of the pass it is the rule's radius itself.  The
 * first codes are all kept, later ones rarely (a few times `need` in all for
 * codes in random order; every code in the worst order, hence the caller's
 * room for n).
 *
 * Codes are rows of n_words 64-bit words; XOR and popcount are bitwise, so
 * the words' byte order does not matter.  Distances fit uint16 (codes have
 * at most 1024 bits).  Nothing here allocates or keeps state: threads may
 * call concurrently with their own buffers. */
#include <stdint.h>
#include <string.h>

/* popcnt where the CPU has it (chosen once, at load, by the dynamic linker),
 * a portable bit count elsewhere: the library runs on any machine of its
 * type, not only the one that built it. */
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define SCAN_CLONES __attribute__((target_clones("popcnt", "default")))
#else
#define SCAN_CLONES
#endif

#define POPCOUNT(x) ((uint32_t)__builtin_popcountll(x))

/* One pass; DIST_EXPR is row r's distance, WEIGHT its images.  `bound` is
 * the rule's radius over the codes seen so far (limit until enough images
 * were seen), `below` the images seen closer than it.  Only codes within
 * the bound are counted: the rule never reads beyond its radius, and most
 * codes then cost a popcount and one comparison. */
#define SCAN_LOOP(DIST_EXPR, WEIGHT)                                     \
    for (int64_t i = 0; i < n; i++) {                                    \
        const uint64_t *r = rows + i * n_words;                          \
        const uint32_t d = DIST_EXPR;                                    \
        if (d <= bound) {                                                \
            const int64_t w = WEIGHT;                                    \
            row_hist[d] += 1;                                            \
            image_hist[d] += w;                                          \
            kept_pos[kept] = i;                                          \
            kept_dist[kept] = (uint16_t)d;                               \
            kept++;                                                      \
            if (d < bound) {                                             \
                below += w;                                              \
                while (bound > 0 && below >= need) {                     \
                    bound--;                                             \
                    below -= image_hist[bound];                          \
                }                                                        \
            }                                                            \
        }                                                                \
    }

#define SCAN_WIDTHS(WEIGHT)                                                     \
    switch (n_words) {                                                          \
    case 1: SCAN_LOOP(POPCOUNT(r[0] ^ q0), WEIGHT) break;                       \
    case 2: SCAN_LOOP(POPCOUNT(r[0] ^ q0) + POPCOUNT(r[1] ^ q1), WEIGHT) break; \
    case 4:                                                                     \
        SCAN_LOOP(POPCOUNT(r[0] ^ q0) + POPCOUNT(r[1] ^ q1)                     \
                  + POPCOUNT(r[2] ^ q[2]) + POPCOUNT(r[3] ^ q[3]), WEIGHT)      \
        break;                                                                  \
    default: {                                                                  \
        SCAN_LOOP(({ uint32_t s = 0;                                            \
                     for (int32_t j = 0; j < n_words; j++)                      \
                         s += POPCOUNT(r[j] ^ q[j]);                            \
                     s; }), WEIGHT)                                             \
    }                                                                           \
    }

/* The rule's radius over rows (n, n_words) for need and limit, the rows
 * within it kept (positions ascending, distances) with their count in
 * row_hist[d] per distance d; returns the radius, *n_kept how many kept. */
static inline __attribute__((always_inline))
uint32_t scan_rows(const uint64_t *rows, int64_t n, int32_t n_words, const uint64_t *q,
                   const int64_t *weights, int64_t need, int32_t limit,
                   int64_t *kept_pos, uint16_t *kept_dist, int64_t *row_hist,
                   int64_t *n_kept)
{
    const int32_t n_dist = 64 * n_words + 1;
    int64_t image_hist[n_dist];
    const uint64_t q0 = q[0], q1 = n_words > 1 ? q[1] : 0;
    uint32_t bound = limit < 0 ? 0 : (uint32_t)limit;
    int64_t below = 0, kept = 0;
    memset(row_hist, 0, n_dist * sizeof(int64_t));
    memset(image_hist, 0, sizeof image_hist);
    if (bound > (uint32_t)(n_dist - 1))
        bound = (uint32_t)(n_dist - 1);
    if (need <= 0)
        bound = 0;
    if (weights) {
        SCAN_WIDTHS(weights[i])
    } else {
        SCAN_WIDTHS(1)
    }
    *n_kept = kept;
    return bound;
}

/* rows (n, n_words) uint64 C order; weights (n,) int64 or NULL (one image
 * per row); code the query's packed code, code_bytes of it (at most
 * 8 n_words: widened here with zero bytes, as the rows were); need, limit:
 * the stopping rule's
 * parameters.  kept_pos, kept_dist: scratch with room for n (and for
 * sample_n).  Out: *radius_out; the codes within it (positions and
 * distances, room for n) in (distance, position) order; returns how many.
 *
 * With sample_rows (a fixed sample of the table, sample_weights as weights)
 * the sample is scanned first, for need scaled to its size (sample_need):
 * when its radius is at most probe_radius, the ball is likely small enough
 * for the caller to enumerate its shells instead (cheaper than this scan),
 * so the call returns -1 at once with that radius in *radius_out. */
SCAN_CLONES
int64_t dlbhc_ball_search(const uint64_t *rows, int64_t n, const int64_t *weights,
                          int32_t n_words, const uint8_t *code, int32_t code_bytes,
                          int64_t need, int32_t limit,
                          const uint64_t *sample_rows, int64_t sample_n,
                          const int64_t *sample_weights, int64_t sample_need,
                          int32_t probe_radius, int64_t *kept_pos, uint16_t *kept_dist,
                          int64_t *pos, int32_t *dist, int32_t *radius_out)
{
    const int32_t n_dist = 64 * n_words + 1;
    int64_t row_hist[n_dist], next[n_dist], kept, total = 0;
    uint64_t q[n_words];
    uint32_t radius;
    memset(q, 0, sizeof q);
    memcpy(q, code, (size_t)code_bytes);
    if (sample_rows && probe_radius >= 0) {
        radius = scan_rows(sample_rows, sample_n, n_words, q, sample_weights, sample_need,
                           probe_radius + 1, kept_pos, kept_dist, row_hist, &kept);
        if (radius <= (uint32_t)probe_radius) {
            *radius_out = (int32_t)radius;
            return -1;
        }
    }
    radius = scan_rows(rows, n, n_words, q, weights, need, limit, kept_pos, kept_dist,
                       row_hist, &kept);
    *radius_out = (int32_t)radius;
    for (uint32_t d = 0; d <= radius; d++) {
        next[d] = total;
        total += row_hist[d];
    }
    for (int64_t i = 0; i < kept; i++) {
        const uint32_t d = kept_dist[i];
        if (d <= radius) {
            const int64_t k = next[d]++;
            pos[k] = kept_pos[i];
            dist[k] = (int32_t)d;
        }
    }
    return total;
}
