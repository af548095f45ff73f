//! Pure work spread over a few threads with the answer in input order:
//! a bulk import's documents, built each from its own record. Nothing
//! here reads a clock, draws randomness or does IO, and the answer does
//! not depend on the thread count, so a simulator running one thread gets
//! exactly what a node running several does.

/// `f` of every item, in order, on up to `threads` threads (the calling
/// one among them). The answer is the same whatever `threads` is: each
/// item's result depends on that item alone.
pub fn map<T: Sync, R: Send>(items: &[T], threads: usize, f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let threads = threads.clamp(1, items.len().max(1));
    if threads == 1 {
        return items.iter().map(&f).collect();
    }
    let per = items.len().div_ceil(threads);
    let f = &f;
    std::thread::scope(|scope| {
        let mut chunks = items.chunks(per);
        let first = chunks.next().unwrap_or(&[]);
        let others: Vec<_> = chunks
            .map(|c| scope.spawn(move || c.iter().map(f).collect::<Vec<R>>()))
            .collect();
        let mut out: Vec<R> = first.iter().map(f).collect();
        for h in others {
            match h.join() {
                Ok(part) => out.extend(part),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        out
    })
}
