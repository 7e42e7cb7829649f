// Serial coder of EliasQSGD's two streams on the CPU (see elias.py for the wire format).
//
// The vectorised torch coder needs about twenty passes over int64 tensors per non-zero; this
// one reads the codes once and writes each code's bits once. Its loops avoid unpredictable
// branches (a mispredicted branch costs as much as coding a value): non-zero codes are found
// 64 at a time through a bit mask, bits are written without testing for full words, and the
// unary lengths are read as the set bits of whole words. Built by commpress.codecs.native with
// the C++ compiler torch.compile's CPU backend uses, without -ffast-math or FMA contraction,
// so its fp32 products round exactly as torch's do.
#include <stdint.h>
#include <limits.h>
#include <string.h>

#include <algorithm>
#include <memory>
#include <vector>
#ifdef __SSE2__
#include <emmintrin.h>
#endif

namespace {

inline uint64_t load_be(const uint8_t* p) {
    uint64_t word;
    memcpy(&word, p, 8);
    return __builtin_bswap64(word);
}

inline void store_be(uint8_t* p, uint64_t word) {
    word = __builtin_bswap64(word);
    memcpy(p, &word, 8);
}

// A received stream of bytes, read 8 at a time: zeros past its end (it may end a buffer).
struct Stream {
    const uint8_t* data;
    int64_t bytes;

    // Bytes ``at`` .. ``at + 7`` as a little-endian word.
    inline uint64_t word_le(int64_t at) const {
        uint64_t word = 0;
        if (__builtin_expect(at + 8 <= bytes, 1)) {
            memcpy(&word, data + at, 8);
        } else if (at < bytes) {
            memcpy(&word, data + at, bytes - at);
        }
        return word;
    }

    inline uint64_t word_be(int64_t at) const { return __builtin_bswap64(word_le(at)); }
    inline uint8_t byte(int64_t at) const { return at < bytes ? data[at] : 0; }
};

inline int floor_log2(uint64_t v) { return 63 - __builtin_clzll(v); }

// What went wrong in a payload (0: nothing).
enum {
    OK = 0,
    BAD_LENGTH_STREAM = 1,  // not nnz * codes-per-value unary codes ending at its last bit
    BAD_RECORDS = 2,        // a code too long, or records not filling the stated bits
    BAD_VALUES = 3,         // a level above ``levels`` or a position past ``numel``
    OUT_OF_MEMORY = 4,      // scratch space could not be allocated
};

// Bit ``j`` set where code ``j`` of the ``words`` (at most 8) 8-code words at ``codes`` is not
// ``zero`` (the zero code repeated in each byte).
inline uint64_t nonzero_mask_tail(const uint8_t* codes, int words, uint64_t zero) {
    const uint64_t low7 = 0x7F7F7F7F7F7F7F7FULL;
    uint64_t mask = 0;
    for (int w = 0; w < words; ++w) {
        uint64_t word;
        memcpy(&word, codes + 8 * w, 8);  // little endian: code j in byte j
        uint64_t differs = word ^ zero;
        uint64_t tops = ((((differs & low7) + low7) | differs) & ~low7) >> 7;
        mask |= ((tops * 0x0102040810204080ULL) >> 56) << (8 * w);  // byte flags to 8 bits
    }
    return mask;
}

// The same for 64 codes (SSE2 where there is, x86-64's baseline: four compares).
inline uint64_t nonzero_mask(const uint8_t* codes, uint64_t zero) {
#ifdef __SSE2__
    const __m128i zeros = _mm_set1_epi8((char)zero);
    uint64_t equal = 0;
    for (int k = 0; k < 4; ++k) {
        __m128i block = _mm_loadu_si128((const __m128i*)(codes + 16 * k));
        equal |= (uint64_t)(uint32_t)_mm_movemask_epi8(_mm_cmpeq_epi8(block, zeros)) << (16 * k);
    }
    return ~equal;
#else
    return nonzero_mask_tail(codes, 8, zero);
#endif
}

// Bits appended most significant first into a big-endian stream, without branches: every
// put stores the whole pending word and moves on by the bytes it completed (zstd's bit
// writer, most significant bit first).
struct Writer {
    uint8_t* at;
    uint8_t* limit;    // past it, nothing is stored and the stream reports overflow
    uint8_t* start;
    uint64_t acc = 0;  // the pending bits, left aligned
    int fill = 0;      // how many are pending (0..7 between puts)

    Writer(uint8_t* out, int64_t capacity) : at(out), limit(out + capacity - 8), start(out) {}

    // ``value`` (below 2**width) in ``width`` bits, 1 <= width <= 64.
    inline void put(uint64_t value, int width) {
        if (__builtin_expect(width > 56, 0)) {  // at most 7 bits pend: keep the word from overflowing
            put_short(value >> 32, width - 32);
            value &= 0xFFFFFFFFULL;
            width = 32;
        }
        put_short(value, width);
    }

    // ``put`` of at most 56 bits.
    inline void put_short(uint64_t value, int width) {
        fill += width;
        acc |= value << (64 - fill);
        if (__builtin_expect(at <= limit, 1)) store_be(at, acc);
        at += fill >> 3;
        acc <<= fill & ~7;
        fill &= 7;
    }

    // Bits written in all (the last byte stored); -1 where they may not have fit.
    int64_t finish() const { return at > limit ? -1 : 8 * (at - start) + fill; }
};

// The bits of each byte of ``word`` in reverse order.
inline uint64_t reverse_byte_bits(uint64_t word) {
    word = ((word >> 1) & 0x5555555555555555ULL) | ((word & 0x5555555555555555ULL) << 1);
    word = ((word >> 2) & 0x3333333333333333ULL) | ((word & 0x3333333333333333ULL) << 2);
    return ((word >> 4) & 0x0F0F0F0F0F0F0F0FULL) | ((word & 0x0F0F0F0F0F0F0F0FULL) << 4);
}

// The set bits of a big-endian stream, in order, one word at a time. Each word is loaded with
// its bit order reversed (little endian, bits of each byte reversed), so that the next bit is
// the lowest: clearing it takes one instruction, not a count, a shift and a mask.
struct Ones {
    Stream stream;
    int64_t base;  // the stream's bit at ``word``'s least significant bit
    uint64_t word;

    // From the stream's bit ``from`` on.
    Ones(Stream stream_, int64_t from) : stream(stream_), base(from & ~(int64_t)63) {
        word = load(base) & (~0ULL << (from & 63));
    }

    inline uint64_t load(int64_t bit) const {
        return reverse_byte_bits(stream.word_le(bit >> 3));  // stream byte j in byte j
    }

    // The next set bit's offset; the caller knows there is one.
    inline int64_t next() {
        while (!word) {
            base += 64;
            word = load(base);
        }
        int64_t at = base + __builtin_ctzll(word);
        word &= word - 1;
        return at;
    }
};

// The ``width`` (1..63) bits from bit ``at`` of a big-endian stream.
inline uint64_t bits_at(const Stream& stream, int64_t at, int width) {
    int64_t byte = at >> 3;
    int shift = at & 7;
    uint64_t window = stream.word_be(byte) << shift;  // 57 bits or more
    if (width > 56) window |= (uint64_t)stream.byte(byte + 8) >> (8 - shift);
    return window >> (64 - width);
}

// Streams written: how many non-zeros, and each stream's bits (-1: past its capacity).
struct Coded {
    int64_t nnz, length_bits, rest_bits;
};

// The streams of the codes in words ``[first_word, end_word)`` (8 codes each; ``first_word`` a
// multiple of 8), the last non-zero before them at ``previous``.
Coded encode_words(const uint8_t* codes, int64_t first_word, int64_t end_word, int64_t previous,
                   int32_t levels, uint8_t* lengths, uint8_t* rests, int64_t capacity) {
    Writer unary(lengths, capacity), records(rests, capacity);
    const uint64_t zero = 0x0101010101010101ULL * (uint8_t)levels;
    int64_t nnz = 0;
    for (int64_t word = first_word; word < end_word; word += 8) {
        int64_t base = 8 * word;
        uint64_t mask = end_word - word >= 8 ? nonzero_mask(codes + base, zero)
                                             : nonzero_mask_tail(codes + base, (int)(end_word - word), zero);
        while (mask) {
            int64_t position = base + __builtin_ctzll(mask);
            mask &= mask - 1;
            int32_t level = (int32_t)codes[position] - levels;
            int32_t sign = level >> 31;  // 0 or -1: no branch on a random sign
            uint64_t negative = (uint64_t)(sign & 1);
            level = (level ^ sign) - sign;
            uint64_t gap = (uint64_t)(position - previous);
            previous = position;
            int gap_k = floor_log2(gap);
            uint64_t record = ((gap - (1ULL << gap_k)) << 1) | negative;
            if (levels > 1) {
                int level_k = floor_log2((uint64_t)level);
                // both unary lengths: gap_k zeros, a one, level_k zeros, a one
                unary.put((1ULL << (level_k + 1)) | 1, gap_k + level_k + 2);
                records.put((record << level_k) | ((uint64_t)level - (1ULL << level_k)),
                            gap_k + 1 + level_k);
            } else {
                unary.put(1, gap_k + 1);
                records.put(record, gap_k + 1);
            }
            ++nnz;
        }
    }
    return {nnz, unary.finish(), records.finish()};
}

// The position of the last non-zero code before word ``word``, -1 if none.
int64_t last_nonzero_before(const uint8_t* codes, int64_t word, uint64_t zero) {
    for (int64_t w = word - 1; w >= 0; --w) {
        uint64_t mask = nonzero_mask_tail(codes + 8 * w, 1, zero);
        if (mask) return 8 * w + floor_log2(mask);
    }
    return -1;
}

// ``src_bits`` bits of ``src`` appended to the ``dst_bits`` of ``dst`` (bits after them zero;
// ``dst`` has a word to spare past the result, ``src`` its writer's spare word).
void append_bits(uint8_t* dst, int64_t dst_bits, const uint8_t* src, int64_t src_bits) {
    uint8_t* to = dst + (dst_bits >> 3);
    int shift = dst_bits & 7;
    int64_t bytes = (src_bits + 7) >> 3;
    if (!shift) {
        memcpy(to, src, bytes);
        return;
    }
    uint64_t carry = (uint64_t)to[0] << 56;  // the partial byte's bits, zeros after them
    int64_t i = 0;
    for (; i < bytes; i += 8) {
        uint64_t word = load_be(src + i);
        store_be(to + i, carry | (word >> shift));
        carry = word << (64 - shift);
    }
    store_be(to + i, carry);
}

// For each of the ascending ``counts``: the bit after the count-th set bit of a big-endian
// stream (0 for a count of 0), found in one pass.
std::vector<int64_t> after_ones(Stream stream, const std::vector<int64_t>& counts) {
    std::vector<int64_t> after;
    Ones ones(stream, 0);
    int64_t seen = 0, at = -1;
    for (int64_t count : counts) {
        while (seen + __builtin_popcountll(ones.word) < count) {
            seen += __builtin_popcountll(ones.word);
            ones.base += 64;
            ones.word = ones.load(ones.base);
        }
        for (; seen < count; ++seen) at = ones.next();
        after.push_back(at + 1);
    }
    return after;
}

// Where a range of non-zeros starts in the streams: its first index, and each stream's bit.
struct Start {
    int64_t index, unary_bit, record_bit;
};

// Reads ``count`` records from ``start`` and hands each one's position (as if the non-zero
// before them were at -1) and signed level to ``sink(i, position, level)``. Returns an error
// code.
template <class Sink>
int32_t read_records(Stream lengths, Stream rests, Start start, int64_t count, int32_t levels,
                     int64_t numel, Sink&& sink) {
    const int level_log2 = floor_log2((uint64_t)levels);
    Ones ends(lengths, start.unary_bit);
    int64_t end = start.unary_bit - 1, record_at = start.record_bit, previous = -1;
    for (int64_t i = 0; i < count; ++i) {
        int64_t gap_end = ends.next();
        int64_t gap_k = gap_end - end - 1, level_k = 0;
        end = gap_end;
        if (levels > 1) {
            int64_t level_end = ends.next();
            level_k = level_end - end - 1;
            end = level_end;
        }
        if (gap_k > 56 || level_k > level_log2) return BAD_RECORDS;
        int width = (int)(gap_k + 1 + level_k);
        uint64_t record = bits_at(rests, record_at, width);
        record_at += width;
        int64_t level = levels > 1 ? (int64_t)((record & ((1ULL << level_k) - 1)) | (1ULL << level_k)) : 1;
        int64_t position = previous + (int64_t)((record >> (level_k + 1)) | (1ULL << gap_k));
        if (level > levels || position >= numel) return BAD_VALUES;
        previous = position;
        int64_t sign = -(int64_t)((record >> level_k) & 1);
        sink(i, position, (level ^ sign) - sign);
    }
    return OK;
}

// Writes decoded values into ``out``: set (zeros in between) or, ``Add``, added times ``alpha``.
template <bool Add>
struct Scatter {
    float* out;
    int32_t levels;
    int64_t bucket_size, until;  // writes nothing at or past ``until``
    const float* magnitudes;
    const float* scales;
    float alpha;
    int64_t filled, bucket, bucket_end;  // out[:filled] is done; the bucket of the last position

    Scatter(float* out_, int32_t levels_, int64_t bucket_size_, int64_t until_,
            const float* magnitudes_, const float* scales_, float alpha_, int64_t from)
        : out(out_), levels(levels_), bucket_size(bucket_size_), until(until_),
          magnitudes(magnitudes_), scales(scales_), alpha(alpha_), filled(from),
          bucket(from / bucket_size_), bucket_end((from / bucket_size_ + 1) * bucket_size_) {}

    inline void operator()(int64_t position, int64_t signed_level) {
        while (position >= bucket_end) {
            ++bucket;
            bucket_end += bucket_size;
        }
        float value = magnitudes[levels + signed_level] * scales[bucket];
        if (Add) {
            out[position] = out[position] + value * alpha;
        } else {
            static const float zeros[8] = {0};
            if (position - filled <= 8 && filled + 8 <= until)
                memcpy(out + filled, zeros, sizeof zeros);  // two stores, no call
            else
                memset(out + filled, 0, sizeof(float) * (position - filled));
            out[position] = value;
        }
        filled = position + 1;
    }

    void finish() {
        if (!Add) memset(out + filled, 0, sizeof(float) * (until - filled));
    }
};

// ``body(scatter)`` with the Scatter of ``mode`` (1: set, 2: add) of positions ``[from, until)``.
template <class Body>
auto with_scatter(int32_t mode, float* out, int32_t levels, int64_t bucket_size, int64_t from,
                  int64_t until, const float* magnitudes, const float* scales, float alpha,
                  Body&& body) {
    if (mode == 2) {
        Scatter<true> scatter(out, levels, bucket_size, until, magnitudes, scales, alpha, from);
        return body(scatter);
    }
    Scatter<false> scatter(out, levels, bucket_size, until, magnitudes, scales, alpha, from);
    return body(scatter);
}

// Runs ``work(t)`` for t in [0, parts), on OpenMP's threads where it is built with them:
// torch's own pool (its libgomp), whose threads are still spinning, hot, after the compiled
// kernel that ran just before. Threads of our own would share the cores with those spinners.
template <class Work>
void in_parallel(int64_t parts, Work&& work) {
#ifdef _OPENMP
#pragma omp parallel for num_threads((int)parts) schedule(static, 1)
#endif
    for (int64_t t = 0; t < parts; ++t) work(t);
}

// Writes the streams of ``codes`` (``numel`` codes, 2 * levels + 1 values, levels the zero
// one, padded with zero codes to a multiple of 8) to ``out``, the length stream's bytes then
// the rest stream's. ``out`` has room for two streams of ``capacity`` bytes (32 more than
// either can take): each is written into its own half, the second moved down at the end. On up
// to ``threads`` threads of at least ``thread_codes`` codes each (each writes the streams of a
// range of codes, appended in order at the end). ``sizes`` gets (non-zeros, length bits, rest
// bits), a size of -1 where a stream did not fit.
void encode(const uint8_t* codes, int64_t numel, int32_t levels, uint8_t* out, int64_t capacity,
            int32_t threads, int64_t thread_codes, int64_t* sizes) {
    uint8_t* lengths = out;
    uint8_t* rests = out + capacity;
    const uint64_t zero = 0x0101010101010101ULL * (uint8_t)levels;
    const int64_t words = (numel + 7) >> 3;
    int64_t parts = words / (thread_codes > 64 ? thread_codes / 8 : 8);
    parts = parts < 1 ? 1 : parts > threads ? threads : parts;
    std::vector<int64_t> bounds(parts + 1, words);
    for (int64_t t = 0; t < parts; ++t) bounds[t] = (words * t / parts) & ~(int64_t)7;
    std::vector<Coded> coded(parts);
    std::vector<std::unique_ptr<uint8_t[]>> scratch(2 * parts);
    for (int64_t t = 1; t < parts; ++t) {
        scratch[2 * t].reset(new uint8_t[capacity]);
        scratch[2 * t + 1].reset(new uint8_t[capacity]);
    }
    in_parallel(parts, [&](int64_t t) {
        uint8_t* unary = t ? scratch[2 * t].get() : lengths;
        uint8_t* records = t ? scratch[2 * t + 1].get() : rests;
        coded[t] = encode_words(codes, bounds[t], bounds[t + 1],
                                last_nonzero_before(codes, bounds[t], zero), levels, unary, records,
                                capacity);
    });
    Coded total = coded[0];
    const int64_t room = 8 * (capacity - 32);
    for (int64_t t = 1; t < parts; ++t) {
        const Coded& part = coded[t];
        if (total.length_bits < 0 || total.rest_bits < 0 || part.length_bits < 0 || part.rest_bits < 0
                || total.length_bits + part.length_bits > room || total.rest_bits + part.rest_bits > room) {
            total.length_bits = total.rest_bits = -1;
            break;
        }
        append_bits(lengths, total.length_bits, scratch[2 * t].get(), part.length_bits);
        append_bits(rests, total.rest_bits, scratch[2 * t + 1].get(), part.rest_bits);
        total = {total.nnz + part.nnz, total.length_bits + part.length_bits,
                 total.rest_bits + part.rest_bits};
    }
    if (total.length_bits >= 0 && total.rest_bits >= 0)
        memmove(lengths + ((total.length_bits + 7) >> 3), rests, (total.rest_bits + 7) >> 3);
    sizes[0] = total.nnz;
    sizes[1] = total.length_bits;
    sizes[2] = total.rest_bits;
}

// :func:`decode` on several threads, one range of non-zeros each (``starts``): each range is
// read apart, positions relative to its start (as if the non-zero before it were at -1) kept
// in ``position_of`` (``positions`` itself for mode 0), then placed once every range's last
// position is known.
template <class Position>
int32_t decode_ranges(Stream lengths, Stream rests, const std::vector<Start>& starts,
                      int32_t levels, int64_t numel, int64_t bucket_size, const float* magnitudes,
                      const float* scales, float* out, int32_t mode, float alpha,
                      int64_t* positions, int64_t* signed_levels, Position* position_of) {
    const int64_t parts = (int64_t)starts.size() - 1, nnz = starts[parts].index;
    std::unique_ptr<int8_t[]> levels_read(new int8_t[nnz]);
    std::vector<int32_t> errors(parts, OK);
    in_parallel(parts, [&](int64_t t) {
        int64_t first = starts[t].index;
        errors[t] = read_records(lengths, rests, starts[t], starts[t + 1].index - first, levels,
                                 numel, [&](int64_t i, int64_t position, int64_t level) {
                                     position_of[first + i] = (Position)position;
                                     levels_read[first + i] = (int8_t)level;
                                 });
    });
    for (int32_t error : errors) {
        if (error == BAD_RECORDS) return BAD_RECORDS;
    }
    for (int32_t error : errors) {
        if (error != OK) return error;
    }
    std::vector<int64_t> base(parts, 0);  // the first position after the ranges before
    for (int64_t t = 1; t < parts; ++t) {
        int64_t last = starts[t].index - 1;
        base[t] = last >= starts[t - 1].index ? base[t - 1] + position_of[last] + 1 : base[t - 1];
        int64_t own_last = starts[t + 1].index - 1;
        if (own_last >= starts[t].index && base[t] + position_of[own_last] >= numel) return BAD_VALUES;
    }
    in_parallel(parts, [&](int64_t t) {
        int64_t first = starts[t].index, end = starts[t + 1].index;
        if (mode == 0) {
            for (int64_t i = first; i < end; ++i) {
                positions[i] = base[t] + position_of[i];
                signed_levels[i] = levels_read[i];
            }
            return;
        }
        with_scatter(mode, out, levels, bucket_size, base[t], t + 1 < parts ? base[t + 1] : numel,
                     magnitudes, scales, alpha, [&](auto& scatter) {
            for (int64_t i = first; i < end; ++i) scatter(base[t] + position_of[i], levels_read[i]);
            scatter.finish();
        });
    });
    return OK;
}

// Decodes the streams (``length_bits`` and ``rest_bits`` long) of ``nnz`` non-zeros. ``mode`` 0:
// ``positions`` and ``signed_levels`` (nnz each) only; 1: ``out = values``; 2: ``out +=
// values * alpha``, where a value is ``magnitudes[levels + signed level]`` (a table by code)
// times its bucket's scale. With ``threads`` > 1 and ``numel`` >= ``thread_codes``, ranges
// of non-zeros are read on threads of their own (each finds its start from the count of ones
// before it: a record's width is its unary lengths' bits less one per length beyond the
// first) with positions relative to the range, then placed by as many threads once every
// range's last position is known. Returns one of the error codes; on an error ``out`` is partly written.
int32_t decode(const uint8_t* length_stream, int64_t length_bits, const uint8_t* rest_stream,
               int64_t rest_bits, int64_t nnz, int32_t levels, int64_t numel, int64_t bucket_size,
               const float* magnitudes, const float* scales, float* out, int32_t mode, float alpha,
               int64_t* positions, int64_t* signed_levels, int32_t threads, int64_t thread_codes) {
    const int64_t codes_per_value = levels > 1 ? 2 : 1;
    const Stream lengths{length_stream, (length_bits + 7) >> 3}, rests{rest_stream, (rest_bits + 7) >> 3};
    // the unary codes: exactly nnz * codes_per_value ones, the last one the stream's last bit
    int64_t length_bytes = (length_bits + 7) >> 3, ones = 0;
    for (int64_t i = 0; i < length_bytes; i += 8) ones += __builtin_popcountll(lengths.word_le(i));
    if (ones != nnz * codes_per_value) return BAD_LENGTH_STREAM;
    if (nnz) {
        int64_t last = length_bits - 1;
        uint8_t last_byte = lengths.byte(last >> 3);
        if (!((last_byte >> (7 - (last & 7))) & 1)) return BAD_LENGTH_STREAM;
        if (last_byte & ((1u << (7 - (last & 7))) - 1)) return BAD_LENGTH_STREAM;
    }
    // the records fill exactly what the unary lengths give them
    if (rest_bits != length_bits - nnz * (codes_per_value - 1)) return BAD_RECORDS;

    int64_t parts = threads > 1 && numel >= thread_codes ? threads : 1;
    parts = std::max<int64_t>(1, std::min<int64_t>(parts, nnz / 4096));
    std::vector<int64_t> ones_before(parts);
    for (int64_t t = 0; t < parts; ++t) ones_before[t] = nnz * t / parts * codes_per_value;
    std::vector<int64_t> unary_bits = after_ones(lengths, ones_before);
    unary_bits.push_back(length_bits);
    std::vector<Start> starts(parts + 1);
    for (int64_t t = 0; t <= parts; ++t) {
        int64_t index = nnz * t / parts;
        starts[t] = {index, unary_bits[t], unary_bits[t] - index * (codes_per_value - 1)};
    }
    if (parts == 1) {  // straight into the output
        if (mode == 0) {
            return read_records(lengths, rests, starts[0], nnz, levels, numel,
                                [&](int64_t i, int64_t position, int64_t level) {
                                    positions[i] = position;
                                    signed_levels[i] = level;
                                });
        }
        return with_scatter(mode, out, levels, bucket_size, 0, numel, magnitudes, scales, alpha,
                            [&](auto& scatter) {
            int32_t error = read_records(lengths, rests, starts[0], nnz, levels, numel,
                                         [&](int64_t, int64_t position, int64_t level) {
                                             scatter(position, level);
                                         });
            if (error == OK) scatter.finish();
            return error;
        });
    }
    if (mode == 0) return decode_ranges(lengths, rests, starts, levels, numel, bucket_size,
                                        magnitudes, scales, out, mode, alpha, positions,
                                        signed_levels, positions);
    if (numel <= INT32_MAX) {  // relative positions in 4 bytes, not 8
        std::unique_ptr<int32_t[]> relative(new int32_t[nnz]);
        return decode_ranges(lengths, rests, starts, levels, numel, bucket_size, magnitudes,
                             scales, out, mode, alpha, positions, signed_levels, relative.get());
    }
    std::unique_ptr<int64_t[]> relative(new int64_t[nnz]);
    return decode_ranges(lengths, rests, starts, levels, numel, bucket_size, magnitudes, scales,
                         out, mode, alpha, positions, signed_levels, relative.get());
}

}  // namespace

// The entry points: no exception crosses into the caller (ctypes), a failed allocation is
// reported as such.
extern "C" {

void commpress_elias_encode(const uint8_t* codes, int64_t numel, int32_t levels, uint8_t* out,
                            int64_t capacity, int32_t threads, int64_t thread_codes,
                            int64_t* sizes) {
    try {
        encode(codes, numel, levels, out, capacity, threads, thread_codes, sizes);
    } catch (...) {
        sizes[0] = sizes[1] = sizes[2] = -2;
    }
}

int32_t commpress_elias_decode(const uint8_t* length_stream, int64_t length_bits,
                               const uint8_t* rest_stream, int64_t rest_bits, int64_t nnz,
                               int32_t levels, int64_t numel, int64_t bucket_size,
                               const float* magnitudes, const float* scales, float* out,
                               int32_t mode, float alpha, int64_t* positions,
                               int64_t* signed_levels, int32_t threads, int64_t thread_codes) {
    try {
        return decode(length_stream, length_bits, rest_stream, rest_bits, nnz, levels, numel,
                      bucket_size, magnitudes, scales, out, mode, alpha, positions,
                      signed_levels, threads, thread_codes);
    } catch (...) {
        return OUT_OF_MEMORY;
    }
}

}  // extern "C"
