// The emulated device's scheduler (host build only; nvcc builds the .cu files
// alone): runs every CUDA thread of a block as a fiber on the launching OS
// thread, under the execution model described at the top of compat.cuh.
//
// Why fibers: one OS thread per CUDA thread (up to 1024 per block) spent the
// emulated tests' time in context switches between kernel threads, each
// barrier a futex round trip through the kernel; a fiber switch is a
// function call that swaps the stack pointer.
//
// Context switch: on x86-64, rku_emu_switch below (the SysV callee-saved
// registers pushed on the old stack, rsp swapped, popped from the new one;
// the MXCSR and x87 control words are not saved: no fiber changes them).
// Elsewhere, or built with RKU_EMU_UCONTEXT defined, ucontext's swapcontext,
// which also saves and restores the signal mask with a system call per
// switch: 12 times slower on a reduction-heavy launch (docs/DESIGN.md §6).
//
// Stacks: kStackBytes each, mapped on first use with MAP_NORESERVE (pages
// are backed only once touched) above a PROT_NONE guard page, and kept for
// the process's lifetime: a kernel overflowing its stack dies with SIGSEGV
// instead of writing into another fiber's stack.
#include "compat.cuh"

#include <sys/mman.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <vector>

#if defined(__x86_64__) && !defined(RKU_EMU_UCONTEXT)
#define RKU_EMU_ASM_SWITCH 1
#else
#include <ucontext.h>
#endif

#ifdef RKU_EMU_ASM_SWITCH
// rku_emu_switch(void **save_sp, void *load_sp): saves the caller's context
// on its own stack, stores that stack pointer in *save_sp, and resumes the
// context whose stack pointer is load_sp (a stack left by this function, or
// one laid out by `start` below).
extern "C" void rku_emu_switch(void **save_sp, void *load_sp);
asm(R"(
    .text
    .globl rku_emu_switch
    .hidden rku_emu_switch
    .type rku_emu_switch, @function
rku_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size rku_emu_switch, .-rku_emu_switch
)");
#endif

namespace rku_emu {
namespace {

constexpr size_t kStackBytes = 256 * 1024;
constexpr unsigned kMaxThreads = 1024;  // a block's limit, checked by emu.rs too

// A suspended execution context: a fiber's, or the scheduler's while a fiber runs.
struct Context {
#ifdef RKU_EMU_ASM_SWITCH
    void *sp = nullptr;
#else
    ucontext_t uc;
#endif
};

// Where a fiber stands when the scheduler has control.
enum class At : unsigned char { Ready, Block, Warp, Done };

struct Fiber {
    Context ctx;
    unsigned char *stack;  // lowest usable byte, just above the guard page
    uint3 idx;             // threadIdx of this fiber in the current launch
    At at;
};

// The scheduler's state; everything here is guarded by one_launch_at_a_time.
std::mutex one_launch_at_a_time;
std::vector<Fiber> fibers;  // reserved for kMaxThreads up front, so never moved
Context scheduler;
Fiber *current = nullptr;
void (*body)(void *) = nullptr;
void *body_ctx = nullptr;

[[noreturn]] void die(const char *msg) {
    std::fprintf(stderr, "rku_emu: %s\n", msg);
    std::abort();
}

void switch_to(Context &save, Context &load) {
#ifdef RKU_EMU_ASM_SWITCH
    rku_emu_switch(&save.sp, load.sp);
#else
    if (swapcontext(&save.uc, &load.uc) != 0) die("swapcontext failed");
#endif
}

// A fiber's first instructions: run the kernel as the current thread, then
// leave for good (the scheduler lays out the stack afresh for the next block).
[[noreturn]] void fiber_main() {
    body(body_ctx);
    current->at = At::Done;
    switch_to(current->ctx, scheduler);
    die("a finished fiber was resumed");
}

// Makes `f` start at fiber_main on its next resume.
void start(Fiber &f) {
    unsigned char *top = f.stack + kStackBytes;
#ifdef RKU_EMU_ASM_SWITCH
    // What rku_emu_switch pops: r15, r14, r13, r12, rbx, rbp (all 0), then
    // fiber_main as the return address, then a 0 return address for
    // fiber_main itself, so that it starts with rsp ≡ 8 (mod 16) as after a
    // call and a backtrace ends there.
    void **sp = reinterpret_cast<void **>(top) - 8;
    for (int i = 0; i < 6; ++i) sp[i] = nullptr;
    sp[6] = reinterpret_cast<void *>(&fiber_main);
    sp[7] = nullptr;
    f.ctx.sp = sp;
#else
    if (getcontext(&f.ctx.uc) != 0) die("getcontext failed");
    f.ctx.uc.uc_stack.ss_sp = f.stack;
    f.ctx.uc.uc_stack.ss_size = size_t(top - f.stack);
    f.ctx.uc.uc_link = nullptr;
    makecontext(&f.ctx.uc, fiber_main, 0);
#endif
    f.at = At::Ready;
}

// Maps stacks until there are `n` fibers.
void grow(unsigned n) {
    fibers.reserve(kMaxThreads);
    const size_t page = size_t(sysconf(_SC_PAGESIZE));
    while (fibers.size() < n) {
        void *m = mmap(nullptr, page + kStackBytes, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_STACK, -1, 0);
        if (m == MAP_FAILED || mprotect(m, page, PROT_NONE) != 0) die("cannot map a fiber stack");
        fibers.push_back(Fiber{{}, static_cast<unsigned char *>(m) + page, {}, At::Done});
    }
}

// The calling fiber waits at `where`.
void wait_at(At where) {
    current->at = where;
    switch_to(current->ctx, scheduler);
}

// Readies the threads of [lo, hi) waiting at `where` if every live one of
// them is; returns whether it did.
bool release(unsigned lo, unsigned hi, At where) {
    bool waiting = false;
    for (unsigned t = lo; t < hi; ++t) {
        if (fibers[t].at == where) {
            waiting = true;
        } else if (fibers[t].at != At::Done) {
            return false;
        }
    }
    if (waiting) {
        for (unsigned t = lo; t < hi; ++t) {
            if (fibers[t].at == where) fibers[t].at = At::Ready;
        }
    }
    return waiting;
}

// Runs one block (its fibers started) to the end: passes over the ready
// fibers, in reverse linear order when `block + pass` is even and forward
// otherwise, each pass followed by the barriers it completed.
void run_block(unsigned n, size_t block) {
    unsigned live = n;
    for (size_t pass = 0; live > 0; ++pass) {
        const bool reverse = (block + pass) % 2 == 0;
        for (unsigned i = 0; i < n; ++i) {
            const unsigned t = reverse ? n - 1 - i : i;
            Fiber &f = fibers[t];
            if (f.at != At::Ready) continue;
            current = &f;
            linear_tid = t;
            threadIdx = f.idx;
            switch_to(scheduler, f.ctx);
            if (f.at == At::Done) --live;
        }
        // After a pass no fiber is ready: each waits at a barrier or is done.
        bool released = false;
        for (unsigned lo = 0; lo < n; lo += kWarp) {
            released |= release(lo, std::min(lo + kWarp, n), At::Warp);
        }
        if (!released && !release(0, n, At::Block) && live > 0) {
            die("deadlock: threads of a block wait at different barriers "
                "(__syncthreads or __syncwarp reached by only part of the block or warp)");
        }
    }
}

}  // namespace

void sync_block() { wait_at(At::Block); }
void sync_warp() { wait_at(At::Warp); }

void run_grid(dim3 grid, dim3 blk, size_t shmem, void (*kernel_body)(void *), void *ctx) {
    std::lock_guard<std::mutex> guard(one_launch_at_a_time);
    const unsigned n = blk.x * blk.y * blk.z;
    if (n == 0 || n > kMaxThreads) die("block size out of range");
    grow(n);
    for (unsigned t = 0; t < n; ++t) {
        fibers[t].idx = {t % blk.x, (t / blk.x) % blk.y, t / (blk.x * blk.y)};
    }
    std::vector<unsigned char> shared(shmem + 16);
    std::vector<uint64_t> slots((n + kWarp - 1) / kWarp * kWarp);
    blockDim = blk;
    gridDim = grid;
    dyn_shared = shared.data();
    exchange_slots = slots.data();
    body = kernel_body;
    body_ctx = ctx;
    const size_t blocks = size_t(grid.x) * grid.y * grid.z;
    for (size_t b = 0; b < blocks; ++b) {
        blockIdx = {unsigned(b % grid.x), unsigned((b / grid.x) % grid.y),
                    unsigned(b / (size_t(grid.x) * grid.y))};
        // Shared memory starts undefined on a GPU: poison it (NaN bytes).
        std::memset(shared.data(), 0xFF, shared.size());
        std::fill(slots.begin(), slots.end(), 0);
        for (unsigned t = 0; t < n; ++t) start(fibers[t]);
        run_block(n, b);
    }
}

}  // namespace rku_emu
