//! SQLite's process-wide settings, made before its first connection: its allocator
//! (mimalloc) and no memory statistics. Nothing here touches a database.
//!
//! What this module must never do: change a setting after SQLite has opened a connection.

/// Process-wide SQLite settings, made once before the first connection opens (SQLite
/// accepts them only before it initializes). Its allocator: mimalloc (below). Memory
/// statistics off: with them on, every SQLite allocation and free takes one process-wide
/// mutex, which the writer, the checkpointer and the readers then contend for — about a
/// tenth of the writer's time under load. Nothing here reads those statistics.
pub(super) fn configure_sqlite() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: both calls are made before any connection opens in this process (or they
        // return SQLITE_MISUSE and change nothing); SQLITE_CONFIG_MALLOC copies the struct,
        // whose functions stay valid for the life of the process.
        let methods = mimalloc_methods();
        let rc = unsafe { rusqlite::ffi::sqlite3_config(rusqlite::ffi::SQLITE_CONFIG_MALLOC, &methods) };
        if rc != rusqlite::ffi::SQLITE_OK {
            tracing::debug!(rc, "SQLite was already initialized; it keeps its own allocator.");
        }
        let rc = unsafe { rusqlite::ffi::sqlite3_config(rusqlite::ffi::SQLITE_CONFIG_MEMSTATUS, 0 as std::ffi::c_int) };
        if rc != rusqlite::ffi::SQLITE_OK {
            tracing::debug!(rc, "SQLite was already initialized; its memory statistics stay on.");
        }
    });
}

/// SQLite's allocations from mimalloc (the process's allocator) rather than the C
/// library's `malloc`, which took a tenth of the writer's time under load. It costs memory:
/// the server's peak RSS under the load benchmark rose from ≈71 to ≈90 MB (BENCHMARKS.md).
pub(super) fn mimalloc_methods() -> rusqlite::ffi::sqlite3_mem_methods {
    rusqlite::ffi::sqlite3_mem_methods {
        xMalloc: Some(sqlite_malloc),
        xFree: Some(sqlite_free),
        xRealloc: Some(sqlite_realloc),
        xSize: Some(sqlite_size),
        xRoundup: Some(sqlite_roundup),
        xInit: Some(sqlite_mem_init),
        xShutdown: Some(sqlite_mem_shutdown),
        pAppData: std::ptr::null_mut(),
    }
}

// Part of mimalloc's C library (linked through `libmimalloc-sys`), not of its bindings'
// default set.
extern "C" {
    fn mi_usable_size(p: *const std::ffi::c_void) -> usize;
    fn mi_good_size(size: usize) -> usize;
}

// SAFETY (all of these): SQLite calls them as `sqlite3_mem_methods` says — sizes are
// positive, pointers came from these functions. mimalloc aligns to 16 bytes (SQLite needs 8).
unsafe extern "C" fn sqlite_malloc(n: std::ffi::c_int) -> *mut std::ffi::c_void {
    unsafe { libmimalloc_sys::mi_malloc(n.max(0) as usize) }
}

unsafe extern "C" fn sqlite_free(p: *mut std::ffi::c_void) {
    unsafe { libmimalloc_sys::mi_free(p) }
}

unsafe extern "C" fn sqlite_realloc(p: *mut std::ffi::c_void, n: std::ffi::c_int) -> *mut std::ffi::c_void {
    unsafe { libmimalloc_sys::mi_realloc(p, n.max(0) as usize) }
}

unsafe extern "C" fn sqlite_size(p: *mut std::ffi::c_void) -> std::ffi::c_int {
    let n = unsafe { mi_usable_size(p) };
    std::ffi::c_int::try_from(n).unwrap_or(std::ffi::c_int::MAX)
}

unsafe extern "C" fn sqlite_roundup(n: std::ffi::c_int) -> std::ffi::c_int {
    let rounded = unsafe { mi_good_size(n.max(0) as usize) };
    std::ffi::c_int::try_from(rounded).unwrap_or(n)
}

unsafe extern "C" fn sqlite_mem_init(_: *mut std::ffi::c_void) -> std::ffi::c_int {
    rusqlite::ffi::SQLITE_OK
}

unsafe extern "C" fn sqlite_mem_shutdown(_: *mut std::ffi::c_void) {}
