//! Test support: an SQLite VFS that wraps the default `unix` VFS and can
//! cut the power, fail the n-th I/O, or run out of space, so the durability
//! tests can tell a store that fsyncs from one that does not.
//!
//! # Why this crate has `unsafe`
//!
//! SQLite's only extension point below the pager is a VFS: a C struct of
//! function pointers (`sqlite3_vfs`, `sqlite3_io_methods`) registered with
//! `sqlite3_vfs_register`. `rusqlite` exposes those types through
//! `rusqlite::ffi` but no safe wrapper, so implementing one needs
//! `extern "C"` callbacks and raw pointers. The workspace denies
//! `unsafe_code`; this crate alone allows it, is used only as a
//! dev-dependency (by the crash, fault and bench harnesses) and never
//! links into the `kizuna` binary. Every `unsafe` block below either
//! forwards a call to the real `unix` VFS with the pointers SQLite handed
//! us, or reads our own header placed in front of the real file struct.
//!
//! # The model
//!
//! Every file SQLite opens by name through the VFS is *tracked*. Each
//! write or truncate first saves the bytes it is about to replace (an undo
//! record); a successful `xSync` makes the file durable and forgets its
//! undo records. Creating and deleting files are metadata operations: as
//! on a journaling file system (ext4, xfs), they become durable at the
//! next successful `xSync` of any file (the file system's journal commit
//! carries every earlier metadata change) or, for a deletion, at once when
//! SQLite asks for a directory sync. Until then a created file vanishes at
//! a cut and a deleted one comes back with its durable content.
//!
//! A **power cut** ([`FaultVfs::arm_cut`]) happens before the n-th I/O
//! call (reads, writes, truncates and syncs are counted, in order). From
//! then on every write, truncate, sync and delete fails with an I/O error
//! and changes nothing, like a machine that lost power: the program can
//! only give up. After the caller has closed every connection,
//! [`FaultVfs::power_cut`] puts the files into a state a real power loss
//! could leave: every unsynced change is undone, except that for each file
//! the caller may keep a prefix of its unsynced writes (the disk wrote
//! some of them, in order, before the power went; files are independent,
//! so the WAL and the database can each keep a different amount). Files
//! created but never synced vanish; unsynced deletions are undone.
//!
//! **I/O faults** ([`FaultVfs::arm_fault`]): the n-th I/O call fails with
//! the matching `SQLITE_IOERR_*` code, once or for every call from then on.
//! **Disk full** ([`FaultVfs::set_full`]): every write that would grow a
//! file fails with `SQLITE_FULL` (writes inside a file's current size
//! still succeed, as on a real full file system).
//!
//! What the model leaves out: torn sectors inside one write, and
//! reordering of writes inside one file (both are handled by SQLite's WAL
//! checksums and are outside what the store itself can influence).
//!
//! # How to drive it
//!
//! ```no_run
//! let vfs = faultvfs::FaultVfs::register("kizuna-test-1");
//! // open connections with `vfs.name()` (rusqlite's open_with_flags_and_vfs)
//! vfs.arm_cut(1234);
//! // ... run the workload until it fails; close every connection ...
//! vfs.power_cut(&mut |_path, _unsynced| 0);
//! // reopen and check what survived
//! ```
#![allow(unsafe_code)]

use rusqlite::ffi;
use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::os::unix::fs::FileExt;
use std::sync::{Mutex, MutexGuard};

/// What happens at the armed I/O call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Plan {
    None,
    /// The power goes at I/O call number `at` (1-based, counted from
    /// arming), before it is carried out.
    Cut {
        at: u64,
    },
    /// I/O call number `at` fails; with `persistent`, every later one too.
    Fail {
        at: u64,
        persistent: bool,
    },
}

/// One undo record: before the change, the file was `old_size` bytes long
/// and held `old` at `offset`.
struct Undo {
    offset: u64,
    old: Vec<u8>,
    old_size: u64,
}

#[derive(Default)]
struct PathState {
    /// Unsynced changes, oldest first.
    undo: Vec<Undo>,
    /// Created through the VFS and not yet synced: gone after a power cut.
    created_unsynced: bool,
}

struct State {
    plan: Plan,
    /// I/O calls since the plan was armed.
    ops: u64,
    /// I/O calls since registration (for reports).
    total_ops: u64,
    /// After a power cut: nothing reaches the disk any more.
    dead: bool,
    full: bool,
    faults_injected: u64,
    next_id: u64,
    open: HashMap<u64, String>,
    paths: HashMap<String, PathState>,
    /// Durable content of files deleted without a directory sync.
    deleted: HashMap<String, Vec<u8>>,
}

struct Shared {
    real: *mut ffi::sqlite3_vfs,
    state: Mutex<State>,
}

// The raw pointer is the unix VFS, a static object SQLite owns and never
// frees; the state is behind a mutex.
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A registered fault-injecting VFS. Open connections with [`Self::name`].
/// Dropping it unregisters the VFS; close every connection first.
pub struct FaultVfs {
    name: CString,
    vfs: *mut ffi::sqlite3_vfs,
    shared: *const Shared,
}

unsafe impl Send for FaultVfs {}
unsafe impl Sync for FaultVfs {}

/// Our header in front of the real VFS's file struct.
#[repr(C)]
struct ShimFile {
    base: ffi::sqlite3_file,
    shared: *const Shared,
    /// 0 = not tracked (temporary files without a name).
    id: u64,
}

const REAL_OFFSET: usize = std::mem::size_of::<ShimFile>().div_ceil(16) * 16;

/// The kind of I/O call, for counting and for the error code it fails with.
#[derive(Clone, Copy)]
enum Op {
    Read,
    Write,
    Truncate,
    Sync,
}

impl Op {
    fn ioerr(self) -> c_int {
        match self {
            Op::Read => ffi::SQLITE_IOERR_READ,
            Op::Write => ffi::SQLITE_IOERR_WRITE,
            Op::Truncate => ffi::SQLITE_IOERR_TRUNCATE,
            Op::Sync => ffi::SQLITE_IOERR_FSYNC,
        }
    }
}

impl State {
    /// Counts one I/O call and decides whether it may go ahead.
    fn begin(&mut self, op: Op) -> Result<(), c_int> {
        if self.dead {
            return match op {
                // A dead machine reads nothing new either, but reads have
                // no effect on what survives; let the program fail on its
                // next write.
                Op::Read => Ok(()),
                _ => Err(op.ioerr()),
            };
        }
        self.ops += 1;
        self.total_ops += 1;
        match self.plan {
            Plan::Cut { at } if self.ops >= at => {
                self.dead = true;
                match op {
                    Op::Read => Ok(()),
                    _ => Err(op.ioerr()),
                }
            }
            Plan::Fail { at, persistent } if self.ops == at || (persistent && self.ops > at) => {
                self.faults_injected += 1;
                Err(op.ioerr())
            }
            _ => Ok(()),
        }
    }
}

unsafe fn shim<'a>(f: *mut ffi::sqlite3_file) -> &'a ShimFile {
    &*(f as *const ShimFile)
}

unsafe fn real(f: *mut ffi::sqlite3_file) -> *mut ffi::sqlite3_file {
    (f as *mut u8).add(REAL_OFFSET) as *mut ffi::sqlite3_file
}

unsafe fn real_methods(f: *mut ffi::sqlite3_file) -> &'static ffi::sqlite3_io_methods {
    &*(*real(f)).pMethods
}

unsafe fn shared_of_vfs<'a>(v: *mut ffi::sqlite3_vfs) -> &'a Shared {
    &*((*v).pAppData as *const Shared)
}

unsafe fn real_size(f: *mut ffi::sqlite3_file) -> Result<u64, c_int> {
    let mut size: ffi::sqlite3_int64 = 0;
    let rc = (real_methods(f).xFileSize.unwrap())(real(f), &mut size);
    if rc != ffi::SQLITE_OK {
        return Err(rc);
    }
    Ok(size as u64)
}

/// Reads `[offset, offset + len)` clipped to the file size.
unsafe fn real_bytes(
    f: *mut ffi::sqlite3_file,
    offset: u64,
    len: u64,
    size: u64,
) -> Result<Vec<u8>, c_int> {
    let end = (offset + len).min(size);
    if end <= offset {
        return Ok(Vec::new());
    }
    let mut buf = vec![0u8; (end - offset) as usize];
    let rc = (real_methods(f).xRead.unwrap())(
        real(f),
        buf.as_mut_ptr() as *mut c_void,
        buf.len() as c_int,
        offset as ffi::sqlite3_int64,
    );
    if rc != ffi::SQLITE_OK {
        return Err(rc);
    }
    Ok(buf)
}

// ----- io methods -----------------------------------------------------------

unsafe extern "C" fn x_close(f: *mut ffi::sqlite3_file) -> c_int {
    let s = shim(f);
    let rc = (real_methods(f).xClose.unwrap())(real(f));
    if s.id != 0 {
        (*s.shared).lock().open.remove(&s.id);
    }
    rc
}

unsafe extern "C" fn x_read(
    f: *mut ffi::sqlite3_file,
    buf: *mut c_void,
    amt: c_int,
    off: ffi::sqlite3_int64,
) -> c_int {
    let s = shim(f);
    if let Err(rc) = (*s.shared).lock().begin(Op::Read) {
        return rc;
    }
    (real_methods(f).xRead.unwrap())(real(f), buf, amt, off)
}

unsafe extern "C" fn x_write(
    f: *mut ffi::sqlite3_file,
    buf: *const c_void,
    amt: c_int,
    off: ffi::sqlite3_int64,
) -> c_int {
    let s = shim(f);
    let mut st = (*s.shared).lock();
    if let Err(rc) = st.begin(Op::Write) {
        return rc;
    }
    let size = match real_size(f) {
        Ok(s) => s,
        Err(rc) => return rc,
    };
    if st.full && off as u64 + amt as u64 > size {
        st.faults_injected += 1;
        return ffi::SQLITE_FULL;
    }
    if s.id != 0 {
        let old = match real_bytes(f, off as u64, amt as u64, size) {
            Ok(b) => b,
            Err(rc) => return rc,
        };
        if let Some(path) = st.open.get(&s.id).cloned() {
            st.paths.entry(path).or_default().undo.push(Undo {
                offset: off as u64,
                old,
                old_size: size,
            });
        }
    }
    // The lock is held across the real write so a cut cannot fall between
    // saving the undo record and the write it covers.
    (real_methods(f).xWrite.unwrap())(real(f), buf, amt, off)
}

unsafe extern "C" fn x_truncate(f: *mut ffi::sqlite3_file, size: ffi::sqlite3_int64) -> c_int {
    let s = shim(f);
    let mut st = (*s.shared).lock();
    if let Err(rc) = st.begin(Op::Truncate) {
        return rc;
    }
    if s.id != 0 {
        let old_size = match real_size(f) {
            Ok(s) => s,
            Err(rc) => return rc,
        };
        let new = size as u64;
        let old = if new < old_size {
            match real_bytes(f, new, old_size - new, old_size) {
                Ok(b) => b,
                Err(rc) => return rc,
            }
        } else {
            Vec::new()
        };
        if let Some(path) = st.open.get(&s.id).cloned() {
            st.paths.entry(path).or_default().undo.push(Undo {
                offset: new.min(old_size),
                old,
                old_size,
            });
        }
    }
    (real_methods(f).xTruncate.unwrap())(real(f), size)
}

unsafe extern "C" fn x_sync(f: *mut ffi::sqlite3_file, flags: c_int) -> c_int {
    let s = shim(f);
    let mut st = (*s.shared).lock();
    if let Err(rc) = st.begin(Op::Sync) {
        return rc;
    }
    let rc = (real_methods(f).xSync.unwrap())(real(f), flags);
    if rc == ffi::SQLITE_OK {
        // A journaling file system (ext4, xfs) commits every earlier
        // metadata operation, of any file, with the journal at an fsync:
        // creations and deletions before this sync are now durable.
        st.deleted.clear();
        for p in st.paths.values_mut() {
            p.created_unsynced = false;
        }
        if s.id != 0 {
            if let Some(path) = st.open.get(&s.id).cloned() {
                st.paths.entry(path).or_default().undo.clear();
            }
        }
    }
    rc
}

unsafe extern "C" fn x_file_size(f: *mut ffi::sqlite3_file, out: *mut ffi::sqlite3_int64) -> c_int {
    (real_methods(f).xFileSize.unwrap())(real(f), out)
}

unsafe extern "C" fn x_lock(f: *mut ffi::sqlite3_file, l: c_int) -> c_int {
    (real_methods(f).xLock.unwrap())(real(f), l)
}

unsafe extern "C" fn x_unlock(f: *mut ffi::sqlite3_file, l: c_int) -> c_int {
    (real_methods(f).xUnlock.unwrap())(real(f), l)
}

unsafe extern "C" fn x_check_reserved(f: *mut ffi::sqlite3_file, out: *mut c_int) -> c_int {
    (real_methods(f).xCheckReservedLock.unwrap())(real(f), out)
}

unsafe extern "C" fn x_file_control(
    f: *mut ffi::sqlite3_file,
    op: c_int,
    arg: *mut c_void,
) -> c_int {
    (real_methods(f).xFileControl.unwrap())(real(f), op, arg)
}

unsafe extern "C" fn x_sector_size(f: *mut ffi::sqlite3_file) -> c_int {
    (real_methods(f).xSectorSize.unwrap())(real(f))
}

unsafe extern "C" fn x_device_characteristics(f: *mut ffi::sqlite3_file) -> c_int {
    (real_methods(f).xDeviceCharacteristics.unwrap())(real(f))
}

unsafe extern "C" fn x_shm_map(
    f: *mut ffi::sqlite3_file,
    pg: c_int,
    pgsz: c_int,
    extend: c_int,
    pp: *mut *mut c_void,
) -> c_int {
    (real_methods(f).xShmMap.unwrap())(real(f), pg, pgsz, extend, pp)
}

unsafe extern "C" fn x_shm_lock(
    f: *mut ffi::sqlite3_file,
    off: c_int,
    n: c_int,
    flags: c_int,
) -> c_int {
    (real_methods(f).xShmLock.unwrap())(real(f), off, n, flags)
}

unsafe extern "C" fn x_shm_barrier(f: *mut ffi::sqlite3_file) {
    (real_methods(f).xShmBarrier.unwrap())(real(f))
}

unsafe extern "C" fn x_shm_unmap(f: *mut ffi::sqlite3_file, delete: c_int) -> c_int {
    (real_methods(f).xShmUnmap.unwrap())(real(f), delete)
}

/// Version 2: shared memory (WAL) but no memory-mapped reads, so every
/// read goes through `xRead`.
static IO_METHODS: ffi::sqlite3_io_methods = ffi::sqlite3_io_methods {
    iVersion: 2,
    xClose: Some(x_close),
    xRead: Some(x_read),
    xWrite: Some(x_write),
    xTruncate: Some(x_truncate),
    xSync: Some(x_sync),
    xFileSize: Some(x_file_size),
    xLock: Some(x_lock),
    xUnlock: Some(x_unlock),
    xCheckReservedLock: Some(x_check_reserved),
    xFileControl: Some(x_file_control),
    xSectorSize: Some(x_sector_size),
    xDeviceCharacteristics: Some(x_device_characteristics),
    xShmMap: Some(x_shm_map),
    xShmLock: Some(x_shm_lock),
    xShmBarrier: Some(x_shm_barrier),
    xShmUnmap: Some(x_shm_unmap),
    xFetch: None,
    xUnfetch: None,
};

// ----- vfs methods ----------------------------------------------------------

unsafe extern "C" fn v_open(
    v: *mut ffi::sqlite3_vfs,
    name: ffi::sqlite3_filename,
    f: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    let sh = shared_of_vfs(v);
    let path = if name.is_null() {
        None
    } else {
        Some(CStr::from_ptr(name).to_string_lossy().into_owned())
    };
    let existed = path
        .as_deref()
        .map(|p| std::path::Path::new(p).exists())
        .unwrap_or(false);
    let rc = ((*sh.real).xOpen.unwrap())(sh.real, name, real(f), flags, out_flags);
    let hdr = f as *mut ShimFile;
    if (*real(f)).pMethods.is_null() {
        (*hdr).base.pMethods = std::ptr::null();
        return rc;
    }
    let mut id = 0;
    if let Some(p) = path {
        let mut st = sh.lock();
        st.next_id += 1;
        id = st.next_id;
        st.open.insert(id, p.clone());
        let ps = st.paths.entry(p).or_default();
        if !existed && flags & ffi::SQLITE_OPEN_CREATE != 0 {
            ps.created_unsynced = true;
        }
    }
    std::ptr::write(
        hdr,
        ShimFile {
            base: ffi::sqlite3_file {
                pMethods: &IO_METHODS,
            },
            shared: sh as *const Shared,
            id,
        },
    );
    rc
}

unsafe extern "C" fn v_delete(
    v: *mut ffi::sqlite3_vfs,
    name: *const c_char,
    sync_dir: c_int,
) -> c_int {
    let sh = shared_of_vfs(v);
    let path = CStr::from_ptr(name).to_string_lossy().into_owned();
    let mut st = sh.lock();
    if st.dead {
        return ffi::SQLITE_IOERR_DELETE;
    }
    let ps = st.paths.remove(&path).unwrap_or_default();
    if !ps.created_unsynced && sync_dir == 0 && !st.deleted.contains_key(&path) {
        // The deletion may not survive a power cut: remember what a cut
        // would bring back (the durable content, i.e. with undo applied).
        if let Ok(mut bytes) = std::fs::read(&path) {
            for u in ps.undo.iter().rev() {
                undo_in_memory(&mut bytes, u);
            }
            st.deleted.insert(path.clone(), bytes);
        }
    }
    ((*sh.real).xDelete.unwrap())(sh.real, name, sync_dir)
}

fn undo_in_memory(bytes: &mut Vec<u8>, u: &Undo) {
    bytes.resize(u.old_size as usize, 0);
    let end = (u.offset as usize + u.old.len()).min(bytes.len());
    let start = (u.offset as usize).min(end);
    bytes[start..end].copy_from_slice(&u.old[..end - start]);
}

unsafe extern "C" fn v_access(
    v: *mut ffi::sqlite3_vfs,
    name: *const c_char,
    flags: c_int,
    out: *mut c_int,
) -> c_int {
    let r = shared_of_vfs(v).real;
    ((*r).xAccess.unwrap())(r, name, flags, out)
}

unsafe extern "C" fn v_full_pathname(
    v: *mut ffi::sqlite3_vfs,
    name: *const c_char,
    n: c_int,
    out: *mut c_char,
) -> c_int {
    let r = shared_of_vfs(v).real;
    ((*r).xFullPathname.unwrap())(r, name, n, out)
}

unsafe extern "C" fn v_randomness(v: *mut ffi::sqlite3_vfs, n: c_int, out: *mut c_char) -> c_int {
    let r = shared_of_vfs(v).real;
    ((*r).xRandomness.unwrap())(r, n, out)
}

unsafe extern "C" fn v_sleep(v: *mut ffi::sqlite3_vfs, us: c_int) -> c_int {
    let r = shared_of_vfs(v).real;
    ((*r).xSleep.unwrap())(r, us)
}

unsafe extern "C" fn v_current_time(v: *mut ffi::sqlite3_vfs, out: *mut f64) -> c_int {
    let r = shared_of_vfs(v).real;
    ((*r).xCurrentTime.unwrap())(r, out)
}

unsafe extern "C" fn v_last_error(v: *mut ffi::sqlite3_vfs, n: c_int, out: *mut c_char) -> c_int {
    let r = shared_of_vfs(v).real;
    ((*r).xGetLastError.unwrap())(r, n, out)
}

unsafe extern "C" fn v_current_time64(
    v: *mut ffi::sqlite3_vfs,
    out: *mut ffi::sqlite3_int64,
) -> c_int {
    let r = shared_of_vfs(v).real;
    ((*r).xCurrentTimeInt64.unwrap())(r, out)
}

/// Counters for reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// I/O calls (read, write, truncate, sync) since registration.
    pub io_calls: u64,
    /// I/O calls since the current plan was armed.
    pub io_calls_armed: u64,
    /// Calls failed on purpose (I/O faults and disk-full refusals).
    pub faults_injected: u64,
}

impl FaultVfs {
    /// Registers a new VFS named `name` over the default `unix` VFS. It
    /// is not made the default: open connections with its name.
    pub fn register(name: &str) -> FaultVfs {
        let cname = CString::new(name).expect("VFS name without NUL");
        // SAFETY: sqlite3_vfs_find(NULL) returns the default VFS, a static
        // object; registering copies nothing, so the struct and its name
        // are leaked on purpose and stay valid while registered.
        unsafe {
            // Make sure SQLite is initialised (registers the unix VFS).
            ffi::sqlite3_initialize();
            let real = ffi::sqlite3_vfs_find(std::ptr::null());
            assert!(!real.is_null(), "no default SQLite VFS");
            let shared = Box::into_raw(Box::new(Shared {
                real,
                state: Mutex::new(State {
                    plan: Plan::None,
                    ops: 0,
                    total_ops: 0,
                    dead: false,
                    full: false,
                    faults_injected: 0,
                    next_id: 0,
                    open: HashMap::new(),
                    paths: HashMap::new(),
                    deleted: HashMap::new(),
                }),
            }));
            let vfs = Box::into_raw(Box::new(ffi::sqlite3_vfs {
                iVersion: 2,
                szOsFile: (REAL_OFFSET as c_int) + (*real).szOsFile,
                mxPathname: (*real).mxPathname,
                pNext: std::ptr::null_mut(),
                zName: cname.as_ptr(),
                pAppData: shared as *mut c_void,
                xOpen: Some(v_open),
                xDelete: Some(v_delete),
                xAccess: Some(v_access),
                xFullPathname: Some(v_full_pathname),
                xDlOpen: None,
                xDlError: None,
                xDlSym: None,
                xDlClose: None,
                xRandomness: Some(v_randomness),
                xSleep: Some(v_sleep),
                xCurrentTime: Some(v_current_time),
                xGetLastError: Some(v_last_error),
                xCurrentTimeInt64: Some(v_current_time64),
                xSetSystemCall: None,
                xGetSystemCall: None,
                xNextSystemCall: None,
            }));
            let rc = ffi::sqlite3_vfs_register(vfs, 0);
            assert_eq!(rc, ffi::SQLITE_OK, "sqlite3_vfs_register");
            FaultVfs {
                name: cname,
                vfs,
                shared,
            }
        }
    }

    /// The name to open connections with.
    pub fn name(&self) -> &str {
        self.name.to_str().expect("ASCII name")
    }

    fn shared(&self) -> &Shared {
        // SAFETY: allocated in `register`, freed never (see Drop).
        unsafe { &*self.shared }
    }

    /// The power goes just before the `at`-th I/O call from now (1-based).
    pub fn arm_cut(&self, at: u64) {
        let mut st = self.shared().lock();
        st.plan = Plan::Cut { at: at.max(1) };
        st.ops = 0;
    }

    /// The `at`-th I/O call from now (1-based) fails; with `persistent`,
    /// every call after it fails too, until [`Self::disarm`].
    pub fn arm_fault(&self, at: u64, persistent: bool) {
        let mut st = self.shared().lock();
        st.plan = Plan::Fail {
            at: at.max(1),
            persistent,
        };
        st.ops = 0;
    }

    /// No more cuts or faults (a cut that already happened stays until
    /// [`Self::power_cut`]).
    pub fn disarm(&self) {
        let mut st = self.shared().lock();
        st.plan = Plan::None;
        st.ops = 0;
    }

    /// Disk full on or off.
    pub fn set_full(&self, full: bool) {
        self.shared().lock().full = full;
    }

    /// Whether the armed power cut has happened.
    pub fn is_dead(&self) -> bool {
        self.shared().lock().dead
    }

    pub fn stats(&self) -> Stats {
        let st = self.shared().lock();
        Stats {
            io_calls: st.total_ops,
            io_calls_armed: st.ops,
            faults_injected: st.faults_injected,
        }
    }

    /// Puts the files into a state a power loss could leave (see the
    /// module docs) and brings the power back: every file is durable as it
    /// now is, nothing is armed. `keep(path, n)` says how many of the `n`
    /// unsynced writes of `path` (oldest first) reached the disk; return 0
    /// to lose them all, `n` to keep everything (for a file created since
    /// the last sync, its creation is the first of the `n`; an unsynced
    /// deletion is asked about as `keep(path, 1)`). Call only after every connection through this
    /// VFS is closed. Returns how many unsynced writes were discarded.
    pub fn power_cut(&self, keep: &mut dyn FnMut(&str, usize) -> usize) -> std::io::Result<usize> {
        let mut st = self.shared().lock();
        assert!(
            st.open.is_empty(),
            "power_cut with {} files still open",
            st.open.len()
        );
        let mut discarded = 0;
        let mut paths: Vec<_> = st.paths.drain().collect();
        paths.sort_by(|a, b| a.0.cmp(&b.0));
        for (path, ps) in paths {
            let n = ps.undo.len();
            let kept = if ps.created_unsynced {
                // The creation counts as the first unsynced write: keeping
                // none of them means the file never existed.
                match keep(&path, n + 1).min(n + 1) {
                    0 => {
                        discarded += n;
                        match std::fs::remove_file(&path) {
                            Ok(()) => {}
                            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                            Err(e) => return Err(e),
                        }
                        continue;
                    }
                    k => k - 1,
                }
            } else if n == 0 {
                continue;
            } else {
                keep(&path, n).min(n)
            };
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)?;
            for u in ps.undo[kept..].iter().rev() {
                f.set_len(u.old_size)?;
                f.write_all_at(&u.old, u.offset)?;
            }
            discarded += n - kept;
        }
        let mut deleted: Vec<_> = st.deleted.drain().collect();
        deleted.sort_by(|a, b| a.0.cmp(&b.0));
        for (path, bytes) in deleted {
            // An unsynced deletion is one unsynced change of that path.
            if keep(&path, 1) == 0 {
                std::fs::write(&path, bytes)?;
                discarded += 1;
            }
        }
        st.dead = false;
        st.plan = Plan::None;
        st.ops = 0;
        Ok(discarded)
    }
}

impl Drop for FaultVfs {
    fn drop(&mut self) {
        // SAFETY: unregistering a VFS we registered. The struct and the
        // shared state are leaked rather than freed: a connection someone
        // forgot to close would otherwise point at freed memory.
        unsafe {
            ffi::sqlite3_vfs_unregister(self.vfs);
        }
        let _ = self.shared;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::{Connection, OpenFlags};

    fn open(vfs: &FaultVfs, path: &std::path::Path) -> Connection {
        let c = Connection::open_with_flags_and_vfs(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE,
            vfs.name(),
        )
        .unwrap();
        c.execute_batch("PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;")
            .unwrap();
        c
    }

    fn rows(path: &std::path::Path) -> i64 {
        let c = Connection::open(path).unwrap();
        c.query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap()
    }

    /// With FULL, committed rows survive a cut; with OFF, the same cut
    /// loses them: the model sees the difference fsync makes.
    #[test]
    fn a_cut_keeps_synced_commits_and_loses_unsynced_ones() {
        for (sync, want) in [("FULL", 10), ("OFF", 0)] {
            let d = tempfile::tempdir().unwrap();
            let p = d.path().join("t.db");
            let vfs = FaultVfs::register(&format!("faultvfs-unit-{sync}"));
            {
                let c = open(&vfs, &p);
                c.execute_batch("CREATE TABLE t (x INTEGER)").unwrap();
                c.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)").unwrap();
                drop(c);
            }
            vfs.power_cut(&mut |_, _| 0).unwrap();
            {
                let c = open(&vfs, &p);
                c.execute_batch(&format!("PRAGMA synchronous={sync}"))
                    .unwrap();
                for i in 0..10 {
                    c.execute("INSERT INTO t VALUES (?1)", [i]).unwrap();
                }
                vfs.arm_cut(1);
                assert!(c.execute("INSERT INTO t VALUES (99)", []).is_err());
                assert!(vfs.is_dead());
                drop(c);
            }
            vfs.power_cut(&mut |_, _| 0).unwrap();
            assert_eq!(rows(&p), want, "synchronous={sync}");
        }
    }

    #[test]
    fn the_nth_call_fails_once_or_forever() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("t.db");
        let vfs = FaultVfs::register("faultvfs-unit-fault");
        let c = open(&vfs, &p);
        c.execute_batch("CREATE TABLE t (x INTEGER)").unwrap();
        vfs.arm_fault(1, false);
        assert!(c.execute("INSERT INTO t VALUES (1)", []).is_err());
        c.execute("INSERT INTO t VALUES (2)", []).unwrap();
        vfs.arm_fault(1, true);
        assert!(c.execute("INSERT INTO t VALUES (3)", []).is_err());
        assert!(c.execute("INSERT INTO t VALUES (4)", []).is_err());
        vfs.disarm();
        c.execute("INSERT INTO t VALUES (5)", []).unwrap();
        let xs: Vec<i64> = c
            .prepare("SELECT x FROM t ORDER BY x")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(xs, vec![2, 5]);
        assert_eq!(vfs.stats().faults_injected, 3);
    }

    #[test]
    fn a_full_disk_refuses_growth_and_recovers() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("t.db");
        let vfs = FaultVfs::register("faultvfs-unit-full");
        let c = open(&vfs, &p);
        c.execute_batch("CREATE TABLE t (x BLOB)").unwrap();
        vfs.set_full(true);
        let e = c
            .execute("INSERT INTO t VALUES (zeroblob(100000))", [])
            .unwrap_err();
        assert_eq!(e.sqlite_error_code(), Some(rusqlite::ErrorCode::DiskFull));
        vfs.set_full(false);
        c.execute("INSERT INTO t VALUES (zeroblob(100000))", [])
            .unwrap();
    }
}
