//! Host memory of the CPU backend: the allocator's tuning, outputs that
//! are never zero-filled, and big buffers backed by transparent huge pages.
//!
//! A forward pass frees and allocates hundreds of activation buffers of
//! 1–32 MB. With glibc's default, adaptive thresholds, freed memory at the
//! top of the heap is soon given back to the system (trimmed) and the next
//! buffers fault their pages in again: about 50 000 page faults per
//! SmolLM2 forward pass at T=512, 2–3 µs each here. `tune_allocator` keeps
//! such buffers on the heap (mmap threshold 32 MiB, glibc's maximum) and
//! up to `TRIM_THRESHOLD` of freed heap for reuse: about 600 faults per
//! pass. The cost is memory kept rather than returned: peak RSS of a
//! SmolLM2 scoring run 883 MiB against 830 MiB untuned (and 883 MiB
//! before any of this module).
//!
//! The same churn came back through glibc's per-thread arenas: buffers
//! that rayon's workers allocate live in arenas of their own, which give
//! freed memory back far sooner than the main heap does, so that a pass
//! faulted in (and zeroed, with TLB shootdowns on write-after-read pages)
//! what the last pass had freed. `tune_allocator` therefore also keeps one
//! arena. Allocations here are a few hundred buffers per layer, so the one
//! lock is not contended. Measured (2 threads, SmolLM2, one run each,
//! alternating): scoring at T=512 with activations kept 285–291 tokens/s
//! against 216–276 with an arena per thread, at the same peak RSS
//! (885 MiB); a LoRA-KD step at 8 × 256, 169 against 141 tokens/s, at the
//! same peak RSS; scoring with budget 0 unchanged (225 against 224).
//!
//! In this VM a first touch of 100 MB costs ~80 ms through 4 KiB pages and
//! ~25 ms through 2 MiB ones (page-fault overhead), and streaming a whole
//! model's weights per decoding step read ~30% faster from 2 MiB pages
//! (fewer TLB misses). Linux only backs a region with huge pages by itself
//! when THP is "always"; under the common "madvise" setting it needs
//! `madvise(MADV_HUGEPAGE)` before the region is first touched.

use std::mem::MaybeUninit;

/// The host's available memory (`MemAvailable` of /proc/meminfo: free
/// memory plus what the kernel can reclaim without swapping).
pub fn host_available_memory() -> crate::Result<u64> {
    let path = "/proc/meminfo";
    let text = std::fs::read_to_string(path)
        .map_err(|e| crate::Error::Invalid(format!("cannot read {path}: {e}")))?;
    text.lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|kb| kb.trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .ok_or_else(|| crate::Error::Invalid(format!("{path} has no MemAvailable line")))
}

/// Free heap memory kept for reuse before glibc gives it back (see the module doc).
const TRIM_THRESHOLD: usize = 256 << 20;

/// Sets glibc's mmap threshold to 32 MiB, its trim threshold to
/// `TRIM_THRESHOLD` and its arena count to one (see the module doc), once
/// per process, unless the user tuned malloc through the environment.
/// Process-wide: other users of the allocator in this process see the
/// same settings.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            let tuned = [
                "GLIBC_TUNABLES",
                "MALLOC_TRIM_THRESHOLD_",
                "MALLOC_MMAP_THRESHOLD_",
                "MALLOC_ARENA_MAX",
            ]
            .iter()
            .any(|v| std::env::var_os(v).is_some());
            if tuned {
                return;
            }
            use std::ffi::c_int;
            const M_TRIM_THRESHOLD: c_int = -1;
            const M_MMAP_THRESHOLD: c_int = -3;
            const M_ARENA_MAX: c_int = -8;
            extern "C" {
                fn mallopt(param: c_int, value: c_int) -> c_int;
            }
            // SAFETY: mallopt only changes the thresholds; a value it
            // rejects leaves the default in place.
            unsafe {
                mallopt(M_MMAP_THRESHOLD, 32 << 20);
                mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD as c_int);
                mallopt(M_ARENA_MAX, 1);
            }
        });
    }
}

/// Buffers below this size are not advised (no aligned 2 MiB interior worth a system call).
const ADVISE_MIN_BYTES: usize = 4 << 20;

/// Asks Linux to back the 2 MiB-aligned interior of `[ptr, ptr + bytes)`
/// with huge pages. A hint: it changes neither contents nor memory use,
/// and errors (THP off, other kernels) are ignored.
fn advise_huge_pages<T>(ptr: *const T, bytes: usize) {
    #[cfg(target_os = "linux")]
    if bytes >= ADVISE_MIN_BYTES {
        const HUGE: usize = 2 << 20;
        const MADV_HUGEPAGE: std::ffi::c_int = 14;
        extern "C" {
            fn madvise(
                addr: *mut std::ffi::c_void,
                len: usize,
                advice: std::ffi::c_int,
            ) -> std::ffi::c_int;
        }
        let start = (ptr as usize).next_multiple_of(HUGE);
        let end = (ptr as usize + bytes) / HUGE * HUGE;
        if end > start {
            // SAFETY: [start, end) lies inside the caller's allocation;
            // madvise only hints how to back it.
            unsafe { madvise(start as *mut _, end - start, MADV_HUGEPAGE) };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (ptr, bytes);
}

/// A copy of `data` (resident weights), huge-page backed when big.
pub fn huge_page_copy(data: &[f32]) -> Vec<f32> {
    huge_page_collect(data.len(), data.iter().copied())
}

/// The `len` values of `values` (resident weights) in a vector that is
/// huge-page backed when big.
pub fn huge_page_collect<T>(len: usize, values: impl Iterator<Item = T>) -> Vec<T> {
    let mut v: Vec<T> = Vec::with_capacity(len);
    advise_huge_pages(v.as_ptr(), len * std::mem::size_of::<T>());
    v.extend(values);
    v
}

/// A vector of `len` values that `init` writes into the uninitialised
/// slots it is given, so that it is never zero-filled first (for big
/// outputs the zero-fill is a whole extra pass over memory); huge-page
/// backed when big.
///
/// # Safety
/// `init` must write all `len` slots.
pub unsafe fn written_slots(len: usize, init: impl FnOnce(&mut [MaybeUninit<f32>])) -> Vec<f32> {
    let mut v = Vec::with_capacity(len);
    advise_huge_pages(v.as_ptr(), len * 4);
    init(&mut v.spare_capacity_mut()[..len]);
    v.set_len(len);
    v
}

/// `written_slots` for writers that take a pointer (gemm).
///
/// # Safety
/// `init` must write all `len` values (gemm does with `accumulate = false`:
/// it then never reads the destination).
pub unsafe fn written_by(len: usize, init: impl FnOnce(*mut f32)) -> Vec<f32> {
    written_slots(len, |slots| init(slots.as_mut_ptr().cast()))
}
