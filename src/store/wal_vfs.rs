//! A VFS over SQLite's default one that writes a commit's WAL frames in one `pwrite`.
//!
//! SQLite writes each WAL frame with two `pwrite`s: its 24-byte header, then the page. A
//! frame is 4,120 bytes, so the two calls touch three pages of the WAL file's cache, and a
//! commit of 30 events (≈75 frames) makes ≈150 calls. Through this VFS (used by the
//! writer's connection only) every file is SQLite's own `unix` one, except that the WAL's
//! writes that continue the run of frames — starting where the last write ended, or the
//! WAL's header at offset 0 — are held in memory and written together (in calls of at
//! most [`MAX_WRITE`] bytes):
//!
//! - as soon as a frame that ends a commit (a frame header whose "database size after
//!   commit" is not 0) has its whole page: before SQLite publishes the commit in the WAL
//!   index for readers, and before `COMMIT` returns; an error is returned from that write,
//!   as SQLite's own would be. (The page usually comes in one write; when SQLite pads a
//!   commit to a sector boundary — a file without power-safe overwrite — the padding
//!   frames repeat the commit frame, and one of them may be split by a sync. The page
//!   size, from the WAL's header, says when a page is whole);
//! - before anything else is done with the file: a read, any other write, a sync, a
//!   truncate, a size query, a file control, a lock, the close;
//! - once more than [`MAX_HELD`] bytes are held.
//!
//! Any other write (an overwrite of a frame already written: a page rewritten in place, a
//! checksum rewritten at commit) is made at once, after what was held. Nothing is held
//! across a commit, so what is on disk, and what another connection or process reads, is
//! what SQLite's own VFS would have written by the same point; durability is unchanged
//! (the WAL is synced as before).
//!
//! Connections are opened through [`open`], with `cache_spill` off: SQLite then writes
//! frames only to commit, so every run ends with a commit frame within the same call and
//! nothing is held when a statement returns. (With spilling on, a transaction that spills
//! frames and then rolls back would leave them held, without the WAL's write lock, until
//! the next use of the file: had another process written its own frames there meanwhile,
//! that write-back would overwrite them.)
//!
//! Each connection has its own WAL file handle, and SQLite never uses one connection from
//! two threads at once, so what a handle holds needs no lock.

use rusqlite::ffi;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::OnceLock;

/// The VFS's registered name.
pub const NAME: &str = "membersync-wal";
const NAME_C: &CStr = c"membersync-wal";

/// Size of a WAL frame header (SQLite's `WAL_FRAME_HDRSIZE`).
const FRAME_HEADER: usize = 24;

/// Size of the WAL file's header (SQLite's `WAL_HDRSIZE`), written at offset 0.
const WAL_HEADER: usize = 32;

/// Most bytes held before they are written anyway (frames spilled by a large transaction).
pub const MAX_HELD: usize = 4 << 20;

/// Most bytes given to the default VFS in one write: it writes at most 128 KiB − 1 per
/// call (and reports the rest as a full disk).
pub const MAX_WRITE: usize = 120 << 10;

/// SQLite's default VFS, which this one wraps.
static REAL: AtomicPtr<ffi::sqlite3_vfs> = AtomicPtr::new(std::ptr::null_mut());

/// Registers the VFS (once; not as the default). Returns whether it is available. To be
/// called after SQLite's process-wide configuration: finding the default VFS initializes
/// SQLite.
pub fn register() -> bool {
    static REGISTERED: OnceLock<c_int> = OnceLock::new();
    // SAFETY: `sqlite3_vfs_find` and `sqlite3_vfs_register` are thread-safe; the VFS
    // struct is leaked, so it outlives every connection; `REAL` is set before the VFS
    // can be found by name.
    let rc = *REGISTERED.get_or_init(|| unsafe {
        let real = ffi::sqlite3_vfs_find(std::ptr::null());
        if real.is_null() {
            return ffi::SQLITE_ERROR;
        }
        REAL.store(real, Ordering::Release);
        let mut vfs: ffi::sqlite3_vfs = std::ptr::read(real);
        vfs.pNext = std::ptr::null_mut();
        vfs.zName = NAME_C.as_ptr();
        vfs.szOsFile = (real_offset() + (*real).szOsFile as usize) as c_int;
        vfs.xOpen = Some(x_open);
        ffi::sqlite3_vfs_register(Box::leak(Box::new(vfs)), 0)
    });
    rc == ffi::SQLITE_OK
}

/// Opens a connection through this VFS (registering it if needed), with `cache_spill` off
/// (see the module's notes). Its transactions' dirty pages stay in memory until commit:
/// for the store's writer, whose transactions are batches of events, a few hundred pages.
pub fn open(uri: &str, flags: rusqlite::OpenFlags) -> rusqlite::Result<rusqlite::Connection> {
    if !register() {
        return Err(rusqlite::Error::SqliteFailure(ffi::Error::new(ffi::SQLITE_ERROR), Some(format!("no VFS {NAME}"))));
    }
    let conn = rusqlite::Connection::open_with_flags_and_vfs(uri, flags, NAME)?;
    conn.pragma_update(None, "cache_spill", false)?;
    Ok(conn)
}

/// A WAL file: SQLite's handle, then the default VFS's own handle for the same file.
#[repr(C)]
struct WalFile {
    base: ffi::sqlite3_file,
    real: *mut ffi::sqlite3_file,
    held: *mut Held,
}

/// Appended writes not yet made: `bytes` belong at `start` in the file.
struct Held {
    start: i64,
    bytes: Vec<u8>,
    /// Where the last write ended: a write there continues a run of frames.
    expect: i64,
    /// Bytes of a commit frame's page still to come (after its header was held): when
    /// they are in, the commit is written. 0 outside a commit frame.
    commit_left: usize,
    /// The WAL's page size, once read from its header.
    page_size: usize,
    /// Writes made to the file (held runs count once per call).
    writes: u64,
}

fn real_offset() -> usize {
    let align = std::mem::align_of::<u64>();
    std::mem::size_of::<WalFile>().div_ceil(align) * align
}

unsafe extern "C" fn x_open(
    _vfs: *mut ffi::sqlite3_vfs,
    name: *const c_char,
    file: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    let real_vfs = REAL.load(Ordering::Acquire);
    // SAFETY: `register` set `REAL` to the default VFS before this VFS was registered.
    let Some(open) = (unsafe { (*real_vfs).xOpen }) else { return ffi::SQLITE_ERROR };
    if flags & ffi::SQLITE_OPEN_WAL == 0 {
        // Every other file is the default VFS's own, in the space SQLite allocated.
        return unsafe { open(real_vfs, name, file, flags, out_flags) };
    }
    let wal = file.cast::<WalFile>();
    // SAFETY: SQLite allocated `szOsFile` bytes at `file`: room for a `WalFile` and, at
    // `real_offset()`, the default VFS's handle. `pMethods` stays null until the open
    // succeeds, so a failed open is never closed through these methods.
    unsafe {
        let real = file.cast::<u8>().add(real_offset()).cast::<ffi::sqlite3_file>();
        std::ptr::write(
            wal,
            WalFile { base: ffi::sqlite3_file { pMethods: std::ptr::null() }, real, held: std::ptr::null_mut() },
        );
        (*real).pMethods = std::ptr::null();
        let rc = open(real_vfs, name, real, flags, out_flags);
        if rc != ffi::SQLITE_OK {
            if let Some(close) = (*real).pMethods.as_ref().and_then(|m| m.xClose) {
                close(real);
            }
            return rc;
        }
        (*wal).held = Box::into_raw(Box::new(Held {
            start: 0,
            bytes: Vec::new(),
            expect: -1,
            commit_left: 0,
            page_size: 0,
            writes: 0,
        }));
        (*wal).base.pMethods = &WAL_METHODS;
    }
    ffi::SQLITE_OK
}

static WAL_METHODS: ffi::sqlite3_io_methods = ffi::sqlite3_io_methods {
    iVersion: 1,
    xClose: Some(x_close),
    xRead: Some(x_read),
    xWrite: Some(x_write),
    xTruncate: Some(x_truncate),
    xSync: Some(x_sync),
    xFileSize: Some(x_file_size),
    xLock: Some(x_lock),
    xUnlock: Some(x_unlock),
    xCheckReservedLock: Some(x_check_reserved_lock),
    xFileControl: Some(x_file_control),
    xSectorSize: Some(x_sector_size),
    xDeviceCharacteristics: Some(x_device_characteristics),
    xShmMap: None,
    xShmLock: None,
    xShmBarrier: None,
    xShmUnmap: None,
    xFetch: None,
    xUnfetch: None,
};

/// The default VFS's handle and methods behind a WAL file.
///
/// # Safety
/// `file` is a `WalFile` this VFS opened and has not closed.
unsafe fn real(file: *mut ffi::sqlite3_file) -> (*mut ffi::sqlite3_file, &'static ffi::sqlite3_io_methods) {
    unsafe {
        let real = (*file.cast::<WalFile>()).real;
        (real, &*(*real).pMethods)
    }
}

/// Writes what `file` holds, if anything. On an error what was held is dropped: SQLite
/// treats the error as a failed write and rolls the transaction back.
///
/// # Safety
/// As for [`real`].
unsafe fn flush(file: *mut ffi::sqlite3_file) -> c_int {
    unsafe {
        let held = &mut *(*file.cast::<WalFile>()).held;
        if held.bytes.is_empty() {
            return ffi::SQLITE_OK;
        }
        let (real, methods) = real(file);
        let Some(write) = methods.xWrite else { return ffi::SQLITE_IOERR_WRITE };
        let mut rc = ffi::SQLITE_OK;
        let mut at = held.start;
        for chunk in held.bytes.chunks(MAX_WRITE) {
            rc = write(real, chunk.as_ptr().cast(), chunk.len() as c_int, at);
            held.writes += 1;
            if rc != ffi::SQLITE_OK {
                break;
            }
            at += chunk.len() as i64;
        }
        held.bytes.clear();
        rc
    }
}

unsafe extern "C" fn x_write(file: *mut ffi::sqlite3_file, data: *const c_void, amt: c_int, offset: i64) -> c_int {
    // SAFETY: SQLite passes a handle this VFS opened, and `amt` readable bytes at `data`.
    unsafe {
        let held = &mut *(*file.cast::<WalFile>()).held;
        let len = usize::try_from(amt).unwrap_or(0);
        let bytes = std::slice::from_raw_parts(data.cast::<u8>(), len);
        let appends = !held.bytes.is_empty() && offset == held.start + held.bytes.len() as i64;
        if !appends || held.bytes.len() + len > MAX_HELD {
            let rc = flush(file);
            if rc != ffi::SQLITE_OK {
                return rc;
            }
            // A run of frames starts where the last write ended (or with the WAL's own
            // header). Anything else is an overwrite of a frame already written (a page
            // rewritten in place, a checksum rewritten at commit): written at once.
            if offset != held.expect && !(offset == 0 && len == WAL_HEADER) {
                let (real, methods) = real(file);
                let Some(write) = methods.xWrite else { return ffi::SQLITE_IOERR_WRITE };
                held.expect = offset + len as i64;
                held.writes += 1;
                return write(real, data, amt, offset);
            }
            held.start = offset;
        }
        held.bytes.extend_from_slice(bytes);
        held.expect = offset + len as i64;
        if held.commit_left > 0 {
            held.commit_left = held.commit_left.saturating_sub(len);
            if held.commit_left == 0 {
                // The page of a frame that ends a commit is in: write the whole commit now.
                return flush(file);
            }
            return ffi::SQLITE_OK;
        }
        // A frame header's bytes 4..8 hold the database size after a commit, 0 otherwise.
        if len == FRAME_HEADER && bytes[4..8] != [0, 0, 0, 0] {
            if held.page_size == 0 {
                held.page_size = page_size(file);
            }
            // Unknown (unreadable) page size: the next write ends the commit, as a whole
            // page does almost always; a later part is then written at once.
            held.commit_left = held.page_size.max(1);
        }
        ffi::SQLITE_OK
    }
}

/// The page size in the header of the WAL behind `file` (bytes 8..12, big-endian; 0 if it
/// cannot be read): from what is held if the header is, else from the file. Only called
/// while appending frames, so the header has been written or is held.
///
/// # Safety
/// As for [`real`].
unsafe fn page_size(file: *mut ffi::sqlite3_file) -> usize {
    unsafe {
        let held = &*(*file.cast::<WalFile>()).held;
        let mut b = [0u8; 4];
        if held.start == 0 && held.bytes.len() >= WAL_HEADER {
            b.copy_from_slice(&held.bytes[8..12]);
        } else {
            let (real, methods) = real(file);
            let Some(read) = methods.xRead else { return 0 };
            if read(real, b.as_mut_ptr().cast(), 4, 8) != ffi::SQLITE_OK {
                return 0;
            }
        }
        u32::from_be_bytes(b) as usize
    }
}

unsafe extern "C" fn x_close(file: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: SQLite closes a handle this VFS opened, once; `held` came from `Box::into_raw`.
    unsafe {
        let flushed = flush(file);
        let (real, methods) = real(file);
        let closed = methods.xClose.map_or(ffi::SQLITE_OK, |close| close(real));
        let wal = file.cast::<WalFile>();
        drop(Box::from_raw((*wal).held));
        (*wal).held = std::ptr::null_mut();
        (*wal).base.pMethods = std::ptr::null();
        if flushed != ffi::SQLITE_OK {
            flushed
        } else {
            closed
        }
    }
}

/// The methods that only pass through, each after writing what the handle holds.
macro_rules! flush_then {
    ($name:ident, $method:ident ( $($arg:ident : $ty:ty),* )) => {
        unsafe extern "C" fn $name(file: *mut ffi::sqlite3_file, $($arg: $ty),*) -> c_int {
            // SAFETY: SQLite passes a handle this VFS opened, and arguments valid for the
            // default VFS's method of the same name.
            unsafe {
                let rc = flush(file);
                if rc != ffi::SQLITE_OK {
                    return rc;
                }
                let (real, methods) = real(file);
                match methods.$method {
                    Some(f) => f(real, $($arg),*),
                    None => ffi::SQLITE_NOTFOUND,
                }
            }
        }
    };
}

flush_then!(x_read, xRead(data: *mut c_void, amt: c_int, offset: i64));
flush_then!(x_truncate, xTruncate(size: i64));
flush_then!(x_sync, xSync(flags: c_int));
flush_then!(x_file_size, xFileSize(size: *mut i64));
flush_then!(x_lock, xLock(level: c_int));
flush_then!(x_unlock, xUnlock(level: c_int));
flush_then!(x_check_reserved_lock, xCheckReservedLock(out: *mut c_int));
flush_then!(x_file_control, xFileControl(op: c_int, arg: *mut c_void));

unsafe extern "C" fn x_sector_size(file: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: SQLite passes a handle this VFS opened.
    unsafe {
        let (real, methods) = real(file);
        methods.xSectorSize.map_or(4096, |f| f(real))
    }
}

unsafe extern "C" fn x_device_characteristics(file: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: SQLite passes a handle this VFS opened.
    unsafe {
        let (real, methods) = real(file);
        methods.xDeviceCharacteristics.map_or(0, |f| f(real))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::{Connection, OpenFlags};
    use std::path::Path;

    /// A connection through this VFS that may spill frames before its commits (`cache_spill`
    /// on, unlike [`super::open`]'s), to exercise runs that end without a commit.
    fn open(path: &Path) -> Connection {
        open_uri(&format!("file:{}", path.display()), "NORMAL", true)
    }

    fn open_uri(uri: &str, synchronous: &str, spill: bool) -> Connection {
        crate::store::sqlite::configure_sqlite();
        assert!(register());
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE | OpenFlags::SQLITE_OPEN_URI;
        let conn = if spill {
            Connection::open_with_flags_and_vfs(uri, flags, NAME).unwrap()
        } else {
            super::open(uri, flags).unwrap()
        };
        conn.pragma_update(None, "journal_mode", "WAL").unwrap();
        conn.pragma_update(None, "synchronous", synchronous).unwrap();
        // A small page cache: large transactions spill frames before they commit.
        conn.pragma_update(None, "cache_size", 20).unwrap();
        conn.execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB NOT NULL)").unwrap();
        conn
    }

    /// Writes this connection's WAL handle has made.
    fn writes(conn: &Connection) -> u64 {
        // SAFETY: the connection, and so its WAL handle, is alive.
        unsafe { (*held(conn)).writes }
    }

    /// Bytes this connection's WAL handle holds, not yet written.
    fn held_bytes(conn: &Connection) -> usize {
        // SAFETY: as for `writes`.
        unsafe { (*held(conn)).bytes.len() }
    }

    /// What this connection's WAL handle holds.
    fn held(conn: &Connection) -> *mut Held {
        let mut file: *mut ffi::sqlite3_file = std::ptr::null_mut();
        // SAFETY: SQLITE_FCNTL_JOURNAL_POINTER stores the WAL's handle (opened by this VFS,
        // as `pMethods` shows) at the pointer given; the connection is alive.
        unsafe {
            let db = conn.handle();
            let rc = ffi::sqlite3_file_control(
                db,
                c"main".as_ptr(),
                ffi::SQLITE_FCNTL_JOURNAL_POINTER,
                (&mut file as *mut *mut ffi::sqlite3_file).cast(),
            );
            assert_eq!(rc, ffi::SQLITE_OK);
            assert!(std::ptr::eq((*file).pMethods, &WAL_METHODS), "the WAL is this VFS's");
            (*file.cast::<WalFile>()).held
        }
    }

    fn value(id: i64, round: i64) -> Vec<u8> {
        format!("{id}:{round}:").bytes().cycle().take(3000).collect()
    }

    /// What a crash right now would leave: the database and its WAL as they are on disk,
    /// copied and opened by SQLite's own VFS (which recovers the WAL from its checksums).
    /// Returns each row's id and round (its value checked in full).
    fn after_crash(db: &Path) -> Vec<(i64, i64)> {
        let dir = tempfile::tempdir().unwrap();
        let copy = dir.path().join("copy.db");
        std::fs::copy(db, &copy).unwrap();
        std::fs::copy(format!("{}-wal", db.display()), format!("{}-wal", copy.display())).unwrap();
        let conn = Connection::open(&copy).unwrap();
        let ok: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
        assert_eq!(ok, "ok");
        let mut st = conn.prepare("SELECT id, v FROM t ORDER BY id").unwrap();
        let rows = st.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?))).unwrap();
        rows.map(|row| {
            let (id, v) = row.unwrap();
            let text = String::from_utf8_lossy(&v[..24]).into_owned();
            let round = text.split(':').nth(1).and_then(|r| r.parse().ok()).expect("id:round:");
            assert!(v == value(id, round), "row {id}: value damaged: {text}…");
            (id, round)
        })
        .collect()
    }

    /// Every commit is on disk, whole, when `COMMIT` returns — small ones, and large ones
    /// that spilled frames, rewrote pages already in the WAL and so rewrote checksums —
    /// while a rolled-back transaction leaves nothing; and a commit's frames take a
    /// handful of writes, not two per page.
    #[test]
    fn each_commit_is_on_disk_whole_when_it_returns() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("wal.db");
        let conn = open(&db);
        let mut expected: Vec<(i64, i64)> = Vec::new();
        let insert = |conn: &Connection, id: i64, round: i64| {
            conn.execute("INSERT OR REPLACE INTO t (id, v) VALUES (?1, ?2)", (id, value(id, round))).unwrap();
        };

        // Small commits: five rows (five frames and a few B-tree pages) each.
        for c in 0..30 {
            let before = writes(&conn);
            conn.execute_batch("BEGIN").unwrap();
            for id in c * 5..(c + 1) * 5 {
                insert(&conn, id, 0);
                expected.push((id, 0));
            }
            conn.execute_batch("COMMIT").unwrap();
            let made = writes(&conn) - before;
            assert!(made <= 2, "commit {c}: {made} writes for ≈6 frames");
            assert_eq!(held_bytes(&conn), 0, "commit {c} returned with bytes held");
            assert_eq!(after_crash(&db), expected, "after commit {c}");
        }

        // A large transaction: 300 rows through a 20-page cache (frames spill before the
        // commit), then half of them rewritten (pages already in the WAL are overwritten in
        // place, so the commit rewrites checksums).
        conn.execute_batch("BEGIN").unwrap();
        for id in 1000..1300 {
            insert(&conn, id, 0);
        }
        for id in (1000..1300).step_by(2) {
            insert(&conn, id, 1);
        }
        conn.execute_batch("COMMIT").unwrap();
        assert_eq!(held_bytes(&conn), 0, "the large commit returned with bytes held");
        expected.extend((1000..1300).map(|id| (id, if id % 2 == 0 { 1 } else { 0 })));
        assert_eq!(after_crash(&db), expected, "after the large commit");

        // A large transaction rolled back after spilling, then a small commit.
        conn.execute_batch("BEGIN").unwrap();
        for id in 2000..2300 {
            insert(&conn, id, 0);
        }
        conn.execute_batch("ROLLBACK").unwrap();
        insert(&conn, 3000, 0);
        expected.push((3000, 0));
        assert_eq!(after_crash(&db), expected, "after the rollback and a commit");

        // And the connection itself reads everything back.
        let n: i64 = conn.query_row("SELECT count(*) FROM t", [], |r| r.get(0)).unwrap();
        assert_eq!(n as usize, expected.len());
    }

    /// Without power-safe overwrite (`psow=0`) and with `synchronous=FULL`, SQLite pads a
    /// commit with copies of its last frame up to a sector boundary and syncs there, which
    /// can fall inside a frame's page: that page then arrives in two writes with a sync
    /// between them. Every frame, padding included, is whole in the file when `COMMIT`
    /// returns (readers may read the padding frames: they are in the WAL index).
    #[test]
    fn commits_padded_to_a_sector_are_written_whole() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("psow.db");
        let conn = open_uri(&format!("file:{}?psow=0", db.display()), "FULL", false);
        let mut expected = Vec::new();
        for c in 0..20 {
            conn.execute_batch("BEGIN").unwrap();
            for id in c * 3..(c + 1) * 3 {
                conn.execute("INSERT INTO t (id, v) VALUES (?1, ?2)", (id, value(id, 0))).unwrap();
                expected.push((id, 0));
            }
            conn.execute_batch("COMMIT").unwrap();
            assert_eq!(held_bytes(&conn), 0, "commit {c} returned with bytes held");
            let wal_len = std::fs::metadata(format!("{}-wal", db.display())).unwrap().len();
            assert_eq!(
                (wal_len - WAL_HEADER as u64) % (FRAME_HEADER as u64 + 4096),
                0,
                "commit {c}: a frame cut short"
            );
            assert_eq!(after_crash(&db), expected, "after commit {c}");
        }
    }

    /// Through [`super::open`] (no spilling), nothing is held when a statement returns:
    /// not after a large transaction's commit, nor after one rolled back. With spilling on,
    /// the rolled-back transaction's frames would be (checked first, as the contrast) — and
    /// written back over whatever another connection committed in the meantime (which,
    /// tried, left a WAL SQLite read as "file is not a database"). Here another
    /// connection commits after the rollback, and everything stays readable.
    #[test]
    fn nothing_is_held_when_a_statement_returns() {
        let dir = tempfile::tempdir().unwrap();
        let large = |conn: &Connection, from: i64, end: &str| {
            conn.execute_batch("BEGIN").unwrap();
            for id in from..from + 300 {
                conn.execute("INSERT INTO t (id, v) VALUES (?1, ?2)", (id, value(id, 0))).unwrap();
            }
            conn.execute_batch(end).unwrap();
        };
        let spilling = open(&dir.path().join("spill.db"));
        // Every page in the database file, none in the WAL: rolling back then reads nothing
        // from the WAL (which would write what is held first).
        spilling.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)").unwrap();
        large(&spilling, 0, "ROLLBACK");
        assert!(held_bytes(&spilling) > 0, "the contrast: spilled frames held after ROLLBACK");

        let db = dir.path().join("nospill.db");
        let conn = open_uri(&format!("file:{}", db.display()), "NORMAL", false);
        conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)").unwrap();
        large(&conn, 0, "ROLLBACK");
        assert_eq!(held_bytes(&conn), 0, "held after ROLLBACK");
        let other = Connection::open(&db).unwrap();
        for id in 5000..5010 {
            other.execute("INSERT INTO t (id, v) VALUES (?1, ?2)", (id, value(id, 0))).unwrap();
        }
        let n: i64 = conn.query_row("SELECT count(*) FROM t", [], |r| r.get(0)).unwrap();
        assert_eq!(n, 10, "the other connection's rows, read through this one");
        large(&conn, 1000, "COMMIT");
        assert_eq!(held_bytes(&conn), 0, "held after COMMIT");
        let expected: Vec<(i64, i64)> = (1000..1300).chain(5000..5010).map(|id| (id, 0)).collect();
        assert_eq!(after_crash(&db), expected);
    }
}
