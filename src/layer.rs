//! The `tracing` layer: keeps each worker's slot up to date on span enter/exit, and tracks
//! in-flight local root spans (the victims of a stall).
//!
//! Enter and exit do one thread-local read and a few atomic stores on runtime worker
//! threads, and one thread-local read elsewhere. Root tracking happens when a root span is
//! created, never on enter/exit; a closing span is announced to the watchdog (`close_gate`)
//! and looked up in the closing thread's own index of the roots it created, which retires
//! the entry of a root (see [`Roots`]). The watchdog reaches
//! span data through the [`Dispatch`] the layer was registered with, using lookup functions
//! monomorphised for the subscriber type (the same technique `tracing-opentelemetry` uses
//! for its `Span` extension).

use std::cell::{OnceCell, RefCell};
use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};

use tracing::span::{Attributes, Id};
use tracing::{Dispatch, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

use crate::close_gate::{self, Closing};
use crate::slots;
use crate::victims;

/// The `tracing` layer of looplag; get one from [`LoopLag::layer`](crate::LoopLag::layer).
///
/// Add it to a `tracing_subscriber::Registry`-based subscriber, next to
/// `tracing-opentelemetry`'s layer. It keeps per-thread state for the watchdog and records
/// nothing by itself: it never filters, and it never calls OpenTelemetry from a hook.
///
/// # Request spans
///
/// For marking the victims of a stall, the layer records every local root span (a span with
/// no parent in the process: one per request under tower-http's `TraceLayer`) when it is
/// created, in a per-thread index, without touching the span's data (about 30 ns per root
/// span in BENCHMARKS.md). A layer from an instance built with
/// [`max_victims(0)`](crate::Builder::max_victims) records none: creating a span then costs
/// it nothing, and no instance in the process marks victims through that layer.
///
/// # Layer order
///
/// Add it **before** `tracing-opentelemetry`'s layer:
/// `registry().with(looplag.layer()).with(tracing_opentelemetry::layer())`. A layer added
/// first sees a span close first, and looplag's `on_close` waits there for a watchdog lookup
/// of that span (see the crate's `close_gate` module) to finish. Added after, the watchdog
/// can still be reading a closing span's OpenTelemetry data while `tracing-opentelemetry`
/// closes it; release builds are fine either way, but in debug builds
/// `tracing-opentelemetry`'s own debug assertion ("OtelDataLock should not be held by
/// anything else when closing spans") can then fire, rarely, on the closing thread.
///
/// # Examples
///
/// ```
/// use tracing_subscriber::layer::SubscriberExt;
///
/// let looplag = looplag::LoopLag::builder().build()?;
/// let subscriber = tracing_subscriber::registry().with(looplag.layer());
/// tracing::subscriber::with_default(subscriber, || {
///     tracing::info_span!("request").in_scope(|| { /* ... */ });
/// });
/// # Ok::<(), looplag::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct LoopLagLayer {
    /// Whether local root spans are recorded for victim marking (off when the instance that
    /// made the layer has `max_victims(0)`).
    track_roots: bool,
}

impl Default for LoopLagLayer {
    /// A layer that records request spans for victim marking, as
    /// [`LoopLag::layer`](crate::LoopLag::layer) makes it with the default `max_victims`.
    fn default() -> Self {
        LoopLagLayer::new(true)
    }
}

impl LoopLagLayer {
    pub(crate) fn new(track_roots: bool) -> Self {
        LoopLagLayer { track_roots }
    }
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
struct Roots {
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
        let roots = std::mem::take(&mut self.index.get_mut().roots);
        let shared = shared();
        if !roots.is_empty() {
            shared.roots.adopt(roots);
        }
        if let Some(table) = self.table.take() {
            shared.roots.thread_exited(&table);
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
    fn insert(&self, id: u64, epoch: u64, is_open: &dyn Fn(u64) -> bool) {
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
    fn closing(id: u64) -> Option<Arc<RootInfo>> {
        let own = LOCAL
            .try_with(|local| {
                let mut index = local.index.try_borrow_mut().ok()?;
                index.roots.remove(&id)
            })
            .ok()
            .flatten();
        let root = match own {
            Some(root) => Some(root),
            None if ORPHAN_COUNT.load(Ordering::Relaxed) != 0 => shared().roots.take_orphan(id),
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
    fn find(&self, ids: &HashSet<u64>) -> Vec<Arc<RootInfo>> {
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
    fn for_each_live(&self, mut f: impl FnMut(Arc<RootInfo>)) {
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
    /// The roots epoch when the span was created (see [`roots_epoch_now`]).
    pub(crate) epoch: u64,
    /// `slots::thread_uid()` of the thread that created the span.
    pub(crate) created_on: u64,
    /// `slots::thread_uid()` of the worker that last polled it (0: not seen polled yet).
    pub(crate) last_polled_on: AtomicU64,
    /// Seen closing (by the thread that created it, or as an orphan). A root that closes on
    /// another thread is not marked; the registry tells instead (see `root_context`).
    closed: AtomicBool,
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

/// What the watchdog learns about the span a stalled thread is in.
#[derive(Debug)]
pub(crate) struct SpanInfo {
    /// The span's name.
    pub(crate) name: &'static str,
    /// The span's OpenTelemetry context, when `tracing-opentelemetry` is installed.
    pub(crate) context: Option<opentelemetry::Context>,
    /// The local root of the span's trace.
    pub(crate) root: Option<Arc<RootInfo>>,
}

/// Span lookups, monomorphised for the subscriber the layer was registered with.
#[derive(Clone, Copy)]
struct Lookups {
    span_info: fn(&Dispatch, u64) -> Option<SpanInfo>,
    root_id_of: fn(&Dispatch, u64) -> Option<u64>,
    root_context: fn(&Dispatch, &RootInfo, bool) -> Option<opentelemetry::Context>,
}

impl Lookups {
    fn of<S>() -> Self
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
    {
        Lookups {
            span_info: span_info::<S>,
            root_id_of: root_id_of::<S>,
            root_context: root_context::<S>,
        }
    }
}

/// Process-wide state shared by every `LoopLagLayer` and every watchdog.
pub(crate) struct Shared {
    dispatch: Mutex<Option<(tracing::dispatcher::WeakDispatch, Lookups)>>,
    roots: Roots,
    epoch: AtomicU64,
}

pub(crate) fn shared() -> &'static Shared {
    static SHARED: OnceLock<Shared> = OnceLock::new();
    SHARED.get_or_init(|| Shared {
        dispatch: Mutex::new(None),
        roots: Roots::new(),
        epoch: AtomicU64::new(1),
    })
}

/// Starts a new roots epoch and returns it: every root created from now on is stamped with
/// it or a later one, every root created before with an earlier one. A root created after a
/// stall ended did not wait for it; comparing epochs tells that apart without a clock read
/// per root. Called when a stall's end is noted (rare); a root only loads the epoch, a
/// cache line that stays shared between the workers, where a counter bumped by every root
/// made them take turns owning it.
pub(crate) fn roots_epoch_now() -> u64 {
    shared()
        .epoch
        .fetch_add(1, Ordering::Relaxed)
        .wrapping_add(1)
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    match mutex.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// A handle on the subscriber the layer lives in, for the watchdog thread.
pub(crate) struct SpanAccess {
    dispatch: Dispatch,
    lookups: Lookups,
}

impl Shared {
    /// The installed subscriber, if the layer is installed and the subscriber still alive.
    pub(crate) fn access(&self) -> Option<SpanAccess> {
        let guard = lock(&self.dispatch);
        let (weak, lookups) = guard.as_ref()?;
        Some(SpanAccess {
            dispatch: weak.upgrade()?,
            lookups: *lookups,
        })
    }

    /// The in-flight local roots created before the stall ended (an epoch below `ended`,
    /// see [`roots_epoch_now`]), that waited on worker thread
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
        self.roots.for_each_live(|root| {
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

    /// The tracked roots whose span id is in `ids` (a root that closed on another thread
    /// than its creator's may still be among them until its creator prunes its index).
    pub(crate) fn roots_by_id(&self, ids: &HashSet<u64>) -> Vec<Arc<RootInfo>> {
        self.roots.find(ids)
    }

    /// Number of in-flight local roots being tracked.
    #[allow(dead_code)]
    pub(crate) fn roots_in_flight(&self) -> usize {
        let mut count = 0usize;
        self.roots
            .for_each_live(|_| count = count.saturating_add(1));
        count
    }
}

impl SpanAccess {
    /// Name, OpenTelemetry context and root of the open span `id`.
    pub(crate) fn span_info(&self, id: u64) -> Option<SpanInfo> {
        close_gate::while_no_span_closes(|| (self.lookups.span_info)(&self.dispatch, id))
    }

    /// The span id of the local root of the open span `id` (`id` itself for a root).
    pub(crate) fn root_id_of(&self, id: u64) -> Option<u64> {
        (self.lookups.root_id_of)(&self.dispatch, id)
    }

    /// The OpenTelemetry context of an in-flight root, if it is still open.
    pub(crate) fn root_context(&self, root: &RootInfo) -> Option<opentelemetry::Context> {
        close_gate::while_no_span_closes(|| {
            (self.lookups.root_context)(&self.dispatch, root, false)
        })
    }

    /// The OpenTelemetry context of a root, asked from its own `on_close`: the span cannot
    /// finish closing meanwhile, so no gate is needed.
    fn closing_root_context(&self, root: &RootInfo) -> Option<opentelemetry::Context> {
        (self.lookups.root_context)(&self.dispatch, root, true)
    }
}

fn span_id(id: u64) -> Option<Id> {
    (id != 0).then(|| Id::from_u64(id))
}

fn span_info<S>(dispatch: &Dispatch, id: u64) -> Option<SpanInfo>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    let subscriber = dispatch.downcast_ref::<S>()?;
    // `get_otel_context` looks the span up again and panics if it is gone: only ask about
    // a span that is not closing (see `close_gate`: the caller holds the gate, and the
    // closers' announcements are read before the registry lookup).
    let announced = close_gate::may_be_closing(id);
    let id = span_id(id)?;
    // Holding `span` keeps the registry slot, so `id` cannot be reused meanwhile.
    let span = subscriber.span(&id)?;
    let root_id = span
        .scope()
        .from_root()
        .next()
        .map(|root| root.id().into_u64());
    // No extensions are held during `get_otel_context`: it locks them.
    let closing = announced || span.extensions().get::<Closing>().is_some();
    let context = if closing {
        None
    } else {
        tracing_opentelemetry::get_otel_context(&id, dispatch)
    };
    let name = span.name();
    drop(span);
    let root = root_id.and_then(|root_id| {
        shared()
            .roots
            .find(&HashSet::from([root_id]))
            .into_iter()
            .find(|root| !root.closed.load(Ordering::Acquire))
    });
    Some(SpanInfo {
        name,
        context,
        root,
    })
}

fn root_id_of<S>(dispatch: &Dispatch, id: u64) -> Option<u64>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    let subscriber = dispatch.downcast_ref::<S>()?;
    let id = span_id(id)?;
    let span = subscriber.span(&id)?;
    let root = span.scope().from_root().next()?;
    Some(root.id().into_u64())
}

/// The OpenTelemetry context of an in-flight root. `own_close`: asked from the root's own
/// `on_close`, where it cannot finish closing meanwhile; otherwise the caller holds the close
/// gate and the closers' announcements are read first (see `close_gate`).
fn root_context<S>(
    dispatch: &Dispatch,
    root: &RootInfo,
    own_close: bool,
) -> Option<opentelemetry::Context>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    let subscriber = dispatch.downcast_ref::<S>()?;
    if !own_close && (root.closed.load(Ordering::Acquire) || close_gate::may_be_closing(root.id)) {
        return None;
    }
    let id = span_id(root.id)?;
    // A root that closed on another thread than its creator's is not marked closed, but
    // its span is gone: the registry's ids are not reused for a long time (its slab keeps
    // a generation per slot), and a root never has a parent.
    let span = subscriber.span(&id)?;
    let closing = span.extensions().get::<Closing>().is_some();
    // Not a closing span: see `span_info` and `close_gate`.
    if span.parent().is_some() || closing {
        return None;
    }
    let context = tracing_opentelemetry::get_otel_context(&id, dispatch);
    drop(span);
    context
}

impl<S> Layer<S> for LoopLagLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    /// Remembers the subscriber so the watchdog can reach span data.
    fn on_register_dispatch(&self, subscriber: &Dispatch) {
        *lock(&shared().dispatch) = Some((subscriber.downgrade(), Lookups::of::<S>()));
    }

    /// Starts tracking a new local root span.
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        if !self.track_roots {
            return;
        }
        let is_root = if attrs.is_root() {
            true
        } else if attrs.parent().is_some() || slots::inside_entered_span() {
            // A contextual span created while a span is entered on this worker has that
            // span as its parent; knowing it from the slot spares the registry lookup behind
            // `current_span` (≈ 25 ns per contextual child span).
            false
        } else {
            ctx.current_span().id().is_none()
        };
        if !is_root {
            return;
        }
        let shared = shared();
        let epoch = shared.epoch.load(Ordering::Relaxed);
        let is_open = |id: u64| span_id(id).is_some_and(|id| ctx.span(&id).is_some());
        shared.roots.insert(id.into_u64(), epoch, &is_open);
    }

    /// Records the entered span in the worker's slot.
    #[inline]
    fn on_enter(&self, id: &Id, _ctx: Context<'_, S>) {
        slots::with_current(|slot| slot.enter(id.into_u64()));
    }

    /// Records the exited span in the worker's slot.
    #[inline]
    fn on_exit(&self, id: &Id, _ctx: Context<'_, S>) {
        slots::with_current(|slot| slot.exit(id.into_u64()));
    }

    /// Announces the span closing to the watchdog (see `close_gate`) and retires its root
    /// record if it is a root created on this thread (one hash probe of the thread's index,
    /// see `Roots` in this module). A closing root is first marked as the victim of any
    /// stall it waited on that the watchdog has not finished yet (see `victims`; one relaxed
    /// load when there is none).
    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        let raw = id.into_u64();
        let root = if self.track_roots {
            Roots::closing(raw)
        } else {
            None
        };
        if victims::any_pending() {
            // A root closing on another thread than its creator's is not in this thread's
            // index: find it by id (only while a stall is pending).
            let root = root.clone().or_else(|| {
                let is_root = ctx.span(&id)?.parent().is_none();
                is_root
                    .then(|| {
                        shared()
                            .roots
                            .find(&HashSet::from([raw]))
                            .into_iter()
                            .next()
                    })
                    .flatten()
            });
            if let Some(root) = root {
                victims::root_closing(&root, || shared().access()?.closing_root_context(&root));
            }
        }
        close_gate::closing(raw, || {
            if let Some(span) = ctx.span(&id) {
                span.extensions_mut().insert(Closing);
            }
        });
        // The root's record dies here (its table entry goes dead), after the victim marking.
        drop(root);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt;

    /// The tokens of the live roots whose span id is in `ids` (the tables are process-wide,
    /// so look only at this test's spans).
    fn live_tokens(ids: &[u64]) -> Vec<u64> {
        let mut tokens = Vec::new();
        shared().roots.for_each_live(|root| {
            if ids.contains(&root.id) {
                tokens.push(root.token);
            }
        });
        tokens
    }

    fn span_ids(spans: &[tracing::Span]) -> Vec<u64> {
        spans
            .iter()
            .filter_map(|span| span.id().map(|id| id.into_u64()))
            .collect()
    }

    /// The calling thread's root table.
    fn own_table() -> Option<Arc<Table>> {
        LOCAL
            .try_with(|local| local.table.get().cloned())
            .ok()
            .flatten()
    }

    fn listed(table: &Arc<Table>) -> bool {
        lock(&shared().roots.tables)
            .list
            .iter()
            .any(|listed| Arc::ptr_eq(listed, table))
    }

    #[test]
    fn closed_roots_go_dead_and_are_pruned_open_roots_stay() {
        let subscriber = tracing_subscriber::registry().with(LoopLagLayer::new(true));
        tracing::subscriber::with_default(subscriber, || {
            let open: Vec<_> = (0..10).map(|_| tracing::info_span!("open")).collect();
            let ids = span_ids(&open);
            for _ in 0..10 * Table::PRUNE_MIN {
                drop(tracing::info_span!("request"));
            }
            let child = tracing::info_span!(parent: &open[0], "child");
            let table = own_table().expect("the thread has a root table");
            assert!(listed(&table), "the thread's table is listed");
            let tracked = lock(&table.entries).roots.len();
            assert!(
                tracked <= Table::PRUNE_MIN,
                "closed roots are pruned: {tracked} entries"
            );
            let tokens = live_tokens(&ids);
            assert_eq!(
                tokens.len(),
                10,
                "open roots stay live, the child is no root"
            );
            drop(child);
            drop(open);
            assert!(
                live_tokens(&ids).is_empty(),
                "closing a root kills its entry"
            );
        });
    }

    #[test]
    fn a_root_closed_on_another_thread_goes_when_its_creator_prunes() {
        let dispatch = Dispatch::new(tracing_subscriber::registry().with(LoopLagLayer::new(true)));
        tracing::dispatcher::with_default(&dispatch, || {
            let moved = tracing::info_span!("moved");
            let ids = span_ids(std::slice::from_ref(&moved));
            let on_thread = dispatch.clone();
            std::thread::spawn(move || {
                tracing::dispatcher::with_default(&on_thread, || drop(moved));
            })
            .join()
            .expect("closing thread");
            assert_eq!(live_tokens(&ids).len(), 1, "stale until its creator prunes");
            let open: Vec<_> = (0..Index::PRUNE_MIN)
                .map(|_| tracing::info_span!("open"))
                .collect();
            assert!(
                live_tokens(&ids).is_empty(),
                "the creator's prune found its span closed"
            );
            assert_eq!(
                live_tokens(&span_ids(&open)).len(),
                Index::PRUNE_MIN,
                "open roots stay"
            );
        });
    }

    #[test]
    fn a_root_closed_on_its_own_thread_is_marked_closed_at_once() {
        let subscriber = tracing_subscriber::registry().with(LoopLagLayer::new(true));
        tracing::subscriber::with_default(subscriber, || {
            let root = tracing::info_span!("request");
            let ids = span_ids(std::slice::from_ref(&root));
            let mut held = Vec::new();
            shared().roots.for_each_live(|info| {
                if ids.contains(&info.id) {
                    held.push(info);
                }
            });
            assert_eq!(held.len(), 1, "the root is tracked");
            assert!(!held[0].closed.load(Ordering::Acquire));
            drop(root);
            // Still reachable through the reference held here, but known closed.
            assert!(held[0].closed.load(Ordering::Acquire), "closed on close");
            let (victims, _) = shared().victims(held[0].created_on, u64::MAX, |_| false, 10);
            assert!(
                victims.iter().all(|root| root.token != held[0].token),
                "a closed root is never a victim"
            );
        });
    }

    #[test]
    fn a_layer_without_victims_records_no_roots() {
        let off = tracing_subscriber::registry().with(LoopLagLayer::new(false));
        let ids = tracing::subscriber::with_default(off, || {
            let open: Vec<_> = (0..3).map(|_| tracing::info_span!("request")).collect();
            let ids = span_ids(&open);
            let tokens = live_tokens(&ids);
            drop(open);
            assert!(tokens.is_empty(), "no root recorded: {tokens:?}");
            ids
        });
        assert_eq!(ids.len(), 3, "the spans were created");
        let built = crate::LoopLag::builder()
            .max_victims(0)
            .build()
            .expect("max_victims(0) is accepted");
        let from_instance = tracing_subscriber::registry().with(built.layer());
        tracing::subscriber::with_default(from_instance, || {
            let open = tracing::info_span!("request");
            let tokens = live_tokens(&span_ids(std::slice::from_ref(&open)));
            assert!(tokens.is_empty(), "max_victims(0): no root recorded");
        });
        let on = tracing_subscriber::registry().with(LoopLagLayer::default());
        tracing::subscriber::with_default(on, || {
            let open = tracing::info_span!("request");
            let tokens = live_tokens(&span_ids(std::slice::from_ref(&open)));
            assert_eq!(tokens.len(), 1, "the default layer records the root");
        });
    }

    #[test]
    fn roots_outlive_their_thread_and_its_table_goes_when_they_close() {
        let dispatch = Dispatch::new(tracing_subscriber::registry().with(LoopLagLayer::new(true)));
        let on_thread = dispatch.clone();
        let (open, table) = std::thread::spawn(move || {
            tracing::dispatcher::with_default(&on_thread, || {
                let open: Vec<_> = (0..5).map(|_| tracing::info_span!("moved")).collect();
                drop(tracing::info_span!("closed"));
                let table = own_table().expect("the thread has a root table");
                (open, Arc::downgrade(&table))
            })
        })
        .join()
        .expect("root-creating thread");
        let ids = span_ids(&open);
        let alive = table.upgrade().expect("the exited thread's table is kept");
        assert!(
            alive.exited.load(Ordering::Acquire),
            "the thread has exited"
        );
        assert!(listed(&alive), "a table with open roots stays listed");
        assert_eq!(
            lock(&alive.entries).roots.len(),
            5,
            "the exiting thread pruned its closed root"
        );
        drop(alive);
        assert_eq!(live_tokens(&ids).len(), 5, "open roots stay visible");
        tracing::dispatcher::with_default(&dispatch, || drop(open));
        assert!(live_tokens(&ids).is_empty(), "closed roots are dead");
        assert!(
            table.upgrade().is_none(),
            "the table of an exited thread goes once its roots are closed"
        );
    }
}
