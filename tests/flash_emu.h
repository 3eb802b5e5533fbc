// moelab tests: a CPU emulation of the CUDA primitives (backends/cuda/mma_platform.cuh) that the
// flash attention kernel bodies (backends/cuda/flash_attention_kernels.h) and the grouped GEMM
// bodies (backends/cuda/grouped_gemm_kernels.h) are written against, so that those bodies run on
// the CPU: the tiling, causal masking, online softmax, fragment bookkeeping and indexing of the
// real kernels are tested without a GPU (test_flash_emulated.cpp, test_grouped_gemm_emulated.cpp).
//
// Model: one block runs as one fiber (ucontext) per CUDA thread, scheduled cooperatively.
//   - fa_sync() is __syncthreads(): a fiber waits until every live fiber of the block arrives.
//   - Warp collectives (shuffles, ldmatrix, mma.sync) exchange each lane's operands through a
//     per-warp slot and wait until all 32 lanes arrived; every lane then computes its own result
//     from all lanes' operands, with the register layouts of the PTX ISA (mma.m16n8k16 fragments,
//     ldmatrix .x4 with and without .trans). Lanes of one warp that issue different collectives,
//     or a warp collective with lanes missing, abort with a message (on the GPU: undefined).
//   - cp.async copies (16 or 4 bytes) are queued per thread and land when cp.async.wait_group
//     lets them (the latest N groups stay in flight), so a read of a stage before its wait sees
//     stale bytes.
//   - Shared memory starts filled with 0xFF bytes (NaN as f32 and bf16), so a read of a byte
//     nobody wrote poisons the result; ldmatrix addresses must be 16-byte aligned rows inside it.
// What it cannot show: the hardware's own behaviour (its accumulation order inside mma, timing
// races between warps that a barrier should order but that this schedule happens to order).
#pragma once
#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <vector>

#define FA_DEV inline

namespace moelab::flash {
namespace emu {

[[noreturn]] inline void fail(const char* what, int tid) {
  std::fprintf(stderr, "flash emulation: %s (thread %d)\n", what, tid);
  std::abort();
}

enum class Kind : int { None, Shfl, Ldsm, LdsmT, Mma };

struct Copy {
  void* dst;
  const void* src;
  bool valid;
  int bytes;
};

struct Fiber {
  ucontext_t ctx{};
  char* stack = nullptr;
  int tid = 0;
  enum State { Ready, AtBlock, AtWarp, Done } state = Ready;
  uint64_t wait_gen = 0;
  std::vector<std::vector<Copy>> groups;  // committed cp.async groups, oldest first
  std::vector<Copy> open;                 // issued, not yet committed
};

constexpr int kSlotBytes = 48;
constexpr size_t kStackBytes = 128 * 1024;

struct Warp {
  int arrived = 0;
  uint64_t gen = 0;
  Kind kind[2] = {Kind::None, Kind::None};
  alignas(16) unsigned char data[2][32][kSlotBytes];
};

struct Block {
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  int block_arrived = 0;
  uint64_t block_gen = 0;
  ucontext_t sched{};
  Fiber* cur = nullptr;
  std::function<void(int, char*)> body;
  std::vector<char> smem_buf;
  char* smem = nullptr;
  size_t smem_bytes = 0;
};

inline Block*& current() {
  static Block* b = nullptr;
  return b;
}

inline void fiber_entry() {
  Block* B = current();
  Fiber* f = B->cur;
  B->body(f->tid, B->smem);
  f->state = Fiber::Done;  // returns to the scheduler through uc_link
}

inline void yield() {
  Block* B = current();
  swapcontext(&B->cur->ctx, &B->sched);
}

// Fiber stacks, allocated once and reused by every block.
inline char* stack_for(int t) {
  static std::vector<std::unique_ptr<char[]>> pool;
  while (pool.size() <= size_t(t)) pool.emplace_back(new char[kStackBytes]);
  return pool[size_t(t)].get();
}

inline int live(const Block& B) {
  int n = 0;
  for (const Fiber& f : B.fibers) n += f.state != Fiber::Done;
  return n;
}

inline void block_barrier() {
  Block* B = current();
  Fiber* f = B->cur;
  f->state = Fiber::AtBlock;
  f->wait_gen = B->block_gen;
  if (++B->block_arrived == live(*B)) {
    B->block_arrived = 0;
    ++B->block_gen;
  }
  yield();
}

// Deposits this lane's operand, waits for the warp; returns the slot holding all 32 operands.
template <class In> const unsigned char* exchange(Kind k, const In& in) {
  static_assert(sizeof(In) <= kSlotBytes, "operand too large");
  Block* B = current();
  Fiber* f = B->cur;
  Warp& W = B->warps[f->tid / 32];
  const int slot = int(W.gen & 1), lane = f->tid % 32;
  if (W.arrived == 0) W.kind[slot] = k;
  else if (W.kind[slot] != k) fail("lanes of one warp issued different collectives", f->tid);
  std::memcpy(W.data[slot][lane], &in, sizeof(In));
  f->state = Fiber::AtWarp;
  f->wait_gen = W.gen;
  if (++W.arrived == 32) {
    W.arrived = 0;
    ++W.gen;
  }
  yield();
  return &W.data[slot][0][0];
}

template <class T> T operand(const unsigned char* slot, int lane) {
  T v;
  std::memcpy(&v, slot + lane * kSlotBytes, sizeof(T));
  return v;
}

inline int lane_id() { return current()->cur->tid % 32; }

inline void check_smem_row(const void* p, int tid) {
  const Block* B = current();
  const char* c = static_cast<const char*>(p);
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) fail("ldmatrix row address not 16-byte aligned", tid);
  if (c < B->smem || c + 16 > B->smem + B->smem_bytes) fail("ldmatrix row outside shared memory", tid);
}

inline void perform(const Copy& c) {
  if (c.valid) std::memcpy(c.dst, c.src, size_t(c.bytes));
  else std::memset(c.dst, 0, size_t(c.bytes));
}

// Runs one block of `threads` threads over `smem_bytes` of shared memory; reverse = schedule the
// fibers in the opposite order (another legal interleaving).
inline void run_block(int threads, size_t smem_bytes, const std::function<void(int, char*)>& body,
                      bool reverse = false) {
  Block B;
  B.fibers.resize(size_t(threads));
  B.warps.resize(size_t((threads + 31) / 32));
  B.smem_buf.assign(smem_bytes + 64, char(0xFF));
  B.smem = B.smem_buf.data() + (16 - reinterpret_cast<uintptr_t>(B.smem_buf.data()) % 16) % 16;
  B.smem_bytes = smem_bytes;
  B.body = body;
  Block* saved = current();
  current() = &B;
  for (int t = 0; t < threads; ++t) {
    Fiber& f = B.fibers[size_t(t)];
    f.tid = t;
    f.stack = stack_for(t);
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = &B.sched;
    makecontext(&f.ctx, fiber_entry, 0);
  }
  for (;;) {
    bool progressed = false, all_done = true;
    for (int n = 0; n < threads; ++n) {
      Fiber& f = B.fibers[size_t(reverse ? threads - 1 - n : n)];
      if (f.state == Fiber::Done) continue;
      all_done = false;
      if (f.state == Fiber::AtBlock) {
        if (f.wait_gen >= B.block_gen) continue;
      } else if (f.state == Fiber::AtWarp) {
        if (f.wait_gen >= B.warps[size_t(f.tid / 32)].gen) continue;
      }
      f.state = Fiber::Ready;
      B.cur = &f;
      swapcontext(&B.sched, &f.ctx);
      progressed = true;
      if (f.state == Fiber::Done && B.block_arrived > 0 && B.block_arrived == live(B)) {
        B.block_arrived = 0;  // the last live thread ended: the waiting ones are released
        ++B.block_gen;
      }
    }
    if (all_done) break;
    if (!progressed) fail("deadlock: threads wait at a barrier or warp collective that never completes", -1);
  }
  current() = saved;
}

}  // namespace emu

// ---- the platform API of flash_attention_kernels.h -------------------------------------------------

inline void fa_sync() { emu::block_barrier(); }

inline float fa_shfl_xor(float v, int mask) {
  const unsigned char* s = emu::exchange(emu::Kind::Shfl, v);
  return emu::operand<float>(s, emu::lane_id() ^ mask);
}
inline float fa_shfl(float v, int src) {
  const unsigned char* s = emu::exchange(emu::Kind::Shfl, v);
  return emu::operand<float>(s, src & 31);
}

// ldmatrix.m8n8.x4.b16: lanes 8i..8i+7 give the row addresses of matrix i; lane l receives, for
// matrix i, row l/4, columns 2(l%4) and 2(l%4)+1 (the first in the low half).
inline void fa_ldsm_x4(uint32_t (&r)[4], const uint16_t* p) {
  emu::check_smem_row(p, emu::current()->cur->tid);
  const unsigned char* s = emu::exchange(emu::Kind::Ldsm, p);
  const int lane = emu::lane_id();
  for (int i = 0; i < 4; ++i) {
    const uint16_t* row = emu::operand<const uint16_t*>(s, 8 * i + lane / 4);
    std::memcpy(&r[i], row + 2 * (lane % 4), 4);
  }
}
// .trans: lane l receives, for matrix i, rows 2(l%4) and 2(l%4)+1 of column l/4.
inline void fa_ldsm_x4_t(uint32_t (&r)[4], const uint16_t* p) {
  emu::check_smem_row(p, emu::current()->cur->tid);
  const unsigned char* s = emu::exchange(emu::Kind::LdsmT, p);
  const int lane = emu::lane_id();
  for (int i = 0; i < 4; ++i) {
    const uint16_t* r0 = emu::operand<const uint16_t*>(s, 8 * i + 2 * (lane % 4));
    const uint16_t* r1 = emu::operand<const uint16_t*>(s, 8 * i + 2 * (lane % 4) + 1);
    r[i] = uint32_t(r0[lane / 4]) | (uint32_t(r1[lane / 4]) << 16);
  }
}

inline float fa_bf16_to_f(uint16_t x) {
  const uint32_t u = uint32_t(x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint16_t fa_f_to_bf16(float f) {  // round to nearest even
  if (std::isnan(f)) return 0x7FC0;
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}
inline uint32_t fa_pack_bf16(float lo, float hi) {
  return uint32_t(fa_f_to_bf16(lo)) | (uint32_t(fa_f_to_bf16(hi)) << 16);
}
inline void fa_st32(void* p, uint32_t v) { std::memcpy(p, &v, 4); }
inline uint32_t fa_ld32(const void* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}
inline int32_t fa_ldg(const int32_t* p) { return *p; }
inline void fa_ld128(const void* p, uint32_t (&w)[4]) {
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) emu::fail("16-byte global load misaligned", emu::current()->cur->tid);
  std::memcpy(w, p, 16);
}
inline float fa_exp2(float x) { return std::exp2(x); }
inline float fa_log2(float x) { return std::log2(x); }

// mma.sync.m16n8k16.row.col.f32.bf16.bf16.f32, D = A B + D. Lane l = 4g + t holds
//   A: a[0] = (row g, cols 2t, 2t+1), a[1] = (row g+8, same), a[2] = (row g, cols 2t+8, 2t+9),
//      a[3] = (row g+8, same);  B: b0 = (rows 2t, 2t+1, col g), b1 = (rows 2t+8, 2t+9, col g);
//   D: d[0], d[1] = (row g, cols 2t, 2t+1), d[2], d[3] = (row g+8, same).
struct MmaIn {
  uint32_t a[4];
  uint32_t b[2];
};
inline void fa_mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  const MmaIn in{{a[0], a[1], a[2], a[3]}, {b0, b1}};
  const unsigned char* s = emu::exchange(emu::Kind::Mma, in);
  float A[16][16], Bm[16][8];
  auto lo = [](uint32_t x) { return fa_bf16_to_f(uint16_t(x & 0xFFFFu)); };
  auto hi = [](uint32_t x) { return fa_bf16_to_f(uint16_t(x >> 16)); };
  for (int l = 0; l < 32; ++l) {
    const MmaIn m = emu::operand<MmaIn>(s, l);
    const int g = l / 4, t = l % 4;
    A[g][2 * t] = lo(m.a[0]);
    A[g][2 * t + 1] = hi(m.a[0]);
    A[g + 8][2 * t] = lo(m.a[1]);
    A[g + 8][2 * t + 1] = hi(m.a[1]);
    A[g][2 * t + 8] = lo(m.a[2]);
    A[g][2 * t + 9] = hi(m.a[2]);
    A[g + 8][2 * t + 8] = lo(m.a[3]);
    A[g + 8][2 * t + 9] = hi(m.a[3]);
    Bm[2 * t][g] = lo(m.b[0]);
    Bm[2 * t + 1][g] = hi(m.b[0]);
    Bm[2 * t + 8][g] = lo(m.b[1]);
    Bm[2 * t + 9][g] = hi(m.b[1]);
  }
  const int lane = emu::lane_id(), g = lane / 4, t = lane % 4;
  const int rows[4] = {g, g, g + 8, g + 8}, cols[4] = {2 * t, 2 * t + 1, 2 * t, 2 * t + 1};
  for (int i = 0; i < 4; ++i) {
    float acc = d[i];
    for (int k = 0; k < 16; ++k) acc += A[rows[i]][k] * Bm[k][cols[i]];
    d[i] = acc;
  }
}

namespace emu {
inline void cp_async(void* dst, const void* src, bool valid, int bytes) {
  Block* B = current();
  const char* c = static_cast<const char*>(dst);
  if (reinterpret_cast<uintptr_t>(dst) % unsigned(bytes) || c < B->smem || c + bytes > B->smem + B->smem_bytes)
    fail("cp.async destination misaligned or outside shared memory", B->cur->tid);
  if (reinterpret_cast<uintptr_t>(src) % unsigned(bytes)) fail("cp.async source misaligned", B->cur->tid);
  B->cur->open.push_back({dst, src, valid, bytes});
}
}  // namespace emu
inline void fa_cp_async16(void* dst, const void* src, bool valid) { emu::cp_async(dst, src, valid, 16); }
inline void fa_cp_async4(void* dst, const void* src, bool valid) { emu::cp_async(dst, src, valid, 4); }
inline void fa_cp_commit() {
  emu::Fiber* f = emu::current()->cur;
  f->groups.push_back(std::move(f->open));
  f->open.clear();
}
template <int N> inline void fa_cp_wait() {
  emu::Fiber* f = emu::current()->cur;
  while (f->groups.size() > size_t(N)) {
    for (const emu::Copy& c : f->groups.front()) emu::perform(c);
    f->groups.erase(f->groups.begin());
  }
}

}  // namespace moelab::flash
