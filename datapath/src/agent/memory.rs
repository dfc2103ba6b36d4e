//! Giving memory back to the node. What the agent keeps is plain data, about 30 MB at
//! 10,000 Services; but a (re)list decodes every Service, EndpointSlice and Pod of the
//! cluster, page by page, on both runtime workers at once. With glibc's malloc that
//! transient peak stayed resident: freed chunks remain in each thread's arena, and after
//! a large buffer is freed glibc raises its mmap threshold, so later large buffers come
//! from (and stay in) the heap as well. `BENCHMARKS.md` ("Agent resident memory") has
//! the numbers.
//!
//! Both are glibc behaviours, so both knobs are glibc's own; no allocator crate is
//! needed. Elsewhere (musl) these are no-ops.

/// Call before the runtime starts its threads (arenas are made when a thread first
/// allocates).
///
/// - At most two malloc arenas, one per runtime worker: more only pay off for
///   allocation-heavy threads running in parallel, and each arena keeps its own freed
///   memory.
/// - A fixed mmap threshold (glibc's initial 128 KiB): a large buffer (a list page's
///   response, a map being grown) is then always its own mapping and goes back to the
///   kernel when freed, instead of raising the threshold and staying in the heap.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before other threads exist.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}

/// Returns the free pages of every arena to the kernel. Called after a loop has applied a
/// relist: the decoded objects of the list are gone by then, and without this their
/// pages would stay resident (glibc itself only trims the top of the main heap).
pub fn release_freed() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim is thread-safe; it only gives free pages back.
    unsafe {
        libc::malloc_trim(0);
    }
}
