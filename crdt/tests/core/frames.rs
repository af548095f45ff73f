//! Decoding frames costs memory in proportion to the frame, not to the
//! lengths it declares: a counting allocator records the largest single
//! allocation made while one frame is decoded on this thread.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

struct Counting;

thread_local! {
    /// Recording on this thread, and the largest allocation seen since.
    static RECORDING: Cell<bool> = const { Cell::new(false) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    // `try_with`: the thread-locals may be gone while a thread exits.
    if RECORDING.try_with(Cell::get).unwrap_or(false) {
        let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
    }
}

// The one unsafe block of the tests: a global allocator must implement an
// unsafe trait; it only forwards to the system allocator.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Decodes `bytes`; returns whether it decoded and the largest allocation.
fn largest_while_decoding(bytes: &[u8]) -> (bool, usize) {
    LARGEST.with(|l| l.set(0));
    RECORDING.with(|r| r.set(true));
    let ok = crdt::wire::decode(bytes).is_ok();
    RECORDING.with(|r| r.set(false));
    (ok, LARGEST.with(Cell::get))
}

/// A postcard varint.
fn varint(mut n: u64, out: &mut Vec<u8>) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

/// Each frame declares `count` elements and then holds `count` bytes that
/// are not one valid element (so the length passes postcard's own check
/// that enough bytes remain, and decoding fails at the first element).
/// Decoding may reserve the frame's size, not the declared elements' size
/// in memory (a range is ~100 bytes in memory, one byte here): serde's
/// default reserves up to 1 MiB per list on the declared count.
#[test]
fn a_frame_declaring_a_huge_count_allocates_no_more_than_its_size() {
    use crdt::wire::{MAX_CHANGES_PER_DOC, MAX_PREALLOC_BYTES, MAX_RANGES_PER_FRAME};
    let padded = |head: &[u8], count: u64| {
        let mut f = head.to_vec();
        varint(count, &mut f);
        f.resize(f.len() + count as usize, 0xff);
        f
    };
    // Frame variants in declaration order: Reconcile is 2, Changes 3.
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("ranges", padded(&[2], MAX_RANGES_PER_FRAME as u64)),
        ("ranges, beyond the bound", padded(&[2], 100_000)),
        // One document (kind 0, id "x") declaring 65,536 changes.
        (
            "changes",
            padded(&[3, 1, 0, 1, b'x'], MAX_CHANGES_PER_DOC as u64),
        ),
        // One digests range (lo and hi absent, body 1).
        ("digests", padded(&[2, 1, 0, 0, 1], 4096)),
        // The tree's frames (protocol 3): IHave is 7, Graft 8, Prune 9.
        ("announced documents", padded(&[7], 4096)),
        ("grafted documents", padded(&[8], 1024)),
        ("pruned kinds, beyond the bound", padded(&[9], 100_000)),
        // A count far beyond the bytes present.
        (
            "ranges, 2^32 declared",
            padded(&[2], 0).into_iter().chain([0xff; 4]).collect(),
        ),
    ];
    for (what, frame) in cases {
        let (ok, largest) = largest_while_decoding(&frame);
        println!(
            "{what}: {}-byte frame, largest allocation {largest} bytes",
            frame.len()
        );
        assert!(!ok, "{what}: a malformed frame decoded");
        assert!(
            largest <= MAX_PREALLOC_BYTES + 256,
            "{what}: a {}-byte frame made a {largest}-byte allocation",
            frame.len()
        );
    }
}
