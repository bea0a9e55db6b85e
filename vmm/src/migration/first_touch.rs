//! First touches of stack and heap, done while the guest still runs
//! instead of inside the switch-over's pause.
//!
//! On this host (nested KVM) the first write to a page is a fault of 2-5
//! us, more when a KVM ioctl's copy-out takes it. A source's vCPU read,
//! encode and send touched 9-11 pages of stack and heap that nothing had
//! touched before in the process (the rehearsals run shallower: no KVM
//! ioctls, no devices), a target's decode 2. Each side's switch-over
//! thread calls [`stack_and_heap`] while it waits for the other side.

/// Stack below the caller's frame that a save and encode, or a decode and
/// restore, may reach (a vCPU state is ~6 KB and passes by value through
/// a few frames; KVM writes the 4 KiB XSAVE area into one). The source's
/// migration thread has 256 KiB, the target's main thread megabytes.
const STACK_BYTES: usize = 96 * 1024;

/// Heap touched and handed back to the allocator: more than a switch-over
/// allocates (the state, its ~10 KB text, the frame), less than glibc's
/// trim threshold (128 KiB), so the freed pages stay mapped for reuse.
const HEAP_BLOCKS: usize = 12;
const HEAP_BLOCK_BYTES: usize = 8 * 1024;

/// Touches [`STACK_BYTES`] of stack below the caller and
/// `HEAP_BLOCKS` × `HEAP_BLOCK_BYTES` of heap, then frees the heap.
pub fn stack_and_heap() {
    touch_stack();
    let blocks: Vec<Vec<u8>> = (0..HEAP_BLOCKS)
        .map(|_| vec![1u8; HEAP_BLOCK_BYTES])
        .collect();
    std::hint::black_box(&blocks);
}

/// A frame of [`STACK_BYTES`], written whole (the stack probes of a frame
/// this large touch each page in order, so a main thread's stack grows
/// into it as it would on demand).
#[inline(never)]
fn touch_stack() {
    let mut frame = [0u8; STACK_BYTES];
    std::hint::black_box(&mut frame);
}
