//! The in-flight request records: every local root span (a span with no parent in the
//! process: one per request under tower-http's `TraceLayer`), recorded by the layer when it
//! is created and retired when it closes, for choosing the victims of a stall.

use std::cell::{OnceCell, RefCell};
use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};

use crate::hot::slots;

/// The process-wide root records, shared by every layer and every watchdog.
pub(crate) fn roots() -> &'static Roots {
    static ROOTS: OnceLock<Roots> = OnceLock::new();
    ROOTS.get_or_init(Roots::new)
}

/// The in-flight local roots, for marking the victims of a stall.
///
/// A root span is recorded without touching its span data: a registry lookup and an
/// extension insert cost a root ≈ 48 ns, most of what looplag's layer costs per request.
/// Instead:
///
/// - the creating thread keeps the only strong reference to the root's [`RootInfo`] in its
///   own **index** (a plain hash map by span id, never shared), and each thread's **table**,
///   which the watchdog reads, holds a weak one;
/// - every closing span is looked up in the closing thread's index (one hash probe): a root
///   closing on the thread that created it leaves the index, and its table entry dies;
/// - a root that closes on another thread stays in its creator's index, **stale**, until the
///   creator next prunes its index (once the index has doubled since the last prune, each
///   entry is checked against the registry) — the watchdog and the victim marking check
///   every root against the registry before they touch its trace, so a stale root is never
///   marked; the server benchmark counts such roots (none there);
/// - when a thread exits, its index goes to the process-wide **orphans**, which any thread
///   closing one of them retires (the closing path looks at them only while there are any).
///
/// Each table prunes dead entries once it has doubled since the last prune, which keeps it
/// within twice the number of roots its thread has in flight (at least
/// [`Table::PRUNE_MIN`] entries). Tables stay listed after their thread exits until all their
/// entries are dead. A root created after the thread's thread-locals are gone goes to a
/// shared fallback table and straight to the orphans.
pub(crate) struct Roots {
    tables: Mutex<Tables>,
    /// For roots created during thread teardown, when the thread-local table is gone.
    fallback: Arc<Table>,
    /// Roots of exited threads (and of the fallback table) still open, by span id.
    orphans: Mutex<IdMap<Arc<RootInfo>>>,
}

/// Number of orphans in [`Roots`], read without their lock by every closing span (a static,
/// so that a span that is no root of this thread costs no initialisation check).
static ORPHAN_COUNT: AtomicUsize = AtomicUsize::new(0);

/// Every thread's root table, and the fallback one.
struct Tables {
    list: Vec<Arc<Table>>,
    /// Length at which tables of exited threads are next looked at for dropping.
    prune_at: usize,
}

/// One thread's in-flight roots as the watchdog sees them (weak references, some possibly
/// dead).
struct Table {
    /// `slots::thread_uid()` of the owning thread (unused for the fallback table).
    thread_uid: u64,
    /// The owning thread has exited: no more entries will be added.
    exited: AtomicBool,
    entries: Mutex<Entries>,
}

struct Entries {
    /// The span id of each root, with its record.
    roots: Vec<(u64, Weak<RootInfo>)>,
    /// Length at which dead entries are next pruned.
    prune_at: usize,
    /// The token of this table's next root.
    next_token: u64,
}

/// A hash map keyed by span id. Span ids are already well spread in their low bits, so one
/// multiplication is hash enough (the default hasher would cost more than the rest of a
/// lookup).
type IdMap<T> = HashMap<u64, T, BuildHasherDefault<IdHasher>>;

#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 = (self.0 ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// The roots the calling thread created and has not seen close: the only strong
/// references to their records.
struct Index {
    roots: IdMap<Arc<RootInfo>>,
    /// Size at which the index is next checked for roots that closed on another thread.
    prune_at: usize,
}

impl Index {
    /// Size below which the index is never checked for stale roots.
    const PRUNE_MIN: usize = 64;

    /// Adds a root; once the index has doubled since the last check, drops the roots whose
    /// span `is_open` says has closed (on another thread). Returns whether it checked.
    fn insert(&mut self, id: u64, root: Arc<RootInfo>, is_open: &dyn Fn(u64) -> bool) -> bool {
        // An id already here belongs to a root that closed elsewhere: its span is gone.
        self.roots.insert(id, root);
        if self.roots.len() < self.prune_at {
            return false;
        }
        self.roots.retain(|&id, _| is_open(id));
        self.prune_at = self.roots.len().saturating_mul(2).max(Self::PRUNE_MIN);
        true
    }
}

/// The calling thread's root table and index; hands both over when the thread exits.
struct Local {
    table: OnceCell<Arc<Table>>,
    index: RefCell<Index>,
}

thread_local! {
    static LOCAL: Local = Local {
        table: OnceCell::new(),
        index: RefCell::new(Index {
            roots: IdMap::default(),
            prune_at: Index::PRUNE_MIN,
        }),
    };
}

impl Drop for Local {
    fn drop(&mut self) {
        let own = std::mem::take(&mut self.index.get_mut().roots);
        let roots_of_all = roots();
        if !own.is_empty() {
            roots_of_all.adopt(own);
        }
        if let Some(table) = self.table.take() {
            roots_of_all.thread_exited(&table);
        }
    }
}

impl Entries {
    fn new() -> Self {
        Entries {
            roots: Vec::new(),
            prune_at: Table::PRUNE_MIN,
            next_token: 1,
        }
    }

    /// Drops the dead entries; returns whether any are left.
    fn prune(&mut self) -> bool {
        self.roots.retain(|(_, root)| root.strong_count() > 0);
        self.prune_at = self.roots.len().saturating_mul(2).max(Table::PRUNE_MIN);
        !self.roots.is_empty()
    }
}

impl Table {
    /// Size below which a table is never pruned. Small: dead entries keep their `RootInfo`
    /// allocation (a `Weak` holds it), and a table of a thousand such entries cost every
    /// request cache misses (`new root span + close` +120 ns at 1024, +76 ns at 128 with
    /// one process-wide table). With one table per thread, 32, 64 and 128 measured within
    /// 1 ns of each other; 64 keeps less dead memory per thread.
    const PRUNE_MIN: usize = 64;

    fn new(thread_uid: u64) -> Self {
        let mut entries = Entries::new();
        // Tokens are unique process-wide without a shared counter: the thread's uid (never
        // reused) in the high bits, the table's own count below (2^40 roots per thread).
        entries.next_token = (thread_uid << Self::TOKEN_BITS) | 1;
        Table {
            thread_uid,
            exited: AtomicBool::new(false),
            entries: Mutex::new(entries),
        }
    }

    /// Bits of a token that count the table's roots.
    const TOKEN_BITS: u32 = 40;

    /// Lists a new root with span id `id`, created in `epoch` by the thread `created_on`;
    /// returns the only strong reference to its record.
    fn insert(&self, id: u64, epoch: u64, created_on: u64) -> Arc<RootInfo> {
        let mut entries = lock(&self.entries);
        let token = entries.next_token;
        entries.next_token = token.wrapping_add(1);
        let root = Arc::new(RootInfo {
            id,
            token,
            epoch,
            created_on,
            last_polled_on: AtomicU64::new(0),
            closed: AtomicBool::new(false),
        });
        entries.roots.push((id, Arc::downgrade(&root)));
        if entries.roots.len() >= entries.prune_at {
            entries.prune();
        }
        root
    }

    /// Whether the table must stay listed: its thread is alive or it has live entries.
    /// Prunes the dead entries of an exited thread's table (nobody else will).
    fn in_use(&self) -> bool {
        !self.exited.load(Ordering::Acquire) || lock(&self.entries).prune()
    }
}

impl Roots {
    /// Number of listed tables below which tables of exited threads are not looked at when
    /// a new table is listed (the watchdog drops them anyway when it goes through the roots).
    const TABLES_PRUNE_MIN: usize = 16;

    fn new() -> Self {
        let fallback = Arc::new(Table::new(0));
        Roots {
            tables: Mutex::new(Tables {
                list: vec![Arc::clone(&fallback)],
                prune_at: Self::TABLES_PRUNE_MIN,
            }),
            fallback,
            orphans: Mutex::new(IdMap::default()),
        }
    }

    /// Records a new root with span id `id`, created on the calling thread in epoch
    /// `epoch`. `is_open` tells whether a span id is still open, for dropping the roots of
    /// the thread's index that closed on another thread.
    pub(crate) fn insert(&self, id: u64, epoch: u64, is_open: &dyn Fn(u64) -> bool) {
        let local = LOCAL.try_with(|local| {
            let table = local.table.get_or_init(|| self.register());
            let root = table.insert(id, epoch, table.thread_uid);
            match local.index.try_borrow_mut() {
                Ok(mut index) => index.insert(id, root, is_open),
                // Not reachable from the layer's hooks; never lose the root if it were.
                Err(_) => {
                    self.adopt(std::iter::once((id, root)));
                    false
                }
            }
        });
        let checked = match local {
            Ok(checked) => checked,
            Err(_) => {
                // The thread is exiting and its table and index are gone.
                let root = self.fallback.insert(id, epoch, slots::thread_uid());
                self.adopt(std::iter::once((id, root)));
                false
            }
        };
        // Orphans that closed before they were adopted are checked on the same amortised
        // schedule as the index (never per root: there may be many).
        if checked && ORPHAN_COUNT.load(Ordering::Relaxed) != 0 {
            self.prune_orphans(is_open);
        }
    }

    /// The span `id` is closing on the calling thread: takes its root record out of the
    /// thread's index (or the orphans) if it is a root created here (or by an exited
    /// thread), and marks it closed. `None` for any other span, and for a root that closes
    /// on another thread than the one that created it.
    #[inline]
    pub(crate) fn closing(id: u64) -> Option<Arc<RootInfo>> {
        let own = LOCAL
            .try_with(|local| {
                let mut index = local.index.try_borrow_mut().ok()?;
                index.roots.remove(&id)
            })
            .ok()
            .flatten();
        let root = match own {
            Some(root) => Some(root),
            None if ORPHAN_COUNT.load(Ordering::Relaxed) != 0 => roots().take_orphan(id),
            None => None,
        }?;
        root.closed.store(true, Ordering::Release);
        Some(root)
    }

    #[cold]
    fn take_orphan(&self, id: u64) -> Option<Arc<RootInfo>> {
        let mut orphans = lock(&self.orphans);
        let root = orphans.remove(&id);
        ORPHAN_COUNT.store(orphans.len(), Ordering::Relaxed);
        root
    }

    /// Keeps the roots of an exiting thread (or of the fallback table) alive until they
    /// close.
    #[cold]
    fn adopt(&self, roots: impl IntoIterator<Item = (u64, Arc<RootInfo>)>) {
        let mut orphans = lock(&self.orphans);
        orphans.extend(roots);
        ORPHAN_COUNT.store(orphans.len(), Ordering::Relaxed);
    }

    /// Drops the orphans whose span has closed (on a thread that did not look at the
    /// orphans: they were adopted after it closed).
    #[cold]
    fn prune_orphans(&self, is_open: &dyn Fn(u64) -> bool) {
        let mut orphans = lock(&self.orphans);
        orphans.retain(|&id, _| is_open(id));
        ORPHAN_COUNT.store(orphans.len(), Ordering::Relaxed);
    }

    /// The live roots whose span id is in `ids`.
    pub(crate) fn find(&self, ids: &HashSet<u64>) -> Vec<Arc<RootInfo>> {
        let mut found = Vec::new();
        let tables = lock(&self.tables);
        for table in &tables.list {
            let entries = lock(&table.entries);
            for (id, root) in &entries.roots {
                if ids.contains(id) {
                    if let Some(root) = root.upgrade() {
                        found.push(root);
                    }
                }
            }
        }
        found
    }

    /// Lists a new table for the calling thread; drops the tables of exited threads with no
    /// live roots left once the list has doubled since they were last looked at.
    #[cold]
    fn register(&self) -> Arc<Table> {
        let table = Arc::new(Table::new(slots::thread_uid()));
        let mut tables = lock(&self.tables);
        if tables.list.len() >= tables.prune_at {
            tables.list.retain(|table| table.in_use());
            tables.prune_at = tables
                .list
                .len()
                .saturating_mul(2)
                .max(Self::TABLES_PRUNE_MIN);
        }
        tables.list.push(Arc::clone(&table));
        table
    }

    /// The thread owning `table` is exiting: its table stays listed only while some of its
    /// roots are open.
    fn thread_exited(&self, table: &Arc<Table>) {
        table.exited.store(true, Ordering::Release);
        if !lock(&table.entries).prune() {
            lock(&self.tables)
                .list
                .retain(|listed| !Arc::ptr_eq(listed, table));
        }
    }

    /// Calls `f` with every root whose span is still open; drops the tables of exited
    /// threads that have none left.
    pub(crate) fn for_each_live(&self, mut f: impl FnMut(Arc<RootInfo>)) {
        let mut tables = lock(&self.tables);
        tables.list.retain(|table| {
            if !table.in_use() {
                return false;
            }
            for root in lock(&table.entries)
                .roots
                .iter()
                .filter_map(|(_, root)| root.upgrade())
            {
                f(root);
            }
            true
        });
    }
}

/// An in-flight local root span: the top span of an in-process trace.
#[derive(Debug)]
pub(crate) struct RootInfo {
    /// The span's `tracing` id (only valid while the span is open; checked with `token`).
    pub(crate) id: u64,
    /// Process-unique token, never reused, to tell this span from a later one with the same id.
    pub(crate) token: u64,
    /// The roots epoch when the span was created (see `hot::epoch`).
    pub(crate) epoch: u64,
    /// `slots::thread_uid()` of the thread that created the span.
    pub(crate) created_on: u64,
    /// `slots::thread_uid()` of the worker that last polled it (0: not seen polled yet).
    pub(crate) last_polled_on: AtomicU64,
    /// Seen closing (by the thread that created it, or as an orphan). A root that closes on
    /// another thread is not marked; the registry tells instead (see `root_context`).
    pub(crate) closed: AtomicBool,
}

impl RootInfo {
    /// Whether this trace was waiting on the worker thread `thread`: last polled there, or
    /// created there and not polled since.
    pub(crate) fn waited_on(&self, thread: u64) -> bool {
        match self.last_polled_on.load(Ordering::Relaxed) {
            0 => self.created_on == thread,
            last => last == thread,
        }
    }
}

impl Roots {
    /// The in-flight local roots created before the stall ended (an epoch below `ended`,
    /// see `hot::epoch`), that waited on worker thread
    /// `thread`, except those whose token `exclude` picks, at most `limit` of them; also
    /// returns how many more there were.
    pub(crate) fn victims(
        &self,
        thread: u64,
        ended: u64,
        exclude: impl Fn(u64) -> bool,
        limit: usize,
    ) -> (Vec<Arc<RootInfo>>, usize) {
        let mut chosen = Vec::new();
        let mut dropped = 0usize;
        self.for_each_live(|root| {
            if exclude(root.token)
                || root.epoch >= ended
                || !root.waited_on(thread)
                || root.closed.load(Ordering::Acquire)
            {
                return;
            }
            if chosen.len() < limit {
                chosen.push(root);
            } else {
                dropped = dropped.saturating_add(1);
            }
        });
        (chosen, dropped)
    }

    /// Number of in-flight local roots being tracked.
    #[allow(dead_code)]
    pub(crate) fn roots_in_flight(&self) -> usize {
        let mut count = 0usize;
        self.for_each_live(|_| count = count.saturating_add(1));
        count
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    match mutex.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}

#[cfg(test)]
mod tests;
